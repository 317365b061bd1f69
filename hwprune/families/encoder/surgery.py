"""Physical surgery on :class:`~hwprune.families.encoder.model.Encoder`: slice, rebuild, check shapes."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from hwprune.families.encoder.model import Encoder, EncoderConfig
from hwprune.surgery.plan import Plan

__all__ = ["prune_encoder", "skeleton", "kept_columns"]


def skeleton(cfg: EncoderConfig) -> Encoder:
    with torch.device("meta"):
        m = Encoder(cfg)
    return m.to_empty(device="cpu").eval()


def kept_columns(heads: tuple[int, ...], head_dim: int) -> torch.Tensor:
    """Head indices -> column indices of the concatenated context (heads * head_dim)."""
    if not heads:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads])


def prune_encoder(model: Encoder, plan: Plan, overrides: Mapping[str, torch.Tensor] | None = None) -> Encoder:
    """A new, physically smaller Encoder keeping ``plan``'s heads and neurons of ``model``.

    ``overrides`` replaces tensors of the result by name (e.g. reconstructed output projections);
    a sublayer pruned to zero keeps the bias its output projection would have added, so the
    result computes exactly what masking those heads/neurons would.
    """
    src = model.config
    cfg = src.with_sizes(
        tuple(len(plan.units.get(f"layer.{i}.heads", range(src.heads[i]))) for i in range(src.num_layers)),
        tuple(len(plan.units.get(f"layer.{i}.ffn", range(src.ffn[i]))) for i in range(src.num_layers)),
    )
    if src.heads != (src.num_heads,) * src.num_layers or src.ffn != (src.intermediate_size,) * src.num_layers:
        raise ValueError("prune_encoder expects a dense model; plans index the dense model")
    sd = model.state_dict()
    new: dict[str, torch.Tensor] = {}
    for k, t in sd.items():
        if not k.startswith("layers."):
            new[k] = t.clone()
    for i in range(src.num_layers):
        p = f"layers.{i}."
        h = tuple(plan.units.get(f"layer.{i}.heads", range(src.num_heads)))
        cols = kept_columns(h, src.head_dim)
        a = p + "attention."
        if h:
            for n in ("query", "key", "value"):
                new[a + n + ".weight"] = sd[a + n + ".weight"][cols].clone()
                new[a + n + ".bias"] = sd[a + n + ".bias"][cols].clone()
            new[a + "dense.weight"] = sd[a + "dense.weight"][:, cols].clone()
            new[a + "dense.bias"] = sd[a + "dense.bias"].clone()
        else:
            new[a + "bias"] = sd[a + "dense.bias"].clone()
        for n in ("weight", "bias"):
            new[a + "LayerNorm." + n] = sd[a + "LayerNorm." + n].clone()
        n_idx = torch.tensor(plan.units.get(f"layer.{i}.ffn", range(src.intermediate_size)), dtype=torch.long)
        f = p + "ffn."
        if len(n_idx):
            new[f + "intermediate.weight"] = sd[f + "intermediate.weight"][n_idx].clone()
            new[f + "intermediate.bias"] = sd[f + "intermediate.bias"][n_idx].clone()
            new[f + "output.weight"] = sd[f + "output.weight"][:, n_idx].clone()
            new[f + "output.bias"] = sd[f + "output.bias"].clone()
        else:
            new[f + "bias"] = sd[f + "output.bias"].clone()
        for n in ("weight", "bias"):
            new[f + "LayerNorm." + n] = sd[f + "LayerNorm." + n].clone()
    for k, t in (overrides or {}).items():
        if k not in new:
            raise KeyError(f"override {k!r} is not a tensor of the pruned model")
        if tuple(t.shape) != tuple(new[k].shape):
            raise ValueError(f"override {k!r} has shape {tuple(t.shape)}, pruned model needs {tuple(new[k].shape)}")
        new[k] = t.detach().to(torch.float32).clone()
    out = skeleton(cfg)
    out.load_state_dict(new, strict=True)
    # check every stored shape attribute agrees with the tensors (gpt-fast habit)
    for layer, hh, ff in zip(out.layers, cfg.heads, cfg.ffn):
        assert layer.attention.num_heads == hh and layer.ffn.width == ff
        if hh:
            assert layer.attention.query.out_features == hh * cfg.head_dim == layer.attention.dense.in_features
        if ff:
            assert layer.ffn.intermediate.out_features == ff == layer.ffn.output.in_features
    return out.eval()
