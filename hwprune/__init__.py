"""hwprune: hardware-aware structured pruning. The speedup you ask for is the speedup you measure.

Heavy and optional parts (TensorRT, torchvision models) are imported lazily.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["load", "save", "__version__"]

if TYPE_CHECKING:
    from torch import nn

    from hwprune.surgery.plan import Plan


def save(model: "nn.Module", plan: "Plan", folder: str | Path) -> Path:
    """Write ``plan.json`` + ``model.safetensors`` into ``folder`` (atomically, file by file)."""
    from safetensors.torch import save_file

    from hwprune._io import atomic_path
    from hwprune.families import family_class

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    plan.save(folder / "plan.json")
    family = family_class(plan.family).from_arch(plan.arch)
    state = family.saved_state(model, plan, folder)  # may write files beside it (e.g. a config.json)
    with atomic_path(folder / "model.safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata={"format": "pt"})
    return folder


def load(folder: str | Path) -> "nn.Module":
    """Rebuild a pruned model from ``plan.json`` + ``model.safetensors``; no pickled modules involved."""
    from safetensors.torch import load_file

    from hwprune.errors import HwpruneError
    from hwprune.families import family_class
    from hwprune.surgery.plan import Plan

    folder = Path(folder)
    plan = Plan.load(folder / "plan.json")
    wpath = folder / "model.safetensors"
    if not wpath.is_file():
        raise HwpruneError(f"{folder}: model.safetensors is missing; export the candidate again")
    family = family_class(plan.family).from_arch(plan.arch)
    model = family.skeleton(plan)
    state = family.restored_state(plan, load_file(str(wpath)), folder)
    # safetensors carry no state-dict metadata; modules that check their version on load (torchvision's
    # MNASNet refuses version None) get the skeleton's own, which is the same class
    meta = getattr(model.state_dict(), "_metadata", None)
    if meta is not None:
        from collections import OrderedDict

        state = OrderedDict(state)
        state._metadata = meta  # type: ignore[attr-defined]  # what torch's state_dict() attaches too
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise HwpruneError(f"{wpath}: weights do not match plan.json ({first})") from None
    return model.eval()
