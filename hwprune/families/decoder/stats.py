"""Decoder parameters and FLOPs (convention: :mod:`hwprune.export.stats`), analytic from the kept sizes.

FLOPs are 2 x MACs of the matrix products of one prompt-processing forward pass at (batch, seq): the
q/k/v/o projections, attention scores ``Q K^T`` and context ``P V`` (the full seq x seq products, as
the eager graph computes them under the causal mask), the MLP projections and the LM head.
"""

from __future__ import annotations

from hwprune.export.stats import ModelStats, count_params

from .config import DecoderConfig
from .model import Decoder

__all__ = ["decoder_macs", "decoder_stats"]


def decoder_macs(cfg: DecoderConfig, *, batch: int, seq: int) -> int:
    h, d, tokens = cfg.hidden_size, cfg.head_dim, batch * seq
    total = tokens * h * cfg.vocab_size  # LM head
    for i in range(cfg.num_layers):
        g, p, f = cfg.layer_shape(i)
        heads = g * p
        total += tokens * h * heads * d + 2 * tokens * h * g * d  # q, k, v
        total += 2 * batch * heads * seq * seq * d  # scores and context
        total += tokens * heads * d * h  # o_proj
        total += (3 if cfg.gated_mlp else 2) * tokens * h * f
    return total


def decoder_stats(model: Decoder, *, batch: int, seq: int) -> ModelStats:
    return ModelStats(
        params=count_params(model), flops=2 * decoder_macs(model.config, batch=batch, seq=seq), batch=batch, seq=seq
    )
