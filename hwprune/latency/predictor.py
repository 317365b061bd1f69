"""Predictors: candidate -> milliseconds, without building the candidate.

The search needs thousands of predictions per second and, for the DP, the cost of each unit alone, so
a :class:`Predictor` is additive: ``predict(c) = base + sum_i cost_i(size_i)``. :class:`LUTPredictor`
reads the costs from a measured :class:`~hwprune.latency.table.LatencyTable`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence

import numpy as np

from hwprune.errors import HwpruneError
from hwprune.latency.table import LatencyTable
from hwprune.space import Candidate, PruningSpace

__all__ = ["Predictor", "CostsPredictor", "LUTPredictor", "WeightedPredictor", "ContextPredictor", "context_weights"]


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


class CostsPredictor(Predictor):
    """An additive predictor held as numbers: ``base`` plus, per unit, its cost at each allowed size."""

    def __init__(self, space: PruningSpace, base: float, costs: Sequence[np.ndarray]) -> None:
        super().__init__(space)
        self._base = float(base)
        self._costs = [np.asarray(c, dtype=np.float64) for c in costs]
        self._index = [{s: j for j, s in enumerate(u.sizes)} for u in space.units]

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


class LUTPredictor(CostsPredictor):
    """Base + per-unit lookups in a measured table (encoders: ``heads`` and ``ffn`` rows, key ``""``).

    Sizes measured in the table are used exactly: latency is a staircase (11 heads may run faster than
    10 when 11*head_dim packs better), and smoothing would hide the steps the search should exploit.
    Sizes between two measured ones are interpolated linearly (the best guess without a measurement);
    sizes outside the measured range are refused, since extrapolating a staircase is a guess.
    """

    def __init__(self, table: LatencyTable, space: PruningSpace) -> None:
        self.table = table
        base = table.rows("base")
        if base.empty:
            raise HwpruneError(f"{_where(table)} has no 'base' row; re-profile to rebuild it")
        costs: list[np.ndarray] = []
        for u in space.units:
            rows = table.rows(u.kind, u.name)
            if rows.empty:
                rows = table.rows(u.kind, "")
            if rows.empty:
                raise HwpruneError(
                    f"{_where(table)} has no rows of kind {u.kind!r} (unit {u.name}); it was "
                    f"profiled for another model family ({table.family}); re-profile this model"
                )
            costs.append(
                _lookup(
                    rows["size"].to_numpy(), rows["median_ms"].to_numpy(), u.sizes, unit=u.name, where=_where(table)
                )
            )
        super().__init__(space, float(base["median_ms"].sum()), costs)


class WeightedPredictor(Predictor):
    """``sum_k w_k * p_k`` over predictors of one space: base and unit costs are mixed alike, so the sum is
    additive where every part is (a request = its prefill + its decode steps; a context between two
    measured ones = their linear mix)."""

    def __init__(self, parts: Sequence[tuple[float, Predictor]]) -> None:
        if not parts:
            raise ValueError("a weighted predictor needs at least one part")
        super().__init__(parts[0][1].space)
        self.parts = [(float(w), p) for w, p in parts]
        self.additive = all(p.additive for _, p in self.parts)  # per instance

    def unit_costs(self) -> tuple[float, list[np.ndarray]]:
        got = [(w, p.unit_costs()) for w, p in self.parts]
        base = sum(w * b for w, (b, _) in got)
        n = len(got[0][1][1])
        costs = [np.sum([w * c[i] for w, (_, c) in got], axis=0) for i in range(n)]
        return float(base), [np.asarray(c, dtype=np.float64) for c in costs]

    def predict(self, cand: Candidate) -> float:
        return float(sum(w * p.predict(cand) for w, p in self.parts))

    def linearized_at(self, reference: Candidate) -> Predictor:
        if self.additive:
            return self
        return WeightedPredictor([(w, p.linearized_at(reference)) for w, p in self.parts])


class ContextPredictor(WeightedPredictor):
    """A decode table's latency model at one KV-cache length ``context``.

    ``per_context`` holds the family's predictor at every context the table measured. Between two
    measured contexts the prediction (base and every unit cost) is interpolated linearly in the context,
    exact at a measured one: attention reads a cache that grows linearly. Outside the grid it is
    extrapolated linearly from the two nearest contexts, and :attr:`warning` says so with an honest error
    estimate: the same extrapolation, made from the grid's other points to its own end point, against
    what the table holds there (needs three contexts).
    """

    def __init__(self, per_context: Mapping[int, Predictor], context: int, *, where: str = "the latency table") -> None:
        grid = sorted(int(c) for c in per_context)
        if not grid:
            raise HwpruneError(f"{where} has no decode contexts; re-profile with --regime decode --context ...")
        if len(grid) == 1 and context != grid[0]:
            raise HwpruneError(
                f"{where} was profiled at context {grid[0]} only; predicting context {context} needs at "
                "least two contexts around it: re-profile with --context listing both"
            )
        self.per_context, self.context, self.grid = dict(per_context), int(context), grid
        self.weights = context_weights(grid, self.context)
        super().__init__([(w, self.per_context[c]) for c, w in self.weights.items()])
        self.warning: str | None = None
        if not grid[0] <= self.context <= grid[-1]:
            self.warning = self._extrapolation_warning(where)

    def _extrapolation_warning(self, where: str) -> str:
        g = self.grid
        end, pts = (g[-1], g[-3:-1]) if self.context > g[-1] else (g[0], g[1:3])
        side = "above" if self.context > g[-1] else "below"
        msg = (
            f"context {self.context} is {side} the profiled grid {', '.join(map(str, g))} of {where}; "
            f"predictions are extrapolated linearly from contexts {' and '.join(map(str, self.weights))}"
        )
        if len(g) < 3:
            return msg + " (with two contexts its error cannot be estimated; profile a context beyond it)"
        dense = {c: self.per_context[c].dense_ms() for c in g}
        guess = sum(wi * dense[c] for c, wi in context_weights(list(pts), end).items())
        err = 100 * (guess - dense[end]) / dense[end]
        near = pts[-1] if side == "above" else pts[0]
        fix = "beyond" if side == "above" else "at or below"
        return (
            msg + f"; the same extrapolation from {pts[0]} and {pts[1]} to {end} ({abs(end - near)} tokens past "
            f"them) misses the table's dense model there by {err:+.1f} %; here it reaches "
            f"{abs(self.context - end)} tokens past the grid (profile a context {fix} {self.context})"
        )


def context_weights(grid: Sequence[int], context: int) -> dict[int, float]:
    """Linear interpolation (or extrapolation past the ends) weights over the two nearest grid points."""
    grid = list(grid)
    if context in grid or len(grid) == 1:
        return {context if context in grid else grid[0]: 1.0}
    k = int(np.searchsorted(grid, context))
    lo, hi = (grid[0], grid[1]) if k == 0 else (grid[-2], grid[-1]) if k == len(grid) else (grid[k - 1], grid[k])
    t = (context - lo) / (hi - lo)
    return {lo: 1.0 - t, hi: t}


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
