"""Benchmark scripts run end to end on tiny models (figures are the scripts' business, not the tests')."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", SCRIPTS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_bench_latency_takes_a_factory_cnn(tmp_path: Path) -> None:
    out = tmp_path / "lat.json"
    rc = _script("bench_latency").main(
        [
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
    )
    assert rc == 0
    rep = json.loads(out.read_text())
    assert rep["family"] == "cnn" and rep["input_shape"] == [1, 3, 32, 32] and rep["n"] == 4
    names = [r["name"] for r in rep["subnets"]]
    assert names[:3] == ["dense", "smallest", "uniform-0.5"]
    dense, smallest = rep["subnets"][0], rep["subnets"][1]
    assert smallest["predicted_ms"] < dense["predicted_ms"] and all(r["measured_ms"] > 0 for r in rep["subnets"])


def test_bench_latency_bad_model_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "lat.json"
    rc = _script("bench_latency").main(["--model", "no_such_pkg.mod:build", "-o", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error:") and "no_such_pkg" in err and "\n" not in err
    assert not out.exists()
