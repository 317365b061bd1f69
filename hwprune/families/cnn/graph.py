"""What a CNN's channel coupling looks like: torch-pruning's dependency graph, read once into plain data.

A *channel group* is a set of output channels that must be pruned together (a residual stream joined
by adds, an expand conv with the depthwise conv after it, inputs of a concatenation). Each group that
neither reaches the model output nor touches a grouped conv becomes one pruning unit named after its
first producer in module order (``group.layer1.0.conv1``): stable across processes, readable in YAML.

Every conv/linear also gets a :class:`LayerInfo` (which group feeds it, which group it writes, its
shape and input resolution): the latency model and the proxies both work from these.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from hwprune.errors import HwpruneError

__all__ = ["ChannelGroup", "LayerInfo", "GraphInfo", "analyze", "build_graph", "SUPPORTED_WEIGHTED"]

# Leaf modules with weights that channel surgery knows how to slice; anything else is refused by name.
SUPPORTED_WEIGHTED = (nn.Conv2d, nn.BatchNorm2d, nn.Linear)


@dataclass(frozen=True)
class ChannelGroup:
    name: str  # "group." + root
    kind: str  # conv | residual | dw | linear
    full: int  # channels of the root's output
    root: str  # module whose output channels the plan's indices number
    producers: tuple[str, ...]  # conv/linear layers whose outputs are pruned
    consumers: tuple[str, ...]  # conv/linear layers whose inputs are pruned (depthwise excluded)
    depthwise: tuple[str, ...]  # depthwise convs carried along (their input and output channels)
    norms: tuple[str, ...]  # BatchNorms whose channels go with the group
    prunable: bool  # False: reaches the model output or a grouped conv, or feeds a layer in part
    # module -> its channel (consumers: input-channel / feature) indices, ordered by root channel;
    # len = full * k where a flatten gives k features per channel (vgg's 7x7 before classifier.0)
    index: Mapping[str, tuple[int, ...]] = field(default_factory=dict, compare=False)

    def columns(self, module: str) -> np.ndarray:
        """(full, k) indices of ``module``'s channels (or features) owned by each group channel."""
        idx = np.asarray(self.index[module], dtype=np.int64)
        return idx.reshape(self.full, -1)


@dataclass(frozen=True)
class LayerInfo:
    """One conv (or linear) layer; ``linear`` layers are 1x1 convs on a 1x1 map for latency."""

    name: str
    kind: str  # conv | dw | linear
    c_in: int  # input channels (features for linear)
    c_out: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    in_hw: tuple[int, int]  # input spatial size at the profiled image size
    in_group: str | None  # unit feeding it (None: model input or a fixed group)
    out_group: str | None  # unit it writes (None: output or fixed)
    in_mult: int = 1  # inputs per group channel (flatten of a CxHxW map into a linear)
    groups: int = 1  # conv groups (== c_in for depthwise)


@dataclass(frozen=True)
class GraphInfo:
    groups: tuple[ChannelGroup, ...]
    layers: tuple[LayerInfo, ...]

    def units(self) -> list[ChannelGroup]:
        return [g for g in self.groups if g.prunable]

    def group(self, name: str) -> ChannelGroup:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(name)


def check_supported(model: nn.Module) -> None:
    """Refuse, naming the module, any leaf with weights that channel surgery cannot slice."""
    for name, m in model.named_modules():
        own = list(m.parameters(recurse=False))
        if not own:
            continue
        if not isinstance(m, SUPPORTED_WEIGHTED):
            raise HwpruneError(
                f"module {name!r} ({type(m).__name__}) is not supported by CNN pruning; supported "
                "layers with weights: Conv2d, BatchNorm2d, Linear (wrap other models, or pass a "
                "model without it)"
            )
        if isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups != m.in_channels:
            continue  # grouped convs are allowed; their groups stay whole (see analyze)


def build_graph(model: nn.Module, example: torch.Tensor) -> Any:
    """torch-pruning's DependencyGraph of ``model`` traced on ``example`` (one clear line on failure)."""
    import torch_pruning as tp

    try:
        with torch.enable_grad():
            return tp.DependencyGraph().build_dependency(model, example_inputs=example, verbose=False)
    except Exception as e:  # tracing fails in many library-specific ways; report the first line
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if isinstance(e, MemoryError) or "allocate memory" in msg:
            raise HwpruneError(
                f"out of memory tracing the model on an input of shape {tuple(example.shape)} ({msg.strip()}); "
                "use a smaller --input-shape or free memory"
            ) from None
        raise HwpruneError(
            f"cannot trace the model's graph on an input of shape {tuple(example.shape)} "
            f"({type(e).__name__}: {msg}); check --input-shape"
        ) from None


def _spatial_inputs(model: nn.Module, example: torch.Tensor) -> dict[str, tuple[int, int]]:
    """Input (H, W) of every conv and linear (1x1) the forward pass runs; a module it skips is absent
    (googlenet's auxiliary classifiers, which run only in training)."""
    seen: dict[str, tuple[int, int]] = {}
    hooks = []

    def hook(name: str) -> Any:
        def fn(mod: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            hw = (1, 1) if isinstance(mod, nn.Linear) else (int(inp[0].shape[-2]), int(inp[0].shape[-1]))
            seen.setdefault(name, hw)

        return fn

    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            hooks.append(m.register_forward_hook(hook(name)))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _is_dw(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


def analyze(model: nn.Module, example: torch.Tensor, dg: Any | None = None) -> GraphInfo:
    """Channel groups and per-layer shapes of ``model`` (in eval mode, untouched)."""
    check_supported(model)
    dg = dg if dg is not None else build_graph(model, example)
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    name_of = {m: n for n, m in model.named_modules()}
    layer_types = (nn.Conv2d, nn.Linear)
    groups: list[ChannelGroup] = []
    for g in dg.get_all_groups(root_module_types=layer_types):
        prods, cons, dws, norms = set(), set(), set(), set()
        index: dict[str, tuple[int, ...]] = {}
        reaches_output, grouped = False, False
        for item in g:
            dep = item.dep
            mod, node = dep.target.module, dep.target
            if not node.outputs and dg.is_out_channel_pruning_fn(dep.handler):
                reaches_output = True  # its output channels are the model's output: keep whole
            if isinstance(mod, nn.BatchNorm2d):
                norms.add(name_of[mod])
            if not isinstance(mod, (*layer_types, nn.BatchNorm2d)):
                continue
            n = name_of[mod]
            index[n] = tuple(int(i) for _, i in sorted(zip(item.root_idxs, item.idxs)))
            if isinstance(mod, nn.BatchNorm2d):
                continue
            if isinstance(mod, nn.Conv2d) and mod.groups > 1 and not _is_dw(mod):
                grouped = True
            if dg.is_out_channel_pruning_fn(dep.handler):
                (dws if _is_dw(mod) else prods).add(n)
            elif dg.is_in_channel_pruning_fn(dep.handler) and not _is_dw(mod):
                cons.add(n)
        if not prods:
            continue
        prod_sorted = tuple(sorted(prods, key=order.__getitem__))
        root = prod_sorted[0]
        rmod = model.get_submodule(root)
        full = int(rmod.out_channels if isinstance(rmod, nn.Conv2d) else rmod.out_features)
        kind = "dw" if dws else "residual" if len(prods) > 1 else "linear" if isinstance(rmod, nn.Linear) else "conv"
        groups.append(
            ChannelGroup(
                name=f"group.{root}",
                kind=kind,
                full=full,
                root=root,
                producers=prod_sorted,
                consumers=tuple(sorted(cons, key=order.__getitem__)),
                depthwise=tuple(sorted(dws, key=order.__getitem__)),
                norms=tuple(sorted(norms, key=order.__getitem__)),
                index=index,
                prunable=not reaches_output and not grouped and full > 1,
            )
        )
    groups.sort(key=lambda c: order[c.root])
    groups = _keep_mixed_inputs_whole(model, groups)
    return GraphInfo(groups=tuple(groups), layers=tuple(_layers(model, example, groups, order)))


def _keep_mixed_inputs_whole(model: nn.Module, groups: list[ChannelGroup]) -> list[ChannelGroup]:
    """Keep whole every group that feeds a layer only in part (a concatenation: densenet's dense layers
    read the stem's and every earlier layer's output at once).

    Such a layer's input width depends on several units at once, and the latency table keeps one input
    unit per layer; pruning the group would make every table lookup for that layer wrong (the bug this
    fixes: densenet121's profile found no ORT node of the predicted shape). What stays prunable there is
    each dense layer's bottleneck, which is where DenseNet's compute is.
    """
    readers: dict[str, list[ChannelGroup]] = {}
    for g in groups:
        if g.prunable:
            for c in g.consumers:
                readers.setdefault(c, []).append(g)
    mixed: set[str] = set()
    for name, gs in readers.items():
        m = model.get_submodule(name)
        width = int(m.in_channels if isinstance(m, nn.Conv2d) else m.in_features)
        per = 1 if isinstance(m, nn.Conv2d) else max(1, width // gs[0].full)  # a linear may read it flattened
        if len(gs) > 1 or width != gs[0].full * per:
            mixed.update(g.name for g in gs)
    return [replace(g, prunable=False) if g.name in mixed else g for g in groups]


def _layers(
    model: nn.Module, example: torch.Tensor, groups: list[ChannelGroup], order: dict[str, int]
) -> list[LayerInfo]:
    unit = {g.name: g for g in groups if g.prunable}
    writes: dict[str, str] = {}
    reads: dict[str, str] = {}
    for g in unit.values():
        for p in g.producers + g.depthwise:
            writes[p] = g.name
        for c in g.consumers + g.depthwise:
            reads[c] = g.name
    hw = _spatial_inputs(model, example)
    out: list[LayerInfo] = []
    for name, m in model.named_modules():
        if name not in hw:
            continue  # never runs at inference: no time, nothing to profile
        if isinstance(m, nn.Conv2d):
            out.append(
                LayerInfo(
                    name=name,
                    kind="dw" if _is_dw(m) else "conv",
                    c_in=m.in_channels,
                    c_out=m.out_channels,
                    kernel=_pair(m.kernel_size),
                    stride=_pair(m.stride),
                    padding=_pair(m.padding),
                    in_hw=hw[name],
                    in_group=reads.get(name),
                    out_group=writes.get(name),
                    groups=int(m.groups),
                )
            )
        elif isinstance(m, nn.Linear):
            g_in = reads.get(name)
            mult = m.in_features // unit[g_in].full if g_in else 1
            out.append(
                LayerInfo(
                    name=name,
                    kind="linear",
                    c_in=m.in_features,
                    c_out=m.out_features,
                    kernel=(1, 1),
                    stride=(1, 1),
                    padding=(0, 0),
                    in_hw=(1, 1),
                    in_group=g_in,
                    out_group=writes.get(name),
                    in_mult=max(1, mult),
                )
            )
    return out


def _pair(v: Any) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))
