"""Give freed heap memory back to the operating system.

glibc keeps freed memory in its arenas, and after a large ``free`` it raises its mmap threshold, so
the many mid-size tensors of a layer-by-layer pass land on the heap and stay there: the process's
resident size keeps the high-water mark of every phase. :func:`release` asks the allocator to return
what is free (``malloc_trim``); the layer-wise decoder passes call it between layers and phases. A no-op
where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc

__all__ = ["release"]


@functools.lru_cache(maxsize=1)
def _trim() -> "ctypes._NamedFuncPointer | None":
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        fn = libc.malloc_trim
    except (OSError, AttributeError):  # musl, macOS, Windows: nothing to trim
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


def release(collect: bool = False) -> None:
    """Return free heap pages to the OS (``collect``: run the garbage collector first)."""
    if collect:
        gc.collect()
    fn = _trim()
    if fn is not None:
        fn(0)
