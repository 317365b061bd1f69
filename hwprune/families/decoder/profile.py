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

Decode regime (``context`` given): the same graphs as one-step decode graphs (:mod:`.decode`, exactly
what ``decoder.onnx`` is), each timed on one new token per row after a KV cache of ``context``
positions; an attention block's time then includes reading its cache, so it grows with the context.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch
from torch import nn

from hwprune.errors import HwpruneError
from hwprune.export.onnx_io import to_onnx
from hwprune.latency._base import Backend, Timing
from hwprune.latency.backends import OrtCpuBackend, Runner, time_profile
from hwprune.space import PruningSpace

from .config import DecoderConfig
from .decode import decode_feed, decode_onnx
from .model import Decoder, random_decoder

if TYPE_CHECKING:
    from .adapter import DecoderAdapter

__all__ = ["measure", "prepare", "DecoderProfiling", "chain_length", "profiled_sizes", "check_context"]

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
    cfg: DecoderConfig,
    inputs: dict[str, torch.Tensor],
    outs: list[str],
    dyn: dict[str, dict[int, str]],
    context: int | None = None,
) -> tuple[bytes, dict[str, torch.Tensor]]:
    """A random-weight graph of ``cfg`` and its timing feed: the prompt graph on ``inputs``, or (``context``
    given) the one-step decode graph on one new token after a cache of ``context`` positions."""
    with torch.random.fork_rng():  # weights do not change the time; keep the caller's RNG untouched
        model = random_decoder(cfg, seed=0).eval()
    if context is not None:
        return _decode_graph(model, batch=inputs["input_ids"].shape[0], context=context)
    return to_onnx(model, inputs, output_names=outs, dynamic_axes=dyn), inputs


def _decode_graph(model: nn.Module, *, batch: int, context: int) -> tuple[bytes, dict[str, torch.Tensor]]:
    assert isinstance(model, Decoder)
    return decode_onnx(model), decode_feed(model.config, batch=batch, past_len=context, seq=1)


def check_context(cfg: DecoderConfig, context: int) -> None:
    """A cache of ``context`` positions plus the new token must fit the model's positions."""
    if context < 1 or context + 1 > cfg.max_position:
        raise HwpruneError(
            f"--context {context}: a decode step after {context} cached tokens needs positions 1..{context + 1}; "
            f"this model has {cfg.max_position} (choose contexts from 1 to {cfg.max_position - 1})"
        )


def prepare(
    adapter: DecoderAdapter,
    backend: Backend,
    *,
    batch: int,
    seq: int,
    space: PruningSpace,
    progress: bool = True,
    context: int | None = None,
) -> DecoderProfiling:
    """Export and load every graph of the profile (dense, base, empty chain, the chains); with ``context``
    their one-step decode graphs, fed one new token after a KV cache of ``context`` positions."""
    from rich.progress import Progress

    if not isinstance(backend, OrtCpuBackend):  # runners with one held session per graph
        raise HwpruneError(f"runtime {backend.name} cannot profile yet; use --runtime ort-cpu (or ort-cuda)")
    cfg = adapter.config.dense()
    if context is not None:
        check_context(cfg, context)
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
            return _graph(c, real, outs, dyn, context)
        g = size if kind == "attn" else 0
        f = size if kind == "ffn" else 0
        c = small.with_sizes(kv_groups=(g,) * r, heads_per_group=(cfg.group_size if g else 0,) * r, ffn=(f,) * r)
        return _graph(c, ids, outs, dyn, context)

    def dense() -> tuple[bytes, dict[str, torch.Tensor]]:
        if context is not None:
            return _decode_graph(adapter.dense(), batch=batch, context=context)
        return to_onnx(adapter.dense(), real, output_names=outs, dynamic_axes=dyn), real

    todo: list[tuple[str, int, Callable[[], tuple[bytes, dict[str, torch.Tensor]]]]] = [
        ("dense", -1, dense),
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
    context: int | None = None,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Time every block size for about ``budget_s`` s (default 120) or 300 rounds; returns (frame, meta).
    ``context``: the decode regime, one new token after a KV cache of that many positions."""
    return time_profile(
        functools.partial(
            prepare, adapter, backend, batch=batch, seq=seq, space=space, progress=progress, context=context
        ),
        backend,
        budget_s=120.0 if budget_s is None else budget_s,
        rounds=_ROUNDS,
        progress=progress,
    )
