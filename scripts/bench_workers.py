"""Many workers on one PostgreSQL study: trials per minute with 1, 2, 4 worker processes, storage
overhead per trial, and whether the 4-worker front matches the 1-worker one.

    python scripts/bench_workers.py --storage postgresql://hw:pw@127.0.0.1:5432/hw \\
        --model minilm --proxy obs --trials 24 --workers 1,2,4 -o bench_out/workers.json

Each worker is a real ``hwprune search`` process (``python -m hwprune.cli``) joining a fresh study.
Throughput counts the search phase only, from the first trial's start to the last trial's end in the
study (every worker first loads the model and fits the proxy, which is not a trial). The ideal line
is the 1-worker rate times the workers, and capped at the machine's cores (one trial uses one core).

Storage overhead: per trial, wall time minus the time spent scoring (``score_s``, a trial attribute)
is what the sampler, the latency prediction and the storage round trips cost; a second measurement
runs the same search loop with a free scorer on PostgreSQL and on SQLite (``--micro-trials``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import OUT_DIR, fail, write_result

from hwprune.errors import HwpruneError
from hwprune.search.pareto import pareto_mask
from hwprune.search.storage import StudyStore, close_storage, open_storage


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--storage", required=True, help="postgresql://user:password@host:port/db")
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--table", default="latency_tables/minilm_ort-cpu_t1_b1_s128.parquet")
    ap.add_argument("--space", default=None, help="pruning space YAML (default: the model's)")
    ap.add_argument("--proxy", default="obs")
    ap.add_argument("--targets", default="1.5,2")
    ap.add_argument("--trials", type=int, default=24, help="study total per configuration")
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--n-calib", type=int, default=32)
    ap.add_argument("--n-heldout", type=int, default=16)
    ap.add_argument("--micro-trials", type=int, default=40, help="free-scorer trials per storage (0: skip)")
    ap.add_argument("-o", "--out", default=str(OUT_DIR / "workers.json"))
    return ap.parse_args(argv)


def _trials(url: str, study: str) -> list[Any]:
    import optuna

    storage = open_storage(url, heartbeat_s=None, create=False)
    try:
        return optuna.load_study(study_name=study, storage=storage).get_trials(deepcopy=True)
    finally:
        close_storage(storage)


def _front(trials: list[Any]) -> list[tuple[float, float]]:
    done = [t for t in trials if t.state.name == "COMPLETE"]
    ms = np.array([t.values[0] for t in done])
    d = np.array([t.values[1] for t in done])
    return sorted({(float(a), float(b)) for a, b, m in zip(ms, d, pareto_mask(ms, d)) if m})


def _hypervolume(front: list[tuple[float, float]], ref: tuple[float, float]) -> float:
    """Area dominated by the front (both objectives minimised) up to ``ref``."""
    hv, prev_d = 0.0, ref[1]
    for ms, d in sorted(front):
        if ms < ref[0] and d < prev_d:
            hv += (ref[0] - ms) * (prev_d - d)
            prev_d = d
    return hv


def _covered(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """Fraction of ``a``'s points weakly dominated by some point of ``b``."""
    return sum(any(q[0] <= p[0] and q[1] <= p[1] for q in b) for p in a) / max(1, len(a))


def run_config(a: argparse.Namespace, workers: int, tmp: Path) -> dict[str, Any]:
    study = f"bench-w{workers}-{uuid.uuid4().hex[:6]}"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "hwprune", "search", "--model", a.model, "--table", a.table, "--proxy", a.proxy]
    cmd += ["--targets", a.targets, "--trials", str(a.trials), "--n-calib", str(a.n_calib)]
    cmd += ["--n-heldout", str(a.n_heldout), "--storage", a.storage, "--study", study, "--no-progress"]
    cmd += ["--space", a.space] if a.space else []
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen(
            [*cmd, "-o", str(tmp / f"{study}-{i}")], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        for i in range(workers)
    ]
    errs = [p.communicate()[1].decode() for p in procs]
    if any(p.returncode for p in procs):
        raise HwpruneError(f"a worker failed: {next(e for e, p in zip(errs, procs) if p.returncode).strip()[-300:]}")
    wall = time.perf_counter() - t0
    trials = _trials(a.storage, study)
    done = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    start = min(t.datetime_start for t in done)
    end = max(t.datetime_complete for t in done)
    span = (end - start).total_seconds()
    per = [(t.datetime_complete - t.datetime_start).total_seconds() for t in done]
    # all workers in their search phase at once: from the last worker's first trial to the first one's last
    by_worker: dict[str, list[Any]] = {}
    for t in done:
        by_worker.setdefault(t.user_attrs.get("worker", "?"), []).append(t)
    lo = max(min(t.datetime_start for t in ts) for ts in by_worker.values())
    hi = min(max(t.datetime_complete for t in ts) for ts in by_worker.values())
    inside = [t for t in done if t.datetime_start >= lo and t.datetime_complete <= hi]
    overlap_s = (hi - lo).total_seconds()
    scored = [t.user_attrs["score_s"] for t in done if "score_s" in t.user_attrs]
    overhead = [w - t.user_attrs["score_s"] for w, t in zip(per, done) if "score_s" in t.user_attrs]
    return {
        "workers": workers,
        "study": study,
        "finished_trials": len(done),
        "surplus_trials": sum("surplus" in t.user_attrs for t in trials),
        "search_phase_s": span,
        "trials_per_min": 60 * len(done) / span,
        "all_busy_window_s": overlap_s,
        "all_busy_trials": len(inside),
        "all_busy_trials_per_min": 60 * len(inside) / overlap_s if overlap_s > 0 and inside else None,
        "wall_with_startup_s": wall,
        "mean_trial_s": float(np.mean(per)),
        "mean_score_s": float(np.mean(scored)) if scored else None,
        "overhead_per_trial_ms": 1000 * float(np.median(overhead)) if overhead else None,
        "front": _front(trials),
    }


def micro(a: argparse.Namespace, tmp: Path) -> dict[str, float]:
    """Per-trial cost of the search loop itself (sampler + prediction + storage), free scorer."""
    from hwprune.api import load_adapter, make_predictor
    from hwprune.latency.table import LatencyTable
    from hwprune.search.nsga import run_nsga

    adapter = load_adapter(a.model)
    space = adapter.space(a.space)
    pred = make_predictor(LatencyTable.load(a.table), space, adapter)
    out = {}
    for name, url in (("postgresql", a.storage), ("sqlite", str(tmp / "micro.db"))):
        t0 = time.perf_counter()
        run_nsga(
            space=space,
            predict=pred.predict,
            evaluate=lambda c: {"distance": float(sum(c.sizes))},
            dense_ms=pred.dense_ms(),
            store=StudyStore(url=url, name=f"micro-{uuid.uuid4().hex[:6]}"),
            run_dir=tmp,
            trials=a.micro_trials,
            progress=False,
        )
        out[f"{name}_ms_per_trial"] = 1000 * (time.perf_counter() - t0) / a.micro_trials
    return out


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    try:
        counts = [int(w) for w in a.workers.split(",")]
        close_storage(open_storage(a.storage, heartbeat_s=None))  # an unreachable server fails here, in one line
        with tempfile.TemporaryDirectory(prefix="bench-workers-") as d:
            tmp = Path(d)
            configs = []
            for w in counts:
                configs.append(run_config(a, w, tmp))
                print(f"{w} workers: {configs[-1]['trials_per_min']:.1f} trials/min", flush=True)
            micro_res = micro(a, tmp) if a.micro_trials else {}
    except HwpruneError as e:
        return fail(e)
    base = configs[0]["trials_per_min"] / counts[0]
    cores = os.cpu_count() or 1
    for c in configs:
        c["ideal_trials_per_min"] = base * c["workers"]
        c["ideal_capped_at_cores"] = base * min(c["workers"], cores)
    first, last = configs[0]["front"], configs[-1]["front"]
    ref = (max(p[0] for p in first + last) * 1.01, max(p[1] for p in first + last) * 1.01)
    result = {
        "setup": {
            k: getattr(a, k) for k in ("model", "table", "space", "proxy", "targets", "trials", "n_calib", "n_heldout")
        },
        "storage": "PostgreSQL (optuna RDBStorage, psycopg 3)",
        "cores": cores,
        "n_heldout": a.n_heldout,
        "configs": configs,
        "front_comparison": {
            "workers": [counts[0], counts[-1]],
            "hypervolume": [_hypervolume(first, ref), _hypervolume(last, ref)],
            "reference_point": ref,
            "first_covered_by_last": _covered(first, last),
            "last_covered_by_first": _covered(last, first),
            "equal": first == last,
        },
        "micro": micro_res,
        "note": "shared 2-core machine (other jobs running): absolute rates are noisy",
    }
    write_result(a.out, result, script=__file__, argv=argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
