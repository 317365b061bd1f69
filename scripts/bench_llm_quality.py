"""Quality at equal measured latency for a decoder LLM (SmolLM2): hwprune vs ShortGPT and uniform width, no fine-tuning.

    python scripts/bench_llm_quality.py --model smollm2 --targets 1.5,2 -o bench_out/llm_quality_smollm2.json

Text: three disjoint sets from the built-in corpus (``hwprune.proxies.calib.load_texts``: the report set
from its report domain, which the search never sees; selection then calibration from the other domains
in turn, so neither moves when the other sizes change): *calibration* (``--n-calib``: proxy statistics and
ShortGPT's Block Influence), *selection* (``--n-select``: the search's end-to-end scorer) and
*report* (``--n-report``: the perplexity and KL-to-dense reported here). The search never sees the
report texts.

Latency: ``--table``, else this machine's table for ``--seq`` in ``latency_tables/local/`` when one
exists, else a fresh profile into it (``hwprune.latency.profile`` on the adapter already loaded; the
same code ``run_profile`` runs). Every model below (dense included) is exported to ONNX with
``candidate_onnx`` and timed with ``measure_dense_and_pruned`` (interleaved rounds, one process). When
all sessions would not fit in memory (a SmolLM2 session holds ~0.5-1.3 GB) they are timed in chunks,
each with the dense model: a model's speedup is its chunk's dense time over its own, and its ms is
rescaled to the median dense time over chunks (``timing.rescaled`` in the JSON says so).

Methods, all without fine-tuning:

- ``hwprune``: ``search`` with the ``obs`` proxy (DP seeds + NSGA-II, ``--trials``) on the model's space
  (KV groups and FFN neurons per layer, sublayers removable), one pick per target;
- ``depth_only``: the same search where every unit is either whole or removed ({0, full}: attention
  and FFN sublayers may go independently, both = the block);
- ``width_only``: the same search where nothing may be removed (every size of the space but 0);
- ``shortgpt``: ShortGPT (Men et al., 2024) removes the k blocks of lowest Block Influence
  ``BI_i = 1 - mean cos(h_in, h_out)`` of the residual stream over the calibration tokens;
- ``flap`` / ``magnitude``: uniform width (every layer keeps the same KV groups and FFN neurons: FFN
  fraction f and round(f * groups) KV groups, at least one), elements chosen by that proxy's ranking.

Peer fronts: per target, the ``--front`` members of each peer nearest to the hwprune pick's predicted
latency (one predicted slower, the rest predicted at or below it, least pruned first), pooled over
targets. For each target and peer the result names the lowest-perplexity member *measured* at or below
the hwprune pick's measured latency. The three searches' scratch folders (``--run``) are recreated.

Decode regime (issue 9, benchmark 3): ``--regime decode --workload prompt=64,new=128 --table T_decode``
(a decode table, ``hwprune profile --regime decode``). The searches minimise the workload's mean decode
step (1 / tokens-per-second) from that table, and every model is timed on its ``decoder.onnx`` as
``hwprune export`` times decode steps (:func:`hwprune.export.workload_timing.measure_workload`, one chunk
at a time with the dense model, plus a second dense session created last as a control): "measured ms"
is then the mean decode step and the speedup is in tokens/s. ``--prefill-table T`` adds a fourth search,
``hwprune_prefill``: the same proxy and trials, minimising prompt latency from that table instead. Both
hwprune searches' picks are then also timed on the prompt graph (seq of that table), so
``regime_comparison`` shows per target whether the two regimes choose different subnets and whether each
wins on its own regime.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import math
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import OUT_DIR, fail, machine, stem, write_result

from hwprune.api import default_table_path, load_adapter, make_predictor
from hwprune.errors import HwpruneError, TargetUnreachableError
from hwprune.export.candidate import candidate_onnx, timing_feed
from hwprune.export.measure import measure_dense_and_pruned
from hwprune.export.workload_timing import decode_graph, measure_workload
from hwprune.families import Family
from hwprune.latency import LatencyTable, get_backend
from hwprune.latency.correction import with_context_factor
from hwprune.latency.pages import reexec_for_timing
from hwprune.proxies._base import CalibData, ProxyState
from hwprune.proxies.stats import length_batches
from hwprune.search import SearchConfig
from hwprune.search.run import check_reachable, search
from hwprune.search.workload import parse_workloads, workload_predictor
from hwprune.space import Candidate, PruningSpace

PEERS = ("shortgpt", "flap", "magnitude")
VARIANTS = ("hwprune", "depth_only", "width_only", "hwprune_prefill")
HWPRUNE = ("hwprune", "hwprune_prefill")  # the unrestricted space (the obs state itself)
SESSION_FACTOR = 2  # an ORT session holds its weights about twice (initializers and prepacked copies)
HEADROOM = 1 << 30  # bytes left free for torch, Python and the OS while sessions are loaded


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="a decoder: smollm2 or a local Hugging Face folder")
    ap.add_argument("--space", default=None, help="pruning space YAML (default: the model's)")
    ap.add_argument("--table", default=None, help="latency table (default: this machine's for --seq, or profile)")
    ap.add_argument("--seq", type=int, default=None, help="tokens per row, for the profile and every text set (128)")
    ap.add_argument("--profile-budget-s", type=float, default=None, help="timing budget if profiling is needed")
    ap.add_argument("--targets", default="1.5,2", help="speedups over dense, comma-separated")
    ap.add_argument("--trials", type=int, default=40, help="search trials (seeds included) of hwprune")
    ap.add_argument("--restricted-trials", type=int, default=None, help="trials of depth/width-only (--trials)")
    ap.add_argument("--margin", type=float, default=0.01, help="search budget = dense / (target * (1 + margin))")
    ap.add_argument("--front", type=int, default=3, help="members of each peer front per target (>= 2)")
    ap.add_argument("--n-calib", type=int, default=128, help="calibration texts (proxies, Block Influence)")
    ap.add_argument("--n-select", type=int, default=16, help="selection texts (the search's scorer)")
    ap.add_argument("--n-report", type=int, default=32, help="report texts (perplexity and KL reported)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    ap.add_argument("--repeats", type=int, default=10, help="runs per model per round")
    ap.add_argument("--warmup", type=int, default=2, help="untimed runs per model before the first round")
    ap.add_argument("--chunk", type=int, default=0, help="models per timing call besides dense (0: all that fit)")
    ap.add_argument("--torch-threads", type=int, default=None, help="torch threads for scoring (default: torch's)")
    ap.add_argument(
        "--regime",
        choices=("prefill", "decode"),
        default="prefill",
        help="what the searches minimise and what is timed",
    )
    ap.add_argument("--workload", default="prompt=64,new=128", help="--regime decode: one workload (hwprune search)")
    ap.add_argument("--prefill-table", default=None, help="--regime decode: also search prompt latency (this table)")
    ap.add_argument("--run", default=None, help="searches' scratch folder (default runs/bench_llm_quality_<model>)")
    ap.add_argument("-o", "--out", default=None, help="JSON result (default bench_out/llm_quality_<model>.json)")
    return ap.parse_args(argv)


def parse_targets(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise HwpruneError(f"--targets {text!r} must be comma-separated speedups such as 1.5,2") from None


def check_args(a: argparse.Namespace, targets: Sequence[float]) -> None:
    """Every bad number is one line before anything is loaded."""
    SearchConfig(targets=tuple(targets), trials=max(a.trials, 1), margin=a.margin)  # targets and margin
    least = 2 * len(targets) + 1  # every DP seed (one per target) and the dense seed get scored
    for name in ("trials", "restricted_trials"):
        v = getattr(a, name)
        if v is not None and v < least:
            raise HwpruneError(f"--{name.replace('_', '-')} must be >= {least} for {len(targets)} targets (got {v})")
    for name in ("n_calib", "n_select", "n_report", "rounds", "repeats"):
        if getattr(a, name) < 1:
            raise HwpruneError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(a, name)})")
    if a.seq is not None and a.seq < 2:
        raise HwpruneError(f"--seq must be >= 2 (got {a.seq})")
    if a.front < 2 or a.warmup < 0 or a.chunk < 0:
        raise HwpruneError(f"--front must be >= 2, --warmup and --chunk >= 0 (got {a.front}, {a.warmup}, {a.chunk})")
    if a.torch_threads is not None and a.torch_threads < 1:
        raise HwpruneError(f"--torch-threads must be >= 1 (got {a.torch_threads})")
    if a.regime == "decode":
        if not a.table:
            raise HwpruneError(
                "--regime decode needs --table, a decode table: hwprune profile --model M --regime decode "
                "--context 64,128,256 -o T_decode.parquet"
            )
        if len(parse_workloads(a.workload, "decode")) != 1:
            raise HwpruneError(f"--workload {a.workload!r}: this benchmark takes one workload, not a mix")
    elif a.prefill_table:
        raise HwpruneError("--prefill-table is for --regime decode (it adds a prompt-latency search to compare)")


# ---- text sets --------------------------------------------------------------------------------------


def text_sets(*, n_calib: int, n_select: int, n_report: int, seed: int) -> tuple[dict[str, list[str]], str, int]:
    """Disjoint report / selection / calibration texts of the built-in corpus, and the corpus's name and size."""
    from hwprune.proxies.calib import load_texts
    from hwprune.proxies.corpus import default_corpus

    sp = load_texts(None, n_calib=n_calib, n_selection=n_select, n_report=n_report, seed=seed)
    corpus = default_corpus()
    name = f"{corpus.name} [{corpus.digest}] (hwprune.proxies.corpus; report domain {corpus.report_domain})"
    return {"report": sp.report, "selection": sp.selection, "calibration": sp.calibration}, name, len(corpus.texts)


# ---- ShortGPT -------------------------------------------------------------------------------------


class _Stop(Exception):
    """Raised at the final norm: every block has run, the logits are not needed."""


@torch.inference_mode()
def block_influence(model: nn.Module, inputs: Mapping[str, torch.Tensor], *, batch: int = 8) -> np.ndarray:
    """ShortGPT's Block Influence per block: ``1 - mean cos(h_in, h_out)`` over the real (non-pad) tokens.

    ``h_in`` / ``h_out`` are the residual stream entering and leaving ``model.layers[i]`` (forward hooks);
    a pre-hook on the final norm stops the pass, so the LM head never runs.
    """
    layers = list(model.layers)  # type: ignore[arg-type]  # a Decoder's ModuleList
    sums = np.zeros(len(layers), dtype=np.float64)
    keep: list[torch.Tensor] = []  # this batch's real-token mask, (batch, len) bool

    def hook(i: int) -> Callable[[nn.Module, tuple[Any, ...], Any], None]:
        def fn(_m: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            h_in, h_out = args[0], out[0] if isinstance(out, tuple) else out
            cos = torch.nn.functional.cosine_similarity(h_in[keep[0]].float(), h_out[keep[0]].float(), dim=-1)
            sums[i] += float(cos.double().sum())

        return fn

    def stop(_m: nn.Module, _args: Any) -> None:
        raise _Stop

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    handles.append(model.norm.register_forward_pre_hook(stop))  # type: ignore[union-attr]
    tokens = 0
    try:
        for ids, mask in length_batches(inputs, batch):
            keep[:] = [mask.bool()]
            tokens += int(mask.sum())
            with suppress(_Stop):
                model(ids, mask)
    finally:
        for h in handles:
            h.remove()
    return 1.0 - sums / max(tokens, 1)


# ---- spaces and members -------------------------------------------------------------------------------


def restricted(space: PruningSpace, kind: str) -> PruningSpace:
    """``depth``: every unit {0, full}; ``width``: every size of ``space`` but 0."""
    units = []
    for u in space.units:
        sizes = tuple(s for s in u.sizes if s in (0, u.full)) if kind == "depth" else tuple(s for s in u.sizes if s)
        units.append(dataclasses.replace(u, sizes=sizes))
    what = "{0, full} per unit" if kind == "depth" else "no unit removed (size 0 dropped)"
    return PruningSpace(units=tuple(units), model=space.model, source=f"{space.source}, {kind}-only: {what}")


def restrict_state(state: ProxyState, space: PruningSpace) -> ProxyState:
    """The fitted proxy over a sub-space of its own (same units, fewer sizes): the same removal orders and
    error curves, seen through ``space``'s sizes; reconstructions cached once serve both. For OBS this is
    what a fit on ``space`` computes (the greedy order is the same, the curve at a size depends only on
    the removals above it), without fitting again."""
    from hwprune.proxies.database import Track

    if [u.name for u in space.units] != [u.name for u in state.space.units]:
        raise HwpruneError("a restricted space must keep the units of the space the proxy was fitted on")
    tracks = getattr(state, "tracks", None)
    if not isinstance(tracks, list) or not all(isinstance(t, Track) for t in tracks):
        raise HwpruneError(f"proxy {state.name!r} keeps no per-unit tracks; it cannot be restricted to a sub-space")
    out = copy.copy(state)  # shares the fit and its cache of reconstructed levels (same unit indices)
    out.space = space
    out.tracks = [dataclasses.replace(t, unit=u) for t, u in zip(tracks, space.units)]  # type: ignore[attr-defined]
    return out


def nearest_nonzero(sizes: Sequence[int], want: float) -> int:
    """The non-zero size nearest ``want`` (ties: the larger)."""
    return min((s for s in sizes if s > 0), key=lambda s: (abs(s - want), -s))


def uniform_candidates(space: PruningSpace) -> list[tuple[str, Candidate]]:
    """Every uniform width of ``space``: per FFN size n of the first FFN unit, fraction f = n / full; every
    unit keeps its allowed non-zero size nearest f * full (ties: larger). Name ``g<groups>-f<ffn>``."""
    ffn = [u for u in space.units if u.kind == "ffn"]
    if not ffn:
        raise HwpruneError("uniform width needs FFN units in the space")
    out: dict[tuple[int, ...], str] = {}
    for n in (s for s in ffn[0].sizes if s > 0):
        f = n / ffn[0].full
        sizes = tuple(nearest_nonzero(u.sizes, f * u.full) for u in space.units)
        attn = [s for u, s in zip(space.units, sizes) if u.kind == "attn"]
        out.setdefault(sizes, f"g{attn[0] if attn else 0}-f{n}")
    return [(name, Candidate(sizes)) for sizes, name in out.items()]


def shortgpt_candidates(space: PruningSpace, bi: np.ndarray) -> list[tuple[str, Candidate, list[int]]]:
    """Remove the k lowest-BI blocks, k = 1 .. layers - 1: (name, candidate, removed blocks)."""
    order = [int(i) for i in np.argsort(bi, kind="stable")]
    out = []
    for k in range(1, len(bi)):
        gone = set(order[:k])
        sizes = tuple(0 if u.layer in gone else u.full for u in space.units)
        out.append((f"k{k}", Candidate(sizes), sorted(gone)))
    return out


def bracket(members: Sequence[tuple[str, float]], ref_ms: float, n: int) -> list[str]:
    """``n`` members around ``ref_ms`` by predicted ms: the fastest one predicted slower, then the slowest
    ones predicted at or below it (as many as are left)."""
    ranked = sorted(members, key=lambda m: -m[1])  # least pruned first
    i = next((j for j, (_, ms) in enumerate(ranked) if ms <= ref_ms), len(ranked) - 1)
    lo = max(0, min(i - 1, len(ranked) - n))
    return [name for name, _ in ranked[lo : lo + n]]


# ---- per-model report ---------------------------------------------------------------------------------


def layout(space: PruningSpace, cand: Candidate) -> dict[str, Any]:
    """Per-layer kept KV groups and FFN neurons of ``cand`` and its removed blocks."""
    layers = sorted({u.layer for u in space.units})
    by = {(u.layer, u.kind): s for u, s in zip(space.units, cand.sizes)}
    kv = [by.get((i, "attn"), -1) for i in layers]
    ffn = [by.get((i, "ffn"), -1) for i in layers]
    return {"kv_groups": kv, "ffn": ffn, "removed_blocks": [i for i, g, f in zip(layers, kv, ffn) if g == 0 and f == 0]}


def builder(state: ProxyState, cand: Candidate) -> Callable[[], nn.Module]:
    """Build ``cand`` from ``state`` when called (models are built one at a time, then dropped)."""
    return lambda: state.build(cand)


def compare(
    rows: Mapping[str, dict[str, Any]], fronts: Mapping[str, list[str]], targets: Sequence[float]
) -> dict[str, Any]:
    """Per target: hwprune's pick, the restricted picks, and each peer's lowest-perplexity front member
    measured at or below the pick's measured ms (None when every member is slower)."""
    out: dict[str, Any] = {}
    for t in targets:
        pick = f"hwprune@{t:g}x"
        if pick not in rows:
            continue
        pick_ms = rows[pick]["measured_ms"]
        entry: dict[str, Any] = {"hwprune": pick, "measured_ms": pick_ms}
        for variant in VARIANTS[1:]:
            name = f"{variant}@{t:g}x"
            if variant != "hwprune_prefill" or name in rows:
                entry[variant] = name if name in rows else None
        for peer, names in fronts.items():
            ok = [n for n in names if rows[n]["measured_ms"] <= pick_ms]
            best = min(ok, key=lambda n: (rows[n]["perplexity"], n)) if ok else None
            # same kept sizes as the pick (other weights): the same graph, so any measured gap is timing noise
            twins = [n for n in names if rows[n].get("candidate_key") == rows[pick].get("candidate_key")]
            entry[peer] = {"best": best, "front": names, "same_shape_as_pick": twins}
        out[f"{t:g}"] = entry
    return out


def regime_comparison(rows: Mapping[str, dict[str, Any]], targets: Sequence[float]) -> dict[str, Any]:
    """Per target: the decode-regime pick and the prefill-regime pick, each with its tokens/s speedup,
    prompt speedup and perplexity, and which regime each wins."""
    out: dict[str, Any] = {}
    for t in targets:
        d, p = rows.get(f"hwprune@{t:g}x"), rows.get(f"hwprune_prefill@{t:g}x")
        if d is None or p is None:
            continue
        keys = ("measured_speedup", "prompt_measured_speedup", "perplexity", "kl", "candidate_key")
        out[f"{t:g}"] = {
            "decode_pick": {k: d.get(k) for k in keys},
            "prefill_pick": {k: p.get(k) for k in keys},
            "same_subnet": d.get("candidate_key") == p.get("candidate_key"),
            "faster_in_tokens_per_s": "decode_pick"
            if d["measured_speedup"] >= p["measured_speedup"]
            else "prefill_pick",
            "faster_in_prompt": "decode_pick"
            if d["prompt_measured_speedup"] >= p["prompt_measured_speedup"]
            else "prefill_pick",
            "lower_perplexity": "decode_pick" if d["perplexity"] <= p["perplexity"] else "prefill_pick",
        }
    return out


def print_regimes(cmp: Mapping[str, Any]) -> None:
    print(
        f"\nregimes: the same target searched for tokens/s (decode) and for prompt latency (prefill, seq "
        f"{cmp['prompt_seq']})"
    )
    for t, e in cmp.get("per_target", {}).items():
        for k in ("decode_pick", "prefill_pick"):
            r = e[k]
            print(
                f"{t:>6} {k:13s} tokens/s {r['measured_speedup']:.2f}x  prompt {r['prompt_measured_speedup']:.2f}x  "
                f"ppl {r['perplexity']:.3f}  ({r['candidate_key']})"
            )


def print_table(rows: Mapping[str, dict[str, Any]], per_target: Mapping[str, Any], fronts: Mapping[str, Any]) -> None:
    print(f"{'target':>6} {'model':30s} {'ms':>8} {'speedup':>7} {'pred':>6} {'ppl':>10} {'KL':>7}")
    for t, e in per_target.items():
        shown = [(f" ({v})", e[v]) for v in VARIANTS if v in e]
        shown += [(f" (best {p})", e[p]["best"]) for p in fronts]
        for label, n in shown:
            if n is None:
                why = "unreachable in its space" if label.strip(" ()") in VARIANTS else "none at or below hwprune's ms"
                print(f"{t:>6} {'-' + label:30s} {why}")
                continue
            r = rows[n]
            print(
                f"{t:>6} {n:30s} {r['measured_ms']:8.1f} {r['measured_speedup']:6.2f}x "
                f"{r['predicted_speedup']:5.2f}x {r['perplexity']:10.3f} {r['kl']:7.4f}"
            )


def chunk_size(onnx_bytes: Sequence[int], dense_bytes: int, asked: int) -> int:
    """``asked``, or as many models as fit in the memory free now beside the dense session."""
    if asked:
        return asked
    free = 8 << 30
    with suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
    mean = max(statistics.fmean(onnx_bytes) if onnx_bytes else 1, 1)
    return max(1, int((free - HEADROOM - SESSION_FACTOR * dense_bytes) // (SESSION_FACTOR * mean)))


def plot(
    path: Path,
    models: Mapping[str, dict[str, Any]],
    fronts: Mapping[str, list[str]],
    targets: Sequence[float],
    title: str,
    xlabel: str = "measured speedup over dense (ONNX Runtime)",
) -> None:
    """Perplexity (log) vs measured speedup: peer fronts as lines, hwprune's picks as markers."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from hwprune._io import atomic_path

    fig = Figure(figsize=(8, 5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()

    def pts(names: Sequence[str]) -> tuple[list[float], list[float]]:
        rows = sorted((models[n] for n in names), key=lambda r: r["measured_speedup"])
        rows = [r for r in rows if math.isfinite(r["perplexity"])]
        return [r["measured_speedup"] for r in rows], [r["perplexity"] for r in rows]

    styles = {"shortgpt": ("o-", "tab:blue"), "flap": ("s-", "tab:green"), "magnitude": ("^-", "tab:olive")}
    for peer, names in fronts.items():
        x, y = pts(names)
        fmt, color = styles.get(peer, ("x-", "gray"))
        ax.plot(x, y, fmt, color=color, label=f"{peer} (front)", alpha=0.8)
    marks = {
        "hwprune": ("*", "tab:red", 14),
        "depth_only": ("D", "tab:purple", 8),
        "width_only": ("v", "tab:orange", 9),
        "hwprune_prefill": ("P", "tab:brown", 10),
    }
    for variant, (m, color, size) in marks.items():
        x, y = pts([n for n, r in models.items() if r["method"] == variant])
        if x:
            ax.plot(x, y, m, color=color, markersize=size, linestyle="none", label=variant)
    dense = models["dense"]
    ax.plot([1.0], [dense["perplexity"]], "kx", markersize=9, label="dense")
    for t in targets:
        ax.axvline(t, color="gray", linestyle=":", linewidth=1)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("report-set perplexity (log)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


# ---- main -----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    old_threads = torch.get_num_threads()
    try:
        targets = parse_targets(a.targets)
        check_args(a, targets)
        if a.torch_threads is not None:
            torch.set_num_threads(a.torch_threads)
        return run(a, argv, targets)
    except HwpruneError as e:
        return fail(e)
    finally:
        torch.set_num_threads(old_threads)


def run(a: argparse.Namespace, argv: list[str] | None, targets: tuple[float, ...]) -> int:
    from hwprune.families.decoder.adapter import DecoderAdapter
    from hwprune.families.decoder.collect import collect_stats
    from hwprune.latency import profile

    t_start = time.perf_counter()
    seconds: dict[str, float] = {}
    mark = [t_start]

    def phase(name: str) -> None:
        now = time.perf_counter()
        seconds[name] = round(now - mark[0], 1)
        mark[0] = now
        print(f"[{now - t_start:6.0f} s] {name} done ({seconds[name]:.0f} s)", flush=True)

    name = stem(a.model)
    out = Path(a.out or OUT_DIR / f"llm_quality_{name}.json")
    run_dir = Path(a.run or f"runs/bench_llm_quality_{name}")
    sets, corpus, corpus_n = text_sets(n_calib=a.n_calib, n_select=a.n_select, n_report=a.n_report, seed=a.seed)

    adapter: Family = load_adapter(a.model)
    if not isinstance(adapter, DecoderAdapter):
        raise HwpruneError(f"--model {a.model} is a {adapter.family} model; this benchmark needs a decoder (LLM)")
    dense = adapter.dense()
    space = adapter.space(a.space)
    if any(0 not in u.sizes for u in space.units):
        raise HwpruneError(f"{space.source}: every unit must allow removal (0) for depth-only search and ShortGPT")
    phase("load")

    # ---- latency table
    decode = a.regime == "decode"
    table_source = "given"
    table_path = Path(a.table) if a.table else None
    if table_path is None:
        seq0 = a.seq or 128
        table_path = (
            Path("latency_tables/local")
            / default_table_path(adapter, runtime="ort-cpu", threads=1, batch=1, seq=seq0).name
        )
        table_source = "found"
        if not table_path.is_file():
            table_source = "profiled"
            profile(
                adapter,
                runtime="ort-cpu",
                threads=1,
                batch=1,
                seq=seq0,
                space=space,
                out=table_path,
                progress=False,
                budget_s=a.profile_budget_s,
            )
    table = LatencyTable.load(table_path)
    table.check_model(adapter)
    table.check_regime(a.regime)
    settings = dict(table.settings)
    runtime, threads = str(settings.get("runtime", "ort-cpu")), int(settings.get("threads", 1))
    batch, seq = int(settings.get("batch", 1)), int(settings.get("seq", 128))
    if decode:
        seq = a.seq or 128  # the text sets' rows; a decode table's own seq is its one new token
    elif a.seq is not None and a.seq != seq:
        raise HwpruneError(f"--seq {a.seq} but the table {table_path} was measured at seq {seq}; drop one of them")
    warnings = table.machine_warnings(runtime, threads)
    wls = parse_workloads(a.workload, "decode") if decode else []
    ptable = LatencyTable.load(a.prefill_table) if a.prefill_table else None
    if ptable is not None:
        ptable.check_model(adapter)
        ptable.check_regime("prefill")

    def objective(sp: PruningSpace) -> Any:
        """What a search over ``sp`` minimises: the workload's mean decode step, or prompt latency."""
        if not decode:
            return make_predictor(table, sp, adapter)
        wp = workload_predictor(
            "decode",
            wls,
            tables={"decode": table},
            predictor=lambda t: with_context_factor(adapter.predictor(t, sp), t),
        )
        warnings.extend(w for w in wp.warnings if w not in warnings)
        return wp

    predictor = objective(space)
    for w in warnings:
        print("warning:", w)
    dense_pred = predictor.dense_ms()
    check_reachable(SearchConfig(targets=targets, margin=a.margin), predictor)  # before any long step
    phase(f"table ({table_source})")

    # ---- data, proxies, Block Influence
    tok = {k: adapter.tokenize(v, seq=seq) for k, v in sets.items()}
    for part, inputs in tok.items():
        if int(inputs["attention_mask"][:, 1:].sum()) < 1:
            raise HwpruneError(f"the {part} texts hold no next-token targets at --seq {seq}")
    select_calib = CalibData(calib=tok["calibration"], heldout=tok["selection"], source=f"{corpus} seed={a.seed}")
    report_calib = CalibData(calib=tok["calibration"], heldout=tok["report"], source=f"{corpus} seed={a.seed}")
    stats = collect_stats(dense, tok["calibration"])
    states: dict[str, ProxyState] = {
        p: adapter.fit_proxy(p, space, select_calib, stats=stats, progress=False) for p in ("obs", "flap", "magnitude")
    }
    del stats
    phase("calibration statistics and proxies (obs, flap, magnitude)")
    bi = block_influence(dense, tok["calibration"])
    phase("ShortGPT block influence")

    # ---- searches
    select_scorer = adapter.scorer(select_calib)
    spaces = {"hwprune": space, "depth_only": restricted(space, "depth"), "width_only": restricted(space, "width")}
    if ptable is not None:
        spaces["hwprune_prefill"] = space
    search_info: dict[str, dict[str, Any]] = {}
    picks: dict[str, dict[float, Any]] = {}
    for variant, sp in spaces.items():
        trials = a.trials if variant in HWPRUNE else (a.restricted_trials or a.trials)
        state = states["obs"] if variant in HWPRUNE else restrict_state(states["obs"], sp)
        if variant == "hwprune_prefill":
            assert ptable is not None
            pred = make_predictor(ptable, sp, adapter)
        else:
            pred = predictor if variant == "hwprune" else objective(sp)
        ok = list(targets)
        info: dict[str, Any] = {"space": sp.source, "space_size": sp.size(), "trials": trials}
        while ok:
            try:
                check_reachable(SearchConfig(targets=tuple(ok), margin=a.margin), pred)
                break
            except TargetUnreachableError as e:  # only a restricted space: the full one was checked above
                info.setdefault("unreachable", {})[str(max(ok))] = str(e)
                ok.remove(max(ok))
        picks[variant] = {}
        if ok:
            sub = run_dir / variant
            if sub.exists():
                shutil.rmtree(sub)  # this script's scratch: a stale study would resume with other data
            cfg = SearchConfig(targets=tuple(ok), trials=trials, seed=a.seed, margin=a.margin)
            res = search(
                space=sp,
                predictor=pred,
                proxy_state=state,
                scorer=select_scorer,
                config=cfg,
                run_dir=sub,
                progress=False,
            )
            picks[variant] = dict(res.picks)
            info.update(evaluated=len(res.evaluations), run_dir=str(sub), front=len(res.front))
        search_info[variant] = info
        phase(f"search {variant} ({trials} trials)")
    del select_scorer

    # ---- every model to build, score and time
    Builder = Callable[[], nn.Module]
    entries: dict[str, tuple[Builder, Candidate, dict[str, Any]]] = {}
    for variant, vp in picks.items():
        st = states["obs"] if variant in HWPRUNE else restrict_state(states["obs"], spaces[variant])
        for t, ev in vp.items():
            extra = {
                "method": variant,
                "target": t,
                "selection_kl": float(ev.distance),
                "proxy": "obs",
                "search_source": ev.source,  # dp, uniform (seed), nsga or dense
            }
            entries[f"{variant}@{t:g}x"] = (builder(st, ev.candidate), ev.candidate, extra)
    pick_pred = {t: predictor.predict(ev.candidate) for t, ev in picks["hwprune"].items()}
    members: dict[str, list[tuple[str, Candidate, dict[str, Any]]]] = {
        "shortgpt": [(f"shortgpt-{n}", c, {"removed_blocks": g}) for n, c, g in shortgpt_candidates(space, bi)],
        "flap": [(f"flap-{n}", c, {}) for n, c in uniform_candidates(space)],
        "magnitude": [(f"magnitude-{n}", c, {}) for n, c in uniform_candidates(space)],
    }
    fronts: dict[str, list[str]] = {}
    for peer, mem in members.items():
        pred_ms = [(n, predictor.predict(c)) for n, c, _ in mem]
        chosen = {n for t in pick_pred for n in bracket(pred_ms, pick_pred[t], a.front)}
        by = {n: (c, x) for n, c, x in mem}
        fronts[peer] = [n for n, _, _ in mem if n in chosen]
        st = states["magnitude"] if peer == "shortgpt" else states[peer]  # ShortGPT: plain block removal
        for n in fronts[peer]:
            c, x = by[n]
            entries[n] = (builder(st, c), c, {"method": peer, "proxy": st.name, **x})

    report_scorer = adapter.scorer(report_calib)
    dense_ppl = float(report_scorer.dense_perplexity)
    tmp = tempfile.TemporaryDirectory(prefix="bench_llm_quality_")
    onnx_dir = Path(tmp.name)
    rows: dict[str, dict[str, Any]] = {}
    try:
        dense_onnx = onnx_dir / "dense.onnx"
        pseq = int(ptable.settings.get("seq", 128)) if ptable is not None else seq

        def export(model: nn.Module, path: Path) -> None:
            """The graph this regime times: decoder.onnx for decode, the prompt graph otherwise."""
            if decode:
                path.write_bytes(decode_graph(adapter, model))
            else:
                candidate_onnx(adapter, model, batch=batch, seq=seq, path=path)

        export(dense, dense_onnx)
        if ptable is not None:
            candidate_onnx(adapter, dense, batch=batch, seq=pseq, path=onnx_dir / "dense_prompt.onnx")
        rows["dense"] = {
            "method": "dense",
            **layout(space, space.dense()),
            "predicted_ms": dense_pred,
            "perplexity": dense_ppl,
            "kl": 0.0,
            "top1_agreement": 1.0,
            "params": sum(p.numel() for p in dense.parameters()),
        }
        for i, (n, (build, cand, extra)) in enumerate(entries.items()):
            model = build()
            sc = report_scorer.score(model)
            rows[n] = {
                **extra,
                "candidate_key": cand.key(),
                "_cand": cand,
                **layout(space, cand),
                "predicted_ms": predictor.predict(cand),
                "perplexity": float(sc["perplexity"]),
                "kl": float(sc["kl"]),
                "top1_agreement": float(sc["top1_agreement"]),
                "params": sum(p.numel() for p in model.parameters()),
            }
            export(model, onnx_dir / f"m{i}.onnx")
            rows[n]["_onnx"] = str(onnx_dir / f"m{i}.onnx")
            if ptable is not None and extra.get("method") in HWPRUNE:
                candidate_onnx(adapter, model, batch=batch, seq=pseq, path=onnx_dir / f"p{i}.onnx")
                rows[n]["_prompt_onnx"] = str(onnx_dir / f"p{i}.onnx")
            del model
            print(f"  {n:28s} ppl {rows[n]['perplexity']:10.3f}  kl {rows[n]['kl']:.4f}", flush=True)
        phase(f"build, score and export {len(entries) + 1} models")
        names = list(entries)
        entries.clear()  # the builders hold the proxy states: free them before the sessions load
        del report_scorer, states
        gc.collect()

        # ---- timing
        backend = get_backend(runtime, threads=threads)
        feed = timing_feed(adapter, batch=batch, seq=seq)
        sizes = [Path(rows[n]["_onnx"]).stat().st_size for n in names]
        dense_bytes = dense_onnx.read_bytes()
        per = chunk_size(sizes, len(dense_bytes), a.chunk)
        chunks = [names[i : i + per] for i in range(0, len(names), per)] or [[]]
        dense_per_chunk: list[float] = []
        got: dict[str, tuple[float, float, int, float]] = {}  # name -> (ms, speedup, chunk, spread %)
        controls: list[float | None] = []
        workload_rows: dict[str, dict[str, Any]] = {}
        for ci, chunk in enumerate(chunks):
            pruned = {n: Path(rows[n]["_onnx"]).read_bytes() for n in chunk}
            if decode:  # as export times decode steps; the dense graph again, loaded last: the control
                graphs = {"dense": dense_bytes, **pruned, "dense (control)": dense_bytes}
                wt = measure_workload(backend, graphs, wls[0], rounds=a.rounds, repeats=a.repeats, warmup=a.warmup)
                d_ms = wt["dense"]["decode_step_ms"]
                dense_per_chunk.append(d_ms)
                controls.append(100.0 * (wt["dense (control)"]["decode_step_ms"] / d_ms - 1))
                for n in chunk:
                    got[n] = (wt[n]["decode_step_ms"], d_ms / wt[n]["decode_step_ms"], ci, None)
                    workload_rows[n] = wt[n]
                workload_rows.setdefault("dense", wt["dense"])
            else:
                cmp = measure_dense_and_pruned(
                    backend,
                    dense=dense_bytes,
                    pruned=pruned,
                    feed=feed,
                    rounds=a.rounds,
                    repeats=a.repeats,
                    warmup=a.warmup,
                )
                dense_per_chunk.append(cmp.dense.median_ms)
                controls.append(cmp.control_pct)
                for n in chunk:
                    m = cmp.pruned[n]
                    got[n] = (m.median_ms, cmp.speedup(n), ci, m.spread_pct)
            del pruned
            gc.collect()
            print(
                f"  timed chunk {ci + 1}/{len(chunks)}: dense {dense_per_chunk[-1]:.1f} ms, control "
                f"{controls[-1] if controls[-1] is not None else float('nan'):+.1f} %",
                flush=True,
            )
        timing_settings = {
            "runtime": runtime,
            "runtime_version": backend.version(),
            "threads": threads,
            "rounds": a.rounds,
            "repeats": a.repeats,
            "warmup": a.warmup,
            "dense_control_pct_per_chunk": controls,
        }
        regime_cmp: dict[str, Any] = {}
        if ptable is not None:  # both hwprune searches' picks on the prompt graph too
            both = [n for n in names if "_prompt_onnx" in rows[n]]
            pc = measure_dense_and_pruned(
                backend,
                dense=(onnx_dir / "dense_prompt.onnx").read_bytes(),
                pruned={n: Path(rows[n]["_prompt_onnx"]).read_bytes() for n in both},
                feed=timing_feed(adapter, batch=batch, seq=pseq),
                rounds=a.rounds,
            )
            for n in both:
                rows[n].update(
                    prompt_measured_ms=pc.pruned[n].median_ms,
                    prompt_measured_speedup=pc.speedup(n),
                    prompt_predicted_ms=make_predictor(ptable, space, adapter).predict(rows[n]["_cand"]),
                )
            regime_cmp = {
                "prompt_seq": pseq,
                "prompt_dense_ms": pc.dense.median_ms,
                "prompt_control_pct": pc.control_pct,
            }
            print(f"  timed {len(both)} hwprune picks on the prompt graph (seq {pseq})", flush=True)
        phase(f"timing ({len(chunks)} chunk(s))")
    finally:
        tmp.cleanup()
    dense_ms = statistics.median(dense_per_chunk)
    rows["dense"].update(measured_ms=dense_ms, measured_speedup=1.0, predicted_speedup=1.0)
    for n, (raw_ms, speedup, ci, spread) in got.items():
        r = rows[n]
        for k in ("_onnx", "_prompt_onnx", "_cand"):
            r.pop(k, None)
        if n in workload_rows:
            w = workload_rows[n]
            r["workload_measured"] = {k: w[k] for k in ("ttft_ms", "decode_ms", "decode_step_ms", "tokens_per_s")}
        r.update(
            measured_ms=dense_ms / speedup,
            measured_speedup=speedup,
            chunk=ci,
            spread_pct=spread,
            raw_measured_ms=raw_ms,
            predicted_speedup=dense_pred / r["predicted_ms"],
        )

    if "dense" in workload_rows:
        w = workload_rows["dense"]
        rows["dense"]["workload_measured"] = {
            k: w[k] for k in ("ttft_ms", "decode_ms", "decode_step_ms", "tokens_per_s")
        }
    per_target = compare(rows, fronts, targets)
    if regime_cmp:
        regime_cmp["per_target"] = regime_comparison(rows, targets)
        print_regimes(regime_cmp)
    print(f"\ndense: {dense_ms:.1f} ms measured, perplexity {dense_ppl:.3f} on {len(sets['report'])} report texts")
    print_table(rows, per_target, fronts)

    png = out.with_suffix(".png")
    if decode:
        title = f"{adapter.name}: quality vs measured tokens/s ({a.workload}, no fine-tuning)"
        plot(png, rows, fronts, targets, title, xlabel="measured tokens/s speedup over dense (decoder.onnx, ORT)")
    else:
        plot(png, rows, fronts, targets, f"{adapter.name}: quality vs measured speedup (seq {seq}, no fine-tuning)")
    tokens = {k: int(v["attention_mask"].sum()) for k, v in tok.items()}
    seconds["total"] = round(time.perf_counter() - t_start, 1)
    result = {
        "model": a.model,
        "regime": a.regime,
        "workload": wls[0].to_json() if decode else None,
        "objective": "mean decode step ms over the workload (1 / tokens-per-second)" if decode else "prompt ms",
        "targets": list(targets),
        "seq": seq,
        "batch": batch,
        "seed": a.seed,
        "settings": {
            "trials": a.trials,
            "restricted_trials": a.restricted_trials or a.trials,
            "margin": a.margin,
            "front": a.front,
            "torch_threads": torch.get_num_threads(),
            "space": space.source,
        },
        "table": str(table_path),
        "table_source": table_source,
        "table_warnings": warnings,
        "texts": {
            "corpus": corpus,
            "distinct_texts": corpus_n,
            "split": "deduplicated, shuffled with --seed; report = first n_report, selection = next n_select, "
            "calibration = next n_calib (disjoint)",
            **{k: {"texts": len(sets[k]), "tokens": tokens[k]} for k in ("calibration", "selection", "report")},
            "uses": {
                "calibration": "proxy statistics (obs, flap, magnitude) and ShortGPT block influence",
                "selection": "the search's end-to-end scorer (KL to dense)",
                "report": "perplexity and KL to dense reported here",
            },
        },
        "searches": search_info,
        "peers": {
            "shortgpt": "remove the k blocks of lowest Block Influence (1 - mean cos(h_in, h_out) over calibration "
            "tokens, dense model); plain removal",
            "flap": "uniform width (same KV groups and FFN neurons in every layer), FLAP fluctuation ranking",
            "magnitude": "uniform width, weight-magnitude ranking",
            "front": f"per target, the {a.front} members nearest the hwprune pick's predicted ms (one predicted "
            "slower, the rest at or below), pooled over targets",
        },
        "block_influence": [round(float(x), 6) for x in bi],
        "timing": {
            **timing_settings,
            "clock": backend.clock,
            "chunks": len(chunks),
            "chunk_size": per,
            "dense_ms_per_chunk": dense_per_chunk,
            "rescaled": len(chunks) > 1,
            "note": "every chunk is one measure_dense_and_pruned call with the dense model; speedup = the "
            "chunk's dense ms / the model's ms, measured_ms = median dense ms over chunks / speedup"
            if len(chunks) > 1
            else "one measure_dense_and_pruned call for every model",
        },
        "dense": rows["dense"],
        "models": rows,
        "fronts": fronts,
        "per_target": per_target,
        "regime_comparison": regime_cmp or None,
        "prefill_table": str(a.prefill_table) if a.prefill_table else None,
        "plot": str(png),
        "seconds": seconds,
    }
    write_result(
        out, result, script=__file__, argv=argv, machine_facts=machine(runtime, threads=threads, batch=batch, seq=seq)
    )
    return 0


if __name__ == "__main__":
    reexec_for_timing()  # huge pages: identical sessions time alike (hwprune.latency.pages)
    sys.exit(main())
