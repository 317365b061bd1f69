"""Physical channel surgery on CNNs, replayed from a :class:`~hwprune.surgery.plan.Plan`.

A plan names each pruned channel group by its root module (``group.layer1.0.conv1``) and lists the
root's output channels to keep, in the dense numbering. Replay builds torch-pruning's dependency
graph on a *copy* of the dense model and prunes the complement of each group; torch-pruning slices
every coupled tensor (convs, BatchNorms, linears, depthwise convs, concatenation offsets) and updates
the shape attributes (``in_channels``, ``num_features``, ``groups``). The order of groups does not
matter: each group's indices number its own root's channels, which no other group touches.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn

from hwprune.errors import HwpruneError
from hwprune.families.cnn.graph import build_graph
from hwprune.surgery.plan import Plan

__all__ = ["prune_cnn", "apply_overrides", "check_shapes"]


def prune_cnn(
    model: nn.Module,
    plan: Plan,
    example: torch.Tensor,
    overrides: Mapping[str, torch.Tensor] | None = None,
    *,
    inplace: bool = False,
) -> nn.Module:
    """A physically smaller copy of ``model`` (dense) keeping ``plan.units``' channels.

    ``overrides`` replaces tensors of the result by state-dict name (reconstructed consumer weights
    from a proxy); shapes must match the pruned model's.
    """
    out = model if inplace else copy.deepcopy(model)
    out.eval()
    dense_out = _output_shape(out, example)
    dg = build_graph(out, example)
    for unit, keep in plan.units.items():
        root_name = unit.removeprefix("group.")
        try:
            root = out.get_submodule(root_name)
        except AttributeError:
            raise HwpruneError(
                f"plan unit {unit!r} names module {root_name!r}, which this model lacks; "
                "the plan was made for another model"
            ) from None
        full = root.out_channels if isinstance(root, nn.Conv2d) else getattr(root, "out_features", None)
        if full is None:
            raise HwpruneError(f"plan unit {unit!r}: {root_name!r} is a {type(root).__name__}, not a conv or linear")
        keep_set = set(keep)
        if not keep_set or min(keep_set) < 0 or max(keep_set) >= full:
            raise HwpruneError(f"plan unit {unit!r}: kept indices must be non-empty and in [0, {full})")
        drop = [i for i in range(full) if i not in keep_set]
        if not drop:
            continue
        pruner = dg.get_pruner_of_module(root)
        group = dg.get_pruning_group(root, pruner.prune_out_channels, drop)
        if not dg.check_pruning_group(group):
            raise HwpruneError(f"plan unit {unit!r} would remove every channel of a coupled layer; keep at least one")
        group.prune()
    if overrides:
        apply_overrides(out, overrides)
    check_shapes(out, example, dense_out)
    return out


def apply_overrides(model: nn.Module, overrides: Mapping[str, torch.Tensor]) -> None:
    """Copy ``overrides`` (state-dict name -> tensor) into ``model``, checking names and shapes."""
    params = dict(model.named_parameters()) | dict(model.named_buffers())
    with torch.no_grad():
        for k, t in overrides.items():
            if k not in params:
                raise KeyError(f"override {k!r} is not a tensor of the pruned model")
            if tuple(t.shape) != tuple(params[k].shape):
                raise ValueError(
                    f"override {k!r} has shape {tuple(t.shape)}, pruned model needs {tuple(params[k].shape)}"
                )
            params[k].copy_(t.detach().to(params[k].dtype))


def _output_shape(model: nn.Module, example: torch.Tensor) -> tuple[int, ...]:
    with torch.no_grad():
        y = model(example)
    if not isinstance(y, torch.Tensor):
        raise HwpruneError(
            f"the model returns a {type(y).__name__}; CNN pruning needs a model returning one tensor "
            "(wrap it so forward returns the logits)"
        )
    return tuple(y.shape)


def check_shapes(model: nn.Module, example: torch.Tensor, expected: tuple[int, ...]) -> None:
    """Every stored shape attribute agrees with its tensors, and the output shape is unchanged."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            w = m.weight.shape  # (out, in / groups, kh, kw)
            assert w[0] == m.out_channels and w[1] * m.groups == m.in_channels, name
        elif isinstance(m, nn.BatchNorm2d):
            assert m.weight is None or m.weight.shape[0] == m.num_features, name
            assert m.running_mean is None or m.running_mean.shape[0] == m.num_features, name
        elif isinstance(m, nn.Linear):
            assert tuple(m.weight.shape) == (m.out_features, m.in_features), name
    got = _output_shape(model, example)
    if got != expected:
        raise HwpruneError(
            f"pruned model outputs shape {got}, the dense one {expected}; the graph has a coupling "
            "torch-pruning does not see (report the model)"
        )
