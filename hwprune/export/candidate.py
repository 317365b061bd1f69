"""Export one pruned candidate, and prove it: ONNX checker, ORT parity, measured speedup, manifest.

Folder written (all or nothing; it is built in a temporary sibling and renamed at the end, so a
parity failure or a crash leaves no half-written candidate and keeps any previous export intact)::

    out_dir/plan.json  model.safetensors  model.onnx  manifest.json

plus the family's further graphs (``Family.extra_graphs``: a decoder's ``decoder.onnx``, one step with
its KV cache), each checked by ``onnx.checker`` and ONNX Runtime parity like ``model.onnx`` and listed
in the manifest under ``graphs``.

Exporting several candidates? Measure them together so the dense model is timed once per round::

    onnx = {k: candidate_onnx(adapter, m, batch=1, seq=128) for k, m in models.items()}
    cmp = measure_dense_and_pruned(backend, dense=candidate_onnx(adapter, adapter.dense(), ...),
                                   pruned=onnx, feed=timing_feed(adapter, batch=1, seq=128))
    for k, m in models.items():
        export_candidate(..., measurement=Measurement.of(cmp, k, clock=backend.clock))

Everything family-specific (parity inputs and mask, params and FLOPs, the plan summary) comes from
the adapter's :class:`~hwprune.families.Family` hooks.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

import hwprune
from hwprune._io import atomic_dir, write_json
from hwprune.errors import HwpruneError, ParityError
from hwprune.export.manifest import Prediction, build_manifest
from hwprune.export.measure import Measurement, measure_dense_and_pruned
from hwprune.export.onnx_io import to_onnx
from hwprune.families._base import ExtraGraph, Family
from hwprune.latency._base import Backend
from hwprune.surgery.plan import Plan

__all__ = [
    "export_candidate",
    "candidate_onnx",
    "check_onnx",
    "check_parity",
    "check_graph",
    "timing_feed",
    "Measurement",
    "Prediction",
    "measure_dense_and_pruned",
]

FILES = {"plan": "plan.json", "weights": "model.safetensors", "onnx": "model.onnx", "manifest": "manifest.json"}


def candidate_onnx(adapter: Family, model: nn.Module, *, batch: int, seq: int, path: str | Path | None = None) -> bytes:
    """Serialized ONNX of ``model`` with the adapter's named inputs/outputs and dynamic axes."""
    inputs, outputs, dyn = adapter.onnx_io()
    example = adapter.example_inputs(batch=batch, seq=seq)
    return to_onnx(model, {k: example[k] for k in inputs}, path, output_names=outputs, dynamic_axes=dyn)


def check_onnx(data: bytes) -> None:
    """``onnx.checker`` with shape inference; a failure is one line naming the first problem."""
    try:
        onnx.checker.check_model(onnx.load_model_from_string(data), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HwpruneError(f"exported ONNX fails onnx.checker: {first}") from None


def timing_feed(adapter: Family, *, batch: int, seq: int) -> dict[str, np.ndarray]:
    """The inputs latency is measured on: full-length rows, as in the latency table."""
    names = adapter.onnx_io()[0]
    ex = adapter.example_inputs(batch=batch, seq=seq)
    return {k: ex[k].numpy() for k in names}


def check_parity(adapter: Family, model: nn.Module, data: bytes, *, backend: Backend, seq: int, tol: float) -> float:
    """Max |ORT - torch| of the first output over non-pad tokens; :class:`ParityError` above ``tol``."""
    inputs = adapter.parity_inputs(seq=seq)
    names = adapter.onnx_io()[0]
    with torch.no_grad():
        ref = model.eval()(*[inputs[k] for k in names])  # positional: CNNs take forward(x)
    ref_np = (ref[0] if isinstance(ref, (tuple, list)) else ref).numpy()
    got = backend.run(data, {k: inputs[k].numpy() for k in names})[0]
    if got.shape != ref_np.shape:
        raise ParityError(f"ONNX output has shape {got.shape}, the pruned torch model gives {ref_np.shape}")
    err = np.abs(got.astype(np.float64) - ref_np.astype(np.float64))
    mask = adapter.parity_mask(inputs)
    if mask is not None:  # e.g. padded positions, garbage by design
        err = err[mask]
    diff = float(err.max()) if err.size else 0.0
    if not diff <= tol:  # also catches NaN
        raise ParityError(
            f"ONNX Runtime output differs from the pruned torch model by {diff:.3g} "
            f"(max abs over the positions that count) > tolerance {tol:g}; the export is not trustworthy"
        )
    return diff


def check_graph(graph: ExtraGraph, *, backend: Backend, tol: float) -> float:
    """``onnx.checker`` plus ONNX Runtime vs torch on every check of ``graph`` (all outputs); the max abs
    difference, :class:`ParityError` above ``tol``."""
    check_onnx(graph.onnx)
    diff = 0.0
    for feed, expected in graph.checks:
        got = backend.run(graph.onnx, feed)
        if len(got) != len(expected):
            raise ParityError(f"{graph.file} has {len(got)} outputs, the pruned torch model gives {len(expected)}")
        for g, e in zip(got, expected):
            if g.shape != e.shape:
                raise ParityError(f"{graph.file}: an output has shape {g.shape}, the torch model gives {e.shape}")
            d = float(np.abs(g.astype(np.float64) - e.astype(np.float64)).max()) if g.size else 0.0
            if not d <= tol:  # also catches NaN
                raise ParityError(
                    f"{graph.file}: ONNX Runtime differs from the pruned torch model by {d:.3g} > tolerance "
                    f"{tol:g}; the export is not trustworthy"
                )
            diff = max(diff, d)
    return diff


def _check_reload(folder: Path, model: nn.Module) -> None:
    """What was written must rebuild the same tensors through ``hwprune.load`` (no pickles)."""
    loaded = hwprune.load(folder).state_dict()
    ours = model.state_dict()
    bad = [k for k in ours if k not in loaded or not torch.equal(loaded[k], ours[k])]
    if bad or set(loaded) != set(ours):
        raise HwpruneError(
            f"{folder}: hwprune.load does not rebuild the saved model (first mismatch: "
            f"{(bad or sorted(set(loaded) ^ set(ours)))[0]})"
        )


def export_candidate(
    adapter: Family,
    model: nn.Module,
    plan: Plan,
    out_dir: str | Path,
    *,
    backend: Backend,
    batch: int = 1,
    seq: int = 128,
    measurement: Measurement | None = None,
    prediction: Prediction = Prediction(),
    scores: Mapping[str, float] | None = None,
    fingerprint: Any = None,
    parity_tol: float = 1e-3,
    timing: Mapping[str, int] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``out_dir`` (see module doc) and return its manifest.

    Latency: without ``measurement`` the dense and pruned ONNX models are timed here, interleaved
    (``timing``: ``rounds``, ``repeats``, ``warmup`` for :func:`measure_dense_and_pruned`). Pass a
    :class:`Measurement` from one run over several candidates to skip timing.
    """
    if parity_tol < 0:
        raise HwpruneError(f"parity tolerance must be >= 0 (got {parity_tol})")
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        hwprune.save(model, plan, tmp)
        files = {**FILES, **adapter.export_files(model, plan, tmp)}
        _check_reload(tmp, model)
        data = candidate_onnx(adapter, model, batch=batch, seq=seq, path=tmp / FILES["onnx"])
        check_onnx(data)
        diff = check_parity(adapter, model, data, backend=backend, seq=seq, tol=parity_tol)
        graphs: dict[str, Any] = {}
        for g in adapter.extra_graphs(model):
            gdiff = check_graph(g, backend=backend, tol=parity_tol)
            (tmp / g.file).write_bytes(g.onnx)  # inside the temporary folder: renamed with the rest
            files[g.role] = g.file
            graphs[g.role] = {"file": g.file, "parity_max_abs_diff": gdiff, **dict(g.info)}
        if measurement is None:
            dense = candidate_onnx(adapter, adapter.dense(), batch=batch, seq=seq)
            cmp = measure_dense_and_pruned(
                backend,
                dense=dense,
                pruned={"candidate": data},
                feed=timing_feed(adapter, batch=batch, seq=seq),
                **dict(timing or {}),
            )
            measurement = Measurement.of(cmp, "candidate", clock=backend.clock)
        settings = {
            "runtime": backend.name,
            "runtime_version": backend.version(),
            "threads": backend.threads,
            "batch": batch,
            "seq": seq,
        }
        manifest = build_manifest(
            plan_summary=adapter.plan_summary(plan),
            measurement=measurement,
            parity_max_abs_diff=diff,
            parity_tol=parity_tol,
            stats=adapter.stats(model, batch=batch, seq=seq),
            dense_stats=adapter.stats(adapter.dense(), batch=batch, seq=seq),
            settings=settings,
            prediction=prediction,
            scores=scores,
            fingerprint=fingerprint,
            files=files,
            graphs=graphs,
            extra=extra,
        )
        write_json(tmp / FILES["manifest"], manifest)
    return manifest
