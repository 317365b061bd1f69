"""What every encoder proxy shares: tracks per unit (:mod:`hwprune.proxies.database`), cached levels.

A proxy fits once and keeps, per unit, the order in which it removes elements (heads or neurons)
and the normalised output error at every kept size. A kept size ``s`` always keeps the elements
*not* among the first ``full - s`` removed, so levels are nested and many candidates reuse one fit
(the "database"). Each proxy supplies :meth:`EncoderState._reconstruct`, the tensors of one unit at
one kept set; results are cached per (unit, size).

Errors all measure one thing, so proxies compare: the mean squared change of the sublayer's output
per token, divided by the mean squared norm of the residual stream it is added to.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

import numpy as np
import torch

from hwprune.errors import HwpruneError
from hwprune.families._base import Family
from hwprune.families.encoder.collect import LayerStats, collect_stats
from hwprune.families.encoder.surgery import kept_columns
from hwprune.proxies._base import CalibData, ProxyState
from hwprune.proxies.database import Track
from hwprune.proxies.stats import SublayerStats
from hwprune.space import Candidate, PruningSpace, Unit
from hwprune.surgery.plan import Plan

__all__ = ["EncoderState", "sublayer", "ensure_stats", "unit_prefix"]


def unit_prefix(unit: Unit) -> tuple[str, str]:
    """State-dict prefixes (sublayer, its output projection) of ``unit``: the names overrides use."""
    if unit.kind == "heads":
        return f"layers.{unit.layer}.attention.", f"layers.{unit.layer}.attention.dense."
    if unit.kind == "ffn":
        return f"layers.{unit.layer}.ffn.", f"layers.{unit.layer}.ffn.output."
    raise HwpruneError(
        f"unit {unit.name!r} of kind {unit.kind!r} is not an encoder unit; "
        "encoder proxies prune 'heads' and 'ffn' units"
    )


def sublayer(adapter: Family, stats: list[LayerStats], unit: Unit) -> tuple[torch.nn.Linear, SublayerStats]:
    """(dense output projection, statistics of its input) of ``unit``."""
    unit_prefix(unit)  # rejects foreign unit kinds
    layer = adapter.dense().layers[unit.layer]
    if unit.kind == "heads":
        return layer.attention.dense, stats[unit.layer].attn
    return layer.ffn.output, stats[unit.layer].ffn


def ensure_stats(
    adapter: Family,
    calib: CalibData,
    stats: list[LayerStats] | None,
    *,
    batch: int,
    threads: int | None,
    progress: bool,
) -> list[LayerStats]:
    """``stats`` if given (one pass can serve several proxies), else a fresh pass over ``calib.calib``."""
    if stats is not None:
        return stats
    return collect_stats(adapter.dense(), calib.calib, batch=batch, threads=threads, progress=progress)


class EncoderState(ProxyState):
    """Nested levels from removal orders; subclasses say how to rebuild one unit's tensors."""

    def __init__(
        self, adapter: Family, space: PruningSpace, tracks: list[Track], *, meta: dict[str, Any] | None = None
    ) -> None:
        super().__init__(adapter, space)
        self.tracks, self.meta = tracks, dict(meta or {})
        self._levels: dict[tuple[int, int], dict[str, torch.Tensor]] = {}

    def unit_errors(self) -> list[np.ndarray]:
        return [t.errors[list(t.unit.sizes)].astype(np.float64) for t in self.tracks]

    def kept(self, cand: Candidate) -> dict[str, tuple[int, ...]]:
        self.space.validate(cand)
        return {t.unit.name: t.kept(s) for t, s in zip(self.tracks, cand.sizes)}

    def level(self, index: int, size: int) -> dict[str, torch.Tensor]:
        """Overrides (pruned-model names) for unit ``index`` at kept ``size``; cached."""
        key = (index, size)
        if key not in self._levels:
            t = self.tracks[index]
            if size == t.unit.full:
                self._levels[key] = {}
            else:
                prefix, proj = unit_prefix(t.unit)
                weight, bias = self._reconstruct(index, kept_columns(t.kept(size), t.unit.granule))
                out: dict[str, torch.Tensor] = {}
                if size > 0:
                    if weight is not None:
                        out[proj + "weight"] = weight.to(torch.float32)
                    if bias is not None:
                        out[proj + "bias"] = bias.to(torch.float32)
                elif bias is not None:  # the sublayer is gone; its bias parameter carries the constant
                    out[prefix + "bias"] = bias.to(torch.float32)
                self._levels[key] = out
        return self._levels[key]

    def materialize(self, cand: Candidate) -> tuple[Plan, dict[str, torch.Tensor]]:
        kept = self.kept(cand)
        overrides: dict[str, torch.Tensor] = {}
        for i, s in enumerate(cand.sizes):
            overrides.update(self.level(i, s))
        return self.adapter.plan(kept, proxy=self.name, candidate=cand.key()), overrides

    @abstractmethod
    def _reconstruct(self, index: int, cols: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(weight (out, len(cols)) or None to slice the dense one, bias (out,) or None to keep it)."""
