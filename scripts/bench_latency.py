"""Benchmark the latency predictor: predicted vs measured ms of physically pruned, exported subnets.

    python scripts/bench_latency.py --model minilm --subnets 30 -o bench_out/latency_minilm.json
    python scripts/bench_latency.py --model minilm --table latency_tables/minilm_ort-cpu_t1_b1_s128.parquet

Without ``--table`` the model is profiled first. Subnets are random (plus a few extremes: dense, all
removed, attention only, FFN only, uniform half); each is pruned with random kept indices, exported
with ``to_onnx`` and timed with the table's backend settings. All subnets of a chunk and the dense
model are timed interleaved, round-robin in shuffled order, so other processes' load hits them alike.
The dense model's drift from the table (``dense_drift_pct``) says how much of an error is the machine
having changed since profiling rather than the predictor.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

import numpy as np

from hwprune._io import write_json
from hwprune.errors import HwpruneError
from hwprune.export.onnx_io import to_onnx
from hwprune.latency import DeviceFingerprint, LatencyTable, LUTPredictor, get_backend, profile
from hwprune.latency.backends import interleave
from hwprune.models import ModelAdapter, resolve_model
from hwprune.space import Candidate, PruningSpace


def sample_subnets(space: PruningSpace, n: int, rng: np.random.Generator) -> list[tuple[str, Candidate]]:
    """A few extremes, then random subnets whose overall keep ratio is spread over (0, 1)."""
    def by_kind(heads: str, ffn: str) -> Candidate:
        pick = {"full": lambda u: u.full, "min": lambda u: u.sizes[0]}
        return Candidate(tuple(pick[heads if u.kind == "heads" else ffn](u) for u in space.units))

    out = [("dense", space.dense()), ("smallest", space.smallest()), ("heads-min", by_kind("min", "full")),
           ("ffn-min", by_kind("full", "min")), ("uniform-0.5", space.uniform(0.5))][:n]
    while len(out) < n:
        ratio = rng.uniform(0.05, 1.0)  # per-subnet level, per-unit jitter around it
        sizes = []
        for u in space.units:
            r = float(np.clip(ratio + rng.normal(0.0, 0.25), 0.0, 1.0))
            sizes.append(u.sizes[int(round(r * (len(u.sizes) - 1)))])
        out.append((f"random-{len(out)}", Candidate(tuple(sizes))))
    return out


def export_subnet(adapter: ModelAdapter, space: PruningSpace, cand: Candidate, rng: np.random.Generator, *,
                  batch: int, seq: int) -> tuple[bytes, dict[str, np.ndarray]]:
    kept = {u.name: sorted(rng.choice(u.full, size=s, replace=False).tolist()) for u, s in zip(space.units, cand.sizes)}
    model = adapter.prune(adapter.dense(), adapter.plan(kept))
    inputs = adapter.example_inputs(batch=batch, seq=seq)
    _, outs, dyn = adapter.onnx_io()
    return to_onnx(model, inputs, output_names=outs, dynamic_axes=dyn), {k: v.numpy() for k, v in inputs.items()}


def measure_chunk(adapter: ModelAdapter, space: PruningSpace, subnets: list[tuple[str, Candidate]], *,
                  backend: Any, batch: int, seq: int, seconds: float, rng: np.random.Generator) -> tuple[list[float], float]:
    """Measured median ms of each subnet and of the dense model, timed interleaved."""
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        t = bar.add_task(f"export {len(subnets)} subnets", total=len(subnets) + 1)
        runners = []
        for _, cand in [("dense", space.dense())] + subnets:
            runners.append(backend.prepare(*export_subnet(adapter, space, cand, rng, batch=batch, seq=seq)))
            bar.advance(t)
        t = bar.add_task(f"time (~{seconds:.0f} s)", total=100)
        timings = interleave(runners, seconds=seconds, common_mode=True, seed=int(rng.integers(1 << 31)),
                             on_round=lambda f: bar.update(t, completed=100 * f))
    return [x.median_ms for x in timings[1:]], timings[0].median_ms


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="minilm", help="named model or local Hugging Face folder")
    ap.add_argument("--table", help="latency table to test (default: profile now)")
    ap.add_argument("--space", help="pruning space YAML (default: the model's)")
    ap.add_argument("--subnets", type=int, default=30, help="number of subnets, extremes included")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chunk", type=int, default=16, help="subnets loaded at once (~100 MB each for MiniLM)")
    ap.add_argument("--seconds", type=float, default=100.0, help="timing budget per chunk")
    ap.add_argument("--runtime", default="ort-cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("-o", "--out", help="write the JSON report here")
    a = ap.parse_args(argv)
    try:
        adapter = resolve_model(a.model)
        space = adapter.space(a.space)
        if a.table:
            table = LatencyTable.load(a.table)
            table.check_model(adapter)
            for w in table.machine_warnings(table.settings["runtime"], int(table.settings["threads"])):
                print(f"warning: {w}", file=sys.stderr)
        else:
            table = profile(adapter, runtime=a.runtime, threads=a.threads, seq=a.seq, space=space)
        s = table.settings
        runtime, threads, batch, seq = s["runtime"], int(s["threads"]), int(s["batch"]), int(s["seq"])
        backend = get_backend(runtime, threads=threads)
        pred = LUTPredictor(table, space)
        rng = np.random.default_rng(a.seed)
        subnets = sample_subnets(space, a.subnets, rng)
        rows: list[dict[str, Any]] = []
        for i in range(0, len(subnets), a.chunk):
            chunk = subnets[i:i + a.chunk]
            measured, dense = measure_chunk(adapter, space, chunk, backend=backend, batch=batch, seq=seq,
                                            seconds=a.seconds, rng=rng)
            for (name, cand), m in zip(chunk, measured):
                p = pred.predict(cand)
                rows.append({"name": name, "key": cand.key(), "sizes": list(cand.sizes), "predicted_ms": round(p, 4),
                             "measured_ms": round(m, 4), "error_pct": round(100 * (p - m) / m, 3),
                             "dense_measured_ms": round(dense, 4)})
            print(f"chunk {i // a.chunk + 1}: " + ", ".join(f"{r['error_pct']:+.1f}%" for r in rows[i:]))
    except HwpruneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report = summarize(rows, pred.dense_ms())
    report.update({"command": shlex.join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])]),
                   "model": adapter.name, "table": str(table.path or "<profiled now>"),
                   "table_profile_seconds": table.profile_seconds, "table_created": table.created,
                   "machine": DeviceFingerprint.current(runtime, threads=threads, batch=batch, seq=seq).to_json(),
                   "table_machine_mismatches": table.fingerprint.mismatches(
                       DeviceFingerprint.current(runtime, threads=threads, batch=batch, seq=seq)),
                   "subnets": rows})
    print(json.dumps({k: v for k, v in report.items() if k not in ("subnets", "machine")}, indent=2))
    if a.out:
        write_json(a.out, report)
    return 0


def summarize(rows: list[dict[str, Any]], dense_pred: float) -> dict[str, Any]:
    err = np.array([r["error_pct"] for r in rows])
    dense = np.array([r["dense_measured_ms"] for r in rows])
    # the same errors with predictions rescaled by measured/predicted dense: what is left is the model's
    adj = np.array([100 * (r["predicted_ms"] * r["dense_measured_ms"] / dense_pred - r["measured_ms"]) / r["measured_ms"]
                    for r in rows])
    return {"n": len(rows), "mape_pct": round(float(np.abs(err).mean()), 3),
            "max_abs_error_pct": round(float(np.abs(err).max()), 3),
            "within_5pct": int((np.abs(err) <= 5).sum()), "dense_predicted_ms": round(dense_pred, 4),
            "dense_measured_ms": round(float(np.median(dense)), 4),
            "dense_drift_pct": round(float(100 * (np.median(dense) - dense_pred) / dense_pred), 3),
            "mape_dense_adjusted_pct": round(float(np.abs(adj).mean()), 3),
            "max_abs_error_dense_adjusted_pct": round(float(np.abs(adj).max()), 3)}


if __name__ == "__main__":
    sys.exit(main())
