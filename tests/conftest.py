from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _quick_host_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """Export re-times a pair while the dense model misses its table by > 5 % (after 5, 10, 20 s pauses);
    tiny test tables often do. Tests keep one re-timing without a pause: the path runs, the clock does not."""
    from hwprune.export import measure

    monkeypatch.setattr(measure, "host_pauses", lambda retries: (0.0,) * min(retries, 1))


@pytest.fixture(scope="session")
def minilm():
    from hwprune.families import resolve_model

    return resolve_model("minilm")


@pytest.fixture()
def tiny():
    from hwprune.families.encoder.adapter import EncoderAdapter

    return EncoderAdapter.tiny(layers=2, heads=4, head_dim=8, ffn=32)


# ---- PostgreSQL for the multi-worker tests ---------------------------------------------------
# HWPRUNE_TEST_PG_URL (set by .ci/run) names a server; without it the fixture starts a throwaway
# one when PostgreSQL is installed. No server: the tests skip with a warning saying why, except
# under CI=true, where they fail.
def _start_postgres(tmp: Path) -> tuple[str, list[str]]:
    import glob
    import shutil
    import socket
    import subprocess

    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]))
    initdb = bins[-1] + "/initdb" if bins else shutil.which("initdb")
    if initdb is None:
        raise RuntimeError("PostgreSQL is not installed (no initdb; apt-get install postgresql)")
    pg_bin = Path(initdb).resolve().parent  # Debian keeps initdb, pg_ctl and psql together there
    as_pg: list[str] = []
    if os.geteuid() == 0:  # postgres refuses to run as root
        as_pg = ["runuser", "-u", "postgres", "--"]
        shutil.chown(tmp, "postgres")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp / "pw").write_text("hwprune-test\n")
    run = lambda *a: subprocess.run([*as_pg, *a], check=True, capture_output=True, text=True, timeout=120)  # noqa: E731
    run(str(pg_bin / "initdb"), "-D", str(tmp / "data"), "-U", "postgres", "--auth-local=trust",
        "--auth-host=scram-sha-256", f"--pwfile={tmp / 'pw'}")  # fmt: skip
    opts = f"-p {port} -k {tmp} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
    run(str(pg_bin / "pg_ctl"), "-D", str(tmp / "data"), "-l", str(tmp / "log"), "-w", "start", "-o", opts)
    stop = [*as_pg, str(pg_bin / "pg_ctl"), "-D", str(tmp / "data"), "-m", "immediate", "stop"]
    psql = [str(pg_bin / "psql"), "-q", "-h", str(tmp), "-p", str(port), "-U", "postgres", "-d", "postgres"]
    try:
        run(*psql, "-c", "CREATE ROLE hwprune LOGIN PASSWORD 'hwprune-test'")
        run(*psql, "-c", "CREATE DATABASE hwprune OWNER hwprune")
    except Exception:
        subprocess.run(stop, capture_output=True, timeout=60)
        raise
    return f"postgresql+psycopg://hwprune:hwprune-test@127.0.0.1:{port}/hwprune", stop


@pytest.fixture(scope="session")
def pg_url(tmp_path_factory) -> Iterator[str]:
    import subprocess
    import tempfile
    import warnings

    url = os.environ.get("HWPRUNE_TEST_PG_URL")
    if url:
        yield url
        return
    tmp = Path(tempfile.mkdtemp(prefix="hwprune-pg-"))
    tmp.chmod(0o755)
    try:
        url, stop = _start_postgres(tmp)
    except Exception as e:
        why = getattr(e, "stderr", None) or str(e)
        reason = f"no PostgreSQL server for the multi-worker tests: {str(why).strip()[:300]}"
        if os.environ.get("CI") == "true":
            pytest.fail(reason + " (CI=true: set HWPRUNE_TEST_PG_URL or install PostgreSQL)")
        warnings.warn(reason, pytest.PytestWarning, stacklevel=1)
        pytest.skip(reason)
    try:
        yield url
    finally:
        subprocess.run(stop, capture_output=True, timeout=60)
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
