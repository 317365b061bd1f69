"""``Family``: the one declared interface between a model family and the generic pipeline.

A family (``hwprune/families/<name>/``) owns everything that depends on a model's shapes: its torch
module, units, surgery, latency profiler and predictor, calibration data, proxies, end-to-end scorer
and statistics. The pipeline (space, latency table, search, plan, export, api, cli) calls only the
hooks below and never names a family. Every family runs ``tests/test_family_contract.py``.

Contract, in the order the pipeline uses it:

- identity: ``spec()`` (JSON that rebuilds the adapter), ``arch()`` (dense architecture, stored in
  plans), ``shape_key()`` (what a latency table depends on besides the device), ``from_arch(arch)``
  (a classmethod rebuilding an adapter from a plan's ``arch`` so ``hwprune.load`` needs nothing else).
- model: ``dense()`` is the dense model, eval mode, float32, CPU, built once and cached;
  ``raw_units()`` lists prunable units ``(name, kind, full, layer, granule)`` with stable names;
  ``example_inputs(batch=, seq=)`` are the named ONNX inputs; ``onnx_io()`` gives input names, output
  names and dynamic axes.
- surgery: ``plan(kept)`` validates unit -> kept indices (dense numbering) into a :class:`Plan`;
  ``prune(model, plan, overrides)`` returns a *new*, physically smaller model (never masks; the
  dense one is untouched), optionally replacing tensors by ``overrides`` (pruned-model state-dict
  names); ``skeleton(plan)`` builds the pruned shapes with uninitialised weights for loading.
- latency: ``measure_latency(backend, ...)`` times the family's blocks and returns the table's rows
  and meta (``measure_decode_latency(backend, contexts=...)`` the same for one generated token after a
  KV cache, where the family has one); ``prepare_profiling`` loads the same graphs untimed (for
  benchmarks that time them in their own rounds); ``predictor(table, space)`` turns a table into a :class:`Predictor`.
- accuracy: ``load_calib(...)`` returns three disjoint splits: calibration, selection (``heldout``) and
  report (never seen by the search); proxies are registered per
  family with ``@register_proxy(name, family=...)`` and fitted through ``fit_proxy``;
  ``scorer(calib)`` compares a pruned model with the dense one end to end.
- export: ``extra_graphs(model)`` are ONNX graphs written beside ``model.onnx`` (a decoder's one-step
  decode graph with its KV cache), each checked by ONNX Runtime against torch like ``model.onnx``.
- reports: ``stats(model, batch=, seq=)`` (params and FLOPs), ``plan_summary(plan)``,
  ``parity_inputs(seq=)`` and ``parity_mask(inputs)`` for ONNX parity.

Hooks with a default say so in their docstring; the rest are abstract, so a family that forgets one
fails at instantiation (and in the contract suite), not in the middle of a search.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np
import torch
from torch import nn

from hwprune.errors import HwpruneError
from hwprune.space import PruningSpace, build_space, load_space
from hwprune.surgery.plan import Plan

if TYPE_CHECKING:
    import pandas as pd

    from hwprune.export.stats import ModelStats
    from hwprune.latency._base import Backend, Profiling
    from hwprune.latency.predictor import Predictor
    from hwprune.latency.table import LatencyTable
    from hwprune.proxies._base import CalibData, ProxyState

__all__ = ["Family", "ExtraGraph", "RawUnit", "Scorer", "SPACES_DIR"]

RawUnit = tuple[str, str, int, int, int]  # name, kind, full, layer, granule
SPACES_DIR = Path(__file__).resolve().parents[2] / "search_spaces"


class Scorer(Protocol):
    """End-to-end distance of a pruned model to the dense one on held-out data (lower is closer).

    ``score(model)`` returns at least ``distance`` (the search objective); families add their own
    readable figures (``cosine``, ``agreement``, ``kl``, ``perplexity``...).
    """

    def score(self, model: nn.Module) -> Mapping[str, float]: ...


@dataclass(frozen=True)
class ExtraGraph:
    """One more ONNX graph of an exported candidate, with the evidence that it computes what torch does.

    ``checks`` pairs ONNX Runtime feeds with torch's outputs on them (every output, in the graph's
    order); the export fails when any output differs by more than the parity tolerance. ``info`` goes
    to the manifest under ``graphs.<role>`` (how to drive the graph: its cache convention, ids...).
    """

    role: str  # manifest key, e.g. "decoder"
    file: str  # file name in the candidate folder, e.g. "decoder.onnx"
    onnx: bytes
    checks: Sequence[tuple[Mapping[str, np.ndarray], Sequence[np.ndarray]]]
    info: Mapping[str, Any] = field(default_factory=dict)


class Family(ABC):
    """One model of one family: see the module docstring for the contract."""

    family: ClassVar[str] = ""
    min_kept: ClassVar[int] = 0  # fewest indices a unit may keep (CNN channel groups keep one)
    #: default max |ONNX Runtime - torch| of the first output that an export accepts (``--parity-tol``)
    parity_tol: ClassVar[float] = 1e-3
    # what `hwprune search` uses when the user names none: trials, calibration and selection samples
    # and report samples (held back from the search; a pick's quality is stated on them)
    search_defaults: ClassVar[Mapping[str, int]] = MappingProxyType(
        {"trials": 150, "n_calib": 128, "n_heldout": 64, "n_report": 64}
    )
    name: str = ""

    # ---- identity -----------------------------------------------------------------------------
    @abstractmethod
    def spec(self) -> dict[str, Any]:
        """JSON that rebuilds this adapter (model name or path, input settings)."""

    @abstractmethod
    def arch(self) -> dict[str, Any]:
        """Dense architecture as JSON (stored in plans; enough to build a skeleton)."""

    @classmethod
    @abstractmethod
    def from_arch(cls, arch: Mapping[str, Any]) -> "Family":
        """An adapter for the dense architecture ``arch`` (as stored in a plan), for ``hwprune.load``."""

    @abstractmethod
    def shape_key(self) -> str:
        """What a latency table depends on besides the device (dense shape)."""

    def configure(self, *, weights: str | None = None, input_shape: Sequence[int] | None = None) -> "Family":
        """The same model with other weights / input shape (``--weights``, ``--input-shape``).

        Default: the family takes neither, and says so in one line.
        """
        if weights is None and input_shape is None:
            return self
        given = "--weights" if weights is not None else "--input-shape"
        raise HwpruneError(
            f"{given} does not apply to {self.family} model {self.name!r}; it is for models "
            "built from a factory or torchvision (CNNs)"
        )

    # ---- model --------------------------------------------------------------------------------
    @abstractmethod
    def dense(self) -> nn.Module: ...

    @abstractmethod
    def raw_units(self) -> list[RawUnit]: ...

    @abstractmethod
    def example_inputs(self, *, batch: int = 1, seq: int = 128) -> dict[str, torch.Tensor]: ...

    @abstractmethod
    def onnx_io(self) -> tuple[list[str], list[str], dict[str, dict[int, str]]]: ...

    def io_settings(self, *, batch: int, seq: int) -> tuple[int, int]:
        """(batch, seq) a table is measured at, from the user's ``--batch``/``--seq``.

        Default: as given, both at least 1. Image families take the batch from their input shape
        and have no sequence (0).
        """
        if batch < 1 or seq < 1:
            raise HwpruneError(f"--batch and --seq must be >= 1 (got batch={batch}, seq={seq})")
        return batch, seq

    def shape_tag(self, *, seq: int) -> str:
        """Input-size part of a default table file name. Default: ``s<seq>``."""
        return f"s{seq}"

    # ---- surgery ------------------------------------------------------------------------------
    def plan(self, kept: Mapping[str, Sequence[int]], **meta: Any) -> Plan:
        """Validated unit -> sorted kept indices; one line naming the unit when an entry is wrong."""
        full = {n: f for n, _, f, *_ in self.raw_units()}
        units: dict[str, tuple[int, ...]] = {}
        for n, idx in kept.items():
            if n not in full:
                raise HwpruneError(
                    f"plan names unit {n!r}, which this model lacks; units look like {next(iter(full))!r}"
                )
            idx = tuple(sorted(int(i) for i in idx))
            if len(idx) < self.min_kept or len(set(idx)) != len(idx) or (idx and (idx[0] < 0 or idx[-1] >= full[n])):
                least = "non-empty, " if self.min_kept else ""
                raise HwpruneError(f"plan for {n!r}: kept indices must be {least}unique and in [0, {full[n]})")
            units[n] = idx
        return Plan(family=self.family, arch=self.arch(), units=units, meta=dict(meta))

    @abstractmethod
    def prune(self, model: nn.Module, plan: Plan, overrides: Mapping[str, torch.Tensor] | None = None) -> nn.Module: ...

    @abstractmethod
    def skeleton(self, plan: Plan) -> nn.Module: ...

    def saved_state(self, model: nn.Module, plan: Plan, folder: Path) -> dict[str, torch.Tensor]:
        """The tensors ``hwprune.save`` writes to ``folder/model.safetensors``; the family may write files
        beside them (a ``config.json`` that makes the folder loadable by another library). Default: the
        model's state dict, nothing else."""
        return dict(model.state_dict())

    def restored_state(self, plan: Plan, state: Mapping[str, torch.Tensor], folder: Path) -> dict[str, torch.Tensor]:
        """Inverse of :meth:`saved_state`: the skeleton's state dict from what was read. Default: as read."""
        return dict(state)

    def export_files(self, model: nn.Module, plan: Plan, folder: Path) -> dict[str, str]:
        """Extra files an export writes beside the model (a tokenizer), as {role: file name}. Default: none."""
        return {}

    def extra_graphs(self, model: nn.Module) -> list[ExtraGraph]:
        """ONNX graphs an export writes beside ``model.onnx`` (a decoder's one-step decode graph with its
        KV cache), each with parity checks. Default: none."""
        return []

    # ---- spaces -------------------------------------------------------------------------------
    def default_space_file(self) -> Path | None:
        """``search_spaces/<name>.yaml`` when it exists."""
        p = SPACES_DIR / f"{self.name}.yaml"
        return p if p.is_file() else None

    def default_space_spec(self) -> dict[str, Any]:
        """The space of a model without a YAML file (the same schema as the YAML). Default: dense only."""
        return {}

    def space(self, path: str | Path | None = None) -> PruningSpace:
        """The pruning space from ``path``, the model's YAML, or :meth:`default_space_spec`."""
        path = path or self.default_space_file()
        if path is None:
            return build_space(
                self.raw_units(), self.default_space_spec(), source=f"<{self.family} defaults>", model=self.name
            )
        return load_space(path, self.raw_units(), model=self.name)

    # ---- latency ------------------------------------------------------------------------------
    @abstractmethod
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
        """Time every block size of ``space`` on ``backend``: the table's rows and its ``meta``."""

    @abstractmethod
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
        """Export and load the profile's graphs without timing them (benchmarks time them in their own
        rounds). ``levels``: sizes per unit where the family samples a grid (None: its default)."""

    def measure_decode_latency(
        self,
        backend: "Backend",
        *,
        batch: int,
        contexts: Sequence[int],
        space: PruningSpace,
        progress: bool = True,
        budget_s: float | None = None,
    ) -> tuple["pd.DataFrame", dict[str, Any]]:
        """The decode regime: time one new token after a KV cache of each of ``contexts`` positions for every
        block size of ``space``. Rows as :meth:`measure_latency`'s plus a ``context`` column; ``meta``
        holds each context's meta under ``contexts``. ``budget_s`` is for all contexts together.
        Default: the family has no KV cache, said in one line."""
        raise HwpruneError(
            f"{self.family} models do not generate token by token (no KV cache); profile them with --regime prefill"
        )

    def predictor(self, table: "LatencyTable", space: PruningSpace) -> "Predictor":
        """The table's latency model. Default: additive per-unit lookups (:class:`LUTPredictor`)."""
        from hwprune.latency.predictor import LUTPredictor

        return LUTPredictor(table, space)

    # ---- accuracy -----------------------------------------------------------------------------
    @abstractmethod
    def load_calib(
        self, source: str | None = None, *, n_calib: int, n_heldout: int, seq: int, seed: int = 0, n_report: int = 0
    ) -> "CalibData":
        """Disjoint calibration, selection (``n_heldout``) and report inputs from ``source`` (a file) or the
        family's default, with ``CalibData.splits`` saying which corpus, domains and sizes."""

    def fit_proxy(self, name: str, space: PruningSpace, calib: "CalibData", **kw: Any) -> "ProxyState":
        """Fit the proxy registered as ``name`` for this family (``@register_proxy``)."""
        from hwprune.proxies._base import get_proxy

        return get_proxy(name, self.family)(self, space, calib, **kw)

    @abstractmethod
    def scorer(self, calib: "CalibData") -> Scorer:
        """End-to-end scorer against the dense model on ``calib.heldout``."""

    def distill_loss(self, student: nn.Module, teacher: nn.Module, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Recovery-distillation loss of ``student`` against ``teacher`` on one batch of model inputs
        (:mod:`hwprune.export.distill`), differentiable in the student's weights. Default: the relative
        squared error of the first output, ``|s - t|^2 / |t|^2``; a family with padded inputs or
        probabilities to compare overrides it."""
        names = self.onnx_io()[0]
        with torch.no_grad():
            ref = teacher(*[inputs[k] for k in names]).float()
        out = student(*[inputs[k] for k in names]).float()
        return (out - ref).square().sum() / ref.square().sum().clamp_min(1e-12)

    # ---- reports ------------------------------------------------------------------------------
    @abstractmethod
    def stats(self, model: nn.Module, *, batch: int, seq: int) -> "ModelStats":
        """Parameters and FLOPs (2 x MACs of matmuls/convs) of ``model`` for one forward pass."""

    def plan_summary(self, plan: Plan) -> dict[str, Any]:
        """Readable kept sizes for manifests. Default: unit -> kept size."""
        sizes = plan.sizes()
        return {"family": plan.family, "pruned_units": len(sizes), "sizes": sizes}

    def parity_inputs(self, *, seq: int) -> dict[str, torch.Tensor]:
        """Inputs on which ONNX Runtime must match torch. Default: two example rows."""
        return dict(self.example_inputs(batch=2, seq=seq))

    def parity_mask(self, inputs: Mapping[str, torch.Tensor]) -> np.ndarray | None:
        """Which positions of the first output count in parity (None: all). Default: all."""
        return None
