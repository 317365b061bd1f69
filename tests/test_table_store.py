"""The latency-table registry: filing by fingerprint, list / show / diff, and a device's table for search."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from typer.testing import CliRunner

from hwprune.cli import app
from hwprune.errors import HwpruneError
from hwprune.latency.fingerprint import DeviceFingerprint
from hwprune.latency.store import file_table, find_table, for_device, list_tables
from hwprune.latency.table import LatencyTable

runner = CliRunner()


def _table(*, threads: int = 1, scale: float = 1.0, shape: str = "bert-h64") -> LatencyTable:
    frame = pd.DataFrame(
        {
            "kind": ["base", "heads", "heads", "ffn", "ffn"],
            "key": [""] * 5,
            "size": [0, 2, 4, 64, 128],
            "size2": [-1] * 5,
            "median_ms": [v * scale for v in (0.1, 0.05, 0.09, 0.04, 0.08)],
            "p10_ms": [0.0] * 5,
            "p90_ms": [0.0] * 5,
            "n": [10] * 5,
        }
    )
    fp = DeviceFingerprint.current("ort-cpu", threads=threads, seq=32, runtime_version="onnxruntime test")
    settings = {"runtime": "ort-cpu", "threads": threads, "batch": 1, "seq": 32}
    return LatencyTable(
        frame=frame, fingerprint=fp, model="tiny", family="encoder", shape_key=shape, settings=settings, created="now"
    )


def test_file_list_find_and_replace(tmp_path) -> None:
    a = file_table(_table(threads=1), tmp_path, device="box-a")
    b = file_table(_table(threads=4, scale=0.5), tmp_path, device="box-a")
    assert a.folder != b.folder and a.name.startswith("box-a--")  # another fingerprint, its own folder
    (a.folder / "history.json").write_text(
        json.dumps(
            {
                "format": "hwprune.table-history/1",
                "entries": [{"when": "t", "key": "k1", "predicted_ms": 1.0, "measured_ms": 1.1, "error_pct": -9.1}],
            }
        )
    )
    again = file_table(_table(threads=1, scale=1.01), tmp_path, device="box-a")  # re-profiled: same id, replaced
    assert again.folder == a.folder and (a.folder / "history.json").is_file()
    assert LatencyTable.load(again.path).frame["median_ms"].iloc[0] == pytest.approx(0.101)
    assert [t.name for t in list_tables(tmp_path)] == sorted([a.name, b.name])
    assert find_table(tmp_path, a.id[:6]).folder == a.folder
    with pytest.raises(HwpruneError, match="matches several tables"):
        find_table(tmp_path, "box-a")
    with pytest.raises(HwpruneError, match="already holds this table"):
        file_table(_table(threads=1), tmp_path, device="box-b")


def test_for_device_picks_the_shape_and_says_what_is_there(tmp_path) -> None:
    t = file_table(_table(), tmp_path, device="edge-1")
    file_table(_table(shape="other"), tmp_path, device="edge-1")
    assert for_device(tmp_path, device="edge-1", model="tiny", shape_key="bert-h64") == t.path
    with pytest.raises(HwpruneError, match=r"no table for tiny on device 'edge-9' .*devices there: edge-1"):
        for_device(tmp_path, device="edge-9", model="tiny", shape_key="bert-h64")


def test_tables_cli(tmp_path) -> None:
    a = file_table(_table(threads=1), tmp_path, device="box-a")
    b = file_table(_table(threads=2, scale=1.2), tmp_path, device="box-b")
    res = runner.invoke(app, ["tables", "list", "--store", str(tmp_path)])
    assert res.exit_code == 0 and a.name in res.output and b.name in res.output
    res = runner.invoke(app, ["tables", "show", b.name, "--store", str(tmp_path)])
    assert res.exit_code == 0 and '"threads": 2' in res.output and "no predicted-vs-measured history" in res.output
    res = runner.invoke(app, ["tables", "diff", "box-a", "box-b", "--store", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "threads: 1 vs 2" in res.output and "+20.0 %" in res.output
    res = runner.invoke(app, ["tables", "show", "nothing", "--store", str(tmp_path)])
    assert res.exit_code == 2 and res.output.startswith("error:") and "matches no table" in " ".join(res.output.split())
    res = runner.invoke(app, ["tables", "list", "--store", str(tmp_path / "missing")])
    assert res.exit_code == 2 and "no table store" in res.output
