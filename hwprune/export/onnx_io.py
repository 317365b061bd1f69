"""Torch -> ONNX with the settings every part of hwprune shares (profiling and export alike).

Profiling and export must produce the same graph for the same block, or the table lies; so both go
through :func:`to_onnx`. The TorchScript exporter is used (fast, stable op set, no onnxscript);
opset 17 has LayerNormalization, which ONNX Runtime and TensorRT both run natively.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from hwprune._io import atomic_path
from hwprune.errors import HwpruneError

__all__ = ["to_onnx", "OPSET"]

OPSET = 17


def to_onnx(
    model: nn.Module,
    inputs: Mapping[str, torch.Tensor],
    path: str | Path | None = None,
    *,
    output_names: Sequence[str],
    dynamic_axes: Mapping[str, Mapping[int, str]] | None = None,
) -> bytes:
    """Export ``model(**inputs)``; returns the serialized model and writes it atomically to ``path``."""
    model = model.eval()
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                model,
                tuple(inputs.values()),
                buf,  # type: ignore[arg-type]  # torch.onnx.export also takes file objects
                dynamo=False,
                opset_version=OPSET,
                input_names=list(inputs),
                output_names=list(output_names),
                dynamic_axes={k: dict(v) for k, v in (dynamic_axes or {}).items()} or None,
                do_constant_folding=True,
            )
        except (torch.onnx.errors.OnnxExporterError, RuntimeError) as e:  # unsupported op or shape
            msg = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
            shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in inputs.items())
            raise HwpruneError(
                f"cannot export {type(model).__name__} to ONNX for inputs {shapes}: {msg[:300]}"
            ) from None
    data = buf.getvalue()
    if path is not None:
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)
    return data
