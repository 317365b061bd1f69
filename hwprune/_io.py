"""Atomic file writes: write to a temporary name in the same folder, then rename.

A crash or a bad input never leaves a half-written table, plan or manifest behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["atomic_path", "atomic_dir", "write_json", "read_json", "check_writable"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only on success.

    ``path`` must be a regular file or absent: renaming onto ``/dev/null`` (run as root) would replace
    the device with a file, so special files are refused before anything is written."""
    path = Path(path)
    _refuse_special(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():  # mkstemp makes 0600; give the file the permissions open() would
            os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary folder next to ``path``; it replaces ``path`` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _refuse_special(path: Path) -> None:
    import stat

    from hwprune.errors import HwpruneError

    try:
        mode = path.stat().st_mode
    except OSError:
        return
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise HwpruneError(f"cannot write {path}: it is a device or other special file; choose a file path")


def check_writable(path: str | os.PathLike[str], *, what: str = "output") -> None:
    """Refuse, before any work, an output ``path`` that could not be written: its nearest existing
    ancestor must be a writable folder. (Whether an existing ``path`` is of the right kind, a file or a
    folder, is the caller's check.)"""
    from hwprune.errors import HwpruneError

    p = Path(path).absolute()
    _refuse_special(p)
    for parent in (p, *p.parents):
        if parent.exists():
            break
    if parent != p and not parent.is_dir():
        raise HwpruneError(f"cannot write {what} {path}: {parent} is a file, not a folder; choose another path")
    if not os.access(parent if parent.is_dir() else parent.parent, os.W_OK):
        raise HwpruneError(
            f"cannot write {what} {path}: {parent} is not writable; choose another path or fix its permissions"
        )


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike[str]) -> Any:
    return json.loads(Path(path).read_text())
