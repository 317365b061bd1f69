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

Decode tables (:func:`measure_decode_context`): the gap is larger there (a decode step streams every
weight once, so a block timed alone, its weights warm in cache, runs faster than the same block inside
the whole decoder: SmolLM2 measured ~25 % slower than its table's sum at every subnet and context). The
dense model's decode graph is timed one new token after each profiled context, exactly as export times
it (:func:`hwprune.export.workload_timing.step_runners`), in two sessions, interleaved; each context
gets its own record under ``meta["contexts"][str(c)]["context"]`` (what ``table.at_context(c)`` reads),
so the per-context predictors are scaled before they are interpolated.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hwprune.families._base import Family
    from hwprune.latency._base import Backend
    from hwprune.latency.table import LatencyTable
    from hwprune.space import PruningSpace

__all__ = ["measure_context", "measure_decode_context", "CONTEXT_METHOD", "DECODE_CONTEXT_METHOD"]

CONTEXT_METHOD = (
    "the whole dense ONNX model timed by hwprune.export.measure (two sessions, mirrored order, "
    "interleaved rounds, the export's feed) divided by the table's dense prediction"
)

DECODE_CONTEXT_METHOD = (
    "the whole dense decode graph (decoder.onnx) timed one new token after the context's KV cache as export "
    "times it (two sessions, interleaved shuffled rounds) divided by the table's dense prediction there"
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


def measure_decode_context(
    adapter: "Family",
    backend: "Backend",
    table: "LatencyTable",
    space: "PruningSpace",
    *,
    batch: int,
    rounds: int = 5,
    repeats: int = 10,
    warmup: int = 3,
) -> dict[str, dict[str, Any]]:
    """Per profiled context (``str(c)``), its ``context`` record for a decode table (see module doc)."""
    from hwprune.export.workload_timing import decode_graph, step_runners
    from hwprune.latency.backends import interleave

    contexts = table.contexts
    graph = decode_graph(adapter, adapter.dense())
    first = step_runners(backend, graph, contexts, batch)
    second = step_runners(backend, graph, contexts, batch)  # same graph: a control of the timing itself
    ts = interleave([*first, *second], rounds=rounds, per_round=repeats, warmup=warmup)
    out: dict[str, dict[str, Any]] = {}
    k = len(contexts)
    for i, c in enumerate(contexts):
        a, b = ts[i].median_ms, ts[k + i].median_ms
        measured = (a + b) / 2
        predicted = adapter.predictor(table.at_context(c), space).dense_ms()  # the bare block sum
        out[str(c)] = {
            "factor": measured / predicted,
            "dense_measured_ms": measured,
            "dense_predicted_ms": predicted,
            "dense_control_pct": 100.0 * (b / a - 1),
            "clock": backend.clock,
            "rounds": rounds,
            "repeats": repeats,
            "warmup": warmup,
            "method": DECODE_CONTEXT_METHOD,
        }
    return out
