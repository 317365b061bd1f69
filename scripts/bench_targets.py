"""Targets benchmark: search + export at several speedups; measured_speedup must reach 0.97 x target.

    python scripts/bench_targets.py --model minilm --targets 1.5,2,3 -o bench_out/targets_minilm.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine, write_result  # noqa: E402

from hwprune.api import SearchRequest, run_export, run_search  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--table", default=None)
    ap.add_argument("--targets", default="1.5,2,3")
    ap.add_argument("--proxy", default="obs")
    ap.add_argument("--trials", type=int, default=150)
    ap.add_argument("--margin", type=float, default=0.01)
    ap.add_argument("--run", default=None, help="run directory (default runs/bench_targets_<model>)")
    ap.add_argument("-o", "--output", default=None)
    a = ap.parse_args()
    targets = tuple(float(t) for t in a.targets.split(","))
    run = a.run or f"runs/bench_targets_{Path(a.model).name}"
    t0 = time.perf_counter()
    res = run_search(SearchRequest(model=a.model, table=a.table, targets=targets, proxy=a.proxy, trials=a.trials,
                                   margin=a.margin, out=run), log=print, progress=False)
    t_search = time.perf_counter() - t0
    manifests = run_export(run, pick="targets", progress=False, rounds=7, repeats=20)
    rows = []
    for m in sorted(manifests, key=lambda m: m["target_speedup"]):
        ok = m["measured_speedup"] >= 0.97 * m["target_speedup"]
        rows.append({k: m.get(k) for k in ("target_speedup", "predicted_ms", "measured_ms", "dense_measured_ms",
                                           "predicted_speedup", "measured_speedup", "prediction_error_pct",
                                           "parity_max_abs_diff", "params", "dense_params", "flops", "dense_flops")}
                    | {"key": m["key"], "cosine": (m.get("scores") or {}).get("cosine"), "meets_0.97": ok})
        print(f"{m['target_speedup']:g}x: measured {m['measured_speedup']:.3f}x (pred {m['predicted_speedup']:.3f}x) "
              f"cosine {rows[-1]['cosine']}  {'OK' if ok else 'MISS'}")
    settings = manifests[0]["settings"] if manifests else {}
    out = a.output or f"bench_out/targets_{Path(a.model).name}.json"
    write_result(out, {"model": a.model, "proxy": a.proxy, "trials": a.trials, "search_seconds": round(t_search, 1),
                       "machine": machine(settings.get("runtime", "ort-cpu"), threads=settings.get("threads", 1),
                                          batch=settings.get("batch", 1), seq=settings.get("seq", 128)),
                       "results": rows, "all_meet_0.97": all(r["meets_0.97"] for r in rows)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
