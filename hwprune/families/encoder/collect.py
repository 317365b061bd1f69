"""Activation statistics of the dense encoder over calibration inputs, gathered with forward hooks.

Per layer and sublayer (attention, FFN) we accumulate, over non-padding tokens only, the statistics
of the *input of the output projection* (``Attention.context`` -> ``attention.dense``,
``FeedForward.act`` -> ``ffn.output``): ``xtx = sum x x^T`` (float64), ``sum``, ``sumsq``, ``count``;
and the energy ``sum ||r||^2`` of the residual stream ``r`` entering the sublayer, which normalises
errors so that curves compare across layers. Memory is O(layers * width^2): activations are folded
into the sums batch by batch and never stored.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import torch

from hwprune.proxies.stats import SublayerStats, length_batches, num_threads, progress_bar

__all__ = ["LayerStats", "collect_stats"]


@dataclass
class LayerStats:
    attn: SublayerStats
    ffn: SublayerStats


@torch.inference_mode()
def collect_stats(
    model: torch.nn.Module,
    inputs: Mapping[str, torch.Tensor],
    *,
    batch: int = 16,
    threads: int | None = None,
    progress: bool = False,
) -> list[LayerStats]:
    """One pass of the dense ``Encoder`` over ``inputs``; returns one :class:`LayerStats` per layer.

    ``threads`` sets torch's intra-op threads for the pass (None: as configured); on a shared
    machine 1 thread can be several times faster than oversubscribed OpenMP threads.
    """
    cfg = model.config
    stats = [
        LayerStats(SublayerStats(cfg.heads[i] * cfg.head_dim), SublayerStats(cfg.ffn[i])) for i in range(cfg.num_layers)
    ]
    keep: list[torch.Tensor] = []  # current batch's non-pad token mask, flattened (set per batch)

    def tokens(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1, t.shape[-1])[keep[0]].float()

    def on_input(s: SublayerStats) -> Any:
        return lambda _m, args, _out: s.add(tokens(args[0]))

    def on_residual(s: SublayerStats) -> Any:
        return lambda _m, args: s.add_residual(tokens(args[0]))

    with ExitStack() as stack, num_threads(threads), progress_bar(progress) as bar:
        for layer, st in zip(model.layers, stats):
            att, ffn = layer.attention, layer.ffn
            stack.callback(att.register_forward_pre_hook(on_residual(st.attn)).remove)
            stack.callback(ffn.register_forward_pre_hook(on_residual(st.ffn)).remove)
            if att.num_heads:
                stack.callback(att.dense.register_forward_hook(on_input(st.attn)).remove)
            if ffn.width:
                stack.callback(ffn.output.register_forward_hook(on_input(st.ffn)).remove)
        parts = length_batches(inputs, batch)
        task = bar.add_task("activation statistics", total=len(parts))
        for ids, mask in parts:
            keep[:] = [mask.reshape(-1).bool()]
            model(ids, mask)
            bar.advance(task)
    return stats
