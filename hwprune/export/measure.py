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
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from hwprune.errors import HwpruneError
from hwprune.latency._base import Backend

__all__ = ["Measured", "Comparison", "Measurement", "measure_dense_and_pruned", "DENSE"]

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


@dataclass(frozen=True)
class Measurement:
    """What a manifest states about one candidate's measured latency: its time and the dense model's,
    from the same process and rounds, the clock, and (optionally) the per-round evidence."""

    measured_ms: float
    dense_ms: float
    clock: str = "wall"  # "thread-cpu" or "wall" (``Backend.clock``)
    timing: Comparison | None = None  # the interleaved run both came from
    key: str | None = None  # the candidate's key in ``timing.pruned``

    def __post_init__(self) -> None:
        if not (self.measured_ms > 0 and self.dense_ms > 0):
            raise HwpruneError(f"measured latencies must be > 0 ms (got {self.measured_ms}, {self.dense_ms})")

    @classmethod
    def of(cls, cmp: Comparison, key: str, *, clock: str = "wall") -> "Measurement":
        return cls(
            measured_ms=cmp.pruned[key].median_ms, dense_ms=cmp.dense.median_ms, clock=clock, timing=cmp, key=key
        )

    @property
    def speedup(self) -> float:
        return self.dense_ms / self.measured_ms

    def timings_json(self) -> dict[str, Any]:
        if self.timing is None or self.key is None:
            return {"source": "supplied"}
        return {
            "dense": self.timing.dense.to_json(),
            "pruned": self.timing.pruned[self.key].to_json(),
            "source": "interleaved",
            **{k: self.timing.settings[k] for k in ("rounds", "repeats", "warmup")},
        }


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
    runners = [backend.prepare(models[k], feed) for k in keys]
    if all(r is not None for r in runners):
        # ORT backends: one session per graph for all rounds; within a round the graphs alternate
        # call by call in a shuffled order (latency.backends.interleave), so a burst of load lands on all.
        from hwprune.latency.backends import interleave

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
    settings = {
        "runtime": backend.name,
        "runtime_version": backend.version(),
        "threads": backend.threads,
        "rounds": rounds,
        "repeats": repeats,
        "warmup": warmup,
    }
    return Comparison(dense=out.pop(DENSE), pruned=out, settings=settings)
