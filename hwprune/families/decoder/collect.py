"""Activation statistics of the dense decoder over calibration inputs, gathered layer by layer.

Per layer we accumulate, over non-padding tokens only, the statistics (:class:`SublayerStats`) of the
inputs of the two output projections: ``attn.o_proj`` (the concatenated head outputs, width
``num_heads * head_dim``; KV group ``j`` owns columns ``j * group_size * head_dim`` onwards) and
``mlp.down_proj`` (the FFN activations, width ``intermediate_size``). Each also gets the energy of
the residual stream ``x`` entering the sublayer (the input of its pre-norm ``attn_norm`` /
``mlp_norm``), which normalises errors so that curves compare across layers. For depth pruning each
layer also gets the mean cosine between the residual stream entering and leaving each sublayer and
the block (ShortGPT's Block Influence is ``1 - cos``; the angular distance is ``arccos(cos) / pi``),
and the streams of every sequence's last real token entering and leaving the block (for the
angular-distance rule over several consecutive blocks, Gromov et al. 2024).

The pass is layer-major (:mod:`.stream`): every batch goes through block 0, then every batch through
block 1, and so on, so a layer's statistics are complete before the next layer starts. With
``spill=DIR`` each layer's ``x^T x`` sums go to disk as soon as they are complete: peak memory is the
residual streams of the calibration tokens (tokens x hidden floats) plus one layer's statistics,
never one per layer. The result equals a whole-model pass with hooks exactly (same operations). The
final norm and the LM head are never run, so the ``(tokens, vocab)`` logits are never computed.

Batches are length-sorted and cut to their longest row (``length_batches``): with right padding and
causal attention, trailing pads change no real token's activations, so this is exact.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hwprune._mem import release
from hwprune.proxies.stats import SublayerStats, length_batches, num_threads, progress_bar

from .calib import check_right_padded
from .model import Block, Decoder

__all__ = ["LayerStats", "collect_stats", "WIDE"]

WIDE = 4096  # projections wider than this accumulate x^T x in float32 (an 8192-wide FFN: 268 MB, not 537)


@dataclass
class LayerStats:
    """One layer's statistics: ``attn`` of the ``o_proj`` input, ``ffn`` of the ``down_proj`` input; depth figures.

    ``cos_*`` are means over calibration tokens of cos(stream entering, stream leaving) the attention
    sublayer, the FFN sublayer and the whole block; ``last_in`` / ``last_out`` (sequences, hidden) are
    the streams at every sequence's last real token entering and leaving the block.
    """

    attn: SublayerStats
    ffn: SublayerStats
    cos_attn: float = 1.0
    cos_ffn: float = 1.0
    cos_block: float = 1.0
    last_in: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    last_out: torch.Tensor = field(default_factory=lambda: torch.zeros(0))


def _sublayer_stats(width: int) -> SublayerStats:
    return SublayerStats(width, dtype=torch.float32 if width > WIDE else torch.float64)


def _cos_sum(a: torch.Tensor, b: torch.Tensor) -> float:
    """Sum over tokens of cos(a_t, b_t) for (tokens, hidden) tensors, in float64."""
    a, b = a.double(), b.double()
    den = (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-30)
    return float(((a * b).sum(-1) / den).sum())


@torch.inference_mode()
def collect_stats(
    model: Decoder,
    inputs: Mapping[str, torch.Tensor],
    *,
    batch: int = 8,
    threads: int | None = None,
    progress: bool = False,
    spill: Path | None = None,
) -> list[LayerStats]:
    """One layer-major pass of ``model`` over ``inputs`` (``input_ids``/``attention_mask``, (n, seq), right-padded).

    Returns one :class:`LayerStats` per layer. A removed sublayer (pruned model) has no projection and
    no norm: its statistics stay empty (count 0). ``threads`` sets torch's intra-op threads for the
    pass (None: as configured). ``spill``: a folder to move each layer's ``x^T x`` sums into once complete.
    """
    check_right_padded(inputs, "calibration inputs")
    cfg = model.config
    parts = length_batches(inputs, batch)
    keeps = [mask.reshape(-1).bool() for _, mask in parts]
    lasts = [mask.sum(1) - 1 for _, mask in parts]  # index of each row's last real token
    cur = [0]  # index of the batch running through the current block
    mid: list[torch.Tensor] = []  # that batch's stream between the two sublayers

    def tokens(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1, t.shape[-1])[keeps[cur[0]]].float()

    def last_tokens(xs: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([x[torch.arange(x.shape[0]), li] for x, li in zip(xs, lasts)]).float()

    def on_input(s: SublayerStats) -> Any:
        return lambda _m, args, _out: s.add(tokens(args[0]))

    def on_residual(s: SublayerStats, keep_mid: bool) -> Any:
        def hook(_m: nn.Module, args: Any) -> None:
            s.add_residual(tokens(args[0]))
            if keep_mid:
                mid[:] = [args[0]]

        return hook

    stats: list[LayerStats] = []
    with num_threads(threads), progress_bar(progress) as bar:
        task = bar.add_task("activation statistics", total=cfg.num_layers)
        prepared = [model.prepare(ids, mask) for ids, mask in parts]
        xs = [p[0] for p in prepared]  # the residual streams, replaced block by block
        ctx = [p[1:] for p in prepared]  # (mask, rope) per batch
        del prepared
        for i, block in enumerate(model.blocks()):
            assert isinstance(block, Block)
            g, p, f = cfg.layer_shape(i)
            st = LayerStats(_sublayer_stats(g * p * cfg.head_dim), _sublayer_stats(f))
            handles = []
            if block.attn_norm is not None:
                handles.append(block.attn_norm.register_forward_pre_hook(on_residual(st.attn, False)))
                handles.append(block.attn.o_proj.register_forward_hook(on_input(st.attn)))
            if block.mlp_norm is not None:
                handles.append(block.mlp_norm.register_forward_pre_hook(on_residual(st.ffn, True)))
                handles.append(block.mlp.down_proj.register_forward_hook(on_input(st.ffn)))
            cos = [0.0, 0.0, 0.0]
            st.last_in = last_tokens(xs)
            try:
                for j, (x, (mask, rope)) in enumerate(zip(xs, ctx)):
                    cur[0], mid[:] = j, []
                    out = block(x, mask, rope, None)[0]
                    x_in, x_out = tokens(x), tokens(out)
                    x_mid = tokens(mid[0]) if mid else x_out  # no FFN: the attention output is the block's
                    cos[0] += _cos_sum(x_in, x_mid)
                    cos[1] += _cos_sum(x_mid, x_out)
                    cos[2] += _cos_sum(x_in, x_out)
                    xs[j] = out  # block i's input is no longer needed: one copy of the streams, not two
                    del x, x_in, x_out, x_mid
            finally:
                for h in handles:
                    h.remove()
                mid[:] = []
            n = max(sum(int(k.sum()) for k in keeps), 1)
            st.cos_attn, st.cos_ffn, st.cos_block = (c / n for c in cos)
            st.last_out = last_tokens(xs)
            if spill is not None:
                st.attn.spill(spill, f"layer{i}.attn")
                st.ffn.spill(spill, f"layer{i}.ffn")
            stats.append(st)
            release()  # this layer's activations: back to the OS, not kept as the heap's high-water mark
            bar.advance(task)
    return stats
