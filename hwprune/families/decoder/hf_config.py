"""Hugging Face ``config.json`` <-> :class:`DecoderConfig`, and whether a pruned shape is HF-loadable.

Reads both the transformers 4.x spelling of RoPE (``rope_theta`` + ``rope_scaling``) and the 5.x one
(``rope_parameters``); writes the 4.x spelling, which 5.x converts on load. Supported RoPE types:
default, linear and llama3 (implemented in :func:`model.rope_inv_freq`); anything else is refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hwprune.errors import HwpruneError

from .config import ARCHS, ROPE_TYPES, DecoderConfig

__all__ = ["from_hf_config", "hf_config", "hf_unloadable_reason"]

_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
}
_GPT2_ACTS = {"gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new", "gelu": "gelu"}


def _rope(cfg: Mapping[str, Any], where: str) -> dict[str, Any]:
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    if params and all(isinstance(v, Mapping) for v in params.values()):
        raise HwpruneError(f"{where}: per-layer-type RoPE parameters are not supported")
    rtype = params.get("rope_type", params.get("type", "default"))
    if rtype not in ROPE_TYPES:
        raise HwpruneError(f"{where}: RoPE type {rtype!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
    if float(params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))) != 1.0:
        raise HwpruneError(f"{where}: partial_rotary_factor != 1 is not supported")
    out: dict[str, Any] = {
        "rope_type": rtype,
        "rope_theta": float(params.get("rope_theta", cfg.get("rope_theta", 10000.0))),
    }
    if rtype in ("linear", "llama3"):
        out["rope_factor"] = float(params["factor"])
    if rtype == "llama3":
        out.update(
            rope_low_freq_factor=float(params["low_freq_factor"]),
            rope_high_freq_factor=float(params["high_freq_factor"]),
            rope_original_max_position=int(
                params.get("original_max_position_embeddings") or cfg["max_position_embeddings"]
            ),
        )
    return out


def _eos(v: Any) -> tuple[int, ...]:
    return () if v is None else (int(v),) if isinstance(v, int) else tuple(int(x) for x in v)


def from_hf_config(cfg: Mapping[str, Any], *, where: str = "config.json") -> DecoderConfig:
    """Map a Hugging Face ``config.json`` of a llama / mistral / qwen2 / gpt2 model to a dense-per-layer config."""
    mt = cfg.get("model_type")
    if mt not in ARCHS:
        raise HwpruneError(f"{where}: model_type {mt!r} is not a supported decoder; supported: {', '.join(ARCHS)}")
    try:
        ids: dict[str, Any] = {
            "bos_token_id": cfg.get("bos_token_id"),
            "eos_token_id": _eos(cfg.get("eos_token_id")),
            "pad_token_id": cfg.get("pad_token_id"),
        }
        if mt == "gpt2":
            act = cfg.get("activation_function", "gelu_new")
            if act not in _GPT2_ACTS:
                raise HwpruneError(
                    f"{where}: activation_function {act!r} is not supported; supported: {', '.join(_GPT2_ACTS)}"
                )
            if not cfg.get("scale_attn_weights", True) or cfg.get("scale_attn_by_inverse_layer_idx", False):
                raise HwpruneError(f"{where}: only GPT-2's default 1/sqrt(head_dim) attention scaling is supported")
            if cfg.get("add_cross_attention", False):
                raise HwpruneError(f"{where}: GPT-2 with cross-attention is not a decoder-only LM")
            hidden, heads = int(cfg["n_embd"]), int(cfg["n_head"])
            return DecoderConfig(
                arch="gpt2",
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                num_layers=int(cfg["n_layer"]),
                num_heads=heads,
                num_kv_heads=heads,
                head_dim=hidden // heads,
                intermediate_size=int(cfg.get("n_inner") or 4 * hidden),
                max_position=int(cfg["n_positions"]),
                norm_eps=float(cfg.get("layer_norm_epsilon", 1e-5)),
                hidden_act=_GPT2_ACTS[act],
                rope_type="none",
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
                attention_bias=True,
                o_proj_bias=True,
                mlp_bias=True,
                **ids,
            )
        if cfg.get("hidden_act", "silu") != "silu":
            raise HwpruneError(f"{where}: hidden_act {cfg['hidden_act']!r} is not supported; supported: silu")
        window = None
        if mt == "mistral":
            window = cfg.get("sliding_window")
            if any(t != "full_attention" for t in cfg.get("layer_types") or ()):
                raise HwpruneError(f"{where}: per-layer attention types are not supported")
        if mt == "qwen2" and cfg.get("use_sliding_window", False):
            raise HwpruneError(f"{where}: use_sliding_window=true is not supported; supported: full attention")
        hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        bias = mt == "llama" and bool(cfg.get("attention_bias", False))
        return DecoderConfig(
            arch=mt,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            intermediate_size=int(cfg["intermediate_size"]),
            max_position=int(cfg.get("max_position_embeddings", 2048)),
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            sliding_window=int(window) if window else None,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bias or mt == "qwen2",
            o_proj_bias=bias,
            mlp_bias=mt == "llama" and bool(cfg.get("mlp_bias", False)),
            **_rope(cfg, where),
            **ids,
        )
    except KeyError as e:
        raise HwpruneError(f"{where}: missing key {e.args[0]!r}; is this a {mt} config.json?") from None
    except (TypeError, ValueError, ZeroDivisionError) as e:  # e.g. "hidden_size": "large", or 0 heads
        raise HwpruneError(f"{where}: bad value ({str(e).splitlines()[0][:200]})") from None


def hf_unloadable_reason(cfg: DecoderConfig) -> str | None:
    """Why transformers cannot load this (pruned) shape, or ``None`` when :func:`hf_config` can write it."""
    kept = [i for i in range(cfg.num_layers) if not cfg.block_removed(i)]
    if not kept:
        return "every block is removed"
    if not cfg.is_uniform():
        shapes = sorted({cfg.layer_shape(i) for i in kept})
        return (
            f"kept blocks differ in (kv_groups, heads_per_group, ffn): {shapes[:3]}; transformers' {cfg.arch} "
            "config has one head count and FFN width for all layers"
        )
    g, p, f = cfg.layer_shape(kept[0])
    if g == 0 or f == 0:
        return f"layer {kept[0]} has its {'attention' if g == 0 else 'FFN'} removed but not the whole block"
    if len(kept) < cfg.num_layers and (cfg.o_proj_bias or cfg.mlp_bias):
        return "a removed block still adds its output biases (x + b), so it cannot be dropped"
    if cfg.arch == "gpt2" and g != cfg.num_heads:
        return "transformers' GPT-2 derives head_dim = n_embd / n_head, so pruned heads cannot be written"
    if cfg.arch == "llama" and cfg.attention_bias != cfg.o_proj_bias:
        return "transformers' llama biases q/k/v and o_proj together (attention_bias)"
    if cfg.arch == "llama" and cfg.sliding_window is not None:
        return "transformers' llama has no sliding window"
    if cfg.arch == "llama" and cfg.hidden_size % (g * p) and (cfg.attention_bias or cfg.mlp_bias):
        return f"transformers' llama requires hidden_size % num_attention_heads == 0 ({cfg.hidden_size} % {g * p})"
    if cfg.arch in ("mistral", "qwen2") and (
        cfg.o_proj_bias or cfg.mlp_bias or cfg.attention_bias != (cfg.arch == "qwen2")
    ):
        return f"transformers' {cfg.arch} has fixed biases (q/k/v only for qwen2, none for mistral)"
    return None


def hf_config(cfg: DecoderConfig) -> dict[str, Any]:
    """The ``config.json`` of the HF model computing the same function (removed blocks dropped).

    A llama whose kept head count does not divide ``hidden_size`` is written as ``mistral`` (the same
    computation without a sliding window), since transformers' LlamaConfig rejects that head count.
    """
    reason = hf_unloadable_reason(cfg)
    if reason is not None:
        raise HwpruneError(f"cannot save as a Hugging Face model: {reason}")
    kept = [i for i in range(cfg.num_layers) if not cfg.block_removed(i)]
    g, p, f = cfg.layer_shape(kept[0])
    eos = (
        None if not cfg.eos_token_id else cfg.eos_token_id[0] if len(cfg.eos_token_id) == 1 else list(cfg.eos_token_id)
    )
    common = {
        "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": eos,
        "pad_token_id": cfg.pad_token_id,
        "dtype": "float32",
    }
    if cfg.arch == "gpt2":
        return dict(
            architectures=[_ARCHITECTURES["gpt2"]],
            model_type="gpt2",
            n_embd=cfg.hidden_size,
            n_layer=len(kept),
            n_head=g,
            n_inner=f,
            n_positions=cfg.max_position,
            layer_norm_epsilon=cfg.norm_eps,
            activation_function=cfg.hidden_act,
            scale_attn_weights=True,
            **common,
        )
    arch = "mistral" if cfg.arch == "llama" and cfg.hidden_size % (g * p) else cfg.arch
    rope_scaling: dict[str, Any] | None = None
    if cfg.rope_type == "linear":
        rope_scaling = {"rope_type": "linear", "factor": cfg.rope_factor}
    elif cfg.rope_type == "llama3":
        rope_scaling = {
            "rope_type": "llama3",
            "factor": cfg.rope_factor,
            "low_freq_factor": cfg.rope_low_freq_factor,
            "high_freq_factor": cfg.rope_high_freq_factor,
            "original_max_position_embeddings": cfg.rope_original_max_position,
        }
    d: dict[str, Any] = dict(
        architectures=[_ARCHITECTURES[arch]],
        model_type=arch,
        hidden_size=cfg.hidden_size,
        intermediate_size=f,
        num_hidden_layers=len(kept),
        num_attention_heads=g * p,
        num_key_value_heads=g,
        head_dim=cfg.head_dim,
        hidden_act="silu",
        max_position_embeddings=cfg.max_position,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        rope_scaling=rope_scaling,
        **common,
    )
    if arch == "llama":
        d.update(attention_bias=cfg.attention_bias, mlp_bias=cfg.mlp_bias)
    elif arch == "mistral":
        d.update(sliding_window=cfg.sliding_window)
    else:
        d.update(use_sliding_window=False, sliding_window=None, max_window_layers=len(kept))
    return d
