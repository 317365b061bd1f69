"""Profile a BERT-family encoder: one latency per head count, per FFN width, plus the base.

Method (why it is shaped this way):

* Blocks are the real :class:`~hwprune.families.encoder.model.Attention` / ``FeedForward`` modules with the kept
  size behind the real ``Embeddings``, exported by :func:`~hwprune.export.onnx_io.to_onnx` with the
  model's dynamic axes, so ORT optimizes them as it does an exported pruned model. This matters: a
  FeedForward fed from a plain graph input gets ``Add + LayerNorm`` fused into SkipLayerNormalization,
  which inside the model it never does (shapes are unknown after the embeddings), and the fused kernel
  is ~10 % slower on this CPU. Attention takes its mask through ``Encoder.extended_mask`` as in the model.
* A block alone is too short to time against the fixed cost of one ``session.run`` (feed copies,
  output allocation, dispatch). Each size is timed as a *chain*: the embeddings, then ``R`` copies of the
  block with their own random weights (``R`` = the model's layers, capped by a weight budget, so weights
  stream from cache as in the model); the embeddings alone are timed too, and
  ``block = (T_chain - T_empty) / R`` counts the per-run cost zero times. (Chains of whole layers, each
  size beside a full neighbour, were tried: same accuracy on real subnets, but the small sizes come out
  of differences of long graphs and are several times noisier for the same time budget.)
* ``base`` is the embeddings with the real vocabulary plus the per-run cost, timed on its own rather
  than as ``dense - sum(blocks)``: that would push every error of the block sums into the base, and a
  subnet pruned to almost nothing is mostly base. The dense model is timed too;
  ``meta.dense_error_pct`` says how well the sum reproduces it. Chains use a small vocabulary (same
  gather cost, far less memory for ~40 graphs).
* All graphs are timed interleaved, round-robin in shuffled order, each round divided by its load
  factor (``interleave(common_mode=True)``), medians over the rounds: load from other processes then
  shifts all sizes alike instead of bending the curve.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import pandas as pd
import torch
from torch import nn

from hwprune.errors import HwpruneError
from hwprune.export.onnx_io import to_onnx
from hwprune.families.encoder.model import Attention, Embeddings, Encoder, EncoderConfig, FeedForward
from hwprune.latency._base import Backend, Timing
from hwprune.latency.backends import OrtCpuBackend, Runner, time_profile
from hwprune.space import PruningSpace

__all__ = ["measure", "prepare", "Profiling", "chain_length", "profiled_sizes"]

_CHAIN_WEIGHT_BUDGET = 48 * 2**20  # bytes of fp32 layer weights per chain: big models get short chains
_CHAIN_VOCAB = 2048
_ROUNDS = 300  # enough for ~0.3 % median noise on a shared core; small models stop here, big ones at budget_s


def chain_length(cfg: EncoderConfig) -> int:
    """Blocks per chain: the model's layer count, fewer when that many layers' weights pass the budget."""
    h, d = cfg.hidden_size, cfg.num_heads * cfg.head_dim
    layer_bytes = 4 * (4 * h * d + 2 * h * cfg.intermediate_size)
    return int(max(2, min(cfg.num_layers, _CHAIN_WEIGHT_BUDGET // max(layer_bytes, 1))))


def profiled_sizes(cfg: EncoderConfig, space: PruningSpace) -> tuple[list[int], list[int]]:
    """Every head count 0..H; every FFN size of the space's grid, plus 0 and full."""
    ffn = {0, cfg.intermediate_size}
    for u in space.units:
        if u.kind == "ffn":
            ffn.update(u.sizes)
    return list(range(cfg.num_heads + 1)), sorted(ffn)


class _Chain(nn.Module):
    """Embeddings, then ``blocks`` in sequence (the mask computed as :class:`Encoder` does)."""

    def __init__(self, cfg: EncoderConfig, blocks: list[nn.Module], *, attention: bool) -> None:
        super().__init__()
        self.embeddings = Embeddings(cfg)
        self.blocks = nn.ModuleList(blocks)
        self.attention = attention

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(input_ids)
        mask = Encoder.extended_mask(attention_mask) if self.attention else None
        for b in self.blocks:
            x = b(x, mask) if self.attention else b(x)
        return x


@dataclass
class Profiling:
    """The graphs of one profile, loaded and ready to time: ``kinds[i], sizes[i]`` name ``runners[i]``.

    Kinds: ``dense`` (the real model, for the self-check), ``base``, ``empty``, ``heads``, ``ffn``. Split
    from :func:`measure` so a benchmark can time these runners in the same rounds as its own.
    """

    cfg: EncoderConfig
    r: int
    kinds: list[str]
    sizes: list[int]
    runners: list[Runner]

    def frame(self, timings: Sequence[Timing]) -> pd.DataFrame:
        by = {(k, s): t for k, s, t in zip(self.kinds, self.sizes, timings, strict=True)}
        e, b = by[("empty", 0)].median_ms, by[("base", 0)]
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
        # p10/p90 of a block: its chain's, per block (the empty graph's spread is negligible)
        rows += [
            {
                "kind": kind,
                "key": "",
                "size": size,
                "size2": -1,
                "median_ms": (t.median_ms - e) / self.r,
                "p10_ms": (t.p10_ms - e) / self.r,
                "p90_ms": (t.p90_ms - e) / self.r,
                "n": t.n,
            }
            for (kind, size), t in by.items()
            if kind in ("heads", "ffn")
        ]
        return pd.DataFrame(rows)

    def networks(self) -> list[dict[str, int] | None]:
        """Only the dense model is a whole network of the space; the rest are chains of blocks."""
        c = self.cfg
        dense = {
            f"layer.{i}.{k}": n
            for i in range(c.num_layers)
            for k, n in (("heads", c.num_heads), ("ffn", c.intermediate_size))
        }
        return [dict(dense) if k == "dense" else None for k in self.kinds]

    def meta(self, timings: Sequence[Timing]) -> dict[str, Any]:
        f = self.frame(timings).set_index(["kind", "size"])["median_ms"]
        c = self.cfg
        predicted = f[("base", 0)] + c.num_layers * (f[("heads", c.num_heads)] + f[("ffn", c.intermediate_size)])
        dense = next(t for k, t in zip(self.kinds, timings) if k == "dense")
        return {
            "method": "chains of R blocks behind the embeddings minus the embeddings alone; interleaved rounds, "
            "common-mode load removed, medians",
            "chain_len": self.r,
            "rounds": dense.n,
            "dense_ms": dense.to_json(),
            "dense_predicted_ms": round(float(predicted), 4),
            "dense_error_pct": round(float(100 * (predicted - dense.median_ms) / dense.median_ms), 3),
        }


def prepare(
    adapter: Any, backend: Backend, *, batch: int, seq: int, space: PruningSpace, progress: bool = True
) -> Profiling:
    """Export and load every graph of the profile (dense model, base, empty chain, the chains)."""
    from rich.progress import Progress

    if not isinstance(backend, OrtCpuBackend):  # runners with one held session per graph
        raise HwpruneError(f"runtime {backend.name} cannot profile yet; use --runtime ort-cpu (or ort-cuda)")
    cfg: EncoderConfig = adapter.config.dense()
    heads, ffn = profiled_sizes(cfg, space)
    r = chain_length(cfg)
    small = replace(cfg, vocab_size=min(cfg.vocab_size, _CHAIN_VOCAB))
    real = adapter.example_inputs(batch=batch, seq=seq)
    ids = {"input_ids": real["input_ids"] % small.vocab_size, "attention_mask": real["attention_mask"]}
    _, outs, dyn = adapter.onnx_io()

    def chain(kind: str, size: int) -> tuple[bytes, dict[str, torch.Tensor]]:
        with torch.random.fork_rng():  # random weights, without touching the caller's RNG
            torch.manual_seed(size)
            if kind == "heads":
                blocks: list[nn.Module] = [
                    Attention(cfg.hidden_size, size, cfg.head_dim, cfg.layer_norm_eps) for _ in range(r)
                ]
            else:
                blocks = [
                    FeedForward(cfg.hidden_size, size, cfg.layer_norm_eps) for _ in range(r if kind == "ffn" else 0)
                ]
            model = _Chain(cfg if kind == "base" else small, blocks, attention=kind == "heads").eval()
        inputs = real if kind == "base" else ids
        return to_onnx(model, inputs, output_names=outs, dynamic_axes=dyn), inputs

    todo: list[tuple[str, int, Callable[[], tuple[bytes, dict[str, torch.Tensor]]]]] = [
        ("dense", -1, lambda: (to_onnx(adapter.dense(), real, output_names=outs, dynamic_axes=dyn), real)),
        ("base", 0, lambda: chain("base", 0)),
        ("empty", 0, lambda: chain("empty", 0)),
    ]
    todo += [("heads", k, functools.partial(chain, "heads", k)) for k in heads]
    todo += [("ffn", n, functools.partial(chain, "ffn", n)) for n in ffn]
    runners: list[Runner] = []
    with Progress(disable=not progress, transient=False) as bar:
        task = bar.add_task(f"export {len(todo)} graphs", total=len(todo))
        for _, _, build in todo:
            onnx, inputs = build()
            feed = {k: v.numpy() for k, v in inputs.items()}
            runners.append(backend.prepare(onnx, feed))
            bar.advance(task)
    return Profiling(cfg=cfg, r=r, kinds=[k for k, _, _ in todo], sizes=[s for _, s, _ in todo], runners=runners)


def measure(
    adapter: Any,
    backend: Backend,
    *,
    batch: int,
    seq: int,
    space: PruningSpace,
    progress: bool = True,
    budget_s: float | None = None,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Time every block size of ``adapter`` on ``backend`` for about ``budget_s`` s; returns (frame, meta).

    Stops after 300 rounds (median noise ~0.3 % on a shared core) or ``budget_s``: MiniLM needs about
    120 s for 300 rounds on one idle core, which keeps a profile with export under 3 minutes.
    """
    return time_profile(
        functools.partial(prepare, adapter, backend, batch=batch, seq=seq, space=space, progress=progress),
        backend,
        budget_s=120.0 if budget_s is None else budget_s,
        rounds=_ROUNDS,
        progress=progress,
    )
