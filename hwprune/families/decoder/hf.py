"""Hugging Face ``config.json`` + safetensors in and out for LLaMA, Mistral, Qwen2 and GPT-2.

Our state-dict names are arch-independent (``layers.{i}.attn.q_proj.weight``, ``layers.{i}.mlp.down_proj.weight``,
``layers.{i}.attn_norm.weight``, ``norm.weight`` ...); this module maps them to each arch's checkpoint
names. GPT-2 stores q/k/v fused in one ``Conv1D`` (``c_attn``) whose weights are (in, out): they are split
and transposed on the way in, fused and transposed on the way out.

transformers' configs have one head count and one FFN width for all layers, so a pruned model is
HF-loadable only when every kept block has the same shape with both sublayers present; fully removed
blocks are dropped (they compute the identity when no output bias is left behind).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch

from hwprune._io import atomic_dir
from hwprune.errors import HwpruneError

from .config import ARCHS, DecoderConfig
from .hf_config import from_hf_config, hf_config, hf_unloadable_reason
from .model import Decoder, materialize

__all__ = ["from_hf_config", "hf_config", "hf_unloadable_reason", "to_hf_state", "from_hf_state",
           "load_hf_folder", "save_hf_folder", "load_tokenizer"]

_LLAMA_NAMES = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm", "attn": "self_attn",
                "mlp": "mlp"}
_GPT2_NAMES = {"attn_norm": "ln_1", "mlp_norm": "ln_2", "attn.o_proj": "attn.c_proj", "mlp.up_proj": "mlp.c_fc",
               "mlp.down_proj": "mlp.c_proj"}


def _kept_layers(cfg: DecoderConfig) -> list[int]:
    return [i for i in range(cfg.num_layers) if not cfg.block_removed(i)]


def to_hf_state(model: Decoder) -> dict[str, torch.Tensor]:
    """Our state dict -> the checkpoint of ``hf_config(model.config)`` (removed blocks dropped, renumbered)."""
    cfg = model.config
    ours = {k: v.detach() for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    gpt2 = cfg.arch == "gpt2"
    top = {"embed_tokens.weight": "transformer.wte.weight" if gpt2 else "model.embed_tokens.weight",
           "embed_positions.weight": "transformer.wpe.weight", "lm_head.weight": "lm_head.weight"}
    for k, v in ours.items():
        if k in top:
            out[top[k]] = v
        elif k.startswith("norm."):
            out[("transformer.ln_f." if gpt2 else "model.norm.") + k[5:]] = v
    for new_i, i in enumerate(_kept_layers(cfg)):
        pre, layer = f"layers.{i}.", {k[len(f"layers.{i}."):]: v for k, v in ours.items() if k.startswith(f"layers.{i}.")}
        hp = f"transformer.h.{new_i}." if gpt2 else f"model.layers.{new_i}."
        if gpt2:
            for kind in ("weight", "bias"):
                qkv = [layer.pop(f"attn.{n}_proj.{kind}") for n in "qkv"]
                fused = torch.cat(qkv, 0)
                out[hp + f"attn.c_attn.{kind}"] = fused.t().contiguous() if kind == "weight" else fused
        for k, v in layer.items():
            head, _, tail = k.rpartition(".")  # e.g. ("attn.q_proj", "weight")
            if gpt2:
                name = next((_GPT2_NAMES[p] + head[len(p):] for p in _GPT2_NAMES if head.startswith(p)), head)
                v = v.t().contiguous() if tail == "weight" and ("proj" in head) else v
            else:
                first, _, rest = head.partition(".")
                name = _LLAMA_NAMES[first] + (f".{rest}" if rest else "")
            out[hp + f"{name}.{tail}"] = v
        del pre
    return out


def from_hf_state(cfg: DecoderConfig, state: Mapping[str, torch.Tensor], *, where: str) -> dict[str, torch.Tensor]:
    """A Hugging Face checkpoint of a dense-per-layer ``cfg`` (any of our archs) -> our state dict (float32)."""
    model = materialize(cfg, "meta")
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    hf_names = to_hf_state(model)  # names and shapes of the checkpoint we expect
    gpt2 = cfg.arch == "gpt2"
    prefixes = ("",) if not gpt2 else ("", "transformer.")
    fetched: dict[str, torch.Tensor] = {}
    for hk, t in hf_names.items():
        if hk == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        cand = [hk, hk.removeprefix("transformer.")] if gpt2 else [hk]
        src = next((c for c in cand if c in state), None)
        if src is None:
            raise HwpruneError(f"{where}: weight {hk!r} not found; is this a {cfg.arch} checkpoint?")
        if tuple(state[src].shape) != tuple(t.shape):
            raise HwpruneError(f"{where}: weight {src!r} has shape {tuple(state[src].shape)}, "
                               f"expected {tuple(t.shape)}")
        fetched[hk] = state[src].to(torch.float32)
    del prefixes
    out: dict[str, torch.Tensor] = {}
    for k in expected:
        out[k] = _pick(k, cfg, fetched)
    return out


def _pick(ours: str, cfg: DecoderConfig, hf: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The tensor of our key ``ours`` inside the (renamed, dense-layer) HF state ``hf``."""
    gpt2 = cfg.arch == "gpt2"
    if ours == "embed_tokens.weight":
        return hf["transformer.wte.weight" if gpt2 else "model.embed_tokens.weight"]
    if ours == "embed_positions.weight":
        return hf["transformer.wpe.weight"]
    if ours == "lm_head.weight":
        return hf["lm_head.weight"]
    if ours.startswith("norm."):
        return hf[("transformer.ln_f." if gpt2 else "model.norm.") + ours[5:]]
    _, i, rest = ours.split(".", 2)
    head, _, tail = rest.rpartition(".")
    if not gpt2:
        first, _, sub = head.partition(".")
        return hf[f"model.layers.{i}.{_LLAMA_NAMES[first]}" + (f".{sub}" if sub else "") + f".{tail}"]
    hp = f"transformer.h.{i}."
    if head in ("attn.q_proj", "attn.k_proj", "attn.v_proj"):
        fused = hf[hp + f"attn.c_attn.{tail}"]
        fused = fused.t() if tail == "weight" else fused  # (3*inner, hidden) / (3*inner,)
        n = fused.shape[0] // 3
        j = "qkv".index(head[5])
        return fused[j * n:(j + 1) * n].contiguous()
    name = next((_GPT2_NAMES[p] + head[len(p):] for p in _GPT2_NAMES if head.startswith(p)), head)
    t = hf[hp + f"{name}.{tail}"]
    return t.t().contiguous() if tail == "weight" and "proj" in head else t


def _read_json(path: Path, fix: str) -> Any:
    if not path.is_file():
        raise HwpruneError(f"{path.parent}: no {path.name}; {fix}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HwpruneError(f"{path}: not valid JSON ({e}); {fix}") from None


def _load_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        shard_map = _read_json(index, "re-download the checkpoint").get("weight_map", {})
        files = [folder / f for f in sorted(set(shard_map.values()))]
    else:
        raise HwpruneError(f"{folder}: no model.safetensors; convert the checkpoint to safetensors "
                           "(hwprune never unpickles .bin files)")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            state.update(load_file(str(f)))
        except (SafetensorError, OSError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise HwpruneError(f"{f}: cannot read safetensors ({msg}); re-download or re-save the checkpoint") from None
    return state


def load_hf_folder(path: str | Path) -> tuple[Decoder, DecoderConfig]:
    """Load a local Hugging Face folder (``config.json`` + ``model.safetensors``) of one of our archs."""
    path = Path(path)
    cfg = from_hf_config(_read_json(path / "config.json", f"--model PATH needs a local Hugging Face folder "
                                    f"of a {'/'.join(ARCHS)} model"), where=str(path / "config.json"))
    state = from_hf_state(cfg, _load_safetensors(path), where=str(path / "model.safetensors"))
    model = materialize(cfg)
    model.load_state_dict(state)
    return model, cfg


def load_tokenizer(path: str | Path) -> Any:
    """The ``tokenizers.Tokenizer`` of a folder's ``tokenizer.json``, or ``None`` when there is none."""
    from tokenizers import Tokenizer

    f = Path(path) / "tokenizer.json"
    if not f.is_file():
        return None
    try:
        return Tokenizer.from_file(str(f))
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON
        raise HwpruneError(f"{f}: cannot read the tokenizer ({str(e).splitlines()[0][:200]}); re-download it") from None


def save_hf_folder(model: Decoder, path: str | Path, tokenizer: Any = None) -> Path:
    """Write an HF-loadable pruned ``model`` as ``config.json`` + ``model.safetensors`` (+ ``tokenizer.json``).

    Refused (one line saying why) when transformers cannot represent the shape; see :func:`hf_config`.
    """
    from safetensors.torch import save_file

    cfg_dict = hf_config(model.config)
    state = {k: v.contiguous().to(torch.float32) for k, v in to_hf_state(model).items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    path = Path(path)
    with atomic_dir(path) as tmp:
        (tmp / "config.json").write_text(json.dumps(cfg_dict, indent=2) + "\n")
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save(str(tmp / "tokenizer.json"))
    return path
