"""Does an ONNX Runtime session's speed depend on when it was created? N sessions of one graph, interleaved.

    python scripts/bench_session_order.py --model smollm2 --sessions 6 --before none \\
        -o bench_out/session_order_smollm2.json

For LLM families (the dense model's one-step decode graph, one new token after ``--context`` cached
positions). In a fresh process, ``--sessions`` sessions of the *same* graph are created one after the
other, then timed in shuffled interleaved rounds (``--per-round`` consecutive calls each) for
``--seconds``. Identical sessions should time alike; the report gives each session's median in creation
order, the spread (slowest over fastest) and the last against the first. ``--before`` sets what happens
first: ``none``; ``keep`` creates ``--extra`` sessions of the same graph, runs them and keeps them alive
(untimed); ``drop`` creates, runs and frees them (their memory is then reused); ``ballast`` allocates
and touches ``--ballast-gb`` of plain memory and keeps it. Every mode runs in its own new process, so
several modes (``--before none,keep,drop``) compare like with like. The dense-vs-dense control of every
benchmark is the same question asked with two sessions.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import OUT_DIR, fail, in_fresh_process, machine, stem, write_result

from hwprune.api import load_adapter
from hwprune.errors import HwpruneError
from hwprune.export.workload_timing import decode_graph, step_runners
from hwprune.latency import get_backend
from hwprune.latency.backends import interleave
from hwprune.latency.pages import page_mode, reexec_for_timing

__all__ = ["main", "time_sessions", "MODES"]

MODES = ("none", "keep", "drop", "ballast")


def time_sessions(
    model: str, mode: str, sessions: int, extra: int, ballast_gb: float, context: int, seconds: float, per_round: int
) -> dict[str, Any]:
    """In this process: ``mode`` first, then ``sessions`` sessions of the dense decode graph, interleaved
    (plain positional arguments: what a new process is handed)."""
    adapter = load_adapter(model)
    backend = get_backend("ort-cpu", threads=1)
    graph = decode_graph(adapter, adapter.dense())
    held: list[Any] = []
    if mode in ("keep", "drop"):
        held = [step_runners(backend, graph, [context], 1)[0] for _ in range(extra)]
        for r in held:
            r.sample(2)
        if mode == "drop":
            held = []
            gc.collect()
    elif mode == "ballast":
        held = [np.ones(int(ballast_gb * 2**30) // 8)]  # written, so every page is resident
    runners = [step_runners(backend, graph, [context], 1)[0] for _ in range(sessions)]
    ts = interleave(runners, seconds=seconds, per_round=per_round, min_rounds=3, warmup=2)
    ms = [t.median_ms for t in ts]
    del runners, held
    return {
        "before": mode,
        "ms": ms,
        "spread_pct": round(100 * (max(ms) / min(ms) - 1), 3),
        "last_vs_first_pct": round(100 * (ms[-1] / ms[0] - 1), 3),
        "pages": page_mode(),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--sessions", type=int, default=6, help="sessions of the same graph, timed (>= 2)")
    ap.add_argument(
        "--before", default="none", help=f"what happens before they are created, one or several of {','.join(MODES)}"
    )
    ap.add_argument("--extra", type=int, default=3, help="sessions kept or dropped first (--before keep|drop)")
    ap.add_argument("--ballast-gb", type=float, default=2.0, help="memory held first (--before ballast)")
    ap.add_argument("--context", type=int, default=128, help="KV-cache length of the timed decode step")
    ap.add_argument("--seconds", type=float, default=30.0, help="interleaved timing per mode")
    ap.add_argument("--per-round", type=int, default=10, help="consecutive calls per session in a round")
    ap.add_argument("-o", "--out", default=None, help="JSON result (default bench_out/session_order_<model>.json)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    out = Path(a.out) if a.out else OUT_DIR / f"session_order_{stem(a.model)}.json"
    try:
        modes = [m.strip() for m in a.before.split(",") if m.strip()]
        bad = [m for m in modes if m not in MODES]
        if not modes or bad:
            raise HwpruneError(f"--before {a.before!r}: use one or several of {', '.join(MODES)}, comma-separated")
        if a.sessions < 2 or a.extra < 1 or a.ballast_gb <= 0 or a.seconds <= 0 or a.per_round < 1 or a.context < 1:
            raise HwpruneError(
                "--sessions must be >= 2, --extra, --per-round and --context >= 1, --ballast-gb and --seconds > 0"
            )
        load_adapter(a.model)  # a bad --model fails here, in one line, before any process starts
        t0 = time.perf_counter()
        results = []
        for mode in modes:  # each in a new process: none inherits another's memory
            r = in_fresh_process(
                time_sessions, a.model, mode, a.sessions, a.extra, a.ballast_gb, a.context, a.seconds, a.per_round
            )
            results.append(r)
            print(
                f"--before {mode}: {' '.join(f'{x:.2f}' for x in r['ms'])} ms, spread {r['spread_pct']:.1f} %, "
                f"last vs first {r['last_vs_first_pct']:+.1f} %",
                flush=True,
            )
        report = {
            "model": a.model,
            "settings": {
                "runtime": "ort-cpu",
                "threads": 1,
                "context": a.context,
                "sessions": a.sessions,
                "extra": a.extra,
                "ballast_gb": a.ballast_gb,
                "seconds": a.seconds,
                "per_round": a.per_round,
            },
            "results": results,
            "seconds": round(time.perf_counter() - t0, 1),
        }
        write_result(out, report, script=__file__, argv=argv, machine_facts=machine("ort-cpu", threads=1, seq=1))
    except HwpruneError as e:
        return fail(e)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    reexec_for_timing()  # huge pages, as every timing command runs (hwprune.latency.pages)
    sys.exit(main())
