"""hwprune.latency.worker: timing in a new process that runs ONNX Runtime only."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from hwprune.errors import HwpruneError
from hwprune.latency import get_backend
from hwprune.latency.backends import OrtCpuBackend
from hwprune.latency.worker import graph_files, in_worker, rebuildable


def _pid_and_size(path: str) -> tuple[int, int]:
    return os.getpid(), len(Path(path).read_bytes())


def _refuse(what: str) -> None:
    raise HwpruneError(f"bad {what}; fix it")


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)  # as the kernel's OOM killer would


def test_in_worker_runs_elsewhere_and_hands_back_results_and_errors() -> None:
    with graph_files({"dense": b"abc", "pruned": b"de"}) as paths:
        assert [Path(p).read_bytes() for p in paths.values()] == [b"abc", b"de"]
        pid, size = in_worker(_pid_and_size, paths["dense"])
        folder = Path(paths["dense"]).parent
    assert pid != os.getpid() and size == 3 and not folder.exists()  # another process; files gone after
    with pytest.raises(HwpruneError, match="bad input; fix it"):  # the child's one line, raised here
        in_worker(_refuse, "input")


def test_a_worker_that_dies_is_one_line() -> None:
    with pytest.raises(HwpruneError, match=r"timing process \(_die\) died, most likely out of memory"):
        in_worker(_die)


def test_only_backends_a_new_process_can_rebuild_are_sent_there() -> None:
    assert rebuildable(get_backend("ort-cpu"))

    class Mine(OrtCpuBackend):  # registered by a user's code: unknown in a spawned process
        name = "mine"

    assert not rebuildable(Mine())
