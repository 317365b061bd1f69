"""The one-step decode graph (``decoder.onnx``): a :class:`Decoder` with its KV cache as graph inputs/outputs.

Inputs: ``input_ids`` (batch, seq) int64, ``attention_mask`` (batch, past_len + seq) int64, and per layer
``i`` that keeps attention ``past_key_values.{i}.key`` / ``.value`` (batch, kv_groups_i, past_len,
head_dim) float32. Outputs: ``logits`` (batch, seq, vocab), then ``present.{i}.key`` / ``.value``
(batch, kv_groups_i, past_len + seq, head_dim) in the same layer order. A layer whose attention is removed
has no cache entry at all; each layer keeps its own KV-group count (static in the graph), so the cache of
a pruned model is as small as its attention.

``seq`` is dynamic: a decode step feeds one token (seq 1); the prompt is the same graph with an empty
past (past_len 0), so one file serves prefill and decode with identical numerics.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from hwprune.export.onnx_io import to_onnx

from .config import DecoderConfig
from .model import Decoder, KVCache

__all__ = [
    "DecodeStep",
    "cache_layers",
    "decode_io",
    "decode_onnx",
    "decode_feed",
    "reference_outputs",
    "generation_info",
    "DECODER_FILE",
]

DECODER_FILE = "decoder.onnx"


def cache_layers(cfg: DecoderConfig) -> list[int]:
    """Layers that keep attention, hence a KV cache."""
    return [i for i in range(cfg.num_layers) if cfg.kv_groups[i] > 0]


class DecodeStep(nn.Module):
    """``forward(input_ids, attention_mask, *past) -> (logits, *present)`` with the cache flattened
    as ``key_i, value_i`` for each layer of :func:`cache_layers`, in order."""

    def __init__(self, model: Decoder) -> None:
        super().__init__()
        self.model = model
        self.layers = cache_layers(model.config)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *past: torch.Tensor) -> tuple:
        n = self.model.config.num_layers
        cache: KVCache = [None] * n
        for j, i in enumerate(self.layers):
            cache[i] = (past[2 * j], past[2 * j + 1])
        logits, present = self.model(input_ids, attention_mask, past_key_values=cache, use_cache=True)
        flat: list[torch.Tensor] = []
        for i in self.layers:
            kv = present[i]
            assert kv is not None
            flat += [kv[0], kv[1]]
        return (logits, *flat)


def decode_io(cfg: DecoderConfig) -> tuple[list[str], list[str], dict[str, dict[int, str]]]:
    """Input names, output names and dynamic axes of ``decoder.onnx``."""
    ins, outs = ["input_ids", "attention_mask"], ["logits"]
    dyn: dict[str, dict[int, str]] = {
        "input_ids": {0: "batch", 1: "seq"},
        "attention_mask": {0: "batch", 1: "total_len"},
        "logits": {0: "batch", 1: "seq"},
    }
    for i in cache_layers(cfg):
        for part in ("key", "value"):
            ins.append(f"past_key_values.{i}.{part}")
            outs.append(f"present.{i}.{part}")
            dyn[ins[-1]] = {0: "batch", 2: "past_len"}
            dyn[outs[-1]] = {0: "batch", 2: "total_len"}
    return ins, outs, dyn


def decode_feed(
    cfg: DecoderConfig, *, batch: int = 1, past_len: int = 0, seq: int = 1, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Random token ids, an all-ones mask and a random cache of ``past_len`` positions per cache layer."""
    g = torch.Generator().manual_seed(seed)
    v = cfg.vocab_size
    feed = {
        "input_ids": torch.randint(min(100, v // 2), v, (batch, seq), generator=g),
        "attention_mask": torch.ones(batch, past_len + seq, dtype=torch.int64),
    }
    for i in cache_layers(cfg):
        for part in ("key", "value"):
            shape = (batch, cfg.kv_groups[i], past_len, cfg.head_dim)
            feed[f"past_key_values.{i}.{part}"] = torch.randn(shape, generator=g)
    return feed


def decode_onnx(model: Decoder, path: Any = None) -> bytes:
    """Serialized ``decoder.onnx`` of ``model`` (written atomically to ``path`` when given).

    Traced with two new tokens after a three-token past, so no axis is specialised to 0 or 1.
    """
    ins, outs, dyn = decode_io(model.config)
    feed = decode_feed(model.config, batch=1, past_len=3, seq=2)
    return to_onnx(DecodeStep(model).eval(), {k: feed[k] for k in ins}, path, output_names=outs, dynamic_axes=dyn)


def reference_outputs(model: Decoder, feed: dict[str, torch.Tensor]) -> list[np.ndarray]:
    """What torch gives on ``feed``, in ``decoder.onnx``'s output order (for parity)."""
    ins, _, _ = decode_io(model.config)
    with torch.no_grad():
        out = DecodeStep(model.eval())(*[feed[k] for k in ins])
    return [t.numpy() for t in out]


def generation_info(cfg: DecoderConfig) -> dict[str, Any]:
    """What a generic token loop needs to drive ``decoder.onnx`` (recorded in the manifest)."""
    return {
        "max_positions": cfg.max_position,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": list(cfg.eos_token_id),
        "pad_token_id": cfg.pad_token_id,
        "vocab_size": cfg.vocab_size,
        "cache": "present.{i}.key/value of one call feed past_key_values.{i}.key/value of the next; "
        "attention_mask covers past and new tokens; an empty past (past_len 0) is the prompt",
        "cache_layers": cache_layers(cfg),
        "kv_groups": [cfg.kv_groups[i] for i in cache_layers(cfg)],
        "head_dim": cfg.head_dim,
    }
