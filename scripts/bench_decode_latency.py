"""Decode-latency fidelity: a decode table's predicted vs measured ms of one new token, per subnet and context.

    hwprune profile --model smollm2 --regime decode --context 128,512,1024 -o T.parquet
    python scripts/bench_decode_latency.py --model smollm2 --table T.parquet --context 128,1024 --subnets 30 \\
        -o bench_out/decode_latency_smollm2.json

For LLM families (those whose exports carry a decode graph, ``Family.extra_graphs`` role ``decode``).
Subnets are drawn as ``bench_latency.py`` draws them (dense, smallest, uniform half, each removable kind
removed, then random ones with removed blocks and sublayers among them), pruned with random kept indices,
and exported as ``hwprune export`` writes ``decoder.onnx``. Each is timed with the table's backend
settings at every ``--context``: one new token after a KV cache of that many positions, one session per
graph shared by its contexts (``--per-context-sessions``: sessions of their own per context, timed one
context after the other, as the table's chains are timed; on SmolLM2 it did not lower the error, see
docs/benchmarks.md), all graphs of a chunk in shuffled interleaved rounds (``common_mode``) of
``--per-round`` consecutive calls per graph and context (10, as ``hwprune export`` times decode steps and
as a generating model calls its own session; ``--per-round 1`` switches graphs on every call, which on
SmolLM2 measured every graph ~25 % slower than either),
beside the dense model's graph, each chunk in a fresh process (``--same-process`` keeps them in this one;
a process that had timed earlier chunks measured the same subnets ~2 %, once up to 7 %, slower:
``scripts/bench_process_age.py``). The chunk's process exports the graphs; they are timed in another new
process that runs ONNX Runtime only (``--timing-process ort-only``, the default), as a deployed model's
does and as the decode profile times its anchors (:mod:`hwprune.latency.worker`); ``--timing-process
chunk`` times them in the chunk's process, beside the torch model they came from. Every graph gets two
sessions, created in mirrored order (dense, s1, ...,
sN, sN', ..., s1', dense', as ``hwprune export`` times models): a graph's measured ms is the mean of its
two sessions' medians, and the dense model's second session against its first is the dense-vs-dense
control. The prediction is the table's (``make_predictor(..., regime="decode",
context=c)``, interpolated between the table's contexts). Raw error is the headline (``mape_pct`` per
context and overall); the speedup error (prediction rescaled by the dense model measured in its chunk)
stands beside it. With ``--table``, the table was profiled earlier, in another process: the normal-use
protocol. Without it, the bench first profiles one (``hwprune profile --regime decode`` in this process,
written beside the report as ``OUT.table.parquet``) and times the subnets right after.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import OUT_DIR, fail, in_fresh_process, machine, stem, write_result
from bench_latency import sample_subnets, summarize, warnings

from hwprune._mem import release
from hwprune.api import load_adapter, make_predictor
from hwprune.errors import HwpruneError
from hwprune.export.workload_timing import MirroredSteps, decode_graph, step_runners
from hwprune.families import Family
from hwprune.latency import LatencyTable, get_backend
from hwprune.latency.backends import interleave
from hwprune.latency.pages import reexec_for_timing
from hwprune.latency.worker import graph_files
from hwprune.space import Candidate, PruningSpace, Unit


def pruned_graph(adapter: Family, space: PruningSpace, cand: Candidate, rng: np.random.Generator) -> bytes:
    """``decoder.onnx`` of the subnet with random kept indices (latency must not depend on which ones)."""
    kept = {u.name: sorted(rng.choice(u.full, size=s, replace=False).tolist()) for u, s in zip(space.units, cand.sizes)}
    return decode_graph(adapter, adapter.prune(adapter.dense(), adapter.plan(kept)))


def _nearest(u: Unit, fraction: float) -> int:
    """The unit's allowed kept size nearest to ``fraction * full``, never 0 (that one removes it)."""
    return min((x for x in u.sizes if x > 0), key=lambda x: (abs(x - fraction * u.full), -x))


def structured_subnets(space: PruningSpace) -> list[tuple[str, Candidate]]:
    """Subnets that each isolate one departure from what a decode table's anchors pin (``--shapes``):

    - ``<kind>-only-<f>``: every unit of that kind at fraction f of its width (its smallest kept size, 1/4,
      1/2), every other unit removed -- the shape the profile's chains time, but inside the real model;
    - ``alt-layers``: every other layer whole, the rest removed (depth pruning with nothing narrowed);
    - ``alt-kinds``: in every layer one kind kept whole, the other removed, alternating;
    - ``<kind>-min-others-<f>``: that kind at its smallest kept size, the others whole.

    Read off the space (unit kinds, layers, removable sizes), not the family. Kinds that cannot be removed
    get only the last group; duplicates of an earlier shape are dropped."""
    units = space.units
    kinds = list(dict.fromkeys(u.kind for u in units))
    removable = {k for k in kinds if all(u.sizes[0] == 0 for u in units if u.kind == k)}
    out: dict[str, Candidate] = {}
    if removable == set(kinds) and len(kinds) > 1:
        for k in kinds:
            for tag, f in (("min", 0.0), ("1/4", 0.25), ("1/2", 0.5)):
                out[f"{k}-only-{tag}"] = Candidate(tuple(_nearest(u, f) if u.kind == k else 0 for u in units))
        layers = sorted({u.layer for u in units})
        out["alt-layers"] = Candidate(tuple(u.full if layers.index(u.layer) % 2 else 0 for u in units))
        out["alt-kinds"] = Candidate(
            tuple(u.full if (layers.index(u.layer) + kinds.index(u.kind)) % 2 else 0 for u in units)
        )
    for k in kinds:
        out[f"{k}-min-others-whole"] = Candidate(tuple(_nearest(u, 0.0) if u.kind == k else u.full for u in units))
    seen: set[tuple[int, ...]] = {space.dense().sizes}
    shapes = []
    for name, cand in out.items():
        if cand.sizes not in seen:
            seen.add(cand.sizes)
            shapes.append((name, cand))
    return shapes


@dataclass(frozen=True)
class ChunkSpec:
    """What a chunk's worker needs besides its subnets: plain values, so a fresh process can take them."""

    model: str
    space: str | None
    table: str
    contexts: list[int]
    seconds: float
    per_round: int
    per_context_sessions: bool
    common_mode: bool
    primer: bool = False
    ort_only: bool = False


def time_graphs(
    runtime: str,
    threads: int,
    batch: int,
    contexts: list[int],
    spec: ChunkSpec,
    paths: list[str],
    seeds: list[int],
) -> tuple[dict[tuple[int, int], list[float]], dict[tuple[int, int], list[Any]]]:
    """Time the graphs at ``paths`` (the dense model first) at every context: two mirrored sessions each,
    interleaved rounds. Returns per (graph, context index) its two sessions' medians and their clock logs.
    Module level, so ``--timing-process ort-only`` runs it in a process of its own."""
    backend = get_backend(runtime, threads=threads)
    graphs = [Path(p).read_bytes() for p in paths]
    both: dict[tuple[int, int], list[float]] = {}  # (graph, context index) -> its two sessions' medians
    logs: dict[tuple[int, int], list[Any]] = {}  # (graph, context index) -> its two runners' clock logs
    # one session per graph for all contexts (as export times them), or per context its own
    groups = [[ic] for ic in enumerate(contexts)] if spec.per_context_sessions else [list(enumerate(contexts))]
    for group, seed in zip(groups, seeds):
        ctx = [c for _, c in group]
        # --primer: a session of the dense graph made first and held through the timing, so that no timed
        # session is the process's first (bench_session_order.py --before keep: six sessions within 1.1 %)
        primer = step_runners(backend, graphs[0], ctx, batch) if spec.primer else []
        for r in primer:
            r.sample(3)
        mirrored = MirroredSteps.create(backend, graphs, ctx, batch)  # dense, s1..sN, sN..s1, dense
        everything = mirrored.runners
        for r in everything:
            r.sample(3)
            r.log.reset()
        ts = interleave(
            everything,
            seconds=spec.seconds * len(group) / len(contexts),
            per_round=spec.per_round,
            common_mode=spec.common_mode,
            warmup=0,
            seed=seed,
        )
        for (g, f), ms in mirrored.pairs(ts).items():  # first-created session first
            both[(g, group[f][0])] = ms
            logs[(g, group[f][0])] = [r.log for r in mirrored.of(g, f)]
        del mirrored, everything, ts, primer  # these sessions go before the next group's load
        gc.collect()
        release()
    return both, logs


def time_chunk(
    spec: ChunkSpec,
    chunk: list[tuple[str, Candidate]],
    seed: int,
    *,
    adapter: Family | None = None,
    preds: dict[int, Any] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Export ``chunk``'s subnets and the dense model, time them at every context (two mirrored sessions
    each, interleaved rounds) and return a row per subnet and context plus the dense-vs-dense control.

    Runs in a fresh process by default (``adapter``/``preds`` are then loaded here): a process that had
    timed earlier chunks measured the same subnets ~2 % (once up to 7 %) slower (docs/benchmarks.md)."""
    if adapter is None:
        adapter = load_adapter(spec.model)
    space = adapter.space(spec.space)
    table = LatencyTable.load(spec.table)
    settings = dict(table.settings)
    batch = int(settings.get("batch", 1))
    backend = get_backend(str(settings.get("runtime", "ort-cpu")), threads=int(settings.get("threads", 1)))
    contexts = spec.contexts
    if preds is None:
        preds = {c: make_predictor(table, space, adapter, regime="decode", context=c) for c in contexts}
    rng = np.random.default_rng(seed)
    rows: list[dict[str, Any]] = []
    # written to files as they are exported (the subnets one at a time); the timing reads them back
    subnets = (pruned_graph(adapter, space, cand, rng) for _, cand in chunk)
    built = enumerate(chain([decode_graph(adapter, adapter.dense())], subnets))
    with graph_files(built) as files:
        seeds = [int(rng.integers(1 << 31)) for _ in contexts]
        job = (backend.name, backend.threads, batch, contexts, spec, list(files.values()), seeds)
        # ort-only: timed in a process that runs ONNX Runtime only, as a deployed model's
        both, logs = in_fresh_process(time_graphs, *job) if spec.ort_only else time_graphs(*job)
    control = {str(c): 100 * (both[(0, i)][1] / both[(0, i)][0] - 1) for i, c in enumerate(contexts)}
    for j, (name, cand) in enumerate(chunk):
        for i, c in enumerate(contexts):
            g = j + 1
            mine = logs[(g, i)]
            pred, meas = preds[c].predict(cand), float(np.mean(both[(g, i)]))
            thread_ns = sum(lg.thread_ns for lg in mine)
            rows.append(
                {
                    "name": name,
                    "context": c,
                    "sizes": list(cand.sizes),
                    "predicted_ms": pred,
                    "measured_ms": meas,
                    "sessions_ms": both[(g, i)],
                    "error_pct": 100 * (pred - meas) / meas,
                    "dense_predicted_ms": preds[c].dense_ms(),
                    "dense_measured_ms": float(np.mean(both[(0, i)])),
                    "measured_wall_ms": float(np.median([w for lg in mine for w in lg.wall_ms])),
                    "cpu_excess_pct": 100 * (sum(lg.process_ns for lg in mine) / thread_ns - 1)
                    if thread_ns > 0
                    else None,
                }
            )
    return rows, control


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument(
        "--table",
        default=None,
        help="a decode latency table (hwprune profile --regime decode); default: profile one first, in this "
        "process, at --context (then the bench times the subnets right after the profile)",
    )
    ap.add_argument("--threads", type=int, default=1, help="without --table: intra-op threads to profile with")
    ap.add_argument(
        "--space", default=None, help="pruning space YAML the table was profiled with (default: the model's)"
    )
    ap.add_argument("--context", default=None, help="KV-cache lengths to test, e.g. 128,1024 (default: the table's)")
    ap.add_argument("--subnets", type=int, default=30)
    ap.add_argument(
        "--shapes",
        action="store_true",
        help="instead of --subnets random ones, time structured subnets that each isolate one shape (one unit "
        "kind alone at 1/4 width, every other layer removed, ...): where a table's prediction misses",
    )
    ap.add_argument(
        "--chunk",
        type=int,
        default=4,
        help="subnets timed together (their sessions, about 2x the weights each, held at once)",
    )
    ap.add_argument("--seconds", type=float, default=40.0, help="interleaved timing per chunk")
    ap.add_argument(
        "--per-round", type=int, default=10, help="consecutive calls per graph and context in a round (export: 10)"
    )
    ap.add_argument(
        "--per-context-sessions",
        action="store_true",
        help="time each context on sessions of its own (as the table's chains are timed) instead of one session "
        "per graph serving every context (as hwprune export and the profile's anchors time decode steps); on "
        "SmolLM2 it did not lower the error (docs/benchmarks.md)",
    )
    ap.add_argument(
        "--no-common-mode",
        action="store_true",
        help="do not divide each round by its load factor (interleave's common_mode); on SmolLM2 it moved mixed "
        "subnets' errors by several %% relative to uniform ones (docs/benchmarks.md)",
    )
    ap.add_argument(
        "--same-process",
        action="store_true",
        help="time every chunk in this process instead of a fresh one per chunk; on SmolLM2 a process that had "
        "timed earlier chunks measured the same subnets ~2 %% (once up to 7 %%) slower (docs/benchmarks.md)",
    )
    ap.add_argument(
        "--primer",
        action="store_true",
        help="in each chunk, first make one session of the dense graph and hold it through the timing, so no "
        "timed session is the process's first (a process's first sessions time 2-3 %% slower while later ones "
        "exist: scripts/bench_session_order.py)",
    )
    ap.add_argument(
        "--timing-process",
        choices=("ort-only", "chunk"),
        default="ort-only",
        help="where a chunk's graphs are timed: ort-only (default): a process of their own that runs ONNX "
        "Runtime only, as a deployed model's does and as the decode profile times its anchors; chunk: the "
        "chunk's process, which also holds the torch model the graphs were exported from (SmolLM2's dense "
        "step measured ~2 %% slower there)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-o", "--out", default=None, help="JSON result (default bench_out/decode_latency_<model>.json)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    out = Path(a.out) if a.out else OUT_DIR / f"decode_latency_{stem(a.model)}.json"
    try:
        if a.subnets < 1 or a.chunk < 1 or a.seconds <= 0 or a.per_round < 1:
            raise HwpruneError("--subnets, --chunk and --per-round must be >= 1 and --seconds > 0")
        adapter = load_adapter(a.model)
        if a.table is None:  # profile first, as `hwprune profile --regime decode` does, into a kept file
            from hwprune.api import ProfileRequest, run_profile

            ctx = tuple(sorted({int(c) for c in (a.context or "128,512,1024").split(",")}))
            a.table = str(out.with_suffix(".table.parquet"))
            print(f"no --table: profiling {a.model} for decode at contexts {list(ctx)} into {a.table}", flush=True)
            req = ProfileRequest(
                model=a.model, regime="decode", contexts=ctx, threads=a.threads, space=a.space, out=a.table
            )
            run_profile(req, progress=sys.stderr.isatty())
        table = LatencyTable.load(a.table)
        table.check_model(adapter)
        table.check_regime("decode")
        try:
            contexts = sorted({int(c) for c in a.context.split(",")}) if a.context else list(table.contexts)
        except ValueError:
            raise HwpruneError(
                f"--context {a.context!r} must be comma-separated whole numbers, e.g. 128,1024"
            ) from None
        if not contexts or min(contexts) < 1:
            raise HwpruneError(f"--context {a.context!r}: give KV-cache lengths >= 1")
        space = adapter.space(a.space)
        settings = dict(table.settings)
        batch = int(settings.get("batch", 1))
        backend = get_backend(str(settings.get("runtime", "ort-cpu")), threads=int(settings.get("threads", 1)))
        preds = {c: make_predictor(table, space, adapter, regime="decode", context=c, log=print) for c in contexts}
        rng = np.random.default_rng(a.seed)
        if a.shapes:
            subnets = structured_subnets(space)
        else:
            subnets = [s for s in sample_subnets(space, a.subnets + 1, rng) if s[0] != "dense"][: a.subnets]
        t0 = time.perf_counter()
        rows: list[dict[str, Any]] = []
        controls: list[dict[str, float]] = []
        jobs = []  # one per chunk: its subnets and the seed of their kept indices and round order
        for start in range(0, len(subnets), a.chunk):
            jobs.append((subnets[start : start + a.chunk], int(rng.integers(1 << 31))))
        spec = ChunkSpec(
            model=a.model,
            space=a.space,
            table=str(a.table),
            contexts=contexts,
            seconds=a.seconds,
            per_round=a.per_round,
            per_context_sessions=a.per_context_sessions,
            common_mode=not a.no_common_mode,
            primer=a.primer,
            ort_only=a.timing_process == "ort-only",
        )
        for k, (chunk, seed) in enumerate(jobs):
            if a.same_process:
                chunk_rows, control = time_chunk(spec, chunk, seed, adapter=adapter, preds=preds)
            else:  # a fresh process per chunk, as each `hwprune export` is one
                chunk_rows, control = in_fresh_process(time_chunk, spec, chunk, seed)
            rows += chunk_rows
            controls.append(control)
            print(f"chunk {k + 1}: {len(chunk)} subnets timed at contexts {contexts}", flush=True)
        report: dict[str, Any] = {
            "model": a.model,
            "table": str(a.table),
            "table_created": table.created,
            "table_contexts": list(table.contexts),
            "contexts": contexts,
            "settings": {
                **settings,
                "subnets": len(subnets),
                "draw": "structured shapes (--shapes)" if a.shapes else "random (--subnets, --seed)",
                "chunk": a.chunk,
                "seconds_per_chunk": a.seconds,
                "per_round": a.per_round,
                "sessions": "per context" if a.per_context_sessions else "shared by the contexts",
                "common_mode": not a.no_common_mode,
                "process": "this one for every chunk" if a.same_process else "a fresh one per chunk",
                "primer": a.primer,
                "timing_process": a.timing_process,
            },
            **summarize(rows),
            "per_context": {str(c): summarize([r for r in rows if r["context"] == c]) for c in contexts},
            "dense_control_pct": [round(max(d.values(), key=abs), 3) for d in controls],
            "dense_control_pct_by_context": controls,
            "goal": "MAPE <= 3 % (issue 9)",
            "seconds": round(time.perf_counter() - t0, 1),
            "rows": rows,
        }
        report["goal_met"] = report["mape_pct"] <= 3.0
        report["warnings"] = warnings(report, clock=backend.clock)
        facts = machine(
            str(settings.get("runtime", "ort-cpu")), threads=int(settings.get("threads", 1)), batch=batch, seq=1
        )
        write_result(out, report, script=__file__, argv=argv, machine_facts=facts)
    except HwpruneError as e:
        return fail(e)
    print(
        f"decode latency, {len(subnets)} subnets x contexts {contexts}: raw MAPE {report['mape_pct']:.2f} % "
        f"(worst {report['max_abs_error_pct']:.2f} %), speedup-error MAPE {report['speedup_error_mape_pct']:.2f} %; "
        f"wrote {out}"
    )
    for w in report["warnings"]:
        print(f"warning: {w}")
    return 0


if __name__ == "__main__":
    reexec_for_timing()  # huge pages: identical sessions time alike (hwprune.latency.pages)
    sys.exit(main())
