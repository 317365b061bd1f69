"""A peer's accuracy-vs-measured-latency front, and what it offers at one of hwprune's measured latencies.

A pruning method that takes a ratio (Torch-Pruning's pruners) is not one model but a family of them:
comparing against one of its points, picked by a rule, can land on a degenerate one. So every peer is
swept over ratios, every point is measured (interleaved with hwprune's picks, in one process), and a
pick is compared with the peer's *best* point at or below the pick's measured time.

Which point is "best" is itself a selection, so it is made on the selection split (``select_key``) and
reported on the report split (``report_key``), as hwprune's own pick is. :func:`best_at_or_below` with
``select_key=report_key`` gives the oracle (chosen on the report split: an upper bound, in the peer's
favour). A point is a plain dict with at least ``name``, ``measured_ms`` and the two accuracy keys.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hwprune._io import atomic_path
from hwprune.search.pareto import pareto_mask

__all__ = ["front", "best_at_or_below", "plot_fronts"]

Point = Mapping[str, Any]


def front(points: Sequence[Point], *, acc_key: str) -> list[Point]:
    """The non-dominated points (no other point is as fast and as accurate, and better on one), fastest
    first. Accuracy is higher-better; ``pareto_mask`` minimises both, so it gets ``1 - accuracy``."""
    if not points:
        return []
    ms = np.array([p["measured_ms"] for p in points])
    err = np.array([1.0 - p[acc_key] for p in points])
    keep = pareto_mask(ms, err)
    return sorted((p for p, k in zip(points, keep) if k), key=lambda p: p["measured_ms"])


def best_at_or_below(
    points: Sequence[Point], ms: float, *, select_key: str, report_key: str, slack: float = 0.0
) -> dict[str, Any] | None:
    """The point with the highest ``select_key`` among those measured at most ``ms * (1 + slack)``
    (ties: the higher ``report_key``, then the faster), with ``latency_gap_pct`` (its time against
    ``ms``; negative: faster). None when the peer has no point that fast."""
    ok = [p for p in points if p["measured_ms"] <= ms * (1.0 + slack)]
    if not ok:
        return None
    p = max(ok, key=lambda p: (p[select_key], p[report_key], -p["measured_ms"]))
    return {**p, "latency_gap_pct": 100.0 * (p["measured_ms"] / ms - 1.0)}


def plot_fronts(
    path: str | Path,
    *,
    peers: Mapping[str, Sequence[Point]],
    picks: Sequence[Point],
    dense: Point,
    acc_key: str,
    title: str,
) -> Path:
    """PNG: every peer's points (faint) and its front on ``acc_key`` (steps), hwprune's picks (stars)
    and the dense model, accuracy against measured speedup over the dense model. Written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.0, 5.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    d_ms = float(dense["measured_ms"])
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:olive"]
    for (name, pts), c in zip(peers.items(), colors * 4):
        ax.scatter([d_ms / p["measured_ms"] for p in pts], [p[acc_key] for p in pts], s=8, color=c, alpha=0.25)
        f = front(pts, acc_key=acc_key)[::-1]  # slowest (lowest speedup) first for the step line
        ax.plot(
            [d_ms / p["measured_ms"] for p in f],
            [p[acc_key] for p in f],
            "-o",
            ms=3,
            color=c,
            drawstyle="steps-pre",  # between two front points, the faster one's accuracy is what is on offer
            label=f"{name} ({len(pts)} models; line: its front)",
        )
    ax.scatter(
        [d_ms / p["measured_ms"] for p in picks],
        [p[acc_key] for p in picks],
        marker="*",
        s=220,
        color="tab:red",
        edgecolor="black",
        zorder=5,
        label="hwprune picks",
    )
    for i, p in enumerate(picks):  # labels below the stars, staggered: picks often sit close together
        ax.annotate(
            p["name"],
            (d_ms / p["measured_ms"], p[acc_key]),
            xytext=(0, -14 - 10 * (i % 2)),
            textcoords="offset points",
            fontsize=8,
            ha="center",
        )
    ax.scatter([1.0], [dense[acc_key]], marker="*", s=160, color="black", zorder=5, label="dense")
    ax.set_xlabel("measured speedup over the dense model (same process, interleaved)")
    ax.set_ylabel(acc_key.replace("_", " "))
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=9, wrap=True)
    ax.legend(fontsize=8, loc="lower left")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    return Path(path)
