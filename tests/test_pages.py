"""Huge pages for timing processes (hwprune.latency.pages): the restart, its opt-out, the fingerprint."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest

from hwprune.latency import DeviceFingerprint
from hwprune.latency.pages import OPT_OUT, page_mode, reexec_for_timing, thp_mode

CODE = "from hwprune.latency.pages import reexec_for_timing, page_mode; reexec_for_timing(); print(page_mode())"


def _run(**env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", OPT_OUT, "HWPRUNE_REEXEC")}
    res = subprocess.run(
        [sys.executable, "-c", CODE], capture_output=True, text=True, env={**clean, **env}, timeout=120, check=True
    )
    return res.stdout.strip()


@pytest.mark.skipif(thp_mode() != "madvise", reason="the restart only matters where THP is 'madvise'")
def test_a_timing_process_restarts_with_huge_pages_unless_told_not_to() -> None:
    assert _run() == "huge"
    assert _run(**{OPT_OUT: "0"}) == "4k"
    assert _run(GLIBC_TUNABLES="glibc.malloc.hugetlb=1") == "huge"  # already set: no restart needed


def test_page_mode_names_the_state_and_the_restart_never_runs_twice() -> None:
    assert page_mode() in ("huge", "4k", "")
    if os.environ.get("HWPRUNE_REEXEC"):
        reexec_for_timing()  # a restarted process returns at once


def test_the_fingerprint_compares_pages_only_where_both_are_known() -> None:
    fp = DeviceFingerprint.current("ort-cpu", threads=1, batch=1, seq=8, runtime_version="x")
    huge, small, old = (dataclasses.replace(fp, pages=p) for p in ("huge", "4k", ""))
    assert any("memory pages" in m for m in huge.mismatches(small))
    assert huge.mismatches(old) == [] and old.mismatches(small) == []
    assert DeviceFingerprint.from_json({k: v for k, v in huge.to_json().items() if k != "pages"}).pages == ""


def test_the_entry_point_runs_the_command_line() -> None:
    res = subprocess.run([sys.executable, "-m", "hwprune", "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "profile" in res.stdout
