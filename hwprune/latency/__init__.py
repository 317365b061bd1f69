"""Latency: measure a model's blocks on a device (``profile``) and predict candidates from the table.

``profile(adapter)`` -> :class:`LatencyTable` (parquet + JSON) -> :class:`LUTPredictor` -> ms per candidate.
Each model family measures its own blocks (``Family.measure_latency``) and picks its predictor
(``Family.predictor``); the table, fingerprint, backends and predictor base are shared.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hwprune.errors import HwpruneError
from hwprune.latency._base import Backend, Timing, backend_names, get_backend, register_backend
from hwprune.latency.fingerprint import DeviceFingerprint
from hwprune.latency.predictor import LUTPredictor, Predictor
from hwprune.latency.table import LatencyTable

if TYPE_CHECKING:
    from hwprune.families._base import Family
    from hwprune.space import PruningSpace

__all__ = [
    "profile",
    "LatencyTable",
    "LUTPredictor",
    "Predictor",
    "DeviceFingerprint",
    "Backend",
    "Timing",
    "get_backend",
    "register_backend",
    "backend_names",
]


def profile(
    adapter: "Family",
    *,
    runtime: str = "ort-cpu",
    threads: int = 1,
    batch: int = 1,
    seq: int = 128,
    space: "PruningSpace | None" = None,
    out: str | Path | None = None,
    progress: bool = True,
    budget_s: float | None = None,
    regime: str = "prefill",
    contexts: Sequence[int] = (),
    context: bool = True,
) -> LatencyTable:
    """Measure every block size of ``space`` (default: the adapter's) on this machine; save to ``out``.

    ``budget_s`` bounds the timing phase (default: the family's, 120 s for encoders); ``out`` may be
    ``x.parquet`` (``x.json`` is written beside it) or None to keep the table in memory.
    ``regime="decode"``: one new token after a KV cache of each of ``contexts`` positions (``seq`` is 1;
    ``budget_s`` covers all contexts; see ``Family.measure_decode_latency``). ``context``: also
    time the whole dense model as export does and store the context factor (decode tables: one per
    context; :mod:`hwprune.latency.context`; a few seconds more).
    """
    if regime not in ("prefill", "decode"):
        raise HwpruneError(f"--regime {regime!r} is not one of prefill, decode")
    if regime == "prefill" and contexts:
        raise HwpruneError("--context is for --regime decode (a prompt has no KV cache before it)")
    if regime == "decode":
        contexts = sorted(set(int(c) for c in contexts))
        if not contexts:
            raise HwpruneError("--regime decode needs --context, the KV-cache lengths to time, e.g. 128,512,1024")
        seq = 1
    batch, seq = adapter.io_settings(batch=batch, seq=seq)
    backend = get_backend(runtime, threads=threads)
    space = space if space is not None else adapter.space()
    fp = DeviceFingerprint.current(runtime, threads=threads, batch=batch, seq=seq, runtime_version=backend.version())
    t0 = time.perf_counter()
    settings: dict[str, Any] = {
        "runtime": runtime,
        "threads": threads,
        "batch": batch,
        "seq": seq,
        "dtype": "float32",
        "regime": regime,
    }
    # prompt tables: the whole models first, timed as export times them, in a process that has timed nothing
    # yet (as an export's is), fitted to the blocks' sums once the table exists (hwprune.latency.context;
    # resnet50 --table raw MAPE 2.92 -> 0.77 %). Decode tables time them after their ~30 block graphs, once
    # the family has accepted the regime and its contexts; timing them first changed nothing measurable there.
    finish: Callable[[LatencyTable], dict[str, Any]] | None = None
    if context and regime == "prefill":
        from hwprune.latency.context import time_context

        finish = time_context(adapter, backend, space, batch=batch, seq=seq)
    if regime == "prefill":
        frame, meta = adapter.measure_latency(
            backend, batch=batch, seq=seq, space=space, progress=progress, budget_s=budget_s
        )
    else:
        frame, meta = adapter.measure_decode_latency(
            backend, batch=batch, contexts=contexts, space=space, progress=progress, budget_s=budget_s
        )
        settings["contexts"] = list(contexts)
    table = LatencyTable(
        frame=frame,
        fingerprint=fp,
        model=adapter.name,
        family=adapter.family,
        shape_key=adapter.shape_key(),
        profile_seconds=time.perf_counter() - t0,
        meta=meta,
        settings=settings,
    )
    if finish is not None:
        table.meta["context"] = finish(table)
    elif context and regime == "decode":
        from hwprune.latency.context import time_decode_context

        per = table.meta.setdefault("contexts", {})
        for c, rec in time_decode_context(adapter, backend, space, contexts, batch=batch)(table).items():
            per.setdefault(c, {})["context"] = rec
        table.profile_seconds = time.perf_counter() - t0
    if out is not None:
        table.save(out)
    return table
