"""A BERT-family encoder whose every layer may have its own head count and FFN width.

Written for physical pruning and clean ONNX export: explicit ``head_dim`` (never re-derived as
``hidden // heads``), eager attention (MatMul/Softmax, which every runtime supports), and a
sublayer with zero heads or zero neurons kept as the exact function it computes when fully pruned:
``LayerNorm(x + bias)``. State-dict names follow Hugging Face BERT so real checkpoints load as-is.

Tensor conventions: hidden states (batch, seq, hidden); Linear weights (out_features, in_features).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hwprune.errors import HwpruneError

__all__ = ["SUPPORTED_TYPES", "EncoderConfig", "Encoder", "Attention", "FeedForward", "EncoderLayer", "from_hf_config"]

SUPPORTED_TYPES = ("bert", "roberta", "xlm-roberta", "camembert", "electra")


@dataclass(frozen=True)
class EncoderConfig:
    """Dense shape plus per-layer kept sizes (``heads[i]``, ``ffn[i]``; empty tuples mean dense)."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    head_dim: int
    intermediate_size: int
    max_position: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    position_offset: int = 0  # RoBERTa counts positions from pad_token_id + 1
    model_type: str = "bert"
    heads: tuple[int, ...] = field(default_factory=tuple)
    ffn: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if not self.heads:
            object.__setattr__(self, "heads", (self.num_heads,) * self.num_layers)
        if not self.ffn:
            object.__setattr__(self, "ffn", (self.intermediate_size,) * self.num_layers)
        object.__setattr__(self, "heads", tuple(int(h) for h in self.heads))
        object.__setattr__(self, "ffn", tuple(int(f) for f in self.ffn))
        if len(self.heads) != self.num_layers or len(self.ffn) != self.num_layers:
            raise ValueError("heads and ffn need one entry per layer")
        for h, f in zip(self.heads, self.ffn):
            if not 0 <= h <= self.num_heads or not 0 <= f <= self.intermediate_size:
                raise ValueError(f"kept sizes out of range: heads={self.heads} ffn={self.ffn}")

    def dense(self) -> "EncoderConfig":
        return replace(self, heads=(), ffn=())

    def with_sizes(self, heads: tuple[int, ...], ffn: tuple[int, ...]) -> "EncoderConfig":
        return replace(self, heads=tuple(heads), ffn=tuple(ffn))

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["heads"], d["ffn"] = list(self.heads), list(self.ffn)
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "EncoderConfig":
        d = dict(d)
        d["heads"], d["ffn"] = tuple(d.get("heads", ())), tuple(d.get("ffn", ()))
        return cls(**d)

    def shape_key(self) -> str:
        """The dense shape a latency table depends on (kept sizes excluded)."""
        return (
            f"{self.model_type}-d{self.hidden_size}-h{self.num_heads}x{self.head_dim}"
            f"-f{self.intermediate_size}-L{self.num_layers}"
        )


def from_hf_config(cfg: Mapping[str, Any], *, where: str = "config.json") -> EncoderConfig:
    """Map a Hugging Face ``config.json`` of a BERT-family encoder to :class:`EncoderConfig`."""
    mt = str(cfg.get("model_type", "bert"))
    if mt not in SUPPORTED_TYPES:
        raise HwpruneError(
            f"{where}: model_type {mt!r} is not a BERT-family encoder; supported: {', '.join(SUPPORTED_TYPES)}"
        )
    act = cfg.get("hidden_act", "gelu")
    if act not in ("gelu", "gelu_new", "gelu_python"):
        raise HwpruneError(f"{where}: hidden_act {act!r} is not supported yet; supported: gelu")
    if cfg.get("position_embedding_type", "absolute") != "absolute":
        raise HwpruneError(
            f"{where}: position_embedding_type {cfg['position_embedding_type']!r} is not supported; use absolute"
        )
    try:
        hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        pad = int(cfg.get("pad_token_id", 0) or 0)
        return EncoderConfig(
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            intermediate_size=int(cfg["intermediate_size"]),
            max_position=int(cfg.get("max_position_embeddings", 512)),
            type_vocab_size=int(cfg.get("type_vocab_size", 2)),
            layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-12)),
            pad_token_id=pad,
            position_offset=pad + 1 if mt in ("roberta", "xlm-roberta", "camembert") else 0,
            model_type=mt,
        )
    except KeyError as e:
        raise HwpruneError(f"{where}: missing key {e.args[0]!r}; is this a BERT-family config.json?") from None


class Attention(nn.Module):
    """Self-attention sublayer with ``num_heads`` kept heads of ``head_dim`` each (post-LN residual)."""

    def __init__(self, hidden: int, num_heads: int, head_dim: int, eps: float) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim  # stored; never re-derived
        inner = num_heads * head_dim
        if num_heads > 0:
            self.query = nn.Linear(hidden, inner)
            self.key = nn.Linear(hidden, inner)
            self.value = nn.Linear(hidden, inner)
            self.dense = nn.Linear(inner, hidden)
            self.bias = None
        else:  # fully pruned: output projection of nothing is just its bias
            self.query = self.key = self.value = self.dense = None
            self.bias = nn.Parameter(torch.zeros(hidden))
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)

    def context(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Concatenated head outputs (batch, seq, heads*head_dim): the input of ``dense``."""
        b, s, _ = x.shape
        h, d = self.num_heads, self.head_dim
        q = self.query(x).reshape(b, s, h, d).transpose(1, 2)
        k = self.key(x).reshape(b, s, h, d).permute(0, 2, 3, 1)
        v = self.value(x).reshape(b, s, h, d).transpose(1, 2)
        probs = torch.softmax(torch.matmul(q, k) * (1.0 / math.sqrt(d)) + mask, dim=-1)
        return torch.matmul(probs, v).transpose(1, 2).reshape(b, s, h * d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.num_heads == 0:
            return self.LayerNorm(x + self.bias)
        return self.LayerNorm(self.dense(self.context(x, mask)) + x)


class FeedForward(nn.Module):
    """FFN sublayer with ``width`` kept neurons (post-LN residual)."""

    def __init__(self, hidden: int, width: int, eps: float) -> None:
        super().__init__()
        self.width = width
        if width > 0:
            self.intermediate = nn.Linear(hidden, width)
            self.output = nn.Linear(width, hidden)
            self.bias = None
        else:
            self.intermediate = self.output = None
            self.bias = nn.Parameter(torch.zeros(hidden))
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)

    def act(self, x: torch.Tensor) -> torch.Tensor:
        """Activations (batch, seq, width): the input of ``output``."""
        return nn.functional.gelu(self.intermediate(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.width == 0:
            return self.LayerNorm(x + self.bias)
        return self.LayerNorm(self.output(self.act(x)) + x)


class EncoderLayer(nn.Module):
    def __init__(self, cfg: EncoderConfig, heads: int, ffn: int) -> None:
        super().__init__()
        self.attention = Attention(cfg.hidden_size, heads, cfg.head_dim, cfg.layer_norm_eps)
        self.ffn = FeedForward(cfg.hidden_size, ffn, cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.ffn(self.attention(x, mask))


class Embeddings(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.offset = cfg.position_offset
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        s = input_ids.shape[1]
        pos = torch.arange(s, device=input_ids.device).unsqueeze(0) + self.offset
        x = self.word_embeddings(input_ids) + self.position_embeddings(pos)
        x = x + self.token_type_embeddings.weight[0]  # single-segment inputs
        return self.LayerNorm(x)


class Encoder(nn.Module):
    """``forward(input_ids, attention_mask) -> last_hidden_state`` (batch, seq, hidden)."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.layers = nn.ModuleList(EncoderLayer(cfg, h, f) for h, f in zip(cfg.heads, cfg.ffn))

    @staticmethod
    def extended_mask(attention_mask: torch.Tensor) -> torch.Tensor:
        # (batch, seq) 1/0 -> additive (batch, 1, 1, seq); -1e4 keeps fp16 export safe
        return (1.0 - attention_mask[:, None, None, :].to(torch.float32)) * -10000.0

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(input_ids)
        mask = self.extended_mask(attention_mask)
        for layer in self.layers:
            x = layer(x, mask)
        return x


# ---- Hugging Face checkpoint names <-> ours -------------------------------------------------


def _hf_key(ours: str) -> str:
    """Our state-dict key -> Hugging Face BERT key (without the model prefix)."""
    if ours.startswith("embeddings."):
        return ours
    parts = ours.split(".")  # layers.{i}.{attention|ffn}.{name...}
    i, sub, rest = parts[1], parts[2], ".".join(parts[3:])
    p = f"encoder.layer.{i}."
    table = {
        ("attention", "query"): "attention.self.query",
        ("attention", "key"): "attention.self.key",
        ("attention", "value"): "attention.self.value",
        ("attention", "dense"): "attention.output.dense",
        ("attention", "LayerNorm"): "attention.output.LayerNorm",
        ("attention", "bias"): "attention.output.bias",
        ("ffn", "intermediate"): "intermediate.dense",
        ("ffn", "output"): "output.dense",
        ("ffn", "LayerNorm"): "output.LayerNorm",
        ("ffn", "bias"): "output.bias",
    }
    head, _, tail = rest.partition(".")
    return p + table[(sub, head)] + (f".{tail}" if tail else "")


def load_hf_weights(model: Encoder, state: Mapping[str, torch.Tensor], *, where: str) -> None:
    """Copy a Hugging Face BERT-family state dict (any model prefix) into a dense ``model``."""
    prefixes = ("", "bert.", "roberta.", "electra.", "model.", "encoder.")
    ours = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for k, t in ours.items():
        hk = _hf_key(k)
        src = next((p + hk for p in prefixes if p + hk in state), None)
        if src is None:
            raise HwpruneError(f"{where}: weight {hk!r} not found; is this a BERT-family checkpoint?")
        if tuple(state[src].shape) != tuple(t.shape):
            raise HwpruneError(
                f"{where}: weight {src!r} has shape {tuple(state[src].shape)}, expected {tuple(t.shape)}"
            )
        out[k] = state[src].to(torch.float32)
    model.load_state_dict(out)


def load_hf_folder(path: str | Path) -> tuple[Encoder, EncoderConfig]:
    """Load a local Hugging Face folder (``config.json`` + ``model.safetensors``) into an Encoder."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise HwpruneError(f"{path}: no config.json; --model PATH needs a local Hugging Face model folder")
    try:
        cfg = from_hf_config(json.loads(cfg_path.read_text()), where=str(cfg_path))
    except json.JSONDecodeError as e:
        raise HwpruneError(f"{cfg_path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise HwpruneError(
            f"{path}: no model.safetensors; convert the checkpoint to safetensors (hwprune never unpickles .bin files)"
        )
    model = Encoder(cfg)
    load_hf_weights(model, load_file(str(weights)), where=str(weights))
    return model.eval(), cfg
