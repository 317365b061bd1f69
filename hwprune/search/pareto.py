"""Evaluations and their Pareto front on (predicted latency, end-to-end distance), both minimised.

``pareto.csv`` has one row per distinct candidate (sorted by predicted latency) with the columns
``key, predicted_ms, predicted_speedup, distance, cosine, <other scores>, params, source, pareto,
sizes`` where ``sizes`` is a JSON object unit name -> kept size. ``pareto.png`` plots all
evaluations faintly, the front highlighted, the dense model, each target's budget and the picks.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hwprune._io import atomic_path
from hwprune.space import Candidate, PruningSpace

__all__ = ["Evaluation", "ParetoSet", "SOURCES", "pareto_mask"]

SOURCES = ("dp", "nsga", "uniform", "dense", "uniform-fill")
_BUDGET_COLORS = ("tab:green", "tab:orange", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")  # red marks picks
_FIXED = ("key", "predicted_ms", "predicted_speedup", "distance", "cosine")


@dataclass(frozen=True)
class Evaluation:
    """One scored candidate. ``scores`` holds at least ``distance`` (lower is better)."""

    candidate: Candidate
    predicted_ms: float
    scores: Mapping[str, float]
    params: int = 0
    source: str = "nsga"

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES} (got {self.source!r})")
        if "distance" not in self.scores:
            raise ValueError(f"scores must hold 'distance' (got keys {sorted(self.scores)})")

    @property
    def key(self) -> str:
        return self.candidate.key()

    @property
    def distance(self) -> float:
        d = float(self.scores["distance"])
        return d if math.isfinite(d) else math.inf  # a NaN distance ranks last, never on the front

    def to_json(self, space: PruningSpace, *, dense_ms: float) -> dict[str, Any]:
        return {
            "key": self.key,
            "sizes": self.candidate.as_dict(space),
            "predicted_ms": self.predicted_ms,
            "predicted_speedup": dense_ms / self.predicted_ms,
            "scores": dict(self.scores),
            "params": self.params,
            "source": self.source,
        }


def pareto_mask(ms: np.ndarray, dist: np.ndarray) -> np.ndarray:
    """True where no other point is <= on both objectives and < on one. O(n log n).

    Exact duplicates do not dominate each other, so both stay on the front.
    """
    ms, dist = np.asarray(ms, dtype=np.float64), np.asarray(dist, dtype=np.float64)
    dist = np.where(np.isfinite(dist), dist, np.inf)
    order = np.lexsort((dist, ms))
    mask = np.zeros(len(ms), dtype=bool)
    best_before = np.inf  # lowest distance among points with strictly smaller latency
    i = 0
    while i < len(order):
        j = i
        while j < len(order) and ms[order[j]] == ms[order[i]]:
            j += 1
        group = order[i:j]
        group_min = dist[group[0]]  # sorted by distance within equal latency
        for g in group:
            mask[g] = math.isfinite(dist[g]) and dist[g] < best_before and dist[g] == group_min
        best_before = min(best_before, group_min)
        i = j
    return mask


@dataclass(frozen=True)
class ParetoSet:
    """All distinct evaluations (first one per candidate key wins) and the non-dominated ones."""

    evaluations: tuple[Evaluation, ...]
    space: PruningSpace
    dense_ms: float
    front: tuple[Evaluation, ...] = field(init=False)

    def __post_init__(self) -> None:
        seen: dict[str, Evaluation] = {}
        for ev in self.evaluations:
            seen.setdefault(ev.key, ev)
        evs = tuple(seen.values())
        mask = pareto_mask(np.array([e.predicted_ms for e in evs]), np.array([e.distance for e in evs]))
        front = sorted((e for e, m in zip(evs, mask) if m), key=lambda e: (e.predicted_ms, e.distance))
        object.__setattr__(self, "evaluations", evs)
        object.__setattr__(self, "front", tuple(front))

    @classmethod
    def of(cls, evaluations: Iterable[Evaluation], *, space: PruningSpace, dense_ms: float) -> "ParetoSet":
        return cls(evaluations=tuple(evaluations), space=space, dense_ms=dense_ms)

    def on_front(self, key: str) -> bool:
        return any(e.key == key for e in self.front)

    def to_frame(self) -> pd.DataFrame:
        front = {e.key for e in self.front}
        extra = sorted({k for e in self.evaluations for k in e.scores} - set(_FIXED))
        rows = []
        for e in self.evaluations:
            row: dict[str, Any] = {
                "key": e.key,
                "predicted_ms": e.predicted_ms,
                "predicted_speedup": self.dense_ms / e.predicted_ms,
                "distance": float(e.scores["distance"]),
                "cosine": float(e.scores.get("cosine", math.nan)),
            }
            row.update({k: float(e.scores.get(k, math.nan)) for k in extra})
            row.update(
                params=e.params,
                source=e.source,
                pareto=e.key in front,
                sizes=json.dumps(e.candidate.as_dict(self.space)),
            )
            rows.append(row)
        cols = [*_FIXED, *extra, "params", "source", "pareto", "sizes"]
        df = pd.DataFrame(rows, columns=cols)
        return df.sort_values(["predicted_ms", "distance", "key"], kind="stable").reset_index(drop=True)

    def write_csv(self, path: str | Path) -> Path:
        with atomic_path(path) as tmp:
            self.to_frame().to_csv(tmp, index=False)
        return Path(path)

    def plot(
        self,
        path: str | Path,
        *,
        budgets: Mapping[float, float] | None = None,
        picks: Mapping[float, Evaluation] | None = None,
    ) -> Path:
        """Write the latency-vs-distance figure (PNG) atomically; ``budgets``: target -> budget ms."""
        # Figure + Agg canvas directly: no pyplot global state, no GUI backend, safe in threads.
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(7.5, 4.8), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        evs = self.evaluations
        ax.scatter(
            [e.predicted_ms for e in evs],
            [e.distance for e in evs],
            s=12,
            color="0.55",
            alpha=0.3,
            label=f"evaluated ({len(evs)})",
        )
        uni = [e for e in evs if e.source == "uniform"]
        if uni:
            ax.scatter(
                [e.predicted_ms for e in uni],
                [e.distance for e in uni],
                marker="x",
                s=40,
                color="tab:purple",
                label="uniform baseline",
            )
        ax.plot(
            [e.predicted_ms for e in self.front],
            [e.distance for e in self.front],
            "-o",
            ms=4,
            color="tab:blue",
            drawstyle="steps-post",
            label=f"Pareto front ({len(self.front)})",
        )
        dense = [e for e in evs if e.source == "dense"]
        ax.scatter(
            [self.dense_ms],
            [dense[0].distance if dense else 0.0],
            marker="*",
            s=160,
            color="black",
            zorder=5,
            label=f"dense ({self.dense_ms:.3g} ms)",
        )
        for i, (t, b) in enumerate(sorted((budgets or {}).items())):
            ax.axvline(
                b, ls="--", lw=1, color=_BUDGET_COLORS[i % len(_BUDGET_COLORS)], label=f"{t:g}x budget ({b:.3g} ms)"
            )
        for t, e in sorted((picks or {}).items()):
            ax.scatter([e.predicted_ms], [e.distance], s=70, facecolors="none", edgecolors="tab:red", zorder=6)
            ax.annotate(
                f"{t:g}x pick {e.key}\n{self.dense_ms / e.predicted_ms:.2f}x, d={e.distance:.3g}",
                (e.predicted_ms, e.distance),
                textcoords="offset points",
                xytext=(6, 8),
                fontsize=7,
            )
        ax.set_xlabel("predicted latency (ms)")
        ax.set_ylabel("end-to-end distance to dense (lower is better)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper right")
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
        return Path(path)
