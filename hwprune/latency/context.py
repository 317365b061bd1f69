"""The context factor: how the whole dense model times as export times it, against the table's sum.

A profile times each block in its own graph among dozens of others (cold caches, many sessions); an
export times a whole model among a few (:func:`hwprune.export.measure.measure_dense_and_pruned`). The
two contexts disagree by a few to ~20 % on a shared CPU, the same way for every candidate. So
``profile`` also builds the dense model's ONNX and times it with the export's own machinery (two
sessions in mirrored order, interleaved rounds, the same feed), and stores::

    meta["context"] = {"factor": measured / predicted, "dense_measured_ms", "dense_predicted_ms",
                       "dense_control_pct", "dense_measured_wall_ms", "clock", "rounds", "repeats",
                       "warmup", "method"}

The predictor multiplies its block sums by ``factor`` (:mod:`hwprune.latency.correction`), so a fresh
table predicts export-time milliseconds. A table without it (made before) predicts with factor 1.

Decode tables (:func:`time_decode_context`): the gap is larger there (a decode step streams every
weight once, so a block timed alone, its weights warm in cache, runs faster than the same block inside
the whole decoder: SmolLM2 measured ~25 % slower than its table's sum at every subnet and context). The
dense model's decode graph is timed one new token after each profiled context, exactly as export times
it (:func:`hwprune.export.workload_timing.step_runners`), in two sessions, interleaved; each context
gets its own record under ``meta["contexts"][str(c)]["context"]`` (what ``table.at_context(c)`` reads),
so the per-context predictors are scaled before they are interpolated.

One factor for the whole sum is exact for the dense model only. In a decode step the fixed rest (the LM
head: a third of SmolLM2's step) and the blocks are off by different amounts, so a factor fitted to
dense over-predicts every narrowed subnet (SmolLM2: 8-10 %). The profile therefore also times a few
**anchor** subnets per context (:func:`anchor_candidates`: each unit kind at its minimum, half width, the
fixed rest alone), each as a ratio to the dense model in shared rounds, and fits a scale per part
(:func:`fit_part_scales`: the base, then one per unit kind) stored as ``scales``; the predictor then
scales each part on its own (:class:`~hwprune.latency.correction.PartScaledPredictor`), still additive.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from statistics import fmean
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    from torch import nn

    from hwprune.families._base import Family
    from hwprune.latency._base import Backend
    from hwprune.latency.predictor import Predictor
    from hwprune.latency.table import LatencyTable
    from hwprune.space import Candidate, PruningSpace

__all__ = [
    "prompt_anchors",
    "time_context",
    "time_decode_context",
    "anchor_candidates",
    "predicted_parts",
    "fit_part_scales",
    "fit_through",
    "CONTEXT_METHOD",
    "DECODE_CONTEXT_METHOD",
    "ANCHOR_METHOD",
]

CONTEXT_METHOD = (
    "the whole dense ONNX model timed by hwprune.export.measure (two sessions, mirrored order, "
    "interleaved rounds, the export's feed; with anchors: beside each anchor in its own rounds, as export "
    "times each candidate, the median over those) divided by the table's dense prediction"
)

DECODE_CONTEXT_METHOD = (
    "the whole dense decode graph (decoder.onnx) timed one new token after the context's KV cache as export "
    "times it (two sessions, interleaved shuffled rounds; with anchors: beside each anchor in its own rounds, "
    "the median over those) divided by the table's dense prediction there"
)

AFFINE_METHOD = (
    "each anchor subnet (first kept indices) timed beside the dense model in its own interleaved rounds, as "
    "export times a candidate; its ms = its ratio to dense there x the dense ms; measured = scale x block sum "
    "+ offset through the dense point, the scale by least squares on the anchors' relative error"
)

ANCHOR_METHOD = (
    "each anchor subnet's decode graph (first kept indices) timed one new token after the context beside the "
    "dense model in its own interleaved rounds, two sessions each in mirrored order (as export times a "
    "candidate); measured ms = its ratio to dense there x the dense model's measured ms (the median over the "
    "pairs); scales fitted by least squares on relative error"
)


def prompt_anchors(space: "PruningSpace") -> dict[str, "Candidate"]:
    """Whole subnets timed beside the dense model to fit a prompt table's affine context: three widths
    spread over the space (every unit at 3/4, at 1/2, at its smallest); duplicates and dense dropped."""
    out = {"uniform-3/4": space.uniform(0.75), "uniform-half": space.uniform(0.5), "smallest": space.smallest()}
    return _distinct(out, skip=space.dense())


def _distinct(cands: "Mapping[str, Candidate]", *, skip: "Candidate | None" = None) -> dict[str, "Candidate"]:
    """``cands`` without repeated sizes (the first name kept) and without ``skip``'s."""
    seen = {skip.sizes} if skip is not None else set()
    unique = {}
    for name, c in cands.items():
        if c.sizes not in seen:
            seen.add(c.sizes)
            unique[name] = c
    return unique


def _first_kept(adapter: "Family", space: "PruningSpace", cand: "Candidate") -> "nn.Module":
    """The dense model cut to ``cand``'s sizes keeping each unit's first indices (for timing, which
    ones does not matter)."""
    kept = {u.name: list(range(s)) for u, s in zip(space.units, cand.sizes)}
    return adapter.prune(adapter.dense(), adapter.plan(kept))


def fit_through(
    dense_pred: float, dense_meas: float, preds: "Sequence[float]", meas: "Sequence[float]"
) -> tuple[float, float] | None:
    """``(scale, offset)`` of ``measured = scale x predicted + offset`` through the dense point exactly
    (so the dense model still predicts its export-time ms, and every speedup divides by it), the scale
    fitted by least squares on the anchors' relative error. None without an anchor of another prediction,
    or when the scale comes out <= 0 (a busy machine)."""
    import numpy as np

    p, m = np.asarray(preds, dtype=np.float64), np.asarray(meas, dtype=np.float64)
    x, y = (p - dense_pred) / m, (m - dense_meas) / m  # residual: scale * x - y
    den = float(np.dot(x, x))
    if len(p) == 0 or den <= 1e-18:
        return None
    a = float(np.dot(x, y)) / den
    return (a, dense_meas - a * dense_pred) if a > 0 else None


def time_context(
    adapter: "Family",
    backend: "Backend",
    space: "PruningSpace",
    *,
    batch: int,
    seq: int,
    rounds: int = 5,
    repeats: int | None = None,
    warmup: int | None = None,
    anchors: bool = True,
) -> "Callable[[LatencyTable], dict[str, Any]]":
    """Time the dense model as export does; return the fit that turns a table into its ``meta["context"]``
    record (see module doc). The timing needs no table, so ``profile`` runs it first, in a process that has
    timed nothing yet, as ``hwprune export`` is: timed after a profile's ~1000 graphs, resnet50's smallest
    anchor read 2.71 ms where fresh processes read 2.42 (scripts/bench_latency.py --table, docs/benchmarks.md).
    The pairs are timed in a new process that runs ONNX Runtime only (``measure_pairs``' default),
    as export and ``calibrate --remeasure`` time candidates, so both sides of a prediction come from the
    same kind of process; the record's ``process`` says where it ran.

    With ``anchors`` (default), the subnets of :func:`prompt_anchors` are timed each beside the dense
    model in its own rounds (:func:`~hwprune.export.measure.measure_pairs`), and ``measured = scale x
    block sum + offset`` is fitted through the dense model (which so still predicts its measured ms) over
    them (:func:`fit_through`) and stored as ``affine``, which the
    predictor then uses instead of the single factor. Why: a block timed in its own graph carries a
    per-node cost (dispatch, small-tensor overhead) that a factor fitted to the dense model scales down
    with the block, so a smaller subnet's share of it is mispredicted (mobilenet_v3_small, 2x pick:
    +3.95 % with the factor, -0.72 % with the affine fit, timed in one process)."""
    # export depends on latency, not the other way round at import time
    from hwprune.export.candidate import candidate_onnx, timing_feed
    from hwprune.export.measure import measure_dense_and_pruned, measure_pairs

    cands = prompt_anchors(space) if anchors else {}
    onnx = {}
    for name, cand in cands.items():
        onnx[name] = candidate_onnx(adapter, _first_kept(adapter, space, cand), batch=batch, seq=seq)
    dense_onnx = candidate_onnx(adapter, adapter.dense(), batch=batch, seq=seq)
    feed = timing_feed(adapter, batch=batch, seq=seq)
    if cands:  # each anchor with the dense model in its own rounds: the context export measures in
        cmps = measure_pairs(  # in a new ONNX-Runtime-only process, as export times candidates
            backend, dense=dense_onnx, pruned=onnx, feed=feed, rounds=rounds, repeats=repeats, warmup=warmup
        )
        measured = statistics.median(c.dense.median_ms for c in cmps.values())
        controls = [c.control_pct for c in cmps.values() if c.control_pct is not None]
        control: float | None = statistics.median(controls) if controls else None
        walls = [c.dense.wall_ms for c in cmps.values() if c.dense.wall_ms is not None]
        settings = next(iter(cmps.values())).settings
    else:
        cmp = measure_dense_and_pruned(
            backend, dense=dense_onnx, pruned={}, feed=feed, rounds=rounds, repeats=repeats, warmup=warmup
        )
        measured, control, settings = cmp.dense.median_ms, cmp.control_pct, cmp.settings
        walls = [cmp.dense.wall_ms] if cmp.dense.wall_ms is not None else []
    del onnx, dense_onnx
    anchor_ms = {k: cmps[k].pruned[k].median_ms / cmps[k].dense.median_ms for k in cands} if cands else {}
    timing = {
        "dense_measured_ms": measured,
        "dense_control_pct": control,
        "dense_measured_wall_ms": statistics.median(walls) if walls else None,
        "clock": backend.clock,
        "rounds": rounds,
        "repeats": settings["repeats"],  # None asked: chosen from the model's time (timing_plan)
        "warmup": settings["warmup"],
        "process": settings.get("process", "caller"),
    }
    return lambda table: _fit_context(adapter, table, space, cands, anchor_ms, timing)


def _fit_context(
    adapter: "Family",
    table: "LatencyTable",
    space: "PruningSpace",
    cands: "Mapping[str, Candidate]",
    ratio: "Mapping[str, float]",
    timing: "Mapping[str, Any]",
) -> dict[str, Any]:
    """The ``meta["context"]`` record from :func:`time_context`'s numbers (``ratio``: each anchor's ms over
    the dense model's in its own rounds) and ``table``'s block sums."""
    predictor = adapter.predictor(table, space)
    predicted = predictor.dense_ms()  # the bare block sum, no factor yet
    measured = float(timing["dense_measured_ms"])
    affine: dict[str, Any] | None = None
    if cands:
        names = ["dense", *cands]
        pred = [predicted, *(predictor.predict(c) for c in cands.values())]
        # an anchor's ms: its ratio to the dense model in its own rounds x the dense ms (drift between
        # the pairs' rounds cancels)
        meas = [measured, *(ratio[k] * measured for k in cands)]
        f = measured / predicted
        fit = fit_through(pred[0], meas[0], pred[1:], meas[1:])
        points: list[dict[str, Any]] = []
        for n, p, m in zip(names, pred, meas):
            pt: dict[str, Any] = {
                "name": n,
                "predicted_ms": p,
                "measured_ms": m,
                "factor_error_pct": 100.0 * (f * p / m - 1),
            }
            if fit is not None:
                pt["fit_error_pct"] = 100.0 * ((fit[0] * p + fit[1]) / m - 1)
            points.append(pt)
        # the offset is a per-graph cost; one that would make the smallest anchor's prediction <= 0 is noise
        if fit is not None and fit[0] * min(pred) + fit[1] > 0:
            worst = max(abs(pt["fit_error_pct"]) for pt in points)
            affine = {"scale": fit[0], "offset_ms": fit[1], "residual_max_pct": worst}
        affine = {"applied": affine is not None, **(affine or {}), "points": points, "method": AFFINE_METHOD}
    out: dict[str, Any] = {
        "factor": measured / predicted,
        "dense_measured_ms": measured,
        "dense_predicted_ms": predicted,
        "dense_control_pct": timing["dense_control_pct"],
        "dense_measured_wall_ms": timing["dense_measured_wall_ms"],
        "clock": timing["clock"],
        "rounds": timing["rounds"],
        "repeats": timing["repeats"],
        "warmup": timing["warmup"],
        "process": timing["process"],
        "method": CONTEXT_METHOD,
    }
    if affine is not None:
        out["affine"] = affine
    return out


def anchor_candidates(space: "PruningSpace") -> dict[str, "Candidate"]:
    """Whole subnets timed beside the dense model to fit the parts' scales (:func:`fit_part_scales`): the
    dense model, each unit kind at its smallest allowed size with the rest whole, every unit at half, and
    every unit at its smallest (with removable units: the fixed rest alone). Duplicates are dropped."""
    from hwprune.space import Candidate

    out: dict[str, Candidate] = {"dense": space.dense()}
    for kind in sorted({u.kind for u in space.units}):
        out[f"{kind}-min"] = Candidate(tuple(u.sizes[0] if u.kind == kind else u.full for u in space.units))
    out["uniform-half"] = space.uniform(0.5)
    out["smallest"] = space.smallest()
    return _distinct(out)


def predicted_parts(predictor: "Predictor", cand: "Candidate") -> tuple[float, dict[str, float]]:
    """An additive prediction split by what it sums: (the fixed base, {unit kind: its units' ms})."""
    base, costs = predictor.unit_costs()
    parts: dict[str, float] = {}
    for u, c, size in zip(predictor.space.units, costs, cand.sizes, strict=True):
        parts[u.kind] = parts.get(u.kind, 0.0) + float(c[u.sizes.index(size)])
    return float(base), parts


def fit_part_scales(points: "Sequence[tuple[float, Mapping[str, float], float]]") -> dict[str, Any] | None:
    """``measured = a * base + sum_k b_k * parts_k`` over ``points`` (base ms, {kind: ms}, measured ms),
    least squares on the relative error, as :func:`~hwprune.latency.correction.fit_affine` does.

    One factor for the whole sum is the special case ``a = b_k``; separate scales matter where the fixed
    rest and the blocks run differently inside the whole graph than alone (a decode step: the blocks
    stream their weights from memory, the LM head dominates). Returns ``{"base": a, "kinds": {k: b_k},
    "residual_max_pct"}``, or None when the points cannot pin every scale (fewer points than scales, a
    rank-deficient design) or a scale comes out <= 0 (a noisy timing): the single factor then stays."""
    import numpy as np

    if not points:
        return None
    kinds = sorted({k for _, parts, _ in points for k in parts})
    x = np.array([[b, *(parts.get(k, 0.0) for k in kinds)] for b, parts, _ in points], dtype=np.float64)
    y = np.array([m for _, _, m in points], dtype=np.float64)
    if len(y) < x.shape[1] + 1 or np.linalg.matrix_rank(x / y[:, None]) < x.shape[1]:
        return None  # at least one point more than scales, so the residual says something
    coef, *_ = np.linalg.lstsq(x / y[:, None], np.ones_like(y), rcond=None)
    if not (coef > 0).all():
        return None
    fitted = x @ coef
    return {
        "base": float(coef[0]),
        "kinds": {k: float(c) for k, c in zip(kinds, coef[1:])},
        "residual_max_pct": float(np.max(np.abs(fitted - y) / y) * 100),
    }


def time_decode_context(
    adapter: "Family",
    backend: "Backend",
    space: "PruningSpace",
    contexts: "Sequence[int]",
    *,
    batch: int,
    rounds: int = 5,
    repeats: int = 10,
    warmup: int = 3,
    anchors: bool = True,
    fresh_process: bool = True,
) -> "Callable[[LatencyTable], dict[str, dict[str, Any]]]":
    """Time the dense decode graph at every context as export does; return the fit that turns a decode
    table into its per-context ``context`` records (see module doc). Like :func:`time_context`, it needs no
    table; ``profile`` still runs it after a decode table's ~30 block graphs. Timed first, in a process that
    had timed nothing yet, the dense level matched the bench's fresh processes better (-1.6 % against +2.2 %)
    but the small anchors read fast (the LM head alone 4.4 ms there, 5.9 ms in the bench), and SmolLM2's raw
    MAPE rose from 3.96 to 5.93 % (docs/benchmarks.md).

    With ``anchors`` (default), each subnet of :func:`anchor_candidates` is timed beside the dense model in
    its own interleaved rounds, exactly as export and the benchmarks time a candidate: two sessions each,
    created in mirrored order (dense, anchor, anchor', dense'). Its ms is its ratio to the dense model in
    those rounds times the dense model's ms (so each is immune to the machine's drift between anchors);
    the dense model's ms is the median over the pairs. The record gains ``anchors`` and, where the fit is
    sound, ``scales`` (:func:`fit_part_scales`), which the predictor then uses instead of the single
    factor. Until 2026-12-04 an anchor had one session, timed beside the dense model's first, which is the
    process's first session and times 2-3 % slower while later ones exist (scripts/bench_session_order.py):
    every anchor read a few % fast.

    With ``fresh_process`` (default) the timing runs in a new process that holds ONNX Runtime sessions only
    (:mod:`hwprune.latency.worker`), as a deployment's and export's decode measurement do: there the
    dense-vs-dense control is ~0 (-1.8 % in the profile's own process) and no age or torch heap of the
    profiling process weighs on the step. The record's ``process`` says where it ran."""
    from hwprune.export.workload_timing import decode_graph
    from hwprune.latency.worker import graph_files, in_worker, rebuildable

    contexts = list(contexts)
    fresh_process = fresh_process and rebuildable(backend)
    cands = anchor_candidates(space) if anchors else {}
    names = ["dense", *(name for name in cands if name != "dense")]
    built = (  # one graph in memory at a time; the timing reads them back
        (name, decode_graph(adapter, adapter.dense() if name == "dense" else _first_kept(adapter, space, cands[name])))
        for name in names
    )
    with graph_files(built) as files:
        job = (backend.name, backend.threads, list(files.values()), names, contexts, batch, rounds, repeats, warmup)
        if fresh_process:  # a process running ONNX Runtime only, as a deployment's (hwprune.latency.worker)
            firsts, seconds, ratio = in_worker(_time_decode_pairs, *job)
        else:
            firsts, seconds, ratio = _time_decode_pairs(*job)
    dense = {c: (statistics.median(firsts[c]), statistics.median(seconds[c])) for c in contexts}
    timing = {
        "clock": backend.clock,
        "rounds": rounds,
        "repeats": repeats,
        "warmup": warmup,
        "process": "ort-only worker" if fresh_process else "profile",
    }
    return lambda table: _fit_decode_context(adapter, table, space, dense, cands, ratio, timing)


def _time_decode_pairs(
    runtime: str,
    threads: int,
    paths: "Sequence[str]",
    names: "Sequence[str]",
    contexts: "Sequence[int]",
    batch: int,
    rounds: int,
    repeats: int,
    warmup: int,
) -> tuple[dict[int, list[float]], dict[int, list[float]], dict[str, dict[int, float]]]:
    """:func:`time_decode_context`'s timing (module level, so a spawned worker can run it): the dense graph
    (``paths[0]``) beside each anchor in mirrored pairs, or alone in two sessions when there are no anchors.
    Returns per context the dense model's first- and second-session ms (one entry per pair) and per anchor
    its ms over the dense model's in the same rounds."""
    from hwprune.export.workload_timing import MirroredSteps, step_runners
    from hwprune.latency._base import get_backend
    from hwprune.latency.backends import interleave

    backend = get_backend(runtime, threads=threads)
    graph = Path(paths[0]).read_bytes()
    k = len(contexts)
    firsts: dict[int, list[float]] = {c: [] for c in contexts}  # per context: the dense model's first session
    seconds: dict[int, list[float]] = {c: [] for c in contexts}  # and its second, one entry per pair
    ratio: dict[str, dict[int, float]] = {}  # anchor -> context -> its ms over the dense model's, same rounds
    for path, name in zip(paths[1:], names[1:]):
        g = Path(path).read_bytes()
        pair = MirroredSteps.create(backend, [graph, g], contexts, batch, keys=["dense", name])
        ms = pair.pairs(interleave(pair.runners, rounds=rounds, per_round=repeats, warmup=warmup))
        for i, c in enumerate(contexts):
            firsts[c].append(ms[(0, i)][0])
            seconds[c].append(ms[(0, i)][1])
        ratio[name] = {c: fmean(ms[(1, i)]) / fmean(ms[(0, i)]) for i, c in enumerate(contexts)}
        del pair, g
    if len(paths) == 1:
        first = step_runners(backend, graph, contexts, batch)
        second = step_runners(backend, graph, contexts, batch)  # same graph: a control of the timing itself
        ts = interleave([*first, *second], rounds=rounds, per_round=repeats, warmup=warmup)
        for i, c in enumerate(contexts):
            firsts[c].append(ts[i].median_ms)
            seconds[c].append(ts[k + i].median_ms)
    return firsts, seconds, ratio


def _fit_decode_context(
    adapter: "Family",
    table: "LatencyTable",
    space: "PruningSpace",
    dense: "Mapping[int, tuple[float, float]]",
    cands: "Mapping[str, Candidate]",
    ratio: "Mapping[str, Mapping[int, float]]",
    timing: "Mapping[str, Any]",
) -> dict[str, dict[str, Any]]:
    """The per-context records from :func:`time_decode_context`'s numbers (``dense``: the two sessions'
    medians per context) and ``table``'s block sums."""
    preds = {c: adapter.predictor(table.at_context(c), space) for c in dense}
    out: dict[str, dict[str, Any]] = {}
    for c, (a, b) in dense.items():
        measured = (a + b) / 2
        predicted = preds[c].dense_ms()  # the bare block sum
        out[str(c)] = {
            "factor": measured / predicted,
            "dense_measured_ms": measured,
            "dense_predicted_ms": predicted,
            "dense_control_pct": 100.0 * (b / a - 1),
            **timing,
            "method": DECODE_CONTEXT_METHOD,
        }
    if not cands or not all(p.additive for p in preds.values()):
        return out
    for c in dense:
        rows: list[dict[str, Any]] = []
        points = []
        m_dense = out[str(c)]["dense_measured_ms"]
        for name, cand in cands.items():
            base, parts = predicted_parts(preds[c], cand)
            m = m_dense if name == "dense" else ratio[name][c] * m_dense
            points.append((base, parts, m))
            rows.append({"name": name, "sizes": list(cand.sizes), "measured_ms": m, "base_ms": base, "parts_ms": parts})
        rec = out[str(c)]
        scales = fit_part_scales(points)
        f = rec["factor"]
        for (base, parts, m), row in zip(points, rows):
            row["factor_error_pct"] = 100.0 * (f * (base + sum(parts.values())) / m - 1)
            if scales is not None:
                fit = scales["base"] * base + sum(scales["kinds"][q] * v for q, v in parts.items())
                row["fit_error_pct"] = 100.0 * (fit / m - 1)
        rec["anchors"] = rows
        rec["anchor_method"] = ANCHOR_METHOD
        if scales is not None:
            rec["scales"] = scales
    return out
