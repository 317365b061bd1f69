"""CNN latency predictor: a conv's time depends on *two* units (the group it reads, the group it writes).

``predict(c) = s * (base + sum over layers of f_l(c_in, c_out)) + o``, with ``f_l`` bilinearly interpolated
in the layer's measured (c_in, c_out) grid (exact at measured points; a bilinear least-squares fit where
the grid is incomplete) and ``(s, o)`` the table's whole-network fit (``meta["network_fit"]``, see
:func:`hwprune.families.cnn.profile.network_fit`; identity for tables without one).
That sum is not additive over units, so :meth:`CnnPredictor.unit_costs` gives the
DP a first-order model around a reference candidate ``r`` (dense by default)::

    f(a, b) ~ f(a, r_b) + f(r_a, b) - f(r_a, r_b)

exact at ``r``, and exact for every layer with one free unit (stems, depthwise convs, the classifier).
Its error is ``(a - r_a)(b - r_b)`` times the conv's MAC slope: around dense it is *optimistic* (it
underestimates latency of candidates that prune both sides of a conv), so the search should verify DP
picks with :meth:`predict` and re-linearise around the pick (:meth:`linearized_at`, done by
``hwprune.search``); two or three
rounds converge.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from hwprune.errors import HwpruneError
from hwprune.latency.predictor import Predictor
from hwprune.latency.table import LatencyTable
from hwprune.space import Candidate, PruningSpace

__all__ = ["CnnPredictor", "layer_function"]


def layer_function(rows: pd.DataFrame, *, name: str, where: str) -> Any:
    """``f(ci: array, co: array) -> ms`` from one layer's rows (size = c_in, size2 = c_out)."""
    ci, co, ms = (rows[c].to_numpy(dtype=np.float64) for c in ("size", "size2", "median_ms"))
    xs, ys = np.unique(ci), np.unique(co)
    grid = {(a, b): m for a, b, m in zip(ci, co, ms)}
    lo, hi = (xs[0], ys[0]), (xs[-1], ys[-1])

    def check(a: np.ndarray, b: np.ndarray) -> None:
        if a.min() < lo[0] or a.max() > hi[0] or b.min() < lo[1] or b.max() > hi[1]:
            raise HwpruneError(
                f"layer {name}: widths outside the measured range c_in [{lo[0]:g}, {hi[0]:g}], c_out "
                f"[{lo[1]:g}, {hi[1]:g}] of {where}; re-profile with this space"
            )

    if len(xs) == 1 or len(ys) == 1 or np.array_equal(ci, co):  # one free width: 1-D interpolation
        axis = ci if len(xs) > 1 else co
        order = np.argsort(axis)

        def f1(a: np.ndarray, b: np.ndarray) -> np.ndarray:
            check(a, b)
            return np.interp(a if len(xs) > 1 else b, axis[order], ms[order])

        return f1
    if len(grid) == len(xs) * len(ys):  # complete grid: bilinear interpolation
        table = np.array([[grid[(a, b)] for b in ys] for a in xs])

        def f2(a: np.ndarray, b: np.ndarray) -> np.ndarray:
            check(a, b)
            i = np.clip(np.searchsorted(xs, a, side="right") - 1, 0, len(xs) - 2)
            j = np.clip(np.searchsorted(ys, b, side="right") - 1, 0, len(ys) - 2)
            ta, tb = (a - xs[i]) / (xs[i + 1] - xs[i]), (b - ys[j]) / (ys[j + 1] - ys[j])
            return (
                (1 - ta) * (1 - tb) * table[i, j]
                + ta * (1 - tb) * table[i + 1, j]
                + (1 - ta) * tb * table[i, j + 1]
                + ta * tb * table[i + 1, j + 1]
            )

        return f2
    # incomplete grid (a design collision): bilinear least squares, t = p0 + p1 a + p2 b + p3 a b
    design = np.stack([np.ones_like(ci), ci, co, ci * co], 1)
    p = np.linalg.lstsq(design, ms, rcond=None)[0]

    def f3(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        check(a, b)
        return p[0] + p[1] * a + p[2] * b + p[3] * a * b

    return f3


class CnnPredictor(Predictor):
    """Exact sum of per-layer lookups (:meth:`predict`); linearised unit costs for the DP (:meth:`unit_costs`)."""

    additive = False  # a conv's time depends on two groups; the search re-linearises its DP

    def __init__(
        self, table: LatencyTable, space: PruningSpace, adapter: Any = None, *, reference: Candidate | None = None
    ) -> None:
        """``adapter`` is accepted for symmetry with other families; the layer map lives in the table."""
        super().__init__(space)
        if table.family != "cnn" or "layers" not in table.meta:
            raise HwpruneError(f"{_where(table)} is not a CNN latency table; profile this model: hwprune profile")
        self.table = table
        base = table.rows("base")
        if base.empty:
            raise HwpruneError(f"{_where(table)} has no 'base' row; re-profile to rebuild it")
        self._base = float(base["median_ms"].sum())
        # the profile's own whole networks against their block sums (profile.network_fit); older tables
        # have none and predict the bare block sum
        fit = table.meta.get("network_fit") or {}
        self.fit_scale, self.fit_offset_ms = float(fit.get("scale", 1.0)), float(fit.get("offset_ms", 0.0))
        self._base = self.fit_scale * self._base + self.fit_offset_ms
        index = {u.name: i for i, u in enumerate(space.units)}
        # per layer: (in unit index or -1, out unit index or -1, matrix over (in sizes) x (out sizes))
        self._layers: list[tuple[int, int, np.ndarray]] = []
        for meta in table.meta["layers"]:
            rows = table.rows(meta["kind"], meta["name"])
            if rows.empty:
                raise HwpruneError(f"{_where(table)} has no rows for layer {meta['name']!r}; re-profile this model")
            f = layer_function(rows, name=meta["name"], where=_where(table))
            p, q = index.get(meta["in_group"], -1), index.get(meta["out_group"], -1)
            if meta["kind"] == "dw":
                q = p
            a = (
                np.array(space.units[p].sizes, dtype=np.float64) * meta["in_mult"]
                if p >= 0
                else np.array([meta["c_in"]], dtype=np.float64)
            )
            b = (
                np.array(space.units[q].sizes, dtype=np.float64)
                if q >= 0
                else np.array([meta["c_out"]], dtype=np.float64)
            )
            if meta["kind"] == "dw":
                m = np.diag(f(a, a)) if p >= 0 else f(a, a).reshape(1, 1)
            else:
                aa, bb = np.meshgrid(a, b, indexing="ij")
                m = f(aa.ravel(), bb.ravel()).reshape(len(a), len(b))
            self._layers.append((p, q, self.fit_scale * m))
        self._pos = [{s: j for j, s in enumerate(u.sizes)} for u in space.units]
        self.reference = reference if reference is not None else space.dense()
        self._costs = self._linearize(self.reference)

    def _ix(self, cand: Candidate) -> list[int]:
        try:
            return [pos[s] for pos, s in zip(self._pos, cand.sizes, strict=True)]
        except (KeyError, ValueError):
            self.space.validate(cand)  # raises the one-line error naming the unit
            raise

    def predict(self, cand: Candidate) -> float:
        ix = self._ix(cand)
        total = self._base
        for p, q, m in self._layers:
            total += float(m[ix[p] if p >= 0 else 0, ix[q] if q >= 0 else 0])
        return total

    def layer_ms(self, cand: Candidate) -> list[float]:
        """Predicted ms of each layer (table order), for reports."""
        ix = self._ix(cand)
        return [float(m[ix[p] if p >= 0 else 0, ix[q] if q >= 0 else 0]) for p, q, m in self._layers]

    def _linearize(self, ref: Candidate) -> tuple[float, list[np.ndarray]]:
        r = self._ix(ref)
        base = self._base
        costs = [np.zeros(len(u.sizes)) for u in self.space.units]
        for p, q, m in self._layers:
            if p < 0 and q < 0:
                base += float(m[0, 0])
            elif p == q:
                costs[p] += np.diag(m) if m.shape[0] > 1 else m[:, 0]
            elif p < 0:
                costs[q] += m[0, :]
            elif q < 0:
                costs[p] += m[:, 0]
            else:
                costs[q] += m[r[p], :]
                costs[p] += m[:, r[q]]
                base -= float(m[r[p], r[q]])
        return base, costs

    def unit_costs(self) -> tuple[float, list[np.ndarray]]:
        """Additive model around ``self.reference`` (equal to :meth:`predict` there; see module doc)."""
        return self._costs[0], [c.copy() for c in self._costs[1]]

    def linearized_at(self, reference: Candidate) -> "CnnPredictor":
        """The same predictor with unit costs linearised around ``reference`` (e.g. the last DP pick)."""
        self.space.validate(reference)
        out = object.__new__(CnnPredictor)
        out.__dict__.update(self.__dict__)
        out.reference, out._costs = reference, self._linearize(reference)
        return out


def _where(table: LatencyTable) -> str:
    return f"latency table {table.path}" if table.path else "the latency table"
