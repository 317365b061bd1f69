"""The decoder family end to end: CLI on a tiny LLaMA folder, transformers reload of exported subnets,
latency profile semantics, and every bad input of the decoder slice (one line, exit 2, nothing written)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import hwprune
from hwprune.cli import app
from hwprune.errors import HwpruneError
from hwprune.families import resolve_model
from hwprune.families.decoder.adapter import DecoderAdapter
from hwprune.families.decoder.config import DecoderConfig
from hwprune.families.decoder.hf import save_hf_folder
from hwprune.families.decoder.model import random_decoder

runner = CliRunner()
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


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def one_line_error(res, pattern: str) -> str:
    assert res.exit_code == 2, res.output
    text = " ".join(res.output.split())
    assert text.startswith("error:") and pattern in text and "Traceback" not in res.output, res.output
    return text


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real Hugging Face LLaMA folder (random weights, GQA 4/2)."""
    out = tmp_path_factory.mktemp("tinyllama") / "tiny-llama"
    save_hf_folder(random_decoder(TINY, seed=1), out)
    (out.parent / "space.yaml").write_text(
        "defaults:\n  attn: {step: 1, min: 1, allow_remove: true}\n  ffn: {step: 8, min: 8, allow_remove: true}\n"
    )
    return out


@pytest.fixture(scope="module")
def table(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tables") / "tiny.parquet"
    res = invoke(
        "profile",
        "--model",
        folder,
        "--space",
        folder.parent / "space.yaml",
        "--seq",
        "32",
        "--budget-s",
        "3",
        "-o",
        path,
        "--no-progress",
    )
    assert res.exit_code == 0, res.output
    return path


@pytest.fixture(scope="module")
def run(folder: Path, table: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "r"
    res = invoke(
        "search",
        "--model",
        folder,
        "--space",
        folder.parent / "space.yaml",
        "--table",
        table,
        "--targets",
        "1.3,1.8",
        "--trials",
        "10",
        "--n-calib",
        "24",
        "--n-heldout",
        "8",
        "-o",
        out,
        "--export",
        "--no-progress",
    )
    assert res.exit_code == 0, res.output
    return out


def test_folder_resolves_to_the_decoder_family(folder: Path) -> None:
    a = resolve_model(str(folder))
    assert isinstance(a, DecoderAdapter) and a.config.num_kv_heads == 2 and a.config.group_size == 2
    units = {n: (k, f, g) for n, k, f, _, g in a.raw_units()}
    assert units["layer.0.attn"] == ("attn", 2, 16) and units["layer.2.ffn"] == ("ffn", 48, 1)


def test_table_predicts_depth_and_sublayer_removal(folder: Path, table: Path) -> None:
    from hwprune.latency import LatencyTable

    a = resolve_model(str(folder))
    t = LatencyTable.load(table)
    space = a.space(folder.parent / "space.yaml")
    pred = a.predictor(t, space)
    rows = t.frame.set_index(["kind", "size"])["median_ms"]
    assert rows[("attn", 0)] == 0.0 and rows[("ffn", 0)] == 0.0  # a removed sublayer has no ops
    no_blocks = space.smallest().__class__(tuple(0 for _ in space.units))
    assert pred.predict(no_blocks) == pytest.approx(rows[("base", 0)])  # every block removed: the base alone
    assert 0 < t.meta["base_share_pct"] < 100 and pred.dense_ms() == pytest.approx(
        t.meta["dense_predicted_ms"], rel=1e-3
    )


def test_search_export_manifests(run: Path) -> None:
    picks = json.loads((run / "picks.json").read_text())["picks"]
    assert len(picks) == 2
    for p in picks.values():
        folder = run / "candidates" / p["key"]
        m = json.loads((folder / "manifest.json").read_text())
        assert m["plan"]["family"] == "decoder" and len(m["plan"]["kv_groups"]) == 3
        assert m["parity_max_abs_diff"] < 1e-3 and m["params"] < m["dense_params"]
        assert m["flops"] < m["dense_flops"] and m["predicted_ms"] <= p["budget_ms"] * 1.0001
        assert "distance" in m["scores"] and m["plan"]["load"]
        model = hwprune.load(folder)
        assert model.config.kv_groups == tuple(m["plan"]["kv_groups"])


@pytest.mark.parametrize(
    "kept",
    [
        {
            "layer.0.attn": [1],
            "layer.1.attn": [0],
            "layer.2.attn": [1],
            "layer.0.ffn": range(0, 48, 2),
            "layer.1.ffn": range(24),
            "layer.2.ffn": range(24, 48),
        },  # uniform: 1 group, 24 neurons
        {"layer.1.attn": [], "layer.1.ffn": []},  # one block removed, the rest dense
    ],
)
def test_uniform_subnet_loads_in_transformers(folder: Path, tmp_path: Path, kept: dict) -> None:
    transformers = pytest.importorskip("transformers")
    a = resolve_model(str(folder))
    plan = a.plan(kept)
    pruned = a.prune(a.dense(), plan)
    hwprune.save(pruned, plan, tmp_path)
    assert (tmp_path / "config.json").is_file()
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    x = a.example_inputs(batch=2, seq=12)
    with torch.no_grad():
        ours = pruned(**x)
        theirs = hf(**x).logits
    assert torch.allclose(ours, theirs, atol=1e-4)
    again = hwprune.load(tmp_path)  # hwprune reads the same Hugging Face names back
    with torch.no_grad():
        assert torch.equal(again(**x), ours)


def test_non_uniform_subnet_says_how_to_load(folder: Path, tmp_path: Path) -> None:
    a = resolve_model(str(folder))
    plan = a.plan({"layer.0.attn": [0], "layer.2.ffn": range(8)})
    hwprune.save(a.prune(a.dense(), plan), plan, tmp_path)
    assert not (tmp_path / "config.json").exists()
    summary = a.plan_summary(plan)
    assert summary["hf_loadable"] is False and summary["load"].startswith("hwprune.load")


def test_unsupported_architecture_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "falcon", "hidden_size": 8}))
    msg = one_line_error(invoke("profile", "--model", tmp_path, "-o", tmp_path / "t.parquet"), "not supported")
    assert "llama" in msg and "gpt2" in msg and "bert" in msg
    assert not (tmp_path / "t.parquet").exists()


def test_corrupt_weights_are_one_line(folder: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((folder / "config.json").read_text())
    (bad / "model.safetensors").write_bytes(b"\x00" * 64)
    one_line_error(invoke("profile", "--model", bad, "-o", tmp_path / "t.parquet", "--no-progress"), "safetensors")
    assert not (tmp_path / "t.parquet").exists()


def test_calibration_text_shorter_than_one_sequence(folder: Path, table: Path, tmp_path: Path) -> None:
    short = tmp_path / "short.txt"
    short.write_text("A short calibration file.\nIt has three lines.\nThat is all.\n")
    out = tmp_path / "run"
    res = invoke(
        "search",
        "--model",
        folder,
        "--space",
        folder.parent / "space.yaml",
        "--table",
        table,
        "--calib",
        short,
        "--target-speedup",
        "1.3",
        "-o",
        out,
    )
    one_line_error(res, "add texts")
    assert not out.exists()


def test_unreachable_target_names_the_maximum(folder: Path, table: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    one_line_error(
        invoke(
            "search",
            "--model",
            folder,
            "--space",
            folder.parent / "space.yaml",
            "--table",
            table,
            "--target-speedup",
            "1000",
            "-o",
            out,
        ),
        "largest reachable speedup is",
    )
    assert not out.exists()


def test_gqa_groups_must_divide_heads() -> None:
    with pytest.raises(HwpruneError, match="not a multiple of num_kv_heads"):
        DecoderConfig(
            arch="llama",
            vocab_size=10,
            hidden_size=12,
            num_layers=1,
            num_heads=3,
            num_kv_heads=2,
            head_dim=4,
            intermediate_size=8,
        )


def test_named_shapes_and_spaces_load_without_weights() -> None:
    for name, groups in (("smollm2", 3), ("llama-3.2-1b", 8), ("qwen2.5-0.5b", 2), ("gpt2", 12)):
        a = resolve_model(name)
        cfg = a.config if name != "smollm2" else None
        if cfg is not None:
            assert cfg.num_kv_heads == groups
            sp = a.space()
            assert sp.source.endswith(f"{name}.yaml") and sp.unit("layer.0.attn").sizes[0] == 0


def test_distill_lowers_kl_to_dense(folder: Path) -> None:
    """Recovery distillation (hwprune.export.distill) on the decoder's loss, KL(dense || pruned) of the
    next-token distributions: a few steps on the calibration split lower the selection split's KL."""
    from hwprune.export.distill import DistillConfig, distill

    adapter = resolve_model(str(folder))
    space = adapter.space(folder.parent / "space.yaml")
    calib = adapter.load_calib(None, n_calib=32, n_heldout=8, seq=32)
    model = adapter.fit_proxy("magnitude", space, calib).build(space.uniform(0.5))
    scorer = adapter.scorer(calib)
    before = scorer.score(model)["kl"]
    doc = distill(adapter, model, calib.calib, DistillConfig(steps=30, lr=3e-3, batch=8))
    assert doc["split"] == "calibration" and doc["loss_last"] < doc["loss_first"]
    assert scorer.score(model)["kl"] < 0.8 * before
    assert not model.training
