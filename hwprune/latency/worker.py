"""Timing in a process of its own: one that runs ONNX Runtime and nothing else, as a deployed model's does.

A decode step streams every weight once, so its speed depends on the process around it. On the 2-core
Xeon, SmolLM2's dense step measured 42.0 ms in a profile process that had timed its ~30 block graphs,
41.1-41.5 ms in a process that held the torch model the graphs were exported from, and 40.7 ms in a new
process holding ONNX Runtime sessions only (docs/benchmarks.md). A deployment serves from the last kind,
so every timing whose milliseconds are compared with a table runs there (the profile's whole-model
anchors, prompt and decode; export; ``calibrate --remeasure``; the latency benchmarks):
:func:`in_worker` runs a module-level function in a new *spawned* process (the
parent's memory is not inherited, unlike a fork) and :func:`graph_files` hands it the graphs as files.

The child inherits the environment (the huge-page tunable, :mod:`hwprune.latency.pages`) and ``sys.path``;
an :class:`~hwprune.errors.HwpruneError` raised there is raised here, and a child that dies (out of
memory) becomes one line that names it.
"""

from __future__ import annotations

import multiprocessing as mp
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from hwprune.errors import HwpruneError

__all__ = ["in_worker", "graph_files", "rebuildable"]

T = TypeVar("T")
K = TypeVar("K")


def in_worker(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in a new spawned Python process; its result (or its exception) returned here. ``fn``
    and ``args`` must pickle: a module-level function, plain values, graphs as paths (:func:`graph_files`)."""
    try:
        with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
            return pool.submit(fn, *args).result()
    except BrokenProcessPool:
        raise HwpruneError(
            f"the timing process ({getattr(fn, '__name__', 'worker')}) died, most likely out of memory; "
            "time fewer models at once or free memory"
        ) from None


def rebuildable(backend: Any) -> bool:
    """Can a spawned process rebuild ``backend`` by name (``get_backend(backend.name, threads=...)``)? True
    for hwprune's own runtimes; a backend registered by the user's code may be unknown there, so it is timed
    in the calling process instead."""
    return type(backend).__module__ == "hwprune.latency.backends"


@contextmanager
def graph_files(graphs: Mapping[K, bytes] | Iterable[tuple[K, bytes]]) -> Iterator[dict[K, str]]:
    """Write ``graphs`` (key -> ONNX bytes, or (key, bytes) pairs, which may be produced one at a time so
    only one graph is in memory) to a temporary folder; yield key -> path; remove them after."""
    pairs = graphs.items() if isinstance(graphs, Mapping) else graphs
    with tempfile.TemporaryDirectory(prefix="hwprune-graphs-") as tmp:
        paths: dict[K, str] = {}
        for i, (key, g) in enumerate(pairs):
            paths[key] = str(Path(tmp) / f"{i}.onnx")
            Path(paths[key]).write_bytes(g)
            del g
        yield paths
