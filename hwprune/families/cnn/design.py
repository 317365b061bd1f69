"""Which pruned networks a CNN profile times, so that every conv is seen at every width pair.

A conv's latency depends on two units: the group it reads (c_in) and the group it writes (c_out).
Each unit gets K width levels from its space sizes (min .. full) and a colour c_u in Z_K such that
the input and output units of every conv differ. Network (a, b) in Z_K^2 sets unit u to level
``(a + b c_u) mod K``. For a conv reading p and writing q, ``(a + b c_p, a + b c_q)`` runs over all of
Z_K^2 (K prime, c_p != c_q), so K^2 networks put every conv at every (c_in, c_out) level pair,
however many convs there are; b = 0 are uniform networks and (K-1, 0) is the dense model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hwprune.errors import HwpruneError
from hwprune.families.cnn.graph import LayerInfo
from hwprune.space import PruningSpace

__all__ = ["unit_levels", "design", "layer_sizes", "layers_meta"]

_PRIMES = (2, 3, 5, 7, 11, 13)


def unit_levels(space: PruningSpace, k: int) -> dict[str, tuple[int, ...]]:
    """K sizes per unit spread over its allowed sizes, smallest and full included."""
    out = {}
    for u in space.units:
        s = u.sizes
        out[u.name] = tuple(sorted({s[round(i * (len(s) - 1) / max(k - 1, 1))] for i in range(k)}))
    return out


def _colour(layers: Sequence[LayerInfo], names: set[str], k: int) -> dict[str, int] | None:
    """Greedy colouring of units so every conv's input and output units differ; None if K is too few."""
    nbr: dict[str, set[str]] = {n: set() for n in names}
    for layer in layers:
        p, q = layer.in_group, layer.out_group
        if p in names and q in names and p != q:
            nbr[p].add(q)
            nbr[q].add(p)
    col: dict[str, int] = {}
    for n in sorted(names, key=lambda n: (-len(nbr[n]), n)):
        used = {col[m] for m in nbr[n] if m in col}
        free = [c for c in range(k) if c not in used]
        if not free:
            return None
        col[n] = free[0]
    return col


def design(space: PruningSpace, layers: Sequence[LayerInfo], *, levels: int = 5) -> tuple[int, list[dict[str, int]]]:
    """(K, networks): each network maps every unit of ``space`` to a kept size (see module doc)."""
    names = {u.name for u in space.units if len(u.sizes) > 1}
    for k in (p for p in _PRIMES if p >= min(levels, 13)):
        col = _colour(layers, names, k)
        if col is not None:
            break
    else:  # pragma: no cover - needs a unit adjacent to 13 others pairwise adjacent
        raise HwpruneError("cannot colour the conv graph for profiling; report the model")
    lv = unit_levels(space, k)
    nets = []
    for b in range(k):
        for a in range(k):
            nets.append(
                {
                    u.name: lv[u.name][min((a + b * col.get(u.name, 0)) % k, len(lv[u.name]) - 1)]
                    if u.name in names
                    else u.full
                    for u in space.units
                }
            )
    return k, nets


def layer_sizes(layer: LayerInfo, sizes: dict[str, int]) -> tuple[int, int]:
    """(c_in, c_out) of ``layer`` when units keep ``sizes`` (units absent from ``sizes`` stay full)."""
    ci = sizes[layer.in_group] * layer.in_mult if layer.in_group in sizes else layer.c_in
    co = sizes[layer.out_group] if layer.out_group is not None and layer.out_group in sizes else layer.c_out
    return (ci, ci) if layer.kind == "dw" else (ci, co)


def layers_meta(layers: Sequence[LayerInfo]) -> list[dict[str, Any]]:
    """What the predictor needs about each layer (stored in the table's sidecar)."""
    return [
        {
            "name": l.name,
            "kind": l.kind,
            "in_group": l.in_group,
            "out_group": l.out_group,
            "c_in": l.c_in,
            "c_out": l.c_out,
            "in_mult": l.in_mult,
        }
        for l in layers
    ]
