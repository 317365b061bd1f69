"""Latency: the backend contract, tables on disk, the LUT predictor, and profiling a tiny encoder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from hwprune.errors import HwpruneError
from hwprune.export.onnx_io import to_onnx
from hwprune.families.encoder.adapter import EncoderAdapter
from hwprune.latency import DeviceFingerprint, LatencyTable, LUTPredictor, get_backend, profile
from hwprune.latency.backends import interleave
from hwprune.latency.table import table_paths
from hwprune.space import Candidate, build_space

FP = DeviceFingerprint.current("ort-cpu", threads=1, batch=1, seq=16)
SHIPPED = Path(__file__).resolve().parents[1] / "latency_tables" / "minilm_ort-cpu_t1_b1_s128.parquet"


def _tiny_graph() -> tuple[bytes, dict[str, np.ndarray], nn.Module]:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8)).eval()
    x = torch.randn(4, 16)
    return to_onnx(m, {"x": x}, output_names=["y"]), {"x": x.numpy()}, m


# ---- backends --------------------------------------------------------------------------------------


class TestBackendContract:
    """What every backend promises (see hwprune/latency/_base.py); runs for each one available here."""

    @pytest.fixture(params=["ort-cpu", "ort-cuda", "tensorrt"])
    def backend(self, request):
        try:
            return get_backend(request.param, threads=1)
        except HwpruneError as e:
            pytest.skip(str(e))

    def test_time_is_ordered_and_positive(self, backend) -> None:
        onnx, feed, _ = _tiny_graph()
        t = backend.time(onnx, feed, warmup=3, repeats=25)
        assert t.n == 25 and t.median_ms > 0
        assert 0 < t.p10_ms <= t.median_ms <= t.p90_ms

    def test_run_matches_torch(self, backend) -> None:
        onnx, feed, m = _tiny_graph()
        (y,) = backend.run(onnx, feed)
        with torch.no_grad():
            want = m(torch.from_numpy(feed["x"])).numpy()
        assert y.shape == (4, 8)
        np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)

    def test_version_names_runtime(self, backend) -> None:
        assert backend.version().startswith("onnxruntime ")


def test_missing_runtimes_say_what_to_install() -> None:
    for name, hint in (("ort-cuda", "onnxruntime-gpu"), ("tensorrt", "pip install")):
        try:
            get_backend(name)
        except HwpruneError as e:
            assert hint in str(e) and "\n" not in str(e)
    with pytest.raises(HwpruneError, match="unknown runtime 'nope'; supported: .*ort-cpu"):
        get_backend("nope")
    with pytest.raises(HwpruneError, match="threads"):
        get_backend("ort-cpu", threads=0)


def test_interleave_rounds_and_unused_inputs() -> None:
    be = get_backend("ort-cpu")
    onnx, feed, _ = _tiny_graph()
    # a feed may carry inputs a graph dropped (the mask of a zero-head chain): they are left out
    runners = [be.prepare(onnx, {**feed, "unused": np.zeros(3)}) for _ in range(3)]
    ts = interleave(runners, rounds=12, per_round=2, warmup=1, common_mode=True)
    assert [t.n for t in ts] == [24, 24, 24]
    assert all(0 < t.p10_ms <= t.median_ms <= t.p90_ms for t in ts)
    with pytest.raises(HwpruneError, match="lacks graph input 'x'"):
        be.prepare(onnx, {"z": feed["x"]})


# ---- fingerprint and table files -------------------------------------------------------------------


def _frame() -> pd.DataFrame:
    rows = (
        [("base", 0, 0.5)]
        + [("heads", k, v) for k, v in enumerate([0.1, 1.0, 1.6, 1.5, 2.0])]
        + [("ffn", n, v) for n, v in ((0, 0.1), (16, 0.9), (32, 1.3), (64, 2.1))]
    )
    return pd.DataFrame(
        [
            {
                "kind": k,
                "key": "",
                "size": s,
                "size2": -1,
                "median_ms": m,
                "p10_ms": 0.9 * m,
                "p90_ms": 1.1 * m,
                "n": 50,
            }
            for k, s, m in rows
        ]
    )


def _table(tiny: EncoderAdapter, frame: pd.DataFrame | None = None) -> LatencyTable:
    return LatencyTable(
        frame=_frame() if frame is None else frame,
        fingerprint=FP,
        model=tiny.name,
        family="encoder",
        shape_key=tiny.shape_key(),
        profile_seconds=1.5,
        settings={"runtime": "ort-cpu", "threads": 1, "batch": 1, "seq": 16, "dtype": "float32"},
        meta={"dense_ms": {"median_ms": np.float64(9.0)}},
    )


@pytest.fixture()
def tiny() -> EncoderAdapter:
    return EncoderAdapter.tiny(layers=2, heads=4, head_dim=8, ffn=64)


def test_fingerprint_json_and_mismatches() -> None:
    assert DeviceFingerprint.from_json(json.loads(json.dumps(FP.to_json()))) == FP
    assert "hostname" not in json.dumps(FP.to_json()).lower()
    other = DeviceFingerprint.from_json({**FP.to_json(), "threads": 4, "cpu": "Other CPU", "torch_version": "0"})
    assert FP.mismatches(FP) == []
    assert FP.mismatches(other) == [f"cpu model: {FP.cpu!r} vs 'Other CPU'", "threads: 1 vs 4"]  # torch not compared


def test_table_round_trip(tmp_path: Path, tiny: EncoderAdapter) -> None:
    t = _table(tiny)
    pq = t.save(tmp_path / "t.parquet")
    assert pq.is_file() and pq.with_suffix(".json").is_file()
    side = json.loads(pq.with_suffix(".json").read_text())
    assert side["format"] == "hwprune.table/1" and side["shape_key"] == tiny.shape_key()
    assert side["settings"] == {"runtime": "ort-cpu", "threads": 1, "batch": 1, "seq": 16, "dtype": "float32"}
    u = LatencyTable.load(tmp_path / "t.json")  # either file name finds both
    pd.testing.assert_frame_equal(u.frame, t.frame)
    assert (u.fingerprint, u.model, u.shape_key, u.profile_seconds) == (FP, "tiny", tiny.shape_key(), 1.5)
    assert u.meta == {"dense_ms": {"median_ms": 9.0}} and u.base_ms == 0.5
    assert list(u.rows("heads")["size"]) == [0, 1, 2, 3, 4]
    assert table_paths("x/a") == (Path("x/a.parquet"), Path("x/a.json"))


def test_table_load_errors_are_one_line(tmp_path: Path, tiny: EncoderAdapter) -> None:
    def err(path: Path, pattern: str) -> None:
        with pytest.raises(HwpruneError, match=pattern) as e:
            LatencyTable.load(path)
        assert "\n" not in str(e.value)

    err(tmp_path / "none.parquet", "does not exist; make one with: hwprune profile")
    pq = _table(tiny).save(tmp_path / "t.parquet")
    js = pq.with_suffix(".json")
    good = js.read_text()
    js.write_text(good[:40])
    err(pq, "corrupt JSON sidecar .*re-profile")
    js.write_text(json.dumps({**json.loads(good), "format": "other/9"}))
    err(pq, "format 'other/9' is not 'hwprune.table/1'")
    js.write_text(good)
    pq.write_bytes(b"PAR1 not really")
    err(pq, "not a readable parquet file")
    js.unlink()
    err(pq, "t.json is missing")


def test_check_model_and_machine_warnings(tiny: EncoderAdapter) -> None:
    t = _table(tiny)
    t.check_model(tiny)
    other = EncoderAdapter.tiny(layers=3, heads=4, head_dim=8, ffn=64)
    with pytest.raises(HwpruneError, match=f"measured for {tiny.shape_key()} .*shape {other.shape_key()}"):
        t.check_model(other)
    assert t.machine_warnings("ort-cpu", 1) == []
    warns = t.machine_warnings("ort-cpu", 2)
    assert len(warns) == 1 and "threads: 1 vs 2" in warns[0]


# ---- predictor -------------------------------------------------------------------------------------


def _space(tiny: EncoderAdapter, ffn_grid: list[int]):
    return build_space(
        tiny.raw_units(),
        {"defaults": {"heads": {"step": 1, "allow_remove": True}, "ffn": {"grid": ffn_grid, "allow_remove": True}}},
    )


def test_predictor_exact_interpolated_staircase(tiny: EncoderAdapter) -> None:
    space = _space(tiny, [0, 16, 32, 48, 64])  # 48 is not in the table
    p = LUTPredictor(_table(tiny), space)
    base, costs = p.unit_costs()
    assert base == 0.5
    np.testing.assert_allclose(costs[0], [0.1, 1.0, 1.6, 1.5, 2.0])  # layer.0.heads: exact, steps kept
    np.testing.assert_allclose(costs[1], [0.1, 0.9, 1.3, 1.7, 2.1])  # layer.0.ffn: 48 halfway 32..64
    assert p.dense_ms() == pytest.approx(0.5 + 2 * (2.0 + 2.1))
    c = Candidate((3, 48, 2, 16))
    assert p.predict(c) == pytest.approx(0.5 + 1.5 + 1.7 + 1.6 + 0.9)
    assert p.predict(Candidate((3, 64, 4, 64))) < p.predict(Candidate((2, 64, 4, 64)))  # 3 heads beat 2
    with pytest.raises(HwpruneError, match="kept size 5 is not allowed"):
        p.predict(Candidate((5, 64, 4, 64)))


def test_predictor_refuses_sizes_outside_the_table(tiny: EncoderAdapter) -> None:
    f = _frame()
    with pytest.raises(HwpruneError, match=r"kept size 64 is outside the measured range \[0, 32\].*re-profile"):
        LUTPredictor(_table(tiny, f[~((f["kind"] == "ffn") & (f["size"] == 64))]), _space(tiny, [0, 32, 64]))
    with pytest.raises(HwpruneError, match="no rows of kind 'ffn'"):
        LUTPredictor(_table(tiny, f[f["kind"] != "ffn"]), _space(tiny, [0, 32, 64]))


# ---- profiling -------------------------------------------------------------------------------------


def test_profile_tiny_encoder_writes_table(tmp_path: Path) -> None:
    a = EncoderAdapter.tiny(layers=2, heads=2, head_dim=8, ffn=32)
    space = build_space(
        a.raw_units(),
        {"defaults": {"heads": {"step": 1, "allow_remove": True}, "ffn": {"grid": [16], "allow_remove": True}}},
    )
    t = profile(a, seq=16, space=space, out=tmp_path / "tiny.parquet", progress=False, budget_s=3)
    assert (tmp_path / "tiny.parquet").is_file() and (tmp_path / "tiny.json").is_file()
    u = LatencyTable.load(tmp_path / "tiny.parquet")
    assert u.shape_key == a.shape_key() and u.settings["seq"] == 16 and u.fingerprint.seq == 16
    assert list(u.rows("heads")["size"]) == [0, 1, 2] and list(u.rows("ffn")["size"]) == [0, 16, 32]
    f = u.frame
    assert (f["n"] >= 15).all() and np.isfinite(f["median_ms"]).all() and u.base_ms > 0
    assert (f["p10_ms"] <= f["median_ms"]).all() and (f["median_ms"] <= f["p90_ms"]).all()
    assert u.meta["chain_len"] == 2 and abs(u.meta["dense_error_pct"]) < 50
    p = LUTPredictor(u, space)
    assert 0 < p.predict(space.smallest()) < p.dense_ms()
    assert t.profile_seconds < 60


@pytest.mark.skipif(not SHIPPED.is_file(), reason="shipped MiniLM table not present")
def test_shipped_minilm_table(minilm: EncoderAdapter) -> None:
    t = LatencyTable.load(SHIPPED)
    t.check_model(minilm)
    assert t.settings == {"runtime": "ort-cpu", "threads": 1, "batch": 1, "seq": 128, "dtype": "float32"}
    space = minilm.space()
    p = LUTPredictor(t, space)  # covers every size of search_spaces/minilm.yaml
    heads = t.rows("heads")["median_ms"].to_numpy()
    ffn = t.rows("ffn")["median_ms"].to_numpy()
    assert len(heads) == 13 and len(ffn) == 25
    assert heads[-1] > 5 * heads[1] > 0 and ffn[-1] > 5 * ffn[1] > 0  # pruning pays, roughly in proportion
    assert abs(t.meta["dense_error_pct"]) < 3  # the block sum reproduces the measured dense model
    assert p.dense_ms() == pytest.approx(t.meta["dense_predicted_ms"], rel=1e-3)
