"""Encoder parameters and FLOPs, counted analytically from :class:`EncoderConfig`'s per-layer sizes,
so a candidate can be costed without building it (convention: :mod:`hwprune.export.stats`)."""

from __future__ import annotations

from hwprune.export.stats import ModelStats
from hwprune.families.encoder.model import EncoderConfig

__all__ = ["encoder_params", "encoder_macs", "encoder_flops", "encoder_stats"]


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
        total += 3 * tokens * h * inner  # Q, K, V projections
        total += batch * heads * seq * seq * d  # scores: (seq, d) @ (d, seq) per head
        total += batch * heads * seq * seq * d  # context: (seq, seq) @ (seq, d) per head
        total += tokens * inner * h  # attention output projection
        total += 2 * tokens * h * ffn  # FFN up and down
    return total


def encoder_flops(cfg: EncoderConfig, *, batch: int, seq: int) -> int:
    """FLOPs = 2 x :func:`encoder_macs`."""
    return 2 * encoder_macs(cfg, batch=batch, seq=seq)


def encoder_stats(cfg: EncoderConfig, *, batch: int, seq: int) -> ModelStats:
    return ModelStats(params=encoder_params(cfg), flops=encoder_flops(cfg, batch=batch, seq=seq), batch=batch, seq=seq)
