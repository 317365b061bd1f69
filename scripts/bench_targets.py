"""Targets benchmark: search + export at several speedups; measured_speedup must reach 0.97 x target.

    python scripts/bench_targets.py --model minilm --targets 1.5,2,3 -o bench_out/targets_minilm.json
    python scripts/bench_targets.py --model resnet50 --trials 60 --n-calib 32 --n-heldout 16
    python scripts/bench_targets.py --model mypkg.nets:build --weights w.safetensors --input-shape 1,3,224,224

The same flow as ``hwprune search --export``: without ``--table`` the model is profiled first when no
table for it exists yet (``latency_tables/local/``, the time is reported), then DP + NSGA-II search per
target, export (ONNX parity) and dense vs picks timed interleaved in one process.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine, write_result  # noqa: E402

from hwprune.api import SearchRequest, find_table, load_adapter, run_export, run_profile, run_search  # noqa: E402
from hwprune.errors import HwpruneError  # noqa: E402
from hwprune.families.cnn.adapter import parse_input_shape  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--table", default=None)
    ap.add_argument("--targets", default="1.5,2,3")
    ap.add_argument("--proxy", default="obs")
    ap.add_argument("--trials", type=int, default=150)
    ap.add_argument("--margin", type=float, default=0.01)
    ap.add_argument("--input-shape", default=None, help="CNNs: N,C,H,W (default 1,3,224,224)")
    ap.add_argument("--weights", default=None, help="CNNs: .safetensors weights")
    ap.add_argument("--calib", default=None, help="calibration data (text file; .npy/.pt images for CNNs)")
    ap.add_argument("--n-calib", type=int, default=128, help="calibration samples for the proxy")
    ap.add_argument("--n-heldout", type=int, default=64, help="held-out samples for the end-to-end score")
    ap.add_argument("--profile-budget-s", type=float, default=None, help="timing budget if profiling is needed")
    ap.add_argument("--run", default=None, help="run directory (default runs/bench_targets_<model>)")
    ap.add_argument("-o", "--output", default=None)
    a = ap.parse_args()
    targets = tuple(float(t) for t in a.targets.split(","))
    name = Path(a.model.replace(":", "_")).name
    run = a.run or f"runs/bench_targets_{name}"
    shape = parse_input_shape(a.input_shape) if a.input_shape else None
    table, t_profile = a.table, None
    try:
        if table is None:  # the table search would use, or a fresh profile of this machine
            found, local = find_table(load_adapter(a.model, weights=a.weights, input_shape=shape))
            table = str(found or local)
            if found is None:
                t0 = time.perf_counter()
                run_profile(a.model, weights=a.weights, input_shape=shape, out=table, progress=False,
                            budget_s=a.profile_budget_s)
                t_profile = round(time.perf_counter() - t0, 1)
                print(f"profiled {a.model} in {t_profile:.0f} s -> {table}")
        t0 = time.perf_counter()
        run_search(SearchRequest(model=a.model, table=table, targets=targets, proxy=a.proxy, trials=a.trials,
                                 margin=a.margin, out=run, calib=a.calib, n_calib=a.n_calib, n_heldout=a.n_heldout,
                                 weights=a.weights, input_shape=shape), log=print, progress=False)
    except HwpruneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t_search = time.perf_counter() - t0
    manifests = run_export(run, pick="targets", progress=False, rounds=7, repeats=20)
    rows = []
    for m in sorted(manifests, key=lambda m: m["target_speedup"]):
        ok = m["measured_speedup"] >= 0.97 * m["target_speedup"]
        rows.append({k: m.get(k) for k in ("target_speedup", "predicted_ms", "measured_ms", "dense_measured_ms",
                                           "predicted_speedup", "measured_speedup", "prediction_error_pct", "dense_drift_pct",
                                           "prediction_error_drift_adjusted_pct",
                                           "parity_max_abs_diff", "params", "dense_params", "flops", "dense_flops")}
                    | {"key": m["key"], "cosine": (m.get("scores") or {}).get("cosine"), "meets_0.97": ok})
        print(f"{m['target_speedup']:g}x: measured {m['measured_speedup']:.3f}x (pred {m['predicted_speedup']:.3f}x) "
              f"cosine {rows[-1]['cosine']}  {'OK' if ok else 'MISS'}")
    settings = manifests[0]["settings"] if manifests else {}
    out = a.output or f"bench_out/targets_{name}.json"
    write_result(out, {"model": a.model, "input_shape": list(shape) if shape else None, "proxy": a.proxy,
                       "trials": a.trials, "table": table, "profile_seconds": t_profile,
                       "search_seconds": round(t_search, 1),
                       "machine": machine(settings.get("runtime", "ort-cpu"), threads=settings.get("threads", 1),
                                          batch=settings.get("batch", 1), seq=settings.get("seq", 128)),
                       "results": rows, "all_meet_0.97": all(r["meets_0.97"] for r in rows)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
