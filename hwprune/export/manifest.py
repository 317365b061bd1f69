"""``manifest.json``: what an exported candidate claims, and the evidence for it.

Every number a user might quote sits beside the one it should be compared with: predicted vs
measured latency, predicted vs measured speedup, pruned vs dense params and FLOPs. Conventions:

- latencies in ms, one forward pass at ``settings.batch`` x ``settings.seq``;
- ``measured_speedup = dense_measured_ms / measured_ms`` (both timed in the same process, interleaved);
- ``predicted_speedup = dense_predicted_ms / predicted_ms`` (both from the latency table);
- ``prediction_error_pct = 100 * (predicted_ms - measured_ms) / measured_ms``: positive means the table
  was pessimistic (the model ran faster than predicted);
- ``flops`` = 2 x MACs of the matrix products and convolutions (see :mod:`hwprune.export.stats`);
- ``plan`` is the family's readable summary of the kept sizes (``Family.plan_summary``).
"""

from __future__ import annotations

import datetime as _dt
import platform
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hwprune._io import read_json
from hwprune.errors import HwpruneError
from hwprune.export.measure import Measurement
from hwprune.export.stats import ModelStats

__all__ = ["MANIFEST_FORMAT", "Prediction", "build_manifest", "read_manifest", "versions"]

MANIFEST_FORMAT = "hwprune.manifest/1"
_REQUIRED = ("format", "measured_ms", "dense_measured_ms", "measured_speedup", "parity_max_abs_diff", "settings")


def versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import torch

    import hwprune

    return {
        "hwprune": hwprune.__version__,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "python": platform.python_version(),
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def _fingerprint_json(fp: Any) -> Any:
    if fp is None or isinstance(fp, (Mapping, str)):
        return dict(fp) if isinstance(fp, Mapping) else fp
    if hasattr(fp, "to_json"):
        return fp.to_json()
    raise TypeError(f"fingerprint must be a mapping, a string or have to_json(); got {type(fp).__name__}")


@dataclass(frozen=True)
class Prediction:
    """What the latency table predicted for a candidate and for the dense model, and the target asked for."""

    predicted_ms: float | None = None
    dense_predicted_ms: float | None = None
    target_speedup: float | None = None


def build_manifest(
    *,
    plan_summary: Mapping[str, Any],
    measurement: Measurement,
    parity_max_abs_diff: float,
    parity_tol: float,
    stats: ModelStats,
    dense_stats: ModelStats,
    settings: Mapping[str, Any],
    prediction: Prediction = Prediction(),
    scores: Mapping[str, float] | None = None,
    fingerprint: Any = None,
    files: Mapping[str, str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest as a JSON-ready dict (key order is the order a reader wants)."""
    pred, dense_pred = prediction.predicted_ms, prediction.dense_predicted_ms
    meas, dense_meas = measurement.measured_ms, measurement.dense_ms
    return {
        "format": MANIFEST_FORMAT,
        "target_speedup": prediction.target_speedup,
        "predicted_ms": pred,
        "measured_ms": meas,
        "dense_predicted_ms": dense_pred,
        "dense_measured_ms": dense_meas,
        "predicted_speedup": _ratio(dense_pred, pred),
        "measured_speedup": measurement.speedup,
        "prediction_error_pct": None if pred is None else 100.0 * (pred - meas) / meas,
        # the device's speed now vs when the table was measured (load, clocks): >0 means slower now.
        # Dividing it out isolates the predictor's own error from the machine's drift.
        "dense_drift_pct": None if dense_pred is None else 100 * (dense_meas / dense_pred - 1),
        "prediction_error_drift_adjusted_pct": None
        if pred is None or dense_pred is None
        else 100 * (pred * dense_meas / dense_pred - meas) / meas,
        "parity_max_abs_diff": parity_max_abs_diff,
        "parity_tol": parity_tol,
        "scores": dict(scores or {}),
        "params": stats.params,
        "dense_params": dense_stats.params,
        "flops": stats.flops,
        "dense_flops": dense_stats.flops,
        "flops_convention": "2 x MACs of matmuls and convs, one forward at settings.batch x settings.seq",
        "fingerprint": _fingerprint_json(fingerprint),
        "settings": {**dict(settings), "clock": measurement.clock},
        "timings": measurement.timings_json(),
        "plan": dict(plan_summary),
        "files": dict(files or {}),
        "versions": versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "extra": dict(extra or {}),
    }


def read_manifest(path: str | Path) -> dict[str, Any]:
    """Read ``manifest.json`` (or the folder holding it) and check it is one of ours."""
    path = Path(path)
    if path.is_dir():
        path = path / "manifest.json"
    if not path.is_file():
        raise HwpruneError(f"{path} does not exist; an exported candidate folder holds manifest.json")
    try:
        m = read_json(path)
    except ValueError as e:
        raise HwpruneError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT:
        got = m.get("format") if isinstance(m, dict) else type(m).__name__
        raise HwpruneError(f"{path}: not a hwprune manifest (format {got!r}, expected {MANIFEST_FORMAT!r})")
    missing = [k for k in _REQUIRED if k not in m]
    if missing:
        raise HwpruneError(f"{path}: manifest lacks {', '.join(missing)}; export the candidate again")
    return m
