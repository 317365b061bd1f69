"""Does a timing process slow down as it ages? The same chunk of decode subnets, timed again and again.

    python scripts/bench_process_age.py --model smollm2 --repeats 4 --seconds 30 \\
        -o bench_out/process_age_smollm2.json

For LLM families (decode graphs). The dense model and ``--subnets`` subnets drawn as
``bench_decode_latency.py`` draws them (``--skip`` of them first: 4 skips dense's extremes and takes
random ones) are exported, loaded in mirrored sessions (dense, s1, ..., sN, sN', ..., dense'), timed
in interleaved rounds of ``--per-round`` consecutive calls at ``--context`` for ``--seconds``, then
released; ``--repeats`` times in this one process, each time exported and loaded afresh, exactly as
``bench_decode_latency.py --same-process`` times its successive chunks. Repeat 1 is a fresh process.
Then one more repeat runs in a new process (``fresh_after``): if the aged process's slowdown is the
process's, the new one is fast again; if it is the host's, the new one is as slow. The report lists
each graph's mean of its two sessions' medians per repeat, the change against repeat 1, and the
process's resident and huge-page memory when each repeat's sessions were loaded.

``--fresh-each`` times every repeat in a new process instead (``--gap-s`` apart): nothing ages, so what
moves is the host. The report then adds, per graph, the spread of its ms and of its ratio to the dense
model over the repeats: the floor under any prediction made minutes before it is measured.

    python scripts/bench_process_age.py --model smollm2 --skip 0 --subnets 4 --fresh-each --repeats 6 \\
        --gap-s 30 -o bench_out/host_drift_smollm2.json
"""

from __future__ import annotations

import argparse
import gc
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import OUT_DIR, fail, in_fresh_process, machine, stem, write_result
from bench_decode_latency import pruned_graph
from bench_latency import sample_subnets

from hwprune._mem import release
from hwprune.api import load_adapter
from hwprune.errors import HwpruneError
from hwprune.export.workload_timing import MirroredSteps, decode_graph
from hwprune.latency import get_backend
from hwprune.latency.backends import interleave
from hwprune.latency.pages import page_mode, reexec_for_timing

__all__ = ["main", "time_once", "fresh_once", "memory_mb", "host_spread"]


def memory_mb() -> dict[str, int]:
    """Resident and anonymous-huge-page memory of this process, MB (Linux; empty elsewhere)."""
    try:
        text = Path("/proc/self/smaps_rollup").read_text()
    except OSError:
        return {}
    out = {}
    for key, name in (("Rss", "rss_mb"), ("AnonHugePages", "anon_huge_mb")):
        m = re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE)
        if m:
            out[name] = int(m.group(1)) // 1024
    return out


def time_once(
    adapter: Any, space: Any, chunk: list[Any], *, context: int, seconds: float, per_round: int, threads: int, seed: int
) -> tuple[dict[str, float], dict[str, int]]:
    """Export the dense model and ``chunk``, load them in mirrored sessions, time them in interleaved rounds,
    release them; each graph's mean of its two sessions' medians (ms) and the memory when loaded."""
    rng = np.random.default_rng(seed)
    names = ["dense", *(n for n, _ in chunk)]
    graphs = [decode_graph(adapter, adapter.dense()), *(pruned_graph(adapter, space, c, rng) for _, c in chunk)]
    mirrored = MirroredSteps.create(get_backend("ort-cpu", threads=threads), graphs, [context], 1)
    mem = memory_mb()
    for r in mirrored.runners:
        r.sample(3)
    ts = interleave(mirrored.runners, seconds=seconds, per_round=per_round, warmup=0, seed=int(rng.integers(1 << 31)))
    ms = {names[g]: float(np.mean(v)) for (g, _), v in mirrored.pairs(ts).items()}
    del mirrored, ts, graphs
    gc.collect()
    release()
    return ms, mem


def fresh_once(
    model: str, space: str | None, chunk: list[Any], kw: dict[str, Any]
) -> tuple[dict[str, float], dict[str, int]]:
    """:func:`time_once` in this (new) process."""
    adapter = load_adapter(model)
    return time_once(adapter, adapter.space(space), chunk, **kw)


def _spread_pct(xs: list[float]) -> float:
    return round(100 * (max(xs) - min(xs)) / float(np.median(xs)), 2)


def host_spread(repeats: list[dict[str, Any]], names: list[str]) -> dict[str, dict[str, float]]:
    """Per graph over the repeats: the spread ((max - min) / median, %) of its ms and, for the subnets, of
    its ratio to the dense model timed in the same rounds."""
    out: dict[str, dict[str, float]] = {}
    for n in names:
        ms = [r["ms"][n] for r in repeats]
        out[n] = {"ms_spread_pct": _spread_pct(ms)}
        if n != "dense":
            out[n]["ratio_spread_pct"] = _spread_pct([r["ms"][n] / r["ms"]["dense"] for r in repeats])
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--space", default=None, help="pruning space YAML (default: the model's)")
    ap.add_argument("--context", type=int, default=128, help="KV-cache length of the decode step")
    ap.add_argument("--subnets", type=int, default=4, help="subnets in the chunk besides the dense model")
    ap.add_argument("--skip", type=int, default=4, help="subnets of the draw to skip first (4: the random ones)")
    ap.add_argument("--repeats", type=int, default=4, help="times the chunk is exported, loaded and timed")
    ap.add_argument("--seconds", type=float, default=30.0, help="interleaved timing per repeat")
    ap.add_argument("--per-round", type=int, default=10, help="consecutive calls per graph in a round")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--fresh-each",
        action="store_true",
        help="every repeat in a new process (what moves is then the host, not the process's age)",
    )
    ap.add_argument("--gap-s", type=float, default=0.0, help="with --fresh-each: seconds to wait between repeats")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-o", "--out", default=None, help="JSON result (default bench_out/process_age_<model>.json)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    out = Path(a.out) if a.out else OUT_DIR / f"process_age_{stem(a.model)}.json"
    try:
        if a.subnets < 1 or a.repeats < 2 or a.seconds <= 0 or a.per_round < 1 or a.skip < 0 or a.gap_s < 0:
            raise HwpruneError(
                "--subnets >= 1, --repeats >= 2, --per-round >= 1, --skip >= 0, --gap-s >= 0 and --seconds > 0"
            )
        adapter = load_adapter(a.model)
        space = adapter.space(a.space)
        rng = np.random.default_rng(a.seed)
        drawn = [s for s in sample_subnets(space, a.skip + a.subnets + 1, rng) if s[0] != "dense"]
        chunk = drawn[a.skip : a.skip + a.subnets]
        names = ["dense", *(n for n, _ in chunk)]
        kw = {"context": a.context, "seconds": a.seconds, "per_round": a.per_round, "threads": a.threads}
        t0 = time.perf_counter()
        repeats: list[dict[str, Any]] = []
        n_runs = a.repeats if a.fresh_each else a.repeats + 1
        for k in range(n_runs):
            seed = int(rng.integers(1 << 31))
            if a.fresh_each and k and a.gap_s:
                time.sleep(a.gap_s)
            if k < a.repeats and not a.fresh_each:
                ms, mem = time_once(adapter, space, chunk, seed=seed, **kw)
            else:  # a new process: every repeat with --fresh-each, else the control after the aged one's last
                ms, mem = in_fresh_process(fresh_once, a.model, a.space, chunk, {**kw, "seed": seed})
            label = "fresh_after" if k == a.repeats else k + 1
            repeats.append({"repeat": label, "at_s": round(time.perf_counter() - t0, 1), **mem, "ms": ms})
            print(f"repeat {label}: " + ", ".join(f"{n} {v:.2f}" for n, v in ms.items()), flush=True)
        first = repeats[0]["ms"]
        for rep in repeats:
            rep["change_pct"] = {n: round(100 * (rep["ms"][n] / first[n] - 1), 2) for n in names}
        report = {
            "model": a.model,
            "context": a.context,
            "subnets": [{"name": n, "sizes": list(c.sizes)} for n, c in chunk],
            "settings": {
                "runtime": "ort-cpu",
                "threads": a.threads,
                "seconds": a.seconds,
                "per_round": a.per_round,
                "repeats": a.repeats,
                "pages": page_mode(),
            },
            "repeats": repeats,
            "mean_change_pct_by_repeat": [round(float(np.mean(list(r["change_pct"].values()))), 2) for r in repeats],
            "seconds": round(time.perf_counter() - t0, 1),
        }
        if a.fresh_each:
            report["settings"] |= {"process": "a new one per repeat", "gap_s": a.gap_s}
            report["host_spread"] = host_spread(repeats, names)
        write_result(out, report, script=__file__, argv=argv, machine_facts=machine("ort-cpu", threads=a.threads))
    except HwpruneError as e:
        return fail(e)
    print(f"mean change against repeat 1: {report['mean_change_pct_by_repeat']}; wrote {out}")
    for n, sp in report.get("host_spread", {}).items():
        ratio = f", ratio to dense {sp['ratio_spread_pct']:.1f}%" if "ratio_spread_pct" in sp else ""
        print(f"  {n}: ms spread {sp['ms_spread_pct']:.1f}%{ratio}")
    return 0


if __name__ == "__main__":
    reexec_for_timing()  # huge pages, as every timing process (hwprune.latency.pages)
    sys.exit(main())
