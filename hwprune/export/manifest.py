"""``manifest.json``: what an exported candidate claims, and the evidence for it.

Every number a user might quote sits beside the one it should be compared with: predicted vs
measured latency, predicted vs measured speedup, pruned vs dense params and FLOPs. Conventions:

- latencies in ms, one forward pass at ``settings.batch`` x ``settings.seq``;
- ``measured_speedup = dense_measured_ms / measured_ms`` (both timed in the same process, interleaved);
- ``predicted_speedup = dense_predicted_ms / predicted_ms`` (both from the latency table);
- ``prediction_error_pct = 100 * (predicted_ms - measured_ms) / measured_ms``: positive means the table
  was pessimistic (the model ran faster than predicted);
- ``flops`` = 2 x MACs of the matrix products (see :mod:`hwprune.export.stats`).
"""

from __future__ import annotations

import datetime as _dt
import platform
from pathlib import Path
from typing import Any, Mapping

from hwprune._io import read_json
from hwprune.errors import HwpruneError
from hwprune.export.measure import Comparison, Measured
from hwprune.export.stats import ModelStats
from hwprune.surgery.plan import Plan

__all__ = ["MANIFEST_FORMAT", "build_manifest", "read_manifest", "versions", "plan_summary"]

MANIFEST_FORMAT = "hwprune.manifest/1"
_REQUIRED = ("format", "measured_ms", "dense_measured_ms", "measured_speedup", "parity_max_abs_diff", "settings")


def versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import torch

    import hwprune

    return {"hwprune": hwprune.__version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "python": platform.python_version()}


def plan_summary(plan: Plan) -> dict[str, Any]:
    """Kept sizes per unit, plus per-layer ``heads``/``ffn`` lists for encoders (easy to eyeball)."""
    sizes = plan.sizes()
    out: dict[str, Any] = {"family": plan.family, "pruned_units": len(sizes), "sizes": sizes}
    if plan.family == "encoder":
        n, heads, ffn = int(plan.arch["num_layers"]), int(plan.arch["num_heads"]), int(plan.arch["intermediate_size"])
        out["heads"] = [sizes.get(f"layer.{i}.heads", heads) for i in range(n)]
        out["ffn"] = [sizes.get(f"layer.{i}.ffn", ffn) for i in range(n)]
        out["dense_heads"], out["dense_ffn"] = heads, ffn
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def _fingerprint_json(fp: Any) -> Any:
    if fp is None or isinstance(fp, (Mapping, str)):
        return dict(fp) if isinstance(fp, Mapping) else fp
    if hasattr(fp, "to_json"):
        return fp.to_json()
    raise TypeError(f"fingerprint must be a mapping, a string or have to_json(); got {type(fp).__name__}")


def build_manifest(
    *,
    plan: Plan,
    measured_ms: float,
    dense_measured_ms: float,
    parity_max_abs_diff: float,
    parity_tol: float,
    stats: ModelStats,
    dense_stats: ModelStats,
    settings: Mapping[str, Any],
    timing: Comparison | None = None,
    timing_key: str | None = None,
    predicted_ms: float | None = None,
    dense_predicted_ms: float | None = None,
    target_speedup: float | None = None,
    scores: Mapping[str, float] | None = None,
    fingerprint: Any = None,
    files: Mapping[str, str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest as a JSON-ready dict (key order is the order a reader wants)."""
    pred_err = None if predicted_ms is None else 100.0 * (predicted_ms - measured_ms) / measured_ms
    timings: dict[str, Any] | None = None
    if timing is not None and timing_key is not None:
        p: Measured = timing.pruned[timing_key]
        timings = {"dense": timing.dense.to_json(), "pruned": p.to_json(), "source": "interleaved"}
    return {
        "format": MANIFEST_FORMAT,
        "target_speedup": target_speedup,
        "predicted_ms": predicted_ms,
        "measured_ms": measured_ms,
        "dense_predicted_ms": dense_predicted_ms,
        "dense_measured_ms": dense_measured_ms,
        "predicted_speedup": _ratio(dense_predicted_ms, predicted_ms),
        "measured_speedup": dense_measured_ms / measured_ms,
        "prediction_error_pct": pred_err,
        # the device's speed now vs when the table was measured (load, clocks): >0 means slower now.
        # Dividing it out isolates the predictor's own error from the machine's drift.
        "dense_drift_pct": None if dense_predicted_ms is None else 100 * (dense_measured_ms / dense_predicted_ms - 1),
        "prediction_error_drift_adjusted_pct": None if predicted_ms is None or dense_predicted_ms is None else
        100 * (predicted_ms * dense_measured_ms / dense_predicted_ms - measured_ms) / measured_ms,
        "parity_max_abs_diff": parity_max_abs_diff,
        "parity_tol": parity_tol,
        "scores": dict(scores or {}),
        "params": stats.params,
        "dense_params": dense_stats.params,
        "flops": stats.flops,
        "dense_flops": dense_stats.flops,
        "flops_convention": "2 x MACs of matmuls, one forward at settings.batch x settings.seq",
        "fingerprint": _fingerprint_json(fingerprint),
        "settings": dict(settings),
        "timings": timings if timings is not None else {"source": "supplied"},
        "plan": plan_summary(plan),
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
