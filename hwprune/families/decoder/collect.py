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
``spill=DIR`` each layer's ``x^T x`` sums go to disk as soon as they are complete, and the residual
streams of the calibration tokens (tokens x hidden floats; 256 MiB for 128 x 256 tokens of a 2048-wide
model) live in an unlinked file there, read and written back one batch at a time (from the page cache,
which a process's resident size does not count): peak memory is one layer's statistics plus one
batch's activations, never one per layer. A batch holds at most ``batch`` rows and at most as many as
keep its widest activation (FFN, or attention scores) under 16 MiB (:func:`rows_per_batch`). The
result equals a whole-model pass with hooks exactly (same operations). The
final norm and the LM head are never run, so the ``(tokens, vocab)`` logits are never computed.

Batches are length-sorted and cut to their longest row (``length_batches``): with right padding and
causal attention, trailing pads change no real token's activations, so this is exact.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Mapping
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


ACT_BYTES = 16 << 20  # the widest activation tensor of one batch (float32)


def rows_per_batch(cfg: Any, seq: int, batch: int) -> int:
    """``batch``, or fewer rows so that one batch's widest activation (FFN width, attention scores of
    every head, or the hidden size, per token) stays under :data:`ACT_BYTES`."""
    widest = max(int(cfg.intermediate_size), int(cfg.hidden_size), int(cfg.num_heads) * seq)
    return max(1, min(batch, ACT_BYTES // max(4 * seq * widest, 1)))


class DiskStreams:
    """Per-batch tensors of fixed shapes in an unlinked temporary file: ``xs[j]`` reads batch ``j`` back,
    ``xs[j] = t`` overwrites it (same shape and dtype). Closed with the object."""

    def __init__(self, folder: Path | None = None) -> None:
        self._file = tempfile.TemporaryFile(prefix="hwprune-streams-", dir=folder, buffering=0)  # noqa: SIM115
        self._where: list[tuple[int, torch.Size, torch.dtype]] = []
        self._end = 0

    def _write(self, data: bytes, offset: int) -> None:
        view, done = memoryview(data), 0
        while done < len(data):  # pwrite may write fewer bytes than given
            done += os.pwrite(self._file.fileno(), view[done:], offset + done)

    def append(self, t: torch.Tensor) -> None:
        data = t.contiguous().numpy().tobytes()
        self._write(data, self._end)
        self._where.append((self._end, t.shape, t.dtype))
        self._end += len(data)

    def __len__(self) -> int:
        return len(self._where)

    def __getitem__(self, j: int) -> torch.Tensor:
        offset, shape, dtype = self._where[j]
        n = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
        buf = bytearray(n)
        view, got = memoryview(buf), 0
        while got < n:  # preadv may return fewer bytes than asked
            k = os.preadv(self._file.fileno(), [view[got:]], offset + got)
            if k <= 0:
                raise OSError(f"the streams file ended early ({got} of {n} bytes)")
            got += k
        return torch.frombuffer(buf, dtype=dtype).view(shape)

    def __setitem__(self, j: int, t: torch.Tensor) -> None:
        offset, shape, dtype = self._where[j]
        if t.shape != shape or t.dtype != dtype:
            raise ValueError(f"batch {j} holds {tuple(shape)} {dtype}, not {tuple(t.shape)} {t.dtype}")
        self._write(t.contiguous().numpy().tobytes(), offset)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (self[j] for j in range(len(self)))


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
    parts = length_batches(inputs, rows_per_batch(cfg, int(inputs["input_ids"].shape[1]), batch))
    keeps = [mask.reshape(-1).bool() for _, mask in parts]
    lasts = [mask.sum(1) - 1 for _, mask in parts]  # index of each row's last real token
    cur = [0]  # index of the batch running through the current block
    mid: list[torch.Tensor] = []  # that batch's stream between the two sublayers

    def tokens(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1, t.shape[-1])[keeps[cur[0]]].float()

    def last_tokens(xs: "list[torch.Tensor] | DiskStreams") -> torch.Tensor:
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
        # the residual streams, replaced block by block: on disk beside the spilled statistics, else in memory
        xs: list[torch.Tensor] | DiskStreams = DiskStreams(spill) if spill is not None else []
        ctx = []  # (mask, rope) per batch
        for ids, mask in parts:
            x0, mask0, rope0 = model.prepare(ids, mask)
            xs.append(x0)
            ctx.append((mask0, rope0))
            del x0
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
