"""Model families and the ``--model`` resolver.

Each family is a subpackage (``hwprune/families/<name>/``) whose ``__init__`` registers its
:class:`Family` subclass (``@register_family``), its named models (``@register_model``), the Hugging
Face ``model_type`` values it reads from local folders (``@register_hf_folder``) and any other
``--model`` forms (``@register_resolver``). Adding a family is one folder plus one entry in
:data:`BUILTIN_FAMILIES`; the contract suite (``tests/test_family_contract.py``) then runs on it.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from hwprune.errors import HwpruneError
from hwprune.families._base import Family, RawUnit, Scorer
from hwprune.surgery.plan import Plan

__all__ = [
    "Family",
    "RawUnit",
    "Scorer",
    "BUILTIN_FAMILIES",
    "register_family",
    "register_model",
    "register_resolver",
    "register_hf_folder",
    "resolve_model",
    "named_models",
    "family_class",
    "family_names",
    "skeleton_for_plan",
]

#: The families shipped with hwprune, imported on first use (their ``__init__`` registers them).
BUILTIN_FAMILIES = ("encoder", "cnn", "decoder")

F = TypeVar("F", bound=type[Family])
_FAMILIES: dict[str, type[Family]] = {}
_NAMED: dict[str, Callable[[], Family]] = {}
_HF_TYPES: dict[str, Callable[[Path], Family]] = {}
_RESOLVERS: list[Callable[[str], Family | None]] = []
_loaded = False


def register_family(cls: F) -> F:
    """Class decorator: ``cls.family`` becomes a family ``hwprune.load`` can rebuild plans of."""
    if not cls.family:
        raise TypeError(f"{cls.__name__} must set the class attribute 'family'")
    _FAMILIES[cls.family] = cls
    return cls


def register_model(name: str) -> Callable[[Callable[[], Family]], Callable[[], Family]]:
    """Register a named model (``--model NAME``): a function returning its adapter."""

    def deco(fn: Callable[[], Family]) -> Callable[[], Family]:
        _NAMED[name] = fn
        return fn

    return deco


def register_hf_folder(*model_types: str) -> Callable[[Callable[[Path], Family]], Callable[[Path], Family]]:
    """Register the reader of local Hugging Face folders whose ``config.json`` has these ``model_type``."""

    def deco(fn: Callable[[Path], Family]) -> Callable[[Path], Family]:
        for t in model_types:
            _HF_TYPES[t] = fn
        return fn

    return deco


def register_resolver(fn: Callable[[str], Family | None]) -> Callable[[str], Family | None]:
    """A resolver gets the raw ``--model`` string and returns an adapter, or None when it is not its form."""
    _RESOLVERS.append(fn)
    return fn


def _load_builtin() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for name in BUILTIN_FAMILIES:
            importlib.import_module(f"hwprune.families.{name}")


def named_models() -> list[str]:
    _load_builtin()
    return sorted(_NAMED)


def family_names() -> list[str]:
    _load_builtin()
    return sorted(_FAMILIES)


def family_class(name: str) -> type[Family]:
    _load_builtin()
    if name not in _FAMILIES:
        raise HwpruneError(f"model family {name!r} is unknown; known: {', '.join(sorted(_FAMILIES))}")
    return _FAMILIES[name]


def _from_folder(path: Path) -> Family:
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise HwpruneError(f"{path}: no config.json; --model PATH needs a local Hugging Face model folder")
    try:
        cfg: Any = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HwpruneError(f"{cfg_path}: not valid JSON ({e})") from None
    mt = str(cfg.get("model_type", "bert")) if isinstance(cfg, dict) else "?"
    if mt not in _HF_TYPES:
        raise HwpruneError(
            f"{cfg_path}: model_type {mt!r} is not supported; supported architectures: {', '.join(sorted(_HF_TYPES))}"
        )
    return _HF_TYPES[mt](path)


def resolve_model(model: str) -> Family:
    """A registered name | a resolver's form (``package.module:factory``) | a local Hugging Face folder."""
    _load_builtin()
    if model in _NAMED:
        return _NAMED[model]()
    for r in _RESOLVERS:
        a = r(model)
        if a is not None:
            return a
    p = Path(model)
    if p.is_dir():
        return _from_folder(p)
    raise HwpruneError(
        f"unknown model {model!r}; supported: {', '.join(sorted(_NAMED))}, a local Hugging Face folder "
        f"(config.json + model.safetensors; {', '.join(sorted(_HF_TYPES))})"
        + (", or package.module:factory" if _RESOLVERS else "")
    )


def skeleton_for_plan(plan: Plan) -> Any:
    """The pruned shapes of ``plan`` with uninitialised weights (what ``hwprune.load`` fills)."""
    return family_class(plan.family).from_arch(plan.arch).skeleton(plan)
