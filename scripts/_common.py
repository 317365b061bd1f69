"""Shared bits of the benchmark scripts: machine facts and JSON output."""

from __future__ import annotations

import platform
import sys
import time
from pathlib import Path
from typing import Any

from hwprune._io import write_json


def machine(runtime: str = "ort-cpu", *, threads: int = 1, batch: int = 1, seq: int = 128) -> dict[str, Any]:
    from hwprune.latency import DeviceFingerprint, get_backend

    fp = DeviceFingerprint.current(runtime, threads=threads, batch=batch, seq=seq,
                                   runtime_version=get_backend(runtime, threads=threads).version())
    return {**fp.to_json(), "python": platform.python_version()}


def write_result(path: str | Path, result: dict[str, Any]) -> None:
    result = {"command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
              "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), **result}
    write_json(path, result)
    print(f"wrote {path}")
