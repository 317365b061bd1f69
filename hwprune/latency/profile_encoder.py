"""Profile a BERT-family encoder: one latency per head count, per FFN width, plus the base.

Method (why it is shaped this way):

* Blocks are the real :class:`~hwprune.models.encoder.Attention` / ``FeedForward`` modules with the kept
  size, exported by :func:`~hwprune.export.onnx_io.to_onnx` with the model's dynamic axes, so ORT sees
  (and fuses) the same subgraphs it sees in an exported pruned model. Attention blocks get their mask
  from ``attention_mask`` through ``Encoder.extended_mask``, as in the model.
* A block alone is too short to time against the fixed cost of one ``session.run`` (feed copies,
  output allocation, dispatch). Each size is therefore timed as a *chain* of ``R`` copies with their own
  random weights (``R`` = layers, capped by a weight budget, so weights stream from cache as they do in
  the model) behind the model's embeddings, and the embeddings alone are timed for the fixed cost:
  ``block = (T_chain - T_empty) / R``. The embeddings matter for the graph, see :class:`_Chain`.
* ``base`` is what is left of the measured *dense model*: ``T_dense - L * (heads(H) + ffn(F))``. It holds
  embeddings, mask, session overhead and any context effect at the dense point, so the additive model
  reproduces the dense latency exactly and errors can only come from how sizes *differ* from dense.
* All graphs are timed interleaved, round-robin in shuffled order, and medians are taken over every
  round: load from other processes then shifts all sizes alike instead of bending the curve.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
from torch import nn

from hwprune.errors import HwpruneError
from hwprune.export.onnx_io import to_onnx
from hwprune.latency._base import Backend, Timing
from hwprune.latency.backends import Runner, interleave
from hwprune.models.encoder import Attention, Embeddings, Encoder, EncoderConfig, FeedForward
from hwprune.space import PruningSpace

__all__ = ["measure", "chain_length", "profiled_sizes"]

_CHAIN_WEIGHT_BUDGET = 48 * 2**20  # bytes of fp32 weights per chain: keeps big models' chains in memory


class _Chain(nn.Module):
    """Embeddings, then ``R`` sublayers in sequence; attention chains compute the mask as the model does.

    The embeddings are there for the graph optimizer, not for their cost (the empty chain cancels
    it): ORT fuses ``Add + LayerNorm`` into SkipLayerNormalization only when it can prove both inputs
    have the same shape, which it can for a plain (batch, seq, hidden) graph input but not after the
    model's embeddings. A block fed straight from a graph input would be timed as a different graph.
    """

    def __init__(self, cfg: EncoderConfig, blocks: list[nn.Module], *, attention: bool) -> None:
        super().__init__()
        self.embeddings = Embeddings(cfg)
        self.blocks = nn.ModuleList(blocks)
        self.attention = attention

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(input_ids)
        if self.attention:
            mask = Encoder.extended_mask(attention_mask)
            for b in self.blocks:
                x = b(x, mask)
        else:
            for b in self.blocks:
                x = b(x)
        return x


def chain_length(cfg: EncoderConfig) -> int:
    ffn_bytes = 2 * cfg.hidden_size * cfg.intermediate_size * 4
    return int(max(2, min(cfg.num_layers, _CHAIN_WEIGHT_BUDGET // max(ffn_bytes, 1))))


def profiled_sizes(cfg: EncoderConfig, space: PruningSpace) -> tuple[list[int], list[int]]:
    """Every head count 0..H; every FFN size of the space's grid, plus 0 and full."""
    ffn = {0, cfg.intermediate_size}
    for u in space.units:
        if u.kind == "ffn":
            ffn.update(u.sizes)
    return list(range(cfg.num_heads + 1)), sorted(ffn)


def _graphs(adapter: Any, heads: list[int], ffn: list[int], *, r: int, batch: int,
            seq: int) -> list[tuple[str, int, Callable[[], tuple[bytes, dict[str, np.ndarray]]]]]:
    """(kind, size, build) for every graph to time; ``build`` exports lazily to spread the progress bar."""
    cfg: EncoderConfig = adapter.config
    # a small vocabulary: gathering ``seq`` rows costs the same, and 40 graphs need not hold 40 tables
    small = replace(cfg.dense(), vocab_size=min(cfg.vocab_size, 2048))
    dense_inputs = adapter.example_inputs(batch=batch, seq=seq)
    inputs = {"input_ids": dense_inputs["input_ids"] % small.vocab_size, "attention_mask": dense_inputs["attention_mask"]}
    ax = {0: "batch", 1: "seq"}

    def chain(kind: str, size: int) -> tuple[bytes, dict[str, np.ndarray]]:
        torch.manual_seed(size)
        if kind == "heads":
            blocks: list[nn.Module] = [Attention(cfg.hidden_size, size, cfg.head_dim, cfg.layer_norm_eps)
                                       for _ in range(r)]
        else:
            blocks = [FeedForward(cfg.hidden_size, size, cfg.layer_norm_eps) for _ in range(r)] if kind == "ffn" else []
        model = _Chain(small, blocks, attention=kind == "heads")
        onnx = to_onnx(model, inputs, output_names=["y"], dynamic_axes={**{k: ax for k in inputs}, "y": ax})
        return onnx, {k: v.numpy() for k, v in inputs.items()}

    def dense() -> tuple[bytes, dict[str, np.ndarray]]:
        _, outs, dyn = adapter.onnx_io()
        onnx = to_onnx(adapter.dense(), dense_inputs, output_names=outs, dynamic_axes=dyn)
        return onnx, {k: v.numpy() for k, v in dense_inputs.items()}

    out: list[tuple[str, int, Callable[[], tuple[bytes, dict[str, np.ndarray]]]]] = [
        ("dense", -1, dense), ("empty", 0, lambda: chain("empty", 0))]
    out += [("heads", k, lambda k=k: chain("heads", k)) for k in heads]
    out += [("ffn", n, lambda n=n: chain("ffn", n)) for n in ffn]
    return out


def measure(adapter: Any, backend: Backend, *, batch: int, seq: int, space: PruningSpace, progress: bool = True,
            budget_s: float = 120.0) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Time every block size of ``adapter`` on ``backend``; returns (table frame, meta)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    cfg: EncoderConfig = adapter.config
    prepare = getattr(backend, "prepare", None)
    if prepare is None:
        raise HwpruneError(f"runtime {backend.name} cannot profile yet (no prepare()); use --runtime ort-cpu")
    heads, ffn = profiled_sizes(cfg, space)
    r = chain_length(cfg)
    specs = _graphs(adapter, heads, ffn, r=r, batch=batch, seq=seq)
    runners: list[Runner] = []
    cols = (TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    t0 = time.perf_counter()
    with Progress(*cols, disable=not progress, transient=False) as bar:
        t_build = bar.add_task(f"export {len(specs)} graphs", total=len(specs))
        for kind, size, build in specs:
            onnx, feed = build()
            runners.append(prepare(onnx, feed))
            bar.advance(t_build)
        t_export = time.perf_counter() - t0
        t_time = bar.add_task(f"time chains of {r} (~{budget_s:.0f} s)", total=100)
        timings = interleave(runners, seconds=budget_s, min_rounds=15, common_mode=True,
                             on_round=lambda f: bar.update(t_time, completed=100 * f))
    meta = _meta(specs, timings, r=r, rounds=timings[0].n)
    meta.update(export_seconds=round(t_export, 1), clock="thread-cpu" if getattr(backend, "cpu_clock", False) else "wall")
    return _frame(specs, timings, cfg=cfg, r=r), meta


def _frame(specs: list[tuple[str, int, Any]], timings: list[Timing], *, cfg: EncoderConfig, r: int) -> pd.DataFrame:
    by = {(k, s): t for (k, s, _), t in zip(specs, timings)}
    over = by[("empty", 0)].median_ms
    rows: list[dict[str, Any]] = []
    for (kind, size), t in by.items():
        if kind in ("heads", "ffn"):
            rows.append({"kind": kind, "key": "", "size": size, "size2": -1, "median_ms": (t.median_ms - over) / r,
                         "p10_ms": (t.p10_ms - over) / r, "p90_ms": (t.p90_ms - over) / r, "n": t.n})
    cost = {(row["kind"], row["size"]): row["median_ms"] for row in rows}
    layers = cfg.num_layers * (cost[("heads", cfg.num_heads)] + cost[("ffn", cfg.intermediate_size)])
    d = by[("dense", -1)]
    rows.insert(0, {"kind": "base", "key": "", "size": 0, "size2": -1, "median_ms": d.median_ms - layers,
                    "p10_ms": d.p10_ms - layers, "p90_ms": d.p90_ms - layers, "n": d.n})
    return pd.DataFrame(rows)


def _meta(specs: list[tuple[str, int, Any]], timings: list[Timing], *, r: int, rounds: int) -> dict[str, Any]:
    by = {k: t for (k, _, _), t in zip(specs, timings) if k in ("dense", "empty")}
    return {"method": "chains of R blocks minus an empty graph; base = dense - sum of dense blocks; interleaved",
            "chain_len": r, "rounds": rounds, "dense_ms": by["dense"].to_json(), "empty_ms": by["empty"].to_json()}
