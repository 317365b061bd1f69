"""LatencyTable: measured block latencies of one model shape on one device, as parquet + JSON sidecar.

``FILE.parquet`` holds one row per measured block::

    kind      str   "base" (everything outside the prunable units), "heads", "ffn"; CNNs add their own
    key       str   "" for encoders (every layer shares the shape); CNNs key per conv
    size      int   kept size (heads, neurons; c_in for CNN convs)
    size2     int   second size (c_out for CNN convs), -1 when unused
    median_ms float median latency of the block in milliseconds
    p10_ms    float 10th percentile, same units
    p90_ms    float 90th percentile
    n         int   timed calls behind the figures
    context   int   decode tables: KV-cache positions before the timed token; 0 in prefill tables
                    (tables written before issue 9 lack the column and read as 0)

``FILE.json`` says what it was measured for: format, model, family, shape_key, the
:class:`DeviceFingerprint`, settings {runtime, threads, batch, seq, dtype, regime, and for decode tables
contexts}, created, profile_seconds, and free-form ``meta`` (e.g. the dense model's measured latency;
``meta["context"]``: the whole dense model timed as export times it, and the context factor,
:mod:`hwprune.latency.context`). Both files are written atomically. Beside them may lie
``FILE.correction.json`` (``hwprune calibrate``, :mod:`hwprune.latency.correction`) and
``FILE.history.json`` (predicted vs measured, appended by export).

Regimes: ``prefill`` (the default; one forward pass over ``seq`` prompt tokens) and ``decode`` (one new
token per call after a KV cache of each of ``settings.contexts`` positions; ``seq`` is 1).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from hwprune._io import atomic_path, write_json
from hwprune.errors import HwpruneError
from hwprune.latency.fingerprint import DeviceFingerprint

if TYPE_CHECKING:
    from hwprune.families._base import Family

__all__ = ["LatencyTable", "TABLE_FORMAT", "COLUMNS", "REGIMES", "table_paths"]

TABLE_FORMAT = "hwprune.table/1"
COLUMNS = {
    "kind": "string",
    "key": "string",
    "size": "int64",
    "size2": "int64",
    "median_ms": "float64",
    "p10_ms": "float64",
    "p90_ms": "float64",
    "n": "int64",
    "context": "int64",
}
REGIMES = ("prefill", "decode")


def table_paths(path: str | Path) -> tuple[Path, Path]:
    """``x``, ``x.parquet`` or ``x.json`` -> (``x.parquet``, ``x.json``)."""
    p = Path(path)
    stem = p.with_suffix("") if p.suffix in (".parquet", ".json") else p
    return stem.with_name(stem.name + ".parquet"), stem.with_name(stem.name + ".json")


@dataclass
class LatencyTable:
    frame: pd.DataFrame
    fingerprint: DeviceFingerprint
    model: str
    family: str
    shape_key: str
    settings: dict[str, Any]
    created: str = ""
    profile_seconds: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    def __post_init__(self) -> None:
        if "context" not in self.frame.columns:  # prefill rows have no KV cache (and older tables no column)
            self.frame = self.frame.assign(context=0)
        missing = [c for c in COLUMNS if c not in self.frame.columns]
        if missing:
            raise HwpruneError(f"{self.path or 'latency table'}: column {missing[0]!r} is missing; re-profile")
        self.frame = self.frame[list(COLUMNS)].astype(COLUMNS).reset_index(drop=True)
        self.created = self.created or time.strftime("%Y-%m-%dT%H:%M:%S%z")

    # ---- lookup -------------------------------------------------------------------------------
    def rows(self, kind: str, key: str = "") -> pd.DataFrame:
        """Rows of one block kind (and key), sorted by size."""
        f = self.frame
        return f[(f["kind"] == kind) & (f["key"] == key)].sort_values(["size", "size2"]).reset_index(drop=True)

    def kinds(self) -> list[str]:
        return sorted(set(self.frame["kind"]))

    @property
    def regime(self) -> str:
        """``prefill`` or ``decode`` (see the module doc)."""
        return str(self.settings.get("regime", "prefill"))

    @property
    def contexts(self) -> list[int]:
        """The KV-cache lengths a decode table was measured at (ascending); ``[]`` for prefill tables."""
        return sorted(int(c) for c in self.settings.get("contexts", [])) if self.regime == "decode" else []

    def at_context(self, context: int) -> "LatencyTable":
        """The rows of one measured context, as a table of their own (what a per-unit predictor reads)."""
        if context not in self.contexts:
            raise HwpruneError(f"{self.path or 'latency table'} has no rows for context {context}")
        frame = self.frame[self.frame["context"] == context].reset_index(drop=True)
        return LatencyTable(
            frame=frame,
            fingerprint=self.fingerprint,
            model=self.model,
            family=self.family,
            shape_key=self.shape_key,
            settings=dict(self.settings),
            created=self.created,
            profile_seconds=self.profile_seconds,
            meta=dict(self.meta.get("contexts", {}).get(str(context), {})),
            path=self.path,
        )

    def per_context(self) -> dict[int, "LatencyTable"]:
        """Every measured context's :meth:`at_context` table."""
        return {c: self.at_context(c) for c in self.contexts}

    def check_regime(self, regime: str) -> None:
        """One line when this table was profiled for the other regime than the one asked for."""
        if self.regime == regime:
            return
        where = f"latency table {self.path}" if self.path else "the latency table"
        if self.regime == "decode":
            what = f"the decode regime (one new token after a KV cache of {', '.join(map(str, self.contexts))})"
            fix = "profile one for prompt latency without --regime decode"
        else:
            what = f"the prefill regime (prompts of {self.settings.get('seq')} tokens)"
            fix = "profile one with --regime decode --context 128,512,1024"
        raise HwpruneError(f"{where} was profiled for {what}, not for {regime}; {fix}")

    @property
    def base_ms(self) -> float:
        return float(self.rows("base")["median_ms"].sum())

    @property
    def context(self) -> dict[str, Any] | None:
        """How the whole dense model timed at profile time against the table's sum (``meta["context"]``,
        written by :func:`hwprune.latency.context.time_context`); None for tables made before it."""
        ctx = self.meta.get("context")
        return dict(ctx) if isinstance(ctx, Mapping) else None

    @property
    def context_factor(self) -> float:
        """Whole-model time measured as export measures it / the table's dense prediction; 1.0 without one."""
        ctx = self.context
        return float(ctx["factor"]) if ctx is not None else 1.0

    @property
    def context_affine(self) -> tuple[float, float] | None:
        """``(scale, offset_ms)`` of the affine context fitted to anchor subnets at profile time
        (``meta["context"]["affine"]``, :func:`hwprune.latency.context.time_context`); None where the
        table has none (made before, or the fit was not sound) and the single factor applies."""
        ctx = self.context
        aff = ctx.get("affine") if ctx is not None else None
        if isinstance(aff, Mapping) and aff.get("applied"):
            return float(aff["scale"]), float(aff["offset_ms"])
        return None

    def digest(self) -> str:
        """SHA-256 (16 hex digits) of the measurements and when they were made: a correction fitted to
        this table's predictions names it, so a re-profiled table does not inherit a stale correction."""
        h = hashlib.sha256(self.frame.to_csv(index=False).encode())
        h.update(self.created.encode())
        h.update(repr(self.context_factor).encode())
        if self.context_affine is not None:
            h.update(repr(self.context_affine).encode())
        return h.hexdigest()[:16]

    # ---- checks -------------------------------------------------------------------------------
    def check_model(self, adapter: "Family") -> None:
        """Raise if this table was measured for another dense shape than ``adapter``'s."""
        mine = adapter.shape_key()
        if self.shape_key != mine:
            raise HwpruneError(
                f"latency table {self.path or ''} was measured for {self.shape_key} ({self.model}), "
                f"not for this model's shape {mine}; profile it: hwprune profile --model {adapter.name}"
            )

    def machine_warnings(self, backend_name: str, threads: int) -> list[str]:
        """One warning per difference between the table's fingerprint and this machine with these settings."""
        s = self.settings
        try:
            here = DeviceFingerprint.current(
                backend_name,
                threads=threads,
                batch=int(s.get("batch", 1)),
                seq=int(s.get("seq", 0)),
                dtype=str(s.get("dtype", "float32")),
            )
        except HwpruneError as e:
            return [f"cannot fingerprint runtime {backend_name} here ({e})"]
        where = self.path.name if self.path else "the latency table"
        return [
            f"{where} differs from this setup in {m} (table vs here); predictions may be off, re-profile here: "
            f"hwprune profile --model {self.model} -o {self.path or 'TABLE.parquet'}"
            for m in self.fingerprint.mismatches(here)
        ]

    # ---- files --------------------------------------------------------------------------------
    def sidecar(self) -> dict[str, Any]:
        return {
            "format": TABLE_FORMAT,
            "model": self.model,
            "family": self.family,
            "shape_key": self.shape_key,
            "fingerprint": self.fingerprint.to_json(),
            "settings": dict(self.settings),
            "created": self.created,
            "profile_seconds": round(float(self.profile_seconds), 2),
            "meta": _jsonable(self.meta),
        }

    def save(self, path: str | Path) -> Path:
        """Write ``FILE.parquet`` and ``FILE.json`` atomically; returns the parquet path."""
        pq, js = table_paths(path)
        with atomic_path(pq) as tmp:
            self.frame.to_parquet(tmp, index=False)
        write_json(js, self.sidecar())
        self.path = pq
        return pq

    @classmethod
    def load(cls, path: str | Path) -> "LatencyTable":
        pq, js = table_paths(path)
        if not pq.is_file():
            raise HwpruneError(f"latency table {pq} does not exist; make one with: hwprune profile --model M -o {pq}")
        if not js.is_file():
            raise HwpruneError(f"{js} is missing; a latency table is {pq.name} plus its JSON sidecar, re-profile")
        try:
            frame = pd.read_parquet(pq)
        except Exception as e:
            raise HwpruneError(
                f"{pq}: not a readable parquet file ({_first_line(e)}); re-profile to rebuild it"
            ) from None
        try:
            side = json.loads(js.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise HwpruneError(f"{js}: corrupt JSON sidecar ({_first_line(e)}); re-profile to rebuild it") from None
        if not isinstance(side, dict) or side.get("format") != TABLE_FORMAT:
            got = side.get("format") if isinstance(side, dict) else type(side).__name__
            raise HwpruneError(f"{js}: format {got!r} is not {TABLE_FORMAT!r}; re-profile with this hwprune version")
        try:
            fp = DeviceFingerprint.from_json(side["fingerprint"], where=str(js))
            return cls(
                frame=frame,
                fingerprint=fp,
                model=str(side["model"]),
                family=str(side["family"]),
                shape_key=str(side["shape_key"]),
                settings=dict(side["settings"]),
                created=str(side.get("created", "")),
                profile_seconds=float(side.get("profile_seconds", 0.0)),
                meta=dict(side.get("meta", {})),
                path=pq,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise HwpruneError(f"{js}: sidecar lacks or mangles {_first_line(e)}; re-profile to rebuild it") from None


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj
