"""Activation statistics of the dense decoder over calibration inputs, gathered with forward hooks.

Per layer we accumulate, over non-padding tokens only, the statistics (:class:`SublayerStats`) of the
inputs of the two output projections: ``attn.o_proj`` (the concatenated head outputs, width
``num_heads * head_dim``; KV group ``j`` owns columns ``j * group_size * head_dim`` onwards) and
``mlp.down_proj`` (the FFN activations, width ``intermediate_size``). Each also gets the energy of
the residual stream ``x`` entering the sublayer (the input of its pre-norm ``attn_norm`` /
``mlp_norm``), which normalises errors so that curves compare across layers.

Memory is O(layers * (attn_width^2 + ffn_width^2)) float64: activations are folded into the sums
batch by batch and never stored. The final norm and the LM head are skipped (a hook stops the forward
pass after the last block), so the ``(batch, seq, vocab)`` logits are never computed.

Batches are length-sorted and cut to their longest row (``length_batches``): with right padding and
causal attention, trailing pads change no real token's activations, so this is exact.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import ExitStack, suppress
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hwprune.proxies.stats import SublayerStats, length_batches, num_threads, progress_bar

from .calib import check_right_padded
from .model import Block, Decoder

__all__ = ["LayerStats", "collect_stats"]


@dataclass
class LayerStats:
    """One layer's statistics: ``attn`` of the ``o_proj`` input, ``ffn`` of the ``down_proj`` input."""

    attn: SublayerStats
    ffn: SublayerStats


class _StopForward(Exception):
    """Raised after the last block: the statistics are complete, the logits are not needed."""


@torch.inference_mode()
def collect_stats(
    model: Decoder,
    inputs: Mapping[str, torch.Tensor],
    *,
    batch: int = 8,
    threads: int | None = None,
    progress: bool = False,
) -> list[LayerStats]:
    """One pass of ``model`` over ``inputs`` (``input_ids``/``attention_mask``, (n, seq), right-padded).

    Returns one :class:`LayerStats` per layer. A removed sublayer (pruned model) has no projection and
    no norm: its statistics stay empty (count 0). ``threads`` sets torch's intra-op threads for the
    pass (None: as configured).
    """
    check_right_padded(inputs, "calibration inputs")
    cfg = model.config
    stats = [
        LayerStats(SublayerStats(cfg.kv_groups[i] * cfg.heads_per_group[i] * cfg.head_dim), SublayerStats(cfg.ffn[i]))
        for i in range(cfg.num_layers)
    ]
    keep: list[torch.Tensor] = []  # current batch's non-pad token mask, flattened (set per batch)

    def tokens(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1, t.shape[-1])[keep[0]].float()

    def on_input(s: SublayerStats) -> Any:
        return lambda _m, args, _out: s.add(tokens(args[0]))

    def on_residual(s: SublayerStats) -> Any:
        return lambda _m, args: s.add_residual(tokens(args[0]))

    def stop(_m: nn.Module, _args: Any) -> None:
        raise _StopForward

    with ExitStack() as stack, num_threads(threads), progress_bar(progress) as bar:
        for layer, st in zip(model.layers, stats):
            assert isinstance(layer, Block)
            if layer.attn_norm is not None:
                stack.callback(layer.attn_norm.register_forward_pre_hook(on_residual(st.attn)).remove)
                stack.callback(layer.attn.o_proj.register_forward_hook(on_input(st.attn)).remove)
            if layer.mlp_norm is not None:
                stack.callback(layer.mlp_norm.register_forward_pre_hook(on_residual(st.ffn)).remove)
                stack.callback(layer.mlp.down_proj.register_forward_hook(on_input(st.ffn)).remove)
        stack.callback(model.norm.register_forward_pre_hook(stop).remove)
        parts = length_batches(inputs, batch)
        task = bar.add_task("activation statistics", total=len(parts))
        for ids, mask in parts:
            keep[:] = [mask.reshape(-1).bool()]
            with suppress(_StopForward):
                model(ids, mask)
            bar.advance(task)
    return stats
