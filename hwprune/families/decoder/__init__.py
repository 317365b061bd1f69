"""Decoder-only LLMs (LLaMA, Mistral, Qwen2, GPT-2) whose every layer may keep its own width.

``config``: :class:`DecoderConfig`, dense shape plus per-layer kept sizes; ``model``: the torch module;
``hf``: Hugging Face ``config.json``/safetensors in and out; ``gguf_io``: llama.cpp GGUF files;
``surgery``: physical pruning by unit names (``layer.{i}.attn|qpg|ffn|block``).
"""
