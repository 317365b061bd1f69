"""A decoder-only LLM whose every layer may keep its own number of KV groups, query heads and FFN neurons.

Written for physical pruning and clean ONNX export: explicit ``head_dim``, eager attention (MatMul and
Softmax only), GQA by repeating each kept KV head for its ``heads_per_group`` query heads, and a removed
sublayer kept as the exact function it computes with all its units gone: the identity (residual only,
no norm) when the output projection has no bias, ``x + bias`` when it has one (GPT-2).

Tensor conventions: hidden states (batch, seq, hidden); Linear weights (out_features, in_features);
per-layer KV cache ``(k, v)`` each (batch, kv_groups, total_len, head_dim), ``None`` for a layer whose
attention is removed. Position of token ``j`` of the input is ``past_len + j`` with
``past_len = attention_mask.shape[1] - input_ids.shape[1]`` (what transformers does when it is given
no ``position_ids``). Left padding therefore shifts positions; for RoPE models that changes nothing
for the real tokens (scores depend on relative positions only, pads are masked), for GPT-2 it does.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from .config import DecoderConfig, named_config

__all__ = [
    "Decoder",
    "Block",
    "Attention",
    "MLP",
    "RMSNorm",
    "KVCache",
    "Prepared",
    "rope_inv_freq",
    "init_weights",
    "materialize",
    "assemble",
    "random_decoder",
]

KVCache = list["tuple[torch.Tensor, torch.Tensor] | None"]
# (embeddings (batch, seq, hidden), additive mask (batch, 1, seq, total), RoPE (cos, sin) (seq, head_dim) or None)
Prepared = tuple[torch.Tensor, torch.Tensor, "tuple[torch.Tensor, torch.Tensor] | None"]


class RMSNorm(nn.Module):
    """``x / rms(x) * weight`` computed in float32, as in LLaMA."""

    def __init__(self, hidden: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden))  # (hidden,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def _norm(cfg: DecoderConfig) -> nn.Module:
    return (
        nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        if cfg.arch == "gpt2"
        else RMSNorm(cfg.hidden_size, cfg.norm_eps)
    )


def rope_inv_freq(cfg: DecoderConfig) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,) float32, with linear or llama3 scaling applied."""
    d = cfg.head_dim  # computed on the CPU even inside a meta-device context (meta pow/arange are slow to set up)
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device="cpu").to(torch.float32) / d))
    if cfg.rope_type == "linear":
        return inv / cfg.rope_factor
    if cfg.rope_type == "llama3":
        # wavelengths longer than the original context are slowed by `factor`, shorter than
        # original/high_freq_factor kept, and the band between interpolated linearly in 1/wavelength
        wavelen = 2 * math.pi / inv
        old, lo, hi = cfg.rope_original_max_position, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        scaled = torch.where(wavelen > old / lo, inv / cfg.rope_factor, inv)
        t = (old / wavelen - lo) / (hi - lo)
        blended = (1 - t) * scaled / cfg.rope_factor + t * scaled
        middle = (wavelen >= old / hi) & (wavelen <= old / lo)
        return torch.where(middle, blended, scaled)
    return inv


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(-x2, x1) for x = (x1, x2) split in halves along the last dim (transformers' convention)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    """Self-attention keeping ``groups`` KV heads with ``per_group`` query heads each."""

    def __init__(self, cfg: DecoderConfig, groups: int, per_group: int) -> None:
        super().__init__()
        self.groups, self.per_group, self.head_dim = groups, per_group, cfg.head_dim
        self.scaling = cfg.head_dim**-0.5
        h, d = cfg.hidden_size, cfg.head_dim
        if groups > 0:
            self.q_proj = nn.Linear(h, groups * per_group * d, bias=cfg.attention_bias)  # query head j*per_group+s
            self.k_proj = nn.Linear(h, groups * d, bias=cfg.attention_bias)
            self.v_proj = nn.Linear(h, groups * d, bias=cfg.attention_bias)
            self.o_proj = nn.Linear(groups * per_group * d, h, bias=cfg.o_proj_bias)
        # removed: o_proj of nothing is its bias alone (x + out_bias), or nothing at all
        self.out_bias = nn.Parameter(torch.zeros(h)) if groups == 0 and cfg.o_proj_bias else None

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        past: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """x (batch, seq, hidden), mask (batch, 1, seq, total) additive -> output and this layer's new cache."""
        b, s, _ = x.shape
        g, p, d = self.groups, self.per_group, self.head_dim
        q = self.q_proj(x).view(b, s, g * p, d).transpose(1, 2)
        k = self.k_proj(x).view(b, s, g, d).transpose(1, 2)
        v = self.v_proj(x).view(b, s, g, d).transpose(1, 2)
        if rope is not None:
            cos, sin = rope  # (seq, head_dim)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
        if past is not None:
            k, v = torch.cat((past[0], k), dim=2), torch.cat((past[1], v), dim=2)
        present = (k, v)
        if p > 1:  # (b, g, t, d) -> (b, g*p, t, d): query head j*p+s reads KV head j
            k = k.unsqueeze(2).expand(-1, -1, p, -1, -1).flatten(1, 2)
            v = v.unsqueeze(2).expand(-1, -1, p, -1, -1).flatten(1, 2)
        scores = torch.matmul(q, k.transpose(2, 3)) * self.scaling + mask
        probs = torch.softmax(scores.to(torch.float32), dim=-1).to(q.dtype)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(b, s, g * p * d)
        return self.o_proj(out), present


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's ``gelu_new`` (tanh approximation), written out so every ONNX opset has it."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class MLP(nn.Module):
    """SwiGLU ``down(silu(gate(x)) * up(x))`` or GPT-2's ``down(gelu(up(x)))`` with ``width`` neurons."""

    def __init__(self, cfg: DecoderConfig, width: int) -> None:
        super().__init__()
        self.width, self.gated, self.act_name = width, cfg.gated_mlp, cfg.hidden_act
        h, bias = cfg.hidden_size, cfg.mlp_bias
        if width > 0:
            if self.gated:
                self.gate_proj = nn.Linear(h, width, bias=bias)
            self.up_proj = nn.Linear(h, width, bias=bias)
            self.down_proj = nn.Linear(width, h, bias=bias)
        self.out_bias = nn.Parameter(torch.zeros(h)) if width == 0 and bias else None

    def act(self, x: torch.Tensor) -> torch.Tensor:
        """Activations (batch, seq, width): the input of ``down_proj``."""
        if self.gated:
            return nn.functional.silu(self.gate_proj(x)) * self.up_proj(x)
        u = self.up_proj(x)
        return nn.functional.gelu(u) if self.act_name == "gelu" else _gelu_tanh(u)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(x))


class Block(nn.Module):
    """Pre-norm residual block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``; a removed sublayer has no norm."""

    def __init__(self, cfg: DecoderConfig, groups: int, per_group: int, ffn: int) -> None:
        super().__init__()
        self.attn_norm = _norm(cfg) if groups > 0 else None
        self.attn = Attention(cfg, groups, per_group)
        self.mlp_norm = _norm(cfg) if ffn > 0 else None
        self.mlp = MLP(cfg, ffn)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        past: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        present = None
        if self.attn_norm is not None:
            a, present = self.attn(self.attn_norm(x), mask, rope, past)
            x = x + a
        elif self.attn.out_bias is not None:
            x = x + self.attn.out_bias
        if self.mlp_norm is not None:
            x = x + self.mlp(self.mlp_norm(x))
        elif self.mlp.out_bias is not None:
            x = x + self.mlp.out_bias
        return x, present


def _embedding(n: int, dim: int) -> nn.Embedding:
    return nn.Embedding(n, dim, _weight=torch.zeros(n, dim))


class Decoder(nn.Module):
    """``forward(input_ids, attention_mask) -> logits`` (batch, seq, vocab); with ``use_cache`` also the cache."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.config = cfg
        # embeddings start at zero: nn.Embedding's own N(0, 1) init is slow to set up on the meta device
        self.embed_tokens = _embedding(cfg.vocab_size, cfg.hidden_size)  # weight: (vocab, hidden)
        self.embed_positions = _embedding(cfg.max_position, cfg.hidden_size) if not cfg.uses_rope else None
        self.layers = nn.ModuleList(Block(cfg, *cfg.layer_shape(i)) for i in range(cfg.num_layers))
        self.norm = _norm(cfg)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(cfg) if cfg.uses_rope else None, persistent=False)

    def reset_buffers(self) -> None:
        """Recompute the non-persistent RoPE frequencies (a model built on ``meta`` has none to copy)."""
        if self.config.uses_rope:
            self.inv_freq = rope_inv_freq(self.config).to(self.embed_tokens.weight.device)

    def causal_mask(self, attention_mask: torch.Tensor, q_len: int, dtype: torch.dtype) -> torch.Tensor:
        """(batch, total) 1/0 -> additive (batch, 1, q_len, total): 0 where allowed, dtype's min elsewhere."""
        total = attention_mask.shape[1]
        k_pos = torch.arange(total, device=attention_mask.device)
        q_pos = torch.arange(q_len, device=attention_mask.device) + (total - q_len)
        allowed = k_pos[None, :] <= q_pos[:, None]
        if self.config.sliding_window is not None:
            allowed = allowed & (q_pos[:, None] - k_pos[None, :] < self.config.sliding_window)
        allowed = allowed[None, None, :, :] & attention_mask[:, None, None, :].to(torch.bool)
        return (~allowed).to(dtype) * torch.finfo(dtype).min

    def prepare(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Prepared:
        """What every block of a forward pass reads: (embeddings, additive causal mask, RoPE cos/sin or None).

        ``attention_mask`` (batch, past_len + seq) covers the cached tokens too; ``input_ids`` (batch, seq).
        """
        s = input_ids.shape[1]
        past_len = attention_mask.shape[1] - s
        x = self.embed_tokens(input_ids)
        positions = torch.arange(s, device=input_ids.device) + past_len
        rope = None
        if self.embed_positions is not None:
            x = x + self.embed_positions(positions)[None]
        else:
            freqs = positions[:, None].to(torch.float32) * self.inv_freq[None, :]  # (seq, head_dim/2)
            emb = torch.cat((freqs, freqs), dim=-1)
            rope = (emb.cos().to(x.dtype), emb.sin().to(x.dtype))
        return x, self.causal_mask(attention_mask, s, x.dtype), rope

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head: residual stream (..., hidden) -> logits (..., vocab)."""
        x = self.norm(x)
        return self.lm_head(x) if self.lm_head is not None else nn.functional.linear(x, self.embed_tokens.weight)

    def blocks(self) -> Iterator[Block]:
        """The blocks in order (a pruned view builds each on demand; see ``stream``)."""
        for layer in self.layers:
            assert isinstance(layer, Block)
            yield layer

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, KVCache]:
        """input_ids (batch, seq) int64; attention_mask (batch, past_len + seq) 1 = token, 0 = pad."""
        if past_key_values is not None and len(past_key_values) != len(self.layers):
            raise ValueError(f"past_key_values has {len(past_key_values)} entries for {len(self.layers)} layers")
        x, mask, rope = self.prepare(input_ids, attention_mask)
        cache: KVCache = []
        for i, layer in enumerate(self.layers):
            x, present = layer(x, mask, rope, past_key_values[i] if past_key_values is not None else None)
            cache.append(present)
        logits = self.head(x)
        if isinstance(use_cache, torch.Tensor):  # the TorchScript ONNX exporter passes omitted defaults as tensors
            return logits
        return (logits, cache) if use_cache else logits


def init_weights(model: Decoder, seed: int = 0, std: float = 0.02) -> Decoder:
    """Norm weights 1, biases 0, every other tensor N(0, std^2), drawn in a fixed order from ``seed``."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for name, t in model.named_parameters():
            if name.endswith("bias"):
                t.zero_()
            elif "norm" in name.split(".")[-2]:  # norm.weight, layers.i.attn_norm.weight, ...
                t.fill_(1.0)
            else:
                t.normal_(0.0, std, generator=gen)
    return model


def materialize(cfg: DecoderConfig, device: str | torch.device = "cpu") -> Decoder:
    """A Decoder of ``cfg``'s shapes with uninitialised storage: built on ``meta`` and allocated once.

    Allocates with ``torch.empty`` rather than ``Module.to_empty`` (whose meta ``empty_like`` imports sympy).
    """
    with torch.device("meta"):
        model = Decoder(cfg)
    if torch.device(device).type != "meta":
        for mod in model.modules():
            for name, p in list(mod.named_parameters(recurse=False)):
                setattr(mod, name, nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=device), p.requires_grad))
    model.reset_buffers()
    return model.eval()


def assemble(cfg: DecoderConfig, state: Mapping[str, torch.Tensor]) -> Decoder:
    """A Decoder whose parameters *are* ``state``'s tensors (built on ``meta``, then assigned: no copy).

    ``state`` must hold exactly the model's state-dict keys with matching shapes.
    """
    with torch.device("meta"):
        model = Decoder(cfg)
    model.load_state_dict(dict(state), assign=True)
    model.reset_buffers()
    return model.eval()


def random_decoder(cfg: DecoderConfig | str, seed: int = 0) -> Decoder:
    """Seeded random weights for any shape or named config (e.g. ``"llama-3.2-1b"``); nothing is downloaded."""
    if isinstance(cfg, str):
        cfg = named_config(cfg)
    return init_weights(materialize(cfg), seed)
