"""How a decode step is timed changes what it measures: three protocols against a decode table.

    python scripts/bench_decode_protocol.py --model smollm2 --table T.parquet --context 128 --subnets 8 \\
        -o bench_out/decode_protocol_smollm2.json

For each subnet (drawn as ``bench_decode_latency.py`` draws them, the dense model first), three sessions
of its ``decoder.onnx``, each timed one new token at a time in the same shuffled interleaved rounds:

- ``own``: a session that only ever sees a KV cache of ``--context`` positions (how the table's chains
  are timed, and ``bench_decode_latency.py --per-context-sessions``);
- ``shared``: a session that also serves a second context (``--other``, 1024), in its own runs of
  ``--per-round`` calls shuffled among the others (how ``hwprune export``, the profile's anchors and
  ``bench_decode_latency.py`` time decode steps);
- ``generate``: a session fed as a generation loop feeds it, the cache one position longer on every call
  (``--context`` ... ``--context + per_round - 1``, then again): what a user's tokens/s is made of.

Each protocol's raw error against the table's prediction, per subnet and as a MAPE, is written out; a
protocol is fit to test the table with when it agrees with ``generate``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import OUT_DIR, fail, machine, stem, write_result
from bench_decode_latency import pruned_graph
from bench_latency import sample_subnets

from hwprune.api import load_adapter, make_predictor
from hwprune.errors import HwpruneError
from hwprune.export.workload_timing import decode_graph, graph_inputs, step_feed
from hwprune.latency import LatencyTable, get_backend
from hwprune.latency.backends import Runner, interleave

PROTOCOLS = ("own", "shared", "generate")


class GrowingRunner(Runner):
    """A runner whose cache grows by one position per call, cycling through ``feeds``."""

    def __init__(self, session: Any, feeds: list[dict[str, np.ndarray]], *, cpu_clock: bool) -> None:
        super().__init__(session, feeds[0], cpu_clock=cpu_clock)
        names = {i.name for i in session.get_inputs()}
        self.feeds = [{k: np.ascontiguousarray(v) for k, v in f.items() if k in names} for f in feeds]
        self.i = 0

    def sample(self, n: int) -> list[float]:
        clock = time.thread_time_ns if self.cpu_clock else time.perf_counter_ns
        out = []
        for _ in range(n):
            feed = self.feeds[self.i % len(self.feeds)]
            self.i += 1
            t0 = clock()
            self.session.run(None, feed)
            out.append((clock() - t0) / 1e6)
        return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--table", required=True, help="a decode latency table (hwprune profile --regime decode)")
    ap.add_argument(
        "--space", default=None, help="pruning space YAML the table was profiled with (default: the model's)"
    )
    ap.add_argument("--context", type=int, default=128, help="KV-cache length to test")
    ap.add_argument("--other", type=int, default=1024, help="the second context a shared session serves")
    ap.add_argument("--subnets", type=int, default=8, help="subnets besides the dense model")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--per-round", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-o", "--out", default=None, help="JSON result (default bench_out/decode_protocol_<model>.json)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    out = Path(a.out) if a.out else OUT_DIR / f"decode_protocol_{stem(a.model)}.json"
    try:
        if a.subnets < 0 or a.rounds < 2 or a.per_round < 1:
            raise HwpruneError("--subnets must be >= 0, --rounds >= 2 and --per-round >= 1")
        adapter = load_adapter(a.model)
        table = LatencyTable.load(a.table)
        table.check_model(adapter)
        table.check_regime("decode")
        space = adapter.space(a.space)
        settings = dict(table.settings)
        backend = get_backend(str(settings.get("runtime", "ort-cpu")), threads=int(settings.get("threads", 1)))
        pred = make_predictor(table, space, adapter, regime="decode", context=a.context, log=print)
        rng = np.random.default_rng(a.seed)
        subnets = sample_subnets(space, a.subnets + 1, rng)
        runners: list[Runner] = []
        index: list[tuple[int, str]] = []  # (subnet, protocol) of each timed runner
        for j, (name, cand) in enumerate(subnets):
            g = decode_graph(adapter, adapter.dense()) if name == "dense" else pruned_graph(adapter, space, cand, rng)
            dims, vocab = graph_inputs(g)

            def feed(past: int, dims: Any = dims, vocab: int = vocab) -> dict[str, np.ndarray]:
                return step_feed(dims, vocab, batch=1, past=past, seq=1)

            own, shared, grow = (backend.session(g) for _ in PROTOCOLS)
            cpu = backend.clock == "thread-cpu"
            runners += [Runner(own, feed(a.context), cpu_clock=cpu), Runner(shared, feed(a.context), cpu_clock=cpu)]
            runners += [GrowingRunner(grow, [feed(a.context + i) for i in range(a.per_round)], cpu_clock=cpu)]
            runners += [Runner(shared, feed(a.other), cpu_clock=cpu)]  # the shared session's other context
            index += [(j, "own"), (j, "shared"), (j, "generate"), (j, "other")]
            print(f"loaded {name}", flush=True)
        ts = interleave(runners, rounds=a.rounds, per_round=a.per_round, warmup=3, seed=a.seed)
        ms = {key: t.median_ms for key, t in zip(index, ts)}
        rows = []
        for j, (name, cand) in enumerate(subnets):
            p = pred.predict(cand)
            row: dict[str, Any] = {"name": name, "sizes": list(cand.sizes), "predicted_ms": p}
            for proto in PROTOCOLS:
                row[f"{proto}_ms"] = ms[(j, proto)]
                row[f"{proto}_error_pct"] = 100 * (p - ms[(j, proto)]) / ms[(j, proto)]
            row["shared_vs_generate_pct"] = 100 * (ms[(j, "shared")] / ms[(j, "generate")] - 1)
            row["own_vs_generate_pct"] = 100 * (ms[(j, "own")] / ms[(j, "generate")] - 1)
            rows.append(row)
        report: dict[str, Any] = {
            "model": a.model,
            "table": str(a.table),
            "table_created": table.created,
            "context": a.context,
            "other_context": a.other,
            "settings": {**settings, "rounds": a.rounds, "per_round": a.per_round, "subnets": len(subnets)},
            **{
                f"{proto}_mape_pct": round(float(np.mean([abs(r[f"{proto}_error_pct"]) for r in rows])), 3)
                for proto in PROTOCOLS
            },
            "max_abs_shared_vs_generate_pct": round(max(abs(r["shared_vs_generate_pct"]) for r in rows), 3),
            "max_abs_own_vs_generate_pct": round(max(abs(r["own_vs_generate_pct"]) for r in rows), 3),
            "rows": rows,
        }
        facts = machine(str(settings.get("runtime", "ort-cpu")), threads=int(settings.get("threads", 1)), seq=1)
        write_result(out, report, script=__file__, argv=argv, machine_facts=facts)
    except HwpruneError as e:
        return fail(e)
    print(
        "raw MAPE vs the table: "
        + ", ".join(f"{p} {report[f'{p}_mape_pct']:.2f} %" for p in PROTOCOLS)
        + f"; worst |own - generate| {report['max_abs_own_vs_generate_pct']:.1f} %, |shared - generate| "
        f"{report['max_abs_shared_vs_generate_pct']:.1f} %; wrote {out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
