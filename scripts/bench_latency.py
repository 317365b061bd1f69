"""Benchmark the latency predictor: predicted vs measured ms of physically pruned, exported subnets.

    python scripts/bench_latency.py --model minilm --subnets 30 -o bench_out/latency_minilm.json
    python scripts/bench_latency.py --model resnet50 --subnets 30 -o bench_out/latency_resnet50.json
    python scripts/bench_latency.py --model mypkg.nets:build --weights w.safetensors --input-shape 1,3,224,224
    python scripts/bench_latency.py --model minilm --table latency_tables/minilm_ort-cpu_t1_b1_s128.parquet

Works for every model hwprune profiles (any ``--model`` form: a named model, a local Hugging Face
folder, ``package.module:factory``); everything model-specific goes through the family's hooks. Subnets
are random (plus a few extremes: dense, smallest, uniform half, and where a unit kind may be removed
entirely, e.g. an encoder's attention or FFN, that kind removed with the rest whole); each is pruned
with random kept indices, exported as ``hwprune export`` does and timed with the table's backend
settings, interleaved and repeated (``interleave(common_mode=True)``, medians).

Without ``--table`` the model is profiled *in the same rounds* as the subnets: the family's profile
graphs are loaded untimed (``Family.prepare_profiling``; ``--levels`` is passed through to families
that sample a grid) and every round times them and the subnets alike, so the other tenants' load
cannot make the prediction and the measurement disagree; this tests the method. With ``--table`` that
table is tested against this machine now, each chunk in a fresh process (``--same-process``: all in this
one), as each ``hwprune export`` is one, and by default each subnet is measured exactly as export measures
a candidate (beside the dense model, four sessions in mirrored order, in a new process that runs ONNX
Runtime only; ``--timing-process chunk``: interleaved for ``--seconds`` in the chunk's own process).
The raw errors (``mape_pct``, ``error_pct``) are the headline;
``dense_error_pct`` is the dense model's own raw error and the ``speedup_error`` figures are the errors
of the predicted speedups (each prediction rescaled by the dense model measured in its chunk; reports
before issue 10 called them ``dense_adjusted``).

Session control: a subnet whose sizes equal one of the fixed graphs' (the profile's whole networks,
``Profiling.networks()``; in ``--table`` mode the dense reference) is the same graph in a session created
later, timed in the same rounds; ``session_effect_pct`` reports how much the session alone moved it.
Every chunk also times a second session of the dense model, created after the chunk's subnets (the
first is created before them): ``dense_control_pct`` per chunk, the dense-vs-dense control, flagged in
``warnings`` beyond the 1.5 % precision the benchmark claims.

Clock: each subnet's ``measured_wall_ms`` (median wall time) stands beside its ``measured_ms`` (thread
CPU time for one-thread CPU runs, a lower bound), and ``cpu_excess_pct`` says how much more CPU the
process used than the timing thread during its calls (flagged beyond 10 %: ORT not on one thread).

Memory: every session loaded is checked against the memory free at that moment, keeping room for the
subnets still to come (see :class:`MemoryGuard`); the script refuses with one line only when the next
session would not fit.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import OUT_DIR, fail, in_fresh_process, machine, parse_shape, stem, write_result

from hwprune.api import load_adapter, make_predictor
from hwprune.errors import HwpruneError
from hwprune.export.candidate import candidate_onnx, timing_feed
from hwprune.export.measure import CONTROL_TOL_PCT, CPU_EXCESS_TOL_PCT
from hwprune.families import Family
from hwprune.latency import DeviceFingerprint, LatencyTable, Timing, get_backend
from hwprune.latency.backends import Runner, interleave
from hwprune.latency.pages import reexec_for_timing
from hwprune.space import Candidate, PruningSpace

SESSION_FACTOR = 2  # an ORT session holds its weights about twice: initializers and prepacked copies
HEADROOM = 256 << 20  # left free for Python, torch and the OS page cache of the session being built


def sample_subnets(space: PruningSpace, n: int, rng: np.random.Generator) -> list[tuple[str, Candidate]]:
    """A few extremes, then random subnets whose overall keep ratio is spread over (0, 1).

    Extremes: dense, smallest, uniform half and, for every unit kind that may be removed entirely (0 is
    one of its sizes) in a space of several kinds, that kind removed with the others whole: an encoder's
    ``heads-min`` (attention removed) and ``ffn-min``. Read off the space, not the family, so a new
    family with removable sublayers gets them too.
    """
    out = [("dense", space.dense()), ("smallest", space.smallest()), ("uniform-0.5", space.uniform(0.5))]
    kinds = list(dict.fromkeys(u.kind for u in space.units))
    if len(kinds) > 1:
        for kind in kinds:
            if all(u.sizes[0] == 0 for u in space.units if u.kind == kind):
                out.append(
                    (f"{kind}-min", Candidate(tuple(u.sizes[0] if u.kind == kind else u.full for u in space.units)))
                )
    out = out[:n]
    while len(out) < n:
        ratio = rng.uniform(0.05, 1.0)  # per-subnet level, per-unit jitter around it
        sizes = []
        for u in space.units:
            r = float(np.clip(ratio + rng.normal(0.0, 0.25), 0.0, 1.0))
            sizes.append(u.sizes[round(r * (len(u.sizes) - 1))])
        out.append((f"random-{len(out)}", Candidate(tuple(sizes))))
    return out


def export_subnet(
    adapter: Family, space: PruningSpace, cand: Candidate, rng: np.random.Generator, *, batch: int, seq: int
) -> tuple[bytes, dict[str, np.ndarray]]:
    """The subnet with random kept indices (latency must not depend on which ones), as ``hwprune export``
    would write it, and the feed it is timed on."""
    kept = {u.name: sorted(rng.choice(u.full, size=s, replace=False).tolist()) for u, s in zip(space.units, cand.sizes)}
    model = adapter.prune(adapter.dense(), adapter.plan(kept))
    return candidate_onnx(adapter, model, batch=batch, seq=seq), timing_feed(adapter, batch=batch, seq=seq)


def session_twins(
    networks: Sequence[Mapping[str, int] | None], timings: Sequence[Timing], space: PruningSpace
) -> dict[tuple[int, ...], float]:
    """Measured ms of the fixed runners that are whole networks of the space, by unit sizes (the first
    runner wins when two share sizes). A subnet with the same sizes is the same graph in a session
    created later, so the two differ only by the session."""
    out: dict[tuple[int, ...], float] = {}
    for net, t in zip(networks, timings):
        if net is not None and all(u.name in net for u in space.units):
            out.setdefault(tuple(int(net[u.name]) for u in space.units), t.median_ms)
    return out


def available_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux); 8 GiB where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 1 << 30 else f"{n / 2**20:.0f} MiB"


def weight_bytes(model: Any) -> int:
    """Bytes of a torch model's parameters and buffers: what its exported graph's initializers hold."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def subnet_bytes(dense_bytes: int, space: PruningSpace, subnets: Sequence[tuple[str, Candidate]]) -> int:
    """Estimated session memory of ``subnets``: dense weights x each one's mean kept fraction per unit
    (an upper estimate: a layer between two pruned units shrinks by the product of their fractions)."""
    frac = [float(np.mean([s / u.full if u.full else 1.0 for u, s in zip(space.units, c.sizes)])) for _, c in subnets]
    return int(SESSION_FACTOR * dense_bytes * sum(frac))


class MemoryGuard:
    """Mixed into the backend's own class (:func:`guarded_backend`): every ``prepare`` first checks that
    the session fits in the memory free now while leaving ``reserve`` bytes for the sessions still to
    come (the subnets of the first chunk).

    Why a guard instead of an estimate up front: how many graphs a profile loads, and how big they are,
    is the family's business (a CNN's level grid of whole networks, an encoder's block chains), so the
    script cannot count them without naming the family. Checking each session as it is created, against
    MemAvailable at that moment, is exact for everything already loaded and refuses only when the next
    session really would not fit, before the machine starts swapping. It is a subclass of the real
    backend, not a wrapper, so a family that checks the backend's type or asks it for more (session
    options, providers) sees the real one.
    """

    reserve: int = 0
    advice: str = ""
    sessions: int = 0
    loaded: int = 0

    def prepare(self, onnx: bytes, feed: Mapping[str, np.ndarray]) -> Any:
        need, free = SESSION_FACTOR * len(onnx) + self.reserve, available_bytes() - HEADROOM
        if need > free:
            raise HwpruneError(
                f"out of memory ahead: {self.sessions} sessions loaded (~{_size(self.loaded)}), the next needs "
                f"~{_size(SESSION_FACTOR * len(onnx))} and the subnets still to come ~{_size(self.reserve)}, but "
                f"{_size(max(free, 0))} is free; {self.advice}"
            )
        runner = super().prepare(onnx, feed)  # type: ignore[misc]
        if runner is None:
            raise HwpruneError(
                f"runtime {getattr(self, 'name', '?')} cannot time graphs call by call in interleaved "
                "rounds (its backend has no prepare()); use --runtime ort-cpu"
            )
        self.sessions += 1
        self.loaded += SESSION_FACTOR * len(onnx)
        return runner


def guarded_backend(runtime: str, *, threads: int, reserve: int, advice: str) -> Any:
    """``get_backend(runtime, threads=)`` with :class:`MemoryGuard` in front of its class's ``prepare``."""
    cls = type(get_backend(runtime, threads=threads))  # also the one-line error for an unknown runtime
    guarded = type(f"Guarded{cls.__name__}", (MemoryGuard, cls), {})(threads=threads)
    guarded.reserve, guarded.advice = reserve, advice
    return guarded


def time_chunk(
    adapter: Family,
    space: PruningSpace,
    subnets: list[tuple[str, Candidate]],
    *,
    backend: Any,
    fixed: list[Runner],
    batch: int,
    seq: int,
    seconds: float,
    rng: np.random.Generator,
    common_mode: bool = True,
) -> tuple[list[Timing], list[Timing], list[Runner], Timing]:
    """Export ``subnets`` and time them in the same interleaved rounds as the ``fixed`` runners (whose
    first is the dense model) and a second dense session created after the subnets' (the control).
    Returns the fixed runners' timings, the subnets' timings and runners, and the control's timing."""
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        t = bar.add_task(f"export {len(subnets)} subnets", total=len(subnets))
        runners = []
        for _, cand in subnets:
            runners.append(backend.prepare(*export_subnet(adapter, space, cand, rng, batch=batch, seq=seq)))
            bar.advance(t)
        dense = adapter.dense()
        control = backend.prepare(
            candidate_onnx(adapter, dense, batch=batch, seq=seq), timing_feed(adapter, batch=batch, seq=seq)
        )
        everything = [*fixed, *runners, control]
        for r in everything:  # warm up, then log only the timed calls (wall clock, CPU check)
            r.sample(3)
            r.log.reset()
        t = bar.add_task(f"time {len(everything)} graphs (~{seconds:.0f} s)", total=100)
        timings = interleave(
            everything,
            seconds=seconds,
            common_mode=common_mode,
            warmup=0,
            seed=int(rng.integers(1 << 31)),
            on_round=lambda f: bar.update(t, completed=100 * f),
        )
    return timings[: len(fixed)], timings[len(fixed) : -1], runners, timings[-1]


def measure_chunk(
    adapter: Family,
    space: PruningSpace,
    chunk: list[tuple[str, Candidate]],
    index: int,
    *,
    backend: Any,
    fixed: list[Runner],
    networks: Sequence[Mapping[str, int] | None],
    prof: Any,
    table: LatencyTable | None,
    batch: int,
    seq: int,
    seconds: float,
    rng: np.random.Generator,
    common_mode: bool,
) -> tuple[list[dict[str, Any]], float, LatencyTable]:
    """Time one chunk (:func:`time_chunk`) and return its rows, its dense-vs-dense control in % and the
    table it was predicted with (without a table: made from the profile graphs of this chunk's rounds)."""
    ft, st, sr, ct = time_chunk(
        adapter, space, chunk, backend=backend, fixed=fixed, batch=batch, seq=seq, seconds=seconds, rng=rng,
        common_mode=common_mode,
    )  # fmt: skip
    if prof is not None:
        runtime, threads = backend.name, backend.threads
        table = LatencyTable(
            frame=prof.frame(ft),
            fingerprint=DeviceFingerprint.current(
                runtime, threads=threads, batch=batch, seq=seq, runtime_version=backend.version()
            ),
            model=adapter.name,
            family=adapter.family,
            shape_key=adapter.shape_key(),
            settings={"runtime": runtime, "threads": threads, "batch": batch, "seq": seq},
            meta=prof.meta(ft),
        )
    dense = ft[0].median_ms  # both modes put the dense model first
    assert table is not None
    pred = make_predictor(table, space, adapter)
    twins = session_twins(networks, ft, space)
    rows: list[dict[str, Any]] = []
    for (name, cand), t, runner in zip(chunk, st, sr):
        wall = float(np.median(runner.log.wall_ms))
        rows.append(subnet_row(name, cand, pred, t.median_ms, dense, wall, runner.log.cpu_excess_pct, index))
        if cand.sizes in twins:  # the same graph is one of the fixed runners: a session control
            rows[-1]["profile_twin_measured_ms"] = round(twins[cand.sizes], 4)
    return rows, round(100 * (ct.median_ms / dense - 1), 3), table


def error_pct(predicted_ms: float, measured_ms: float) -> float:
    """Raw prediction error in % of the measurement (the report's headline figure), 3 decimals."""
    return round(100 * (predicted_ms - measured_ms) / measured_ms, 3)


def subnet_row(
    name: str,
    cand: Candidate,
    pred: Any,
    measured_ms: float,
    dense_ms: float,
    wall_ms: float | None,
    cpu_excess_pct: float | None,
    chunk: int,
) -> dict[str, Any]:
    """One subnet's row of the report: predicted vs measured ms (raw error), the dense model's pair."""
    p = pred.predict(cand)
    return {
        "name": name,
        "key": cand.key(),
        "sizes": list(cand.sizes),
        "predicted_ms": round(p, 4),
        "measured_ms": round(measured_ms, 4),
        "error_pct": error_pct(p, measured_ms),
        "dense_predicted_ms": round(pred.dense_ms(), 4),
        "dense_measured_ms": round(dense_ms, 4),
        "measured_wall_ms": _round(wall_ms, 4),
        "cpu_excess_pct": _round(cpu_excess_pct),
        "chunk": chunk,
    }


@dataclass(frozen=True)
class TableChunk:
    """What a chunk's fresh process needs to time it against a table (plain values, picklable)."""

    model: str
    weights: str | None
    input_shape: str | None
    space: str | None
    table: str
    seconds: float
    common_mode: bool
    host_pauses_s: tuple[float, ...] = ()  # table_pairs: pauses before re-timings while dense misses the table


def table_chunk(
    job: TableChunk, chunk: list[tuple[str, Candidate]], index: int, seed: int
) -> tuple[list[dict[str, Any]], float]:
    """:func:`measure_chunk` against ``job.table`` in this (fresh) process, beside a dense session of its own.

    The default with ``--table``: on SmolLM2's decode step a process that had timed earlier chunks measured
    the same subnets ~2 % (once up to 7 %) slower than a fresh one (docs/benchmarks.md); each ``hwprune
    export`` is a fresh process too."""
    adapter = load_adapter(job.model, weights=job.weights, input_shape=parse_shape(job.input_shape))
    space = adapter.space(job.space)
    table = LatencyTable.load(job.table)
    s = table.settings
    batch, seq = int(s["batch"]), int(s["seq"])
    backend = guarded_backend(str(s["runtime"]), threads=int(s["threads"]), reserve=0, advice="pass a smaller --chunk")
    dense = candidate_onnx(adapter, adapter.dense(), batch=batch, seq=seq)
    fixed = [backend.prepare(dense, timing_feed(adapter, batch=batch, seq=seq))]
    rows, control, _ = measure_chunk(
        adapter, space, chunk, index, backend=backend, fixed=fixed, networks=[space.dense().as_dict(space)],
        prof=None, table=table, batch=batch, seq=seq, seconds=job.seconds, rng=np.random.default_rng(seed),
        common_mode=job.common_mode,
    )  # fmt: skip
    return rows, control


def table_pairs(
    job: TableChunk, chunk: list[tuple[str, Candidate]], index: int, seed: int
) -> tuple[list[dict[str, Any]], float]:
    """``chunk`` against ``job.table`` measured exactly as ``hwprune export`` measures a candidate: each
    subnet beside the dense model in its own rounds, four sessions in mirrored order, in a new process that
    runs ONNX Runtime only (:func:`hwprune.export.measure.measure_pairs`). The
    chunk's control is the median of its pairs' dense-vs-dense controls. ``--seconds`` does not apply: the
    rounds and calls per round are export's (5 rounds, calls from the dense model's time)."""
    from hwprune.export.measure import measure_pairs

    adapter = load_adapter(job.model, weights=job.weights, input_shape=parse_shape(job.input_shape))
    space = adapter.space(job.space)
    table = LatencyTable.load(job.table)
    s = table.settings
    batch, seq = int(s["batch"]), int(s["seq"])
    backend = get_backend(str(s["runtime"]), threads=int(s["threads"]))
    rng = np.random.default_rng(seed)
    graphs = {str(i): export_subnet(adapter, space, c, rng, batch=batch, seq=seq)[0] for i, (_, c) in enumerate(chunk)}
    pred = make_predictor(table, space, adapter)
    cmps = measure_pairs(
        backend,
        dense=candidate_onnx(adapter, adapter.dense(), batch=batch, seq=seq),
        pruned=graphs,
        feed=timing_feed(adapter, batch=batch, seq=seq),
        # as export: a pair whose dense model lands > 5 % from the table is timed again (all attempts kept)
        dense_expected_ms=pred.dense_ms() if job.host_pauses_s else None,
        host_pauses_s=job.host_pauses_s,
    )
    del graphs
    rows: list[dict[str, Any]] = []
    for i, (name, cand) in enumerate(chunk):
        cmp = cmps[str(i)]
        got = cmp.pruned[str(i)]
        row = subnet_row(name, cand, pred, got.median_ms, cmp.dense.median_ms, got.wall_ms, got.cpu_excess_pct, index)
        row |= {"dense_control_pct": _round(cmp.control_pct), "process": cmp.settings.get("process")}
        check = cmp.settings.get("host_check")
        if check is not None:  # the first attempt's figures, whatever the guard did
            first = check["attempts"][0]
            p = row["predicted_ms"]
            row["host_check"] = check
            row["first_attempt"] = {
                "measured_ms": round(first["measured_ms"], 4),
                "dense_measured_ms": round(first["dense_ms"], 4),
                "error_pct": error_pct(p, first["measured_ms"]),
            }
        rows.append(row)
    controls = [c.control_pct for c in cmps.values() if c.control_pct is not None]
    return rows, round(float(np.median(controls)), 3) if controls else float("nan")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model",
        default="minilm",
        help="named model (minilm, bert-base, resnet18, resnet50, mobilenet_v2, vgg16_bn), a local "
        "Hugging Face folder, or package.module:factory returning a torch model",
    )
    ap.add_argument(
        "--input-shape", help="for models that take one (CNNs): N,C,H,W (default 1,3,224,224); N is the batch"
    )
    ap.add_argument("--weights", help="for models that take them (CNNs): .safetensors weights (default: random init)")
    ap.add_argument("--table", help="latency table to test (default: profile in the same rounds as the subnets)")
    ap.add_argument("--space", help="pruning space YAML (default: the model's)")
    ap.add_argument("--subnets", type=int, default=30, help="number of subnets, extremes included")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--chunk",
        type=int,
        help="subnets loaded at once (default 15, ~100 MB each for MiniLM/resnet50; with --table 1: each beside "
        "the dense model alone, as export times it; decode: 4)",
    )
    ap.add_argument("--seconds", type=float, help="timing budget per chunk (default 120; with --table 20; decode: 40)")
    ap.add_argument("--runtime", default="ort-cpu", help="without --table: runtime to profile and time")
    ap.add_argument("--threads", type=int, default=1, help="without --table: intra-op threads")
    ap.add_argument(
        "--levels",
        type=int,
        default=None,
        help="without --table: sizes per unit where the family samples a grid (CNNs: width levels per "
        "group, default hwprune profile's 5 -> 25 networks); families without a grid ignore it",
    )
    ap.add_argument(
        "--batch", type=int, default=1, help="without --table: batch (image models take it from --input-shape)"
    )
    ap.add_argument("--seq", type=int, default=128, help="without --table: sequence length (models that have one)")
    ap.add_argument("-o", "--out", help="JSON report (default bench_out/latency_<model>.json)")
    ap.add_argument(
        "--regime",
        choices=("prefill", "decode"),
        default="prefill",
        help="decode: one new token after a KV cache (LLMs), run by bench_decode_latency.py with the same --model, "
        "--table, --space, --subnets, --seed, --threads, --out and its own --context",
    )
    ap.add_argument("--context", help="decode: KV-cache lengths, e.g. 128,1024")
    ap.add_argument(
        "--timing-process",
        choices=("ort-only", "chunk"),
        help="where the subnets are timed. ort-only (the default): in a new process that runs ONNX Runtime "
        "only; with --table (prefill) exactly as hwprune export measures a candidate (measure_pairs: beside "
        "the dense model, four sessions, export's rounds; --seconds does not apply). chunk: in the process "
        "that exported them, interleaved for --seconds. Decode: bench_decode_latency.py's flag",
    )
    ap.add_argument(
        "--host-retries",
        type=int,
        default=3,
        help="as hwprune export (--table, prefill, ort-only): time a subnet again, after 5, 10, then 20 s, while "
        "the dense model beside it lands more than 5 %% from the table; the dense model alone decides, and each "
        "row keeps its first attempt (first_attempt, summarised as first_attempt_*). 0: time once",
    )
    ap.add_argument(
        "--same-process",
        action="store_true",
        help="with --table: time every chunk in this process instead of a fresh one per chunk (on SmolLM2's "
        "decode step a process that had timed earlier chunks measured the same subnets ~2 %% (once up to 7 %%) slower)",
    )
    ap.add_argument(
        "--no-common-mode",
        action="store_true",
        help="do not divide each timing round by its load factor (interleave's common_mode); the medians "
        "of the raw per-call times are used as they are",
    )
    a = ap.parse_args(argv)
    if a.regime == "decode":
        return a  # checked by bench_decode_latency
    # with a table, each subnet beside the dense model alone (four sessions alternating, as export times a
    # candidate): 17 sessions alternating call by call measured mobilenet_v2 8-13 % slower than export does
    a.chunk = (1 if a.table else 15) if a.chunk is None else a.chunk
    a.seconds = (20.0 if a.table else 120.0) if a.seconds is None else a.seconds
    if a.subnets < 1 or a.chunk < 1 or not a.seconds > 0:
        ap.error("--subnets and --chunk must be >= 1 and --seconds > 0")
    if a.host_retries < 0:
        ap.error("--host-retries must be >= 0 (0: time each subnet once)")
    return a


def main(argv: list[str] | None = None) -> int:
    from hwprune.export.measure import host_pauses

    a = parse_args(argv)
    if a.regime == "decode":
        import bench_decode_latency

        fwd = ["--model", a.model, "--subnets", str(a.subnets), "--seed", str(a.seed), "--threads", str(a.threads)]
        opts = {"--table": a.table, "--space": a.space, "--context": a.context, "--out": a.out}
        opts |= {"--chunk": a.chunk, "--seconds": a.seconds}
        fwd += ["--no-common-mode"] if a.no_common_mode else []
        fwd += ["--same-process"] if a.same_process else []
        fwd += ["--timing-process", a.timing_process] if a.timing_process else []
        for flag, v in opts.items():
            fwd += [flag, str(v)] if v is not None else []
        return int(bench_decode_latency.main(fwd))
    t_start = time.perf_counter()
    try:
        adapter = load_adapter(a.model, weights=a.weights, input_shape=parse_shape(a.input_shape))
        space = adapter.space(a.space)
        table = LatencyTable.load(a.table) if a.table else None
        if table is not None:
            table.check_model(adapter)
            s = table.settings
            runtime, threads, batch, seq = s["runtime"], int(s["threads"]), int(s["batch"]), int(s["seq"])
            for w in table.machine_warnings(runtime, threads):
                print(f"warning: {w}", file=sys.stderr)
        else:
            runtime, threads = a.runtime, a.threads
            batch, seq = adapter.io_settings(batch=a.batch, seq=a.seq)
        rng = np.random.default_rng(a.seed)
        subnets = sample_subnets(space, a.subnets, rng)
        dense_bytes = weight_bytes(adapter.dense())
        advice = f"pass a smaller --chunk (now {a.chunk})" + (
            "" if a.table else f" or --levels, or profile first (hwprune profile --model {a.model}) and pass --table"
        )
        backend = guarded_backend(
            runtime, threads=threads, advice=advice, reserve=subnet_bytes(dense_bytes, space, subnets[: a.chunk])
        )
        if table is not None and not a.same_process:  # each chunk's fresh process makes its own
            fixed, networks, prof = [], [space.dense().as_dict(space)], None
        elif table is not None:  # the table against this machine now: dense model as the drift reference
            fixed = [
                backend.prepare(
                    candidate_onnx(adapter, adapter.dense(), batch=batch, seq=seq),
                    timing_feed(adapter, batch=batch, seq=seq),
                )
            ]
            networks: list[Mapping[str, int] | None] = [space.dense().as_dict(space)]
            prof = None
        else:  # profile graphs timed in the same rounds as the subnets: the predictor, not the load, is tested
            prof = adapter.prepare_profiling(backend, batch=batch, seq=seq, space=space, progress=True, levels=a.levels)
            fixed, networks = list(prof.runners), prof.networks()
            print(
                f"profile: {len(fixed)} graphs loaded (~{_size(backend.loaded)} of sessions); live with "
                f"a chunk of subnets: {len(fixed) + min(a.chunk, len(subnets))} sessions",
                flush=True,
            )
        backend.reserve = 0  # from here on every subnet session is checked as it is created
        rows: list[dict[str, Any]] = []
        controls: list[float] = []  # per chunk: the dense model's later session vs its first, in %
        for i in range(0, len(subnets), a.chunk):
            chunk = subnets[i : i + a.chunk]
            if table is not None and not a.same_process:  # a fresh process per chunk, as each export is one
                job = TableChunk(
                    a.model, a.weights, a.input_shape, a.space, a.table, a.seconds, not a.no_common_mode,
                    host_pauses(a.host_retries),
                )  # fmt: skip
                timer = table_chunk if a.timing_process == "chunk" else table_pairs
                got, control = in_fresh_process(timer, job, chunk, i // a.chunk, int(rng.integers(1 << 31)))
            else:
                got, control, table = measure_chunk(
                    adapter,
                    space,
                    chunk,
                    i // a.chunk,
                    backend=backend,
                    fixed=fixed,
                    networks=networks,
                    prof=prof,
                    table=table,
                    batch=batch,
                    seq=seq,
                    seconds=a.seconds,
                    rng=rng,
                    common_mode=not a.no_common_mode,
                )
            rows += got
            controls.append(control)
            print(f"chunk {i // a.chunk + 1}: " + ", ".join(f"{r['error_pct']:+.1f}%" for r in rows[i:]), flush=True)
        here = DeviceFingerprint.current(
            runtime, threads=threads, batch=batch, seq=seq, runtime_version=backend.version()
        )
        facts = machine(runtime, threads=threads, batch=batch, seq=seq)
    except HwpruneError as e:
        return fail(e)
    report = summarize(rows)
    report["dense_control_pct"] = controls
    as_export = bool(a.table) and not a.same_process and a.timing_process != "chunk"
    if as_export:
        process = "as hwprune export measures: each subnet beside the dense model in a new ONNX-Runtime-only process"
    elif a.table and not a.same_process:
        process = "a fresh one per chunk, interleaved for seconds_per_chunk"
    else:
        process = "this one for every chunk"
    report["warnings"] = warnings(report, clock=backend.clock)
    for w in report["warnings"]:
        print(f"warning: {w}", file=sys.stderr)
    report.update(
        {
            "mode": "table" if a.table else "profiled in the same rounds",
            "model": adapter.name,
            "family": adapter.family,
            "input_shape": adapter.spec().get("input_shape"),
            "table": a.table or None,
            "seconds": round(time.perf_counter() - t_start, 1),
            "settings": {
                "runtime": runtime,
                "threads": threads,
                "batch": batch,
                "seq": seq,
                "seconds_per_chunk": None if as_export else a.seconds,
                "host_retries": a.host_retries if as_export else None,
                "chunk": a.chunk,
                "seed": a.seed,
                "levels": None if a.table else a.levels,
                "common_mode": not a.no_common_mode,
                "process": process,
            },
            "table_machine_mismatches": table.fingerprint.mismatches(here) if a.table and table else [],
            "subnets": rows,
        }
    )
    print(json.dumps({k: v for k, v in report.items() if k != "subnets"}, indent=2))
    write_result(
        a.out or OUT_DIR / f"latency_{stem(a.model)}.json", report, script=__file__, argv=argv, machine_facts=facts
    )
    return 0


def _round(v: float | None, nd: int = 3) -> float | None:
    return None if v is None else round(v, nd)


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Error figures over all subnets: raw (the headline), then the speedup errors, the clocks."""
    err = np.array([r["error_pct"] for r in rows])
    # predicted vs measured *speedup* of each subnet (the prediction rescaled by the dense model measured
    # in its chunk); equal to the raw errors when the dense model measured as predicted
    sp = np.array(
        [
            100
            * (r["predicted_ms"] * r["dense_measured_ms"] / r["dense_predicted_ms"] - r["measured_ms"])
            / r["measured_ms"]
            for r in rows
        ]
    )
    dense_err = [100 * (r["dense_predicted_ms"] - r["dense_measured_ms"]) / r["dense_measured_ms"] for r in rows]
    twins = {
        r["name"]: round(100 * (r["measured_ms"] / r["profile_twin_measured_ms"] - 1), 3)
        for r in rows
        if "profile_twin_measured_ms" in r
    }
    excess = [r["cpu_excess_pct"] for r in rows if r.get("cpu_excess_pct") is not None]
    first = np.array([r["first_attempt"]["error_pct"] for r in rows if "first_attempt" in r])
    guard: dict[str, Any] = {}
    if len(first):  # what the host check changed: the figures of every subnet's first attempt
        guard = {
            "first_attempt_mape_pct": round(float(np.abs(first).mean()), 3),
            "first_attempt_max_abs_error_pct": round(float(np.abs(first).max()), 3),
            "first_attempt_within_5pct": int((np.abs(first) <= 5).sum()),
            "retimed": sum(len(r["host_check"]["attempts"]) > 1 for r in rows if "host_check" in r),
            "host_never_within": sum(not r["host_check"]["within"] for r in rows if "host_check" in r),
        }
    walls = [100 * (r["measured_wall_ms"] / r["measured_ms"] - 1) for r in rows if r.get("measured_wall_ms")]
    return {
        "n": len(rows),
        "mape_pct": round(float(np.abs(err).mean()), 3),
        "max_abs_error_pct": round(float(np.abs(err).max()), 3),
        "within_5pct": int((np.abs(err) <= 5).sum()),
        "mean_error_pct": round(float(err.mean()), 3),
        "dense_error_pct": round(float(np.median(dense_err)), 3),
        "speedup_error_mape_pct": round(float(np.abs(sp).mean()), 3),
        "max_abs_speedup_error_pct": round(float(np.abs(sp).max()), 3),
        # same graph, later session, same rounds: how much a session alone moves a measurement
        "session_effect_pct": twins,
        # wall clock over the timing clock per subnet (median): what preemption and throttling add
        "median_wall_over_measured_pct": round(float(np.median(walls)), 3) if walls else None,
        "max_cpu_excess_pct": round(max(excess), 3) if excess else None,
        **guard,
    }


def warnings(report: Mapping[str, Any], *, clock: str) -> list[str]:
    """The report's controls beyond the precision claimed, and CPU used outside the timing thread."""
    out = [
        f"chunk {i + 1}: dense-vs-dense control {c:+.2f}% exceeds +-{CONTROL_TOL_PCT:g}%"
        for i, c in enumerate(report["dense_control_pct"])
        if abs(c) > CONTROL_TOL_PCT
    ]
    ex = report.get("max_cpu_excess_pct")
    if clock == "thread-cpu" and ex is not None and ex > CPU_EXCESS_TOL_PCT:
        out.append(f"a subnet's process used {ex:.0f}% more CPU than its timing thread (ORT not on one thread)")
    return out


if __name__ == "__main__":
    reexec_for_timing()  # huge pages: identical sessions time alike (hwprune.latency.pages)
    sys.exit(main())
