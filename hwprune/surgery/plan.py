"""Plan: the replayable surgery decision, as plain JSON.

``units`` maps each pruned unit to the indices it keeps (heads, neurons or channels, in the
dense model's numbering). Together with the dense architecture (``arch``) it fully determines the
pruned model's shapes; the pruned weights live beside it in ``model.safetensors``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hwprune._io import read_json, write_json
from hwprune.errors import HwpruneError
from hwprune.space import Candidate, PruningSpace

__all__ = ["Plan", "PLAN_FORMAT"]

PLAN_FORMAT = "hwprune.plan/1"


@dataclass(frozen=True)
class Plan:
    family: str  # adapter family: "encoder", "cnn"
    arch: Mapping[str, Any]  # dense architecture, enough for the adapter to rebuild it
    units: Mapping[str, tuple[int, ...]]  # unit name -> kept indices (ascending)
    meta: Mapping[str, Any] = field(default_factory=dict)

    def sizes(self) -> dict[str, int]:
        return {k: len(v) for k, v in self.units.items()}

    def candidate(self, space: PruningSpace) -> Candidate:
        s = self.sizes()
        return Candidate(tuple(s.get(u.name, u.full) for u in space.units))

    def to_json(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "family": self.family,
            "arch": dict(self.arch),
            "units": {k: list(v) for k, v in self.units.items()},
            "meta": dict(self.meta),
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any], *, where: str = "plan") -> "Plan":
        if obj.get("format") != PLAN_FORMAT:
            raise HwpruneError(f"{where}: not a hwprune plan (format {obj.get('format')!r}, expected {PLAN_FORMAT!r})")
        return cls(
            family=obj["family"],
            arch=obj["arch"],
            units={k: tuple(int(i) for i in v) for k, v in obj["units"].items()},
            meta=obj.get("meta", {}),
        )

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        path = Path(path)
        if not path.is_file():
            raise HwpruneError(f"{path} does not exist; a pruned model folder holds plan.json")
        try:
            return cls.from_json(read_json(path), where=str(path))
        except (ValueError, KeyError) as e:
            raise HwpruneError(f"{path}: corrupt plan ({e})") from None
