"""Targets benchmark: search + export at several speedups; measured_speedup must reach 0.97 x target.

    python scripts/bench_targets.py --model minilm --targets 1.5,2,3 -o bench_out/targets_minilm.json
    python scripts/bench_targets.py --model resnet50 --trials 60 --n-calib 32 --n-heldout 16
    python scripts/bench_targets.py --model mypkg.nets:build --weights w.safetensors --input-shape 1,3,224,224
    python scripts/bench_targets.py --model smollm2 --regime serve --workload prompt=512,new=128 \
        --table T_prefill_s512.parquet --decode-table T_decode.parquet --targets 1.5 -o bench_out/serve_smollm2.json

The same flow as ``hwprune search --export``, through the same api calls: without ``--table`` the
model is profiled first when no table for it exists yet (``run_profile`` into ``latency_tables/local/``,
the time is reported), then DP + NSGA-II search per target (``run_search``), export (ONNX parity) and
dense vs picks timed interleaved in one process (``run_export``). Each result row is the manifest's
figures: the raw ``prediction_error_pct`` first, the ``speedup_error_pct`` beside it, the dense-vs-dense
``dense_control_pct`` of the same rounds, wall-clock medians beside the thread-CPU ones and the CPU
check (see :mod:`hwprune.export.manifest`); ``clock`` and ``timing`` say how the export measured them
(``manifest["settings"]["clock"]`` and the rounds/repeats/warmup/session order of ``manifest["timings"]``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import OUT_DIR, fail, machine, parse_shape, stem, write_result

from hwprune.api import (
    ExportRequest,
    ProfileRequest,
    SearchRequest,
    find_table,
    load_adapter,
    run_export,
    run_profile,
    run_search,
)
from hwprune.errors import HwpruneError
from hwprune.latency.pages import reexec_for_timing
from hwprune.search import SearchConfig

#: the manifest figures each result row carries (the README's targets tables quote them)
ROW_KEYS = (
    "target_speedup",
    "predicted_ms",
    "measured_ms",
    "dense_measured_ms",
    "predicted_speedup",
    "measured_speedup",
    "prediction_error_pct",
    "speedup_error_pct",
    "dense_prediction_error_pct",
    "dense_control_pct",
    "measured_wall_ms",
    "dense_measured_wall_ms",
    "cpu_excess_pct",
    "warnings",
    "parity_max_abs_diff",
    "params",
    "dense_params",
    "flops",
    "dense_flops",
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--table", default=None, help="latency table (default: the one search would use, or profile)")
    ap.add_argument("--space", default=None, help="pruning space YAML (default: the model's)")
    ap.add_argument("--targets", default="1.5,2,3")
    ap.add_argument("--proxy", default="obs")
    ap.add_argument("--trials", type=int, default=150)
    ap.add_argument("--margin", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--input-shape", default=None, help="for models that take one (CNNs): N,C,H,W (default 1,3,224,224)"
    )
    ap.add_argument("--weights", default=None, help="for models that take them (CNNs): .safetensors weights")
    ap.add_argument("--calib", default=None, help="calibration data (text file; .npy/.pt images for CNNs)")
    ap.add_argument("--n-calib", type=int, default=128, help="calibration samples for the proxy")
    ap.add_argument("--n-heldout", type=int, default=64, help="held-out samples for the end-to-end score")
    ap.add_argument("--profile-budget-s", type=float, default=None, help="timing budget if profiling is needed")
    ap.add_argument("--rounds", type=int, default=7, help="export: interleaved timing rounds")
    ap.add_argument("--repeats", type=int, default=20, help="export: runs per model per round")
    ap.add_argument("--run", default=None, help="run directory (default runs/bench_targets_<model>)")
    ap.add_argument("--regime", default="prefill", help="prefill | decode | serve (as hwprune search --regime)")
    ap.add_argument("--workload", default=None, help="decode/serve: e.g. prompt=512,new=128 (as hwprune search)")
    ap.add_argument("--decode-table", default=None, help="serve: the decode table beside the prefill --table")
    ap.add_argument("-o", "--out", default=None, help="JSON result (default bench_out/targets_<model>.json)")
    return ap.parse_args(argv)


def result_row(m: dict[str, Any]) -> dict[str, Any]:
    """One manifest as a result row: its figures, the pick's cosine, whether it meets 0.97 x target."""
    timings = m.get("timings") or {}
    return {k: m.get(k) for k in ROW_KEYS} | {
        "key": m["key"],
        "cosine": (m.get("scores") or {}).get("cosine"),  # on the selection split, which chose the pick
        # on the report split (texts the search never saw; the built-in corpus's legal domain)
        "report_cosine": ((m.get("extra") or {}).get("report_scores") or {}).get("cosine"),
        "meets_0.97": m["measured_speedup"] >= 0.97 * m["target_speedup"],
        "clock": (m.get("settings") or {}).get("clock"),
        # decode / serve: measured and predicted TTFT, tokens/s and request ms, dense beside
        "workload": {
            k: w[k]
            for k in ("regime", "objective", "measured", "dense_measured", "predicted", "dense_predicted")
            if k in w
        }
        if (w := (m.get("extra") or {}).get("workload"))
        else None,
        "timing": {k: timings[k] for k in ("rounds", "repeats", "warmup", "session_order") if k in timings},
    }


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    name = stem(a.model)
    run = a.run or f"runs/bench_targets_{name}"
    table, t_profile = a.table, None
    try:
        targets = tuple(float(t) for t in a.targets.split(","))
    except ValueError:
        return fail(HwpruneError(f"--targets {a.targets!r} must be comma-separated speedups, e.g. 1.5,2,3"))
    try:
        shape = parse_shape(a.input_shape)
        config = SearchConfig(targets=targets, trials=a.trials, margin=a.margin, seed=a.seed)
        if table is None and a.regime != "prefill":
            raise HwpruneError(f"--regime {a.regime} needs --table (and --decode-table for serve): profile them first")
        if table is None:  # the table search would use, or a fresh profile of this machine
            found, local = find_table(load_adapter(a.model, weights=a.weights, input_shape=shape))
            table = str(found or local)
            if found is None:
                t0 = time.perf_counter()
                run_profile(
                    ProfileRequest(
                        model=a.model,
                        weights=a.weights,
                        input_shape=shape,
                        space=a.space,
                        out=table,
                        budget_s=a.profile_budget_s,
                    ),
                    progress=False,
                )
                t_profile = round(time.perf_counter() - t0, 1)
                print(f"profiled {a.model} in {t_profile:.0f} s -> {table}")
        t0 = time.perf_counter()
        run_search(
            SearchRequest(
                model=a.model,
                table=table,
                proxy=a.proxy,
                calib=a.calib,
                space=a.space,
                n_calib=a.n_calib,
                n_heldout=a.n_heldout,
                out=run,
                weights=a.weights,
                input_shape=shape,
                search=config,
                regime=a.regime,
                workload=a.workload,
                decode_table=a.decode_table,
            ),
            log=print,
            progress=False,
        )
        t_search = time.perf_counter() - t0
        manifests = run_export(
            ExportRequest(run=run, pick="targets", rounds=a.rounds, repeats=a.repeats), progress=False
        )
        rows = [result_row(m) for m in sorted(manifests, key=lambda m: m["target_speedup"])]
        settings = manifests[0]["settings"] if manifests else {}
        facts = machine(
            settings.get("runtime", "ort-cpu"),
            threads=int(settings.get("threads", 1)),
            batch=int(settings.get("batch", 1)),
            seq=int(settings.get("seq", 128)),
        )
    except HwpruneError as e:
        return fail(e)
    for r in rows:
        print(
            f"{r['target_speedup']:g}x: measured {r['measured_speedup']:.3f}x (pred {r['predicted_speedup']:.3f}x) "
            f"raw error {r['prediction_error_pct']:+.1f}%  control {r['dense_control_pct']:+.2f}%  "
            f"cosine {r['cosine']} (report {r['report_cosine']})  {'OK' if r['meets_0.97'] else 'MISS'}"
        )
        for w in r["warnings"]:
            print(f"warning: {w}", file=sys.stderr)
    write_result(
        a.out or OUT_DIR / f"targets_{name}.json",
        {
            "model": a.model,
            "input_shape": list(shape) if shape else None,
            "proxy": a.proxy,
            "trials": a.trials,
            "regime": a.regime,
            "workload": a.workload,
            "table": table,
            "decode_table": a.decode_table,
            "run": run,
            "profile_seconds": t_profile,
            "search_seconds": round(t_search, 1),
            "results": rows,
            "all_meet_0.97": all(r["meets_0.97"] for r in rows),
        },
        script=__file__,
        argv=argv,
        machine_facts=facts,
    )
    return 0


if __name__ == "__main__":
    reexec_for_timing()  # huge pages: identical sessions time alike (hwprune.latency.pages)
    sys.exit(main())
