"""What a latency backend promises, and the registry of backends.

Contract (every backend runs ``tests/test_latency_backends.py``):
- ``time(onnx, feed)`` returns a :class:`Timing` in **milliseconds** of one ``run`` call on ``feed``:
  median (and p10/p90) of ``repeats`` runs after ``warmup`` runs, in one session created with the
  backend's thread settings (intra-op = ``threads``, inter-op = 1, sequential execution).
- ``run(onnx, feed)`` returns the outputs as numpy arrays (used for parity checks).
- ``version()`` names the runtime and version for fingerprints, e.g. ``onnxruntime 1.32.0``.
- Construction never imports an optional runtime it does not need; an unavailable runtime raises
  :class:`~hwprune.errors.HwpruneError` naming the package to install.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Callable, Mapping

import numpy as np

from hwprune.errors import HwpruneError

__all__ = ["Timing", "Backend", "register_backend", "get_backend", "backend_names"]


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
