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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from hwprune._io import atomic_dir
from hwprune.errors import HwpruneError

from .config import ARCHS, DecoderConfig
from .hf_config import from_hf_config, hf_config, hf_unloadable_reason
from .model import Decoder, assemble, materialize

__all__ = [
    "from_hf_config",
    "hf_config",
    "hf_unloadable_reason",
    "to_hf_state",
    "from_hf_state",
    "load_hf_folder",
    "save_hf_folder",
    "load_tokenizer",
]

_LLAMA_SUB = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm", "attn": "self_attn", "mlp": "mlp"}
_GPT2_SUB = {
    "attn_norm": "ln_1",
    "mlp_norm": "ln_2",
    "attn.o_proj": "attn.c_proj",
    "mlp.up_proj": "mlp.c_fc",
    "mlp.down_proj": "mlp.c_proj",
}
_GPT2_QKV = ("attn.q_proj", "attn.k_proj", "attn.v_proj")


def _hf_name(arch: str, key: str, layer_index: int | None = None) -> tuple[str, bool]:
    """Our key -> (HF key, whether the tensor is stored transposed); ``layer_index`` renumbers the layer.

    GPT-2's q/k/v map to the fused ``attn.c_attn`` (split by the caller).
    """
    gpt2 = arch == "gpt2"
    if key == "embed_tokens.weight":
        return ("transformer.wte.weight" if gpt2 else "model.embed_tokens.weight"), False
    if key == "embed_positions.weight":
        return "transformer.wpe.weight", False
    if key == "lm_head.weight":
        return key, False
    if key.startswith("norm."):
        return ("transformer.ln_f." if gpt2 else "model.norm.") + key[5:], False
    _, i, rest = key.split(".", 2)  # layers.{i}.{module path}.{weight|bias}
    i = str(layer_index) if layer_index is not None else i
    head, _, tail = rest.rpartition(".")
    if not gpt2:
        first, _, sub = head.partition(".")
        return f"model.layers.{i}.{_LLAMA_SUB[first]}" + (f".{sub}" if sub else "") + f".{tail}", False
    if head in _GPT2_QKV:
        return f"transformer.h.{i}.attn.c_attn.{tail}", tail == "weight"
    name = next((new + head[len(old) :] for old, new in _GPT2_SUB.items() if head.startswith(old)), head)
    return f"transformer.h.{i}.{name}.{tail}", tail == "weight" and "proj" in head  # Conv1D: (in, out)


def to_hf_state(model: Decoder) -> dict[str, torch.Tensor]:
    """Our state dict -> the checkpoint of ``hf_config(model.config)`` (removed blocks dropped, renumbered)."""
    cfg = model.config
    renumber = {i: n for n, i in enumerate(i for i in range(cfg.num_layers) if not cfg.block_removed(i))}
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, list[torch.Tensor]] = {}
    for k, v in model.state_dict().items():
        idx = int(k.split(".")[1]) if k.startswith("layers.") else None
        if idx is not None and idx not in renumber:
            continue
        name, transposed = _hf_name(cfg.arch, k, renumber.get(idx) if idx is not None else None)
        if cfg.arch == "gpt2" and ".attn.c_attn." in name:
            fused.setdefault(name, []).append(v.detach())  # state_dict order is q, k, v
            continue
        out[name] = v.detach().t().contiguous() if transposed else v.detach()
    for name, parts in fused.items():
        cat = torch.cat(parts, 0)
        out[name] = cat.t().contiguous() if name.endswith("weight") else cat
    return out


def from_hf_state(cfg: DecoderConfig, state: Mapping[str, torch.Tensor], *, where: str) -> dict[str, torch.Tensor]:
    """A Hugging Face checkpoint whose layers all have ``cfg``'s kept shape -> our state dict (float32)."""
    gpt2 = cfg.arch == "gpt2"
    out: dict[str, torch.Tensor] = {}
    for k, t in materialize(cfg, "meta").state_dict().items():
        hk, transposed = _hf_name(cfg.arch, k)
        src = next((c for c in ((hk, hk.removeprefix("transformer.")) if gpt2 else (hk,)) if c in state), None)
        if src is None:
            raise HwpruneError(f"{where}: weight {hk!r} not found; is this a {cfg.arch} checkpoint?")
        v = state[src].to(torch.float32)
        v = v.t() if transposed else v
        if gpt2 and ".attn.c_attn." in hk:  # fused (3*inner, ...) -> this projection's third
            n = v.shape[0] // 3
            j = _GPT2_QKV.index(".".join(k.split(".")[2:4]))  # layers.{i}.attn.q_proj.weight
            v = v[j * n : (j + 1) * n]
        if tuple(v.shape) != tuple(t.shape):
            raise HwpruneError(f"{where}: weight {src!r} gives shape {tuple(v.shape)}, expected {tuple(t.shape)}")
        out[k] = v.contiguous()
    return out


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
        raise HwpruneError(
            f"{folder}: no model.safetensors; convert the checkpoint to safetensors "
            "(hwprune never unpickles .bin files)"
        )
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
    cfg = from_hf_config(
        _read_json(
            path / "config.json", f"--model PATH needs a local Hugging Face folder of a {'/'.join(ARCHS)} model"
        ),
        where=str(path / "config.json"),
    )
    state = from_hf_state(cfg, _load_safetensors(path), where=str(path / "model.safetensors"))
    return assemble(cfg, state), cfg


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
