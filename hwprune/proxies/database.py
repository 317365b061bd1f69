"""The proxy "database": per unit, a removal order and the error at every kept size.

A proxy fits once and keeps, per unit, the order in which it removes elements (heads, KV groups,
neurons, channels) and the normalised output error at every kept size. A kept size ``s`` always keeps
the elements *not* among the first ``full - s`` removed, so levels are nested and many candidates reuse
one fit. These helpers are family-independent; each family's proxies build on them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from hwprune.space import Unit

__all__ = ["Track", "monotone", "curve", "prefix_errors"]


@dataclass
class Track:
    """One unit's fit: ``order`` removes elements first to last; ``errors[s]`` is the error at kept size s."""

    unit: Unit
    order: np.ndarray  # (full,) int64 element ids, least important first
    errors: np.ndarray  # (full + 1,) float64 indexed by kept size; NaN below the smallest allowed size

    def kept(self, size: int) -> tuple[int, ...]:
        return tuple(sorted(int(i) for i in self.order[self.unit.full - size :]))


def monotone(err_by_size: np.ndarray) -> np.ndarray:
    """Running max from full size down: the DP needs errors non-increasing in kept size.

    A prefix of removed elements can cancel (removing two correlated neurons hurts less than one),
    so raw curves may dip; the envelope keeps the conservative value.
    """
    out = err_by_size.copy()
    ok = ~np.isnan(out)
    out[ok] = np.maximum.accumulate(np.clip(out[ok], 0.0, None)[::-1])[::-1]
    return out


def curve(err_by_removed: np.ndarray, unit: Unit, energy: float) -> np.ndarray:
    """Errors indexed by removed count (0..k) -> normalised, monotone errors indexed by kept size."""
    out = np.full(unit.full + 1, np.nan)
    k = len(err_by_removed) - 1
    out[unit.full - k :] = np.asarray(err_by_removed, dtype=np.float64)[::-1] / max(energy, 1e-30)
    return monotone(out)


def prefix_errors(weight: torch.Tensor, moment: torch.Tensor, order: np.ndarray, granule: int) -> np.ndarray:
    """err[k] = trace(W_P M_PP W_P^T) for P = first k elements of ``order``, k = 0..n (plain removal).

    ``weight`` (out, n*granule) and ``moment`` (n*granule, n*granule), float64 (or float32 for very wide
    projections: the sums then run in float32); element e owns columns e*granule .. (e+1)*granule - 1.
    """
    a = (weight.T @ weight).to(moment.dtype).mul_(moment)  # column-pair contributions, in moment's dtype
    n = a.shape[0] // granule
    if granule > 1:
        a = a.reshape(n, granule, n, granule).sum((1, 3))  # element-pair contributions
    idx = torch.as_tensor(order, dtype=torch.long)
    c = a.index_select(0, idx)
    del a
    c = c.index_select(1, idx).cumsum_(0).cumsum_(1)
    return np.concatenate([[0.0], torch.diagonal(c).double().numpy()])
