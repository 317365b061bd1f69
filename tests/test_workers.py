"""Many workers on one study: real processes, a real PostgreSQL server (fixture ``pg_url``), SQLite
and journal files. Workers run tests/_search_worker.py: the real search loop and storage on a
synthetic problem, so each process starts in ~2 s and a trial costs ``--score-s``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from optuna.trial import TrialState
from typer.testing import CliRunner

from hwprune.cli import app
from hwprune.search import pareto_mask
from hwprune.search.pareto import SOURCES
from hwprune.search.storage import open_storage
from hwprune.search.study import FINISHED

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("_search_worker.py")
runner = CliRunner()


def spawn(out: Path, *args: object) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(WORKER), "-o", str(out), *map(str, args)]
    # a worker answers Ctrl-C even when this test runs with SIGINT ignored (a `nohup ... &` job, as
    # in CI): a search keeps an ignored signal ignored, as Python does
    return subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def finish(p: subprocess.Popen[str], timeout: float = 120) -> tuple[int, str, str]:
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out, err


def trials_of(url: str, study: str):
    import optuna

    storage = open_storage(url, heartbeat_s=None, create=False)
    return optuna.load_study(study_name=study, storage=storage).get_trials(deepcopy=True)


def wait_for(cond, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def front_from(trials) -> set[str]:
    """The front computed here from the study's complete trials (first trial per candidate wins)."""
    seen: dict[tuple[int, ...], tuple[float, float]] = {}
    for t in sorted(trials, key=lambda t: t.number):
        if t.state == TrialState.COMPLETE:
            seen.setdefault(tuple(t.user_attrs["sizes"]), (t.values[0], t.values[1]))
    keys = list(seen)
    mask = pareto_mask(np.array([seen[k][0] for k in keys]), np.array([seen[k][1] for k in keys]))
    return {",".join(map(str, k)) for k, m in zip(keys, mask) if m}


def picks_front(url: str, study: str, out: Path) -> set[str]:
    res = runner.invoke(app, ["picks", "--storage", url, "--study", study, "-o", str(out)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    df = pd.read_csv(out / "pareto.csv", dtype={"key": str})
    import json

    units = [f"u{i}" for i in range(6)]
    return {",".join(str(json.loads(s)[u]) for u in units) for s in df.loc[df["pareto"], "sizes"]}


@pytest.mark.parametrize("n_workers,total", [(2, 12), (4, 14)])
def test_workers_reach_the_total_exactly(pg_url, tmp_path, n_workers, total) -> None:
    study = f"w{n_workers}-{uuid.uuid4().hex[:8]}"
    args = ("--storage", pg_url, "--study", study, "--trials", total)
    procs = [spawn(tmp_path / f"w{i}", *args) for i in range(n_workers)]
    results = [finish(p) for p in procs]
    assert all(rc == 0 for rc, _, _ in results), results
    trials = trials_of(pg_url, study)
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers))
    assert sum(t.state in FINISHED for t in trials) == total  # exactly, however many workers
    extra = [t for t in trials if t.state not in FINISHED]
    assert all(t.state == TrialState.FAIL and "surplus" in t.user_attrs for t in extra)
    assert len(extra) <= n_workers - 1
    distinct = {tuple(t.user_attrs["sizes"]) for t in trials if t.state == TrialState.COMPLETE}
    assert sum(int(out.split()[-1]) for _, out, _ in results) >= len(distinct)  # each scored at least once
    # the front read back from any machine equals the one computed from the same trials
    assert picks_front(pg_url, study, tmp_path / "picks") == front_from(trials)
    # what optuna-dashboard shows per trial
    for t in trials:
        if t.state == TrialState.COMPLETE:
            ua = t.user_attrs
            assert ua["predicted_ms"] == pytest.approx(t.values[0]) and ua["distance"] == pytest.approx(t.values[1])
            assert ua["predicted_speedup"] > 0.99 and len(ua["sizes"]) == 6
            assert {"distance", "cosine"} <= set(ua["scores"]) and ua["source"] in SOURCES


def test_journal_file_workers(tmp_path) -> None:
    url = f"journal:{tmp_path / 'study.log'}"
    procs = [spawn(tmp_path / f"w{i}", "--storage", url, "--study", "j", "--trials", 12) for i in range(2)]
    assert all(finish(p)[0] == 0 for p in procs)
    trials = trials_of(url, "j")
    assert sum(t.state in FINISHED for t in trials) == 12
    assert picks_front(url, "j", tmp_path / "picks") == front_from(trials)


def test_killed_worker_trial_fails_and_is_retried(pg_url, tmp_path) -> None:
    study = f"kill-{uuid.uuid4().hex[:8]}"
    slow = spawn(tmp_path / "slow", "--storage", pg_url, "--study", study, "--trials", 10, "--score-s", 60)
    wait_for(lambda: any(t.state == TrialState.RUNNING and "sizes" in t.user_attrs for t in _safe(pg_url, study)))
    os.kill(slow.pid, signal.SIGKILL)  # mid-trial: its trial stays RUNNING, its heartbeat stops
    slow.communicate()
    (killed,) = [t for t in trials_of(pg_url, study) if t.state == TrialState.RUNNING]
    rc, _, err = finish(spawn(tmp_path / "fast", "--storage", pg_url, "--study", study, "--trials", 10))
    assert rc == 0, err
    trials = trials_of(pg_url, study)
    by_number = {t.number: t for t in trials}
    assert by_number[killed.number].state == TrialState.FAIL
    retried = [t for t in trials if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retried) == 1 and retried[0].state in FINISHED
    assert retried[0].params == killed.params
    assert sum(t.state in FINISHED for t in trials) == 10


def _safe(url: str, study: str):
    try:
        return trials_of(url, study)
    except Exception:  # the study may not exist yet
        return []


@pytest.mark.parametrize("where,sig", [("sqlite", signal.SIGINT), ("postgresql", signal.SIGTERM)])
def test_interrupt_and_resume_keeps_finished_trials(pg_url, tmp_path, where, sig) -> None:
    study = f"resume-{uuid.uuid4().hex[:8]}"
    url = pg_url if where == "postgresql" else str(tmp_path / "run" / "study.db")
    args = ["--storage", url, "--study", study] if where == "postgresql" else []
    p = spawn(tmp_path / "run", *args, "--trials", 40, "--score-s", 0.3)
    wait_for(lambda: sum(t.state == TrialState.COMPLETE for t in _safe(url, study if args else "hwprune")) >= 4)
    p.send_signal(sig)
    rc, _, _ = finish(p)
    assert rc != 0
    name = study if args else "hwprune"
    before = {t.number: t.values for t in trials_of(url, name) if t.state in FINISHED}
    assert 4 <= len(before) < 12
    rc, _, err = finish(spawn(tmp_path / "run", *args, "--trials", 12))
    assert rc == 0, err
    trials = trials_of(url, name)
    after = {t.number: t.values for t in trials if t.state in FINISHED}
    assert len(after) == 12  # counted once each: the interrupted trial is not, the finished ones are kept
    assert all(after[n] == v for n, v in before.items())
    sources = {t.user_attrs.get("source") for t in trials if t.state == TrialState.COMPLETE}
    assert {"dp", "uniform", "dense"} <= sources  # every seed ran, even one that was interrupted


def test_different_request_is_refused_and_the_study_unharmed(pg_url, tmp_path) -> None:
    study = f"req-{uuid.uuid4().hex[:8]}"
    assert finish(spawn(tmp_path / "a", "--storage", pg_url, "--study", study, "--trials", 8))[0] == 0
    before = [(t.number, t.state, t.values) for t in trials_of(pg_url, study)]
    rc, _, err = finish(spawn(tmp_path / "b", "--storage", pg_url, "--study", study, "--trials", 12, "--seed", 1))
    assert rc == 2 and err.count("\n") == 1 and "different request (seed differ" in err and "Traceback" not in err
    assert [(t.number, t.state, t.values) for t in trials_of(pg_url, study)] == before
    # the default SQLite study.db in a run directory: the same refusal offers --fresh, which starts over
    run = tmp_path / "run"
    assert finish(spawn(run, "--trials", 6))[0] == 0
    rc, _, err = finish(spawn(run, "--trials", 6, "--seed", 3))
    assert rc == 2 and "--fresh" in err and str(run / "study.db") in err
    rc, _, err = finish(spawn(run, "--trials", 6, "--seed", 3, "--fresh"))
    assert rc == 0, err
    trials = trials_of(str(run / "study.db"), "hwprune")
    assert sum(t.state in FINISHED for t in trials) == 6 and len(trials) == 6


def _one_line(args: list[str], pattern: str) -> str:
    res = runner.invoke(app, args, catch_exceptions=False)
    text = " ".join(res.output.split())
    assert res.exit_code == 2 and text.startswith("error:") and pattern in text, res.output
    assert "Traceback" not in res.output
    return text


def test_bad_storage_is_one_line(pg_url, tmp_path) -> None:
    from sqlalchemy.engine import make_url

    u = make_url(pg_url)
    host = f"{u.host}:{u.port}/{u.database}"
    msg = _one_line(["picks", "--storage", f"postgresql://{u.username}:wrong@{host}"], "password authentication failed")
    assert "wrong" not in msg  # the password is never printed
    _one_line(["picks", "--storage", f"postgresql://x:y@127.0.0.1:1/{u.database}"], "cannot connect to PostgreSQL")
    _one_line(["picks", "--storage", "postgresql://x:y@127.0.0.1:notaport/db"], "not a valid database URL")
    _one_line(["picks", "--storage", "mysql://x@h/db"], "unsupported scheme")
    _one_line(["picks", "--storage", pg_url, "--study", "no-such-study"], "no study 'no-such-study'")
    _one_line(["picks", "--storage", str(tmp_path / "none.db")], "no SQLite file")
    bad = tmp_path / "corrupt.db"
    bad.write_bytes(b"this is not a database" * 100)
    _one_line(["picks", "--storage", str(bad)], "cannot open the SQLite file")


def test_study_db_from_an_older_hwprune_is_refused_with_fresh_offered(tmp_path) -> None:
    import optuna

    run = tmp_path / "run"
    run.mkdir()
    storage = open_storage(str(run / "study.db"), heartbeat_s=None)
    old = optuna.create_study(storage=storage, study_name="hwprune", directions=["minimize", "minimize"])
    old.set_user_attr("space_signature", "from-an-older-version")  # what hwprune wrote before issue 11
    rc, _, err = finish(spawn(run, "--trials", 4))
    assert rc == 2 and "older hwprune" in err and "--fresh" in err
    assert finish(spawn(run, "--trials", 4, "--fresh"))[0] == 0
