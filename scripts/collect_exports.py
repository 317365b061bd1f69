"""One JSON for bench_out/ from an exported run: every candidate's predicted vs measured figures.

    hwprune profile --model smollm2 --regime decode --context 128,512,1024 -o T_decode.parquet
    hwprune search --model smollm2 --table T_decode.parquet --regime decode --workload prompt=64,new=128 \\
        --targets 1.5,2 --export -o RUN
    python scripts/collect_exports.py RUN --step "hwprune profile ..." --step "hwprune search ..." \\
        -o bench_out/decode_targets_smollm2.json

Reads ``RUN/exports.json`` (written by ``hwprune export``) and keeps, per candidate: the target, the
raw prediction error (the headline) and the speedup error beside it, predicted and measured ms of the
candidate and of the dense model timed in the same process, the dense-vs-dense control, the host check,
the workload (TTFT, tokens/s, request ms) for decode and serve runs, the report-split scores and the
kept shapes. ``--step`` records the commands that made the run (the result's ``steps``), since this
script only reads what they wrote. Nothing is measured here.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import OUT_DIR, fail, machine, write_result

from hwprune._io import read_json
from hwprune.errors import HwpruneError

KEEP = (
    "target_speedup",
    "prediction_error_pct",
    "speedup_error_pct",
    "predicted_ms",
    "measured_ms",
    "dense_predicted_ms",
    "dense_measured_ms",
    "predicted_speedup",
    "measured_speedup",
    "dense_control_pct",
    "warnings",
    "params",
    "dense_params",
)


def candidate_row(m: dict[str, Any]) -> dict[str, Any]:
    """The figures of one manifest that a benchmark states."""
    extra = m.get("extra", {})
    plan = m.get("plan", {})
    row: dict[str, Any] = {"key": extra.get("key", m.get("key"))}
    row |= {k: m.get(k) for k in KEEP}
    row["within_target"] = (
        m["measured_speedup"] / m["target_speedup"] if m.get("target_speedup") and m.get("measured_speedup") else None
    )
    row["host_check"] = m.get("timings", {}).get("host_check") or extra.get("workload", {}).get("host_check")
    if "workload" in extra:
        w = extra["workload"]
        row["workload"] = {k: w.get(k) for k in ("regime", "objective", "prompt", "new", "batch")}
        row["workload"] |= {k: w.get(k) for k in ("measured", "dense_measured", "predicted", "dense_predicted")}
    row["report_scores"] = extra.get("report_scores")
    row["selection_scores"] = m.get("scores")
    row["shape"] = {k: plan.get(k) for k in ("kv_groups", "ffn", "removed_blocks") if k in plan} or plan.get("sizes")
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a run folder that hwprune export has written to (RUN/exports.json)")
    ap.add_argument("--step", action="append", default=[], help="a command that made the run (repeatable)")
    ap.add_argument("-o", "--out", help="JSON result (default bench_out/exports_<run>.json)")
    a = ap.parse_args(argv)
    run = Path(a.run)
    try:
        if not (run / "exports.json").is_file():
            raise HwpruneError(f"{run} has no exports.json; run `hwprune export {run}` first")
        try:
            doc = read_json(run / "exports.json")
            manifests = list(doc["manifests"])
        except (ValueError, KeyError, TypeError, OSError):
            raise HwpruneError(f"{run / 'exports.json'} is corrupt; run `hwprune export {run}` again") from None
        if not manifests:
            raise HwpruneError(f"{run / 'exports.json'} lists no candidate; export at least one")
        rows = [candidate_row(m) for m in manifests]
        s = manifests[0].get("settings", {})
        facts = machine(str(s.get("runtime", "ort-cpu")), threads=int(s.get("threads", 1)))
    except HwpruneError as e:
        return fail(e)
    result = {"steps": a.step, "run": str(run), "pick": doc.get("pick"), "candidates": rows}
    write_result(a.out or OUT_DIR / f"exports_{run.name}.json", result, script=__file__, argv=argv, machine_facts=facts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
