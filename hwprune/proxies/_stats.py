"""Activation statistics of the dense encoder over calibration inputs, gathered with forward hooks.

Per layer and sublayer (attention, FFN) we accumulate, over non-padding tokens only, the statistics
of the *input of the output projection* (``Attention.context`` -> ``attention.dense``,
``FeedForward.act`` -> ``ffn.output``): ``xtx = sum x x^T`` (float64), ``sum``, ``sumsq``, ``count``;
and the energy ``sum ||r||^2`` of the residual stream ``r`` entering the sublayer, which normalises
errors so that curves compare across layers. Memory is O(layers * width^2): activations are folded
into the sums batch by batch and never stored.
"""

from __future__ import annotations

import contextlib
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import torch

__all__ = ["SublayerStats", "LayerStats", "collect_stats", "progress_bar", "length_batches", "num_threads"]


@dataclass
class SublayerStats:
    """Running sums over ``count`` tokens of the ``width``-dim input of one output projection."""

    width: int
    xtx: torch.Tensor = field(init=False)     # (width, width) float64
    sum: torch.Tensor = field(init=False)     # (width,) float64
    sumsq: torch.Tensor = field(init=False)   # (width,) float64
    count: int = 0
    resid_sq: float = 0.0                     # sum over tokens of ||residual entering the sublayer||^2
    resid_count: int = 0

    def __post_init__(self) -> None:
        self.xtx = torch.zeros(self.width, self.width, dtype=torch.float64)
        self.sum = torch.zeros(self.width, dtype=torch.float64)
        self.sumsq = torch.zeros(self.width, dtype=torch.float64)

    def add(self, x: torch.Tensor) -> None:
        """Fold ``x`` (tokens, width) in; the product runs in float32 (fast) and accumulates in float64."""
        self.xtx += (x.T @ x).double()
        self.sum += x.sum(0, dtype=torch.float64)
        self.sumsq += x.double().square().sum(0)
        self.count += int(x.shape[0])

    def add_residual(self, r: torch.Tensor) -> None:
        self.resid_sq += float(r.double().square().sum())
        self.resid_count += int(r.shape[0])

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / max(self.count, 1)

    @property
    def var(self) -> torch.Tensor:
        return (self.sumsq / max(self.count, 1) - self.mean.square()).clamp_min(0.0)

    def second_moment(self) -> torch.Tensor:
        """E[x x^T]: the Hessian (up to a factor 2) of the output error without bias compensation."""
        return self.xtx / max(self.count, 1)

    def cov(self) -> torch.Tensor:
        """E[(x - mu)(x - mu)^T]: the Hessian when the bias absorbs the mean of what is removed."""
        mu = self.mean
        c = self.second_moment() - torch.outer(mu, mu)
        return (c + c.T) / 2

    @property
    def resid_energy(self) -> float:
        """Mean ||r||^2 per token of the residual stream this sublayer writes into."""
        return self.resid_sq / max(self.resid_count, 1)


@dataclass
class LayerStats:
    attn: SublayerStats
    ffn: SublayerStats


@contextlib.contextmanager
def num_threads(n: int | None) -> Iterator[None]:
    """Run with ``n`` intra-op threads (None: leave torch's setting), restoring the old value."""
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def progress_bar(enabled: bool) -> Any:
    """A transient rich bar; silent where nobody watches (pipes, CI logs) or when not ``enabled``."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    live = enabled and (console.is_terminal or console.is_jupyter)
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=True, disable=not live)


def length_batches(inputs: Mapping[str, torch.Tensor], batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of similar length, each cut to its longest row: padding costs nothing then."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    order = torch.argsort(mask.sum(1), stable=True)
    out = []
    for i in range(0, len(order), batch):
        sel = order[i:i + batch]
        n = max(int(mask[sel].sum(1).max()), 1)
        out.append((ids[sel, :n], mask[sel, :n]))
    return out


@torch.inference_mode()
def collect_stats(model: torch.nn.Module, inputs: Mapping[str, torch.Tensor], *, batch: int = 16,
                  threads: int | None = None, progress: bool = False) -> list[LayerStats]:
    """One pass of the dense ``Encoder`` over ``inputs``; returns one :class:`LayerStats` per layer.

    ``threads`` sets torch's intra-op threads for the pass (None: as configured); on a shared
    machine 1 thread can be several times faster than oversubscribed OpenMP threads.
    """
    cfg = model.config
    stats = [LayerStats(SublayerStats(cfg.heads[i] * cfg.head_dim), SublayerStats(cfg.ffn[i]))
             for i in range(cfg.num_layers)]
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
