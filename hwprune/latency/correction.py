"""What turns a table's block sums into the milliseconds an export measures: context factor, then correction.

``predicted = scale * (factor * block_sum) + offset_ms``

- ``factor`` is the table's own context factor (:mod:`hwprune.latency.context`; 1 for older tables);
  ``factor * block_sum`` is the **base prediction** (``base_predicted_ms`` in manifests).
- ``scale`` and ``offset_ms`` come from ``hwprune calibrate RUN...``: a least-squares fit of measured
  against base-predicted milliseconds of exported candidates and their dense models. They are stored
  beside the table in ``<table>.correction.json``::

    {"format": "hwprune.table-correction/1", "version": int (1, 2, ... per calibrate),
     "scale": float, "offset_ms": float, "residual_rms_ms": float, "residual_max_pct": float,
     "n_points": int, "fitted_to": "base_predicted_ms", "created": ISO time,
     "table": {"path", "digest", "created", "model", "shape_key"},
     "fingerprint": DeviceFingerprint of the measurements: this machine's with --remeasure, else the
                    table's (manifests are measured where export ran, normally where it was profiled),
     "source": "manifests" | "remeasured", "runs": [run folders],
     "points": [{"run", "key", "base_predicted_ms", "measured_ms", "exported_predicted_ms", "dense"}, ...],
     "previous": [earlier versions without their points]}

  A correction names its table by :meth:`LatencyTable.digest`: after a re-profile it is not applied
  (a warning says to calibrate again). One fitted on another machine is applied with a warning.

With no correction file the prediction is ``factor * block_sum``, unchanged.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hwprune._io import read_json, write_json
from hwprune.errors import HwpruneError
from hwprune.latency.fingerprint import DeviceFingerprint
from hwprune.latency.predictor import CostsPredictor, Predictor
from hwprune.latency.table import LatencyTable, table_paths
from hwprune.space import Candidate

__all__ = [
    "CORRECTION_FORMAT",
    "Correction",
    "CorrectedPredictor",
    "Fit",
    "fit_affine",
    "companion_path",
    "correction_path",
    "load_correction",
    "save_correction",
    "corrected",
    "with_context_factor",
    "PartScaledPredictor",
    "decode_context_info",
]

CORRECTION_FORMAT = "hwprune.table-correction/1"
Log = Callable[[str], None]
_warned: set[tuple[str, str]] = set()  # (table, what): a warning is said once per process


def _noop(msg: str) -> None:
    pass


def companion_path(table_path: str | Path, name: str) -> Path:
    """A file that belongs to a table: ``x.<name>.json`` beside ``x.parquet`` (in a registry folder,
    ``table.<name>.json``; see :mod:`hwprune.latency.store`)."""
    pq, _ = table_paths(table_path)
    return pq.with_name(f"{pq.name[: -len('.parquet')]}.{name}.json")


def correction_path(table_path: str | Path) -> Path:
    return companion_path(table_path, "correction")


@dataclass(frozen=True)
class Fit:
    """``measured = scale * predicted + offset_ms``, least squares on relative error, with its residuals."""

    scale: float
    offset_ms: float
    residual_rms_ms: float
    residual_max_pct: float  # max |measured - fitted| / measured, in %
    n_points: int

    def __call__(self, predicted: float) -> float:
        return self.scale * predicted + self.offset_ms


def fit_affine(predicted: Sequence[float], measured: Sequence[float]) -> Fit:
    """``measured = a * predicted + b`` minimising the summed squared *relative* error
    ``((a x + b - y) / y)^2``: the raw error in % is what every manifest states, so a 2 ms subnet's 3 %
    weighs as much as the dense model's 3 %, where plain least squares in ms would let the slowest points
    decide. Needs two distinct predictions and gives a > 0."""
    x, y = np.asarray(predicted, dtype=np.float64), np.asarray(measured, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise HwpruneError(f"calibration needs as many predictions as measurements (got {x.shape}, {y.shape})")
    if not (np.isfinite(x).all() and np.isfinite(y).all() and (x > 0).all() and (y > 0).all()):
        raise HwpruneError("calibration points must be finite and > 0 ms; a manifest holds a bad number")
    if len(np.unique(np.round(x, 9))) < 2:
        raise HwpruneError(
            f"calibration needs at least two different predicted latencies (got {len(x)} point(s)); "
            "export more candidates (hwprune export RUN --pick all) or pass more runs"
        )
    design = np.stack([x / y, 1.0 / y], 1)  # rows scaled by 1/y: residual (a x + b - y) / y
    (a, b), *_ = np.linalg.lstsq(design, np.ones_like(y), rcond=None)
    if not a > 0:
        raise HwpruneError(
            f"the fitted scale {a:.3g} is not positive: measured latency does not grow with predicted latency "
            "in these runs (a busy machine?); re-run with --remeasure"
        )
    res = y - (a * x + b)
    return Fit(
        scale=float(a),
        offset_ms=float(b),
        residual_rms_ms=float(np.sqrt(np.mean(res**2))),
        residual_max_pct=float(np.max(np.abs(res) / y) * 100),
        n_points=len(x),
    )


@dataclass(frozen=True)
class Correction:
    """A stored per-table correction (see the module doc for the file)."""

    fit: Fit
    version: int
    table: Mapping[str, Any]
    fingerprint: Mapping[str, Any]
    source: str
    runs: tuple[str, ...]
    points: tuple[Mapping[str, Any], ...] = ()
    previous: tuple[Mapping[str, Any], ...] = ()
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    path: Path | None = None

    def summary(self) -> dict[str, Any]:
        """What a manifest records about the correction it applied (no points)."""
        f = self.fit
        return {
            "version": self.version,
            "scale": f.scale,
            "offset_ms": f.offset_ms,
            "residual_rms_ms": f.residual_rms_ms,
            "residual_max_pct": f.residual_max_pct,
            "n_points": f.n_points,
            "created": self.created,
            "source": self.source,
            "runs": list(self.runs),
            "path": str(self.path) if self.path else None,
        }

    def to_json(self) -> dict[str, Any]:
        s = self.summary()
        s.pop("path")
        return {
            "format": CORRECTION_FORMAT,
            **s,
            "fitted_to": "base_predicted_ms",
            "table": dict(self.table),
            "fingerprint": dict(self.fingerprint),
            "points": [dict(p) for p in self.points],
            "previous": [dict(p) for p in self.previous],
        }


def load_correction(table_path: str | Path) -> Correction | None:
    """The correction stored beside ``table_path``; None when there is none; one line when it is corrupt."""
    p = correction_path(table_path)
    if not p.is_file():
        return None
    fix = f"delete it or fit it again: hwprune calibrate RUN [RUN...] (format {CORRECTION_FORMAT})"
    try:
        d = read_json(p)
    except (ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HwpruneError(f"{p}: corrupt JSON ({first}); {fix}") from None
    if not isinstance(d, dict) or d.get("format") != CORRECTION_FORMAT:
        got = d.get("format") if isinstance(d, dict) else type(d).__name__
        raise HwpruneError(f"{p}: format {got!r} is not {CORRECTION_FORMAT!r}; {fix}")
    try:
        fit = Fit(
            scale=float(d["scale"]),
            offset_ms=float(d["offset_ms"]),
            residual_rms_ms=float(d["residual_rms_ms"]),
            residual_max_pct=float(d["residual_max_pct"]),
            n_points=int(d["n_points"]),
        )
        if not (fit.scale > 0 and np.isfinite(fit.offset_ms)):
            raise ValueError(f"scale {fit.scale} must be > 0 and offset finite")
        return Correction(
            fit=fit,
            version=int(d["version"]),
            table=dict(d["table"]),
            fingerprint=dict(d["fingerprint"]),
            source=str(d.get("source", "")),
            runs=tuple(str(r) for r in d.get("runs", [])),
            points=tuple(d.get("points", [])),
            previous=tuple(d.get("previous", [])),
            created=str(d.get("created", "")),
            path=p,
        )
    except (KeyError, TypeError, ValueError) as e:
        raise HwpruneError(f"{p}: lacks or mangles {str(e).strip() or type(e).__name__}; {fix}") from None


def save_correction(table: LatencyTable, corr: Correction) -> Path:
    """Write ``corr`` beside ``table`` atomically (temporary name, then rename); returns its path."""
    if table.path is None:
        raise HwpruneError("a correction is stored beside its table file; save the table first")
    p = correction_path(table.path)
    write_json(p, corr.to_json())
    return p


class CorrectedPredictor(Predictor):
    """``scale * inner + offset`` with ``scale = correction scale * context factor``. An affine map with a
    positive scale keeps every ordering, so the DP over its unit costs is as exact as over the inner's."""

    def __init__(self, inner: Predictor, *, scale: float = 1.0, offset_ms: float = 0.0, info: Mapping[str, Any]):
        super().__init__(inner.space)
        if not scale > 0:
            raise HwpruneError(f"latency scale must be > 0 (got {scale})")
        self.inner, self.scale, self.offset_ms = inner, float(scale), float(offset_ms)
        self.additive = inner.additive
        self.info = dict(info)  # context factor and correction applied, as manifests record them
        self._base_scale = float(info.get("context_factor", 1.0))
        self._base_offset = float(info.get("context_offset_ms") or 0.0)

    def predict(self, cand: Candidate) -> float:
        return self.scale * self.inner.predict(cand) + self.offset_ms

    def base_predict(self, cand: Candidate) -> float:
        """The table's prediction through its context (factor, or affine fit), before the correction:
        what calibrate fits."""
        return self._base_scale * self.inner.predict(cand) + self._base_offset

    def unit_costs(self) -> tuple[float, list[np.ndarray]]:
        base, costs = self.inner.unit_costs()
        return self.scale * base + self.offset_ms, [self.scale * c for c in costs]

    def linearized_at(self, reference: Candidate) -> "CorrectedPredictor":
        if self.additive:
            return self
        return CorrectedPredictor(
            self.inner.linearized_at(reference), scale=self.scale, offset_ms=self.offset_ms, info=self.info
        )


def _say_once(log: Log, table: LatencyTable, what: str, msg: str) -> None:
    key = (str(table.path), what)
    if key not in _warned:
        _warned.add(key)
        log(msg)


def corrected(inner: Predictor, table: LatencyTable, *, log: Log = _noop, correct: bool = True) -> CorrectedPredictor:
    """``inner`` (the family's predictor over ``table``) with the table's context factor and, when
    ``correct`` and one is stored and fits this table, its calibration correction."""
    where = table.path or "the latency table"
    factor = table.context_factor
    if table.context is None:
        _say_once(
            log,
            table,
            "context",
            f"{where} has no context factor (profiled before hwprune measured one): predictions are block "
            f"sums timed in the profile's context, not whole-model export time; re-profile to add one: "
            f"hwprune profile --model {table.model} -o {table.path or 'TABLE.parquet'}",
        )
    corr = load_correction(table.path) if (correct and table.path is not None) else None
    if corr is not None and corr.table.get("digest") != table.digest():
        _say_once(
            log,
            table,
            "stale",
            f"{corr.path} was fitted to an earlier profile of {where} (made {corr.table.get('created')}, "
            f"this one {table.created}); not applied: calibrate again: hwprune calibrate {' '.join(corr.runs)}"
            " --remeasure",
        )
        corr = None
    if corr is not None:
        _check_machine(corr, table, log)
    info: dict[str, Any] = {
        "context_factor": factor,
        "context": "measured at profile time" if table.context is not None else "none (table predates it): 1",
        "correction": corr.summary() if corr is not None else None,
    }
    ctx_scale, ctx_offset = _context_map(table, info)
    cs, co = (corr.fit.scale, corr.fit.offset_ms) if corr else (1.0, 0.0)
    # correction o context: cs * (ctx_scale * sum + ctx_offset) + co
    return CorrectedPredictor(inner, scale=cs * ctx_scale, offset_ms=cs * ctx_offset + co, info=info)


def _context_map(table: LatencyTable, info: dict[str, Any]) -> tuple[float, float]:
    """The table's context as ``(scale, offset_ms)``: its affine fit to anchor subnets where the profile
    made one (then ``info`` names it), else its single factor and no offset."""
    aff = table.context_affine
    if aff is None:
        return table.context_factor, 0.0
    info["context_factor"], info["context_offset_ms"] = aff
    info["context"] = "measured at profile time, affine fit to anchor subnets (scale x block sum + offset)"
    return aff


class PartScaledPredictor(CostsPredictor):
    """``base_scale * base + sum_i scale[kind of unit i] * cost_i``: each part of an additive prediction
    scaled on its own (the fixed rest, and every unit kind), so it stays additive and the DP exact."""

    def __init__(self, inner: Predictor, *, base_scale: float, kind_scales: Mapping[str, float]) -> None:
        if not inner.additive:
            raise ValueError("part scales need an additive predictor")
        self.inner, self.base_scale, self.kind_scales = inner, float(base_scale), dict(kind_scales)
        base, costs = inner.unit_costs()
        scaled = [self.kind_scales.get(u.kind, 1.0) * c for u, c in zip(inner.space.units, costs)]
        super().__init__(inner.space, self.base_scale * base, scaled)


def with_context_factor(inner: Predictor, table: LatencyTable) -> CorrectedPredictor:
    """``inner`` times ``table``'s context factor only (no calibration correction): a decode table's one
    context (``LatencyTable.at_context``) or the prefill table of a serving workload. Where the profile
    fitted part scales to anchor subnets (``context["scales"]``, :mod:`hwprune.latency.context`), those
    replace the single factor."""
    ctx = table.context
    scales = ctx.get("scales") if ctx is not None else None
    if isinstance(scales, Mapping) and inner.additive:
        scaled = PartScaledPredictor(inner, base_scale=float(scales["base"]), kind_scales=scales["kinds"])
        parts = ", ".join(f"{k} x{v:.3f}" for k, v in scales["kinds"].items())
        info = {
            "context_factor": 1.0,
            "context": f"measured at profile time, fitted to anchor subnets (base x{scales['base']:.3f}, {parts})",
        }
        return CorrectedPredictor(scaled, scale=1.0, info={**info, "correction": None})
    info = {
        "context_factor": table.context_factor,
        "context": "measured at profile time" if ctx is not None else "none: 1",
        "correction": None,
    }
    scale, offset = _context_map(table, info)
    return CorrectedPredictor(inner, scale=scale, offset_ms=offset, info=info)


def decode_context_info(table: LatencyTable, *, log: Log = _noop) -> dict[str, Any]:
    """What a decode table's predictions are scaled by (per context), as manifests record it; ``log`` gets
    one line, once, when the table has no factors (profiled before hwprune measured them)."""
    factors = {str(c): table.at_context(c).context for c in table.contexts}
    if not all(factors.values()):
        where = table.path or "the decode table"
        ctx = ",".join(map(str, table.contexts))
        _say_once(
            log,
            table,
            "decode-context",
            f"{where} has no decode context factors (profiled before hwprune measured them): predictions are "
            "block sums timed in isolation, which ran ~25 % faster than the whole decoder on SmolLM2; re-profile "
            f"to add them: hwprune profile --model {table.model} --regime decode --context {ctx} -o "
            f"{table.path or 'TABLE.parquet'}",
        )
        return {"context_factor": 1.0, "context": "none (decode table predates them): 1", "correction": None}
    info: dict[str, Any] = {
        "context_factor": 1.0,  # applied per context, before interpolation:
        "decode_context_factors": {c: float(r["factor"]) for c, r in factors.items() if r},
        "context": "measured at profile time, per KV-cache length",
        "correction": None,
    }
    scales = {c: r["scales"] for c, r in factors.items() if r and isinstance(r.get("scales"), Mapping)}
    if scales:
        info["decode_part_scales"] = scales  # these replace the factor where present
        info["context"] += "; part scales fitted to anchor subnets"
    return info


def _check_machine(corr: Correction, table: LatencyTable, log: Log) -> None:
    s = table.settings
    try:
        here = DeviceFingerprint.current(
            str(s.get("runtime", "ort-cpu")),
            threads=int(s.get("threads", 1)),
            batch=int(s.get("batch", 1)),
            seq=int(s.get("seq", 0)),
            dtype=str(s.get("dtype", "float32")),
        )
        theirs = DeviceFingerprint.from_json(corr.fingerprint, where=str(corr.path))
    except HwpruneError as e:
        _say_once(log, table, "fp", f"{corr.path}: cannot compare its machine with this one ({e})")
        return
    diffs = theirs.mismatches(here)
    if diffs:
        _say_once(
            log,
            table,
            "fp",
            f"{corr.path} was fitted on another setup ({'; '.join(diffs)}; correction vs here); applied, but "
            f"fit it here: hwprune calibrate {' '.join(corr.runs) or 'RUN'} --remeasure",
        )
