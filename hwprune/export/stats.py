"""Parameter and FLOP counts that go into manifests and Pareto sets.

FLOPs here are **2 x multiply-accumulates** of the matrix products only (Linear layers, attention
scores ``Q K^T`` and context ``P V``), for one forward pass at the given batch and sequence length.
Softmax, GELU, LayerNorm, bias adds, embedding lookups and the mask are left out: they are a few
percent of the total for these shapes and every counter disagrees on them, whereas matmul FLOPs agree
with ``torch.utils.flop_counter`` exactly (the tests check that).

Encoders are counted analytically from :class:`~hwprune.models.encoder.EncoderConfig`'s per-layer
kept sizes, so a candidate can be costed without building it; any other ``nn.Module`` gets a
parameter count and ``flops=None``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from hwprune.models.encoder import Encoder, EncoderConfig

__all__ = ["ModelStats", "count_params", "encoder_params", "encoder_macs", "encoder_flops", "model_stats"]


@dataclass(frozen=True)
class ModelStats:
    params: int
    flops: int | None  # 2 x MACs of matmuls, one forward at (batch, seq); None when not countable
    batch: int
    seq: int

    def to_json(self) -> dict[str, int | None]:
        return asdict(self)


def count_params(module: nn.Module) -> int:
    """Number of parameters of any module (shared tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def encoder_params(cfg: EncoderConfig) -> int:
    """Parameters of an :class:`Encoder` with ``cfg``'s per-layer heads and FFN widths."""
    h = cfg.hidden_size
    total = (cfg.vocab_size + cfg.max_position + cfg.type_vocab_size) * h + 2 * h  # embeddings + LN
    for heads, ffn in zip(cfg.heads, cfg.ffn):
        inner = heads * cfg.head_dim
        # Q, K, V: (inner, h) + bias; dense: (h, inner) + bias. A removed sublayer keeps its bias (h).
        total += 3 * (h * inner + inner) + inner * h + h if heads else h
        total += h * ffn + ffn + ffn * h + h if ffn else h
        total += 2 * (2 * h)  # two LayerNorms
    return total


def encoder_macs(cfg: EncoderConfig, *, batch: int, seq: int) -> int:
    """Multiply-accumulates of the matrix products of one forward pass."""
    h, d, tokens = cfg.hidden_size, cfg.head_dim, batch * seq
    total = 0
    for heads, ffn in zip(cfg.heads, cfg.ffn):
        inner = heads * d
        total += 3 * tokens * h * inner          # Q, K, V projections
        total += batch * heads * seq * seq * d   # scores: (seq, d) @ (d, seq) per head
        total += batch * heads * seq * seq * d   # context: (seq, seq) @ (seq, d) per head
        total += tokens * inner * h              # attention output projection
        total += 2 * tokens * h * ffn            # FFN up and down
    return total


def encoder_flops(cfg: EncoderConfig, *, batch: int, seq: int) -> int:
    """FLOPs = 2 x :func:`encoder_macs`."""
    return 2 * encoder_macs(cfg, batch=batch, seq=seq)


def model_stats(model: nn.Module, *, batch: int, seq: int) -> ModelStats:
    """Params and FLOPs of ``model``; analytic for encoders, params only for anything else."""
    if isinstance(model, Encoder):
        cfg = model.config
        return ModelStats(params=encoder_params(cfg), flops=encoder_flops(cfg, batch=batch, seq=seq),
                          batch=batch, seq=seq)
    return ModelStats(params=count_params(model), flops=None, batch=batch, seq=seq)
