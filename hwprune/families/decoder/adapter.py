"""The decoder family's adapter: ``smollm2`` (real weights from a GGUF), random-weight named shapes, or a
local Hugging Face folder of a LLaMA / Mistral / Qwen2 / GPT-2 model.

Units per layer ``i`` (the search space): ``layer.{i}.attn`` keeps whole KV groups (a group is its K/V
head plus the query heads that read it; granule ``group_size * head_dim`` columns of ``o_proj``), 0
removes the attention sublayer; ``layer.{i}.ffn`` keeps FFN neurons (gate/up rows and down columns
together), 0 removes the FFN; both at 0 remove the block. Surgery also takes ``layer.{i}.qpg`` (query
heads per kept group) and ``layer.{i}.block`` (see :mod:`.surgery`). Hidden size stays.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from functools import cached_property
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import nn

from hwprune.families import register_family
from hwprune.families._base import ExtraGraph, Family, RawUnit
from hwprune.space import PruningSpace
from hwprune.surgery.plan import Plan

from .config import NAMED_CONFIGS, DecoderConfig
from .model import Decoder

if TYPE_CHECKING:
    import pandas as pd

    from hwprune.export.stats import ModelStats
    from hwprune.latency._base import Backend, Profiling
    from hwprune.proxies._base import CalibData

    from .scorer import DecoderScorer

__all__ = ["DecoderAdapter", "PARITY_TEXTS"]

# Prompts of different lengths: a parity batch has right padding in all but the longest row.
PARITY_TEXTS = (
    "The capital of France is",
    "Structured pruning removes whole attention groups and feed-forward neurons, so the smaller matrices run "
    "faster on any runtime without sparse kernels.",
    "Short one.",
)


@register_family
class DecoderAdapter(Family):
    family = "decoder"
    # Logits of a deep fp32 decoder over a large vocabulary are O(10-30): ONNX Runtime's fused kernels and
    # torch sum in different orders and differ by ~1e-3 absolute (1e-4 relative) on SmolLM2's 30 layers.
    parity_tol = 1e-2
    # an LLM trial scores every selection token through the LM head: fewer, longer trials than an encoder's
    search_defaults: ClassVar[Mapping[str, int]] = MappingProxyType(
        {"trials": 48, "n_calib": 128, "n_heldout": 16, "n_report": 16}
    )

    def __init__(
        self,
        name: str,
        *,
        config: DecoderConfig | None = None,
        path: Path | None = None,
        gguf: Path | None = None,
        seed: int = 0,
    ) -> None:
        if sum(x is not None for x in (config, path, gguf)) != 1:
            raise ValueError("give exactly one of config (random weights), path (HF folder) or gguf")
        self.name, self._config, self.path, self.gguf, self.seed = name, config, path, gguf, seed

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def named(cls, name: str) -> DecoderAdapter:
        if name == "smollm2":
            from .gguf_io import smollm2_gguf_path

            return cls(name, gguf=smollm2_gguf_path())
        return cls(name, config=NAMED_CONFIGS[name])

    @classmethod
    def from_folder(cls, path: str | Path) -> DecoderAdapter:
        path = Path(path)
        return cls(path.name, path=path)

    @classmethod
    def tiny(
        cls,
        *,
        arch: str = "llama",
        layers: int = 2,
        heads: int = 4,
        kv_heads: int = 2,
        head_dim: int = 8,
        ffn: int = 48,
        vocab: int = 512,
        seed: int = 0,
    ) -> DecoderAdapter:
        """A small random decoder for tests (token ids are random; no tokenizer)."""
        gpt2 = arch == "gpt2"
        cfg = DecoderConfig(
            arch=arch,
            vocab_size=vocab,
            hidden_size=heads * head_dim,
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=heads if gpt2 else kv_heads,
            head_dim=head_dim,
            intermediate_size=ffn,
            max_position=256,
            rope_type="none" if gpt2 else "default",
            hidden_act="gelu_new" if gpt2 else "silu",
            attention_bias=arch in ("qwen2", "gpt2"),
            o_proj_bias=gpt2,
            mlp_bias=gpt2,
        )
        return cls("tiny", config=cfg, seed=seed)

    @classmethod
    def from_arch(cls, arch: Mapping[str, Any]) -> DecoderAdapter:
        return cls("plan", config=DecoderConfig.from_json(arch).dense())

    # ---- identity -----------------------------------------------------------------------------
    def _load(self) -> tuple[Decoder, DecoderConfig, Any]:
        if self.gguf is not None:
            from .gguf_io import load_gguf

            return load_gguf(self.gguf)
        if self.path is not None:
            from .hf import load_hf_folder, load_tokenizer

            model, cfg = load_hf_folder(self.path)
            tok = load_tokenizer(self.path) if (self.path / "tokenizer.json").is_file() else None
            return model, cfg, tok
        from .model import random_decoder

        assert self._config is not None
        return random_decoder(self._config.dense(), seed=self.seed), self._config.dense(), None

    @cached_property
    def _loaded(self) -> tuple[Decoder, DecoderConfig, Any]:
        model, cfg, tok = self._load()
        return model.eval(), cfg, tok

    @property
    def config(self) -> DecoderConfig:
        if self._config is not None:
            return self._config.dense()
        if self.path is not None and "_loaded" not in self.__dict__:  # config.json alone, no weights
            from .hf import _read_json
            from .hf_config import from_hf_config

            return from_hf_config(
                _read_json(self.path / "config.json", "a Hugging Face config.json"),
                where=str(self.path / "config.json"),
            )
        return self._loaded[1]

    @property
    def tokenizer(self) -> Any:
        """A ``tokenizers.Tokenizer`` (GGUF metadata or the folder's tokenizer.json), or None."""
        return self._loaded[2] if self._config is None else None

    def spec(self) -> dict[str, Any]:
        if self.gguf is not None or (self._config is not None and self.name in NAMED_CONFIGS):
            return {"family": self.family, "model": self.name}
        if self.path is not None:
            return {"family": self.family, "model": str(self.path)}
        return {"family": self.family, "model": self.name, "arch": self.arch(), "seed": self.seed}

    def arch(self) -> dict[str, Any]:
        return self.config.dense().to_json()

    def shape_key(self) -> str:
        return self.config.shape_key()

    # ---- model --------------------------------------------------------------------------------
    def dense(self) -> Decoder:
        return self._loaded[0]

    def raw_units(self) -> list[RawUnit]:
        c = self.config
        out: list[RawUnit] = []
        for i in range(c.num_layers):
            out.append((f"layer.{i}.attn", "attn", c.num_kv_heads, i, c.group_size * c.head_dim))
            out.append((f"layer.{i}.ffn", "ffn", c.intermediate_size, i, 1))
        return out

    def default_space_spec(self) -> dict[str, Any]:
        """KV groups one by one, FFN in 24 steps; both sublayers (hence whole blocks) removable."""
        step = max(1, self.config.intermediate_size // 24)
        return {
            "defaults": {
                "attn": {"step": 1, "min": 1, "allow_remove": True},
                "ffn": {"step": step, "min": step, "allow_remove": True},
            }
        }

    def tokenize(self, texts: Sequence[str], *, seq: int) -> dict[str, torch.Tensor]:
        """Token ids and mask (batch, seq) int64, right-padded / truncated to exactly ``seq``.

        Models without a tokenizer (random weights, tests) read UTF-8 bytes as tokens (id = byte + 3):
        deterministic text input for calibration and latency, meaningless for quality.
        """
        c = self.config
        pad = c.pad_token_id if c.pad_token_id is not None else (c.eos_token_id[0] if c.eos_token_id else 0)
        tok = self.tokenizer
        if tok is not None:
            rows = [tok.encode(t, add_special_tokens=False).ids[:seq] for t in texts]
        else:
            rows = [[min(b + 3, c.vocab_size - 1) for b in t.encode("utf-8")[:seq]] for t in texts]
        ids = torch.full((len(rows), seq), int(pad), dtype=torch.int64)
        mask = torch.zeros((len(rows), seq), dtype=torch.int64)
        for r, row in enumerate(rows):
            ids[r, : len(row)] = torch.tensor(row, dtype=torch.int64)
            mask[r, : len(row)] = 1
        return {"input_ids": ids.clamp_max(c.vocab_size - 1), "attention_mask": mask}

    def example_inputs(self, *, batch: int = 1, seq: int = 128) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(0)
        v = self.config.vocab_size
        ids = torch.randint(min(100, v // 2), v, (batch, seq), generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones(batch, seq, dtype=torch.int64)}

    def onnx_io(self) -> tuple[list[str], list[str], dict[str, dict[int, str]]]:
        dyn = {
            "input_ids": {0: "batch", 1: "seq"},
            "attention_mask": {0: "batch", 1: "seq"},
            "logits": {0: "batch", 1: "seq"},
        }
        return ["input_ids", "attention_mask"], ["logits"], dyn

    # ---- surgery ------------------------------------------------------------------------------
    def pruned_config(self, plan: Plan) -> DecoderConfig:
        c = DecoderConfig.from_json(plan.arch)
        s = plan.sizes()
        g = tuple(s.get(f"layer.{i}.attn", c.num_kv_heads) for i in range(c.num_layers))
        f = tuple(s.get(f"layer.{i}.ffn", c.intermediate_size) for i in range(c.num_layers))
        return c.with_sizes(kv_groups=g, ffn=f)

    def prune(self, model: nn.Module, plan: Plan, overrides: Mapping[str, torch.Tensor] | None = None) -> Decoder:
        from .surgery import prune_decoder

        assert isinstance(model, Decoder)
        return prune_decoder(model, plan.units, overrides).eval()

    def skeleton(self, plan: Plan) -> Decoder:
        from .surgery import skeleton

        return skeleton(self.pruned_config(plan)).eval()

    # ---- files: a uniform subnet is also a Hugging Face folder ----------------------------------
    def saved_state(self, model: nn.Module, plan: Plan, folder: Path) -> dict[str, torch.Tensor]:
        """Hugging Face names + ``config.json`` when transformers can represent the subnet (every kept block
        the same shape; removed blocks dropped), so ``AutoModelForCausalLM.from_pretrained(folder)`` loads
        it; our own names otherwise (``manifest.plan.hf_loadable`` says which)."""
        from hwprune._io import write_json

        from .hf import to_hf_state
        from .hf_config import hf_config, hf_unloadable_reason

        assert isinstance(model, Decoder)
        cfg = model.config
        if hf_unloadable_reason(cfg) is not None:
            return dict(model.state_dict())
        write_json(folder / "config.json", hf_config(cfg))
        state = to_hf_state(model)
        if cfg.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        return state

    def restored_state(self, plan: Plan, state: Mapping[str, torch.Tensor], folder: Path) -> dict[str, torch.Tensor]:
        if "embed_tokens.weight" in state:  # our own names
            return dict(state)
        from .hf import from_hf_state

        cfg = self.pruned_config(plan)
        kept = [i for i in range(cfg.num_layers) if not cfg.block_removed(i)]
        compact = replace(
            cfg,
            num_layers=len(kept),
            kv_groups=tuple(cfg.kv_groups[i] for i in kept),
            heads_per_group=tuple(cfg.heads_per_group[i] for i in kept),
            ffn=tuple(cfg.ffn[i] for i in kept),
        )
        out: dict[str, torch.Tensor] = {}
        for k, v in from_hf_state(compact, state, where=str(folder / "model.safetensors")).items():
            if k.startswith("layers."):  # the checkpoint numbers kept blocks 0..n-1; ours keeps the gaps
                _, n, rest = k.split(".", 2)
                k = f"layers.{kept[int(n)]}.{rest}"
            out[k] = v
        return out

    def export_files(self, model: nn.Module, plan: Plan, folder: Path) -> dict[str, str]:
        files = {"hf_config": "config.json"} if (folder / "config.json").is_file() else {}
        if self.tokenizer is not None:
            self.tokenizer.save(str(folder / "tokenizer.json"))
            files["tokenizer"] = "tokenizer.json"
        return files

    def extra_graphs(self, model: nn.Module) -> list[ExtraGraph]:
        """``decoder.onnx``: one step with a per-layer KV cache (see :mod:`.decode`), checked on a prompt
        (empty past) and on a one-token step after a 6-token past, batch 2."""
        from .decode import DECODER_FILE, decode_feed, decode_onnx, generation_info, reference_outputs

        assert isinstance(model, Decoder)
        checks = []
        for past, seq in ((0, 4), (6, 1)):
            feed = decode_feed(model.config, batch=2, past_len=past, seq=seq, seed=past)
            checks.append(({k: v.numpy() for k, v in feed.items()}, reference_outputs(model, feed)))
        info = generation_info(model.config)
        return [ExtraGraph(role="decode", file=DECODER_FILE, onnx=decode_onnx(model), checks=checks, info=info)]

    # ---- latency, accuracy, reports ------------------------------------------------------------
    def measure_latency(
        self,
        backend: Backend,
        *,
        batch: int,
        seq: int,
        space: PruningSpace,
        progress: bool = True,
        budget_s: float | None = None,
    ) -> tuple[pd.DataFrame, dict[str, Any]]:
        from .profile import measure

        return measure(self, backend, batch=batch, seq=seq, space=space, progress=progress, budget_s=budget_s)

    def measure_decode_latency(
        self,
        backend: Backend,
        *,
        batch: int,
        contexts: Sequence[int],
        space: PruningSpace,
        progress: bool = True,
        budget_s: float | None = None,
    ) -> tuple[pd.DataFrame, dict[str, Any]]:
        """Each context's graphs exported, loaded and timed in their own interleaved rounds (one context's
        sessions in memory at a time), the budget shared out evenly."""
        import pandas as pd

        from .profile import check_context, measure

        for c in contexts:  # every context checked before any is timed
            check_context(self.config, c)
        share = None if budget_s is None else budget_s / max(len(contexts), 1)
        frames, metas = [], {}
        for c in contexts:
            f, m = measure(self, backend, batch=batch, seq=1, space=space, progress=progress, budget_s=share, context=c)
            frames.append(f.assign(context=c))
            metas[str(c)] = m
        meta = {"method": "one new token per call after a KV cache of each context", "contexts": metas}
        return pd.concat(frames, ignore_index=True), meta

    def prepare_profiling(
        self,
        backend: Backend,
        *,
        batch: int,
        seq: int,
        space: PruningSpace,
        progress: bool = True,
        levels: int | None = None,
    ) -> Profiling:
        from .profile import prepare

        return prepare(self, backend, batch=batch, seq=seq, space=space, progress=progress)

    def load_calib(
        self, source: str | None = None, *, n_calib: int, n_heldout: int, seq: int, seed: int = 0, n_report: int = 0
    ) -> CalibData:
        from .calib import load_calib

        return load_calib(self, source, n_calib=n_calib, n_heldout=n_heldout, n_report=n_report, seq=seq, seed=seed)

    def distill_loss(self, student: nn.Module, teacher: nn.Module, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """KL(dense || pruned) of the next-token distributions, averaged over real tokens (padding
        trimmed): the divergence the end-to-end scorer reports."""
        mask = inputs["attention_mask"]
        n = max(1, int(mask.sum(1).max()))
        ids, mask = inputs["input_ids"][:, :n], mask[:, :n]
        real = mask.bool()
        with torch.no_grad():
            ref = torch.log_softmax(teacher(ids, mask)[real].float(), -1)
        out = torch.log_softmax(student(ids, mask)[real].float(), -1)
        return nn.functional.kl_div(out, ref, log_target=True, reduction="batchmean")

    def scorer(self, calib: CalibData) -> DecoderScorer:
        from .scorer import DecoderScorer

        return DecoderScorer(self, calib.heldout)

    def stats(self, model: nn.Module, *, batch: int, seq: int) -> ModelStats:
        from .stats import decoder_stats

        assert isinstance(model, Decoder)
        return decoder_stats(model, batch=batch, seq=seq)

    def plan_summary(self, plan: Plan) -> dict[str, Any]:
        """Kept sizes, plus per-layer ``kv_groups``/``ffn`` lists and the removed blocks."""
        out = super().plan_summary(plan)
        c = self.pruned_config(plan)
        out.update(
            kv_groups=list(c.kv_groups),
            ffn=list(c.ffn),
            dense_kv_groups=c.num_kv_heads,
            dense_ffn=c.intermediate_size,
            removed_blocks=[i for i in range(c.num_layers) if c.block_removed(i)],
        )
        from .hf_config import hf_unloadable_reason

        why = hf_unloadable_reason(c)
        out["hf_loadable"] = why is None
        out["load"] = (
            "transformers.AutoModelForCausalLM.from_pretrained(folder) or hwprune.load(folder)"
            if why is None
            else f"hwprune.load(folder) (transformers cannot: {why})"
        )
        return out

    def parity_inputs(self, *, seq: int) -> dict[str, torch.Tensor]:
        return self.tokenize(list(PARITY_TEXTS), seq=seq)

    def parity_mask(self, inputs: Mapping[str, torch.Tensor]) -> np.ndarray | None:
        """Padded positions are garbage by design; only real tokens count."""
        return inputs["attention_mask"].numpy().astype(bool)
