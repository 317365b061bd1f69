"""Normal-use protocol with the closed loop: raw prediction error before and after ``hwprune calibrate``.

    python scripts/bench_closed_loop.py --model minilm --targets 1.5,2 --trials 10 --n-calib 32 --n-heldout 16

Each step is its own ``hwprune`` process, as a user would run them one after another:

1. ``hwprune profile --model M -o WORK/table.parquet`` (a fresh table, with its context factor);
2. ``hwprune search --table WORK/table.parquet --targets ... --export -o WORK/run1`` (fresh profile alone);
3. ``hwprune calibrate WORK/run1`` (fits measured = scale x predicted + offset over run1's exports);
4. ``hwprune search ... --seed SEED+1 --export -o WORK/run2`` (the search now predicts with the correction;
   another seed so that run2's picks are not run1's candidates measured again).

Per pick the result carries the manifest's raw ``prediction_error_pct`` (the headline), the
``speedup_error_pct`` beside it, the dense-vs-dense control, and for run2 also the raw error the
uncorrected prediction would have had (``base_predicted_ms``, the table times its context factor):
the same measurement judged with and without the correction.
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

from _common import OUT_DIR, fail, machine, stem, write_result

from hwprune.errors import HwpruneError
from hwprune.latency.pages import reexec_for_timing


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--space", default=None, help="pruning space YAML (default: the model's)")
    ap.add_argument("--targets", default="1.5,2")
    ap.add_argument("--calib", default=None, help="calibration data (default: the family's built-in)")
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--n-calib", type=int, default=32)
    ap.add_argument("--n-heldout", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0, help="run1's seed; run2 uses seed + 1")
    ap.add_argument("--profile-budget-s", type=float, default=None, help="profile timing budget (default: family's)")
    ap.add_argument("--work", default=None, help="folder for the table and runs (default runs/closed_loop_<model>)")
    ap.add_argument("-o", "--out", default=None, help="JSON result (default bench_out/closed_loop_<model>.json)")
    return ap.parse_args(argv)


def hwprune(*args: object) -> float:
    """Run ``hwprune ARGS`` in a new process; its output streams through; returns the seconds it took."""
    cmd = [sys.executable, "-m", "hwprune", *(str(a) for a in args)]
    print("$ hwprune " + " ".join(str(a) for a in args), flush=True)
    t0 = time.perf_counter()
    done = subprocess.run(cmd, check=False)
    if done.returncode != 0:
        raise HwpruneError(f"hwprune {args[0]} exited with status {done.returncode} (its error is above)")
    return round(time.perf_counter() - t0, 1)


def rows(run: Path) -> list[dict[str, Any]]:
    """The exported picks of ``run`` as result rows, by target."""
    doc = json.loads((run / "exports.json").read_text())
    out = []
    for m in sorted(doc["manifests"], key=lambda m: m["target_speedup"] or 0):
        base = m.get("base_predicted_ms")
        corr = (m.get("latency_model") or {}).get("correction")
        out.append(
            {
                "target_speedup": m["target_speedup"],
                "key": m["key"],
                "predicted_ms": m["predicted_ms"],
                "measured_ms": m["measured_ms"],
                "prediction_error_pct": m["prediction_error_pct"],
                "speedup_error_pct": m["speedup_error_pct"],
                "measured_speedup": m["measured_speedup"],
                "dense_predicted_ms": m["dense_predicted_ms"],
                "dense_measured_ms": m["dense_measured_ms"],
                "dense_prediction_error_pct": m["dense_prediction_error_pct"],
                "dense_control_pct": m["dense_control_pct"],
                "base_predicted_ms": base,
                "uncorrected_prediction_error_pct": None
                if base is None
                else 100 * (base - m["measured_ms"]) / m["measured_ms"],
                "context_factor": (m.get("latency_model") or {}).get("context_factor"),
                "correction": None
                if corr is None
                else {k: corr[k] for k in ("version", "scale", "offset_ms", "residual_rms_ms", "n_points")},
                "warnings": m.get("warnings", []),
            }
        )
    return out


def worst(rs: list[dict[str, Any]], key: str) -> float | None:
    vals = [abs(r[key]) for r in rs if r.get(key) is not None]
    return round(max(vals), 3) if vals else None


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    name = stem(a.model)
    work = Path(a.work or f"runs/closed_loop_{name}")
    table = work / "table.parquet"
    space = ["--space", a.space] if a.space else []
    calib = ["--calib", a.calib] if a.calib else []
    search = ["--model", a.model, *space, *calib, "--table", table, "--targets", a.targets, "--trials", a.trials,
              "--n-calib", a.n_calib, "--n-heldout", a.n_heldout, "--export", "--no-progress", "--fresh"]  # fmt: skip
    seconds: dict[str, float] = {}
    try:
        budget = ["--budget-s", a.profile_budget_s] if a.profile_budget_s else []
        seconds["profile"] = hwprune("profile", "--model", a.model, *space, *budget, "-o", table, "--no-progress")
        seconds["search_export_run1"] = hwprune("search", *search, "--seed", a.seed, "-o", work / "run1")
        seconds["calibrate"] = hwprune("calibrate", work / "run1")
        seconds["search_export_run2"] = hwprune("search", *search, "--seed", a.seed + 1, "-o", work / "run2")
        run1, run2 = rows(work / "run1"), rows(work / "run2")
        side = json.loads(table.with_suffix(".json").read_text())
        correction = json.loads((work / "table.correction.json").read_text())
    except HwpruneError as e:
        return fail(e)
    for label, rs in (("run1 (fresh profile)", run1), ("run2 (calibrated)", run2)):
        for r in rs:
            unc = r["uncorrected_prediction_error_pct"]
            print(
                f"{label} {r['target_speedup']:g}x: raw error {r['prediction_error_pct']:+.2f}% "
                f"(uncorrected {unc:+.2f}%)  speedup error {r['speedup_error_pct']:+.2f}%  "
                f"measured {r['measured_speedup']:.3f}x  control {r['dense_control_pct']:+.2f}%"
            )
    settings = side.get("settings", {})
    write_result(
        a.out or OUT_DIR / f"closed_loop_{name}.json",
        {
            "model": a.model,
            "targets": a.targets,
            "trials": a.trials,
            "n_calib": a.n_calib,
            "n_heldout": a.n_heldout,
            "seeds": [a.seed, a.seed + 1],
            "work": str(work),
            "seconds": seconds,
            "context": (side.get("meta") or {}).get("context"),
            "correction": {k: v for k, v in correction.items() if k not in ("fingerprint", "previous")},
            "run1_fresh_profile": run1,
            "run2_after_calibrate": run2,
            "worst_abs_raw_error_pct": {
                "run1_fresh_profile": worst(run1, "prediction_error_pct"),
                "run2_after_calibrate": worst(run2, "prediction_error_pct"),
                "run2_without_the_correction": worst(run2, "uncorrected_prediction_error_pct"),
            },
            "worst_abs_speedup_error_pct": {
                "run1_fresh_profile": worst(run1, "speedup_error_pct"),
                "run2_after_calibrate": worst(run2, "speedup_error_pct"),
            },
        },
        script=__file__,
        argv=argv,
        machine_facts=machine(
            settings.get("runtime", "ort-cpu"),
            threads=int(settings.get("threads", 1)),
            batch=int(settings.get("batch", 1)),
            seq=int(settings.get("seq", 128)),
        ),
    )
    return 0


if __name__ == "__main__":
    reexec_for_timing()  # huge pages: identical sessions time alike (hwprune.latency.pages)
    sys.exit(main())
