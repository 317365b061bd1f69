"""Benchmark the latency predictor: predicted vs measured ms of physically pruned, exported subnets.

    python scripts/bench_latency.py --model minilm --subnets 30 -o bench_out/latency_minilm.json
    python scripts/bench_latency.py --model resnet50 --subnets 30 -o bench_out/latency_resnet50.json
    python scripts/bench_latency.py --model mypkg.nets:build --weights w.safetensors --input-shape 1,3,224,224
    python scripts/bench_latency.py --model minilm --table latency_tables/minilm_ort-cpu_t1_b1_s128.parquet

Works for every model family hwprune profiles: encoders (named or a Hugging Face folder) and CNNs
(named torchvision models or ``package.module:factory``; ``--input-shape`` default 1,3,224,224).
Subnets are random (plus a few extremes: dense, smallest, uniform half, and for encoders attention
removed / FFN removed); each is pruned with random kept indices, exported as ``hwprune export`` does and timed
with the table's backend settings, interleaved and repeated (``interleave(common_mode=True)``, medians).

Without ``--table`` the model is profiled *in the same rounds* as the subnets: every round times the
profile's graphs and the subnets alike, so the other tenants' load cannot make the prediction and the
measurement disagree; this tests the method. With ``--table`` that table is tested against this
machine now; ``dense_drift_pct`` (dense measured now vs the table's prediction) says how much of the
error is the machine having changed since profiling, and the ``dense_adjusted`` figures remove it.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from hwprune._io import write_json
from hwprune.errors import HwpruneError
from hwprune.export.candidate import candidate_onnx, timing_feed
from hwprune.api import load_adapter, make_predictor
from hwprune.latency import DeviceFingerprint, LatencyTable, Timing, get_backend, profile_cnn, profile_encoder
from hwprune.latency.backends import Runner, interleave
from hwprune.families import Family
from hwprune.families.cnn.adapter import parse_input_shape
from hwprune.space import Candidate, PruningSpace


def sample_subnets(space: PruningSpace, n: int, rng: np.random.Generator) -> list[tuple[str, Candidate]]:
    """A few extremes, then random subnets whose overall keep ratio is spread over (0, 1)."""
    def by_kind(heads: str, ffn: str) -> Candidate:
        pick = {"full": lambda u: u.full, "min": lambda u: u.sizes[0]}
        return Candidate(tuple(pick[heads if u.kind == "heads" else ffn](u) for u in space.units))

    out = [("dense", space.dense()), ("smallest", space.smallest()), ("uniform-0.5", space.uniform(0.5))]
    if {u.kind for u in space.units} == {"heads", "ffn"}:  # encoders: one sublayer kind removed, the other whole
        out += [("heads-min", by_kind("min", "full")), ("ffn-min", by_kind("full", "min"))]
    out = out[:n]
    while len(out) < n:
        ratio = rng.uniform(0.05, 1.0)  # per-subnet level, per-unit jitter around it
        sizes = []
        for u in space.units:
            r = float(np.clip(ratio + rng.normal(0.0, 0.25), 0.0, 1.0))
            sizes.append(u.sizes[int(round(r * (len(u.sizes) - 1)))])
        out.append((f"random-{len(out)}", Candidate(tuple(sizes))))
    return out


def export_subnet(adapter: Family, space: PruningSpace, cand: Candidate, rng: np.random.Generator, *,
                  batch: int, seq: int) -> tuple[bytes, dict[str, np.ndarray]]:
    kept = {u.name: sorted(rng.choice(u.full, size=s, replace=False).tolist()) for u, s in zip(space.units, cand.sizes)}
    model = adapter.prune(adapter.dense(), adapter.plan(kept))
    return candidate_onnx(adapter, model, batch=batch, seq=seq), timing_feed(adapter, batch=batch, seq=seq)


def same_graph_timings(prof: Any, timings: list[Timing], space: PruningSpace) -> dict[tuple[int, ...], float]:
    """Measured ms of the profile's own networks (dense first), by unit sizes: a subnet with the same
    sizes is the same graph in a session created later, so the two differ only by the session."""
    out = {space.dense().sizes: timings[0].median_ms}
    for net, t in zip(prof.nets, timings[1:]):
        out.setdefault(tuple(net[u.name] for u in space.units), t.median_ms)
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


def check_memory(adapter: Family, levels: int, chunk: int) -> None:
    """Same-rounds mode keeps the dense model, the profile's networks and a chunk of subnets loaded at
    once (each session holds its weights about twice: initializers and prepacked copies); pruned
    networks are counted at half the dense weights, their average over the level grid."""
    dense = 4 * sum(p.numel() for p in adapter.dense().parameters())
    need = 2 * dense * (1 + 0.5 * (levels ** 2 + chunk))
    have = int(0.7 * available_bytes())
    if need > have:
        raise HwpruneError(f"{adapter.name}: profiling in the same rounds would hold ~{need / 2**30:.0f} GiB and "
                           f"{have / 2**30:.0f} GiB is free; pass --levels 3 --chunk 4, or profile first (hwprune profile "
                           f"--model {adapter.name}) and pass --table")


def time_chunk(adapter: Family, space: PruningSpace, subnets: list[tuple[str, Candidate]], *, backend: Any,
               fixed: list[Runner], batch: int, seq: int, seconds: float,
               rng: np.random.Generator) -> tuple[list[Timing], list[Timing]]:
    """Export ``subnets`` and time them in the same interleaved rounds as the ``fixed`` runners."""
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        t = bar.add_task(f"export {len(subnets)} subnets", total=len(subnets))
        runners = []
        for _, cand in subnets:
            runners.append(backend.prepare(*export_subnet(adapter, space, cand, rng, batch=batch, seq=seq)))
            bar.advance(t)
        t = bar.add_task(f"time {len(fixed) + len(runners)} graphs (~{seconds:.0f} s)", total=100)
        timings = interleave(fixed + runners, seconds=seconds, common_mode=True, seed=int(rng.integers(1 << 31)),
                             on_round=lambda f: bar.update(t, completed=100 * f))
    return timings[:len(fixed)], timings[len(fixed):]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="minilm",
                    help="named model (minilm, bert-base, resnet18, resnet50, mobilenet_v2, vgg16_bn), a local "
                         "Hugging Face folder, or package.module:factory returning a torch CNN")
    ap.add_argument("--input-shape", help="CNNs: N,C,H,W (default 1,3,224,224); N is the batch")
    ap.add_argument("--weights", help="CNNs: .safetensors weights for the model (default: its random init)")
    ap.add_argument("--table", help="latency table to test (default: profile in the same rounds as the subnets)")
    ap.add_argument("--space", help="pruning space YAML (default: the model's)")
    ap.add_argument("--subnets", type=int, default=30, help="number of subnets, extremes included")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chunk", type=int, default=15, help="subnets loaded at once (~100 MB each for MiniLM/resnet50)")
    ap.add_argument("--seconds", type=float, default=120.0, help="timing budget per chunk")
    ap.add_argument("--runtime", default="ort-cpu", help="without --table: runtime to profile and time")
    ap.add_argument("--threads", type=int, default=1, help="without --table: intra-op threads")
    ap.add_argument("--levels", type=int, default=5, help="without --table, CNNs: width levels per group "
                    "(hwprune profile's default 5 -> 25 networks)")
    ap.add_argument("--seq", type=int, default=128, help="without --table, encoders: sequence length")
    ap.add_argument("-o", "--out", help="write the JSON report here")
    a = ap.parse_args(argv)
    t_start = time.perf_counter()
    try:
        shape = parse_input_shape(a.input_shape) if a.input_shape else None
        adapter = load_adapter(a.model, weights=a.weights, input_shape=shape)
        space = adapter.space(a.space)
        cnn = adapter.family == "cnn"
        table = LatencyTable.load(a.table) if a.table else None
        if table is not None:
            table.check_model(adapter)
            for w in table.machine_warnings(table.settings["runtime"], int(table.settings["threads"])):
                print(f"warning: {w}", file=sys.stderr)
            s = table.settings
            runtime, threads, batch, seq = s["runtime"], int(s["threads"]), int(s["batch"]), int(s["seq"])
        else:
            runtime, threads, batch, seq = a.runtime, a.threads, 1, a.seq
            if cnn:  # images: the batch is the input shape's, there is no sequence
                batch, seq = int(getattr(adapter, "input_shape")[0]), 0
        backend = get_backend(runtime, threads=threads)
        rng = np.random.default_rng(a.seed)
        subnets = sample_subnets(space, a.subnets, rng)
        if table is not None:  # the table against this machine now: dense model as the drift reference
            fixed = [backend.prepare(candidate_onnx(adapter, adapter.dense(), batch=batch, seq=seq),
                                     timing_feed(adapter, batch=batch, seq=seq))]
            prof = None
        else:  # profile graphs timed in the same rounds as the subnets: the predictor, not the load, is tested
            if cnn:
                check_memory(adapter, a.levels, a.chunk)
            kw = {"levels": a.levels} if cnn else {}
            prof = (profile_cnn if cnn else profile_encoder).prepare(adapter, backend, batch=batch, seq=seq,
                                                                     space=space, **kw)
            fixed = prof.runners
        rows: list[dict[str, Any]] = []
        for i in range(0, len(subnets), a.chunk):
            chunk = subnets[i:i + a.chunk]
            ft, st = time_chunk(adapter, space, chunk, backend=backend, fixed=fixed, batch=batch, seq=seq,
                                seconds=a.seconds, rng=rng)
            if prof is not None:
                meta = prof.meta(ft) if cnn else {}  # a CNN table carries its layer map
                table = LatencyTable(frame=prof.frame(ft), fingerprint=DeviceFingerprint.current(
                    runtime, threads=threads, batch=batch, seq=seq, runtime_version=backend.version()),
                    model=adapter.name, family=adapter.family, shape_key=adapter.shape_key(), settings={},
                    meta=meta)
            dense = ft[0].median_ms  # both modes put the dense model first
            assert table is not None
            pred = make_predictor(table, space, adapter)
            twins = same_graph_timings(prof, ft, space) if cnn and prof is not None else {}
            for (name, cand), t in zip(chunk, st):
                p, m = pred.predict(cand), t.median_ms
                rows.append({"name": name, "key": cand.key(), "sizes": list(cand.sizes), "predicted_ms": round(p, 4),
                             "measured_ms": round(m, 4), "error_pct": round(100 * (p - m) / m, 3),
                             "dense_predicted_ms": round(pred.dense_ms(), 4), "dense_measured_ms": round(dense, 4),
                             "chunk": i // a.chunk})
                if cand.sizes in twins:  # the same graph is one of the profile's networks: a session control
                    rows[-1]["profile_twin_measured_ms"] = round(twins[cand.sizes], 4)
            print(f"chunk {i // a.chunk + 1}: " + ", ".join(f"{r['error_pct']:+.1f}%" for r in rows[i:]), flush=True)
    except HwpruneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    here = DeviceFingerprint.current(runtime, threads=threads, batch=batch, seq=seq, runtime_version=backend.version())
    report = summarize(rows)
    report.update({"command": shlex.join(["python", "scripts/bench_latency.py",
                                          *(argv if argv is not None else sys.argv[1:])]),
                   "mode": "table" if a.table else "profiled in the same rounds",
                   "model": adapter.name, "family": adapter.family,
                   "input_shape": list(getattr(adapter, "input_shape", ())) or None, "table": a.table or None, "seconds": round(time.perf_counter() - t_start, 1),
                   "settings": {"runtime": runtime, "threads": threads, "batch": batch, "seq": seq,
                                "seconds_per_chunk": a.seconds, "chunk": a.chunk, "seed": a.seed},
                   "machine": here.to_json(),
                   "table_machine_mismatches": table.fingerprint.mismatches(here) if a.table and table else [],
                   "subnets": rows})
    print(json.dumps({k: v for k, v in report.items() if k not in ("subnets", "machine")}, indent=2))
    if a.out:
        write_json(a.out, report)
    return 0


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    err = np.array([r["error_pct"] for r in rows])
    # predictions rescaled by measured/predicted dense of their chunk: what is left once the machine's
    # drift since profiling is taken out (equal to the raw errors when profiled in the same rounds)
    adj = np.array([100 * (r["predicted_ms"] * r["dense_measured_ms"] / r["dense_predicted_ms"] - r["measured_ms"])
                    / r["measured_ms"] for r in rows])
    drift = [100 * (r["dense_measured_ms"] - r["dense_predicted_ms"]) / r["dense_predicted_ms"] for r in rows]
    twins = {r["name"]: round(100 * (r["measured_ms"] - r["profile_twin_measured_ms"]) / r["profile_twin_measured_ms"], 3)
             for r in rows if "profile_twin_measured_ms" in r}
    return {"n": len(rows), "mape_pct": round(float(np.abs(err).mean()), 3),
            "max_abs_error_pct": round(float(np.abs(err).max()), 3), "within_5pct": int((np.abs(err) <= 5).sum()),
            "mean_error_pct": round(float(err.mean()), 3),
            "dense_drift_pct": round(float(np.median(drift)), 3),
            "mape_dense_adjusted_pct": round(float(np.abs(adj).mean()), 3),
            "max_abs_error_dense_adjusted_pct": round(float(np.abs(adj).max()), 3),
            # same graph, later session, same rounds: how much a session alone moves a measurement
            "session_effect_pct": twins}


if __name__ == "__main__":
    sys.exit(main())
