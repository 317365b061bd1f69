"""Issue 9, decode latency tables: ``hwprune profile --regime decode --context ...`` on a tiny LLaMA folder
(real ONNX Runtime sessions, very short timing), interpolation between contexts, the warning outside the
grid, and a table of one regime refused for the other in one line."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from hwprune.api import load_adapter, make_predictor
from hwprune.cli import app
from hwprune.errors import HwpruneError
from hwprune.families import resolve_model
from hwprune.families.decoder.config import DecoderConfig
from hwprune.families.decoder.hf import save_hf_folder
from hwprune.families.decoder.model import random_decoder
from hwprune.latency import LatencyTable
from hwprune.latency.context import fit_part_scales, predicted_parts
from hwprune.latency.correction import with_context_factor
from hwprune.space import Candidate

TINY = DecoderConfig(
    arch="llama",
    vocab_size=300,
    hidden_size=32,
    num_layers=3,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    intermediate_size=48,
    max_position=128,
)
CONTEXTS = (8, 32, 96)


def invoke(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def one_line_error(res, pattern: str) -> None:
    assert res.exit_code == 2, res.output
    text = " ".join(res.output.split())
    assert text.startswith("error:") and pattern in text and "Traceback" not in res.output, res.output


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("dec") / "tiny-llama"
    save_hf_folder(random_decoder(TINY, seed=1), out)
    (out.parent / "space.yaml").write_text(
        "defaults:\n  attn: {step: 1, min: 1, allow_remove: true}\n  ffn: {step: 16, min: 16, allow_remove: true}\n"
    )
    return out


@pytest.fixture(scope="module")
def decode_table(folder: Path) -> Path:
    path = folder.parent / "decode.parquet"
    res = invoke(
        "profile",
        "--model",
        folder,
        "--space",
        folder.parent / "space.yaml",
        "--regime",
        "decode",
        "--context",
        ",".join(map(str, CONTEXTS)),
        "--budget-s",
        "1.5",
        "-o",
        path,
        "--no-progress",
    )
    assert res.exit_code == 0, res.output
    assert "at context 8" in res.output and "at context 96" in res.output
    return path


def test_decode_table_has_every_block_shape_per_context(folder: Path, decode_table: Path) -> None:
    t = LatencyTable.load(decode_table)
    assert t.regime == "decode" and t.contexts == list(CONTEXTS)
    side = json.loads(decode_table.with_suffix(".json").read_text())
    assert side["settings"]["regime"] == "decode" and side["settings"]["contexts"] == list(CONTEXTS)
    assert side["settings"]["seq"] == 1 and side["fingerprint"]["seq"] == 1  # one new token per call
    for c in CONTEXTS:
        sub = t.at_context(c)
        rows = sub.frame.set_index(["kind", "size"])["median_ms"]
        # KV groups 1..2 (heads per group: the dense 2), FFN widths of the space, removed sublayers, the base
        assert set(rows.index) == {("base", 0), ("attn", 0), ("attn", 1), ("attn", 2)} | {
            ("ffn", n) for n in (0, 16, 32, 48)
        }
        assert rows[("attn", 0)] == 0.0 and rows[("ffn", 0)] == 0.0 and rows[("base", 0)] > 0
        m = t.meta["contexts"][str(c)]
        assert m["dense_ms"]["median_ms"] > 0 and "dense_error_pct" in m  # the self-check, per context


def test_prediction_interpolates_between_contexts(folder: Path, decode_table: Path) -> None:
    a = resolve_model(str(folder))
    space = a.space(folder.parent / "space.yaml")
    t = LatencyTable.load(decode_table)
    cand = Candidate(tuple(u.sizes[len(u.sizes) // 2] for u in space.units))
    at = {c: make_predictor(t, space, a, regime="decode", context=c) for c in CONTEXTS}
    for c in CONTEXTS:  # exact at a measured context: that context's own (factor- or part-scaled) prediction
        sub = t.at_context(c)
        assert at[c].predict(cand) == pytest.approx(with_context_factor(a.predictor(sub, space), sub).predict(cand))
    logs: list[str] = []
    mid = make_predictor(t, space, a, regime="decode", context=20, log=logs.append)  # 20 = 8 + (32 - 8) / 2
    assert not logs
    assert mid.predict(cand) == pytest.approx((at[8].predict(cand) + at[32].predict(cand)) / 2)
    base, costs = mid.unit_costs()  # the DP's additive model agrees with predict
    ix = [u.sizes.index(s) for u, s in zip(space.units, cand.sizes)]
    assert base + sum(c[j] for c, j in zip(costs, ix)) == pytest.approx(mid.predict(cand))


def test_decode_context_factor_per_context_is_the_whole_decode_step(
    folder: Path, decode_table: Path, tmp_path: Path
) -> None:
    """Each profiled context carries the dense decode graph timed as export times it; the prediction of
    the dense model there is that measurement, and a subnet's is its block sum scaled alike. A decode
    table made before the factors predicts bare sums and says once how to add them."""
    a = resolve_model(str(folder))
    space = a.space(folder.parent / "space.yaml")
    t = LatencyTable.load(decode_table)
    cand = Candidate(tuple(u.sizes[len(u.sizes) // 2] for u in space.units))
    for c in CONTEXTS:
        r = t.at_context(c).context
        assert r is not None and r["dense_measured_ms"] > 0 and r["clock"] and "decoder.onnx" in r["method"]
        assert r["factor"] == pytest.approx(r["dense_measured_ms"] / r["dense_predicted_ms"])
        assert 0.2 < r["factor"] < 5  # a gross mismatch of graph or feed, not timing noise
        # the anchor subnets were timed beside dense: every part kind at its minimum, half, the rest alone
        names = [x["name"] for x in r["anchors"]]
        assert names == ["dense", "attn-min", "ffn-min", "uniform-half", "smallest"], names
        assert all(x["measured_ms"] > 0 and "factor_error_pct" in x for x in r["anchors"])
        assert r["anchors"][0]["measured_ms"] == pytest.approx(r["dense_measured_ms"])
        assert r["process"] == "ort-only worker"  # a new process running ONNX Runtime only, as a deployment
        p = make_predictor(t, space, a, regime="decode", context=c)
        assert p.info["decode_context_factors"][str(c)] == pytest.approx(r["factor"])
        bare = a.predictor(t.at_context(c), space)
        if "scales" in r:  # the fit held on this run's timings: each part scaled on its own
            sc = r["scales"]
            base, parts = predicted_parts(bare, cand)
            want = sc["base"] * base + sum(sc["kinds"][k] * v for k, v in parts.items())
            assert p.predict(cand) == pytest.approx(want)
            assert abs(p.dense_ms() / r["dense_measured_ms"] - 1) <= sc["residual_max_pct"] / 100 + 1e-9
        else:  # noisy tiny timings can leave a scale <= 0: the single factor stays
            assert p.dense_ms() == pytest.approx(r["dense_measured_ms"])
            assert p.predict(cand) == pytest.approx(r["factor"] * bare.predict(cand))
    # the same table without the fitted scales predicts with the factor, dense exactly as measured
    noscale = tmp_path / "noscale.parquet"
    for c in CONTEXTS:
        t.meta["contexts"][str(c)]["context"].pop("scales", None)
    t.save(noscale)
    t2 = LatencyTable.load(noscale)
    for c in CONTEXTS:
        r = t2.at_context(c).context
        p = make_predictor(t2, space, a, regime="decode", context=c)
        assert p.dense_ms() == pytest.approx(r["dense_measured_ms"])
        assert p.predict(cand) == pytest.approx(r["factor"] * a.predictor(t2.at_context(c), space).predict(cand))
    # and with scales of our own, every part is scaled on its own (the DP's unit costs alike)
    for c in CONTEXTS:
        t.meta["contexts"][str(c)]["context"]["scales"] = {"base": 2.0, "kinds": {"attn": 3.0, "ffn": 0.5}}
    t.save(noscale)
    t2 = LatencyTable.load(noscale)
    p = make_predictor(t2, space, a, regime="decode", context=32)
    base, parts = predicted_parts(a.predictor(t2.at_context(32), space), cand)
    assert p.predict(cand) == pytest.approx(2.0 * base + 3.0 * parts["attn"] + 0.5 * parts["ffn"])
    b, costs = p.unit_costs()
    assert b + sum(cs[u.sizes.index(s)] for u, cs, s in zip(space.units, costs, cand.sizes)) == pytest.approx(
        p.predict(cand)
    )
    assert "part scales fitted to anchor subnets" in p.info["context"]
    res = invoke("tables", "show", decode_table)
    assert res.exit_code == 0, res.output
    assert all(f"context {c}: context factor" in res.output for c in CONTEXTS)
    assert "hwprune calibrate fits prompt-latency runs" in " ".join(res.output.split())
    # the same table without its factors (as profiled before them)
    for c in CONTEXTS:
        del t.meta["contexts"][str(c)]["context"]
    old = tmp_path / "old_decode.parquet"
    t.save(old)
    t = LatencyTable.load(old)
    logs: list[str] = []
    p = make_predictor(t, space, a, regime="decode", context=8, log=logs.append)
    make_predictor(t, space, a, regime="decode", context=32, log=logs.append)
    assert len(logs) == 1 and "no decode context factors" in logs[0] and "--regime decode --context 8,32,96" in logs[0]
    assert p.predict(cand) == pytest.approx(a.predictor(t.at_context(8), space).predict(cand))
    # a decode search over that table says so too (the check that validates the table must not swallow it)
    from hwprune.api import SearchRequest, _objective
    from hwprune.latency.correction import _warned

    _warned.clear()
    req = SearchRequest(model=str(folder), table=str(old), regime="decode", workload="prompt=8,new=16")
    logs.clear()
    _objective(req, t, space, a, logs.append)
    assert sum("no decode context factors" in m for m in logs) == 1, logs


def test_part_scales_fit_recovers_known_scales_and_refuses_what_it_cannot_pin() -> None:
    """measured = a * base + b_attn * attn + b_ffn * ffn: exact data gives the scales back; too few or
    collinear anchors, or a scale <= 0, give None (the single factor stays)."""
    truth = {"base": 1.1, "attn": 1.4, "ffn": 1.25}
    pts = []
    for base, at, ff in [(10.0, 8.0, 20.0), (10.0, 0.0, 20.0), (10.0, 8.0, 0.0), (10.0, 4.0, 10.0), (10.0, 0.0, 0.0)]:
        m = truth["base"] * base + truth["attn"] * at + truth["ffn"] * ff
        pts.append((base, {"attn": at, "ffn": ff}, m))
    sc = fit_part_scales(pts)
    assert sc is not None and sc["base"] == pytest.approx(1.1) and sc["residual_max_pct"] < 1e-9
    assert sc["kinds"] == pytest.approx({"attn": 1.4, "ffn": 1.25})
    assert fit_part_scales(pts[:3]) is None  # as many points as scales: no residual to judge the fit by
    collinear = [(10.0, {"attn": x, "ffn": 2 * x}, 12 + 3.9 * x) for x in (0.0, 1.0, 2.0, 3.0)]
    assert fit_part_scales(collinear) is None
    negative = [(b, p, m if p["attn"] else m * 3) for b, p, m in pts]  # attention "costs" less than nothing
    assert fit_part_scales(negative) is None


def test_outside_the_grid_warns_with_the_extrapolation(folder: Path, decode_table: Path) -> None:
    a = resolve_model(str(folder))
    space = a.space(folder.parent / "space.yaml")
    t = LatencyTable.load(decode_table)
    logs: list[str] = []
    far = make_predictor(t, space, a, regime="decode", context=120, log=logs.append)
    assert len(logs) == 1 and "context 120 is above the profiled grid 8, 32, 96" in logs[0]
    assert (
        "extrapolated linearly from contexts 32 and 96" in logs[0]
        and "misses the table's dense model there by" in logs[0]
    )
    p32, p96 = (make_predictor(t, space, a, regime="decode", context=c).dense_ms() for c in (32, 96))
    assert far.dense_ms() == pytest.approx(p96 + (p96 - p32) * (120 - 96) / (96 - 32))


def test_a_table_of_one_regime_is_refused_for_the_other(folder: Path, decode_table: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    res = invoke(
        "search", "--model", folder, "--space", folder.parent / "space.yaml", "--table", decode_table, "-o", out
    )
    one_line_error(res, "was profiled for the decode regime")
    assert not out.exists()  # nothing written
    a = resolve_model(str(folder))
    space = a.space(folder.parent / "space.yaml")
    prefill = LatencyTable.load(decode_table)
    prefill.settings = {k: v for k, v in prefill.settings.items() if k not in ("regime", "contexts")}
    with pytest.raises(HwpruneError, match="was profiled for the prefill regime .* not for decode"):
        make_predictor(prefill, space, a, regime="decode", context=32)


def test_decode_profile_bad_input_is_one_line(folder: Path, tmp_path: Path) -> None:
    base = ("profile", "--model", folder, "--budget-s", "1", "--no-progress", "-o", tmp_path / "t.parquet")
    one_line_error(invoke(*base, "--regime", "decode"), "--regime decode needs --context")
    one_line_error(invoke(*base, "--context", "64"), "--context is for --regime decode")
    one_line_error(invoke(*base, "--regime", "decode", "--context", "64,x"), "comma-separated integers")
    one_line_error(invoke(*base, "--regime", "decode", "--context", "64,200"), "this model has 128")
    one_line_error(invoke(*base, "--regime", "beam"), "is not one of prefill, decode")
    assert not (tmp_path / "t.parquet").exists()


def test_a_family_without_kv_cache_refuses_the_decode_regime(tmp_path: Path) -> None:
    from hwprune.families.encoder.adapter import EncoderAdapter
    from hwprune.latency import profile

    with pytest.raises(HwpruneError, match="encoder models do not generate token by token"):
        profile(EncoderAdapter.tiny(), regime="decode", contexts=(16,), progress=False, budget_s=1)


# ---- workloads: hwprune search --regime prefill|decode|serve --workload ... -----------------------


@pytest.fixture(scope="module")
def prefill_table(folder: Path) -> Path:
    path = folder.parent / "prefill16.parquet"
    res = invoke(
        "profile",
        "--model",
        folder,
        "--space",
        folder.parent / "space.yaml",
        "--seq",
        "16",
        "--budget-s",
        "1",
        "-o",
        path,
        "--no-progress",
    )
    assert res.exit_code == 0, res.output
    return path


def test_workload_strings_parse_or_name_the_keys() -> None:
    from hwprune.search.workload import Workload

    assert Workload.parse("prompt=512,new=128,batch=1") == Workload(512, 128, 1)
    assert Workload.parse(" prompt=64 ") == Workload(64, 1, 1)
    for bad, msg in (
        ("prompt=512,tokens=128", "keys: prompt (tokens in), new (tokens out), batch"),
        ("512,128", "is not KEY=N"),
        ("new=128", "lacks prompt=N"),
        ("prompt=x", "is not a whole number"),
        ("prompt=0", "must be >= 1"),
        ("prompt=8,weight=-1", "must be a number > 0"),
        ("prompt=8,weight=x", "is not a number"),
    ):
        with pytest.raises(HwpruneError, match=re.escape(msg)):
            Workload.parse(bad)


def test_weighted_workloads_mix_their_objectives(folder: Path, decode_table: Path) -> None:
    """``a;b`` with weights: the objective is the weighted mean of each workload's, additive for the DP;
    a mix must share the batch, and under prefill/serve the prompt."""
    from hwprune.search.workload import WorkloadMix, parse_workloads, workload_predictor

    a = resolve_model(str(folder))
    space = a.space(folder.parent / "space.yaml")
    tables = {"decode": LatencyTable.load(decode_table)}

    def pred(t: LatencyTable):
        return a.predictor(t, space)

    wls = parse_workloads("prompt=16,new=24,weight=3; prompt=64,new=8")
    assert [w.weight for w in wls] == [3.0, 1.0] and wls[1].to_json() == {"prompt": 64, "new": 8, "batch": 1}
    mix = workload_predictor("decode", wls, tables=tables, predictor=pred)
    assert isinstance(mix, WorkloadMix)
    one = [workload_predictor("decode", w, tables=tables, predictor=pred) for w in wls]
    cand = Candidate(tuple(u.sizes[len(u.sizes) // 2] for u in space.units))
    assert mix.predict(cand) == pytest.approx(0.75 * one[0].predict(cand) + 0.25 * one[1].predict(cand))
    base, costs = mix.unit_costs()
    ix = [u.sizes.index(s) for u, s in zip(space.units, cand.sizes)]
    assert base + sum(c[j] for c, j in zip(costs, ix)) == pytest.approx(mix.predict(cand))
    b = mix.breakdown(cand)
    assert b["objective_ms"] == pytest.approx(mix.predict(cand)) and b["workloads"][1]["prompt"] == 64
    assert isinstance(workload_predictor("decode", wls[:1], tables=tables, predictor=pred), type(one[0]))
    with pytest.raises(HwpruneError, match="must share batch="):
        parse_workloads("prompt=16,batch=1;prompt=16,batch=4")
    with pytest.raises(HwpruneError, match="must share prompt="):
        parse_workloads("prompt=16,new=4;prompt=32,new=4", "serve")
    with pytest.raises(HwpruneError, match="is empty"):
        parse_workloads(" ; ")


def test_serve_is_prefill_plus_every_decode_step(folder: Path, decode_table: Path, prefill_table: Path) -> None:
    from hwprune.latency.predictor import ContextPredictor
    from hwprune.search.workload import Workload, workload_predictor

    a = resolve_model(str(folder))
    space = a.space(folder.parent / "space.yaml")
    tables = {"prefill": LatencyTable.load(prefill_table), "decode": LatencyTable.load(decode_table)}
    wl = Workload(prompt=16, new=24)

    def pred(t: LatencyTable):
        return a.predictor(t, space)

    serve = workload_predictor("serve", wl, tables=tables, predictor=pred)
    decode = workload_predictor("decode", wl, tables={"decode": tables["decode"]}, predictor=pred)
    per = {c: a.predictor(tables["decode"].at_context(c), space) for c in CONTEXTS}
    cand = Candidate(tuple(u.sizes[len(u.sizes) // 3] for u in space.units))
    steps = [ContextPredictor(per, c).predict(cand) for c in range(16, 16 + 24 - 1)]  # contexts 16..38
    first = a.predictor(tables["prefill"], space).predict(cand)
    assert serve.predict(cand) == pytest.approx(first + sum(steps))
    assert decode.predict(cand) == pytest.approx(sum(steps) / len(steps))
    b = serve.breakdown(cand)
    assert b["ttft_ms"] == pytest.approx(first) and b["request_ms"] == pytest.approx(serve.predict(cand))
    assert b["tokens_per_s"] == pytest.approx(1e3 / decode.predict(cand))
    base, costs = serve.unit_costs()  # additive: the DP sees the same objective
    ix = [u.sizes.index(s) for u, s in zip(space.units, cand.sizes)]
    assert base + sum(c[j] for c, j in zip(costs, ix)) == pytest.approx(serve.predict(cand))
    assert not serve.warnings
    far = workload_predictor("decode", Workload(prompt=90, new=20), tables={"decode": tables["decode"]}, predictor=pred)
    assert len(far.warnings) == 1 and "context 108 is above the profiled grid" in far.warnings[0]


def test_decode_search_targets_tokens_per_second(folder: Path, decode_table: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    common = ("--model", folder, "--space", folder.parent / "space.yaml", "--n-calib", "16", "--n-heldout", "4")
    res = invoke(
        "search",
        *common,
        "--table",
        decode_table,
        "--regime",
        "decode",
        "--workload",
        "prompt=16,new=24",
        "--targets",
        "1.3",
        "--trials",
        "6",
        "-o",
        out,
        "--no-progress",
    )
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "workload.json").read_text())
    assert doc["regime"] == "decode" and doc["prompt"] == 16 and doc["new"] == 24
    pick = doc["picks"]["1.3"]
    got, dense = pick["predicted"], pick["dense_predicted"]
    assert got["tokens_per_s"] >= 1.3 * dense["tokens_per_s"] * 0.999 and got["ttft_ms"] is None
    assert json.loads((out / "run.json").read_text())["workload"]["tables"]["decode"] == str(decode_table)
    assert (out / "candidates" / pick["key"] / "plan.json").is_file()
    res = invoke("export", out, "--no-progress")  # tokens/s measured on decoder.onnx, dense in the same process
    assert res.exit_code == 0, res.output
    m = json.loads((out / "candidates" / pick["key"] / "manifest.json").read_text())
    w = m["extra"]["workload"]
    assert w["objective"] == "decode_step_ms" and w["measured"]["contexts_timed"] == [16, 27, 38]
    assert m["measured_ms"] == pytest.approx(w["measured"]["decode_step_ms"])
    assert m["measured_speedup"] == pytest.approx(w["measured"]["tokens_per_s"] / w["dense_measured"]["tokens_per_s"])
    assert m["predicted_ms"] == pytest.approx(got["decode_step_ms"])  # the search's own prediction
    assert w["measured"]["ttft_ms"] > 0 and w["measured"]["request_ms"] > w["measured"]["ttft_ms"]
    assert (out / "candidates" / pick["key"] / "decoder.onnx").is_file()
    assert "new process that runs ONNX Runtime only" in w["method"]  # as a deployment, as the profile's anchors
    # two sessions per model in mirrored order: the dense model's second against its first is the control
    d = w["dense_measured"]
    assert d["session_order"] == "mirrored" and len(d["sessions_decode_step_ms"]) == 2
    assert m["dense_control_pct"] == pytest.approx(
        100 * (d["sessions_decode_step_ms"][1] / d["sessions_decode_step_ms"][0] - 1)
    )
    assert min(d["sessions_decode_step_ms"]) <= d["decode_step_ms"] <= max(d["sessions_decode_step_ms"])

    # scripts/bench_tokens.py: the same graphs, dense beside, at a thread count of its own
    import importlib.util
    import sys

    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_tokens.py"
    spec = importlib.util.spec_from_file_location("_bench_tokens", script)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    argv = [str(out), "--workload", "prompt=16,new=24", "--threads", "1", "--rounds", "1", "--repeats", "2"]
    assert mod.main([*argv, "-o", str(tmp_path / "tok.json")]) == 0
    doc = json.loads((tmp_path / "tok.json").read_text())
    assert {r["model"] for r in doc["rows"]} == {"dense", pick["key"]} and doc["machine"]["threads"] == 1
    assert all(r["tokens_per_s"] > 0 and r["contexts_timed"] == [16, 27, 38] for r in doc["rows"])
    assert mod.main([str(tmp_path), "-o", str(tmp_path / "x.json")]) == 2  # not a run: one line, status 2


def test_a_weighted_mix_is_searched_and_measured_as_one_objective(
    folder: Path, decode_table: Path, tmp_path: Path
) -> None:
    out = tmp_path / "mix"
    res = invoke(
        "search",
        *("--model", folder, "--space", folder.parent / "space.yaml", "--n-calib", "16", "--n-heldout", "4"),
        *("--table", decode_table, "--regime", "decode", "--workload", "prompt=16,new=12,weight=3;prompt=40,new=4"),
        *("--targets", "1.3", "--trials", "4", "-o", out, "--no-progress", "--export"),
    )
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "workload.json").read_text())
    assert [w["prompt"] for w in doc["workloads"]] == [16, 40] and doc["workloads"][0]["weight"] == 3.0
    key = doc["picks"]["1.3"]["key"]
    m = json.loads((out / "candidates" / key / "manifest.json").read_text())
    w = m["extra"]["workload"]
    steps = [x["measured"]["decode_step_ms"] for x in w["workloads"]]
    dense = [x["dense_measured"]["decode_step_ms"] for x in w["workloads"]]
    assert m["measured_ms"] == pytest.approx(0.75 * steps[0] + 0.25 * steps[1])
    assert m["measured_speedup"] == pytest.approx((0.75 * dense[0] + 0.25 * dense[1]) / m["measured_ms"])
    assert m["predicted_ms"] == pytest.approx(w["predicted"]["objective_ms"])


def test_workload_bad_input_is_one_line(folder: Path, decode_table: Path, prefill_table: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    base = ("search", "--model", folder, "--space", folder.parent / "space.yaml", "-o", out)
    wl = ("--workload", "prompt=16,new=8")
    one_line_error(
        invoke(*base, "--table", prefill_table, "--regime", "decode", *wl), "profiled for the prefill regime"
    )
    one_line_error(invoke(*base, "--table", decode_table, "--regime", "decode"), "needs --workload")
    one_line_error(
        invoke(*base, "--table", decode_table, "--regime", "decode", "--workload", "prompt=16,out=8"), "keys: prompt"
    )
    one_line_error(invoke(*base, "--table", prefill_table, "--regime", "serve", *wl), "needs a decode table too")
    one_line_error(
        invoke(
            *base,
            "--table",
            prefill_table,
            "--regime",
            "serve",
            "--workload",
            "prompt=32",
            "--decode-table",
            decode_table,
        ),
        "profile it with --seq 32",
    )
    assert not out.exists()


def test_serve_search_exports_measured_request_latency(
    folder: Path, decode_table: Path, prefill_table: Path, tmp_path: Path
) -> None:
    out = tmp_path / "serve"
    res = invoke(
        "search",
        *("--model", folder, "--space", folder.parent / "space.yaml", "--n-calib", "16", "--n-heldout", "4"),
        *("--table", prefill_table, "--decode-table", decode_table, "--regime", "serve"),
        *("--workload", "prompt=16,new=8", "--targets", "1.3", "--trials", "6", "-o", out, "--export", "--no-progress"),
    )
    assert res.exit_code == 0, res.output
    (m,) = json.loads((out / "exports.json").read_text())["manifests"]
    w = m["extra"]["workload"]
    assert w["objective"] == "request_ms" and w["regime"] == "serve"
    got = w["measured"]
    assert got["request_ms"] == pytest.approx(got["ttft_ms"] + 7 * got["decode_step_ms"])  # 7 steps after the prompt
    assert m["measured_ms"] == pytest.approx(got["request_ms"]) and m["dense_measured_ms"] == pytest.approx(
        w["dense_measured"]["request_ms"]
    )
    assert m["predicted_ms"] == pytest.approx(w["predicted"]["request_ms"]) and m["settings"]["seq"] == 16


def test_bench_decode_latency_end_to_end(folder: Path, decode_table: Path, tmp_path: Path) -> None:
    """scripts/bench_decode_latency.py on the tiny decode table: predicted vs measured per subnet and
    context, two chunks, a dense-vs-dense control per chunk, raw MAPE first."""
    mod = _load_script("bench_decode_latency")
    out = tmp_path / "d.json"
    argv = ["--model", str(folder), "--space", str(folder.parent / "space.yaml"), "--table", str(decode_table),
            "--context", "8,32", "--subnets", "3", "--chunk", "2", "--seconds", "0.5", "-o", str(out)]  # fmt: skip
    assert mod.main(argv) == 0
    rep = json.loads(out.read_text())
    assert rep["n"] == 6 and set(rep["per_context"]) == {"8", "32"} and len(rep["dense_control_pct"]) == 2
    for r in rep["rows"]:
        assert r["error_pct"] == pytest.approx(100 * (r["predicted_ms"] / r["measured_ms"] - 1))
        assert len(r["sessions_ms"]) == 2 and r["measured_ms"] == pytest.approx(sum(r["sessions_ms"]) / 2)  # mirrored
    assert rep["mape_pct"] == pytest.approx(sum(abs(r["error_pct"]) for r in rep["rows"]) / 6, abs=1e-3)
    assert mod.main([*argv[:-2], "--context", "x", "-o", str(tmp_path / "bad.json")]) == 2
    assert rep["settings"]["process"] == "a fresh one per chunk"
    assert mod.main([*argv[:-2], "--per-context-sessions", "--no-common-mode", "--same-process", "-o", str(out)]) == 0
    rep = json.loads(out.read_text())  # each context on its own sessions, rounds not rescaled, one process
    assert rep["n"] == 6 and rep["settings"]["sessions"] == "per context" and rep["settings"]["common_mode"] is False
    assert rep["settings"]["process"] == "this one for every chunk" and rep["settings"]["primer"] is False
    # --primer: a dense session held through each chunk's timing; the same rows
    assert mod.main([*argv[:-2], "--primer", "--same-process", "--context", "8", "-o", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert rep["n"] == 3 and rep["settings"]["primer"] is True and all(r["measured_ms"] > 0 for r in rep["rows"])
    # --shapes: structured subnets instead of random ones, each isolating one shape
    assert mod.main([*argv[:-2], "--shapes", "--same-process", "--context", "8", "-o", str(out)]) == 0
    rep = json.loads(out.read_text())
    space = load_adapter(str(folder)).space(str(folder.parent / "space.yaml"))
    shapes = mod.structured_subnets(space)
    assert [r["name"] for r in rep["rows"]] == [n for n, _ in shapes]
    assert rep["settings"]["draw"].startswith("structured")
    alt = dict(shapes)["alt-layers"].sizes
    assert all((s == 0) == (u.layer % 2 == 0) for u, s in zip(space.units, alt))  # every other layer removed

    # the protocol probe: own session, shared with another context, a growing cache
    proto = _load_script("bench_decode_protocol", register=False)
    out3 = tmp_path / "p.json"
    argv = ["--model", str(folder), "--space", str(folder.parent / "space.yaml"), "--table", str(decode_table),
            "--context", "8", "--other", "32", "--subnets", "2", "--rounds", "3", "--per-round", "2",
            "-o", str(out3)]  # fmt: skip
    assert proto.main(argv) == 0
    rep = json.loads(out3.read_text())
    assert len(rep["rows"]) == 3 and rep["rows"][0]["name"] == "dense"
    for r in rep["rows"]:
        for p in ("own", "shared", "generate"):
            assert r[f"{p}_ms"] > 0 and r[f"{p}_error_pct"] == pytest.approx(
                100 * (r["predicted_ms"] / r[f"{p}_ms"] - 1)
            )

    # the command: bench_latency.py --regime decode, no table: profiled first in the same process
    lat = _load_script("bench_latency", register=False)
    out2 = tmp_path / "fresh.json"
    argv = ["--regime", "decode", "--model", str(folder), "--space", str(folder.parent / "space.yaml"),
            "--context", "8,32", "--subnets", "2", "--chunk", "2", "--seconds", "0.5", "--out", str(out2)]  # fmt: skip
    assert lat.main(argv) == 0
    rep = json.loads(out2.read_text())
    assert rep["n"] == 4 and rep["table"] == str(out2.with_suffix(".table.parquet")) and Path(rep["table"]).is_file()
    assert not (tmp_path / "bad.json").exists()


def test_a_batch_grid_makes_one_table_per_batch(folder: Path, tmp_path: Path) -> None:
    """``--batch 1,2``: T_b1.parquet and T_b2.parquet; a workload picks the table of its batch."""
    out = tmp_path / "T.parquet"
    common = ("profile", "--model", folder, "--space", folder.parent / "space.yaml", "--regime", "decode")
    res = invoke(*common, "--context", "8,32", "--batch", "1,2", "--budget-s", "1", "-o", out, "--no-progress")
    assert res.exit_code == 0, res.output
    assert "batch 1: wrote" in res.output and "batch 2: wrote" in res.output
    for b in (1, 2):
        t = LatencyTable.load(tmp_path / f"T_b{b}.parquet")
        assert t.settings["batch"] == b and t.contexts == [8, 32]
    one_line_error(invoke(*common, "--context", "8", "--batch", "1,0", "-o", tmp_path / "U.parquet"), "--batch")
    assert not list(tmp_path.glob("U*"))
    res = invoke(
        "search",
        *("--model", folder, "--space", folder.parent / "space.yaml", "--table", tmp_path / "T_b1.parquet"),
        *("--regime", "decode", "--workload", "prompt=8,new=4,batch=2", "-o", tmp_path / "run"),
    )
    one_line_error(res, "profiled at batch 1, the workload has batch=2")


def test_bench_process_age_times_one_chunk_again_and_again(folder: Path, tmp_path: Path) -> None:
    """scripts/bench_process_age.py: the same chunk exported, loaded and timed in one process per repeat,
    each graph's change against the first repeat, memory noted per repeat."""
    mod = _load_script("bench_process_age")
    out = tmp_path / "age.json"
    argv = ["--model", str(folder), "--space", str(folder.parent / "space.yaml"), "--context", "8", "--subnets", "2",
            "--skip", "0", "--repeats", "2", "--seconds", "0.3", "--per-round", "2", "-o", str(out)]  # fmt: skip
    assert mod.main(argv) == 0
    rep = json.loads(out.read_text())
    assert [r["repeat"] for r in rep["repeats"]] == [1, 2, "fresh_after"] and len(rep["subnets"]) == 2
    assert set(rep["repeats"][0]["ms"]) == {"dense", *(s["name"] for s in rep["subnets"])}
    assert all(v == 0 for v in rep["repeats"][0]["change_pct"].values())
    r2 = rep["repeats"][1]
    assert r2["change_pct"]["dense"] == pytest.approx(
        100 * (r2["ms"]["dense"] / rep["repeats"][0]["ms"]["dense"] - 1), abs=0.01
    )
    assert mod.main([*argv[:-2], "--repeats", "1", "-o", str(tmp_path / "bad.json")]) == 2  # one line, status 2
    assert not (tmp_path / "bad.json").exists()
    # --fresh-each: every repeat in a new process, no aged control; spreads follow from the repeats' ms
    fresh = tmp_path / "drift.json"
    assert mod.main([*argv[:-2], "--fresh-each", "-o", str(fresh)]) == 0
    rep = json.loads(fresh.read_text())
    assert [r["repeat"] for r in rep["repeats"]] == [1, 2] and rep["settings"]["process"] == "a new one per repeat"
    a, b = (r["ms"] for r in rep["repeats"])
    for name in a:
        want = 100 * abs(a[name] - b[name]) / ((a[name] + b[name]) / 2)
        assert rep["host_spread"][name]["ms_spread_pct"] == pytest.approx(want, abs=0.01)
    name = rep["subnets"][0]["name"]
    ra, rb = a[name] / a["dense"], b[name] / b["dense"]
    assert rep["host_spread"][name]["ratio_spread_pct"] == pytest.approx(100 * abs(ra - rb) / ((ra + rb) / 2), abs=0.01)
    assert "ratio_spread_pct" not in rep["host_spread"]["dense"]


def test_bench_session_order_times_sessions_of_one_graph(folder: Path, tmp_path: Path) -> None:
    """scripts/bench_session_order.py: sessions of the same decode graph in creation order, per mode in a new
    process; spread and last-vs-first follow from the medians; a bad mode is one line, status 2."""
    mod = _load_script("bench_session_order")
    out = tmp_path / "order.json"
    argv = ["--model", str(folder), "--sessions", "3", "--extra", "1", "--context", "8", "--seconds", "0.3",
            "--per-round", "2", "-o", str(out)]  # fmt: skip
    assert mod.main([*argv, "--before", "none,drop"]) == 0
    rep = json.loads(out.read_text())
    assert [r["before"] for r in rep["results"]] == ["none", "drop"]
    for r in rep["results"]:
        ms = r["ms"]
        assert len(ms) == 3 and min(ms) > 0
        assert r["spread_pct"] == pytest.approx(100 * (max(ms) / min(ms) - 1), abs=0.01)
        assert r["last_vs_first_pct"] == pytest.approx(100 * (ms[-1] / ms[0] - 1), abs=0.01)
    bad = tmp_path / "bad.json"
    assert mod.main([*argv[:-2], "--before", "sometimes", "-o", str(bad)]) == 2 and not bad.exists()


def _load_script(name: str, *, register: bool = True) -> Any:
    """``scripts/<name>.py`` imported as module ``name``; ``register``: put in ``sys.modules`` as an import
    does, so a chunk's fresh process finds its worker function by that name."""
    import importlib.util
    import sys

    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    if register:
        sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod
