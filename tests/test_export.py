"""Export: files, ONNX checker, ORT parity, interleaved measurement, manifest, all-or-nothing writes."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from hwprune.errors import HwpruneError, ParityError
from hwprune.export.candidate import candidate_onnx, check_parity, export_candidate, timing_feed
from hwprune.export.manifest import MANIFEST_FORMAT, Prediction, read_manifest
from hwprune.export.measure import Measurement, measure_dense_and_pruned
from hwprune.export.stats import count_params
from hwprune.export.tensorrt import TRT_MISSING, build_engine
from hwprune.families.encoder.adapter import EncoderAdapter
from hwprune.families.encoder.model import Encoder
from hwprune.families.encoder.stats import encoder_flops, encoder_params
from hwprune.latency._base import get_backend
from hwprune.latency.pages import page_mode

SEQ = 32
FAST = {"rounds": 2, "repeats": 5, "warmup": 2}
KEPT = {"layer.0.heads": [1, 3], "layer.1.heads": [], "layer.0.ffn": list(range(16))}


@pytest.fixture(scope="module")
def tiny() -> tuple[EncoderAdapter, Any, Encoder]:
    a = EncoderAdapter.tiny(layers=2, heads=4, head_dim=8, ffn=64)
    plan = a.plan(KEPT)
    return a, plan, a.prune(a.dense(), plan)


@pytest.fixture(scope="module")
def backend() -> Any:
    return get_backend("ort-cpu", threads=1)


@pytest.fixture(scope="module")
def exported(tiny: Any, backend: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    a, plan, m = tiny
    out = tmp_path_factory.mktemp("export") / "cand"
    man = export_candidate(
        a,
        m,
        plan,
        out,
        backend=backend,
        batch=1,
        seq=SEQ,
        prediction=Prediction(predicted_ms=0.09, dense_predicted_ms=0.18, target_speedup=2.0),
        scores={"proxy": 0.12, "e2e": 0.05},
        fingerprint={"cpu": "test", "threads": 1},
        extra={"note": "tiny"},
        timing=FAST,
    )
    return out, man


# ---- stats -----------------------------------------------------------------------------------


def test_flops_match_hand_count_and_torch_counter(tiny: Any) -> None:
    a, _, m = tiny
    # hidden 32, head_dim 8; layer 0: 2 heads (inner 16), ffn 16; layer 1: 0 heads, ffn 64; batch 1, seq 10
    # L0: QKV 3*10*32*16=15360, scores 2*10*10*8=1600, context 1600, out 10*16*32=5120, ffn 2*10*32*16=10240
    # L1: ffn 2*10*32*64=40960                      -> MACs 74880, FLOPs 149760
    assert (m.config.heads, m.config.ffn) == ((2, 0), (16, 64))
    assert encoder_flops(m.config, batch=1, seq=10) == 149_760
    for model, b, s in ((m, 1, 10), (a.dense(), 3, 7)):
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            model(**a.example_inputs(batch=b, seq=s))
        assert fc.get_total_flops() == encoder_flops(model.config, batch=b, seq=s)


def test_params_analytic_equals_module_count(tiny: Any) -> None:
    a, _, m = tiny
    assert encoder_params(m.config) == count_params(m) == 1_000_896
    assert encoder_params(a.dense().config) == count_params(a.dense()) == 1_010_304
    other = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    assert count_params(other) == 26
    assert a.stats(m, batch=1, seq=7).to_json() == {
        "params": count_params(m),
        "flops": encoder_flops(m.config, batch=1, seq=7),
        "batch": 1,
        "seq": 7,
    }


# ---- export ----------------------------------------------------------------------------------


def test_files_checker_and_io(exported: Any) -> None:
    out, _ = exported
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.onnx", "model.safetensors", "plan.json"]
    assert not [p for p in out.parent.iterdir() if p.name != out.name]  # no temp folder left beside it
    proto = onnx.load(str(out / "model.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    ins = {i.name: i for i in proto.graph.input}
    assert list(ins) == ["input_ids", "attention_mask"]
    for i in ins.values():
        assert i.type.tensor_type.elem_type == onnx.TensorProto.INT64
        assert [d.dim_param for d in i.type.tensor_type.shape.dim] == ["batch", "seq"]
    assert proto.graph.output[0].name == "last_hidden_state"


def test_manifest_numbers_are_consistent(exported: Any, tiny: Any) -> None:
    out, man = exported
    a, _, m = tiny
    assert read_manifest(out) == json.loads(json.dumps(man)) and man["format"] == MANIFEST_FORMAT
    assert man["measured_speedup"] == pytest.approx(man["dense_measured_ms"] / man["measured_ms"], rel=1e-12)
    assert man["predicted_speedup"] == pytest.approx(2.0)
    assert man["prediction_error_pct"] == pytest.approx(100 * (0.09 - man["measured_ms"]) / man["measured_ms"])
    assert man["timings"]["source"] == "interleaved"
    assert len(man["timings"]["dense"]["rounds_ms"]) == len(man["timings"]["pruned"]["rounds_ms"]) == 2
    assert man["timings"]["pruned"]["median_ms"] == man["measured_ms"]
    assert (man["params"], man["dense_params"]) == (count_params(m), count_params(a.dense()))
    assert man["flops"] == encoder_flops(m.config, batch=1, seq=SEQ) == 524_288
    assert man["dense_flops"] == encoder_flops(a.dense().config, batch=1, seq=SEQ) == 1_310_720
    assert 0.0 < man["parity_max_abs_diff"] < 1e-5 and man["parity_tol"] == 1e-3
    assert man["settings"] == {
        "runtime": "ort-cpu",
        "runtime_version": man["settings"]["runtime_version"],
        "threads": 1,
        "batch": 1,
        "seq": SEQ,
        "clock": "thread-cpu",
        "pages": page_mode(),  # this process's (hwprune.latency.pages)
    }
    assert {k: man["timings"][k] for k in FAST} == FAST
    assert set(man["versions"]) == {"hwprune", "torch", "onnx", "onnxruntime", "python"}
    assert (man["plan"]["heads"], man["plan"]["ffn"]) == ([2, 0], [16, 64])
    assert man["scores"] == {"proxy": 0.12, "e2e": 0.05} and man["fingerprint"]["cpu"] == "test"
    assert man["target_speedup"] == 2.0 and man["extra"] == {"note": "tiny"} and man["created"].endswith("+00:00")


def test_reported_parity_is_the_real_diff(exported: Any, tiny: Any, backend: Any) -> None:
    out, man = exported
    a, _, m = tiny
    diff = check_parity(a, m, (out / "model.onnx").read_bytes(), backend=backend, seq=SEQ, tol=1.0)
    assert diff == man["parity_max_abs_diff"]


def test_parity_failure_at_zero_tolerance_leaves_nothing(tiny: Any, backend: Any, tmp_path: Path) -> None:
    a, plan, m = tiny  # the real ORT-vs-torch diff is ~1e-7, not 0: tolerance 0 must refuse it
    with pytest.raises(ParityError) as e:
        export_candidate(a, m, plan, tmp_path / "cand", backend=backend, seq=SEQ, parity_tol=0.0, timing=FAST)
    msg = str(e.value)
    assert "\n" not in msg and "> tolerance 0" in msg
    assert float(msg.split(" by ")[1].split()[0]) > 0
    assert list(tmp_path.iterdir()) == []


class _EagerOnly(Encoder):
    """A model whose eager output differs from what the tracer records, like an op that exports wrong."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = super().forward(input_ids, attention_mask)
        return out if torch.onnx.is_in_onnx_export() else out + 0.01


def test_parity_failure_keeps_previous_export_intact(exported: Any, tiny: Any, backend: Any, tmp_path: Path) -> None:
    a, plan, _ = tiny
    prev = tmp_path / "cand"
    shutil.copytree(exported[0], prev)
    before = {p.name: p.read_bytes() for p in prev.iterdir()}
    bad = a.prune(a.dense(), plan)
    bad.__class__ = _EagerOnly
    with pytest.raises(ParityError, match=r"by 0\.01 .*> tolerance 0\.001"):
        export_candidate(a, bad, plan, prev, backend=backend, seq=SEQ, timing=FAST)
    assert {p.name: p.read_bytes() for p in prev.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["cand"]


def test_several_candidates_share_one_dense_measurement(tiny: Any, backend: Any, tmp_path: Path) -> None:
    a, _, m = tiny
    plan2 = a.plan({"layer.0.heads": [0], "layer.1.ffn": list(range(8))})
    m2 = a.prune(a.dense(), plan2)
    onnx_of = {"c1": candidate_onnx(a, m, batch=1, seq=SEQ), "c2": candidate_onnx(a, m2, batch=1, seq=SEQ)}
    cmp = measure_dense_and_pruned(
        backend,
        dense=candidate_onnx(a, a.dense(), batch=1, seq=SEQ),
        pruned=onnx_of,
        feed=timing_feed(a, batch=1, seq=SEQ),
        rounds=3,
        repeats=4,
        warmup=1,
    )
    assert sorted(cmp.pruned) == ["c1", "c2"] and len(cmp.dense.rounds_ms) == 3
    assert cmp.dense.median_ms == float(np.median(cmp.dense.rounds_ms))
    assert cmp.speedup("c1") == cmp.dense.median_ms / cmp.pruned["c1"].median_ms
    man = export_candidate(
        a,
        m2,
        plan2,
        tmp_path / "c2",
        backend=backend,
        seq=SEQ,
        measurement=Measurement.of(cmp, "c2", clock=backend.clock),
    )
    assert man["measured_speedup"] == pytest.approx(cmp.speedup("c2"), rel=1e-12)
    assert man["timings"]["source"] == "interleaved" and man["timings"]["rounds"] == 3
    assert man["timings"]["pruned"]["median_ms"] == cmp.pruned["c2"].median_ms
    with pytest.raises(HwpruneError, match="must be > 0 ms"):
        Measurement(measured_ms=0.0, dense_ms=1.0)


def test_read_manifest_rejects_foreign_json(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text('{"format": "other/1"}')
    with pytest.raises(HwpruneError, match="not a hwprune manifest"):
        read_manifest(tmp_path)


def test_tensorrt_missing_is_one_clear_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails even where tensorrt is installed
    with pytest.raises(HwpruneError) as e:
        build_engine(tmp_path / "model.onnx")
    assert str(e.value) == TRT_MISSING


# ---- real MiniLM -----------------------------------------------------------------------------


@pytest.mark.slow
def test_minilm_half_pruned_is_measurably_faster(backend: Any, tmp_path: Path) -> None:
    a = EncoderAdapter.minilm()
    c = a.config
    kept = {
        f"layer.{i}.{k}": range(n // 2)
        for i in range(c.num_layers)
        for k, n in (("heads", c.num_heads), ("ffn", c.intermediate_size))
    }
    plan = a.plan(kept)
    man = export_candidate(
        a,
        a.prune(a.dense(), plan),
        plan,
        tmp_path / "half",
        backend=backend,
        batch=1,
        seq=128,
        timing={"rounds": 5, "repeats": 10, "warmup": 3},
    )
    assert man["plan"]["heads"] == [6] * 6 and man["plan"]["ffn"] == [768] * 6
    assert man["parity_max_abs_diff"] < 1e-3
    assert man["flops"] * 2 == man["dense_flops"]  # every matmul halves at half heads and half FFN
    assert man["measured_speedup"] > 1.3, man["timings"]


def test_unexportable_model_is_one_clear_line(tmp_path: Path) -> None:
    """An op the ONNX exporter cannot write (adaptive pooling 3x3 -> 2x2) is a HwpruneError, not a traceback."""
    import torch
    from torch import nn

    from hwprune.errors import HwpruneError
    from hwprune.export.onnx_io import to_onnx

    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(2))
    with pytest.raises(HwpruneError, match=r"cannot export Sequential to ONNX for inputs input \(1, 3, 3, 3\)") as e:
        to_onnx(model, {"input": torch.zeros(1, 3, 3, 3)}, tmp_path / "m.onnx", output_names=["output"])
    assert "\n" not in str(e.value) and not (tmp_path / "m.onnx").exists()
