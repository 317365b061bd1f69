"""What a latency backend promises, and the registry of backends.

Contract (every backend runs ``tests/test_latency_backends.py``):
- ``time(onnx, feed)`` returns a :class:`Timing` in **milliseconds** of one ``run`` call on ``feed``:
  median (and p10/p90) of ``repeats`` runs after ``warmup`` runs, in one session created with the
  backend's thread settings (intra-op = ``threads``, inter-op = 1, sequential execution).
- ``run(onnx, feed)`` returns the outputs as numpy arrays (used for parity checks).
- ``version()`` names the runtime and version for fingerprints, e.g. ``onnxruntime 1.32.0``.
- ``prepare(onnx, feed)`` (optional, default None) returns a runner holding one session, so several
  graphs can be timed call by call in interleaved rounds; ``cpu_clock`` says whether its calls are
  timed by the calling thread's CPU time (one intra-op thread) instead of wall time.
- Construction never imports an optional runtime it does not need; an unavailable runtime raises
  :class:`~hwprune.errors.HwpruneError` naming the package to install.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

from hwprune.errors import HwpruneError

__all__ = ["Timing", "Backend", "Profiling", "register_backend", "get_backend", "backend_names"]


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p10_ms: float
    p90_ms: float
    n: int

    def to_json(self) -> dict[str, float]:
        return asdict(self)


class Backend(ABC):
    name: str = ""

    def __init__(self, *, threads: int = 1) -> None:
        if threads < 1:
            raise HwpruneError(f"--threads must be >= 1 (got {threads})")
        self.threads = threads

    @abstractmethod
    def version(self) -> str: ...

    @abstractmethod
    def time(self, onnx: bytes, feed: Mapping[str, np.ndarray], *, warmup: int = 10, repeats: int = 50) -> Timing: ...

    @abstractmethod
    def run(self, onnx: bytes, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]: ...

    def prepare(self, onnx: bytes, feed: Mapping[str, np.ndarray]) -> Any:
        """A runner (``latency.backends.Runner``) with one session for interleaved timing; None when the
        backend only offers :meth:`time`. Default: None."""
        return None

    @property
    def cpu_clock(self) -> bool:
        """Whether runners time calls by thread CPU time (see ``backends.Runner``). Default: False."""
        return False

    @property
    def clock(self) -> str:
        """``thread-cpu`` or ``wall``: what manifests record as the clock."""
        return "thread-cpu" if self.cpu_clock else "wall"


class Profiling(Protocol):
    """A family's profile, exported and loaded: ``runners[0]`` is the dense model, the rest the graphs the
    table is fitted from. Timing them is the caller's choice (the profiler's own rounds, or a benchmark's
    rounds shared with its subnets); ``frame``/``meta`` turn one timing per runner into the table."""

    runners: list[Any]

    def frame(self, timings: Sequence[Timing]) -> "pd.DataFrame": ...

    def meta(self, timings: Sequence[Timing]) -> dict[str, Any]: ...

    def networks(self) -> list[dict[str, int] | None]:
        """Per runner, the unit sizes when it is a whole network of the space (a session control for
        benchmarks: the same graph timed in another session), else None."""
        ...


_BACKENDS: dict[str, Callable[..., Backend]] = {}


def register_backend(name: str) -> Callable[[Callable[..., Backend]], Callable[..., Backend]]:
    def deco(cls: Callable[..., Backend]) -> Callable[..., Backend]:
        _BACKENDS[name] = cls
        return cls

    return deco


def backend_names() -> list[str]:
    from hwprune.latency import backends  # noqa: F401  (registers built-ins)

    return sorted(_BACKENDS)


def get_backend(name: str, *, threads: int = 1) -> Backend:
    from hwprune.latency import backends  # noqa: F401

    if name not in _BACKENDS:
        raise HwpruneError(f"unknown runtime {name!r}; supported: {', '.join(sorted(_BACKENDS))}")
    return _BACKENDS[name](threads=threads)
