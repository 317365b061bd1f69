"""What every decoder proxy shares: tracks per unit (:mod:`hwprune.proxies.database`), cached levels.

A proxy fits once and keeps, per unit, the order in which it removes elements (KV groups of
``layer.{i}.attn``, neurons of ``layer.{i}.ffn``) and the normalised output error at every kept size.
A kept size ``s`` always keeps the elements *not* among the first ``full - s`` removed, so levels are
nested and many candidates reuse one fit (the "database"). Each proxy supplies
:meth:`DecoderState._reconstruct`, the tensors of one unit at one kept set; results are cached per
(unit, size).

Errors all measure one thing, so proxies compare (and the DP can add them): the mean squared change
of the sublayer's output per token, divided by the mean squared norm of the residual stream entering
it. A unit's element ``e`` owns the output projection's input columns ``e * granule .. (e + 1) *
granule - 1`` (a KV group: its ``group_size`` query heads, ``head_dim`` columns each; a neuron: one).

Override names (state dict of the *pruned* model): ``layers.{i}.attn.o_proj.weight|bias`` and
``layers.{i}.mlp.down_proj.weight|bias`` while the sublayer is kept; when it is removed (size 0) and
the projection had a bias (``o_proj_bias`` / ``mlp_bias``), the constant it leaves goes to
``layers.{i}.attn.out_bias`` / ``layers.{i}.mlp.out_bias``.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from abc import abstractmethod
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hwprune.errors import HwpruneError
from hwprune.families._base import Family
from hwprune.proxies._base import CalibData, ProxyState
from hwprune.proxies.database import Track
from hwprune.proxies.stats import SublayerStats
from hwprune.space import Candidate, PruningSpace, Unit
from hwprune.surgery.plan import Plan

from .collect import WIDE, LayerStats, collect_stats
from .config import DecoderConfig
from .model import Block, Decoder
from .stream import PrunedView

__all__ = ["DecoderState", "unit_names", "sublayer", "ensure_stats", "group_columns"]


def unit_names(unit: Unit) -> tuple[str, str]:
    """(output-projection prefix, removed-sublayer bias name) of ``unit`` in the pruned state dict."""
    if unit.kind == "attn":
        return f"layers.{unit.layer}.attn.o_proj.", f"layers.{unit.layer}.attn.out_bias"
    if unit.kind == "ffn":
        return f"layers.{unit.layer}.mlp.down_proj.", f"layers.{unit.layer}.mlp.out_bias"
    raise HwpruneError(
        f"unit {unit.name!r} of kind {unit.kind!r} is not a decoder proxy unit; decoder proxies prune 'attn' and 'ffn'"
    )


def group_columns(kept: tuple[int, ...] | list[int], granule: int) -> torch.Tensor:
    """Element indices -> the projection's input columns they own (sorted as given), int64."""
    idx = torch.as_tensor(list(kept), dtype=torch.long)
    return (idx[:, None] * granule + torch.arange(granule)[None, :]).reshape(-1)


def sublayer(adapter: Family, stats: list[LayerStats], unit: Unit) -> tuple[nn.Linear, SublayerStats]:
    """(dense output projection, statistics of its input) of ``unit``."""
    unit_names(unit)  # rejects foreign unit kinds
    model = adapter.dense()
    assert isinstance(model, Decoder)
    layer = model.layers[unit.layer]
    assert isinstance(layer, Block)
    if unit.kind == "attn":
        lin, st = layer.attn.o_proj, stats[unit.layer].attn
    else:
        lin, st = layer.mlp.down_proj, stats[unit.layer].ffn
    if lin.in_features != unit.full * unit.granule or st.width != lin.in_features:
        raise HwpruneError(
            f"unit {unit.name!r}: {unit.full} x {unit.granule} columns, but the projection has {lin.in_features} "
            f"and the statistics {st.width}; the space or statistics belong to another model"
        )
    return lin, st


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
    model = adapter.dense()
    assert isinstance(model, Decoder)
    return collect_stats(
        model, calib.calib, batch=batch, threads=threads, progress=progress, spill=spill_folder(model.config)
    )


SPILL_BYTES = 1 << 30  # statistics of a whole model above this go to disk, one layer at a time
LEVEL_CACHE_BYTES = 512 << 20  # reconstructed weights kept for reuse across trials, at most ...
# ... this share of the dense weights (a trial's peak memory is weights + cache + one block). 1 %: at 5 % the
# cache was a quarter of llama-3.2-1b's trial peak above the weights (bench_memory), for few hits
LEVEL_CACHE_SHARE = 0.01


def stats_bytes(cfg: DecoderConfig) -> int:
    """Memory of every layer's ``x^T x`` sums (float64; float32 above ``collect.WIDE`` columns)."""
    total = 0
    for i in range(cfg.num_layers):
        g, p, f = cfg.layer_shape(i)
        for w in (g * p * cfg.head_dim, f):
            total += w * w * (4 if w > WIDE else 8)
    return total


def spill_folder(cfg: DecoderConfig) -> Path | None:
    """A temporary folder for the statistics when they would take more than ``SPILL_BYTES`` in memory.

    Removed when the process exits (the proxy states read it until then)."""
    if stats_bytes(cfg) <= SPILL_BYTES:
        return None
    path = Path(tempfile.mkdtemp(prefix="hwprune-stats-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


class DecoderState(ProxyState):
    """Nested levels from removal orders; subclasses say how to rebuild one unit's tensors."""

    def __init__(
        self, adapter: Family, space: PruningSpace, tracks: list[Track], *, meta: dict[str, Any] | None = None
    ) -> None:
        super().__init__(adapter, space)
        self.tracks, self.meta = tracks, dict(meta or {})
        # reconstructed levels, least recently used first; bounded so a wide model's search stays lean
        self._levels: OrderedDict[tuple[int, int], dict[str, torch.Tensor]] = OrderedDict()
        dense_bytes = sum(p.numel() * p.element_size() for p in adapter.dense().parameters())
        self.cache_bytes = min(LEVEL_CACHE_BYTES, int(LEVEL_CACHE_SHARE * dense_bytes))

    def unit_errors(self) -> list[np.ndarray]:
        """Per unit (space order), the error at each of ``unit.sizes``: float64, 0 at full, non-increasing."""
        return [t.errors[list(t.unit.sizes)].astype(np.float64) for t in self.tracks]

    def kept(self, cand: Candidate) -> dict[str, tuple[int, ...]]:
        """Unit name -> kept element indices (dense numbering) of ``cand``."""
        self.space.validate(cand)
        return {t.unit.name: t.kept(s) for t, s in zip(self.tracks, cand.sizes)}

    def level(self, index: int, size: int) -> dict[str, torch.Tensor]:
        """Overrides (pruned-model names, float32) for unit ``index`` at kept ``size``; cached."""
        key = (index, size)
        if key not in self._levels:
            t = self.tracks[index]
            out: dict[str, torch.Tensor] = {}
            if size != t.unit.full:
                proj, removed = unit_names(t.unit)
                weight, bias = self._reconstruct(index, group_columns(t.kept(size), t.unit.granule))
                if size > 0:
                    if weight is not None:
                        out[proj + "weight"] = weight.to(torch.float32).contiguous()
                    if bias is not None:
                        out[proj + "bias"] = bias.to(torch.float32).contiguous()
                elif bias is not None:  # the sublayer is gone; its out_bias carries the constant it leaves
                    out[removed] = bias.to(torch.float32).contiguous()
            self._levels[key] = out
            self._trim()
        self._levels.move_to_end(key)
        return self._levels[key]

    def _trim(self) -> None:
        size = sum(t.nbytes for lv in self._levels.values() for t in lv.values())
        while size > self.cache_bytes and len(self._levels) > 1:
            _, lv = self._levels.popitem(last=False)
            size -= sum(t.nbytes for t in lv.values())

    def scoring_model(self, cand: Candidate) -> nn.Module:
        """The pruned model as a :class:`PrunedView`: blocks sliced one at a time while the scorer runs,
        each block's reconstructed weights made (or taken from the level cache) when it is reached, so a
        trial holds the cache plus one block, not every reconstructed projection of the candidate."""
        kept = self.kept(cand)
        plan = self.adapter.plan(kept, proxy=self.name, candidate=cand.key())
        by_layer: dict[int, list[int]] = {}
        for j, t in enumerate(self.tracks):
            by_layer.setdefault(int(t.unit.layer), []).append(j)

        def layer_overrides(i: int) -> dict[str, torch.Tensor]:
            out: dict[str, torch.Tensor] = {}
            for j in by_layer.get(i, []):
                out.update(self.level(j, cand.sizes[j]))
            return out

        dense = self.adapter.dense()
        assert isinstance(dense, Decoder)
        return PrunedView(dense, plan.units, layer_overrides)

    def materialize(self, cand: Candidate) -> tuple[Plan, dict[str, torch.Tensor]]:
        kept = self.kept(cand)
        overrides: dict[str, torch.Tensor] = {}
        for i, s in enumerate(cand.sizes):
            overrides.update(self.level(i, s))
        return self.adapter.plan(kept, proxy=self.name, candidate=cand.key()), overrides

    @abstractmethod
    def _reconstruct(self, index: int, cols: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(weight (out, len(cols)) or None to slice the dense one, bias (out,) or None to keep the dense one).

        At size 0 (``cols`` empty) the weight is ignored and a bias, if any, becomes the removed
        sublayer's ``out_bias``; return None there when the projection has no bias.
        """
