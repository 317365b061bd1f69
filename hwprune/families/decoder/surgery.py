"""Physical pruning of a :class:`Decoder`: slice whole KV groups, query-head slots, FFN neurons and blocks.

Unit names (indices count the units of the model being pruned, i.e. the dense numbering for a dense model):

* ``layer.{i}.attn``  -> kept KV groups, in ``[0, kv_groups[i])``; a group is its K/V head plus the
  query heads that read it (query head ``j * per_group + s`` reads KV head ``j``, transformers' layout);
* ``layer.{i}.qpg``   -> kept query-head slots within every kept group, in ``[0, heads_per_group[i])``;
* ``layer.{i}.ffn``   -> kept FFN neurons, in ``[0, ffn[i])``;
* ``layer.{i}.block`` -> ``[]`` removes the whole block (same as ``attn=[]`` and ``ffn=[]``).

Units not named are kept whole. An empty ``attn`` or ``qpg`` removes the attention sublayer, an empty
``ffn`` the FFN; what is left is the function they compute with every unit gone (see ``model``).
"""

from __future__ import annotations

import re
from collections.abc import Container, Iterable, Mapping

import torch

from hwprune.errors import HwpruneError

from .config import DecoderConfig
from .model import Block, Decoder, assemble, materialize

__all__ = ["prune_decoder", "prune_block", "skeleton", "decoder_units", "UNIT_KINDS"]

UNIT_KINDS = ("attn", "qpg", "ffn", "block")
_UNIT = re.compile(r"layer\.(\d+)\.(attn|qpg|ffn|block)")


def decoder_units(cfg: DecoderConfig) -> dict[str, int]:
    """Every prunable unit name of ``cfg`` -> how many units it has now (layers with a removed part excluded)."""
    units: dict[str, int] = {}
    for i in range(cfg.num_layers):
        g, p, f = cfg.layer_shape(i)
        if g:
            units[f"layer.{i}.attn"], units[f"layer.{i}.qpg"] = g, p
        if f:
            units[f"layer.{i}.ffn"] = f
    return units


def skeleton(cfg: DecoderConfig, device: str | torch.device = "cpu") -> Decoder:
    """An uninitialised Decoder of ``cfg``'s (pruned) shapes, to ``load_state_dict`` a saved pruned model into."""
    return materialize(cfg, device)


def _indices(name: str, idx: Iterable[int], n: int) -> torch.Tensor:
    kept = sorted(int(i) for i in idx)
    if len(set(kept)) != len(kept):
        raise HwpruneError(f"{name}: duplicate indices in {kept}")
    if kept and not (kept[0] >= 0 and kept[-1] < n):
        raise HwpruneError(f"{name}: indices must lie in [0, {n}), got {kept}")
    return torch.tensor(kept, dtype=torch.long)


def _parse(cfg: DecoderConfig, kept: Mapping[str, Iterable[int]]) -> dict[tuple[int, str], torch.Tensor]:
    out: dict[tuple[int, str], torch.Tensor] = {}
    for name, idx in kept.items():
        m = _UNIT.fullmatch(name)
        if m is None or int(m.group(1)) >= cfg.num_layers:
            raise HwpruneError(
                f"unknown unit {name!r}; expected layer.{{0..{cfg.num_layers - 1}}}.{{{','.join(UNIT_KINDS)}}}"
            )
        i, kind = int(m.group(1)), m.group(2)
        g, p, f = cfg.layer_shape(i)
        idx = list(idx)
        if kind == "block":
            if idx:
                raise HwpruneError(f"{name}: a block is removed with [] (keep it by leaving it out), got {idx}")
            out[(i, "attn")] = out[(i, "ffn")] = torch.zeros(0, dtype=torch.long)
            continue
        n = {"attn": g, "qpg": p, "ffn": f}[kind]
        if n == 0 and idx:
            raise HwpruneError(f"{name}: layer {i} has no {kind} units left to keep")
        out.setdefault((i, kind), _indices(name, idx, n))
    return out


def _head_rows(groups: torch.Tensor, slots: torch.Tensor, per_group: int, d: int) -> torch.Tensor:
    """Rows of q_proj (columns of o_proj) of query heads ``g * per_group + s`` for g in groups, s in slots."""
    heads = (groups[:, None] * per_group + slots[None, :]).reshape(-1)
    return (heads[:, None] * d + torch.arange(d)[None, :]).reshape(-1)


def _group_rows(groups: torch.Tensor, d: int) -> torch.Tensor:
    return (groups[:, None] * d + torch.arange(d)[None, :]).reshape(-1)


def _layer_tensors(
    src: Mapping[str, torch.Tensor],
    cfg: DecoderConfig,
    i: int,
    sel: Mapping[tuple[int, str], torch.Tensor],
    overridden: Container[str] = (),
) -> tuple[dict[str, torch.Tensor], tuple[int, int, int]]:
    """Layer ``i``'s tensors of the pruned model (full state-dict names) and its (groups, per_group, ffn).

    Sliced tensors are fresh copies; the others (norms, biases) are ``src``'s own. An output projection
    named in ``overridden`` is not sliced (its override replaces it): ``src``'s own tensor holds the place.
    """
    d = cfg.head_dim
    g, p, f = cfg.layer_shape(i)
    pre = f"layers.{i}."
    state: dict[str, torch.Tensor] = {}
    groups = sel.get((i, "attn"), torch.arange(g))
    slots = sel.get((i, "qpg"), torch.arange(p))
    neurons = sel.get((i, "ffn"), torch.arange(f))
    ng, npg, nf = (len(groups), len(slots), len(neurons)) if len(groups) and len(slots) else (0, 0, len(neurons))
    if ng:
        q, kv = _head_rows(groups, slots, p, d), _group_rows(groups, d)
        for n, rows in (("q", q), ("k", kv), ("v", kv)):
            for kind in ("weight", "bias"):
                if f"{pre}attn.{n}_proj.{kind}" in src:
                    state[f"{pre}attn.{n}_proj.{kind}"] = src[f"{pre}attn.{n}_proj.{kind}"][rows]
        o = f"{pre}attn.o_proj.weight"
        state[o] = src[o] if o in overridden else src[o][:, q]
        for k in (f"{pre}attn.o_proj.bias", f"{pre}attn_norm.weight", f"{pre}attn_norm.bias"):
            if k in src:
                state[k] = src[k]
    elif cfg.o_proj_bias:  # all heads gone: the output projection leaves its bias
        bias = f"{pre}attn.o_proj.bias"
        state[f"{pre}attn.out_bias"] = src[bias] if bias in src else src[f"{pre}attn.out_bias"]
    if nf:
        for n in ("gate", "up"):
            for kind in ("weight", "bias"):
                if f"{pre}mlp.{n}_proj.{kind}" in src:
                    state[f"{pre}mlp.{n}_proj.{kind}"] = src[f"{pre}mlp.{n}_proj.{kind}"][neurons]
        down = f"{pre}mlp.down_proj.weight"
        state[down] = src[down] if down in overridden else src[down][:, neurons]
        for k in (f"{pre}mlp.down_proj.bias", f"{pre}mlp_norm.weight", f"{pre}mlp_norm.bias"):
            if k in src:
                state[k] = src[k]
    elif cfg.mlp_bias:
        bias = f"{pre}mlp.down_proj.bias"
        state[f"{pre}mlp.out_bias"] = src[bias] if bias in src else src[f"{pre}mlp.out_bias"]
    return state, (ng, npg, nf)


def _apply_overrides(state: dict[str, torch.Tensor], overrides: Mapping[str, torch.Tensor]) -> None:
    for name, t in overrides.items():
        if name not in state:
            raise HwpruneError(f"override {name!r} is not a tensor of the pruned model")
        state[name] = t


def _check_shapes(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> None:
    for k, t in expected.items():
        if k not in state:
            raise HwpruneError(f"pruned model lacks {k!r}")  # a bug in this module, not in the input
        if tuple(state[k].shape) != tuple(t.shape):
            raise HwpruneError(f"{k}: got shape {tuple(state[k].shape)}, the pruned model needs {tuple(t.shape)}")


def prune_block(
    model: Decoder, i: int, kept: Mapping[str, Iterable[int]], overrides: Mapping[str, torch.Tensor] | None = None
) -> Block:
    """Block ``i`` of ``prune_decoder(model, kept, overrides)``, alone: one block's memory instead of a model's.

    Read-only use (scoring): tensors the block keeps whole (norms, biases) are shared with ``model``.
    ``overrides`` may name tensors of any layer; only layer ``i``'s are used.
    """
    cfg = model.config
    sel = _parse(cfg, kept)
    pre = f"layers.{i}."
    src = {k: v for k, v in model.state_dict().items() if k.startswith(pre)}
    mine = {k: v for k, v in (overrides or {}).items() if k.startswith(pre)}
    state, (g, p, f) = _layer_tensors(src, cfg, i, sel, mine)  # a reconstructed projection is not sliced first
    _apply_overrides(state, mine)
    with torch.device("meta"):
        block = Block(cfg, g, p, f)
    local = {k[len(pre) :]: v for k, v in state.items()}
    _check_shapes(local, block.state_dict())
    block.load_state_dict(local, assign=True)
    return block.eval()


def prune_decoder(
    model: Decoder, kept: Mapping[str, Iterable[int]], overrides: Mapping[str, torch.Tensor] | None = None
) -> Decoder:
    """A new Decoder keeping only the named units of ``model`` (each kept weight copied once, no sharing).

    ``overrides`` maps state-dict names of the result to tensors that replace the sliced ones
    (e.g. reconstructed ``layers.3.mlp.down_proj.weight``); shapes must match.
    """
    cfg = model.config
    sel = _parse(cfg, kept)
    src = model.state_dict()
    state: dict[str, torch.Tensor] = {k: v for k, v in src.items() if not k.startswith("layers.")}
    sizes: list[tuple[int, int, int]] = []
    for i in range(cfg.num_layers):
        layer, shape = _layer_tensors(src, cfg, i, sel, overrides or {})
        state.update(layer)
        sizes.append(shape)
    new_cfg = cfg.with_sizes(*(tuple(s[j] for s in sizes) for j in range(3)))
    _apply_overrides(state, overrides or {})
    expected = materialize(new_cfg, "meta").state_dict()
    _check_shapes(state, expected)
    # sliced tensors are fresh copies; clone the rest so the two models never share storage
    fresh = {k for k in expected if state[k] is not src.get(k) and k not in (overrides or {})}
    out = assemble(new_cfg, {k: state[k] if k in fresh else state[k].clone() for k in expected})
    return out.train(model.training)
