"""The three jobs as Python functions: profile, search, export. The CLI is a thin layer over these.

Each takes plain arguments (or a config), validates everything it can *before* writing anything,
and writes its outputs atomically, so a bad input never leaves a half-written run behind.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from hwprune._io import read_json, write_json
from hwprune.errors import HwpruneError
from hwprune.models import ModelAdapter, resolve_model

__all__ = ["default_table_path", "run_profile", "SearchRequest", "run_search", "run_export", "load_adapter"]

Log = Callable[[str], None]
TABLES_DIR = Path("latency_tables")


def _noop(msg: str) -> None:
    pass


def load_adapter(model: str, *, weights: str | None = None, input_shape: Sequence[int] | None = None) -> ModelAdapter:
    kw: dict[str, Any] = {}
    if weights is not None:
        kw["weights"] = weights
    if input_shape is not None:
        kw["input_shape"] = tuple(input_shape)
    adapter = resolve_model(model)
    if kw:
        configure = getattr(adapter, "configure", None)
        if configure is None:
            raise HwpruneError(f"--weights/--input-shape apply to CNN models; {model!r} does not take them")
        adapter = configure(**kw)
    return adapter


def default_table_path(adapter: ModelAdapter, *, runtime: str, threads: int, batch: int, seq: int) -> Path:
    tag = getattr(adapter, "shape_tag", None)
    shape = tag() if callable(tag) else f"s{seq}"
    return TABLES_DIR / f"{adapter.name}_{runtime}_t{threads}_b{batch}_{shape}.parquet"


def run_profile(model: str, *, runtime: str = "ort-cpu", threads: int = 1, batch: int = 1, seq: int = 128,
                out: str | Path | None = None, space_file: str | Path | None = None,
                weights: str | None = None, input_shape: Sequence[int] | None = None,
                progress: bool = True) -> tuple[Any, Path]:
    from hwprune.latency import profile

    if batch < 1 or seq < 1:
        raise HwpruneError(f"--batch and --seq must be >= 1 (got batch={batch}, seq={seq})")
    adapter = load_adapter(model, weights=weights, input_shape=input_shape)
    space = adapter.space(space_file)
    path = Path(out) if out else default_table_path(adapter, runtime=runtime, threads=threads, batch=batch, seq=seq)
    if path.suffix != ".parquet":
        raise HwpruneError(f"-o {path}: a latency table is a .parquet file (its fingerprint goes beside it as .json)")
    table = profile(adapter, runtime=runtime, threads=threads, batch=batch, seq=seq, space=space, out=path,
                    progress=progress)
    return table, path


@dataclass(frozen=True)
class SearchRequest:
    model: str = "minilm"
    table: str | None = None
    targets: tuple[float, ...] = (2.0,)
    proxy: str = "obs"
    calib: str | None = None
    space: str | None = None
    trials: int = 150
    seed: int = 0
    margin: float = 0.01
    n_calib: int = 128
    n_heldout: int = 64
    out: str = "runs/latest"
    weights: str | None = None
    input_shape: tuple[int, ...] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["targets"] = list(self.targets)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "SearchRequest":
        d = dict(d)
        d["targets"] = tuple(d["targets"])
        if d.get("input_shape") is not None:
            d["input_shape"] = tuple(d["input_shape"])
        return cls(**d)


def _table_settings(table: Any) -> dict[str, Any]:
    return dict(table.meta.get("settings", {}))
