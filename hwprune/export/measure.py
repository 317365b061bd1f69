"""Dense vs pruned latency, measured together so that the ratio is honest.

A speedup is a ratio of two timings; on a shared or thermally drifting machine, timing the dense
model first and the pruned one a minute later can make that ratio say anything. So the models are
timed in *rounds* with the same backend (same runtime, threads and feed): within a round every session
is timed ``repeats`` times, call by call in a shuffled order, and a model's latency is the median over
rounds of its per-round figure. Load from other tenants and drift land on every model alike, and a
single disturbed round cannot move the result.

Session order. A session's speed depends a little on when it was created (the same graph has timed
1-8 % apart in sessions made at different moments of one process). So every model gets two sessions,
created in mirrored order -- dense, c1, ..., cN, then cN', ..., c1', dense' -- and its per-round figure
is the mean of its two sessions' per-round medians: an effect that grows or shrinks with creation
order cancels. The dense model's second session against its first, timed in the same rounds, is the
**control** (``Comparison.control_pct``): the same graph, so anything it shows is the measurement's
own noise. Above :data:`CONTROL_TOL_PCT` the comparison carries a warning.

Clock. One-thread CPU runs are timed by thread CPU time (``Backend.clock``), a lower bound that leaves
out preemption and throttling; the wall-clock figure is kept beside it (``Measured.wall_ms``), and a
model whose process used more CPU than its timing thread (``cpu_excess_pct`` above
:data:`CPU_EXCESS_TOL_PCT`: ONNX Runtime was not on one thread after all) is flagged.

Context. How fast a session runs also depends on how many others are timed beside it: their weights
compete for the same caches. mnasnet1_0's dense model measured 4.6-4.9 ms among 2 sessions (itself),
4.8-5.3 ms among 4 (with one candidate) and 4.9-5.7 ms among 8 (with three), in one process on a 2-core
Xeon. So a model's milliseconds are only comparable between runs that interleave the same number of
models. :func:`measure_pairs` times each candidate in its own rounds with the dense model (four
sessions, however many candidates there are); ``export``, ``calibrate --remeasure`` and the profile's
context anchors all use it, so a table predicts the milliseconds an export measures. Passing several
candidates to :func:`measure_dense_and_pruned` shares one dense measurement (cheaper, for benchmarks
that compare ratios).

Process. :func:`measure_pairs` times, by default, in a new process that runs ONNX Runtime only
(:mod:`hwprune.latency.worker`), as a deployed model runs; export, ``calibrate --remeasure`` and the
profile's anchors all use it, so a table's anchors and an export's candidates are measured in the same
kind of process whatever else the calling one holds (eight torchvision CNNs, one run on an AMD EPYC: the
dense model's raw error at export within +-1.8 %; earlier runs on a Xeon, before: -8.1 … +5.4 %; another
host, so not a controlled comparison; docs/benchmarks.md).

Host state. A table predicts the milliseconds of the machine as it was when profiled. A shared host
has minutes when everything runs slower (another tenant's memory traffic): mobilenet_v2's dense model
measured 7.3-7.7 ms in most pairs of one benchmark and 8.7-8.8 ms in two consecutive ones, which made
those subnets' raw errors -19 %. When the caller knows what the dense model should measure
(``dense_expected_ms``: export passes its table's prediction), a pair whose dense model lands more than
:data:`HOST_TOL_PCT` from it is timed again after a pause (``host_pauses_s``: 5, 10 and 20 s), and the
first attempt within tolerance is kept (else the one whose dense model came closest). The decision looks
at the dense model only, never at the candidate's own error, and every attempt is recorded
(``settings["host_check"]``, the manifest's ``timings.host_check``).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import numpy as np

from hwprune.errors import HwpruneError
from hwprune.latency._base import Backend

__all__ = [
    "Measured",
    "Comparison",
    "Measurement",
    "measure_dense_and_pruned",
    "measure_pairs",
    "DENSE",
    "CONTROL_TOL_PCT",
    "CPU_EXCESS_TOL_PCT",
    "HOST_TOL_PCT",
    "HOST_PAUSES_S",
    "host_pauses",
    "host_checked",
    "host_retry",
    "host_check_json",
    "host_check_note",
]

DENSE = "dense"
T = TypeVar("T")
#: the precision a measured speedup claims: a dense-vs-dense control beyond it is reported as a warning
CONTROL_TOL_PCT = 1.5
#: process CPU above the timing thread's by more than this (in %) means other threads did part of the work
CPU_EXCESS_TOL_PCT = 10.0
#: the dense model this far (in %) from its expected time: the host is not as the table describes it, so the
#: pair is timed again (the same tolerance as the manifest's drift warning)
HOST_TOL_PCT = 5.0
#: pauses before each re-timing of a pair whose dense model missed its expected time (one retry per pause)
HOST_PAUSES_S: tuple[float, ...] = (5.0, 10.0, 20.0)


def host_pauses(retries: int) -> tuple[float, ...]:
    """The pauses before ``retries`` re-timings: :data:`HOST_PAUSES_S`, then its last pause repeated."""
    return tuple(HOST_PAUSES_S[min(i, len(HOST_PAUSES_S) - 1)] for i in range(max(0, retries)))


@dataclass(frozen=True)
class Measured:
    """Latency of one model in ms: ``median_ms`` over rounds of each round's figure (the mean of its
    sessions' medians in that round), on the backend's clock."""

    median_ms: float
    rounds_ms: tuple[float, ...]  # per-round figures, in round order
    sessions_ms: tuple[float, ...] = ()  # per session, in creation order: median over rounds of its medians
    wall_ms: float | None = None  # ``median_ms`` on the wall clock (None: the backend does not log it)
    cpu_excess_pct: float | None = None  # process CPU over thread CPU in the timed calls, % of thread CPU

    @property
    def spread_pct(self) -> float:
        """(max - min) / median of the per-round figures, in percent: how steady the machine was."""
        return 100.0 * (max(self.rounds_ms) - min(self.rounds_ms)) / self.median_ms

    def to_json(self) -> dict[str, Any]:
        return {
            "median_ms": self.median_ms,
            "rounds_ms": list(self.rounds_ms),
            "spread_pct": self.spread_pct,
            "sessions_ms": list(self.sessions_ms),
            "wall_ms": self.wall_ms,
            "cpu_excess_pct": self.cpu_excess_pct,
        }


def control_warning(c: float) -> str:
    return (
        f"dense-vs-dense control {c:+.1f}% exceeds the +-{CONTROL_TOL_PCT:g}% precision claimed: the same "
        "graph timed that far apart in two sessions; treat speedups as +-that much (a busy machine? re-run)"
    )


@dataclass(frozen=True)
class Comparison:
    """Dense and pruned latencies from the same process, backend and rounds."""

    dense: Measured
    pruned: Mapping[str, Measured]
    settings: Mapping[str, Any]  # runtime, threads, clock, rounds, repeats, warmup, session order

    def speedup(self, key: str) -> float:
        return self.dense.median_ms / self.pruned[key].median_ms

    @property
    def control_pct(self) -> float | None:
        """The dense model's second session against its first, in % (same graph, same rounds): the noise
        floor of every ratio in this comparison. None with fewer than two dense sessions."""
        s = self.dense.sessions_ms
        return 100.0 * (s[-1] / s[0] - 1) if len(s) >= 2 else None

    def warnings(self, keys: Sequence[str] = ()) -> list[str]:
        """One line per problem with this comparison (for the models in ``keys`` and the dense one)."""
        out = []
        c = self.control_pct
        if c is not None and abs(c) > CONTROL_TOL_PCT:
            out.append(control_warning(c))
        if self.settings.get("clock") == "thread-cpu":
            for k, m in [(DENSE, self.dense), *((k, self.pruned[k]) for k in keys)]:
                if m.cpu_excess_pct is not None and m.cpu_excess_pct > CPU_EXCESS_TOL_PCT:
                    out.append(
                        f"{k}: the process used {m.cpu_excess_pct:.0f}% more CPU than the timing thread "
                        "(ONNX Runtime not on one thread); its thread-CPU time leaves that work out"
                    )
        return out


@dataclass(frozen=True)
class Measurement:
    """What a manifest states about one candidate's measured latency: its time and the dense model's,
    from the same process and rounds, the clock, and (optionally) the per-round evidence."""

    measured_ms: float
    dense_ms: float
    clock: str = "wall"  # "thread-cpu" or "wall" (``Backend.clock``)
    timing: Comparison | None = None  # the interleaved run both came from
    key: str | None = None  # the candidate's key in ``timing.pruned``
    control_pct: float | None = None  # dense-vs-dense control of a timing made elsewhere (decode steps)

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

    @property
    def _models(self) -> tuple[Measured, Measured] | None:
        if self.timing is None or self.key is None:
            return None
        return self.timing.dense, self.timing.pruned[self.key]

    def evidence_json(self) -> dict[str, Any]:
        """The manifest's control, wall-clock and CPU-check fields (None where the timing is not ours)."""
        both = self._models
        if both is None or self.timing is None or self.key is None:
            c = self.control_pct
            return dict.fromkeys(("measured_wall_ms", "dense_measured_wall_ms", "cpu_excess_pct"), None) | {
                "dense_control_pct": c,
                "warnings": [control_warning(c)] if c is not None and abs(c) > CONTROL_TOL_PCT else [],
            }
        dense, pruned = both
        excess = [x for x in (dense.cpu_excess_pct, pruned.cpu_excess_pct) if x is not None]
        return {
            "dense_control_pct": self.timing.control_pct,
            "measured_wall_ms": pruned.wall_ms,
            "dense_measured_wall_ms": dense.wall_ms,
            "cpu_excess_pct": max(excess) if excess else None,
            "warnings": self.timing.warnings([self.key]),
        }

    def timings_json(self) -> dict[str, Any]:
        if self.timing is None or self.key is None:
            return {"source": "supplied"}
        keys = ("rounds", "repeats", "warmup", "session_order", "process", "host_check")
        return {
            "dense": self.timing.dense.to_json(),
            "pruned": self.timing.pruned[self.key].to_json(),
            "source": "interleaved",
            **{k: self.timing.settings[k] for k in keys if k in self.timing.settings},
        }


def timing_plan(expected_ms: float, *, round_ms: float = 2000.0) -> tuple[int, int]:
    """(repeats, warmup) for a model of about ``expected_ms`` per call: enough calls for ``round_ms`` per
    model per round, between 5 and 20, and about half that in warm-up calls, between 2 and 5."""
    per_call = max(float(expected_ms), 1e-3)
    repeats = int(min(20, max(5, round(round_ms / per_call))))
    warmup = int(min(5, max(2, round(0.5 * round_ms / per_call))))
    return repeats, warmup


def _median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def _repeats_warmup(
    backend: Backend, dense: bytes, feed: Mapping[str, np.ndarray], repeats: int | None, warmup: int | None
) -> tuple[int, int]:
    """``repeats`` / ``warmup`` as given, or where None from one timed call of the dense model."""
    if repeats is None or warmup is None:
        auto_repeats, auto_warmup = timing_plan(backend.time(dense, feed, warmup=1, repeats=1).median_ms)
        repeats = auto_repeats if repeats is None else repeats
        warmup = auto_warmup if warmup is None else warmup
    return repeats, warmup


def measure_dense_and_pruned(
    backend: Backend,
    *,
    dense: bytes,
    pruned: Mapping[str, bytes],
    feed: Mapping[str, np.ndarray],
    rounds: int = 5,
    repeats: int | None = None,
    warmup: int | None = None,
) -> Comparison:
    """Time ``dense`` and every ONNX model in ``pruned`` (key -> serialized model), interleaved, two
    sessions per model in mirrored creation order (see the module doc).

    Cost is about ``2 * (1 + len(pruned)) * (warmup + rounds * repeats)`` runs. ``repeats`` / ``warmup``
    None: chosen from one timed call of the dense model (:func:`timing_plan`: 20 / 5 for models under
    100 ms, down to 5 / 2 for second-long LLM prompts, whose per-call noise is relatively small).
    Memory: two sessions per model are held for the whole call.
    """
    repeats, warmup = _repeats_warmup(backend, dense, feed, repeats, warmup)
    if rounds < 1 or repeats < 1 or warmup < 0:
        raise HwpruneError(f"rounds and repeats must be >= 1, warmup >= 0 (got {rounds}, {repeats}, {warmup})")
    if DENSE in pruned:
        raise HwpruneError(f"candidate key {DENSE!r} is reserved for the dense model")
    models: dict[str, bytes] = {DENSE: dense, **pruned}
    keys = list(models)
    slots = keys + keys[::-1]  # session creation order: dense, c1..cN, cN..c1, dense
    # per slot: per-round medians on the backend's clock and on the wall clock
    prim: list[list[float]] = [[] for _ in slots]
    wall: list[list[float]] = [[] for _ in slots]
    runners = [backend.prepare(models[k], feed) for k in slots]
    excess: dict[str, float | None] = dict.fromkeys(keys)
    if all(r is not None for r in runners):
        # ORT backends: one session per slot for all rounds; within a round the sessions alternate
        # call by call in a shuffled order (latency.backends.interleave), so a burst of load lands on all.
        from hwprune.latency.backends import interleave

        for r in runners:
            r.sample(warmup)
            r.log.reset()
        for rnd in range(rounds):
            starts = [len(r.log.wall_ms) for r in runners]
            ts = interleave(runners, rounds=repeats, per_round=1, warmup=0, seed=rnd)
            for j, (t, r, s0) in enumerate(zip(ts, runners, starts)):
                prim[j].append(float(t.median_ms))
                wall[j].append(_median(r.log.wall_ms[s0:]))
        for k in keys:
            mine = [r for r, sk in zip(runners, slots) if sk == k]
            thread_ns = sum(r.log.thread_ns for r in mine)
            excess[k] = 100.0 * (sum(r.log.process_ns for r in mine) / thread_ns - 1) if thread_ns > 0 else None
    else:  # any other backend: only the contract's time(), a session per call; mirrored order each round
        for _ in range(rounds):
            for j in range(len(slots)):
                t = backend.time(models[slots[j]], feed, warmup=warmup, repeats=repeats)
                prim[j].append(float(t.median_ms))
    out = {}
    for k in keys:
        js = [j for j, sk in enumerate(slots) if sk == k]  # its two slots, first-created first
        per_round = [statistics.fmean(prim[j][i] for j in js) for i in range(rounds)]
        walls = [statistics.fmean(wall[j][i] for j in js) for i in range(rounds)] if wall[js[0]] else None
        out[k] = Measured(
            median_ms=_median(per_round),
            rounds_ms=tuple(per_round),
            sessions_ms=tuple(_median(prim[j]) for j in js),
            wall_ms=_median(walls) if walls else None,
            cpu_excess_pct=excess[k],
        )
    settings = {
        "runtime": backend.name,
        "runtime_version": backend.version(),
        "threads": backend.threads,
        "clock": backend.clock,
        "rounds": rounds,
        "repeats": repeats,
        "warmup": warmup,
        "session_order": "mirrored",
    }
    return Comparison(dense=out.pop(DENSE), pruned=out, settings=settings)


def measure_pairs(
    backend: Backend,
    *,
    dense: bytes,
    pruned: Mapping[str, bytes],
    feed: Mapping[str, np.ndarray],
    rounds: int = 5,
    repeats: int | None = None,
    warmup: int | None = None,
    fresh_process: bool = True,
    dense_expected_ms: float | None = None,
    host_pauses_s: Sequence[float] = HOST_PAUSES_S,
) -> dict[str, Comparison]:
    """Each model of ``pruned`` timed with the dense model in its own interleaved rounds (two sessions
    each, mirrored order: four sessions), so every candidate's milliseconds come from the same context
    however many candidates there are (see the module doc). One :class:`Comparison` per key, each with
    the dense measurement of its own rounds. ``repeats`` / ``warmup`` None: chosen once, from the dense
    model's time (:func:`timing_plan`), for all pairs.

    ``fresh_process`` (default): time in a new process that runs ONNX Runtime and nothing else
    (:mod:`hwprune.latency.worker`), as a deployed model runs; the profile's anchors, export and
    ``calibrate --remeasure`` all do, so each of them measures in the same kind of process whatever the
    calling process holds (a torch model, the profile's ~1000 graphs). A backend the worker cannot rebuild
    by name is timed here. ``settings["process"]`` says which.

    ``dense_expected_ms`` (the table's prediction of the dense model): a pair whose dense model measures more
    than :data:`HOST_TOL_PCT` from it is timed again after each pause of ``host_pauses_s`` until one attempt
    is within (see the module doc's "Host state"); ``settings["host_check"]`` lists every attempt."""
    from hwprune.latency.worker import graph_files, in_worker, rebuildable

    if DENSE in pruned:
        raise HwpruneError(f"candidate key {DENSE!r} is reserved for the dense model")
    if dense_expected_ms is not None and not dense_expected_ms > 0:
        raise HwpruneError(f"dense_expected_ms must be > 0 (got {dense_expected_ms})")
    guard = (dense_expected_ms, tuple(float(p) for p in host_pauses_s))
    if fresh_process and rebuildable(backend):
        with graph_files([(DENSE, dense), *pruned.items()]) as files:
            job = (backend.name, backend.threads, files, dict(feed), rounds, repeats, warmup, guard)
            return in_worker(_pairs_from_files, *job)
    return _pairs(backend, dense, pruned.items(), feed, rounds, repeats, warmup, guard=guard, process="caller")


def _pairs(
    backend: Backend,
    dense: bytes,
    pruned: Iterable[tuple[str, bytes]],
    feed: Mapping[str, np.ndarray],
    rounds: int,
    repeats: int | None,
    warmup: int | None,
    *,
    guard: tuple[float | None, tuple[float, ...]] = (None, ()),
    process: str,
) -> dict[str, Comparison]:
    repeats, warmup = _repeats_warmup(backend, dense, feed, repeats, warmup)
    out = {}
    for k, data in pruned:

        def once(k: str = k, data: bytes = data) -> Comparison:
            return measure_dense_and_pruned(
                backend, dense=dense, pruned={k: data}, feed=feed, rounds=rounds, repeats=repeats, warmup=warmup
            )

        cmp = host_checked(once, k, *guard)
        out[k] = replace(cmp, settings={**cmp.settings, "process": process})
    return out


def host_retry(
    measure: Callable[[], T],
    dense_ms: Callable[[T], float],
    dense_expected_ms: float,
    pauses_s: Sequence[float],
    *,
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[T, list[T], int, bool]:
    """``measure()``, again after each pause of ``pauses_s`` while its dense model (``dense_ms`` of the
    result) lands more than :data:`HOST_TOL_PCT` from ``dense_expected_ms``: (the result used, every
    attempt, the index used, whether it is within). The first attempt within is used, else the one whose
    dense model came closest; only the dense model decides."""

    def off(r: T) -> float:
        return abs(dense_ms(r) / dense_expected_ms - 1) * 100.0

    attempts = [measure()]
    for pause in pauses_s:
        if off(attempts[-1]) <= HOST_TOL_PCT:
            break
        sleep(pause)
        attempts.append(measure())
    within = [i for i, r in enumerate(attempts) if off(r) <= HOST_TOL_PCT]
    used = within[0] if within else min(range(len(attempts)), key=lambda i: off(attempts[i]))
    return attempts[used], attempts, used, bool(within)


def host_check_json(
    dense_expected_ms: float, attempts: Sequence[tuple[float, float]], used: int, within: bool
) -> dict[str, Any]:
    """The record of a host check: ``attempts`` as (dense ms, candidate ms) pairs."""
    return {
        "dense_expected_ms": dense_expected_ms,
        "tol_pct": HOST_TOL_PCT,
        "within": within,
        "used": used,
        "attempts": [
            {"dense_ms": d, "dense_off_pct": 100.0 * (d / dense_expected_ms - 1), "measured_ms": m} for d, m in attempts
        ],
    }


def host_check_note(key: str, check: Mapping[str, Any] | None) -> str | None:
    """One line for the user when a host check timed a candidate more than once (None otherwise)."""
    if not check or len(check["attempts"]) < 2:
        return None
    offs = ", ".join(f"{a['dense_off_pct']:+.1f} %" for a in check["attempts"])
    n, used = len(check["attempts"]), check["used"] + 1
    how = "within" if check["within"] else "none within; the closest"
    return (
        f"{key}: timed {n} times because the dense model beside it measured {offs} from its table "
        f"(tolerance +-{check['tol_pct']:g} %; the host busier than when profiled); {how}: attempt {used} is used"
    )


def host_checked(
    measure: Callable[[], Comparison],
    key: str,
    dense_expected_ms: float | None,
    pauses_s: Sequence[float],
    *,
    sleep: Callable[[float], None] = time.sleep,
) -> Comparison:
    """One pair (candidate ``key``) under :func:`host_retry`; ``settings["host_check"]`` records every
    attempt (nothing is added when ``dense_expected_ms`` is None)."""
    if dense_expected_ms is None:
        return measure()
    best, attempts, used, within = host_retry(
        measure, lambda c: c.dense.median_ms, dense_expected_ms, pauses_s, sleep=sleep
    )
    pairs = [(c.dense.median_ms, c.pruned[key].median_ms) for c in attempts]
    check = host_check_json(dense_expected_ms, pairs, used, within)
    return replace(best, settings={**best.settings, "host_check": check})


def _pairs_from_files(
    runtime: str,
    threads: int,
    files: Mapping[str, str],
    feed: Mapping[str, np.ndarray],
    rounds: int,
    repeats: int | None,
    warmup: int | None,
    guard: tuple[float | None, tuple[float, ...]] = (None, ()),
) -> dict[str, Comparison]:
    """:func:`measure_pairs` in a worker (module level, so a spawned process can run it): the graphs are
    read from ``files`` (key -> path, the dense model under :data:`DENSE`), one candidate at a time."""
    from pathlib import Path

    from hwprune.latency._base import get_backend

    backend = get_backend(runtime, threads=threads)
    dense = Path(files[DENSE]).read_bytes()
    pruned = ((k, Path(f).read_bytes()) for k, f in files.items() if k != DENSE)
    return _pairs(backend, dense, pruned, feed, rounds, repeats, warmup, guard=guard, process="ort-only worker")
