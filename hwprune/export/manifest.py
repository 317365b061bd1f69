"""``manifest.json``: what an exported candidate claims, and the evidence for it.

Every number a user might quote sits beside the one it should be compared with: predicted vs
measured latency, predicted vs measured speedup, pruned vs dense params and FLOPs. Conventions:

- latencies in ms, one forward pass at ``settings.batch`` x ``settings.seq``; for runs searched with
  ``--regime decode|serve`` they are that objective instead (the mean decode step, i.e. 1 / tokens-per-s,
  or one request's latency), measured on the decode graphs, with the breakdown in ``extra.workload``;
- ``measured_speedup = dense_measured_ms / measured_ms`` (both timed in the same process, interleaved);
- ``predicted_speedup = dense_predicted_ms / predicted_ms`` (both from the latency table);
- ``prediction_error_pct = 100 * (predicted_ms - measured_ms) / measured_ms``: **the headline**, raw
  (no rescaling); positive means the table was pessimistic (the model ran faster than predicted);
- ``speedup_error_pct = 100 * (measured_speedup / predicted_speedup - 1)``: the error of the predicted
  *speedup*, i.e. the prediction rescaled by the dense model measured in the same run. It stands beside
  the raw error, never instead of it (manifests before issue 10 called it
  ``prediction_error_drift_adjusted_pct``; :func:`read_manifest` renames it);
- ``base_predicted_ms`` / ``dense_base_predicted_ms``: the table's block sum times its context factor,
  before any calibration correction (what ``hwprune calibrate`` fits against); ``latency_model`` says
  which context factor and which correction (version, scale, offset, residual) turned them into
  ``predicted_ms`` (:mod:`hwprune.latency.correction`); None in manifests written before;
- ``dense_prediction_error_pct``: the raw error of the dense model itself (was ``dense_drift_pct``, as
  ``100 * (dense_measured / dense_predicted - 1)``); where it is large, so is the raw error;
- ``settings.pages``: how this process's memory was paged (``huge`` / ``4k``, :mod:`hwprune.latency.pages`);
- ``dense_control_pct``: the dense model's second session against its first, timed in the same rounds
  (:mod:`hwprune.export.measure`): the noise floor of ``measured_speedup``; ``warnings`` says when it
  exceeds ``control_tol_pct``, or when the process used more CPU than the timing thread
  (``cpu_excess_pct``);
- ``measured_wall_ms`` / ``dense_measured_wall_ms``: the same medians on the wall clock, beside the
  ``settings.clock`` ones (thread CPU time for one-thread CPU runs, a lower bound);
- ``flops`` = 2 x MACs of the matrix products and convolutions (see :mod:`hwprune.export.stats`);
- ``plan`` is the family's readable summary of the kept sizes (``Family.plan_summary``);
- ``graphs``: the family's further ONNX graphs (``Family.extra_graphs``), role -> file, parity and how
  to drive it (a decoder's ``decoder`` graph: cache convention, token ids, max positions);
- ``extra.distill`` (exports with ``--distill-steps``): the recovery distillation the saved weights went
  through (:mod:`hwprune.export.distill`: settings, the ``calibration`` split and its rows, first / last
  loss, seconds, the selection scores before and after); ``scores`` are then the distilled model's.
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
from hwprune.export.measure import CONTROL_TOL_PCT, Measurement
from hwprune.export.stats import ModelStats
from hwprune.latency.pages import page_mode

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
    base_predicted_ms: float | None = None  # before the calibration correction (context factor applied)
    dense_base_predicted_ms: float | None = None
    latency_model: Mapping[str, Any] | None = None  # context factor and correction applied


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
    graphs: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest as a JSON-ready dict (key order is the order a reader wants)."""
    pred, dense_pred = prediction.predicted_ms, prediction.dense_predicted_ms
    meas, dense_meas = measurement.measured_ms, measurement.dense_ms
    evidence = measurement.evidence_json()  # dense_control_pct, wall ms, cpu_excess_pct, warnings
    dense_err = None if dense_pred is None else 100.0 * (dense_pred - dense_meas) / dense_meas
    drift = drift_warning(dense_err)
    if drift:
        evidence["warnings"] = [*(evidence.get("warnings") or []), drift]
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
        "speedup_error_pct": None
        if pred is None or dense_pred is None
        else 100 * (pred * dense_meas / dense_pred - meas) / meas,
        "dense_prediction_error_pct": dense_err,
        "base_predicted_ms": prediction.base_predicted_ms,
        "dense_base_predicted_ms": prediction.dense_base_predicted_ms,
        "latency_model": dict(prediction.latency_model) if prediction.latency_model is not None else None,
        **evidence,
        "control_tol_pct": CONTROL_TOL_PCT,
        "parity_max_abs_diff": parity_max_abs_diff,
        "parity_tol": parity_tol,
        "scores": dict(scores or {}),
        "params": stats.params,
        "dense_params": dense_stats.params,
        "flops": stats.flops,
        "dense_flops": dense_stats.flops,
        "flops_convention": "2 x MACs of matmuls and convs, one forward at settings.batch x settings.seq",
        "fingerprint": _fingerprint_json(fingerprint),
        "settings": {**dict(settings), "clock": measurement.clock, "pages": page_mode()},  # this process's
        "timings": measurement.timings_json(),
        "plan": dict(plan_summary),
        "files": dict(files or {}),
        "graphs": dict(graphs or {}),
        "versions": versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "extra": dict(extra or {}),
    }


DENSE_DRIFT_TOL_PCT = 5.0  # the dense model's own raw error above which the table no longer describes the machine


def drift_warning(dense_error_pct: float | None) -> str | None:
    """One line when the dense model, measured now, is far from what its table predicts: the machine
    changed since the profile (another tenant, clocks, memory bandwidth), so every raw prediction of this
    export is off by about as much; the speedups, measured in one process, still stand."""
    if dense_error_pct is None or abs(dense_error_pct) <= DENSE_DRIFT_TOL_PCT:
        return None
    way = "slower" if dense_error_pct < 0 else "faster"
    meas = 100.0 / (1.0 + dense_error_pct / 100.0) - 100.0  # measured vs predicted, in % of the prediction
    return (
        f"the dense model measured {abs(meas):.0f} % {way} than its latency table predicts: this machine is not "
        "timing as it did when the table was profiled (load, clocks or memory bandwidth), so raw predictions are "
        "off by about that much; re-profile when the machine is as it will be in use, or fit a correction: "
        "hwprune calibrate RUN --remeasure"
    )


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
    _upgrade(m)
    missing = [k for k in _REQUIRED if k not in m]
    if missing:
        raise HwpruneError(f"{path}: manifest lacks {', '.join(missing)}; export the candidate again")
    return m


def _upgrade(m: dict[str, Any]) -> None:
    """Rename the fields of manifests written before issue 10 in place (the numbers are unchanged)."""
    if "prediction_error_drift_adjusted_pct" in m:
        m.setdefault("speedup_error_pct", m.pop("prediction_error_drift_adjusted_pct"))
    drift = m.pop("dense_drift_pct", None)  # 100 * (dense_measured / dense_predicted - 1)
    if drift is not None and "dense_prediction_error_pct" not in m:
        m["dense_prediction_error_pct"] = 100.0 * (1.0 / (1.0 + drift / 100.0) - 1.0)
    m.setdefault("dense_control_pct", None)  # not measured then
    m.setdefault("warnings", [])
    m.setdefault("graphs", {})  # further ONNX graphs (issue 9): none then
    for k in ("base_predicted_ms", "dense_base_predicted_ms", "latency_model"):  # before the context factor
        m.setdefault(k, None)
