"""The context factor: how the whole dense model times as export times it, against the table's sum.

A profile times each block in its own graph among dozens of others (cold caches, many sessions); an
export times a whole model among a few (:func:`hwprune.export.measure.measure_dense_and_pruned`). The
two contexts disagree by a few to ~20 % on a shared CPU, the same way for every candidate. So
``profile`` also builds the dense model's ONNX and times it with the export's own machinery (two
sessions in mirrored order, interleaved rounds, the same feed), and stores::

    meta["context"] = {"factor": measured / predicted, "dense_measured_ms", "dense_predicted_ms",
                       "dense_control_pct", "dense_measured_wall_ms", "clock", "rounds", "repeats",
                       "warmup", "method"}

The predictor multiplies its block sums by ``factor`` (:mod:`hwprune.latency.correction`), so a fresh
table predicts export-time milliseconds. A table without it (made before) predicts with factor 1.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hwprune.families._base import Family
    from hwprune.latency._base import Backend
    from hwprune.latency.table import LatencyTable
    from hwprune.space import PruningSpace

__all__ = ["measure_context", "CONTEXT_METHOD"]

CONTEXT_METHOD = (
    "the whole dense ONNX model timed by hwprune.export.measure (two sessions, mirrored order, "
    "interleaved rounds, the export's feed) divided by the table's dense prediction"
)


def measure_context(
    adapter: "Family",
    backend: "Backend",
    table: "LatencyTable",
    space: "PruningSpace",
    *,
    batch: int,
    seq: int,
    rounds: int = 5,
    repeats: int | None = None,
    warmup: int | None = None,
) -> dict[str, Any]:
    """Time the dense model as export does and return the ``meta["context"]`` record (see module doc)."""
    # export depends on latency, not the other way round at import time
    from hwprune.export.candidate import candidate_onnx, timing_feed
    from hwprune.export.measure import measure_dense_and_pruned

    predicted = adapter.predictor(table, space).dense_ms()  # the bare block sum, no factor yet
    cmp = measure_dense_and_pruned(
        backend,
        dense=candidate_onnx(adapter, adapter.dense(), batch=batch, seq=seq),
        pruned={},
        feed=timing_feed(adapter, batch=batch, seq=seq),
        rounds=rounds,
        repeats=repeats,
        warmup=warmup,
    )
    measured = cmp.dense.median_ms
    return {
        "factor": measured / predicted,
        "dense_measured_ms": measured,
        "dense_predicted_ms": predicted,
        "dense_control_pct": cmp.control_pct,
        "dense_measured_wall_ms": cmp.dense.wall_ms,
        "clock": backend.clock,
        "rounds": rounds,
        "repeats": cmp.settings["repeats"],  # None asked: chosen from the model's time (timing_plan)
        "warmup": cmp.settings["warmup"],
        "method": CONTEXT_METHOD,
    }
