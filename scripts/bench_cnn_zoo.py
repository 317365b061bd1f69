"""Torchvision CNNs nobody profiled by hand: normal-use profile, then search + export at a target speedup.

    python scripts/bench_cnn_zoo.py --models mobilenet_v3_large,efficientnet_b0 --target 2
    python scripts/bench_cnn_zoo.py -o bench_out/cnn_zoo.json        # every model in MODELS (~1 h on 2 cores)

What a new user runs, per model, each step its own ``hwprune`` process one after another (the table is
made first; search and export come later, in another process):

1. ``hwprune profile --model torchvision.models:NAME --input-shape 1,3,224,224 --budget-s B -o T``
2. ``hwprune search --model ... --table T --target-speedup 2 --trials N --export -o RUN``

Weights are random (torchvision builds them; nothing is downloaded), one ONNX Runtime thread. Per model
the result holds: the dense model's prediction against its export-time measurement (the table's block
sum, its context factor, and ``dense_prediction_error_pct`` from the manifest), and per pick the raw
``prediction_error_pct`` (the headline), the ``speedup_error_pct``, the measured speedup against the
target, the dense-vs-dense control of the same rounds, wall-clock medians beside the thread-CPU ones,
and whether the pick meets the issue's bars: measured speedup in [0.97, 1.10] x target and raw error
within +-5 %. A model that fails (the dependency graph cannot trace it, a layer hwprune cannot cut) is
recorded with its error and the benchmark goes on.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import OUT_DIR, fail, write_result

from hwprune.errors import HwpruneError
from hwprune.latency.pages import reexec_for_timing

#: torchvision classification models that torch-pruning's dependency graph handles, outside the four
#: named ones (resnet18, resnet50, mobilenet_v2, vgg16_bn); cheapest first
MODELS = (
    "shufflenet_v2_x1_0",  # torch-pruning cannot trace it here (recorded as an error)
    "mobilenet_v3_small",
    "mnasnet1_0",
    "regnet_x_400mf",
    "mobilenet_v3_large",
    "efficientnet_b0",
    "regnet_y_400mf",
    "resnet34",
    "densenet121",
)
SPEEDUP_BAND = (0.97, 1.10)  # measured speedup / target, the bar
RAW_TOL_PCT = 5.0

PICK_KEYS = (
    "target_speedup",
    "predicted_ms",
    "base_predicted_ms",
    "measured_ms",
    "dense_measured_ms",
    "dense_predicted_ms",
    "predicted_speedup",
    "measured_speedup",
    "prediction_error_pct",
    "speedup_error_pct",
    "dense_prediction_error_pct",
    "dense_control_pct",
    "measured_wall_ms",
    "dense_measured_wall_ms",
    "cpu_excess_pct",
    "params",
    "dense_params",
    "warnings",
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated torchvision.models names")
    ap.add_argument("--target", type=float, default=2.0)
    ap.add_argument("--input-shape", default="1,3,224,224")
    ap.add_argument("--profile-budget-s", type=float, default=40.0, help="profile timing budget per model")
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument(
        "--proxy", default="magnitude", help="accuracy proxy (default magnitude: cheap; this bench checks latency)"
    )
    ap.add_argument("--n-calib", type=int, default=8)
    ap.add_argument("--n-heldout", type=int, default=16)
    ap.add_argument("--work", default="runs/cnn_zoo", help="folder for tables and runs")
    ap.add_argument("--reuse-tables", action="store_true", help="skip profiling where WORK/NAME/table.parquet exists")
    ap.add_argument("-o", "--out", default=None, help="JSON result (default bench_out/cnn_zoo.json)")
    return ap.parse_args(argv)


def hwprune(*args: object, log: Path) -> float:
    """``hwprune ARGS`` in a new process (output appended to ``log``); the seconds it took."""
    cmd = [sys.executable, "-m", "hwprune", *(str(a) for a in args)]
    print("$ hwprune " + " ".join(str(a) for a in args), flush=True)
    t0 = time.perf_counter()
    with log.open("a") as f:
        f.write("$ hwprune " + " ".join(str(a) for a in args) + "\n")
        f.flush()
        done = subprocess.run(cmd, check=False, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = log.read_text().strip().splitlines()[-1:] or [""]
        raise HwpruneError(f"hwprune {args[0]} exited with status {done.returncode}: {tail[0]}")
    return round(time.perf_counter() - t0, 1)


def pick_row(m: dict[str, Any], key: str) -> dict[str, Any]:
    row = {k: m.get(k) for k in PICK_KEYS}
    ratio = m["measured_speedup"] / m["target_speedup"]
    row["key"] = key
    row["speedup_over_target"] = round(ratio, 4)
    row["in_speedup_band"] = SPEEDUP_BAND[0] <= ratio <= SPEEDUP_BAND[1]
    row["raw_within_5pct"] = abs(m["prediction_error_pct"]) <= RAW_TOL_PCT
    row["cosine"] = (m.get("scores") or {}).get("cosine")
    return row


def run_model(name: str, a: argparse.Namespace) -> dict[str, Any]:
    work = Path(a.work) / name
    work.mkdir(parents=True, exist_ok=True)
    log = work / "log.txt"
    model = f"torchvision.models:{name}"
    common = ("--model", model, "--input-shape", a.input_shape)
    table = work / "table.parquet"
    out: dict[str, Any] = {"model": model, "log": str(log)}
    if not (a.reuse_tables and table.exists()):
        out["profile_s"] = hwprune("profile", *common, "--budget-s", a.profile_budget_s, "-o", table, log=log)
    meta = json.loads(table.with_suffix(".json").read_text())
    ctx = (meta.get("meta") or meta).get("context") or {}
    out["table"] = str(table)
    out["context"] = {k: ctx.get(k) for k in ("factor", "dense_measured_ms", "dense_predicted_ms", "dense_control_pct")}
    run = work / "run"
    out["search_export_s"] = hwprune(
        "search",
        *common,
        "--table",
        table,
        "--target-speedup",
        a.target,
        "--trials",
        a.trials,
        "--proxy",
        a.proxy,
        "--n-calib",
        a.n_calib,
        "--n-heldout",
        a.n_heldout,
        "--fresh",
        "--export",
        "-o",
        run,
        log=log,
    )
    manifests = {p.parent.name: json.loads(p.read_text()) for p in sorted(run.glob("candidates/*/manifest.json"))}
    picks = [pick_row(m, k) for k, m in manifests.items() if m.get("target_speedup") is not None]
    if not picks:
        raise HwpruneError(f"{run}: export wrote no manifest for a target")
    out["picks"] = picks
    return out


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    names = [n.strip() for n in a.models.split(",") if n.strip()]
    if not names:
        return fail(HwpruneError("--models is empty; name torchvision models, e.g. mobilenet_v3_large"))
    results = []
    for name in names:
        t0 = time.perf_counter()
        try:
            r = run_model(name, a)
        except HwpruneError as e:
            print(f"{name}: FAILED {e}", file=sys.stderr)
            r = {"model": f"torchvision.models:{name}", "error": str(e)}
        r["seconds"] = round(time.perf_counter() - t0, 1)
        results.append(r)
        for p in r.get("picks", []):
            print(
                f"{name}: {p['target_speedup']:g}x measured {p['measured_speedup']:.3f}x "
                f"(pred {p['predicted_speedup']:.3f}x) raw error {p['prediction_error_pct']:+.1f}% "
                f"dense raw {p['dense_prediction_error_pct']:+.1f}% control {p['dense_control_pct']:+.2f}% "
                f"{'OK' if p['in_speedup_band'] and p['raw_within_5pct'] else 'MISS'}",
                flush=True,
            )
        # written after every model, so a long run stopped early still leaves its figures
        write(a, argv, results, done=len(results) == len(names), n_models=len(names))
    return 0


def write(
    a: argparse.Namespace, argv: list[str] | None, results: list[dict[str, Any]], *, done: bool, n_models: int
) -> None:
    picks = [p for r in results for p in r.get("picks", [])]
    summary = {
        "models": n_models,
        "models_run": len(results),
        "finished": done,
        "models_ok": sum(1 for r in results if "picks" in r),
        "picks": len(picks),
        "picks_in_speedup_band": sum(p["in_speedup_band"] for p in picks),
        "picks_raw_within_5pct": sum(p["raw_within_5pct"] for p in picks),
        "raw_error_abs_max_pct": max((abs(p["prediction_error_pct"]) for p in picks), default=None),
        "raw_error_mean_abs_pct": (sum(abs(p["prediction_error_pct"]) for p in picks) / len(picks)) if picks else None,
        "dense_error_abs_max_pct": max((abs(p["dense_prediction_error_pct"]) for p in picks), default=None),
        "control_abs_max_pct": max((abs(p["dense_control_pct"]) for p in picks), default=None),
    }
    write_result(
        a.out or OUT_DIR / "cnn_zoo.json",
        {
            "target": a.target,
            "input_shape": a.input_shape,
            "profile_budget_s": a.profile_budget_s,
            "trials": a.trials,
            "proxy": a.proxy,
            "n_calib": a.n_calib,
            "n_heldout": a.n_heldout,
            "bars": {"speedup_over_target": list(SPEEDUP_BAND), "raw_error_pct": RAW_TOL_PCT},
            "summary": summary,
            "results": results,
        },
        script=__file__,
        argv=argv,
    )


if __name__ == "__main__":
    reexec_for_timing()  # huge pages: identical sessions time alike (hwprune.latency.pages)
    sys.exit(main())
