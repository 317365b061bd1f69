"""Calibration images for CNNs, and BatchNorm re-estimation after surgery.

``--calib FILE`` is a tensor of model inputs, shape (N, C, H, W) matching ``--input-shape``'s C, H, W:
``.npy`` (read with ``allow_pickle=False``), ``.pt`` (``torch.load(weights_only=True)``: tensors only,
no code) or ``.safetensors`` (the tensor named ``input``, or the only one). Without a file, inputs are
generated N(0, 1) images: right for latency-only work, meaningless for accuracy (say so in reports).

Why BatchNorm re-estimation: pruning changes every downstream activation's mean and variance, while
the BN layers still normalise with the dense model's running statistics; a few such mismatches
compound through the depth and a CNN can fall to chance at 20 % pruning. Re-estimating them on
calibration images (cumulative average, no gradient, no weight change) repairs most of it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hwprune.errors import HwpruneError
from hwprune.proxies._base import CalibData

__all__ = ["load_cnn_calib", "read_images", "recalibrate_bn", "generated_images"]


def read_images(path: str | Path) -> torch.Tensor:
    """A float32 tensor from ``.npy`` / ``.pt`` / ``.safetensors``, never unpickling code."""
    path = Path(path)
    if not path.is_file():
        raise HwpruneError(f"calibration file {path} does not exist; pass an (N, C, H, W) .npy, .pt or .safetensors")
    ext = path.suffix.lower()
    try:
        if ext == ".npy":
            arr = np.load(path, allow_pickle=False)
            x = torch.from_numpy(np.ascontiguousarray(arr))
        elif ext == ".pt":
            obj = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(obj, dict) and len(obj) == 1:
                obj = next(iter(obj.values()))
            if not isinstance(obj, torch.Tensor):
                raise HwpruneError(
                    f"{path}: holds a {type(obj).__name__}, not one tensor; save the images with "
                    "torch.save(tensor, path)"
                )
            x = obj
        elif ext == ".safetensors":
            from safetensors.torch import load_file

            d = load_file(str(path))
            if "input" not in d and len(d) != 1:
                raise HwpruneError(f"{path}: holds {len(d)} tensors; name the images 'input'")
            x = d.get("input", next(iter(d.values())))
        else:
            raise HwpruneError(
                f"{path}: unknown calibration format {ext or '(no extension)'!r}; use .npy, .pt "
                "or .safetensors holding an (N, C, H, W) tensor"
            )
    except HwpruneError:
        raise
    except Exception as e:  # numpy/torch/safetensors each raise their own types for corrupt files
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HwpruneError(f"{path}: cannot read it as {ext} ({msg})") from None
    if not (x.is_floating_point() or x.dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)):
        raise HwpruneError(f"{path}: dtype {x.dtype} is not numeric image data")
    return x.to(torch.float32)


def generated_images(shape: tuple[int, int, int, int], n: int, *, seed: int = 0) -> torch.Tensor:
    """N(0, 1) images (what normalised photos look like to a first conv); for latency-only work."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape[1:], generator=g)


def load_cnn_calib(
    adapter: Any,
    file: str | Path | None = None,
    *,
    n_calib: int = 64,
    n_heldout: int = 64,
    n_report: int = 0,
    seed: int = 0,
) -> CalibData:
    """Disjoint report, selection (``heldout``) and calibration images for ``adapter`` (a CNN adapter), in
    that order of a seeded permutation. A file shorter than the three together is split proportionally
    (at least one image each for calibration and selection)."""
    if n_calib < 1 or n_heldout < 1 or n_report < 0:
        raise HwpruneError(
            f"n_calib={n_calib}, n_heldout={n_heldout}, n_report={n_report}: need n_calib, n_heldout >= 1, "
            "n_report >= 0"
        )
    want = tuple(adapter.input_shape[1:])
    total_want = n_calib + n_heldout + n_report
    if file is None:
        x, source = (
            generated_images(adapter.input_shape, total_want, seed=seed),
            f"generated N(0,1) seed={seed}",
        )
    else:
        x, source = read_images(file), f"{file} seed={seed}"
        if x.dim() != 4 or tuple(x.shape[1:]) != want:
            raise HwpruneError(
                f"{file}: calibration tensor has shape {tuple(x.shape)}; the model takes (N, "
                f"{', '.join(map(str, want))}) images as set by --input-shape"
            )
        if x.shape[0] < 2 + (n_report > 0):
            raise HwpruneError(
                f"{file}: {x.shape[0]} image(s); need at least {2 + (n_report > 0)} (calibration + selection + report)"
            )
        if not torch.isfinite(x).all():
            raise HwpruneError(f"{file}: contains NaN or infinite values")
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    total = min(x.shape[0], total_want)
    n_r = min(n_report, round(total * n_report / total_want)) if n_report else 0
    n_r = max(n_r, 1) if n_report else 0
    n_h = max(1, min(n_heldout, round(total * n_heldout / total_want)))
    n_c = max(1, min(n_calib, total - n_r - n_h))
    parts = {"report": perm[:n_r], "selection": perm[n_r : n_r + n_h], "calibration": perm[n_r + n_h : n_r + n_h + n_c]}
    splits = {
        "corpus": {"name": source.rsplit(" seed=", 1)[0], "images": int(x.shape[0])},
        "seed": seed,
        "held_out_by": "image",
        "report_domain": None,
        "splits": {k: {"n": int(v.numel())} for k, v in parts.items()},
    }
    return CalibData(
        calib={"input": x[parts["calibration"]]},
        heldout={"input": x[parts["selection"]]},
        report={"input": x[parts["report"]]} if n_r else {},
        source=source,
        splits=splits,
    )


@torch.no_grad()
def recalibrate_bn(model: nn.Module, images: torch.Tensor, *, batch: int = 32) -> nn.Module:
    """Re-estimate every BatchNorm's running mean/var on ``images`` (in place); returns ``model`` in eval.

    Running stats are reset and averaged cumulatively (momentum None) over all batches; only the BN
    layers are put in train mode, so dropout and friends stay as in inference.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return model.eval()
    saved = [(m.momentum, m.track_running_stats) for m in bns]
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    try:
        for i in range(0, images.shape[0], batch):
            chunk = images[i : i + batch]
            if chunk.shape[0] < 2 and i > 0:
                break  # a batch of one has no spatial variance for 1x1 maps; the others suffice
            model(chunk)
    finally:
        for m, (mom, _) in zip(bns, saved):
            m.momentum = mom
        model.eval()
    return model
