"""Dense vs pruned latency, measured together so that the ratio is honest.

A speedup is a ratio of two timings; on a shared or thermally drifting machine, timing the dense
model first and the pruned one a minute later can make that ratio say anything. So the models are
timed in *rounds* with the same backend (same runtime, threads and feed): within a round every model
is timed ``repeats`` times, alternating between models, and a model's latency is the median over
rounds of its per-round median. Load from other tenants and drift land on every model alike, and a
single disturbed round cannot move the result.

Several candidates share one dense measurement per round: pass them all in ``pruned``.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from hwprune.errors import HwpruneError
from hwprune.latency._base import Backend

__all__ = ["Measured", "Comparison", "measure_dense_and_pruned", "DENSE"]

DENSE = "dense"


@dataclass(frozen=True)
class Measured:
    """Latency of one model in ms: ``median_ms`` over rounds of each round's median."""

    median_ms: float
    rounds_ms: tuple[float, ...]  # per-round medians, in round order

    @property
    def spread_pct(self) -> float:
        """(max - min) / median of the per-round medians, in percent: how steady the machine was."""
        return 100.0 * (max(self.rounds_ms) - min(self.rounds_ms)) / self.median_ms

    def to_json(self) -> dict[str, Any]:
        return {"median_ms": self.median_ms, "rounds_ms": list(self.rounds_ms), "spread_pct": self.spread_pct}


@dataclass(frozen=True)
class Comparison:
    """Dense and pruned latencies from the same process, backend and rounds."""

    dense: Measured
    pruned: Mapping[str, Measured]
    settings: Mapping[str, Any]  # runtime, threads, rounds, repeats, warmup

    def speedup(self, key: str) -> float:
        return self.dense.median_ms / self.pruned[key].median_ms


def measure_dense_and_pruned(
    backend: Backend,
    *,
    dense: bytes,
    pruned: Mapping[str, bytes],
    feed: Mapping[str, np.ndarray],
    rounds: int = 5,
    repeats: int = 20,
    warmup: int = 5,
) -> Comparison:
    """Time ``dense`` and every ONNX model in ``pruned`` (key -> serialized model), interleaved.

    Cost is about ``(1 + len(pruned)) * (warmup + rounds * repeats)`` runs (backends without
    ``prepare`` warm up every round). Memory: one session per model is held for the whole call.
    """
    if rounds < 1 or repeats < 1 or warmup < 0:
        raise HwpruneError(f"rounds and repeats must be >= 1, warmup >= 0 (got {rounds}, {repeats}, {warmup})")
    if DENSE in pruned:
        raise HwpruneError(f"candidate key {DENSE!r} is reserved for the dense model")
    models: dict[str, bytes] = {DENSE: dense, **pruned}
    keys = list(models)
    per_round: dict[str, list[float]] = {k: [] for k in keys}
    prepare = getattr(backend, "prepare", None)
    if callable(prepare):
        # ORT backends: one session per graph for all rounds; within a round the graphs alternate
        # call by call in a shuffled order (latency.backends.interleave), so a burst of load lands on all.
        from hwprune.latency.backends import interleave

        runners = [prepare(models[k], feed) for k in keys]
        for r in range(rounds):
            ts = interleave(runners, rounds=repeats, per_round=1, warmup=warmup if r == 0 else 0, seed=r)
            for k, t in zip(keys, ts):
                per_round[k].append(float(t.median_ms))
    else:  # any other backend: only the contract's time(); rotate who goes first each round
        for r in range(rounds):
            shift = r % len(keys)
            for k in keys[shift:] + keys[:shift]:
                per_round[k].append(float(backend.time(models[k], feed, warmup=warmup, repeats=repeats).median_ms))
    out = {k: Measured(median_ms=statistics.median(v), rounds_ms=tuple(v)) for k, v in per_round.items()}
    settings = {"runtime": backend.name, "runtime_version": backend.version(), "threads": backend.threads,
                "rounds": rounds, "repeats": repeats, "warmup": warmup}
    return Comparison(dense=out.pop(DENSE), pruned=out, settings=settings)
