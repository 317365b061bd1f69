"""The closed loop's data: predicted vs measured points from exported runs, re-measured on request.

A point is one model of one run: ``base_predicted_ms`` (re-predicted from the table's current block
sums times its context factor, never read back from a manifest, so an older manifest or an earlier
correction cannot leak in) and ``measured_ms`` (the manifest's, or a fresh measurement). Each run adds
its exported candidates (``candidates/*/manifest.json``) and its dense model once per distinct dense
measurement. :func:`hwprune.api.run_calibrate` fits ``measured = scale * base + offset`` over them.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from hwprune.errors import HwpruneError
from hwprune.export.manifest import read_manifest
from hwprune.families._base import Family
from hwprune.latency._base import Backend
from hwprune.latency.correction import CorrectedPredictor
from hwprune.space import PruningSpace
from hwprune.surgery.plan import Plan

__all__ = ["Point", "run_points", "remeasure"]


@dataclass(frozen=True)
class Point:
    run: str
    key: str  # candidate key, or "dense"
    base_predicted_ms: float
    measured_ms: float
    exported_predicted_ms: float | None = None  # what its manifest stated (with the correction then in use)

    @property
    def dense(self) -> bool:
        return self.key == "dense"

    def to_json(self) -> dict[str, Any]:
        return {
            "run": self.run,
            "key": self.key,
            "base_predicted_ms": self.base_predicted_ms,
            "measured_ms": self.measured_ms,
            "exported_predicted_ms": self.exported_predicted_ms,
            "dense": self.dense,
        }


def _manifests(run_dir: Path) -> list[tuple[Path, dict[str, Any]]]:
    found = sorted((run_dir / "candidates").glob("*/manifest.json"))
    if not found:
        raise HwpruneError(
            f"{run_dir} has no exported candidate (no candidates/*/manifest.json); "
            f"export first: hwprune export {run_dir}"
        )
    return [(p.parent, read_manifest(p)) for p in found]


def run_points(run_dir: Path, *, space: PruningSpace, predictor: CorrectedPredictor) -> list[Point]:
    """Every exported candidate of ``run_dir`` and its dense model(s), as calibration points."""
    points, dense_seen = [], set()
    dense_base = predictor.base_predict(space.dense())
    for folder, m in _manifests(run_dir):
        plan_path = folder / "plan.json"
        if not plan_path.is_file():
            raise HwpruneError(f"{folder} has a manifest but no plan.json; export it again: hwprune export {run_dir}")
        try:
            cand = Plan.load(plan_path).candidate(space)
        except HwpruneError as e:
            raise HwpruneError(f"{plan_path}: {e}") from None
        key = str(m.get("key") or folder.name)
        exported = m.get("predicted_ms")
        points.append(
            Point(
                run=str(run_dir),
                key=key,
                base_predicted_ms=predictor.base_predict(cand),
                measured_ms=float(m["measured_ms"]),
                exported_predicted_ms=float(exported) if isinstance(exported, (int, float)) else None,
            )
        )
        dense_ms = float(m["dense_measured_ms"])
        if dense_ms not in dense_seen:  # candidates exported together share one dense measurement
            dense_seen.add(dense_ms)
            dp = m.get("dense_predicted_ms")
            points.append(
                Point(
                    run=str(run_dir),
                    key="dense",
                    base_predicted_ms=dense_base,
                    measured_ms=dense_ms,
                    exported_predicted_ms=float(dp) if isinstance(dp, (int, float)) else None,
                )
            )
    return points


def remeasure(
    points: Sequence[Point],
    *,
    adapter: Family,
    backend: Backend,
    batch: int,
    seq: int,
    rounds: int = 5,
    repeats: int | None = None,
) -> tuple[list[Point], Mapping[str, Any]]:
    """Time every candidate's ``model.onnx`` again, here, each beside the dense model in its own rounds
    as export does (:func:`hwprune.export.measure.measure_pairs`); returns the points with fresh
    ``measured_ms`` (one dense point in all: the median of the pairs' dense figures) and the settings
    and control (the median of the pairs' controls)."""
    from hwprune.export.candidate import candidate_onnx, timing_feed
    from hwprune.export.measure import measure_pairs

    cands = [p for p in points if not p.dense]
    onnx: dict[str, bytes] = {}
    for i, p in enumerate(cands):
        f = Path(p.run) / "candidates" / p.key / "model.onnx"
        if not f.is_file():
            raise HwpruneError(f"{f} is missing; export the candidate again: hwprune export {p.run}")
        onnx[f"{i}:{p.key}"] = f.read_bytes()
    # each candidate beside the dense model in its own rounds: the context export measures in
    cmps = measure_pairs(
        backend,
        dense=candidate_onnx(adapter, adapter.dense(), batch=batch, seq=seq),
        pruned=onnx,
        feed=timing_feed(adapter, batch=batch, seq=seq),
        rounds=rounds,
        repeats=repeats,
    )
    fresh = [replace(p, measured_ms=cmps[f"{i}:{p.key}"].pruned[f"{i}:{p.key}"].median_ms) for i, p in enumerate(cands)]
    dense = next(p for p in points if p.dense)
    dense_ms = statistics.median(c.dense.median_ms for c in cmps.values())
    fresh.append(replace(dense, run="(all, re-measured)", measured_ms=dense_ms))
    controls = [c.control_pct for c in cmps.values() if c.control_pct is not None]
    return fresh, {
        **next(iter(cmps.values())).settings,
        "session_order": "mirrored, each candidate in its own rounds with the dense model",
        "dense_control_pct": statistics.median(controls) if controls else None,
        "warnings": sorted({w for k, c in cmps.items() for w in c.warnings([k])}),
    }
