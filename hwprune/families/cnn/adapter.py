"""The ``cnn`` family's adapter: convolutional networks: torchvision's resnet18/resnet50/mobilenet_v2/vgg16_bn (random
weights unless ``weights=``) or any ``package.module:factory`` returning an ``nn.Module``.

Units are torch-pruning's coupled channel groups (see :mod:`hwprune.families.cnn.graph`); the input
and the classifier output stay whole. Weights come only from safetensors files: nothing a user hands
us is ever unpickled. The ONNX graph has one input ``input`` (N, C, H, W) and one output ``output``.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from functools import cached_property
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from hwprune.errors import HwpruneError
from hwprune.families import register_family
from hwprune.families._base import Family, RawUnit
from hwprune.families.cnn.graph import GraphInfo, analyze
from hwprune.space import PruningSpace
from hwprune.surgery.plan import Plan

if TYPE_CHECKING:
    import pandas as pd

    from hwprune.export.stats import ModelStats
    from hwprune.families.cnn.predictor import CnnPredictor
    from hwprune.families.cnn.scorer import CnnScorer
    from hwprune.latency._base import Backend, Profiling
    from hwprune.latency.table import LatencyTable
    from hwprune.proxies._base import CalibData

__all__ = ["CnnAdapter", "NAMED_CNNS", "parse_input_shape", "import_factory", "load_weights"]

NAMED_CNNS = ("resnet18", "resnet50", "mobilenet_v2", "vgg16_bn")
DEFAULT_INPUT = (1, 3, 224, 224)


def parse_input_shape(value: str | Sequence[int] | None) -> tuple[int, int, int, int]:
    """``"1,3,224,224"`` or a sequence -> (N, C, H, W); one clear line when it is not that."""
    if value is None:
        return DEFAULT_INPUT
    try:
        dims = tuple(int(v) for v in (value.replace("x", ",").split(",") if isinstance(value, str) else value))
    except (TypeError, ValueError):
        raise HwpruneError(f"--input-shape {value!r} is not a list of integers; use N,C,H,W e.g. 1,3,224,224") from None
    if len(dims) != 4:
        raise HwpruneError(
            f"--input-shape {','.join(map(str, dims))} has rank {len(dims)}; CNN models take a "
            "rank-4 N,C,H,W shape, e.g. 1,3,224,224"
        )
    if min(dims) < 1:
        raise HwpruneError(f"--input-shape {','.join(map(str, dims))} has a non-positive dimension")
    return dims[0], dims[1], dims[2], dims[3]


def import_factory(path: str) -> Callable[[], nn.Module]:
    """Resolve ``package.module:factory``; the current folder is searched too (like ``python -m``)."""
    mod_name, _, attr = path.partition(":")
    if not mod_name or not attr:
        raise HwpruneError(f"--model {path!r}: expected package.module:factory")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.append(cwd)
    try:
        mod = importlib.import_module(mod_name)
    except Exception as e:  # ImportError, or the user's module failing at import time
        raise HwpruneError(
            f"--model {path!r}: cannot import {mod_name!r} ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); is it on PYTHONPATH?"
        ) from None
    fn: Any = mod
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise HwpruneError(f"--model {path!r}: module {mod_name!r} has no attribute {attr!r}")
    if not callable(fn):
        raise HwpruneError(f"--model {path!r}: {attr!r} is not callable; it must return an nn.Module")
    return fn  # checked callable above; _build checks what it returns


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a safetensors state dict into ``model``, checking every name and shape first."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise HwpruneError(
            f"--weights {path}: only .safetensors files are read (hwprune never unpickles); convert "
            "with safetensors.torch.save_file(model.state_dict(), 'model.safetensors')"
        )
    if not path.is_file():
        raise HwpruneError(f"--weights {path} does not exist")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise HwpruneError(f"--weights {path}: not a readable safetensors file ({e})") from None
    ours = model.state_dict()
    for k, t in ours.items():
        if k not in state:
            raise HwpruneError(f"--weights {path}: tensor {k!r} is missing; were the weights saved from this model?")
        if tuple(state[k].shape) != tuple(t.shape):
            raise HwpruneError(
                f"--weights {path}: {k!r} has shape {tuple(state[k].shape)}, the model needs {tuple(t.shape)}"
            )
    extra = sorted(set(state) - set(ours))
    if extra:
        raise HwpruneError(
            f"--weights {path}: tensor {extra[0]!r} is not in the model; were the weights saved from this model?"
        )
    model.load_state_dict({k: v.to(ours[k].dtype) for k, v in state.items()}, strict=True)


def _build(model: str, *, seed: int, meta: bool = False) -> nn.Module:
    """A fresh dense model: torchvision by name or a user factory; ``meta`` skips weight init."""
    if model in NAMED_CNNS:
        import torchvision

        fn: Callable[[], nn.Module] = lambda: getattr(torchvision.models, model)(weights=None)  # noqa: E731
    else:
        fn = import_factory(model)
    if meta:
        try:
            with torch.device("meta"):
                m = fn()
            return m.to_empty(device="cpu")
        except Exception:  # a factory that pins devices: build it for real
            pass
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        try:
            m = fn()
        except Exception as e:  # the user's code failing: say whose, in one line
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise HwpruneError(
                f"--model {model!r}: the factory raised {type(e).__name__}: {first}; fix the factory "
                "(it is called with no arguments and must return an nn.Module)"
            ) from None
    if not isinstance(m, nn.Module):
        raise HwpruneError(f"--model {model!r} returned a {type(m).__name__}, not a torch nn.Module")
    return m.float().eval()


@register_family
class CnnAdapter(Family):
    family = "cnn"
    min_kept = 1  # a channel group keeps at least one channel
    #: calibration images by default: the OBS fit and BN re-estimation cost grows with each image,
    #: and 64 images of 224x224 give stable input covariances for every conv of the named models
    default_n_calib = 64
    #: no report images by default: the default images are generated noise (nothing to report on), and
    #: a user's image file is not shrunk behind their back; ``--n-report N`` holds N of its images back
    search_defaults: ClassVar[Mapping[str, int]] = MappingProxyType(
        {"trials": 150, "n_calib": 128, "n_heldout": 64, "n_report": 0}
    )

    def __init__(
        self,
        model: str,
        *,
        input_shape: str | Sequence[int] | None = None,
        weights: str | Path | None = None,
        seed: int = 0,
    ) -> None:
        self.model, self.seed = model, seed
        self.input_shape = parse_input_shape(input_shape)
        self.weights = Path(weights) if weights is not None else None
        self.name = model if model in NAMED_CNNS else model.rpartition(":")[2]

    @classmethod
    def from_arch(cls, arch: Mapping[str, Any]) -> "CnnAdapter":
        return cls(str(arch["model"]), input_shape=arch["input_shape"])

    def configure(self, *, weights: str | None = None, input_shape: Sequence[int] | None = None) -> "CnnAdapter":
        """The same model with other weights and/or input shape (what ``--weights``/``--input-shape`` set)."""
        return CnnAdapter(
            self.model,
            input_shape=input_shape if input_shape is not None else self.input_shape,
            weights=weights if weights is not None else self.weights,
            seed=self.seed,
        )

    def shape_tag(self, *, seq: int = 0) -> str:
        """Image size for table file names, e.g. ``3x224x224`` (batch is tagged separately)."""
        return "x".join(map(str, self.input_shape[1:]))

    def io_settings(self, *, batch: int, seq: int) -> tuple[int, int]:
        """Images: the batch comes from ``--input-shape``; there is no sequence."""
        return int(self.input_shape[0]), 0

    # ---- identity -----------------------------------------------------------------------------
    def spec(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "model": self.model,
            "input_shape": list(self.input_shape),
            "weights": str(self.weights) if self.weights else None,
            "seed": self.seed,
        }

    def arch(self) -> dict[str, Any]:
        return {"model": self.model, "input_shape": list(self.input_shape)}

    def shape_key(self) -> str:
        n, c, h, w = self.input_shape
        convs = [(l.name, l.c_in, l.c_out, l.kernel, l.stride) for l in self.graph.layers]
        digest = hashlib.sha1(json.dumps(convs).encode()).hexdigest()[:8]
        return f"{self.name}-{c}x{h}x{w}-b{n}-{digest}"

    # ---- model --------------------------------------------------------------------------------
    @cached_property
    def _dense(self) -> nn.Module:
        m = _build(self.model, seed=self.seed)
        first = next((x for x in m.modules() if isinstance(x, nn.Conv2d)), None)
        if first is not None and first.in_channels != self.input_shape[1]:
            raise HwpruneError(
                f"--input-shape {','.join(map(str, self.input_shape))} has {self.input_shape[1]} "
                f"channels but the model's first conv takes {first.in_channels}"
            )
        if self.weights is not None:
            load_weights(m, self.weights)
        elif self.model in NAMED_CNNS:
            # random init: BatchNorm's default statistics (mean 0, var 1) make a deep random net's
            # activations explode, while every pruned subnet gets its statistics re-estimated. Give
            # the dense model statistics from generated inputs too, so the reference that subnets are
            # scored against is the same kind of function (latency is unaffected).
            from hwprune.families.cnn.calib import generated_images, recalibrate_bn

            recalibrate_bn(m, generated_images(self.input_shape, 16, seed=10_000 + self.seed), batch=16)
        return m.eval()

    def dense(self) -> nn.Module:
        return self._dense

    @cached_property
    def graph(self) -> GraphInfo:
        """Channel groups and per-layer shapes at ``input_shape`` (traced once)."""
        return analyze(self.dense(), self.example_inputs(batch=1)["input"])

    def raw_units(self) -> list[RawUnit]:
        return [(g.name, g.kind, g.full, i, 1) for i, g in enumerate(self.graph.units())]

    def example_inputs(self, *, batch: int | None = None, seq: int = 0) -> dict[str, torch.Tensor]:
        """Deterministic N(0, 1) images (what normalised photos look like to the first conv)."""
        n, c, h, w = self.input_shape
        g = torch.Generator().manual_seed(0)
        return {"input": torch.randn(batch or n, c, h, w, generator=g)}

    def onnx_io(self) -> tuple[list[str], list[str], dict[str, dict[int, str]]]:
        return ["input"], ["output"], {"input": {0: "batch"}, "output": {0: "batch"}}

    # ---- spaces -------------------------------------------------------------------------------
    def default_space_spec(self) -> dict[str, Any]:
        return default_spec(self.raw_units())

    def space(self, path: str | Path | None = None) -> PruningSpace:
        sp = super().space(path)
        removable = [u.name for u in sp.units if 0 in u.sizes]
        if removable:
            raise HwpruneError(
                f"{sp.source}: unit {removable[0]!r} allows 0 channels; channel groups keep at least "
                "one channel, set allow_remove: false"
            )
        return sp

    # ---- surgery ------------------------------------------------------------------------------
    def prune(self, model: nn.Module, plan: Plan, overrides: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
        from hwprune.families.cnn.surgery import prune_cnn

        return prune_cnn(model, plan, self.example_inputs(batch=1)["input"], overrides)

    def skeleton(self, plan: Plan) -> nn.Module:
        """Pruned shapes with uninitialised weights (built on meta, so no init cost)."""
        from hwprune.families.cnn.surgery import prune_cnn

        m = _build(self.model, seed=self.seed, meta=True).eval()
        return prune_cnn(m, plan, self.example_inputs(batch=1)["input"], inplace=True)

    # ---- latency, accuracy, reports ------------------------------------------------------------
    def measure_latency(
        self,
        backend: "Backend",
        *,
        batch: int,
        seq: int,
        space: PruningSpace,
        progress: bool = True,
        budget_s: float | None = None,
    ) -> tuple["pd.DataFrame", dict[str, Any]]:
        from hwprune.families.cnn.profile import measure

        return measure(self, backend, batch=batch, seq=seq, space=space, progress=progress, budget_s=budget_s)

    def predictor(self, table: "LatencyTable", space: PruningSpace) -> "CnnPredictor":
        """Per-conv bilinear lookups (a conv depends on two groups): not additive, linearised for the DP."""
        from hwprune.families.cnn.predictor import CnnPredictor

        return CnnPredictor(table, space)

    def prepare_profiling(
        self,
        backend: "Backend",
        *,
        batch: int,
        seq: int,
        space: PruningSpace,
        progress: bool = True,
        levels: int | None = None,
    ) -> "Profiling":
        from hwprune.families.cnn.profile import prepare

        return prepare(self, backend, batch=batch, seq=seq, space=space, progress=progress, levels=levels)

    def load_calib(
        self, source: str | None = None, *, n_calib: int, n_heldout: int, seq: int = 0, seed: int = 0, n_report: int = 0
    ) -> "CalibData":
        """Images from ``source`` (.npy/.pt/.safetensors) or generated; at most :attr:`default_n_calib`
        calibration images (see there)."""
        from hwprune.families.cnn.calib import load_cnn_calib

        return load_cnn_calib(
            self, source, n_calib=min(n_calib, self.default_n_calib), n_heldout=n_heldout, n_report=n_report, seed=seed
        )

    def scorer(self, calib: "CalibData") -> "CnnScorer":
        from hwprune.families.cnn.scorer import CnnScorer

        return CnnScorer(self, calib.heldout)

    def stats(self, model: nn.Module, *, batch: int, seq: int = 0) -> "ModelStats":
        """FLOPs by forward hooks at ``input_shape`` with the given batch."""
        from hwprune.families.cnn.stats import cnn_stats

        return cnn_stats(model, (batch, *self.input_shape[1:]))


def default_spec(units: Sequence[RawUnit]) -> dict[str, Any]:
    """Space for a model without YAML, aligned to ONNX Runtime's CPU conv kernels.

    Those kernels work on blocks of 16 channels (AVX-512 NCHWc) and fall back to a much slower path
    when a width is not a multiple of 4 (a conv at 18 or 30 channels runs ~40 % slower than at 32), or
    is below 16 (layout conversions around the conv). So wide groups step by 16 (or 1/16 of the width
    when larger) and keep at least 16; groups of 16 or fewer step by 4.
    """
    ov = []
    for name, _, full, *_ in units:
        step = 4 if full <= 16 else 8 if full <= 48 else max(16, -(-full // 16 // 16) * 16)
        ov.append({"match": name, "step": step, "min": step if full <= 16 else max(16, step)})
    return {"overrides": ov}
