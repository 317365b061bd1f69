"""Peak memory of calibration + the OBS database + one search trial on a decoder LLM, against its fp32 weights.

    python scripts/bench_memory.py --model llama-3.2-1b -o bench_out/memory_llama-3.2-1b.json

What runs, in one process, each phase exactly as ``hwprune search`` runs it:

1. the model (``llama-3.2-1b``: random weights of Llama 3.2 1B's shape, built in place, nothing
   downloaded) and its calibration / selection text (``load_calib``: ``--n-calib`` sequences of
   ``--seq`` tokens from the default corpus, ``--n-select`` disjoint ones for the trial);
2. calibration statistics, layer by layer (``collect_stats``; spilled to a temporary folder when a
   whole model's would exceed ``SPILL_BYTES``) and the OBS database (``fit_proxy("obs")``);
3. one search trial: a candidate keeping about ``--keep`` of every unit (a DP-like mid point), its
   ``scoring_model`` (blocks sliced one at a time) scored by the family's end-to-end scorer (KL to the
   dense model on the selection text).

Peak resident memory is read from the kernel (``VmHWM``), reset before each phase
(``/proc/self/clear_refs``) so each phase's own peak is known; ``peak_rss_bytes`` is the maximum.
``fp32_weight_bytes`` counts every parameter once (tied embeddings once) at 4 bytes. Goal (issue 8):
``peak_rss_bytes <= 1.3 * fp32_weight_bytes``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import fail, write_result

from hwprune.errors import HwpruneError


def _vm(field: str) -> int:
    """A /proc/self/status figure in bytes (VmHWM: peak resident set; VmRSS: now)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where the kernel refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class Phases:
    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.resettable = _reset_peak()

    def run(self, name: str, fn: Any) -> Any:
        self.resettable = _reset_peak() and self.resettable
        before, t0 = _vm("VmRSS"), time.perf_counter()
        out = fn()
        self.rows.append(
            {
                "phase": name,
                "seconds": round(time.perf_counter() - t0, 1),
                "rss_before_bytes": before,
                "peak_rss_bytes": _vm("VmHWM"),
                "rss_after_bytes": _vm("VmRSS"),
            }
        )
        r = self.rows[-1]
        print(f"{name}: {r['seconds']} s, peak {r['peak_rss_bytes'] / 2**30:.2f} GiB", flush=True)
        return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama-3.2-1b", help="a decoder: llama-3.2-1b, qwen2.5-0.5b, gpt2, smollm2")
    p.add_argument("--n-calib", type=int, default=128, help="calibration sequences")
    p.add_argument(
        "--n-select", type=int, default=16, help="selection sequences scored by the trial (the family's default)"
    )
    p.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    p.add_argument("--batch", type=int, default=4, help="sequences per forward batch")
    p.add_argument("--keep", type=float, default=0.6, help="fraction of every unit the trial's candidate keeps")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("-o", "--out", default=None, help="JSON result (default bench_out/memory_<model>.json)")
    args = p.parse_args(argv)
    try:
        return _run(args, argv)
    except HwpruneError as e:
        return fail(e)


def _run(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    from hwprune.api import load_adapter
    from hwprune.families.decoder import database
    from hwprune.families.decoder.scorer import DecoderScorer
    from hwprune.proxies._base import fit_proxy
    from hwprune.space import Candidate

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    ph = Phases()
    baseline = _vm("VmRSS")
    adapter: Any = ph.run("load model", lambda: load_adapter(args.model))
    model = adapter.dense()
    if adapter.family != "decoder":
        raise HwpruneError(f"--model {args.model} is a {adapter.family} model; this benchmark is for decoders")
    weights = {id(t): t.numel() * 4 for t in model.parameters()}
    fp32 = sum(weights.values())
    space = adapter.space()
    calib = ph.run(
        "calibration text",
        lambda: adapter.load_calib(None, n_calib=args.n_calib, n_heldout=args.n_select, seq=args.seq, seed=0),
    )
    state: Any = ph.run(
        "calibration statistics + OBS database",
        lambda: fit_proxy("obs", adapter, space, calib, batch=args.batch, progress=True),
    )
    cand = Candidate(tuple(u.sizes[min(range(len(u.sizes)), key=lambda k: abs(u.sizes[k] - args.keep * u.full))]
                           for u in space.units))  # fmt: skip
    scorer = ph.run("scorer (dense reference)", lambda: DecoderScorer(adapter, calib.heldout, batch=args.batch))
    scores = ph.run("one search trial", lambda: scorer.score(state.scoring_model(cand)))
    peak = max(r["peak_rss_bytes"] for r in ph.rows)
    result = {
        "model": args.model,
        "settings": {
            "n_calib": args.n_calib,
            "n_select": args.n_select,
            "seq": args.seq,
            "batch": args.batch,
            "keep": args.keep,
            "threads": torch.get_num_threads(),
            "spilled_statistics": database.stats_bytes(model.config) > database.SPILL_BYTES,
            "statistics_bytes": database.stats_bytes(model.config),
            "peak_reset_per_phase": ph.resettable,
            "scorer_dense_logprobs": "in memory" if scorer.cached else "temporary file",
        },
        "fp32_weight_bytes": fp32,
        "params": fp32 // 4,
        "peak_rss_bytes": peak,
        "peak_over_fp32_weights": round(peak / fp32, 4),
        "goal": "peak_rss_bytes <= 1.3 x fp32_weight_bytes",
        "goal_met": peak <= 1.3 * fp32,
        "baseline_rss_bytes": baseline,
        "phases": ph.rows,
        "trial": {"candidate": cand.key(), "scores": scores},
    }
    out = args.out or f"bench_out/memory_{args.model}.json"
    write_result(out, result, script=__file__, argv=argv)
    print(
        f"peak RSS {peak / 2**30:.2f} GiB = {peak / fp32:.3f} x fp32 weights ({fp32 / 2**30:.2f} GiB); "
        f"goal <= 1.3: {'met' if peak <= 1.3 * fp32 else 'NOT met'}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
