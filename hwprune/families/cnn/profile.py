"""Profile a CNN: every conv's latency over a grid of (input, output) widths, measured *inside* whole
pruned networks (see :mod:`hwprune.families.cnn.design` for which networks).

Why inside networks: a conv timed alone pays layout conversions at its graph's edges (ORT's NCHWc
reorders) and runs on hot caches; summed over resnet50 that overestimates the network by ~20 %. Inside
the network each conv's kernel time includes what ORT fuses into it there (BatchNorm, activation, the
residual add) and the cache state it really sees.

How a conv's time is read: each network is timed as a whole by the backend (interleaved rounds beside
the dense model and two other networks, as an export times a few sessions together; common-mode load
removed, thread-CPU clock on one thread), exactly as exports and benchmarks time models; ONNX Runtime's
node profiler, run on a profiling copy of each network, splits that time over
its nodes (median of 20 runs each): a conv's entry is its share of the node time times the network's
time; nodes reading a layer's output (pooling, layout conversions) count with that layer. ``base`` is
what the entries leave unexplained (median over the networks): layers outside any unit, the graph
input's conversion and the executor's per-run time, counted once.
"""

from __future__ import annotations

import json
import tempfile
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hwprune.errors import HwpruneError
from hwprune.export.onnx_io import to_onnx
from hwprune.families.cnn.design import design, layer_sizes, layers_meta
from hwprune.families.cnn.graph import LayerInfo
from hwprune.latency._base import Backend, Timing
from hwprune.latency.backends import OrtCpuBackend, Runner, interleave
from hwprune.space import PruningSpace

__all__ = ["CnnProfiling", "prepare", "measure"]

#: networks timed together beside the dense model (the rest wait untimed): an export times 2 x (1 + picks)
#: sessions together, and a small network timed among all K^2 + 1 of a profile ran up to 50 % slower
#: than among a few (a 0.2 ms SE/depthwise net: its per-call state evicted by 25 other graphs)
CONTEXT_NETWORKS = 3
_BLOCK = 16  # channel block of ORT's NCHWc kernels on AVX-512; shapes are compared after rounding up to it


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
    if ins and len(ins[0]) == 4:  # pooling, layout changes, unfused adds: work on some layer's output
        return ("output", _pad(ins[0][1]), (ins[0][2], ins[0][3]))
    return None


def _output_key(layer: LayerInfo, co: int) -> tuple[Any, ...]:
    """Key of an op reading ``layer``'s output tensor (pooling, layout conversion, unfused add)."""
    (h, w), (kh, kw), (sh, sw), (ph, pw) = layer.in_hw, layer.kernel, layer.stride, layer.padding
    return ("output", _pad(co), ((h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1))


def _node_times(path: str, skip: int) -> tuple[dict[tuple[Any, ...], list[float]], float, float]:
    """Each matched node's median kernel time in ms, by key; the unmatched nodes' sum; the sum of all.

    (The fastest run per node was tried too: it splits worse, 3.1 vs 2.5 % MAPE on mobilenet_v2.)
    """
    events = json.loads(Path(path).read_text())
    durs: dict[str, list[float]] = defaultdict(list)
    info: dict[str, tuple[Any, ...] | None] = {}
    for e in events:
        if e.get("cat") != "Node" or not str(e.get("name", "")).endswith("_kernel_time"):
            continue
        n = e["name"]
        durs[n].append(float(e["dur"]))
        if n not in info:
            a = e.get("args", {})
            shapes = [[next(iter(d.values())) for d in a.get(k, [])] for k in ("input_type_shape", "output_type_shape")]
            info[n] = _node_key(str(a.get("op_name", "")), shapes[0], shapes[1])
    med = {n: float(np.median(d[skip:] if len(d) > skip else d)) / 1000.0 for n, d in durs.items()}
    by: dict[tuple[Any, ...], list[float]] = defaultdict(list)
    rest = 0.0
    for n, m in med.items():
        key = info[n]
        if key is None:
            rest += m
        else:
            by[key].append(m)
    return by, rest, sum(med.values())


@dataclass
class CnnProfiling:
    """The networks of one profile, loaded: ``runners[0]`` is the dense model, ``runners[1 + i]``
    network ``nets[i]``; ``kernels[i]`` maps (layer, c_in, c_out) to its node time in network i (node
    profiler's clock, ms) and ``node_sum[i]`` is the sum over all of network i's nodes.

    Split from :func:`measure` so a benchmark can time these runners in the same rounds as its own.
    """

    layers: list[LayerInfo]
    nets: list[dict[str, int]]
    levels: int
    runners: list[Runner]
    kernels: list[dict[tuple[str, int, int], float]]
    node_sum: list[float]
    unmatched: int
    dense_key: dict[str, int]
    make_runner: Callable[[int], Runner] | None = None  # network i -> a fresh runner (runners not kept)
    make_onnx: Callable[[int], bytes] | None = None  # network i (-1: the dense model) -> its ONNX
    feed: dict[str, Any] | None = None  # the inputs every network is timed on

    def networks(self) -> list[dict[str, int] | None]:
        """Every runner is a whole network: the dense model, then the design's networks."""
        return [dict(self.dense_key), *(dict(n) for n in self.nets)]

    def frame(self, timings: Sequence[Timing]) -> pd.DataFrame:
        """The table: each conv's entry is its share of the network's node time x the network's time.

        (Taking a per-run executor overhead out before splitting was tried: it helps mobilenet_v2's
        smallest networks and hurts resnet50's by as much, so the split stays plainly proportional.)
        """
        samples: dict[tuple[str, int, int], list[tuple[float, float, float]]] = defaultdict(list)
        for kern, total, t in zip(self.kernels, self.node_sum, timings[1:], strict=True):
            for key, ms in kern.items():
                share = ms / total
                samples[key].append((share * t.median_ms, share * t.p10_ms, share * t.p90_ms))
        missing = [l.name for l in self.layers if (l.name, *layer_sizes(l, self.dense_key)) not in samples]
        if missing:
            raise HwpruneError(
                f"profiling matched no ONNX Runtime node to layer {missing[0]!r}; this runtime fuses "
                "it in a way hwprune does not read yet (report the model)"
            )
        kind = {l.name: l.kind for l in self.layers}
        rows = [
            {
                "kind": kind[n],
                "key": n,
                "size": ci,
                "size2": co,
                "median_ms": float(np.median([v[0] for v in vals])),
                "p10_ms": float(np.median([v[1] for v in vals])),
                "p90_ms": float(np.median([v[2] for v in vals])),
                "n": len(vals) * timings[0].n,
            }
            for (n, ci, co), vals in sorted(samples.items())
        ]
        entry = {(r["key"], r["size"], r["size2"]): r["median_ms"] for r in rows}
        # base: what the entries leave unexplained, the median over all networks -- not dense minus
        # its convs, a small difference of two large noisy numbers (2 % noise on resnet50's 75 ms
        # would move every small subnet's prediction by 1.5 ms)
        resid = [
            t.median_ms - sum(entry[(l.name, *layer_sizes(l, net))] for l in self.layers)
            for net, t in zip(self.nets, timings[1:])
        ]
        base, d = float(np.median(resid)), timings[0]
        rows.insert(
            0,
            {
                "kind": "base",
                "key": "",
                "size": 0,
                "size2": -1,
                "median_ms": base,
                "p10_ms": base + d.p10_ms - d.median_ms,
                "p90_ms": base + d.p90_ms - d.median_ms,
                "n": d.n,
            },
        )
        return pd.DataFrame(rows)

    def meta(
        self, timings: Sequence[Timing], *, anchors: Sequence[tuple[dict[str, int], float]] = ()
    ) -> dict[str, Any]:
        """``anchors``: (network sizes, ms measured as export measures) for :func:`anchor_fit`."""
        f = self.frame(timings)
        entry = {(r.key, r.size, r.size2): r.median_ms for r in f.itertuples()}

        def block_sum(sizes: dict[str, int]) -> float:
            return float(entry[("", 0, -1)] + sum(entry[(l.name, *layer_sizes(l, sizes))] for l in self.layers))

        nets = [self.dense_key, *self.nets]
        fit = network_fit([block_sum(n) for n in nets], [t.median_ms for t in timings[: len(nets)]])
        if anchors:
            fit = anchor_fit(fit, [block_sum(n) for n, _ in anchors], [ms for _, ms in anchors])
        bare = block_sum(self.dense_key)
        predicted = fit["scale"] * bare + fit["offset_ms"] if fit else bare  # what the predictor says
        return {
            "dense_predicted_ms": round(float(predicted), 6),
            "dense_block_sum_ms": round(float(bare), 6),
            "network_fit": fit,
            "method": "ORT node-time shares (median of 20 runs) x whole-network times (interleaved, common-mode "
            "load removed) of K^2 pruned networks covering every conv's (c_in, c_out) level grid; "
            "base = median unexplained time",
            "levels": self.levels,
            "networks": len(self.nets),
            "rounds": timings[0].n,
            "dense_ms": timings[0].to_json(),
            "unmatched_layer_samples": self.unmatched,
            "layers": layers_meta(self.layers),
        }


#: a whole-network fit outside these bounds is not applied (a broken profile, not a context effect)
_FIT_SCALE = (0.5, 2.0)


def network_fit(predicted: Sequence[float], measured: Sequence[float]) -> dict[str, Any] | None:
    """``measured = scale x block_sum + offset_ms`` over the profile's own whole networks (relative least
    squares, :func:`hwprune.latency.correction.fit_affine`), with each network's pair and the errors before
    and after.

    Why: the table's entries are each conv's share of the network it was timed in, and a conv at a small
    width was mostly timed among wider neighbours (the design mixes levels), with their cache footprint;
    depthwise and single-unit layers take the median over networks of very different sizes. So the
    block sums of small networks come out a few % high (mobilenet_v3_large's smallest network +8 %, its
    dense model -2 %: the subnets measure faster than predicted and a 2x pick lands above 2x). The K^2
    + 1 networks the profile already timed whole are the ground truth for that: an affine fit over them
    needs no extra timing and no per-model tuning, leaves an additive model (the DP's linearisation stays
    exact), and is the identity where the entries already add up (resnet50). None when it cannot be
    fitted or falls outside ``_FIT_SCALE``.
    """
    from hwprune.latency.correction import fit_affine

    x, y = np.asarray(predicted, dtype=np.float64), np.asarray(measured, dtype=np.float64)
    excluded = 0
    try:
        fit = fit_affine(x, y)
        # one network timed during a burst of load (a 24 % outlier on mobilenet_v3_small) must not tilt
        # the line for all: refit without points beyond 3 robust sigmas (and beyond 5 %) of the first fit
        rel = (fit.scale * x + fit.offset_ms - y) / y
        mad = 1.4826 * float(np.median(np.abs(rel - np.median(rel))))
        keep = np.abs(rel) <= max(3 * mad, 0.05)
        if 2 < keep.sum() < len(x):
            fit, excluded = fit_affine(x[keep], y[keep]), int(len(x) - keep.sum())
    except HwpruneError:
        return None
    if not _FIT_SCALE[0] <= fit.scale <= _FIT_SCALE[1] or not (fit.scale * x + fit.offset_ms > 0).all():
        return None
    before = 100 * (x - y) / y
    after = 100 * (fit.scale * x + fit.offset_ms - y) / y
    return {
        "scale": fit.scale,
        "offset_ms": fit.offset_ms,
        "block_sum_ms": [round(float(v), 5) for v in x],
        "measured_ms": [round(float(v), 5) for v in y],
        "mape_before_pct": round(float(np.mean(np.abs(before))), 3),
        "worst_before_pct": round(float(np.max(np.abs(before))), 3),
        "mape_after_pct": round(float(np.mean(np.abs(after))), 3),
        "excluded": excluded,  # networks left out of the refit as outliers (their errors still count above)
        "worst_after_pct": round(float(np.max(np.abs(after))), 3),
        "method": "measured = scale x block_sum + offset_ms over the dense model and every profiled network "
        "(relative least squares); the predictor applies it to every prediction",
    }


def anchor_fit(
    fit: dict[str, Any] | None, block_sums: Sequence[float], measured: Sequence[float]
) -> dict[str, Any] | None:
    """Compose ``fit`` (the profile's whole-network fit, or None) with a second affine map fitted on
    *anchors*: a few of the profile's networks (the dense model, the smallest, a middle uniform one)
    timed again, right after the profile, exactly as an export times its candidates
    (:func:`hwprune.export.measure.measure_pairs`: each beside the dense model in its own rounds, two
    sessions each, mirrored order).

    Why: the same small network measures up to ~9 % faster there than in the profile's timing rounds
    (mobilenet_v3_large's smallest network, 1.08 vs 1.17 ms, in chunks of four graphs or of all 26), and
    the context factor, a single scale read off the dense model, cannot see a gap that grows as the
    network shrinks. Anchors measured in the export's own context give the scale *and* offset of it.
    The composed map stays affine, so the predictor and the DP's linearisation are unchanged.
    """
    from hwprune.latency.correction import fit_affine

    s1, o1 = (fit["scale"], fit["offset_ms"]) if fit else (1.0, 0.0)
    x = s1 * np.asarray(block_sums, dtype=np.float64) + o1
    y = np.asarray(measured, dtype=np.float64)
    try:
        a = fit_affine(x, y)
    except HwpruneError:
        return fit
    if not _FIT_SCALE[0] <= a.scale <= _FIT_SCALE[1]:
        return fit
    out = dict(fit or {})
    out.update(
        {
            "profile_scale": s1,
            "profile_offset_ms": o1,
            "scale": a.scale * s1,
            "offset_ms": a.scale * o1 + a.offset_ms,
            "anchors": {
                "predicted_ms": [round(float(v), 5) for v in x],
                "measured_ms": [round(float(v), 5) for v in y],
                "scale": a.scale,
                "offset_ms": a.offset_ms,
                "method": "dense, smallest and middle uniform networks timed by hwprune.export.measure "
                "after the profile; measured = scale x profile prediction + offset_ms (relative least squares)",
            },
        }
    )
    return out


def _export_anchors(prof: CnnProfiling, backend: Backend, k: int) -> list[tuple[dict[str, int], float]]:
    """The dense model and the uniform networks at level 0 and (K-1)/2, timed as export times them."""
    import statistics

    from hwprune.export.measure import measure_pairs

    if prof.make_onnx is None or prof.feed is None:
        return []
    idx = sorted({0, (k - 1) // 2} - {k - 1})  # design: nets[a] for a < K are the uniform networks
    # each anchor beside the dense model in its own rounds, as export times each candidate (four sessions:
    # a session's speed depends on how many share the caches, hwprune.export.measure)
    cmps = measure_pairs(
        backend,
        dense=prof.make_onnx(-1),
        pruned={f"n{i}": prof.make_onnx(i) for i in idx},
        feed=prof.feed,
        rounds=5,
        repeats=20,
        warmup=5,
    )
    dense = statistics.median(c.dense.median_ms for c in cmps.values())
    ratio = {i: cmps[f"n{i}"].pruned[f"n{i}"].median_ms / cmps[f"n{i}"].dense.median_ms for i in idx}
    return [(dict(prof.dense_key), dense)] + [(prof.nets[i], ratio[i] * dense) for i in idx]


def _profiled_session(backend: OrtCpuBackend, onnx: bytes, prefix: str) -> Any:
    import onnxruntime as ort

    so = backend.session_options()
    so.enable_profiling, so.profile_file_prefix = True, prefix
    return ort.InferenceSession(onnx, so, providers=list(backend.providers))


def prepare(
    adapter: Any,
    backend: Backend,
    *,
    batch: int,
    seq: int = 0,
    space: PruningSpace,
    progress: bool = True,
    levels: int | None = None,
    chunk: int = 8,
    profile_runs: int = 20,
    keep_runners: bool = True,
) -> CnnProfiling:
    """Export every network of the design, load a timing runner for each, and read its node times.

    ``keep_runners=False`` keeps only the dense model's runner and rebuilds the others on demand
    (``make_runner``): vgg16_bn's 25 networks would hold ~10 GB of weights at once.
    """
    levels = 5 if levels is None else levels
    from rich.progress import Progress

    if not isinstance(backend, OrtCpuBackend):
        raise HwpruneError(
            f"runtime {backend.name} cannot profile CNNs (needs ONNX Runtime's node profiler); "
            "use --runtime ort-cpu or ort-cuda"
        )
    if batch != adapter.input_shape[0]:
        shape = ",".join(map(str, adapter.input_shape))
        raise HwpruneError(f"--batch {batch} differs from --input-shape {shape}; pass --batch {adapter.input_shape[0]}")
    layers = list(adapter.graph.layers)
    k, nets = design(space, layers, levels=levels)
    dense = adapter.dense()
    inputs = adapter.example_inputs(batch=batch)
    names_in, names_out, dyn = adapter.onnx_io()
    feed = {n: inputs[n].numpy() for n in names_in}

    def export(sizes: dict[str, int] | None) -> bytes:
        m = dense
        if sizes is not None and any(sizes[u.name] != u.full for u in space.units):
            m = adapter.prune(dense, adapter.plan({n: range(s) for n, s in sizes.items()}))
        return to_onnx(m, inputs, output_names=names_out, dynamic_axes=dyn)

    runners = [backend.prepare(export(None), feed)]
    kernels: list[dict[tuple[str, int, int], float]] = []
    node_sum: list[float] = []
    unmatched = 0
    with Progress(disable=not progress, transient=False) as bar, tempfile.TemporaryDirectory() as tmp:
        task = bar.add_task(f"export + node-profile {len(nets)} networks", total=len(nets))
        for c0 in range(0, len(nets), chunk):
            profiled = []
            for i, sizes in enumerate(nets[c0 : c0 + chunk]):
                onnx = export(sizes)
                if keep_runners:
                    runners.append(backend.prepare(onnx, feed))
                profiled.append(_profiled_session(backend, onnx, f"{tmp}/n{c0 + i}"))
                bar.advance(task)
            # node times under the same interleaving (cache state) the timed rounds will see
            interleave([Runner(s, feed) for s in profiled], rounds=profile_runs, warmup=2, seed=c0)
            for i, s in enumerate(profiled):
                by, _, total = _node_times(s.end_profiling(), skip=2)
                kern, miss, _ = _assign(layers, nets[c0 + i], by)
                kernels.append(kern)
                node_sum.append(total)
                unmatched += miss
            del profiled
    return CnnProfiling(
        layers=layers,
        nets=nets,
        levels=k,
        runners=runners,
        kernels=kernels,
        node_sum=node_sum,
        unmatched=unmatched,
        dense_key={u.name: u.full for u in space.units},
        make_runner=lambda i: backend.prepare(export(nets[i]), feed),
        make_onnx=lambda i: export(None if i < 0 else nets[i]),
        feed=feed,
    )


def _assign(
    layers: Sequence[LayerInfo], sizes: dict[str, int], by: dict[tuple[Any, ...], list[float]]
) -> tuple[dict[tuple[str, int, int], float], int, float]:
    """Each layer's time: the mean of the ORT nodes with its shape (equal shapes cost the same),
    plus an equal part of the other nodes reading outputs shaped like its own.

    Those nodes' cost follows the width of the tensor they read: resnet's max-pool after the stem
    (~5 % of its smallest subnets), global pooling, and the layout conversions ORT inserts around
    convs too narrow for its blocked NCHWc kernels (< 16 channels). Charged to the base they would
    be counted at dense width for every subnet. Returns (times, layers unmatched, unassigned time).
    """
    out: dict[tuple[str, int, int], float] = {}
    missing = 0
    by_output: dict[tuple[Any, ...], list[tuple[str, int, int]]] = defaultdict(list)
    for layer in layers:
        ci, co = layer_sizes(layer, sizes)
        t = by.get(_layer_key(layer, ci, co))
        if t:
            out[(layer.name, ci, co)] = float(np.mean(t))
            if layer.kind != "linear":
                by_output[_output_key(layer, co)].append((layer.name, ci, co))
        else:
            missing += 1
    left = 0.0
    for key, times in by.items():
        if key[0] != "output":
            continue
        owners = by_output.get(key)
        if not owners:
            left += sum(times)  # e.g. the graph input's conversion: width-independent, stays in base
            continue
        for o in owners:
            out[o] += sum(times) / len(owners)
    return out, missing, left


def measure(
    adapter: Any,
    backend: Backend,
    *,
    batch: int,
    seq: int = 0,
    space: PruningSpace,
    progress: bool = True,
    levels: int | None = None,
    budget_s: float | None = None,
    max_live_bytes: int = 3 << 30,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Profile ``adapter`` (a :class:`~hwprune.families.cnn.adapter.CnnAdapter`) on ``backend``: (table frame, meta).

    Networks are timed :data:`CONTEXT_NETWORKS` at a time beside the dense model (fewer when their
    weights would pass ``max_live_bytes``), every chunk rescaled so that its dense time matches the first
    chunk's (the common reference): the context an export times its candidates in, a few sessions
    alternating, not all K^2 + 1 networks at once.
    """
    levels = 5 if levels is None else levels
    budget_s = 120.0 if budget_s is None else budget_s
    from rich.progress import Progress

    weight_bytes = 4 * sum(p.numel() for p in adapter.dense().parameters())
    per_chunk = max(2, int(max_live_bytes // max(weight_bytes, 1)))
    keep = per_chunk >= levels * levels + 1
    prof = prepare(
        adapter, backend, batch=batch, seq=seq, space=space, progress=progress, levels=levels, keep_runners=keep
    )
    with Progress(disable=not progress, transient=False) as bar:
        task = bar.add_task(f"time {len(prof.nets) + 1} networks (~{budget_s:.0f} s)", total=100)
        timings = _chunked(
            prof,
            budget_s=budget_s,
            per_chunk=min(per_chunk - 1, CONTEXT_NETWORKS),
            on_chunk=lambda f: bar.update(task, completed=100 * f),
        )
    anchors = _export_anchors(prof, backend, prof.levels)
    return prof.frame(timings), prof.meta(timings, anchors=anchors)


def _chunked(prof: CnnProfiling, *, budget_s: float, per_chunk: int, on_chunk: Callable[[float], None]) -> list[Timing]:
    """Time the networks ``per_chunk`` at a time beside the dense model, each chunk rescaled so that its
    dense time matches the first chunk's. Runners the profiling kept are reused, others built per chunk."""
    n = len(prof.nets)
    k = -(-n // per_chunk)  # chunks of near-equal size: a last chunk of one network has no common mode
    starts = [round(j * n / k) for j in range(k)]
    out: list[Timing | None] = [None] * (n + 1)
    ref = 0.0
    for j, c0 in enumerate(starts):
        idx = list(range(c0, starts[j + 1] if j + 1 < len(starts) else n))
        runners = [prof.runners[0]] + [_runner(prof, i) for i in idx]
        t = interleave(runners, seconds=budget_s / len(starts), min_rounds=10, common_mode=True, seed=j)
        ref = ref or t[0].median_ms
        f = ref / t[0].median_ms  # this chunk's load relative to the first chunk's, read off the dense model
        scaled = [Timing(median_ms=x.median_ms * f, p10_ms=x.p10_ms * f, p90_ms=x.p90_ms * f, n=x.n) for x in t]
        out[0] = out[0] or scaled[0]
        for i, x in zip(idx, scaled[1:]):
            out[1 + i] = x
        del runners
        on_chunk((j + 1) / len(starts))
    return [x for x in out if x is not None]


def _runner(prof: CnnProfiling, i: int) -> Runner:
    if len(prof.runners) > 1 + i:
        return prof.runners[1 + i]
    assert prof.make_runner is not None
    return prof.make_runner(i)
