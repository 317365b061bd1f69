"""Issue 9, decode latency tables: ``hwprune profile --regime decode --context ...`` on a tiny LLaMA folder
(real ONNX Runtime sessions, very short timing), interpolation between contexts, the warning outside the
grid, and a table of one regime refused for the other in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from hwprune.api import make_predictor
from hwprune.cli import app
from hwprune.errors import HwpruneError
from hwprune.families import resolve_model
from hwprune.families.decoder.config import DecoderConfig
from hwprune.families.decoder.hf import save_hf_folder
from hwprune.families.decoder.model import random_decoder
from hwprune.latency import LatencyTable
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
    for c in CONTEXTS:  # exact at a measured context
        assert at[c].predict(cand) == pytest.approx(a.predictor(t.at_context(c), space).predict(cand))
    logs: list[str] = []
    mid = make_predictor(t, space, a, regime="decode", context=20, log=logs.append)  # 20 = 8 + (32 - 8) / 2
    assert not logs
    assert mid.predict(cand) == pytest.approx((at[8].predict(cand) + at[32].predict(cand)) / 2)
    base, costs = mid.unit_costs()  # the DP's additive model agrees with predict
    ix = [u.sizes.index(s) for u, s in zip(space.units, cand.sizes)]
    assert base + sum(c[j] for c, j in zip(costs, ix)) == pytest.approx(mid.predict(cand))


def test_outside_the_grid_warns_with_the_extrapolation(folder: Path, decode_table: Path) -> None:
    a = resolve_model(str(folder))
    space = a.space(folder.parent / "space.yaml")
    t = LatencyTable.load(decode_table)
    logs: list[str] = []
    far = make_predictor(t, space, a, regime="decode", context=120, log=logs.append)
    assert len(logs) == 1 and "context 120 is above the profiled grid 8, 32, 96" in logs[0]
    assert "extrapolated linearly from contexts 32 and 96" in logs[0] and "misses the dense model by" in logs[0]
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
