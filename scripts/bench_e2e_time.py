"""Wall time of the whole user flow — profile, search (two targets), export — through the real CLI.

    python scripts/bench_e2e_time.py --model smollm2 --targets 1.5,2 -o bench_out/e2e_time_smollm2.json

Runs, each as its own ``hwprune`` process exactly as a user types it (``--no-progress``):

1. ``hwprune profile --model M --seq S -o WORK/table.parquet``
2. ``hwprune search --model M --table WORK/table.parquet --targets T --export -o WORK/run``

and records each stage's wall time (search and export are one command; their split comes from the
run's files: ``picks.json`` is written when the search ends), the machine's load average before and
after (other jobs on a shared machine stretch every figure), the picks' measured speedups against
their targets (from ``manifest.json``) and whether the total met the goal (issue 8: under 20 minutes on
2 cores for SmolLM2). ``WORK`` is a fresh temporary folder unless ``--work`` names one (kept then).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import fail, machine, write_result

from hwprune.errors import HwpruneError
from hwprune.latency.pages import reexec_for_timing


def _hwprune(args: list[str], log: Path) -> float:
    """Run ``hwprune ARGS`` (this interpreter's), output appended to ``log``; wall seconds."""
    cmd = [sys.executable, "-m", "hwprune", *args]
    t0 = time.perf_counter()
    with log.open("a") as fh:
        fh.write("$ hwprune " + " ".join(args) + "\n")
        fh.flush()
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, check=False).returncode
    if rc != 0:
        tail = log.read_text().strip().splitlines()[-1:]
        raise HwpruneError(f"`hwprune {args[0]}` exited with {rc}: {' '.join(tail)} (full output in {log})")
    return time.perf_counter() - t0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", help="a model hwprune knows (default smollm2)")
    p.add_argument("--targets", default="1.5,2", help="comma-separated target speedups")
    p.add_argument("--seq", type=int, default=256, help="prompt length the table is profiled for")
    p.add_argument("--goal-min", type=float, default=20.0, help="the time goal in minutes")
    p.add_argument("--work", default=None, help="folder for the table and run (default: a temporary one, removed)")
    p.add_argument("-o", "--out", default=None, help="JSON result (default bench_out/e2e_time_<model>.json)")
    args = p.parse_args(argv)
    try:
        return _run(args, argv)
    except HwpruneError as e:
        return fail(e)


def _run(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="hwprune-e2e-"))
    work.mkdir(parents=True, exist_ok=True)
    log = work / "commands.log"
    table, run = work / "table.parquet", work / "run"
    load_before = os.getloadavg()
    t_profile = _hwprune(
        ["profile", "--model", args.model, "--seq", str(args.seq), "-o", str(table), "--no-progress"], log
    )
    t0 = time.time()
    t_search_export = _hwprune(
        ["search", "--model", args.model, "--table", str(table), "--targets", args.targets,
         "--export", "-o", str(run), "--no-progress"],
        log,
    )  # fmt: skip
    load_after = os.getloadavg()
    picks_written = (run / "picks.json").stat().st_mtime
    t_search = picks_written - t0
    manifests = sorted(run.glob("candidates/*/manifest.json"))
    picks = []
    for m in manifests:
        doc = json.loads(m.read_text())
        picks.append(
            {"candidate": m.parent.name}
            | {
                k: doc.get(k)
                for k in (
                    "target_speedup",
                    "measured_speedup",
                    "predicted_ms",
                    "measured_ms",
                    "prediction_error_pct",
                    "speedup_error_pct",
                    "dense_prediction_error_pct",
                    "dense_control_pct",
                )
            }
        )
    total = t_profile + t_search_export
    result: dict[str, Any] = {
        "model": args.model,
        "targets": [float(t) for t in args.targets.split(",")],
        "seq": args.seq,
        "seconds": {
            "profile": round(t_profile, 1),
            "search": round(t_search, 1),
            "export": round(t_search_export - t_search, 1),
            "total": round(total, 1),
        },
        "goal": f"profile + search + export under {args.goal_min:g} minutes",
        "goal_met": total <= 60 * args.goal_min,
        "cpus": os.cpu_count(),
        "load_average_before": [round(v, 2) for v in load_before],
        "load_average_after": [round(v, 2) for v in load_after],
        "picks": picks,
        "work": str(work) if args.work else None,
    }
    out = args.out or f"bench_out/e2e_time_{args.model}.json"
    write_result(out, result, script=__file__, argv=argv, machine_facts=machine(seq=args.seq))
    print(
        f"profile {t_profile / 60:.1f} min + search {t_search / 60:.1f} min + export "
        f"{(t_search_export - t_search) / 60:.1f} min = {total / 60:.1f} min "
        f"(goal {args.goal_min:g}: {'met' if result['goal_met'] else 'NOT met'})"
    )
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    reexec_for_timing()  # huge pages: identical sessions time alike (hwprune.latency.pages)
    raise SystemExit(main())
