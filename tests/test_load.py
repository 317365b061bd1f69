"""``hwprune.save`` / ``hwprune.load``: a pruned model comes back from plan.json + safetensors alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import hwprune
from hwprune.errors import HwpruneError
from hwprune.export.candidate import export_candidate
from hwprune.families.encoder.adapter import EncoderAdapter
from hwprune.latency._base import get_backend
from hwprune.surgery.plan import Plan


def _out(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs)


def _assert_round_trip(a: EncoderAdapter, model: torch.nn.Module, folder: Path) -> torch.nn.Module:
    loaded = hwprune.load(folder)
    assert type(loaded) is type(model) and loaded.config == model.config and not loaded.training
    x = a.parity_inputs(seq=32)
    assert torch.equal(_out(loaded, x), _out(model, x))  # same weights, same ops: bit-identical
    return loaded


def test_round_trip_with_removed_sublayers(tmp_path: Path) -> None:
    a = EncoderAdapter.tiny(layers=3, heads=4, head_dim=8, ffn=64)
    plan = a.plan({"layer.0.heads": [0, 2], "layer.1.heads": [], "layer.1.ffn": [], "layer.2.ffn": [5, 9, 63]})
    m = a.prune(a.dense(), plan)
    hwprune.save(m, plan, tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["model.safetensors", "plan.json"]
    loaded = _assert_round_trip(a, m, tmp_path / "m")
    assert loaded.config.heads == (2, 0, 4) and loaded.config.ffn == (64, 0, 3)
    assert Plan.load(tmp_path / "m" / "plan.json") == plan


def test_exported_candidate_loads(tmp_path: Path) -> None:
    a = EncoderAdapter.tiny()
    plan = a.plan({"layer.0.heads": [3], "layer.1.ffn": list(range(0, 64, 2))})
    m = a.prune(a.dense(), plan)
    export_candidate(
        a,
        m,
        plan,
        tmp_path / "c",
        backend=get_backend("ort-cpu", threads=1),
        seq=16,
        timing={"rounds": 1, "repeats": 2, "warmup": 1},
    )
    _assert_round_trip(a, m, tmp_path / "c")


def test_missing_weights_is_one_line(tmp_path: Path) -> None:
    a = EncoderAdapter.tiny()
    plan = a.plan({"layer.0.heads": [0]})
    hwprune.save(a.prune(a.dense(), plan), plan, tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(HwpruneError, match="model.safetensors is missing"):
        hwprune.load(tmp_path)


def test_weights_from_another_plan_are_refused(tmp_path: Path) -> None:
    a = EncoderAdapter.tiny()
    p1, p2 = a.plan({"layer.0.heads": [0, 1]}), a.plan({"layer.0.heads": [0]})
    hwprune.save(a.prune(a.dense(), p1), p1, tmp_path)
    p2.save(tmp_path / "plan.json")
    with pytest.raises(HwpruneError) as e:
        hwprune.load(tmp_path)
    assert "weights do not match plan.json" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.slow
def test_minilm_round_trip(tmp_path: Path) -> None:
    a = EncoderAdapter.minilm()
    c = a.config
    plan = a.plan(
        {f"layer.{i}.heads": range(0, c.num_heads, 2) for i in range(c.num_layers)} | {"layer.5.ffn": range(100)}
    )
    m = a.prune(a.dense(), plan)
    hwprune.save(m, plan, tmp_path)
    loaded = _assert_round_trip(a, m, tmp_path)
    assert loaded.config.heads == (6,) * 6 and loaded.config.ffn == (1536,) * 5 + (100,)
