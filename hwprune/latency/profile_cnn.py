"""Profile a CNN: every conv's latency over a grid of (input, output) widths, measured *inside* whole
pruned networks by ONNX Runtime's per-node profiler.

Why inside networks: a conv timed alone pays layout conversions at its graph's edges (ORT's NCHWc
reorders) and runs on hot caches; summed over resnet50 that overestimates the network by ~20 %. Inside
the network each conv's kernel time includes what ORT fuses into it there (BatchNorm, activation, the
residual add) and the cache state it really sees.

Design (why a handful of networks covers every conv's grid): each unit gets K width levels from its
space sizes (min .. full) and a colour c_u in Z_K such that the input and output units of every conv
differ. Network (a, b) in Z_K^2 sets unit u to level (a + b c_u) mod K. For a conv reading p and
writing q, (a + b c_p, a + b c_q) runs over all of Z_K^2 (K prime, c_p != c_q), so K^2 networks put
every conv at every (c_in, c_out) level pair, however many convs there are; b = 0 are uniform networks
and (K-1, 0) is the dense model. Repeated shapes (resnet50's blocks) are measured many times over.

``base`` = dense latency in a plain session - the dense convs' entries: pooling, fixed layers outside
any unit, graph-edge reorders and the per-run overhead, counted once, not per conv.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from hwprune.errors import HwpruneError
from hwprune.export.onnx_io import to_onnx
from hwprune.latency._base import Backend
from hwprune.latency.backends import Runner, interleave
from hwprune.space import PruningSpace
from hwprune.surgery.cnn_graph import LayerInfo

__all__ = ["measure", "design", "unit_levels", "layer_sizes", "layers_meta"]

_PRIMES = (2, 3, 5, 7, 11, 13)
_BLOCK = 16  # channel block of ORT's NCHWc kernels on AVX-512; shapes are compared after rounding up to it


def unit_levels(space: PruningSpace, k: int) -> dict[str, tuple[int, ...]]:
    """K sizes per unit spread over its allowed sizes, smallest and full included."""
    out = {}
    for u in space.units:
        s = u.sizes
        out[u.name] = tuple(sorted({s[round(i * (len(s) - 1) / max(k - 1, 1))] for i in range(k)}))
    return out


def _colour(layers: Sequence[LayerInfo], names: set[str], k: int) -> dict[str, int] | None:
    """Greedy colouring of units so every conv's input and output units differ; None if K is too few."""
    nbr: dict[str, set[str]] = {n: set() for n in names}
    for l in layers:
        p, q = l.in_group, l.out_group
        if p in names and q in names and p != q:
            nbr[p].add(q)
            nbr[q].add(p)
    col: dict[str, int] = {}
    for n in sorted(names, key=lambda n: (-len(nbr[n]), n)):
        used = {col[m] for m in nbr[n] if m in col}
        free = [c for c in range(k) if c not in used]
        if not free:
            return None
        col[n] = free[0]
    return col


def design(space: PruningSpace, layers: Sequence[LayerInfo], *, levels: int = 5) -> tuple[int, list[dict[str, int]]]:
    """(K, networks): each network maps every prunable unit to a kept size (see module doc)."""
    names = {u.name for u in space.units if len(u.sizes) > 1}
    for k in (p for p in _PRIMES if p >= min(levels, 13)):
        col = _colour(layers, names, k)
        if col is not None:
            break
    else:  # pragma: no cover - needs a unit adjacent to 13 others pairwise adjacent
        raise HwpruneError("cannot colour the conv graph for profiling; report the model")
    lv = unit_levels(space, k)
    nets = []
    for b in range(k):
        for a in range(k):
            nets.append({u.name: lv[u.name][min((a + b * col.get(u.name, 0)) % k, len(lv[u.name]) - 1)]
                         if u.name in names else u.full for u in space.units})
    return k, nets


def layer_sizes(layer: LayerInfo, sizes: dict[str, int]) -> tuple[int, int]:
    """(c_in, c_out) of ``layer`` when units keep ``sizes`` (units absent from ``sizes`` stay full)."""
    ci = sizes[layer.in_group] * layer.in_mult if layer.in_group in sizes else layer.c_in
    co = sizes[layer.out_group] if layer.out_group in sizes else layer.c_out
    return (ci, ci) if layer.kind == "dw" else (ci, co)


def _pad(c: int) -> int:
    return -(-c // _BLOCK) * _BLOCK


def _layer_key(layer: LayerInfo, ci: int, co: int) -> tuple[Any, ...]:
    if layer.kind == "linear":
        return ("linear", _pad(ci), _pad(co))
    (h, w), (kh, kw), (sh, sw), (ph, pw) = layer.in_hw, layer.kernel, layer.stride, layer.padding
    out_hw = ((h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1)
    return ("conv", _pad(ci), _pad(co), layer.kernel, layer.in_hw, out_hw, layer.kind == "dw")


def _node_key(op: str, ins: list[list[int]], outs: list[list[int]]) -> tuple[Any, ...] | None:
    """The same key for an ORT node, from the shapes its profiler reports (channels may be padded)."""
    if op in ("Conv", "FusedConv") and len(ins) >= 2 and len(ins[0]) == 4 and len(ins[1]) == 4:
        x, w = ins[0], ins[1]
        dw = w[1] == 1 and w[0] >= x[1] > 1
        y = outs[0] if outs and len(outs[0]) == 4 else [0, 0, 0, 0]
        return ("conv", _pad(x[1]), _pad(x[1] if dw else w[0]), (w[2], w[3]), (x[2], x[3]), (y[2], y[3]), dw)
    if op in ("Gemm", "MatMul", "FusedMatMul", "FusedGemm") and ins and outs and len(ins[0]) == 2:
        return ("linear", _pad(ins[0][1]), _pad(outs[0][-1]))
    return None


def _node_times(path: str, skip: int) -> tuple[dict[tuple[Any, ...], list[float]], float]:
    """Median kernel time (ms) of every matched node, by key; plus the summed time of unmatched nodes."""
    events = json.loads(Path(path).read_text())
    durs: dict[str, list[float]] = defaultdict(list)
    info: dict[str, tuple[Any, ...] | None] = {}
    for e in events:
        if e.get("cat") != "Node" or not str(e.get("name", "")).endswith("_kernel_time"):
            continue
        n = e["name"]
        durs[n].append(e["dur"] / 1000.0)
        if n not in info:
            a = e.get("args", {})
            shapes = [[list(d.values())[0] for d in a.get(k, [])] for k in ("input_type_shape", "output_type_shape")]
            info[n] = _node_key(str(a.get("op_name", "")), shapes[0], shapes[1])
    by: dict[tuple[Any, ...], list[float]] = defaultdict(list)
    rest = 0.0
    for n, d in durs.items():
        med = float(np.median(d[skip:] if len(d) > skip else d))
        if info[n] is None:
            rest += med
        else:
            by[info[n]].append(med)  # type: ignore[index]
    return by, rest


def _session(backend: Backend, onnx: bytes, prefix: str) -> Any:
    if not hasattr(backend, "session_options"):
        raise HwpruneError(f"runtime {backend.name} cannot profile CNNs (needs ONNX Runtime's node profiler); "
                           "use --runtime ort-cpu or ort-cuda")
    import onnxruntime as ort

    so = backend.session_options()  # type: ignore[attr-defined]
    so.enable_profiling, so.profile_file_prefix = True, prefix
    return ort.InferenceSession(onnx, so, providers=list(backend.providers))  # type: ignore[attr-defined]


def measure(adapter: Any, backend: Backend, *, batch: int, seq: int = 0, space: PruningSpace,
            progress: bool = True, levels: int = 5, chunk: int = 9, budget_s: float = 150.0) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Profile ``adapter`` (a :class:`~hwprune.models.cnn.CnnAdapter`) on ``backend``: (table frame, meta)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if batch != adapter.input_shape[0]:
        raise HwpruneError(f"--batch {batch} differs from the batch of --input-shape "
                           f"{','.join(map(str, adapter.input_shape))}; set the batch in --input-shape")
    layers = list(adapter.graph.layers)
    k, nets = design(space, layers, levels=levels)
    dense_model = adapter.dense()
    inputs = adapter.example_inputs(batch=batch)
    names_in, names_out, dyn = adapter.onnx_io()
    feed = {n: inputs[n].numpy() for n in names_in}

    def export(sizes: dict[str, int] | None) -> bytes:
        m = dense_model
        if sizes is not None and any(sizes[u.name] != u.full for u in space.units):
            m = adapter.prune(dense_model, adapter.plan({n: range(s) for n, s in sizes.items()}))
        return to_onnx(m, inputs, output_names=names_out, dynamic_axes=dyn)

    dense_onnx = export(None)
    samples: dict[tuple[str, int, int], list[float]] = defaultdict(list)
    dense_rounds: list[float] = []
    unmatched, rest_ms, total_rounds = 0, [], 0
    cols = (TextColumn("{task.description:<30}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    n_chunks = -(-len(nets) // chunk)
    with Progress(*cols, disable=not progress) as bar, tempfile.TemporaryDirectory(prefix="hwprune-prof-") as tmp:
        t_exp = bar.add_task(f"prune+export {len(nets)} networks", total=len(nets))
        t_time = bar.add_task(f"time {n_chunks} chunks", total=n_chunks)
        for c0 in range(0, len(nets), chunk):
            part = nets[c0:c0 + chunk]
            sessions = []
            for i, sizes in enumerate(part):
                sessions.append(_session(backend, export(sizes), f"{tmp}/n{c0 + i}"))
                bar.advance(t_exp)
            runners = [Runner(s, feed) for s in sessions] + [backend.prepare(dense_onnx, feed)]  # type: ignore[attr-defined]
            t0 = time.perf_counter()
            interleave(runners, rounds=1, warmup=2)
            rounds = int(np.clip(budget_s / n_chunks / max(time.perf_counter() - t0, 1e-3), 8, 200))
            timings = interleave(runners, rounds=rounds, warmup=0, seed=c0)
            total_rounds += rounds
            dense_rounds.append(timings[-1].median_ms)
            for sizes, sess in zip(part, sessions):
                by, rest = _node_times(sess.end_profiling(), skip=3)
                rest_ms.append(rest)
                unmatched += _assign(layers, sizes, by, samples)
            del sessions, runners
            bar.advance(t_time)
    return _frame(layers, samples, dense_ms=float(np.median(dense_rounds)), space=space), {
        "method": "per-node ORT profiler inside K^2 pruned networks covering every conv's (c_in, c_out) level grid; "
                  "base = plain dense latency - dense convs",
        "levels": k, "networks": len(nets), "rounds": total_rounds, "dense_ms": float(np.median(dense_rounds)),
        "dense_rounds_ms": dense_rounds, "unmatched_layer_samples": unmatched,
        "other_nodes_ms_median": float(np.median(rest_ms)), "input_shape": list(adapter.input_shape),
        "layers": layers_meta(layers)}


def _assign(layers: Sequence[LayerInfo], sizes: dict[str, int], by: dict[tuple[Any, ...], list[float]],
            samples: dict[tuple[str, int, int], list[float]]) -> int:
    """Give each layer the mean time of the ORT nodes with its shape; returns layers left without one."""
    missing = 0
    for l in layers:
        ci, co = layer_sizes(l, sizes)
        t = by.get(_layer_key(l, ci, co))
        if not t:
            missing += 1
            continue
        samples[(l.name, ci, co)].append(float(np.mean(t)))
    return missing


def _frame(layers: Sequence[LayerInfo], samples: dict[tuple[str, int, int], list[float]], *, dense_ms: float,
           space: PruningSpace) -> pd.DataFrame:
    kind = {l.name: l.kind for l in layers}
    rows = [{"kind": kind[n], "key": n, "size": ci, "size2": co, "median_ms": float(np.median(v)),
             "p10_ms": float(np.percentile(v, 10)), "p90_ms": float(np.percentile(v, 90)), "n": len(v)}
            for (n, ci, co), v in sorted(samples.items())]
    dense = {u.name: u.full for u in space.units}
    missing = [l.name for l in layers if (l.name, *layer_sizes(l, dense)) not in samples]
    if missing:
        raise HwpruneError(f"profiling matched no ONNX Runtime node to layer {missing[0]!r}; this runtime fuses it "
                           "in a way hwprune does not read yet (report the model)")
    dense_sum = sum(float(np.median(samples[(l.name, *layer_sizes(l, dense))])) for l in layers)
    rows.insert(0, {"kind": "base", "key": "", "size": 0, "size2": -1, "median_ms": dense_ms - dense_sum,
                    "p10_ms": dense_ms - dense_sum, "p90_ms": dense_ms - dense_sum, "n": 1})
    return pd.DataFrame(rows)


def layers_meta(layers: Sequence[LayerInfo]) -> list[dict[str, Any]]:
    """What the predictor needs about each layer (stored in the table's sidecar)."""
    return [{"name": l.name, "kind": l.kind, "in_group": l.in_group, "out_group": l.out_group, "c_in": l.c_in,
             "c_out": l.c_out, "in_mult": l.in_mult} for l in layers]
