"""Generic calibration statistics and helpers that every family's proxies reuse.

:class:`SublayerStats` folds the inputs of one linear projection (tokens x width) into running sums
(``xtx = sum x x^T`` in float64, ``sum``, ``sumsq``, ``count``) plus the energy of the residual stream
the projection writes into, so that errors normalise to a comparable unit across layers. Memory is
O(width^2) per projection: activations are never stored.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hwprune.proxies.obs import damped, symmetrize_

__all__ = ["SublayerStats", "num_threads", "progress_bar", "length_batches"]


@dataclass
class SublayerStats:
    """Running sums over ``count`` tokens of the ``width``-dim input of one output projection.

    ``dtype`` is the accumulator's for ``xtx`` (float64 by default; float32 halves the memory of very
    wide projections, e.g. an 8192-wide FFN: 268 MB instead of 537 MB). :meth:`spill` moves ``xtx``
    to a file so that a model's statistics cost one projection's memory at a time; reading ``xtx``
    afterwards loads a fresh copy (the caller owns it; nothing stays cached).
    """

    width: int
    dtype: torch.dtype = torch.float64
    sum: torch.Tensor = field(init=False)  # (width,) float64
    sumsq: torch.Tensor = field(init=False)  # (width,) float64
    count: int = 0
    resid_sq: float = 0.0  # sum over tokens of ||residual entering the sublayer||^2
    resid_count: int = 0
    _xtx: torch.Tensor | None = field(init=False, repr=False)  # (width, width) ``dtype``, None once spilled
    _spilled: Path | None = field(init=False, default=None, repr=False)
    _diag: torch.Tensor | None = field(init=False, default=None, repr=False)  # diag(xtx), kept when spilled

    def __post_init__(self) -> None:
        self._xtx = torch.zeros(self.width, self.width, dtype=self.dtype)
        self.sum = torch.zeros(self.width, dtype=torch.float64)
        self.sumsq = torch.zeros(self.width, dtype=torch.float64)

    @property
    def xtx(self) -> torch.Tensor:
        """sum x x^T, (width, width) in ``dtype``; loaded from its file when spilled."""
        if self._xtx is not None:
            return self._xtx
        assert self._spilled is not None
        return torch.from_numpy(np.load(self._spilled))

    @property
    def spilled(self) -> bool:
        return self._xtx is None

    def spill(self, folder: Path, name: str) -> None:
        """Write ``xtx`` to ``folder/name.npy`` and free it (no more :meth:`add` after this).

        The file holds ``xtx`` made exactly symmetric (it is, up to the summation's rounding), so that
        :meth:`hessian_blocks` can read any row of it and get the matching column too."""
        if self._xtx is None:
            return
        path = folder / f"{name}.npy"
        symmetrize_(self._xtx)
        self._diag = torch.diagonal(self._xtx).clone()
        np.save(path, self._xtx.numpy())
        self._spilled, self._xtx = path, None

    def hessian_blocks(
        self, cols: torch.Tensor, *, centered: bool, damp: float, rows: int = 256
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """Rows ``cols`` of the damped Hessian (:meth:`cov` if ``centered`` else :meth:`second_moment`,
        plus ``damp`` x its mean diagonal), ``rows`` at a time: ``(start, H[cols[start:start + n]])``.

        Spilled statistics are read from their file row by row (``pread``: no mapping, no whole
        matrix); in memory, the full matrix is built once, as :meth:`cov` does."""
        if not self.spilled:
            h = damped(self.cov() if centered else self.second_moment(), damp, inplace=True)
            for start in range(0, len(cols), rows):
                yield start, h[cols[start : start + rows]]
            return
        assert self._spilled is not None and self._diag is not None
        n = max(self.count, 1)
        mu = self.mean.to(self.dtype)
        diag = self._diag / n
        if centered:
            diag = diag - mu * mu
        lam = damp * float(diag.mean().clamp_min(1e-12))
        offset = np.load(self._spilled, mmap_mode="r").offset  # the .npy header's length; nothing read
        row_bytes = self.width * torch.empty((), dtype=self.dtype).element_size()
        with open(self._spilled, "rb") as f:
            for start in range(0, len(cols), rows):
                idx = cols[start : start + rows]
                out = torch.empty(len(idx), self.width, dtype=self.dtype)
                buf = out.numpy()
                for i, r in enumerate(idx.tolist()):
                    _pread_into(f.fileno(), memoryview(buf[i]).cast("B"), offset + r * row_bytes)
                out.div_(n)
                if centered:
                    out.addr_(mu[idx], mu, alpha=-1.0)
                out[torch.arange(len(idx)), idx] += lam
                yield start, out

    def add(self, x: torch.Tensor) -> None:
        """Fold ``x`` (tokens, width) in; the product runs in float32 (fast) and accumulates in ``dtype``."""
        if self._xtx is None:
            raise RuntimeError("statistics were spilled to disk; they take no more tokens")
        if x.dtype == self.dtype:  # accumulate in place: no width^2 temporary (268 MB for an 8192-wide FFN)
            self._xtx.addmm_(x.T, x)
        else:
            self._xtx += (x.T @ x).to(self.dtype)
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
        """E[x x^T] in ``dtype``: the Hessian (up to a factor 2) of the output error without bias compensation."""
        if self.spilled:  # a fresh copy from disk: divide in place, one width^2 buffer
            return self.xtx.div_(max(self.count, 1))
        return self.xtx / max(self.count, 1)

    def cov(self) -> torch.Tensor:
        """E[(x - mu)(x - mu)^T]: the Hessian when the bias absorbs the mean of what is removed."""
        mu = self.mean.to(self.dtype)
        c = self.second_moment().addr_(mu, mu, alpha=-1.0)  # in place: no width^2 outer product
        return symmetrize_(c)  # symmetric to rounding; in place, block by block

    @property
    def resid_energy(self) -> float:
        """Mean ||r||^2 per token of the residual stream this sublayer writes into."""
        return self.resid_sq / max(self.resid_count, 1)


def _pread_into(fd: int, buf: memoryview, offset: int) -> None:
    """Fill ``buf`` from ``fd`` at ``offset`` (pread may return fewer bytes than asked)."""
    got = 0
    while got < len(buf):
        k = os.preadv(fd, [buf[got:]], offset + got)
        if k <= 0:
            raise OSError(f"statistics file ended early ({got} of {len(buf)} bytes at {offset})")
        got += k


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
