"""Model adapters and the ``--model`` resolver.

Named models register with :func:`register_model`; a path to a local Hugging Face folder is read as
a BERT-family encoder; ``package.module:factory`` (CNN issue) resolves to a user callable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from hwprune.errors import HwpruneError
from hwprune.models._base import ModelAdapter, RawUnit
from hwprune.surgery.plan import Plan

__all__ = ["ModelAdapter", "RawUnit", "register_model", "resolve_model", "named_models", "register_family",
           "skeleton_for_plan"]

_NAMED: dict[str, Callable[..., ModelAdapter]] = {}
_FAMILIES: dict[str, Callable[[Plan], object]] = {}
_RESOLVERS: list[Callable[[str], ModelAdapter | None]] = []


def register_model(name: str) -> Callable[[Callable[..., ModelAdapter]], Callable[..., ModelAdapter]]:
    def deco(fn: Callable[..., ModelAdapter]) -> Callable[..., ModelAdapter]:
        _NAMED[name] = fn
        return fn
    return deco


def register_family(family: str) -> Callable[[Callable[[Plan], object]], Callable[[Plan], object]]:
    """Register how to build a skeleton of ``family`` from a plan (used by ``hwprune.load``)."""
    def deco(fn: Callable[[Plan], object]) -> Callable[[Plan], object]:
        _FAMILIES[family] = fn
        return fn
    return deco


def register_resolver(fn: Callable[[str], ModelAdapter | None]) -> Callable[[str], ModelAdapter | None]:
    """A resolver gets the raw ``--model`` string and returns an adapter or None (not mine)."""
    _RESOLVERS.append(fn)
    return fn


def named_models() -> list[str]:
    _load_builtin()
    return sorted(_NAMED)


def _load_builtin() -> None:
    from hwprune.models import builtin  # noqa: F401  (registers the named models)


def resolve_model(model: str, **kw: object) -> ModelAdapter:
    """``minilm`` | ``bert-base`` | other registered names | a local HF folder | resolvers' forms."""
    _load_builtin()
    if model in _NAMED:
        return _NAMED[model](**kw)
    for r in _RESOLVERS:
        a = r(model)
        if a is not None:
            return a
    p = Path(model)
    if p.is_dir():
        from hwprune.models.bert import EncoderAdapter

        return EncoderAdapter.from_folder(p)
    raise HwpruneError(
        f"unknown model {model!r}; supported: {', '.join(sorted(_NAMED))}, a local Hugging Face folder of a "
        "BERT-family encoder (config.json + model.safetensors)"
        + (", or package.module:factory" if _RESOLVERS else "")
    )


def skeleton_for_plan(plan: Plan) -> object:
    _load_builtin()
    if plan.family not in _FAMILIES:
        raise HwpruneError(f"plan family {plan.family!r} is unknown; known: {', '.join(sorted(_FAMILIES))}")
    return _FAMILIES[plan.family](plan)
