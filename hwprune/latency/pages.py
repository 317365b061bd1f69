"""Memory pages of a timing process: 2 MB transparent huge pages for malloc, so identical sessions time alike.

On a Linux machine whose transparent huge pages are ``madvise`` (the common default), ONNX Runtime's
weights and buffers live in 4 KB pages, and where they land decides how many TLB misses a run pays.
Measured on the 2-core EPYC with SmolLM2's one-token decode step (ten sessions of the same graph in one
process, interleaved): 61.4 … 68.5 ms with 4 KB pages (11.5 % apart), 61.0 … 62.8 ms (3.0 %) and faster
with glibc's ``glibc.malloc.hugetlb=1`` tunable, which madvises malloc's mappings for huge pages. The
second session of the dense model timed 3 … 12 % faster than the first in every decode benchmark before.

glibc reads the tunable once, at process start, so a timing command starts itself again with it
(:func:`reexec_for_timing`, called by the ``hwprune`` entry point and the timing benchmarks, never inside
a running program such as a test). ``HWPRUNE_HUGEPAGES=0`` keeps 4 KB pages (deploy the way you time:
a table profiled with huge pages predicts a deployment that sets the tunable too). Every latency table
and benchmark records the state (:func:`page_mode`, the fingerprint's ``pages``).
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

__all__ = ["TUNABLE", "OPT_OUT", "thp_mode", "page_mode", "reexec_for_timing"]

ENV = "GLIBC_TUNABLES"
TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "HWPRUNE_HUGEPAGES"  # "0": keep 4 KB pages
_MARK = "HWPRUNE_REEXEC"  # set in the restarted process: never restart twice


def thp_mode() -> str:
    """The kernel's transparent-huge-page mode (``always``, ``madvise``, ``never``), "" where there is none."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return ""
    return text[text.find("[") + 1 : text.find("]")] if "[" in text else ""


def _glibc_has_tunable() -> bool:
    lib, ver = platform.libc_ver()
    try:
        return lib == "glibc" and tuple(int(x) for x in ver.split(".")[:2]) >= (2, 35)
    except ValueError:
        return False


def _tunable_set() -> bool:
    """The tunable (or its hugetlbfs variant ``=2``) is among this process's ``GLIBC_TUNABLES``."""
    return any(t.strip() in (TUNABLE, TUNABLE[:-1] + "2") for t in os.environ.get(ENV, "").split(":"))


def page_mode() -> str:
    """How this process's malloc memory is paged: ``huge`` (THP ``always``, or ``madvise`` with the glibc
    tunable set at start), ``4k``, or "" where it cannot be told (not Linux)."""
    mode = thp_mode()
    if not mode:
        return ""
    if mode == "always" or (mode == "madvise" and _tunable_set() and _glibc_has_tunable()):
        return "huge"
    return "4k"


def reexec_for_timing() -> None:
    """Start this program again with the glibc tunable when it would change the pages (THP ``madvise``,
    glibc >= 2.35, tunable unset, ``HWPRUNE_HUGEPAGES`` not ``0``); otherwise return. Call it first thing
    in a command-line entry point, before any work: the process is replaced."""
    would_change = thp_mode() == "madvise" and _glibc_has_tunable() and not _tunable_set()
    if not would_change or os.environ.get(OPT_OUT) == "0" or os.environ.get(_MARK):
        return
    env = dict(os.environ)
    env[ENV] = f"{env[ENV]}:{TUNABLE}" if env.get(ENV) else TUNABLE
    env[_MARK] = "1"
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)  # the command line as typed
    except OSError:  # pragma: no cover - exec refused: time with 4 KB pages (recorded as such)
        return
