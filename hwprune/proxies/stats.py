"""Generic calibration statistics and helpers that every family's proxies reuse.

:class:`SublayerStats` folds the inputs of one linear projection (tokens x width) into running sums
(``xtx = sum x x^T`` in float64, ``sum``, ``sumsq``, ``count``) plus the energy of the residual stream
the projection writes into, so that errors normalise to a comparable unit across layers. Memory is
O(width^2) per projection: activations are never stored.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["SublayerStats", "num_threads", "progress_bar", "length_batches"]


@dataclass
class SublayerStats:
    """Running sums over ``count`` tokens of the ``width``-dim input of one output projection."""

    width: int
    xtx: torch.Tensor = field(init=False)  # (width, width) float64
    sum: torch.Tensor = field(init=False)  # (width,) float64
    sumsq: torch.Tensor = field(init=False)  # (width,) float64
    count: int = 0
    resid_sq: float = 0.0  # sum over tokens of ||residual entering the sublayer||^2
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
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not live,
    )


def length_batches(inputs: Mapping[str, torch.Tensor], batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of similar length, each cut to its longest row: padding costs nothing then."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    order = torch.argsort(mask.sum(1), stable=True)
    out = []
    for i in range(0, len(order), batch):
        sel = order[i : i + batch]
        n = max(int(mask[sel].sum(1).max()), 1)
        out.append((ids[sel, :n], mask[sel, :n]))
    return out
