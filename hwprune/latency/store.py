"""A latency-table registry for a fleet: one folder per table, named by what it was measured on.

Layout of a store ``DIR`` (plain files; copy, rsync or commit them)::

    DIR/<device>--<id>/table.parquet   the LatencyTable (see hwprune.latency.table)
    DIR/<device>--<id>/table.json      its sidecar: fingerprint, settings, created, model, shape
    DIR/<device>--<id>/table.history.json     optional: predicted-vs-measured records (format below;
                                              ``history.json``, its name before issue 10, is read too)
    DIR/<device>--<id>/table.correction.json  optional: the calibration correction (hwprune.latency.correction)

``<device>`` is the name given to ``hwprune profile --store DIR --device NAME`` (default: the CPU or
GPU model and the runtime, slugged); ``<id>`` is the first 12 hex digits of the SHA-256 of the
fingerprint fields that change latency, the model, its shape and the settings, so re-profiling the
same thing replaces its folder and anything different gets its own.

A table outside a store keeps the same files beside it: ``x.parquet``, ``x.json``, ``x.history.json``,
``x.correction.json`` (:func:`hwprune.latency.correction.companion_path`).

``table.history.json`` (read by ``hwprune tables show``; ``hwprune export`` and ``calibrate --remeasure``
append to it, :func:`append_history`; tools may append, keep the keys)::

    {"format": "hwprune.table-history/1",
     "entries": [{"when": ISO time, "key": candidate key, "predicted_ms": float, "measured_ms": float,
                  "error_pct": float, "source": free text (e.g. "export runs/x")}, ...]}
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hwprune._io import atomic_dir, read_json
from hwprune.errors import HwpruneError
from hwprune.latency.fingerprint import _COMPARED
from hwprune.latency.table import LatencyTable

__all__ = [
    "StoredTable",
    "table_id",
    "file_table",
    "list_tables",
    "find_table",
    "for_device",
    "diff",
    "history",
    "read_history",
    "append_history",
]

HISTORY_FORMAT = "hwprune.table-history/1"
_HISTORY_NAMES = ("table.history.json", "history.json")  # now, and before issue 10


@dataclass(frozen=True)
class StoredTable:
    folder: Path
    device: str
    id: str
    sidecar: dict[str, Any]

    @property
    def path(self) -> Path:
        return self.folder / "table.parquet"

    @property
    def name(self) -> str:
        return self.folder.name


def table_id(table: LatencyTable) -> str:
    fp = table.fingerprint.to_json()
    key = {
        "fingerprint": {f: fp.get(f) for f, _ in _COMPARED},
        "model": table.model,
        "shape_key": table.shape_key,
        "settings": dict(sorted(table.settings.items())),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")[:48] or "device"


def default_device(table: LatencyTable) -> str:
    fp = table.fingerprint
    return _slug(f"{fp.gpu or fp.cpu} {fp.runtime} t{fp.threads}")


def file_table(table: LatencyTable, store: str | Path, *, device: str | None = None) -> StoredTable:
    """Save ``table`` into the store under its fingerprint (atomically; the same id is replaced)."""
    dev = _slug(device) if device else default_device(table)
    tid = table_id(table)
    store = Path(store)
    for old in store.glob(f"*--{tid}"):  # the same measurement filed under another device name
        if old.name != f"{dev}--{tid}":
            raise HwpruneError(
                f"{store} already holds this table as {old.name}; use --device {old.name.split('--')[0]}"
            )
    folder = store / f"{dev}--{tid}"
    keep = {n: (folder / n).read_bytes() for n in _HISTORY_NAMES if (folder / n).is_file()}
    with atomic_dir(folder) as tmp:
        table.save(tmp / "table.parquet")
        # re-profiling keeps the record of predicted vs measured; table.correction.json is dropped: it
        # was fitted to the old measurements (hwprune calibrate fits a new one)
        for n, data in keep.items():
            (tmp / n).write_bytes(data)
    table.path = folder / "table.parquet"
    return StoredTable(folder=folder, device=dev, id=tid, sidecar=table.sidecar())


def list_tables(store: str | Path) -> list[StoredTable]:
    store = Path(store)
    if not store.is_dir():
        raise HwpruneError(f"no table store at {store}; file one with: hwprune profile --store {store}")
    out = []
    for folder in sorted(p for p in store.iterdir() if p.is_dir() and "--" in p.name):
        js = folder / "table.json"
        if not js.is_file():
            continue
        try:
            side = read_json(js)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise HwpruneError(f"{js}: corrupt JSON sidecar; re-profile into the store or delete {folder}") from None
        dev, _, tid = folder.name.rpartition("--")
        out.append(StoredTable(folder=folder, device=dev, id=tid, sidecar=side))
    return out


def find_table(store: str | Path, ref: str) -> StoredTable:
    """A table by folder name, id (or its prefix) or device name when that names one table."""
    tables = list_tables(store)
    hits = [t for t in tables if ref in (t.name, t.device) or t.id.startswith(ref)]
    if len(hits) == 1:
        return hits[0]
    names = ", ".join(t.name for t in (hits or tables)) or "none"
    what = "matches several tables" if hits else "matches no table"
    raise HwpruneError(f"{ref!r} {what} in {store} ({names}); give a folder name from hwprune tables list")


def for_device(store: str | Path, *, device: str, model: str, shape_key: str) -> Path:
    """The table of ``model`` (with this shape) measured on ``device``: ``search --device``."""
    tables = list_tables(store)
    on = [t for t in tables if device in (t.device, t.name) or t.id.startswith(device)]
    hits = [t for t in on if t.sidecar.get("shape_key") == shape_key]  # the model's dense shape decides
    if len(hits) == 1:
        return hits[0].path
    if not hits:
        have = ", ".join(sorted({t.device for t in tables})) or "none"
        raise HwpruneError(
            f"no table for {model} on device {device!r} in {store} (devices there: {have}); "
            f"profile it there: hwprune profile --model {model} --store {store} --device {device}"
        )
    names = ", ".join(f"{t.name} (seq {t.sidecar.get('settings', {}).get('seq')})" for t in hits)
    raise HwpruneError(f"several tables for {model} on {device!r} ({names}); pass --table with one of them")


def history(t: StoredTable) -> list[dict[str, Any]]:
    return read_history(t.path)


def read_history(table_path: str | Path) -> list[dict[str, Any]]:
    """The predicted-vs-measured records of the table at ``table_path`` (empty when none)."""
    from hwprune.latency.correction import companion_path

    p = companion_path(table_path, "history")
    legacy = Path(table_path).parent / _HISTORY_NAMES[1]
    if not p.is_file() and Path(table_path).name == "table.parquet" and legacy.is_file():
        p = legacy  # a store folder written before issue 10
    if not p.is_file():
        return []
    try:
        doc = read_json(p)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise HwpruneError(f"{p}: corrupt JSON; fix or delete it (format {HISTORY_FORMAT})") from None
    if not isinstance(doc, dict) or doc.get("format") != HISTORY_FORMAT or not isinstance(doc.get("entries"), list):
        raise HwpruneError(f"{p}: not a {HISTORY_FORMAT} document (a dict with 'format' and 'entries')")
    return [e for e in doc["entries"] if isinstance(e, dict)]


def diff(a: StoredTable, b: StoredTable) -> list[str]:
    """What differs between two stored tables: fingerprint, settings, then per-block median ms."""
    lines = []
    fa, fb = a.sidecar.get("fingerprint", {}), b.sidecar.get("fingerprint", {})
    for f, label in (*_COMPARED, ("torch_version", "torch"), ("onnx_version", "onnx")):
        if fa.get(f) != fb.get(f):
            lines.append(f"{label}: {fa.get(f)!r} vs {fb.get(f)!r}")
    for k in ("model", "shape_key"):
        if a.sidecar.get(k) != b.sidecar.get(k):
            lines.append(f"{k}: {a.sidecar.get(k)!r} vs {b.sidecar.get(k)!r}")
    sa, sb = a.sidecar.get("settings", {}), b.sidecar.get("settings", {})
    lines += [
        f"setting {k}: {sa.get(k)!r} vs {sb.get(k)!r}" for k in sorted(set(sa) | set(sb)) if sa.get(k) != sb.get(k)
    ]
    ta, tb = LatencyTable.load(a.path).frame, LatencyTable.load(b.path).frame
    on = ["kind", "key", "size", "size2", "context"]
    m = ta.merge(tb, on=on, how="inner", suffixes=("_a", "_b"))
    if len(m):
        rel = (m["median_ms_b"] / m["median_ms_a"] - 1) * 100
        lines.append(
            f"{len(m)} blocks in both ({len(ta) - len(m)} only in the first, {len(tb) - len(m)} only in the second): "
            f"median ms second vs first {rel.median():+.1f} % (range {rel.min():+.1f} % to {rel.max():+.1f} %)"
        )
    else:
        lines.append("no block shape in common")
    return lines


def append_history(table_path: str | Path, entries: list[dict[str, Any]]) -> Path:
    """Add ``entries`` (keys as in the module doc) to the table's history; written atomically."""
    from hwprune._io import write_json
    from hwprune.latency.correction import companion_path

    p = companion_path(table_path, "history")
    old = read_history(table_path)  # a legacy history.json is carried over into the new name
    write_json(p, {"format": HISTORY_FORMAT, "entries": [*old, *entries]})
    return p
