"""Predictors: candidate -> milliseconds, without building the candidate.

The search needs thousands of predictions per second and, for the DP, the cost of each unit alone, so
a :class:`Predictor` is additive: ``predict(c) = base + sum_i cost_i(size_i)``. :class:`LUTPredictor`
reads the costs from a measured :class:`~hwprune.latency.table.LatencyTable`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from hwprune.errors import HwpruneError
from hwprune.latency.table import LatencyTable
from hwprune.space import Candidate, PruningSpace

__all__ = ["Predictor", "LUTPredictor"]


class Predictor(ABC):
    """Latency model over one :class:`PruningSpace`: ``predict(candidate) -> ms``.

    ``unit_costs()`` returns ``(base_ms, costs)`` where ``costs[i][j]`` is the latency in ms that unit
    ``i`` adds when kept at ``space.units[i].sizes[j]``: the additive model the exact DP solves.

    - ``additive = True`` (default): ``predict`` equals ``base + sum`` of the unit costs everywhere,
      so the DP's pick is exact and :meth:`linearized_at` is the predictor itself.
    - ``additive = False`` (e.g. a conv whose time depends on two channel groups): ``unit_costs`` is a
      first-order model around a reference candidate, exact there; :meth:`linearized_at` re-centres
      it, and the search re-linearises around its own DP pick until ``predict`` meets the budget.
    """

    additive: bool = True  # class-level; a wrapper (``CorrectedPredictor``) sets it per instance

    def __init__(self, space: PruningSpace) -> None:
        self.space = space

    @abstractmethod
    def unit_costs(self) -> tuple[float, list[np.ndarray]]: ...

    @abstractmethod
    def predict(self, cand: Candidate) -> float: ...

    def linearized_at(self, reference: Candidate) -> "Predictor":
        """This predictor with unit costs exact at ``reference``. Additive predictors: itself."""
        if self.additive:
            return self
        raise NotImplementedError(f"{type(self).__name__} is not additive and must implement linearized_at")

    def dense_ms(self) -> float:
        return self.predict(self.space.dense())

    def fastest_ms(self) -> float:
        """The fastest prediction in the space: exact for additive predictors (every unit at its cheapest
        size); otherwise the prediction of the smallest candidate."""
        if self.additive:
            base, costs = self.unit_costs()
            return base + float(sum(float(c.min()) for c in costs))
        return self.predict(self.space.smallest())


class LUTPredictor(Predictor):
    """Base + per-unit lookups in a measured table (encoders: ``heads`` and ``ffn`` rows, key ``""``).

    Sizes measured in the table are used exactly: latency is a staircase (11 heads may run faster than
    10 when 11*head_dim packs better), and smoothing would hide the steps the search should exploit.
    Sizes between two measured ones are interpolated linearly (the best guess without a measurement);
    sizes outside the measured range are refused, since extrapolating a staircase is a guess.
    """

    def __init__(self, table: LatencyTable, space: PruningSpace) -> None:
        super().__init__(space)
        self.table = table
        base = table.rows("base")
        if base.empty:
            raise HwpruneError(f"{_where(table)} has no 'base' row; re-profile to rebuild it")
        self._base = float(base["median_ms"].sum())
        self._costs: list[np.ndarray] = []
        self._index: list[dict[int, int]] = []
        for u in space.units:
            rows = table.rows(u.kind, u.name)
            if rows.empty:
                rows = table.rows(u.kind, "")
            if rows.empty:
                raise HwpruneError(
                    f"{_where(table)} has no rows of kind {u.kind!r} (unit {u.name}); it was "
                    f"profiled for another model family ({table.family}); re-profile this model"
                )
            self._costs.append(
                _lookup(
                    rows["size"].to_numpy(), rows["median_ms"].to_numpy(), u.sizes, unit=u.name, where=_where(table)
                )
            )
            self._index.append({s: j for j, s in enumerate(u.sizes)})

    def unit_costs(self) -> tuple[float, list[np.ndarray]]:
        return self._base, [c.copy() for c in self._costs]

    def predict(self, cand: Candidate) -> float:
        try:
            return self._base + float(
                sum(c[ix[s]] for c, ix, s in zip(self._costs, self._index, cand.sizes, strict=True))
            )
        except (KeyError, ValueError):
            self.space.validate(cand)  # raises the one-line error naming the unit
            raise


def _lookup(sizes: np.ndarray, ms: np.ndarray, wanted: tuple[int, ...], *, unit: str, where: str) -> np.ndarray:
    """Exact where measured, linear between the nearest measured neighbours, error outside."""
    order = np.argsort(sizes, kind="stable")
    sizes, ms = sizes[order].astype(np.int64), ms[order].astype(np.float64)
    lo, hi = int(sizes[0]), int(sizes[-1])
    out = np.empty(len(wanted), dtype=np.float64)
    for j, s in enumerate(wanted):
        if s < lo or s > hi:
            raise HwpruneError(
                f"unit {unit}: kept size {s} is outside the measured range [{lo}, {hi}] of "
                f"{where}; re-profile with a wider grid (a space that includes {s})"
            )
        k = int(np.searchsorted(sizes, s))
        if sizes[k] == s:
            out[j] = ms[k]
        else:
            s0, s1 = sizes[k - 1], sizes[k]
            out[j] = ms[k - 1] + (ms[k] - ms[k - 1]) * (s - s0) / (s1 - s0)
    return out


def _where(table: LatencyTable) -> str:
    return f"latency table {table.path}" if table.path else "the latency table"
