"""Pruning space: the prunable units of a model and the kept sizes each may take.

A *unit* is one independent width decision: the attention heads of layer i, the FFN width of layer
i, or (for CNNs) one coupled channel group. A :class:`Candidate` gives one kept size per unit.

Spaces are written in YAML (``search_spaces/*.yaml``)::

    model: minilm                 # informative; checked against the model family
    defaults:                     # per unit kind
      heads: {step: 1, min: 1, allow_remove: true}
      ffn:   {step: 64, min: 64, allow_remove: true}
    overrides:                    # applied in order; glob on unit names
      - {match: "layer.0.*", min: 128}
    ignore: ["layer.5.ffn"]       # units kept whole

``grid: [..]`` replaces ``step``; sizes outside ``[min, full]`` are dropped, ``full`` is always
allowed, ``0`` only with ``allow_remove``.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hwprune.errors import HwpruneError

__all__ = ["Unit", "UnitRule", "PruningSpace", "Candidate", "load_space"]

_RULE_KEYS = {"step", "min", "grid", "allow_remove"}


@dataclass(frozen=True)
class Unit:
    """One prunable width: ``full`` is the dense size, ``sizes`` the allowed kept sizes (ascending).

    ``granule`` is the number of weight columns per kept element (head_dim for heads, 1 for neurons);
    ``layer`` groups units for layer-level reporting (-1 when not meaningful).
    """

    name: str
    kind: str
    full: int
    sizes: tuple[int, ...]
    layer: int = -1
    granule: int = 1

    def __post_init__(self) -> None:
        if not self.sizes or self.sizes[-1] != self.full or list(self.sizes) != sorted(set(self.sizes)):
            raise ValueError(f"unit {self.name}: sizes must be ascending, unique and end at {self.full}")


@dataclass(frozen=True)
class UnitRule:
    step: int | None = None
    min: int = 0
    grid: tuple[int, ...] | None = None
    allow_remove: bool = False

    def sizes(self, full: int) -> tuple[int, ...]:
        if self.grid is not None:
            base = {s for s in self.grid if self.min <= s <= full}
        else:
            step = self.step or 1
            base = set(range(max(self.min, step if self.min == 0 else self.min), full, step))
            if self.min > 0:
                base.add(self.min)
        base = {s for s in base if s > 0}
        base.add(full)
        if self.allow_remove:
            base.add(0)
        return tuple(sorted(base))


def _parse_rule(obj: Any, where: str, base: UnitRule | None = None) -> UnitRule:
    if not isinstance(obj, Mapping):
        raise HwpruneError(f"{where} must be a mapping with keys {sorted(_RULE_KEYS)} (got {obj!r})")
    unknown = set(obj) - _RULE_KEYS - {"match"}
    if unknown:
        raise HwpruneError(f"{where}.{sorted(unknown)[0]} is not a known key; use one of {sorted(_RULE_KEYS)}")
    kw: dict[str, Any] = dict(base.__dict__) if base else {}
    if "step" in obj:
        if not isinstance(obj["step"], int) or isinstance(obj["step"], bool) or obj["step"] <= 0:
            raise HwpruneError(f"{where}.step must be a positive integer (got {obj['step']!r})")
        kw["step"], kw["grid"] = obj["step"], None
    if "min" in obj:
        if not isinstance(obj["min"], int) or isinstance(obj["min"], bool) or obj["min"] < 0:
            raise HwpruneError(f"{where}.min must be a non-negative integer (got {obj['min']!r})")
        kw["min"] = obj["min"]
    if "grid" in obj:
        g = obj["grid"]
        if not isinstance(g, list) or not g or not all(isinstance(s, int) and s >= 0 for s in g):
            raise HwpruneError(f"{where}.grid must be a non-empty list of non-negative integers (got {g!r})")
        kw["grid"], kw["step"] = tuple(g), None
    if "allow_remove" in obj:
        if not isinstance(obj["allow_remove"], bool):
            raise HwpruneError(f"{where}.allow_remove must be true or false (got {obj['allow_remove']!r})")
        kw["allow_remove"] = obj["allow_remove"]
    return UnitRule(**kw)


@dataclass(frozen=True)
class Candidate:
    """One kept size per unit, in the space's unit order."""

    sizes: tuple[int, ...]

    def key(self) -> str:
        return hashlib.sha1(json.dumps(list(self.sizes)).encode()).hexdigest()[:10]

    def as_dict(self, space: "PruningSpace") -> dict[str, int]:
        return {u.name: s for u, s in zip(space.units, self.sizes)}

    def to_json(self, space: "PruningSpace") -> dict[str, Any]:
        return {"key": self.key(), "sizes": self.as_dict(space)}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any], space: "PruningSpace") -> "Candidate":
        sizes = obj.get("sizes", obj)
        missing = [u.name for u in space.units if u.name not in sizes]
        if missing:
            raise HwpruneError(f"candidate lacks unit {missing[0]!r}; it was made for another space")
        return cls(tuple(int(sizes[u.name]) for u in space.units))


@dataclass(frozen=True)
class PruningSpace:
    """The units of one model and their allowed sizes. ``source`` says where it came from."""

    units: tuple[Unit, ...]
    model: str = ""
    source: str = ""
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = [u.name for u in self.units]
        if len(set(names)) != len(names):
            raise ValueError("unit names must be unique")

    @property
    def names(self) -> list[str]:
        return [u.name for u in self.units]

    def unit(self, name: str) -> Unit:
        for u in self.units:
            if u.name == name:
                return u
        raise KeyError(name)

    def dense(self) -> Candidate:
        return Candidate(tuple(u.full for u in self.units))

    def smallest(self) -> Candidate:
        return Candidate(tuple(u.sizes[0] for u in self.units))

    def uniform(self, fraction: float) -> Candidate:
        """Every unit at the allowed size nearest to ``fraction * full`` (the uniform baseline)."""
        return Candidate(tuple(min(u.sizes, key=lambda s: (abs(s - fraction * u.full), -s)) for u in self.units))

    def validate(self, cand: Candidate) -> None:
        if len(cand.sizes) != len(self.units):
            raise HwpruneError(f"candidate has {len(cand.sizes)} sizes but the space has {len(self.units)} units")
        for u, s in zip(self.units, cand.sizes):
            if s not in u.sizes:
                raise HwpruneError(f"unit {u.name}: kept size {s} is not allowed; allowed: {list(u.sizes)}")

    def size(self) -> int:
        n = 1
        for u in self.units:
            n *= len(u.sizes)
        return n


def build_space(
    raw_units: Sequence[tuple[str, str, int, int, int]],
    spec: Mapping[str, Any],
    *,
    source: str = "",
    model: str = "",
) -> PruningSpace:
    """Turn a YAML mapping into a space over ``raw_units`` = (name, kind, full, layer, granule).

    Every error names the offending key. Unit kinds and names come from the model adapter, so a
    YAML naming a unit or kind the model lacks is rejected.
    """
    where = source or "space"
    if not isinstance(spec, Mapping):
        raise HwpruneError(f"{where}: top level must be a mapping with 'defaults', 'overrides', 'ignore'")
    unknown = set(spec) - {"model", "defaults", "overrides", "ignore", "description"}
    if unknown:
        raise HwpruneError(
            f"{where}: unknown top-level key {sorted(unknown)[0]!r}; "
            "use model, description, defaults, overrides, ignore"
        )
    kinds = sorted({k for _, k, *_ in raw_units})
    defaults = spec.get("defaults") or {}
    if not isinstance(defaults, Mapping):
        raise HwpruneError(f"{where}: 'defaults' must map unit kinds ({', '.join(kinds)}) to rules")
    rules: dict[str, UnitRule] = {}
    for kind, obj in defaults.items():
        if kind not in kinds:
            raise HwpruneError(f"{where}: defaults.{kind} is not a unit kind of this model; kinds: {', '.join(kinds)}")
        rules[kind] = _parse_rule(obj, f"{where}: defaults.{kind}")
    names = [n for n, *_ in raw_units]
    per_unit: dict[str, UnitRule] = {n: rules.get(k, UnitRule(step=1, min=1)) for n, k, *_ in raw_units}
    overrides = spec.get("overrides") or []
    if not isinstance(overrides, list):
        raise HwpruneError(f"{where}: 'overrides' must be a list of {{match: GLOB, ...rule}}")
    for i, ov in enumerate(overrides):
        w = f"{where}: overrides[{i}]"
        if not isinstance(ov, Mapping) or not isinstance(ov.get("match"), str):
            raise HwpruneError(f"{w} must be a mapping with a 'match' glob over unit names")
        hit = fnmatch.filter(names, ov["match"])
        if not hit:
            raise HwpruneError(f"{w}.match {ov['match']!r} names no unit of this model; units look like {names[0]!r}")
        for n in hit:
            per_unit[n] = _parse_rule(ov, w, per_unit[n])
    ignore = spec.get("ignore") or []
    if not isinstance(ignore, list) or not all(isinstance(g, str) for g in ignore):
        raise HwpruneError(f"{where}: 'ignore' must be a list of unit-name globs")
    ignored: set[str] = set()
    for g in ignore:
        hit = fnmatch.filter(names, g)
        if not hit:
            raise HwpruneError(f"{where}: ignore entry {g!r} names no unit of this model; units look like {names[0]!r}")
        ignored.update(hit)
    units = []
    for name, kind, full, layer, granule in raw_units:
        sizes = (full,) if name in ignored else per_unit[name].sizes(full)
        units.append(Unit(name=name, kind=kind, full=full, sizes=sizes, layer=layer, granule=granule))
    return PruningSpace(units=tuple(units), model=model or str(spec.get("model", "")), source=source)


def load_space(
    path: str | Path, raw_units: Sequence[tuple[str, str, int, int, int]], *, model: str = ""
) -> PruningSpace:
    path = Path(path)
    if not path.exists():
        raise HwpruneError(f"space file {path} does not exist; pick one from search_spaces/ or write one")
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        loc = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise HwpruneError(f"{path}: malformed YAML{loc}: {getattr(e, 'problem', e)}") from None
    return build_space(raw_units, spec or {}, source=str(path), model=model)


def space_from_units(units: Iterable[Unit], **kw: Any) -> PruningSpace:
    return PruningSpace(units=tuple(units), **kw)
