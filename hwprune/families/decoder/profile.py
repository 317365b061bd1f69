"""Prompt-processing latency of a decoder's blocks, measured as ONNX Runtime graphs of our own module.

Every graph is a :class:`~hwprune.families.decoder.model.Decoder` with other sizes, so ONNX Runtime fuses
blocks exactly as in the real model:

- ``dense``: the real model (the self-check: its time against the table's prediction);
- ``base``: the real model with every block removed -- embeddings, mask and RoPE tables, the final norm
  and the LM head (for SmolLM2 the 49152-word LM head is most of it);
- ``empty``: a small-vocabulary model with R removed blocks (what a chain costs besides its blocks);
- ``attn`` g: the same with R attention-only blocks keeping g KV groups (FFN removed);
- ``ffn`` n: R FFN-only blocks of width n (attention removed).

A block's time is ``(chain - empty) / R``; removed sublayers cost 0. A candidate is predicted as
``base + sum over layers of attn(g_i) + ffn(n_i)``, which holds for removed blocks (depth) too.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch

from hwprune.errors import HwpruneError
from hwprune.export.onnx_io import to_onnx
from hwprune.latency._base import Backend, Timing
from hwprune.latency.backends import OrtCpuBackend, Runner, time_profile
from hwprune.space import PruningSpace

from .config import DecoderConfig
from .model import random_decoder

if TYPE_CHECKING:
    from .adapter import DecoderAdapter

__all__ = ["measure", "prepare", "DecoderProfiling", "chain_length", "profiled_sizes"]

_CHAIN_WEIGHT_BUDGET = 256 * 2**20  # bytes of fp32 block weights per chain: longer chains, steadier per-block figures
_CHAIN_VOCAB = 256
_ROUNDS = 300


def chain_length(cfg: DecoderConfig) -> int:
    """Blocks per chain: the model's layer count, fewer when that many blocks' weights pass the budget."""
    h, d = cfg.hidden_size, cfg.head_dim
    attn = h * d * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
    ffn = (3 if cfg.gated_mlp else 2) * h * cfg.intermediate_size
    return int(max(2, min(cfg.num_layers, _CHAIN_WEIGHT_BUDGET // max(4 * (attn + ffn), 1))))


def profiled_sizes(cfg: DecoderConfig, space: PruningSpace) -> tuple[list[int], list[int]]:
    """Every KV-group count 1..G; every FFN width of the space's grid plus full (0 costs nothing)."""
    ffn = {cfg.intermediate_size}
    for u in space.units:
        if u.kind == "ffn":
            ffn.update(s for s in u.sizes if s > 0)
    return list(range(1, cfg.num_kv_heads + 1)), sorted(ffn)


@dataclass
class DecoderProfiling:
    """The graphs of one profile, loaded: ``kinds[i], sizes[i]`` name ``runners[i]`` (dense first)."""

    cfg: DecoderConfig
    r: int
    kinds: list[str]
    sizes: list[int]
    runners: list[Runner]

    def frame(self, timings: Sequence[Timing]) -> pd.DataFrame:
        by = {(k, s): t for k, s, t in zip(self.kinds, self.sizes, timings, strict=True)}
        e, b = by[("empty", 0)], by[("base", 0)]
        rows = [
            {
                "kind": "base",
                "key": "",
                "size": 0,
                "size2": -1,
                "median_ms": b.median_ms,
                "p10_ms": b.p10_ms,
                "p90_ms": b.p90_ms,
                "n": b.n,
            }
        ]
        for kind in ("attn", "ffn"):  # a removed sublayer has no ops at all
            rows.append(
                {
                    "kind": kind,
                    "key": "",
                    "size": 0,
                    "size2": -1,
                    "median_ms": 0.0,
                    "p10_ms": 0.0,
                    "p90_ms": 0.0,
                    "n": e.n,
                }
            )
        rows += [
            {
                "kind": kind,
                "key": "",
                "size": size,
                "size2": -1,
                "median_ms": (t.median_ms - e.median_ms) / self.r,
                "p10_ms": (t.p10_ms - e.median_ms) / self.r,
                "p90_ms": (t.p90_ms - e.median_ms) / self.r,
                "n": t.n,
            }
            for (kind, size), t in by.items()
            if kind in ("attn", "ffn")
        ]
        return pd.DataFrame(rows)

    def networks(self) -> list[dict[str, int] | None]:
        c = self.cfg
        dense = {
            f"layer.{i}.{k}": n
            for i in range(c.num_layers)
            for k, n in (("attn", c.num_kv_heads), ("ffn", c.intermediate_size))
        }
        return [dict(dense) if k == "dense" else None for k in self.kinds]

    def meta(self, timings: Sequence[Timing]) -> dict[str, Any]:
        f = self.frame(timings).set_index(["kind", "size"])["median_ms"]
        c = self.cfg
        blocks = c.num_layers * (f[("attn", c.num_kv_heads)] + f[("ffn", c.intermediate_size)])
        predicted = f[("base", 0)] + blocks
        dense = next(t for k, t in zip(self.kinds, timings) if k == "dense")
        return {
            "method": "decoder chains of R sublayer-only blocks minus the same chain with R removed blocks; base = "
            "the model with every block removed (embeddings, final norm, LM head); interleaved rounds",
            "chain_len": self.r,
            "rounds": dense.n,
            "dense_ms": dense.to_json(),
            "dense_predicted_ms": round(float(predicted), 4),
            "dense_error_pct": round(float(100 * (predicted - dense.median_ms) / dense.median_ms), 3),
            "base_share_pct": round(float(100 * f[("base", 0)] / predicted), 2),
        }


def _graph(
    cfg: DecoderConfig, inputs: dict[str, torch.Tensor], outs: list[str], dyn: dict[str, dict[int, str]]
) -> bytes:
    with torch.random.fork_rng():  # weights do not change the time; keep the caller's RNG untouched
        model = random_decoder(cfg, seed=0).eval()
    return to_onnx(model, inputs, output_names=outs, dynamic_axes=dyn)


def prepare(
    adapter: DecoderAdapter, backend: Backend, *, batch: int, seq: int, space: PruningSpace, progress: bool = True
) -> DecoderProfiling:
    """Export and load every graph of the profile (dense, base, empty chain, the chains)."""
    from rich.progress import Progress

    if not isinstance(backend, OrtCpuBackend):  # runners with one held session per graph
        raise HwpruneError(f"runtime {backend.name} cannot profile yet; use --runtime ort-cpu (or ort-cuda)")
    cfg = adapter.config.dense()
    groups, ffn = profiled_sizes(cfg, space)
    r = chain_length(cfg)
    n = cfg.num_layers
    small = replace(
        cfg, vocab_size=min(cfg.vocab_size, _CHAIN_VOCAB), num_layers=r, kv_groups=(), heads_per_group=(), ffn=()
    )
    real = adapter.example_inputs(batch=batch, seq=seq)
    ids = {"input_ids": real["input_ids"] % small.vocab_size, "attention_mask": real["attention_mask"]}
    _, outs, dyn = adapter.onnx_io()

    def chain(kind: str, size: int) -> tuple[bytes, dict[str, torch.Tensor]]:
        if kind == "base":
            c = cfg.with_sizes(kv_groups=(0,) * n, heads_per_group=(0,) * n, ffn=(0,) * n)
            return _graph(c, real, outs, dyn), real
        g = size if kind == "attn" else 0
        f = size if kind == "ffn" else 0
        c = small.with_sizes(kv_groups=(g,) * r, heads_per_group=(cfg.group_size if g else 0,) * r, ffn=(f,) * r)
        return _graph(c, ids, outs, dyn), ids

    todo: list[tuple[str, int, Callable[[], tuple[bytes, dict[str, torch.Tensor]]]]] = [
        ("dense", -1, lambda: (to_onnx(adapter.dense(), real, output_names=outs, dynamic_axes=dyn), real)),
        ("base", 0, functools.partial(chain, "base", 0)),
        ("empty", 0, functools.partial(chain, "empty", 0)),
    ]
    todo += [("attn", g, functools.partial(chain, "attn", g)) for g in groups]
    todo += [("ffn", w, functools.partial(chain, "ffn", w)) for w in ffn]
    runners: list[Runner] = []
    with Progress(disable=not progress, transient=False) as bar:
        task = bar.add_task(f"export {len(todo)} graphs", total=len(todo))
        for _, _, build in todo:
            onnx, inputs = build()
            runners.append(backend.prepare(onnx, {k: v.numpy() for k, v in inputs.items()}))
            bar.advance(task)
    return DecoderProfiling(cfg=cfg, r=r, kinds=[k for k, _, _ in todo], sizes=[s for _, s, _ in todo], runners=runners)


def measure(
    adapter: DecoderAdapter,
    backend: Backend,
    *,
    batch: int,
    seq: int,
    space: PruningSpace,
    progress: bool = True,
    budget_s: float | None = None,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Time every block size for about ``budget_s`` s (default 120) or 300 rounds; returns (frame, meta)."""
    return time_profile(
        functools.partial(prepare, adapter, backend, batch=batch, seq=seq, space=space, progress=progress),
        backend,
        budget_s=120.0 if budget_s is None else budget_s,
        rounds=_ROUNDS,
        progress=progress,
    )
