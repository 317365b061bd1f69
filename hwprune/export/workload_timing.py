"""Measured serving figures of a decode graph: time to first token, decode step, tokens/s, request latency.

Family-agnostic: it reads only the graph's own inputs (see :mod:`hwprune.generate` for the convention:
``input_ids``, ``attention_mask``, ``past_key_values.*`` whose first axis is the batch and whose other
named axis is the past length). For each model (the dense one included) two sessions are loaded, in
mirrored creation order as :mod:`hwprune.export.measure` does (m0, m1, ..., mN, mN', ..., m1', m0': an
effect of when a session was made cancels in the mean of a model's two); on each, one runner per feed:
the prompt (an empty past, ``prompt`` tokens: time to first token) and one new token after a KV cache
of each sampled context (the request's first, middle and last). All runners of all models are timed
together in shuffled interleaved rounds (:func:`~hwprune.latency.backends.interleave`), so load from
other tenants lands on every model alike; a model's figure per feed is the mean of its two sessions'
medians, and its second session against its first (``control_pct``, on the mean decode step) is, for the
dense model, the dense-vs-dense control. The mean decode step over the request's contexts is
interpolated linearly between the sampled ones (attention reads a cache that grows linearly).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hwprune.errors import HwpruneError
from hwprune.latency._base import Backend, get_backend
from hwprune.latency.backends import Runner, interleave
from hwprune.latency.predictor import context_weights
from hwprune.search.workload import Workload

if TYPE_CHECKING:
    from hwprune.families._base import Family

__all__ = [
    "measure_workload",
    "sampled_contexts",
    "decode_graph",
    "step_runners",
    "MirroredSteps",
    "graph_inputs",
    "step_feed",
]

PAST = "past_key_values."


def sampled_contexts(workload: Workload) -> list[int]:
    """The request's first, middle and last decode contexts (fewer when they coincide)."""
    ctx = workload.decode_contexts()
    return sorted({ctx[0], ctx[len(ctx) // 2], ctx[-1]})


def graph_inputs(data: bytes) -> tuple[dict[str, list[int | str]], int]:
    """Graph input name -> dims (int or axis name), and the vocabulary size (last dim of the first output)."""
    import onnx

    g = onnx.load_model_from_string(data).graph
    dims = {i.name: [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim] for i in g.input}
    vocab = g.output[0].type.tensor_type.shape.dim[-1].dim_value
    return dims, int(vocab or 2)


def step_feed(
    dims: Mapping[str, list[int | str]], vocab: int, *, batch: int, past: int, seq: int
) -> dict[str, np.ndarray]:
    """A feed of ``seq`` new tokens after ``past`` cached positions (zeros), for a graph with ``dims``."""
    ids = (np.arange(batch * seq, dtype=np.int64).reshape(batch, seq) % max(vocab - 3, 1)) + min(3, vocab - 1)
    feed = {"input_ids": ids, "attention_mask": np.ones((batch, past + seq), dtype=np.int64)}
    for name, d in dims.items():
        if name.startswith(PAST):
            shape = [x if isinstance(x, int) and x > 0 else (batch if k == 0 else past) for k, x in enumerate(d)]
            feed[name] = np.zeros(shape, dtype=np.float32)
    return {k: v for k, v in feed.items() if k in dims}


def decode_graph(adapter: "Family", model: Any) -> bytes:
    """``model``'s one-step decode graph with its KV cache (the family's ``extra_graphs`` role ``decode``)."""
    g = next((g for g in adapter.extra_graphs(model) if g.role == "decode"), None)
    if g is None:
        raise HwpruneError(
            f"{adapter.family} models have no decode graph; decode and serve timing (--regime decode|serve) is for LLMs"
        )
    return g.onnx


def step_runners(
    backend: Backend, onnx: bytes, contexts: Sequence[int], batch: int, *, prompt: int = 0, key: str = ""
) -> list[Runner]:
    """One session of ``onnx``, one runner per context: one new token after ``context`` cached positions;
    with ``prompt``, first a runner for the prompt of that many tokens with an empty cache (TTFT).
    ``key`` names the graph in the error lines."""
    dims, vocab = graph_inputs(onnx)
    if "input_ids" not in dims:
        raise HwpruneError(f"{key + ': ' if key else ''}the decode graph has no input_ids; re-export")
    feeds = [step_feed(dims, vocab, batch=batch, past=0, seq=prompt)] if prompt else []
    feeds += [step_feed(dims, vocab, batch=batch, past=c, seq=1) for c in contexts]
    first = backend.prepare(onnx, feeds[0])
    if first is None:
        raise HwpruneError(f"runtime {backend.name} cannot time decode steps (no runner); use --runtime ort-cpu")
    return [first, *(Runner(first.session, f, cpu_clock=backend.cpu_clock) for f in feeds[1:])]


@dataclass
class MirroredSteps:
    """Two sessions per graph, created in mirrored order (g0, g1, ..., gN, gN', ..., g1', g0'), each with
    :func:`step_runners`' runners (one per feed). ``runners`` is every runner, in creation order, for
    :func:`~hwprune.latency.backends.interleave`; :meth:`pairs` reads its timings back per graph."""

    order: list[int]  # graph index of each session, in creation order
    sessions: list[list[Runner]]  # per session: its runner per feed

    @classmethod
    def create(
        cls, backend: Backend, graphs: Sequence[bytes], contexts: Sequence[int], batch: int, *, prompt: int = 0,
        keys: Sequence[str] = (),
    ) -> "MirroredSteps":  # fmt: skip
        order = list(range(len(graphs)))
        order += order[::-1]
        key = [keys[g] if keys else "" for g in order]
        sessions = [step_runners(backend, graphs[g], contexts, batch, prompt=prompt, key=k) for g, k in zip(order, key)]
        return cls(order, sessions)

    @property
    def runners(self) -> list[Runner]:
        return [r for s in self.sessions for r in s]

    def of(self, graph: int, feed: int) -> list[Runner]:
        """Graph ``graph``'s two runners of feed ``feed``, first-created first."""
        return [s[feed] for g, s in zip(self.order, self.sessions) if g == graph]

    def pairs(self, timings: Sequence[Any]) -> dict[tuple[int, int], list[float]]:
        """(graph, feed) -> [its first session's median ms, its second's], from ``interleave(self.runners)``."""
        out: dict[tuple[int, int], list[float]] = {}
        it = iter(timings)
        for g, s in zip(self.order, self.sessions):
            for f in range(len(s)):
                out.setdefault((g, f), []).append(next(it).median_ms)
        return out


def measure_workload(
    backend: Backend,
    graphs: Mapping[str, bytes],
    workload: Workload,
    *,
    rounds: int = 5,
    repeats: int = 10,
    warmup: int = 3,
) -> dict[str, dict[str, Any]]:
    """Per model key: ``ttft_ms``, ``decode_ms`` {context: ms}, ``decode_step_ms`` (mean over the request),
    ``tokens_per_s``, ``request_ms`` (ttft + every decode step), all medians on the backend's clock (the
    mean of the model's two sessions); ``control_pct``: its second session's mean step against its first.
    Memory: two sessions per model are held for the whole call."""
    contexts = sampled_contexts(workload)
    b = workload.batch
    keys = list(graphs)
    mirrored = MirroredSteps.create(backend, [graphs[k] for k in keys], contexts, b, prompt=workload.prompt, keys=keys)
    pairs = mirrored.pairs(interleave(mirrored.runners, rounds=rounds, per_round=repeats, warmup=warmup))
    # feed 0 is the prompt (TTFT), feed 1 + i the i-th context
    per = {(keys[g], None if f == 0 else contexts[f - 1]): ms for (g, f), ms in pairs.items()}
    ctx = workload.decode_contexts()
    n_steps = len(ctx) if workload.new > 1 else 0

    def step_of(decode_ms: Mapping[int, float]) -> float:
        return sum(sum(w * decode_ms[g] for g, w in context_weights(contexts, c).items()) for c in ctx) / len(ctx)

    out: dict[str, dict[str, Any]] = {}
    for key in keys:
        sessions = [{c: per[(key, c)][i] for c in contexts} for i in (0, 1)]
        decode = {c: float(np.mean(per[(key, c)])) for c in contexts}
        step = step_of(decode)
        ttft = float(np.mean(per[(key, None)]))
        out[key] = {
            "ttft_ms": ttft,
            "decode_ms": {str(c): v for c, v in decode.items()},
            "decode_step_ms": step,
            "tokens_per_s": 1e3 * b / step,
            "request_ms": ttft + n_steps * step,
            "contexts_timed": contexts,
            "clock": backend.clock,
            "session_order": "mirrored",
            "sessions_decode_step_ms": [step_of(s) for s in sessions],
            "sessions_ttft_ms": list(per[(key, None)]),
            "control_pct": 100.0 * (step_of(sessions[1]) / step_of(sessions[0]) - 1),
        }
    return out


def measure_workloads(
    backend: Backend,
    graphs: Mapping[str, bytes],
    workloads: Sequence[Workload],
    *,
    rounds: int = 5,
    repeats: int = 10,
    warmup: int = 3,
) -> list[dict[str, dict[str, Any]]]:
    """:func:`measure_workload` for each workload, in a new process that runs ONNX Runtime only (as a
    deployed model's does, and as the decode profile times its anchors: :mod:`hwprune.latency.worker`);
    in this process for a backend a new process cannot rebuild by name."""
    from hwprune.latency.worker import graph_files, in_worker, rebuildable

    if not rebuildable(backend):
        return [measure_workload(backend, graphs, w, rounds=rounds, repeats=repeats, warmup=warmup) for w in workloads]
    with graph_files(graphs) as paths:
        job = (backend.name, backend.threads, paths, list(workloads), rounds, repeats, warmup)
        return in_worker(_measure_workloads_from_files, *job)


def _measure_workloads_from_files(
    runtime: str,
    threads: int,
    paths: Mapping[str, str],
    workloads: Sequence[Workload],
    rounds: int,
    repeats: int,
    warmup: int,
) -> list[dict[str, dict[str, Any]]]:
    backend = get_backend(runtime, threads=threads)
    graphs = {k: Path(p).read_bytes() for k, p in paths.items()}
    return [measure_workload(backend, graphs, wl, rounds=rounds, repeats=repeats, warmup=warmup) for wl in workloads]
