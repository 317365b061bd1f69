"""What every benchmark script shares: one CLI convention and one result writer.

Convention (each ``scripts/*.py``): ``main(argv: list[str] | None = None) -> int`` parses its arguments
with argparse, takes ``-o/--out`` for its JSON result (default: a file under ``bench_out/``), writes that
result through :func:`write_result` and ends with ``if __name__ == "__main__": sys.exit(main())``. A
:class:`~hwprune.errors.HwpruneError` (bad model, missing table, unreachable target...) is one line
``error: ...`` on stderr and exit status 2 (:func:`fail`), as in the ``hwprune`` CLI; anything else is a
bug and keeps its traceback.

Why one writer: the README quotes figures from ``bench_out/*.json``, so every result must say how it
was made (the exact command, the date, the machine) and must never be left half-written by a crash or
a Ctrl-C in the middle of a long benchmark (``hwprune._io.write_json`` renames a finished file into place).
"""

from __future__ import annotations

import platform
import shlex
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from hwprune._io import write_json
from hwprune.errors import HwpruneError
from hwprune.latency.worker import in_worker

T = TypeVar("T")

__all__ = ["OUT_DIR", "machine", "command", "write_result", "fail", "parse_shape", "stem"]

#: where results go by default (relative to the current folder, like ``runs/`` and ``latency_tables/``)
OUT_DIR = Path("bench_out")


def machine(runtime: str = "ort-cpu", *, threads: int = 1, batch: int = 1, seq: int = 128) -> dict[str, Any]:
    """This machine as a latency table's fingerprint states it (CPU, runtime and versions, settings),
    plus the Python version: enough to tell whether two results are comparable."""
    from hwprune.latency import DeviceFingerprint, get_backend

    fp = DeviceFingerprint.current(
        runtime, threads=threads, batch=batch, seq=seq, runtime_version=get_backend(runtime, threads=threads).version()
    )
    return {**fp.to_json(), "python": platform.python_version()}


def command(script: str | Path, argv: Sequence[str] | None) -> str:
    """The command that reproduces this result: ``python scripts/<name>.py`` plus the arguments ``main``
    received (``argv``), or the shell's when ``main()`` was called without them. Taking ``argv`` keeps it
    exact when a test calls ``main([...])`` (``sys.argv`` is then pytest's)."""
    args = list(argv) if argv is not None else sys.argv[1:]
    return shlex.join(["python", f"scripts/{Path(script).name}", *args])


def write_result(
    path: str | Path,
    result: Mapping[str, Any],
    *,
    script: str | Path,
    argv: Sequence[str] | None,
    machine_facts: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``result`` as JSON at ``path`` atomically, led by ``command`` and ``date`` and with ``machine``.

    ``machine_facts``: the facts of the settings the result was measured with (:func:`machine` with the
    script's runtime, threads, batch and seq); default ``machine()`` (ORT CPU, one thread). A ``machine``
    key inside ``result`` is replaced by them, so every result states it in the same place and form.
    """
    doc = {
        "command": command(script, argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        **{k: v for k, v in result.items() if k != "machine"},
        "machine": dict(machine_facts) if machine_facts is not None else machine(),
    }
    path = Path(path)
    write_json(path, doc)
    print(f"wrote {path}")
    return path


def fail(e: HwpruneError) -> int:
    """The scripts' answer to a user error: ``error: <one line>`` on stderr, exit status 2."""
    print("error: " + " ".join(str(e).split()), file=sys.stderr)
    return 2


def parse_shape(value: str | None) -> tuple[int, ...] | None:
    """``--input-shape`` as the ``hwprune`` CLI reads it (comma-separated integers); the family checks
    the rank and values when the adapter is configured (``Family.configure``)."""
    if value is None:
        return None
    try:
        return tuple(int(v) for v in value.replace("x", ",").split(","))
    except ValueError:
        raise HwpruneError(f"--input-shape {value!r} must be comma-separated integers, e.g. 1,3,224,224") from None


def in_fresh_process(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in a new (spawned) Python process, its result returned here
    (:func:`hwprune.latency.worker.in_worker`); ``fn`` must be importable by its module name. Timing benches
    use it because a process that had timed earlier graphs measured ~2 % (once up to 7 %) slower than a new
    one (``scripts/bench_process_age.py``)."""
    return in_worker(fn, *args)


def stem(model: str) -> str:
    """A file-name-safe short name for ``--model`` (a name, a folder or ``package.module:factory``)."""
    return Path(model.replace(":", "_").rstrip("/")).name or "model"
