"""Accuracy proxies: per-unit error curves (additive, for DP) and materialised pruned weights.

Contract (every proxy runs ``tests/test_proxies.py``'s shared checks):
- A proxy is a function registered with ``@register_proxy(name, family=...)`` in the family's folder
  (the same pattern for every family): ``fit(adapter, space, calib: CalibData, **kw) -> ProxyState``.
  It may keep whatever it computed
  (orders, Hessians, statistics): one fit serves every candidate (the "database").
- ``ProxyState.unit_errors()`` -> one float64 array per unit of ``space`` (space order), aligned with
  ``unit.sizes``: the estimated output error when that unit alone keeps that size; 0 at full size,
  non-increasing in size; comparable across units (normalised by the energy of the residual stream
  the unit writes into) so that summing them ranks candidates.
- ``ProxyState.materialize(candidate) -> (plan, overrides)``: which indices each unit keeps and the
  reconstructed tensors (state-dict names of the *pruned* model) to pass to ``adapter.prune``.
- ``ProxyState.build(candidate)`` returns the physically pruned model (never masks).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from hwprune.errors import HwpruneError
from hwprune.families._base import Family
from hwprune.space import Candidate, PruningSpace
from hwprune.surgery.plan import Plan

__all__ = ["CalibData", "ProxyState", "register_proxy", "get_proxy", "proxy_names", "fit_proxy"]


@dataclass(frozen=True)
class CalibData:
    """Model inputs of three disjoint splits (batch-first tensors) and where they came from.

    ``calib``: the *calibration* split (proxy statistics). ``heldout``: the *selection* split, what the
    search's end-to-end scorer sees and so what chooses a pick. ``report``: the *report* split, never
    seen by the search, on which a pick's quality is stated (empty when none was asked for).
    ``splits``: JSON describing the corpus, its domains and each split's size (run.json's ``data``).
    """

    calib: Mapping[str, torch.Tensor]
    heldout: Mapping[str, torch.Tensor]
    source: str = "default"
    report: Mapping[str, torch.Tensor] = field(default_factory=dict)
    splits: Mapping[str, Any] = field(default_factory=dict)

    @property
    def n_calib(self) -> int:
        return int(next(iter(self.calib.values())).shape[0])

    @property
    def n_report(self) -> int:
        return int(next(iter(self.report.values())).shape[0]) if self.report else 0

    def for_report(self) -> "CalibData":
        """The same data with the report split in the scorer's place: ``family.scorer(calib.for_report())``."""
        if not self.report:
            raise HwpruneError(f"{self.source}: no report split was loaded; pass n_report >= 1 to load_calib")
        return replace(self, heldout=self.report, report={})


class ProxyState(ABC):
    name: str = ""

    def __init__(self, adapter: Family, space: PruningSpace) -> None:
        self.adapter, self.space = adapter, space

    @abstractmethod
    def unit_errors(self) -> list[np.ndarray]: ...

    @abstractmethod
    def materialize(self, cand: Candidate) -> tuple[Plan, dict[str, torch.Tensor]]: ...

    def build(self, cand: Candidate) -> nn.Module:
        plan, overrides = self.materialize(cand)
        return self.adapter.prune(self.adapter.dense(), plan, overrides)

    def scoring_model(self, cand: Candidate) -> nn.Module:
        """The model the end-to-end scorer sees for ``cand``: ``build(cand)`` unless a family offers a
        read-only equivalent that costs less memory (the decoder's slices one block at a time)."""
        return self.build(cand)


ProxyFit = Callable[..., ProxyState]
_PROXIES: dict[tuple[str, str], ProxyFit] = {}


def register_proxy(name: str, *, family: str) -> Callable[[ProxyFit], ProxyFit]:
    def deco(fn: ProxyFit) -> ProxyFit:
        _PROXIES[(name, family)] = fn
        return fn

    return deco


def _load_families() -> None:
    from hwprune.families import family_names

    family_names()  # imports the built-in families, whose modules register their proxies


def proxy_names(family: str | None = None) -> list[str]:
    _load_families()
    return sorted({n for n, f in _PROXIES if family is None or f == family})


def get_proxy(name: str, family: str) -> ProxyFit:
    _load_families()
    if (name, family) not in _PROXIES:
        raise HwpruneError(f"unknown proxy {name!r} for {family} models; supported: {', '.join(proxy_names(family))}")
    return _PROXIES[(name, family)]


def fit_proxy(name: str, adapter: Family, space: PruningSpace, calib: CalibData, **kw: Any) -> ProxyState:
    """Fit proxy ``name`` of ``adapter``'s family (same as ``adapter.fit_proxy``)."""
    return adapter.fit_proxy(name, space, calib, **kw)
