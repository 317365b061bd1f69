"""ModelAdapter: what the engine needs to know about one model family.

Contract (every adapter passes ``tests/test_adapter_contract.py``):

- ``dense()`` returns the dense model in eval mode, float32, on CPU; it is built once and cached.
- ``raw_units()`` enumerates prunable units as ``(name, kind, full, layer, granule)``; unit names are
  stable strings (``layer.3.heads``, ``group.12``) used in spaces, plans and tables.
- ``example_inputs(batch=, seq=)`` gives the named inputs of the ONNX graph (``seq`` is ignored by
  image models, which use ``input_shape``).
- ``plan(kept)`` turns unit -> kept indices into a :class:`Plan`; ``prune(model, plan, overrides)``
  returns a *new*, physically smaller model (the dense one is untouched), optionally replacing
  some of its tensors by ``overrides`` (reconstructed weights from a proxy, keyed by the pruned
  model's state-dict names); ``skeleton(plan)`` builds the pruned shapes with uninitialised weights
  so ``hwprune.load`` can fill them from safetensors.
- ``onnx_io()`` gives (input names, output names, dynamic axes) for export.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from hwprune.errors import HwpruneError
from hwprune.space import PruningSpace, build_space, load_space
from hwprune.surgery.plan import Plan

__all__ = ["ModelAdapter", "RawUnit", "SPACES_DIR"]

RawUnit = tuple[str, str, int, int, int]  # name, kind, full, layer, granule
SPACES_DIR = Path(__file__).resolve().parents[2] / "search_spaces"


class ModelAdapter(ABC):
    family: str = ""
    name: str = ""

    # ---- identity ---------------------------------------------------------------------------
    @abstractmethod
    def spec(self) -> dict[str, Any]:
        """JSON that rebuilds this adapter (model name or path, input settings)."""

    @abstractmethod
    def arch(self) -> dict[str, Any]:
        """Dense architecture as JSON (stored in plans; enough to build a skeleton)."""

    @abstractmethod
    def shape_key(self) -> str:
        """What a latency table depends on besides the device (dense shape)."""

    # ---- model ------------------------------------------------------------------------------
    @abstractmethod
    def dense(self) -> nn.Module: ...

    @abstractmethod
    def raw_units(self) -> list[RawUnit]: ...

    @abstractmethod
    def example_inputs(self, *, batch: int = 1, seq: int = 128) -> dict[str, torch.Tensor]: ...

    @abstractmethod
    def onnx_io(self) -> tuple[list[str], list[str], dict[str, dict[int, str]]]: ...

    # ---- surgery ----------------------------------------------------------------------------
    min_kept: int = 0  # fewest indices a unit may keep (CNN channel groups keep at least one)

    def plan(self, kept: Mapping[str, Sequence[int]], **meta: Any) -> Plan:
        """Validated unit -> sorted kept indices; one line naming the unit when an entry is wrong."""
        full = {n: f for n, _, f, *_ in self.raw_units()}
        units: dict[str, tuple[int, ...]] = {}
        for n, idx in kept.items():
            if n not in full:
                raise HwpruneError(f"plan names unit {n!r}, which this model lacks; units look like {next(iter(full))!r}")
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

    # ---- spaces -----------------------------------------------------------------------------
    def default_space_file(self) -> Path | None:
        p = SPACES_DIR / f"{self.name}.yaml"
        return p if p.is_file() else None

    def space(self, path: str | Path | None = None) -> PruningSpace:
        path = path or self.default_space_file()
        if path is None:
            return build_space(self.raw_units(), {}, source="<defaults>", model=self.name)
        return load_space(path, self.raw_units(), model=self.name)
