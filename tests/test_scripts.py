"""Benchmark scripts run end to end on tiny models (figures are the scripts' business, not the tests').

What is checked is the scripts' contract (``scripts/_common.py``): ``main(argv) -> int``, a JSON result
that records the exact command and the machine, ``error: ...`` on one line and status 2 for a user
error, and a ``--help`` that works for every script.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
ALL_SCRIPTS = sorted(p.stem for p in SCRIPTS.glob("*.py") if not p.stem.startswith("_"))


def _script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", SCRIPTS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer randomly initialised Hugging Face BERT folder (MiniLM's tokenizer), its space and a
    small calibration text: the fastest model every script's flow (profile, search, export) runs on."""
    from safetensors.torch import save_file

    from hwprune.families.encoder.adapter import minilm_path
    from hwprune.families.encoder.model import Encoder, _hf_key, from_hf_config

    out = tmp_path_factory.mktemp("tinybert")
    cfg = {
        "model_type": "bert",
        "vocab_size": 30522,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 128,
        "max_position_embeddings": 128,
    }
    (out / "config.json").write_text(json.dumps(cfg))
    torch.manual_seed(0)
    enc = Encoder(from_hf_config(cfg))
    save_file(
        {"bert." + _hf_key(k): v.contiguous() for k, v in enc.state_dict().items()}, str(out / "model.safetensors")
    )
    shutil.copy(minilm_path() / "tokenizer.json", out / "tokenizer.json")
    (out / "space.yaml").write_text(
        "defaults:\n  heads: {step: 1, min: 1, allow_remove: true}\n  ffn: {step: 32, min: 32, allow_remove: true}\n"
    )
    (out / "calib.txt").write_text(
        "\n".join(f"Sentence number {i} says something short about item {i}." for i in range(40)) + "\n"
    )
    return out


def test_bench_latency_takes_a_factory_cnn(tmp_path: Path) -> None:
    out = tmp_path / "lat.json"
    argv = [
        "--model",
        "test_cnn_adapter:tiny_net",
        "--input-shape",
        "1,3,32,32",
        "--subnets",
        "4",
        "--seconds",
        "2",
        "--levels",
        "3",
        "-o",
        str(out),
    ]
    rc = _script("bench_latency").main(argv)
    assert rc == 0
    rep = json.loads(out.read_text())
    assert rep["family"] == "cnn" and rep["input_shape"] == [1, 3, 32, 32] and rep["n"] == 4
    assert rep["command"] == "python scripts/bench_latency.py " + " ".join(argv) and rep["machine"]["cpu"]
    names = [r["name"] for r in rep["subnets"]]
    assert names[:3] == ["dense", "smallest", "uniform-0.5"]
    dense, smallest = rep["subnets"][0], rep["subnets"][1]
    assert smallest["predicted_ms"] < dense["predicted_ms"] and all(r["measured_ms"] > 0 for r in rep["subnets"])
    # the dense subnet is the profile's own dense network, timed again in a later session
    assert "dense" in rep["session_effect_pct"]
    # one chunk: one dense-vs-dense control; wall clock and the CPU check beside every subnet's timing
    assert len(rep["dense_control_pct"]) == 1 and isinstance(rep["warnings"], list)
    assert all(r["measured_wall_ms"] > 0 and r["cpu_excess_pct"] is not None for r in rep["subnets"])
    assert rep["speedup_error_mape_pct"] >= 0 and "mape_dense_adjusted_pct" not in rep


def test_bench_latency_bad_model_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "lat.json"
    rc = _script("bench_latency").main(["--model", "no_such_pkg.mod:build", "-o", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error:") and "no_such_pkg" in err and "\n" not in err
    assert not out.exists()


def test_bench_latency_refuses_what_would_not_fit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    mod = _script("bench_latency")
    monkeypatch.setattr(mod, "available_bytes", lambda: 0)  # a machine with no memory left
    out = tmp_path / "lat.json"
    rc = mod.main(
        ["--model", "test_cnn_adapter:tiny_net", "--input-shape", "1,3,32,32", "--subnets", "2", "-o", str(out)]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: out of memory ahead") and "--chunk" in err and "\n" not in err
    assert not out.exists()


def test_bench_targets_end_to_end_on_a_tiny_encoder(
    tiny_bert: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the fresh profile goes to latency_tables/local/, the run to runs/
    argv = [
        "--model",
        str(tiny_bert),
        "--space",
        str(tiny_bert / "space.yaml"),
        "--targets",
        "1.2",
        "--trials",
        "3",
        "--calib",
        str(tiny_bert / "calib.txt"),
        "--n-calib",
        "8",
        "--n-heldout",
        "4",
        "--profile-budget-s",
        "2",
        "--rounds",
        "2",
        "--repeats",
        "5",
        "-o",
        "res.json",
    ]
    assert _script("bench_targets").main(argv) == 0
    rep = json.loads((tmp_path / "res.json").read_text())
    assert rep["command"] == "python scripts/bench_targets.py " + " ".join(argv)
    assert rep["machine"]["cpu"] and rep["machine"]["runtime"] == "ort-cpu" and rep["date"]
    assert rep["profile_seconds"] is not None and Path(rep["table"]).is_file()
    (row,) = rep["results"]
    assert row["target_speedup"] == 1.2 and row["measured_speedup"] > 0 and row["clock"] in ("thread-cpu", "wall")
    assert row["timing"] == {"rounds": 2, "repeats": 5, "warmup": 5, "session_order": "mirrored"}
    # raw error first, the speedup error beside it, the dense-vs-dense control and the wall clock recorded
    assert row["prediction_error_pct"] == pytest.approx(
        100 * (row["predicted_ms"] - row["measured_ms"]) / row["measured_ms"]
    )
    assert row["speedup_error_pct"] == pytest.approx(100 * (row["measured_speedup"] / row["predicted_speedup"] - 1))
    assert isinstance(row["dense_control_pct"], float) and isinstance(row["warnings"], list)
    assert row["measured_wall_ms"] >= row["measured_ms"] * 0.999 and row["cpu_excess_pct"] is not None
    assert "prediction_error_drift_adjusted_pct" not in row and "dense_drift_pct" not in row
    # the run's exports, collected for bench_out/ as they are (collect_exports.py measures nothing)
    argv2 = [rep["run"], "--step", "python scripts/bench_targets.py ...", "-o", "exports.json"]
    assert _script("collect_exports").main(argv2) == 0
    got = json.loads((tmp_path / "exports.json").read_text())
    (cand,) = got["candidates"]
    assert got["steps"] == ["python scripts/bench_targets.py ..."] and got["machine"]["cpu"]
    assert cand["measured_ms"] == pytest.approx(row["measured_ms"]) and cand["target_speedup"] == 1.2
    assert cand["prediction_error_pct"] == pytest.approx(row["prediction_error_pct"])
    assert cand["host_check"]["dense_expected_ms"] > 0 and 1 <= len(cand["host_check"]["attempts"]) <= 2
    assert _script("collect_exports").main([str(tmp_path / "nowhere"), "-o", "x.json"]) == 2
    assert not (tmp_path / "x.json").exists()


def test_bench_targets_missing_table_is_one_line(
    tiny_bert: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = _script("bench_targets").main(
        [
            "--model",
            str(tiny_bert),
            "--table",
            str(tmp_path / "none.parquet"),
            "--run",
            str(tmp_path / "run"),
            "-o",
            str(tmp_path / "res.json"),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error:") and "none.parquet" in err and "\n" not in err
    assert not (tmp_path / "res.json").exists()


def test_write_result_records_the_exact_command(tmp_path: Path) -> None:
    common = _script("_common")
    path = common.write_result(
        tmp_path / "r.json",
        {"figure": 1.5, "machine": "stale"},
        script="scripts/x.py",
        argv=["--name", "two words"],
        machine_facts={"cpu": "test"},
    )
    rep = json.loads(path.read_text())
    assert rep["command"] == "python scripts/x.py --name 'two words'"
    assert rep["figure"] == 1.5 and rep["machine"] == {"cpu": "test"} and rep["date"]
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # written atomically: no temporary left


@pytest.mark.parametrize("name", ALL_SCRIPTS)
def test_every_script_has_help(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        _script(name).main(["--help"])
    assert e.value.code == 0 and "usage:" in capsys.readouterr().out


def test_bench_llm_quality_end_to_end_on_a_tiny_decoder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hwprune.families.decoder.config import DecoderConfig
    from hwprune.families.decoder.hf import save_hf_folder
    from hwprune.families.decoder.model import random_decoder

    cfg = DecoderConfig(
        arch="llama",
        vocab_size=300,
        hidden_size=32,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        intermediate_size=48,
        max_position=64,
    )
    save_hf_folder(random_decoder(cfg, seed=1), tmp_path / "tiny-llama")
    (tmp_path / "space.yaml").write_text(  # a coarse FFN grid: few graphs to profile
        "defaults:\n  attn: {step: 1, min: 1, allow_remove: true}\n  ffn: {step: 12, min: 12, allow_remove: true}\n"
    )
    monkeypatch.chdir(tmp_path)  # the profile goes to latency_tables/local/, the searches to runs/
    argv = [
        "--model",
        "tiny-llama",
        "--space",
        "space.yaml",
        "--seq",
        "32",
        "--profile-budget-s",
        "1",
        "--targets",
        "1.2,1.5",
        "--trials",
        "5",
        "--n-calib",
        "8",
        "--n-select",
        "4",
        "--n-report",
        "4",
        "--front",
        "2",
        "--rounds",
        "2",
        "--repeats",
        "2",
        "--chunk",
        "4",
        "--torch-threads",
        "1",
        "-o",
        "res.json",
    ]
    assert _script("bench_llm_quality").main(argv) == 0
    rep = json.loads((tmp_path / "res.json").read_text())
    assert rep["command"] == "python scripts/bench_llm_quality.py " + " ".join(argv) and rep["machine"]["cpu"]
    assert rep["table_source"] == "profiled" and Path(rep["table"]).is_file() and (tmp_path / "res.png").is_file()
    texts = rep["texts"]
    assert [texts[k]["texts"] for k in ("calibration", "selection", "report")] == [8, 4, 4]
    # chunks of 4 models, each timed with the dense model, then rescaled to one dense time
    assert rep["timing"]["chunk_size"] == 4 and rep["timing"]["rescaled"] == (rep["timing"]["chunks"] > 1)
    models = rep["models"]
    assert models["dense"]["measured_speedup"] == 1.0 and models["dense"]["kl"] == 0.0
    assert {"shortgpt", "flap", "magnitude"} == set(rep["fronts"]) and len(rep["block_influence"]) == 4
    for peer, names in rep["fronts"].items():
        assert names and all(models[n]["method"] == peer for n in names)
    for r in models.values():
        assert r["measured_ms"] > 0 and r["params"] > 0 and math.isfinite(r["perplexity"])
    for n in rep["fronts"]["shortgpt"]:  # whole blocks removed, nothing else
        r = models[n]
        assert r["removed_blocks"] and all((g == 0) == (f == 0) for g, f in zip(r["kv_groups"], r["ffn"]))
    for n in rep["fronts"]["flap"]:  # uniform: every layer the same, none removed
        r = models[n]
        assert len(set(r["kv_groups"])) == 1 and len(set(r["ffn"])) == 1 and not r["removed_blocks"]
    assert set(rep["per_target"]) == {"1.2", "1.5"}
    for t, e in rep["per_target"].items():
        pick = models[e["hwprune"]]
        assert pick["method"] == "hwprune" and pick["target"] == float(t) and pick["search_source"]
        for peer in ("shortgpt", "flap", "magnitude"):
            best = e[peer]["best"]
            assert best is None or models[best]["measured_ms"] <= pick["measured_ms"]
    for name in ("depth_only@1.2x", "depth_only@1.5x"):  # depth-only: every unit whole or removed
        r = models[name]
        assert all(g in (0, 2) for g in r["kv_groups"]) and all(f in (0, 48) for f in r["ffn"])
    for n in rep["fronts"]["magnitude"]:
        assert all(f % 12 == 0 for f in models[n]["ffn"])  # the space's grid

    # decode regime (issue 9, benchmark 3): tokens/s from a decode table, timed on decoder.onnx, and the
    # same targets searched for prompt latency, both picks timed on both graphs
    from hwprune.api import load_adapter
    from hwprune.latency import profile

    a = load_adapter("tiny-llama")
    profile(a, space=a.space("space.yaml"), regime="decode", contexts=(8, 32), budget_s=1, out="dec.parquet")
    prefill = rep["table"]
    dargv = [*argv[: argv.index("--profile-budget-s")], *argv[argv.index("--targets") : -2]]
    dargv += ["--regime", "decode", "--workload", "prompt=8,new=16", "--table", "dec.parquet"]
    dargv += ["--prefill-table", prefill, "-o", "dec.json"]
    assert _script("bench_llm_quality").main(dargv) == 0
    dec = json.loads((tmp_path / "dec.json").read_text())
    assert dec["regime"] == "decode" and dec["workload"]["new"] == 16
    dm = dec["models"]
    assert dm["dense"]["workload_measured"]["tokens_per_s"] > 0 and dm["dense"]["measured_speedup"] == 1.0
    assert len(dec["timing"]["dense_control_pct_per_chunk"]) == dec["timing"]["chunks"]
    for r in dm.values():
        assert r["measured_ms"] > 0 and r["workload_measured"]["decode_step_ms"] > 0
    for t in ("1.2", "1.5"):
        e = dec["regime_comparison"]["per_target"][t]
        for k in ("decode_pick", "prefill_pick"):
            assert e[k]["measured_speedup"] > 0 and e[k]["prompt_measured_speedup"] > 0
        assert e["same_subnet"] == (e["decode_pick"]["candidate_key"] == e["prefill_pick"]["candidate_key"])
        assert dm[f"hwprune_prefill@{t}x"]["method"] == "hwprune_prefill"
    # bad input: a decode run without a decode table, a prefill table given as the decode one
    assert _script("bench_llm_quality").main([*dargv[: dargv.index("--table")], "-o", "x.json"]) == 2
    bad = [*dargv[: dargv.index("--table")], "--table", prefill, "-o", "y.json"]
    assert _script("bench_llm_quality").main(bad) == 2 and not (tmp_path / "y.json").exists()


def test_cnn_digits_time_models_is_mirrored_with_a_control() -> None:
    """Every model, peers included, goes through hwprune.export.measure: two sessions each, the dense
    control, wall clock and CPU check beside the thread-CPU medians."""
    tiny = {
        "dense": torch.nn.Sequential(torch.nn.Conv2d(1, 16, 3), torch.nn.ReLU(), torch.nn.Flatten()),
        "a": torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.ReLU(), torch.nn.Flatten()),
        "b": torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten()),
    }
    cmp = _script("bench_cnn_digits").time_models(tiny, torch.zeros(1, 1, 8, 8), rounds=2, repeats=2, warmup=1, seed=0)
    assert set(cmp.pruned) == {"a", "b"} and cmp.settings["session_order"] == "mirrored"
    assert cmp.control_pct is not None
    for m in [cmp.dense, *cmp.pruned.values()]:
        assert len(m.sessions_ms) == 2 and len(m.rounds_ms) == 2 and m.median_ms > 0
        assert m.wall_ms is not None and m.wall_ms > 0 and m.cpu_excess_pct is not None


def test_peer_front_and_best_point_at_or_below_a_measured_time() -> None:
    pf = _script("_peer_fronts")
    pts = [  # (name, ms, selection accuracy, report accuracy)
        {"name": n, "measured_ms": ms, "val_accuracy": v, "test_accuracy": t}
        for n, ms, v, t in [
            ("fast_bad", 1.0, 0.50, 0.55),
            ("mid_good", 2.0, 0.90, 0.80),
            ("mid_lucky", 2.0, 0.85, 0.95),  # better on the report split only
            ("dominated", 2.5, 0.60, 0.60),
            ("slow_best", 3.0, 0.99, 0.99),
        ]
    ]
    assert [p["name"] for p in pf.front(pts, acc_key="val_accuracy")] == ["fast_bad", "mid_good", "slow_best"]
    assert [p["name"] for p in pf.front(pts, acc_key="test_accuracy")] == ["fast_bad", "mid_lucky", "slow_best"]
    best = pf.best_at_or_below(pts, 2.0, select_key="val_accuracy", report_key="test_accuracy")
    assert best["name"] == "mid_good" and best["latency_gap_pct"] == pytest.approx(0.0)
    oracle = pf.best_at_or_below(pts, 2.0, select_key="test_accuracy", report_key="val_accuracy")
    assert oracle["name"] == "mid_lucky"
    assert pf.best_at_or_below(pts, 0.9, select_key="val_accuracy", report_key="test_accuracy") is None
    slack = pf.best_at_or_below(pts, 2.9, select_key="val_accuracy", report_key="test_accuracy", slack=0.04)
    assert slack["name"] == "slow_best" and slack["latency_gap_pct"] == pytest.approx(100 * (3.0 / 2.9 - 1))
    assert pf.best_at_or_below(pts, 2.9, select_key="val_accuracy", report_key="test_accuracy")["name"] == "mid_good"


def test_peer_fronts_figure_is_a_png(tmp_path: Path) -> None:
    pf = _script("_peer_fronts")
    pts = [{"name": f"p{i}", "measured_ms": 1.0 + i, "test_accuracy": 0.5 + 0.1 * i} for i in range(4)]
    out = pf.plot_fronts(
        tmp_path / "f.png",
        peers={"peer": pts},
        picks=[{"name": "h", "measured_ms": 2.0, "test_accuracy": 0.9}],
        dense={"name": "dense", "measured_ms": 4.0, "test_accuracy": 1.0},
        acc_key="test_accuracy",
        title="t",
    )
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_digits_three_disjoint_splits() -> None:
    digits = _script("train_digits_cnn")
    s = digits.digits_data(0)
    assert [len(s[k][0]) for k in ("train", "val", "test")] == [1047, 300, 450]
    rows = {k: {tuple(x.flatten().tolist()) for x in s[k][0]} for k in s}
    assert not (rows["train"] & rows["val"]) and not (rows["train"] & rows["test"]) and not (rows["val"] & rows["test"])
    assert torch.equal(digits.digits_data(0, n_val=100)["test"][0], s["test"][0])  # the test split never moves


def test_cnn_digits_load_splits_are_disjoint_and_named(tmp_path: Path) -> None:
    import numpy as np

    from hwprune.errors import HwpruneError

    bench = _script("bench_cnn_digits")
    # every image a distinct constant, so each split's images are recognisable by value
    for name, lo, n in (("train", 0, 300), ("val", 300, 40), ("test", 340, 50)):
        np.save(
            tmp_path / f"{name}.npy",
            np.arange(lo, lo + n, dtype=np.float32)[:, None, None, None] * np.ones((1, 1, 4, 4), np.float32),
        )
        np.save(tmp_path / f"{name}_labels.npy", np.arange(n) % 10)
    calib, splits, about = bench.load_splits(tmp_path, 0)
    ids = {k: set(v[0][:, 0, 0, 0].tolist()) for k, v in splits.items()}
    assert len(ids["calibration"]) == bench.N_CALIB and ids["calibration"] <= ids["train"]
    assert ids["selection"] == set(range(300, 340)) and ids["report"] == set(range(340, 390))
    assert torch.equal(calib.calib["input"], splits["calibration"][0])
    assert torch.equal(calib.heldout["input"], splits["selection"][0])
    assert {"calibration", "selection", "report"} <= set(about) and about["report"]["n"] == 50
    (tmp_path / "val.npy").unlink()
    with pytest.raises(HwpruneError, match="train_digits_cnn.py"):
        bench.load_splits(tmp_path, 0)


@pytest.mark.parametrize("peer", ["tp-magnitude", "tp-bn-scale", "tp-taylor", "tp-lamp-global"])
def test_cnn_digits_peer_sweep_prunes_and_dedupes(peer: str) -> None:
    bench = _script("bench_cnn_digits")
    digits = _script("train_digits_cnn")
    torch.manual_seed(0)
    dense = digits.DigitsResNet(widths=(16, 32, 32)).eval()
    x, y = torch.randn(32, 1, 32, 32), torch.arange(32) % 10
    models, info = bench.peer_sweep(dense, peer, (x, y), [0.01, 0.5], [None, 16])
    full = [c.out_channels for c in dense.modules() if isinstance(c, torch.nn.Conv2d)]
    for name, m in models.items():
        assert m(x[:2]).shape == (2, 10) and info[name]["peer"] == peer
        assert all(c <= f for c, f in zip(info[name]["conv_out_channels"], full))
    half = [n for n in models if info[n]["ratio"] == 0.5]
    # (tp's global pruning with round_to=16 can keep every channel at 0.5: a point of its sweep like any other)
    assert half and any(sum(info[n]["conv_out_channels"]) < sum(full) for n in half)
    assert len(models) + sum(len(i["aliases"]) for i in info.values()) == 4


def test_bench_workers_unreachable_server_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "w.json"
    rc = _script("bench_workers").main(["--storage", "postgresql://u:secret@127.0.0.1:1/db", "-o", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error:") and "cannot connect to PostgreSQL" in err and "\n" not in err
    assert "secret" not in err and not out.exists()


def test_bench_e2e_time_failing_stage_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A stage that fails (here: an unknown model) ends the benchmark in one line naming the command and
    its log; no result file is written."""
    out, work = tmp_path / "e.json", tmp_path / "work"
    rc = _script("bench_e2e_time").main(["--model", "nope-model", "--work", str(work), "-o", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error:") and "`hwprune profile` exited with 2" in err and "\n" not in err
    assert str(work / "commands.log") in err and "nope-model" in (work / "commands.log").read_text()
    assert not out.exists()


def test_bench_closed_loop_end_to_end_on_a_tiny_encoder(
    tiny_bert: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """profile, search + export, calibrate, search + export: four hwprune processes, one JSON."""
    monkeypatch.chdir(tmp_path)
    argv = ["--model", str(tiny_bert), "--space", str(tiny_bert / "space.yaml"), "--targets", "1.2",
            "--trials", "3", "--calib", str(tiny_bert / "calib.txt"), "--n-calib", "8", "--n-heldout", "4",
            "--profile-budget-s", "2", "--work", "w", "-o", "res.json"]  # fmt: skip
    assert _script("bench_closed_loop").main(argv) == 0
    rep = json.loads((tmp_path / "res.json").read_text())
    assert rep["command"] == "python scripts/bench_closed_loop.py " + " ".join(argv) and rep["machine"]["cpu"]
    assert rep["context"]["factor"] > 0 and rep["correction"]["version"] == 1
    assert rep["correction"]["n_points"] == 2  # one pick and the dense model of run1
    (r1,), (r2,) = rep["run1_fresh_profile"], rep["run2_after_calibrate"]
    assert r1["correction"] is None and r2["correction"]["version"] == 1
    assert r2["predicted_ms"] == pytest.approx(
        r2["correction"]["scale"] * r2["base_predicted_ms"] + r2["correction"]["offset_ms"], rel=1e-9
    )
    assert rep["worst_abs_raw_error_pct"]["run2_after_calibrate"] == pytest.approx(
        abs(r2["prediction_error_pct"]), abs=1e-3
    )


def test_bench_latency_against_a_table_times_each_chunk_in_a_fresh_process(tiny_bert: Path, tmp_path: Path) -> None:
    """--table: by default each subnet measured as export measures a candidate (beside the dense model,
    four sessions, in a new ONNX-Runtime-only process), each chunk in a new process; --timing-process chunk
    interleaves them in the chunk's process for --seconds; --same-process keeps every chunk here. All report
    the same subnets."""
    from typer.testing import CliRunner

    from hwprune.cli import app

    table = tmp_path / "t.parquet"
    res = CliRunner().invoke(
        app, ["profile", "--model", str(tiny_bert), "--seq", "16", "--budget-s", "1", "--no-progress", "-o", str(table)]
    )
    assert res.exit_code == 0, res.output
    spec = importlib.util.spec_from_file_location("bench_latency", SCRIPTS / "bench_latency.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_latency"] = mod  # as an import does: each chunk's new process finds it by name
    spec.loader.exec_module(mod)
    base = ["--model", str(tiny_bert), "--space", str(tiny_bert / "space.yaml"), "--table", str(table)]
    base += ["--subnets", "3", "--seconds", "0.3"]
    out = tmp_path / "fresh.json"
    assert mod.main([*base, "-o", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert rep["settings"]["process"].startswith("as hwprune export measures") and rep["settings"]["chunk"] == 1
    assert rep["n"] == 3 and len(rep["dense_control_pct"]) == 3 and [r["chunk"] for r in rep["subnets"]] == [0, 1, 2]
    assert all(r["measured_ms"] > 0 and r["predicted_ms"] > 0 for r in rep["subnets"])
    assert {r["process"] for r in rep["subnets"]} == {"ort-only worker"}
    assert [r["dense_control_pct"] for r in rep["subnets"]] == rep["dense_control_pct"]  # one pair per chunk
    # as export: a host check on every pair (conftest: at most one re-timing), the first attempt kept beside
    assert rep["settings"]["host_retries"] == 3 and "first_attempt_mape_pct" in rep
    for r in rep["subnets"]:
        assert 1 <= len(r["host_check"]["attempts"]) <= 2 and r["first_attempt"]["measured_ms"] > 0
    chunked = tmp_path / "chunked.json"
    assert mod.main([*base, "--timing-process", "chunk", "-o", str(chunked)]) == 0
    rep1 = json.loads(chunked.read_text())
    assert rep1["settings"]["process"].startswith("a fresh one per chunk") and rep1["n"] == 3
    assert rep1["settings"]["host_retries"] is None and "host_check" not in rep1["subnets"][0]
    assert [r["key"] for r in rep1["subnets"]] == [r["key"] for r in rep["subnets"]]
    same = tmp_path / "same.json"
    assert mod.main([*base, "--chunk", "3", "--same-process", "-o", str(same)]) == 0
    rep2 = json.loads(same.read_text())
    assert rep2["settings"]["process"] == "this one for every chunk" and len(rep2["dense_control_pct"]) == 1
    assert [r["key"] for r in rep2["subnets"]] == [r["key"] for r in rep["subnets"]]


def test_bench_quality_end_to_end_on_a_tiny_encoder(tiny_bert: Path, tmp_path: Path) -> None:
    """Search vs the uniform baselines at equal measured latency, scored on the report split with paragraph
    retrieval and its paired bootstrap interval; the retrieval aim is judged only where that interval allows."""
    from hwprune.api import load_adapter
    from hwprune.latency import profile

    adapter = load_adapter(str(tiny_bert))
    space = adapter.space(str(tiny_bert / "space.yaml"))
    profile(adapter, space=space, out=tmp_path / "t.parquet", progress=False, budget_s=2)
    argv = ["--model", str(tiny_bert), "--space", str(tiny_bert / "space.yaml"), "--table", str(tmp_path / "t.parquet"),
            "--target", "1.2", "--trials", "3", "--calib", str(tiny_bert / "calib.txt"), "--n-calib", "8",
            "--n-heldout", "4", "--n-report", "12", "--rounds", "2", "--repeats", "5", "--run", str(tmp_path / "run"),
            "-o", str(tmp_path / "res.json")]  # fmt: skip
    assert _script("bench_quality").main(argv) == 0
    rep = json.loads((tmp_path / "res.json").read_text())
    assert rep["command"] == "python scripts/bench_quality.py " + " ".join(argv) and rep["machine"]["cpu"]
    assert rep["retrieval"]["pairs"] == 12 and rep["retrieval"]["split"] == "report"
    assert {"hwprune_obs_search", "uniform_magnitude"} <= set(rep["results"])
    for row in rep["results"].values():
        r = row["report"]
        if r["retrieval_vs_dense"] is None:  # the dense model found nothing: no ratio, no interval
            assert r["retrieval_vs_dense_ci95"] is None
            continue
        lo, hi = r["retrieval_vs_dense_ci95"]
        assert lo <= r["retrieval_vs_dense"] <= hi or math.isclose(lo, hi)
    ci = rep["results"]["hwprune_obs_search"]["report"]["retrieval_vs_dense_ci95"]
    assert rep["goal"]["retrieval_decidable"] == (ci is not None and not ci[0] < 0.97 <= ci[1])
