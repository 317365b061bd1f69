"""The CLI end to end on a tiny BERT folder, and every bad input of the encoder slice.

Each bad input must give one clear line, a nonzero exit, and leave no partial files behind.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

import hwprune
from hwprune.cli import app
from hwprune.families.encoder.adapter import minilm_path
from hwprune.families.encoder.model import Encoder, _hf_key, from_hf_config

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def one_line_error(res, pattern: str) -> str:
    """Checks the CLI's one-line error contract; returns the message (unwrapped) for further checks."""
    assert res.exit_code == 2, res.output
    text = " ".join(res.output.split())  # rich may wrap long lines on narrow terminals
    assert text.startswith("error:"), res.output
    assert pattern in text, res.output
    assert "Traceback" not in res.output
    return text


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    """A real (randomly initialised) Hugging Face BERT folder, with MiniLM's tokenizer."""
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
    return out


@pytest.fixture(scope="module")
def tiny_table(tiny_folder, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tables") / "tiny.parquet"
    res = invoke(
        "profile",
        "--model",
        tiny_folder,
        "--space",
        tiny_folder / "space.yaml",
        "--seq",
        "32",
        "--budget-s",
        "4",
        "-o",
        path,
        "--no-progress",
    )
    assert res.exit_code == 0, res.output
    assert path.is_file() and path.with_suffix(".json").is_file()
    return path


@pytest.fixture(scope="module")
def tiny_run(tiny_folder, tiny_table, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "r"
    res = invoke(
        "search",
        "--model",
        tiny_folder,
        "--space",
        tiny_folder / "space.yaml",
        "--table",
        tiny_table,
        "--targets",
        "1.2,1.4",
        "--trials",
        "14",
        "-o",
        run,
        "--export",
        "--no-progress",
    )
    assert res.exit_code == 0, res.output
    return run


def test_help_teaches():
    res = invoke("--help")
    assert res.exit_code == 0 and "profile" in res.output and "search" in res.output and "export" in res.output
    for cmd in ("profile", "search", "export"):
        res = invoke(cmd, "--help")
        assert res.exit_code == 0 and "Example:" in res.output


def test_search_and_export_end_to_end(tiny_run):
    for f in ("run.json", "study.db", "pareto.csv", "pareto.png", "picks.json", "exports.json"):
        assert (tiny_run / f).is_file(), f
    picks = json.loads((tiny_run / "picks.json").read_text())["picks"]
    assert len(picks) == 2
    for p in picks.values():
        folder = tiny_run / "candidates" / p["key"]
        m = json.loads((folder / "manifest.json").read_text())
        assert {"plan.json", "model.safetensors", "model.onnx", "manifest.json"} <= {x.name for x in folder.iterdir()}
        assert m["predicted_ms"] <= p["budget_ms"] * 1.0001
        assert m["measured_speedup"] == pytest.approx(m["dense_measured_ms"] / m["measured_ms"])
        assert m["parity_max_abs_diff"] < 1e-3
        assert m["params"] < m["dense_params"]
        # scores on the selection split that chose the pick; report scores on texts the search never saw
        x = m["extra"]
        assert x["scores_split"] == "selection" and x["data"]["report_domain"] == "legal"
        assert {k: v["n"] for k, v in x["data"]["splits"].items()} == {
            "calibration": 128,
            "selection": 64,
            "report": 64,
        }
        assert 0.0 <= x["report_scores"]["distance"] <= 2.0
    run = json.loads((tiny_run / "run.json").read_text())
    assert run["data"]["held_out_by"] == "domain" and run["request"]["n_report"] == 64


def test_export_pick_all_reuses_run(tiny_run):
    res = invoke("export", tiny_run, "--pick", "all", "--no-progress")
    assert res.exit_code == 0, res.output
    exported = json.loads((tiny_run / "exports.json").read_text())["manifests"]
    assert len(exported) >= 2


def test_export_distill_recovers_same_shapes(tiny_run, tmp_path):
    """--distill-steps trains the cut weights towards the dense model on the calibration split: the loss
    falls, the selection cosine rises (where there is something to recover: the tiny table is profiled here,
    so a 1.2x pick can already sit at cosine 0.9997), shapes (so latency) do not change, parity holds on the
    saved (distilled) weights, and the manifest says what was done on which split."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    # each candidate's manifest as the first export wrote it (exports.json holds only the last export's, and
    # a target's pick need not be on the Pareto front that --pick all exports)
    before = {p.parent.name: json.loads(p.read_text()) for p in (run / "candidates").glob("*/manifest.json")}
    res = invoke(
        "export", run, "--distill-steps", "40", "--distill-samples", "64", "--distill-lr", "1e-3", "--no-progress"
    )
    assert res.exit_code == 0, res.output
    assert "distilled" in res.output
    gaps = []  # per candidate: 1 - selection cosine, before and after
    for m in json.loads((run / "exports.json").read_text())["manifests"]:
        d = m["extra"]["distill"]
        assert d["split"] == "calibration" and d["steps"] == 40 and d["rows"] == 64
        assert d["loss_last"] < d["loss_first"]
        gaps.append((1 - d["selection_before"]["cosine"], 1 - d["selection_after"]["cosine"]))
        # trained on the calibration split, judged on the selection split: never measurably worse there
        assert gaps[-1][1] <= 1.05 * gaps[-1][0] + 1e-7
        assert m["scores"] == d["selection_after"]  # the saved model's, not the search's
        assert m["params"] == before[m["key"]]["params"] and m["plan"] == before[m["key"]]["plan"]
        assert m["parity_max_abs_diff"] <= 1e-3
        folder = run / "candidates" / m["key"]
        reloaded = hwprune.load(folder)
        old = hwprune.load(tiny_run / "candidates" / m["key"])
        changed = [k for k, v in reloaded.state_dict().items() if not torch.equal(v, old.state_dict()[k])]
        assert changed  # the saved weights are the distilled ones
    # the selection cosine rises overall, unless every pick was near-lossless already
    assert sum(g[1] for g in gaps) < sum(g[0] for g in gaps) or max(g[0] for g in gaps) < 1e-3


@pytest.mark.parametrize(
    ("flag", "value", "pattern"),
    [("--distill-steps", "-1", "--distill-steps must be >= 0"), ("--distill-lr", "0", "--distill-lr must be")],
)
def test_export_distill_bad_settings(tiny_run, flag, value, pattern):
    before = (tiny_run / "exports.json").read_bytes()
    msg = one_line_error(invoke("export", tiny_run, "--distill-steps", "5", flag, value, "--no-progress"), pattern)
    assert f"(got {value}" in msg  # names the bad value
    assert (tiny_run / "exports.json").read_bytes() == before  # refused before anything was written


def test_search_export_distills(tiny_folder, tiny_table, tmp_path):
    """`search --export --distill-*` hands the distillation settings to the export it runs."""
    run = tmp_path / "r"
    args = ["--model", tiny_folder, "--space", tiny_folder / "space.yaml", "--table", tiny_table]
    res = invoke("search", *args, "--targets", "1.4", "--trials", "8", "-o", run, "--export", "--no-progress",
                 "--distill-steps", "10", "--distill-samples", "32")  # fmt: skip
    assert res.exit_code == 0, res.output
    (m,) = json.loads((run / "exports.json").read_text())["manifests"]
    assert m["extra"]["distill"]["steps"] == 10 and m["extra"]["distill"]["rows"] == 32


@pytest.mark.parametrize(
    ("extra", "pattern"),
    [
        (["--distill-steps", "5"], "--distill-steps trains the exported picks: add --export"),
        (["--export", "--distill-steps", "5", "--distill-lr", "0"], "--distill-lr must be"),
    ],
)
def test_search_distill_bad_settings(tiny_folder, tiny_table, tmp_path, extra, pattern):
    """Refused before the search starts: no run directory is written."""
    run = tmp_path / "r"
    args = ["--model", tiny_folder, "--space", tiny_folder / "space.yaml", "--table", tiny_table, "--targets", "1.4"]
    one_line_error(invoke("search", *args, "-o", run, "--no-progress", *extra), pattern)
    assert not run.exists()


def test_unknown_model():
    msg = one_line_error(invoke("search", "--model", "gpt-7"), "unknown model 'gpt-7'; supported:")
    assert "minilm" in msg and "resnet50" in msg  # the line lists what would work


def test_malformed_yaml(tiny_folder, tiny_table, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("defaults:\n  heads: {step: 1\n")
    run = tmp_path / "run"
    one_line_error(
        invoke("search", "--model", tiny_folder, "--table", tiny_table, "--space", bad, "-o", run), "malformed YAML"
    )
    assert not run.exists()


def test_table_for_another_model(tiny_table, tmp_path):
    run = tmp_path / "run"
    one_line_error(invoke("search", "--model", "minilm", "--table", tiny_table, "-o", run), "was measured for")
    assert not run.exists()


def test_corrupt_table(tiny_folder, tiny_table, tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not a parquet file at all")
    shutil.copy(tiny_table.with_suffix(".json"), bad.with_suffix(".json"))
    run = tmp_path / "run"
    one_line_error(invoke("search", "--model", tiny_folder, "--table", bad, "-o", run), "not a readable parquet")
    assert not run.exists()


def test_target_unreachable(tiny_folder, tiny_table, tmp_path):
    run = tmp_path / "run"
    res = invoke(
        "search",
        "--model",
        tiny_folder,
        "--space",
        tiny_folder / "space.yaml",
        "--table",
        tiny_table,
        "--target-speedup",
        "100",
        "-o",
        run,
    )
    one_line_error(res, "largest reachable speedup is")
    assert not run.exists()


@pytest.mark.parametrize(
    ("name", "content", "extra", "needle"),
    [
        ("empty.txt", "\n\n", (), "empty.txt: no texts found"),
        ("bad.jsonl", '{"text": "a"}\n{"text": oops}\n', (), "bad.jsonl:2: not valid JSON"),
        ("data.csv", "text\nhello\n", (), "unknown calibration format '.csv'"),
        ("few.txt", "".join(f"text {i}\n" for i in range(40)), ("--n-report", "30"), "n_report=30 held back"),
    ],
)
def test_bad_calibration_file_is_one_line(tiny_folder, tiny_table, tmp_path, name, content, extra, needle):
    bad = tmp_path / name
    bad.write_text(content)
    run = tmp_path / "run"
    res = invoke(
        "search",
        "--model",
        tiny_folder,
        "--space",
        tiny_folder / "space.yaml",
        "--table",
        tiny_table,
        "--calib",
        bad,
        *extra,
        "-o",
        run,
    )
    one_line_error(res, needle)
    assert not run.exists()


def test_parity_failure_leaves_no_partial_files(tiny_folder, tiny_table, tmp_path):
    run = tmp_path / "run"
    res = invoke(
        "search",
        "--model",
        tiny_folder,
        "--space",
        tiny_folder / "space.yaml",
        "--table",
        tiny_table,
        "--target-speedup",
        "1.2",
        "--trials",
        "6",
        "-o",
        run,
        "--no-progress",
    )
    assert res.exit_code == 0, res.output
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    # A real, nonzero ORT-vs-torch difference (~1e-7) against a zero tolerance: parity fails honestly.
    one_line_error(invoke("export", run, "--parity-tol", "0", "--no-progress"), "differs from the pruned torch model")
    after = sorted(p.relative_to(run) for p in run.rglob("*"))
    assert after == before  # nothing added, nothing half-written


def test_export_not_a_run(tmp_path):
    msg = one_line_error(invoke("export", tmp_path), "is not a search run")
    assert str(tmp_path.name) in msg and not any(tmp_path.iterdir())  # names the folder, writes nothing into it


def test_cnn_bad_inputs_via_cli(tmp_path):
    one_line_error(invoke("profile", "--model", "no_such_pkg.nets:build", "-o", tmp_path / "t.parquet"), "no_such_pkg")
    one_line_error(
        invoke("profile", "--model", "resnet18", "--input-shape", "3,224,224", "-o", tmp_path / "t.parquet"),
        "3,224,224",
    )
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_rerun_with_another_request_is_refused_and_picks_reads_the_study(tiny_folder, tiny_table, tiny_run, tmp_path):
    run = tmp_path / "copy"
    run.mkdir()
    shutil.copy(tiny_run / "study.db", run / "study.db")
    common = [
        "--model",
        tiny_folder,
        "--space",
        tiny_folder / "space.yaml",
        "--table",
        tiny_table,
        "--targets",
        "1.2,1.4",
    ]
    msg = one_line_error(
        invoke("search", *common, "--trials", "14", "--proxy", "magnitude", "-o", run, "--no-progress"),
        "holds a search with a different request (proxy differ",
    )
    assert "--fresh" in msg
    res = invoke("picks", "--storage", run / "study.db", "-o", tmp_path / "picked")
    assert res.exit_code == 0, res.output
    old = json.loads((tiny_run / "picks.json").read_text())["picks"]
    new = json.loads((tmp_path / "picked" / "picks.json").read_text())["picks"]
    assert {k: v["key"] for k, v in new.items()} == {k: v["key"] for k, v in old.items()}
    run_json = json.loads((tmp_path / "picked" / "run.json").read_text())
    assert run_json["request"]["proxy"] == "obs" and run_json["table"] == str(tiny_table)
    res = invoke("export", tmp_path / "picked", "--no-progress")  # cut and measured from the study alone
    assert res.exit_code == 0, res.output
    for p in new.values():
        assert (tmp_path / "picked" / "candidates" / p["key"] / "manifest.json").is_file()


def test_picks_for_several_devices_from_one_study(tiny_folder, tiny_table, tiny_run, tmp_path):
    """One study, two devices' tables: each device gets its own front and picks from the same trials."""
    import dataclasses

    import pandas as pd

    from hwprune.api import load_adapter, make_predictor
    from hwprune.latency.store import file_table
    from hwprune.latency.table import LatencyTable
    from hwprune.space import Candidate

    reg = tmp_path / "reg"
    a = LatencyTable.load(tiny_table)
    file_table(a, reg, device="box-a")
    b = LatencyTable.load(tiny_table)
    slow_ffn = [v * (4.0 if k == "ffn" else 1.0) for k, v in zip(b.frame["kind"], b.frame["median_ms"])]
    b.frame = b.frame.assign(median_ms=slow_ffn)
    b.fingerprint = dataclasses.replace(b.fingerprint, threads=b.fingerprint.threads + 1)  # another machine's
    file_table(b, reg, device="box-b")
    out = tmp_path / "fleet"
    res = invoke(
        "picks", "--storage", tiny_run / "study.db", "--device", "box-a", "--device", "box-b",
        "--table-store", reg, "-o", out,
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "device box-b:" in res.output and (out / "pareto_devices.png").stat().st_size > 0
    own = json.loads((out / "picks.json").read_text())["picks"]
    same = json.loads((out / "box-a" / "picks.json").read_text())["picks"]
    assert {k: v["key"] for k, v in same.items()} == {k: v["key"] for k, v in own.items()}  # same table, same picks
    frame_b = pd.read_csv(out / "box-b" / "pareto.csv", dtype={"key": str})
    run_b = json.loads((out / "box-b" / "run.json").read_text())
    assert run_b["device"] == "box-b" and run_b["fingerprint"]["threads"] == b.fingerprint.threads
    adapter = load_adapter(str(tiny_folder))
    pred = make_predictor(LatencyTable.load(run_b["table"]), adapter.space(str(tiny_folder / "space.yaml")), adapter)
    for _, r in frame_b.iterrows():
        sizes = json.loads(r["sizes"])
        cand = Candidate(tuple(sizes[u.name] for u in pred.space.units))
        assert r["predicted_ms"] == pytest.approx(pred.predict(cand), rel=1e-9)
    assert len(frame_b) == len(pd.read_csv(out / "pareto.csv"))  # the same trials, re-predicted
    res = invoke("export", out / "box-b", "--no-progress")  # each device's picks export as a run
    assert res.exit_code == 0, res.output
