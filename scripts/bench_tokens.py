"""Tokens/s benchmark: the dense model and every exported candidate of a run, at several thread counts.

    python scripts/bench_tokens.py RUN --workload prompt=64,new=128 --threads 1,2 -o bench_out/tokens_smollm2.json

For each thread count, the dense model's and each candidate's ``decoder.onnx`` (the run's exported
candidates, ``RUN/candidates/*/``) are timed together in one process, interleaved
(:func:`hwprune.export.workload_timing.measure_workload`): time to first token (the prompt with an
empty KV cache), one new token after the request's first, middle and last context, the mean decode
step over the request, tokens/s (batch / mean step) and the request latency. Rows state each
candidate's speedup over the dense model timed in the same rounds. Clock: thread CPU time with one
thread, wall time with more (``Backend.clock``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import OUT_DIR, fail, machine, write_result

from hwprune.errors import HwpruneError
from hwprune.latency.pages import reexec_for_timing


def _ints(s: str) -> list[int]:
    try:
        vals = [int(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise HwpruneError(f"--threads {s!r} must be comma-separated integers, e.g. 1,2") from None
    if not vals or min(vals) < 1:
        raise HwpruneError(f"--threads {s!r} must be positive integers, e.g. 1,2")
    return vals


def run(run_dir: Path, workload: str, threads: list[int], *, rounds: int, repeats: int) -> dict[str, Any]:
    from hwprune.api import SearchRequest, _read_run, load_adapter
    from hwprune.export.manifest import read_manifest
    from hwprune.export.measure import DENSE
    from hwprune.export.workload_timing import measure_workload
    from hwprune.latency import get_backend
    from hwprune.search.workload import Workload

    wl = Workload.parse(workload)
    sreq = SearchRequest.from_json(_read_run(run_dir)["request"])
    folders = sorted(p for p in (run_dir / "candidates").glob("*") if (p / "manifest.json").is_file())
    graphs: dict[str, bytes] = {}
    for f in folders:
        g = read_manifest(f).get("graphs", {}).get("decode")
        if g and (f / g["file"]).is_file():
            graphs[f.name] = (f / g["file"]).read_bytes()
    if not graphs:
        raise HwpruneError(f"{run_dir} has no exported candidate with a decode graph; run hwprune export {run_dir}")
    adapter = load_adapter(sreq.model, weights=sreq.weights, input_shape=sreq.input_shape)
    dense = next(g.onnx for g in adapter.extra_graphs(adapter.dense()) if g.role == "decode")
    rows = []
    for t in threads:
        backend = get_backend("ort-cpu", threads=t)
        got = measure_workload(backend, {DENSE: dense, **graphs}, wl, rounds=rounds, repeats=repeats)
        for key, m in got.items():
            rows.append(
                {
                    "threads": t,
                    "model": key,
                    **m,
                    "tokens_per_s_speedup": m["tokens_per_s"] / got[DENSE]["tokens_per_s"],
                    "request_speedup": got[DENSE]["request_ms"] / m["request_ms"],
                }
            )
    return {"run": str(run_dir), "model": sreq.model, "workload": wl.to_json(), "rows": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="A run folder with exported decoder candidates (hwprune search --export).")
    ap.add_argument("--workload", default="prompt=64,new=128", help="prompt=P,new=N,batch=B (default %(default)s).")
    ap.add_argument("--threads", default="1,2", help="ONNX Runtime intra-op thread counts (default %(default)s).")
    ap.add_argument("--rounds", type=int, default=5, help="Interleaved rounds (default %(default)s).")
    ap.add_argument("--repeats", type=int, default=10, help="Calls per graph per round (default %(default)s).")
    ap.add_argument("-o", "--out", type=Path, default=None, help="JSON result (default bench_out/tokens_<run>.json).")
    args = ap.parse_args(argv)
    try:
        threads = _ints(args.threads)
        result = run(args.run, args.workload, threads, rounds=args.rounds, repeats=args.repeats)
    except HwpruneError as e:
        return fail(e)
    out = args.out or OUT_DIR / f"tokens_{args.run.name}.json"
    write_result(out, result, script=__file__, argv=argv, machine_facts=machine(threads=threads[0]))
    return 0


if __name__ == "__main__":
    reexec_for_timing()  # huge pages: identical sessions time alike (hwprune.latency.pages)
    sys.exit(main())
