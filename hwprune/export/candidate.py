"""Export one pruned candidate, and prove it: ONNX checker, ORT parity, measured speedup, manifest.

Folder written (all or nothing; it is built in a temporary sibling and renamed at the end, so a
parity failure or a crash leaves no half-written candidate and keeps any previous export intact)::

    out_dir/plan.json  model.safetensors  model.onnx  manifest.json

Exporting several candidates? Measure them together so the dense model is timed once per round::

    onnx = {k: candidate_onnx(adapter, m, batch=1, seq=128) for k, m in models.items()}
    cmp = measure_dense_and_pruned(backend, dense=candidate_onnx(adapter, adapter.dense(), ...),
                                   pruned=onnx, feed=timing_feed(adapter, batch=1, seq=128))
    for k, m in models.items():
        export_candidate(..., measured_ms=cmp.pruned[k].median_ms, dense_ms_measured=cmp.dense.median_ms)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np
import onnx
import torch
from torch import nn

import hwprune
from hwprune._io import atomic_dir, write_json
from hwprune.errors import HwpruneError, ParityError
from hwprune.export.manifest import build_manifest
from hwprune.export.measure import Comparison, measure_dense_and_pruned
from hwprune.export.onnx_io import to_onnx
from hwprune.export.stats import model_stats
from hwprune.latency._base import Backend
from hwprune.models._base import ModelAdapter
from hwprune.surgery.plan import Plan

__all__ = ["export_candidate", "candidate_onnx", "check_onnx", "check_parity", "parity_inputs", "timing_feed",
           "measure_dense_and_pruned"]

FILES = {"plan": "plan.json", "weights": "model.safetensors", "onnx": "model.onnx", "manifest": "manifest.json"}

# Sentences of different lengths so a parity batch has padding in all but the longest row: the
# exported graph must honour the mask, not only run on full rows.
_PARITY_TEXTS = (
    "The speedup you ask for is the speedup you measure.",
    "Structured pruning removes whole attention heads and feed-forward neurons, so the smaller matrices "
    "run faster on any runtime without sparse kernels.",
    "Short one.",
    "A latency table holds the measured cost of every kept size of every unit on one device, with the "
    "runtime, threads, batch and sequence length it was measured with.",
)


def candidate_onnx(adapter: ModelAdapter, model: nn.Module, *, batch: int, seq: int,
                   path: str | Path | None = None) -> bytes:
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


def parity_inputs(adapter: ModelAdapter, *, seq: int) -> dict[str, torch.Tensor]:
    """Real tokenized text with padding when the adapter can tokenize; otherwise its example inputs."""
    tokenize = getattr(adapter, "tokenize", None)
    if callable(tokenize):
        return dict(tokenize(list(_PARITY_TEXTS), seq=seq))
    return dict(adapter.example_inputs(batch=2, seq=seq))


def timing_feed(adapter: ModelAdapter, *, batch: int, seq: int) -> dict[str, np.ndarray]:
    """The inputs latency is measured on: full-length rows, as in the latency table."""
    names = adapter.onnx_io()[0]
    ex = adapter.example_inputs(batch=batch, seq=seq)
    return {k: ex[k].numpy() for k in names}


def check_parity(adapter: ModelAdapter, model: nn.Module, data: bytes, *, backend: Backend, seq: int,
                 tol: float) -> float:
    """Max |ORT - torch| of the first output over non-pad tokens; :class:`ParityError` above ``tol``."""
    inputs = parity_inputs(adapter, seq=seq)
    names = adapter.onnx_io()[0]
    with torch.no_grad():
        ref = model.eval()(*[inputs[k] for k in names])  # positional: CNNs take forward(x)
    ref_np = (ref[0] if isinstance(ref, (tuple, list)) else ref).numpy()
    got = backend.run(data, {k: inputs[k].numpy() for k in names})[0]
    if got.shape != ref_np.shape:
        raise ParityError(f"ONNX output has shape {got.shape}, the pruned torch model gives {ref_np.shape}")
    err = np.abs(got.astype(np.float64) - ref_np.astype(np.float64))
    if "attention_mask" in inputs:  # padded positions are garbage by design; only real tokens count
        err = err[inputs["attention_mask"].numpy().astype(bool)]
    diff = float(err.max()) if err.size else 0.0
    if not diff <= tol:  # also catches NaN
        raise ParityError(f"ONNX Runtime output differs from the pruned torch model by {diff:.3g} "
                          f"(max abs over non-pad tokens) > tolerance {tol:g}; the export is not trustworthy")
    return diff


def _check_reload(folder: Path, model: nn.Module) -> None:
    """What was written must rebuild the same tensors through ``hwprune.load`` (no pickles)."""
    loaded = hwprune.load(folder).state_dict()
    ours = model.state_dict()
    bad = [k for k in ours if k not in loaded or not torch.equal(loaded[k], ours[k])]
    if bad or set(loaded) != set(ours):
        raise HwpruneError(f"{folder}: hwprune.load does not rebuild the saved model (first mismatch: "
                           f"{(bad or sorted(set(loaded) ^ set(ours)))[0]})")


def export_candidate(
    adapter: ModelAdapter,
    model: nn.Module,
    plan: Plan,
    out_dir: str | Path,
    *,
    backend: Backend,
    batch: int = 1,
    seq: int = 128,
    predicted_ms: float | None = None,
    dense_predicted_ms: float | None = None,
    target_speedup: float | None = None,
    dense_ms_measured: float | None = None,
    measured_ms: float | None = None,
    dense_onnx: bytes | None = None,
    scores: Mapping[str, float] | None = None,
    fingerprint: Any = None,
    parity_tol: float = 1e-3,
    rounds: int = 5,
    repeats: int = 20,
    warmup: int = 5,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``out_dir`` (see module doc) and return its manifest.

    Latency: by default the dense and pruned ONNX models are timed here, interleaved over ``rounds``
    (``dense_onnx`` skips re-exporting the dense model). Pass *both* ``measured_ms`` and
    ``dense_ms_measured`` from one :func:`measure_dense_and_pruned` over several candidates to skip
    timing; passing only one would pair numbers from different conditions, so it is refused.
    """
    if (measured_ms is None) != (dense_ms_measured is None):
        raise HwpruneError("pass both measured_ms and dense_ms_measured (from one measure_dense_and_pruned call) "
                           "or neither")
    if parity_tol < 0:
        raise HwpruneError(f"parity tolerance must be >= 0 (got {parity_tol})")
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        hwprune.save(model, plan, tmp)
        _check_reload(tmp, model)
        data = candidate_onnx(adapter, model, batch=batch, seq=seq, path=tmp / FILES["onnx"])
        check_onnx(data)
        diff = check_parity(adapter, model, data, backend=backend, seq=seq, tol=parity_tol)
        timing: Comparison | None = None
        if measured_ms is None or dense_ms_measured is None:
            dense = dense_onnx if dense_onnx is not None else candidate_onnx(adapter, adapter.dense(), batch=batch,
                                                                             seq=seq)
            timing = measure_dense_and_pruned(backend, dense=dense, pruned={"candidate": data},
                                              feed=timing_feed(adapter, batch=batch, seq=seq),
                                              rounds=rounds, repeats=repeats, warmup=warmup)
            measured_ms, dense_ms_measured = timing.pruned["candidate"].median_ms, timing.dense.median_ms
        settings = {"runtime": backend.name, "runtime_version": backend.version(), "threads": backend.threads,
                    "batch": batch, "seq": seq}
        if timing is not None:
            settings.update({k: timing.settings[k] for k in ("rounds", "repeats", "warmup")})
        manifest = build_manifest(
            plan=plan, measured_ms=measured_ms, dense_measured_ms=dense_ms_measured, parity_max_abs_diff=diff,
            parity_tol=parity_tol, stats=model_stats(model, batch=batch, seq=seq),
            dense_stats=model_stats(adapter.dense(), batch=batch, seq=seq), settings=settings,
            timing=timing, timing_key="candidate", predicted_ms=predicted_ms, dense_predicted_ms=dense_predicted_ms,
            target_speedup=target_speedup, scores=scores, fingerprint=fingerprint, files=FILES, extra=extra,
        )
        write_json(tmp / FILES["manifest"], manifest)
    return manifest
