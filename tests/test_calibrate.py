"""Finding 3 of issue 10: the context factor measured at profile time, and the closed loop
(``hwprune calibrate``) on a tiny BERT folder with real ONNX Runtime timings."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from hwprune.api import load_adapter, make_predictor
from hwprune.cli import app
from hwprune.errors import HwpruneError
from hwprune.families.encoder.adapter import minilm_path
from hwprune.families.encoder.model import Encoder, _hf_key, from_hf_config
from hwprune.latency.correction import correction_path, fit_affine, load_correction
from hwprune.latency.store import read_history
from hwprune.latency.table import LatencyTable

runner = CliRunner()


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def one_line_error(res, pattern: str) -> str:
    assert res.exit_code == 2, res.output
    text = " ".join(res.output.split())
    assert text.startswith("error:") and pattern in text and "Traceback" not in res.output, res.output
    return text


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
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
def profiled(folder, tmp_path_factory) -> tuple[Path, str]:
    path = tmp_path_factory.mktemp("tables") / "tiny.parquet"
    res = invoke("profile", "--model", folder, "--space", folder / "space.yaml", "--seq", 32, "--budget-s", 4,
                 "-o", path, "--no-progress")  # fmt: skip
    assert res.exit_code == 0, res.output
    return path, res.output


@pytest.fixture(scope="module")
def run(folder, profiled, tmp_path_factory) -> Path:
    """A searched and exported run (two targets) on the profiled table."""
    out = tmp_path_factory.mktemp("runs") / "r"
    res = invoke("search", "--model", folder, "--space", folder / "space.yaml", "--table", profiled[0],
                 "--targets", "1.2,1.4", "--trials", 10, "-o", out, "--export", "--no-progress")  # fmt: skip
    assert res.exit_code == 0, res.output
    return out


def _copy_run(run: Path, table: Path, dest: Path) -> tuple[Path, Path]:
    """The run and its table copied under ``dest`` (run.json pointing at the copy): each test's own."""
    t = dest / "t" / "tiny.parquet"
    t.parent.mkdir(parents=True)
    for suffix in (".parquet", ".json"):
        shutil.copy(table.with_suffix(suffix), t.with_suffix(suffix))
    r = dest / "run"
    shutil.copytree(run, r)
    doc = json.loads((r / "run.json").read_text())
    doc["table"] = str(t)
    (r / "run.json").write_text(json.dumps(doc))
    return r, t


def _table_of(run: Path) -> Path:
    return Path(json.loads((run / "run.json").read_text())["table"])


def _manifests(run: Path) -> list[tuple[Path, dict]]:
    return [(p, json.loads(p.read_text())) for p in sorted((run / "candidates").glob("*/manifest.json"))]


# ---- the context factor -------------------------------------------------------------------------


def test_profile_stores_the_context_factor_and_the_predictor_applies_it(folder, profiled):
    path, output = profiled
    table = LatencyTable.load(path)
    ctx = table.context
    assert ctx is not None and ("context factor" in output or "affine context" in output)
    assert ctx["factor"] == pytest.approx(ctx["dense_measured_ms"] / ctx["dense_predicted_ms"], rel=1e-12)
    assert ctx["dense_measured_ms"] > 0 and ctx["rounds"] >= 1 and ctx["clock"] in ("thread-cpu", "wall")
    assert "hwprune.export.measure" in ctx["method"] and ctx["dense_control_pct"] is not None
    adapter = load_adapter(str(folder))
    space = adapter.space(str(folder / "space.yaml"))
    raw = adapter.predictor(table, space)
    pred = make_predictor(table, space, adapter)
    assert ctx["dense_predicted_ms"] == pytest.approx(raw.dense_ms(), rel=1e-12)
    assert pred.dense_ms() == pytest.approx(ctx["dense_measured_ms"], rel=1e-9)  # export-time ms by construction
    # (the affine context is fitted through the dense point: it keeps that)
    # the affine context: the dense model and the anchors, timed in the same rounds, and the fit over them
    aff = ctx["affine"]
    names = [p["name"] for p in aff["points"]]
    assert names[0] == "dense" and {"uniform-half", "smallest"} <= set(names) and "measured = scale" in aff["method"]
    a, b = table.context_affine if aff["applied"] else (ctx["factor"], 0.0)
    assert aff["applied"] == (table.context_affine is not None)
    for pt in aff["points"]:
        assert pt["measured_ms"] > 0 and pt["factor_error_pct"] == pytest.approx(
            100 * (ctx["factor"] * pt["predicted_ms"] / pt["measured_ms"] - 1)
        )
        if aff["applied"]:
            assert pt["fit_error_pct"] == pytest.approx(100 * ((a * pt["predicted_ms"] + b) / pt["measured_ms"] - 1))
            assert abs(pt["fit_error_pct"]) <= aff["residual_max_pct"] + 1e-9
    if aff["applied"]:
        assert aff["points"][0]["fit_error_pct"] == pytest.approx(0.0, abs=1e-9)
    small = space.smallest()
    assert pred.predict(small) == pytest.approx(a * raw.predict(small) + b, rel=1e-12)
    assert pred.dense_ms() == pytest.approx(a * raw.dense_ms() + b, rel=1e-12)
    base, costs = pred.unit_costs()  # still additive: the DP's model is the prediction
    assert pred.additive and pred.predict(small) == pytest.approx(base + sum(float(c.min()) for c in costs))
    if aff["applied"]:
        assert pred.info["context_factor"] == a and pred.info["context_offset_ms"] == b
        assert "affine fit to anchor subnets" in pred.info["context"] and "affine context" in output
    else:
        assert pred.info == {"context_factor": ctx["factor"], "context": "measured at profile time", "correction": None}


def test_affine_context_replaces_the_factor_only_when_applied(folder, profiled, tmp_path):
    """A sound affine fit maps block sums to export-time ms (scale and offset, as base_predict too); an
    unsound one (applied false) leaves the single factor; a correction composes on top of either."""
    src = profiled[0]
    adapter = load_adapter(str(folder))
    space = adapter.space(str(folder / "space.yaml"))
    side = json.loads(src.with_suffix(".json").read_text())
    cand = space.uniform(0.5)
    for applied in (True, False):
        t = tmp_path / f"t{applied}.parquet"
        shutil.copy(src, t)
        side["meta"]["context"]["affine"].update(applied=applied, scale=1.25, offset_ms=0.5, residual_max_pct=0.1)
        t.with_suffix(".json").write_text(json.dumps(side))
        table = LatencyTable.load(t)
        raw = adapter.predictor(table, space).predict(cand)
        pred = make_predictor(table, space, adapter)
        want = 1.25 * raw + 0.5 if applied else table.context_factor * raw
        assert pred.predict(cand) == pytest.approx(want, rel=1e-12)
        assert pred.base_predict(cand) == pytest.approx(want, rel=1e-12)


def test_a_table_without_factor_predicts_as_before_and_says_so_once(folder, profiled, tmp_path):
    src = profiled[0]
    old = tmp_path / "old.parquet"
    shutil.copy(src, old)
    side = json.loads(src.with_suffix(".json").read_text())
    del side["meta"]["context"]
    old.with_suffix(".json").write_text(json.dumps(side))
    table = LatencyTable.load(old)
    adapter = load_adapter(str(folder))
    space = adapter.space(str(folder / "space.yaml"))
    said: list[str] = []
    p1 = make_predictor(table, space, adapter, log=said.append)
    make_predictor(table, space, adapter, log=said.append)
    assert len(said) == 1 and "no context factor" in said[0] and "hwprune profile" in said[0]
    assert p1.dense_ms() == adapter.predictor(table, space).dense_ms() and p1.info["context_factor"] == 1.0


# ---- export records what it applied --------------------------------------------------------------


def test_export_records_latency_model_and_history(run, profiled):
    table = LatencyTable.load(profiled[0])
    for _, m in _manifests(run):
        lm = m["latency_model"]
        scale, offset = table.context_affine or (table.context_factor, 0.0)
        assert lm["context_factor"] == pytest.approx(scale) and lm["correction"] is None
        assert (lm.get("context_offset_ms") or 0.0) == pytest.approx(offset)
        assert m["predicted_ms"] == pytest.approx(m["base_predicted_ms"], rel=1e-12)  # no correction: unchanged
        assert m["dense_predicted_ms"] == pytest.approx(m["dense_base_predicted_ms"], rel=1e-12)
        assert m["prediction_error_pct"] == pytest.approx(100 * (m["predicted_ms"] / m["measured_ms"] - 1))
    hist = read_history(profiled[0])
    keys = {h["key"] for h in hist}
    assert "dense" in keys and {p.parent.name for p, _ in _manifests(run)} <= keys
    assert all(h["error_pct"] == pytest.approx(100 * (h["predicted_ms"] / h["measured_ms"] - 1)) for h in hist)
    res = invoke("tables", "show", profiled[0])
    assert res.exit_code == 0, res.output
    assert "context factor:" in res.output and "correction: none" in res.output and "export " in res.output


# ---- calibrate ---------------------------------------------------------------------------------


def test_fit_affine_is_exact_and_refuses_degenerate_points():
    f = fit_affine([1.0, 2.0, 4.0], [1.25, 2.35, 4.55])  # 1.1 x + 0.15
    assert f.scale == pytest.approx(1.1) and f.offset_ms == pytest.approx(0.15)
    assert f.residual_rms_ms == pytest.approx(0, abs=1e-12) and f.n_points == 3
    with pytest.raises(HwpruneError, match="two different predicted"):
        fit_affine([2.0, 2.0], [1.0, 1.1])
    with pytest.raises(HwpruneError, match="not positive"):
        fit_affine([1.0, 2.0], [2.0, 1.0])
    with pytest.raises(HwpruneError, match="finite"):
        fit_affine([1.0, float("nan")], [1.0, 2.0])


def test_fit_affine_minimises_relative_error():
    """One slow outlier must not decide the fit: relative least squares keeps the fast points' % error
    smaller than plain least squares in ms does (the manifests state % error)."""
    x = np.array([1.0, 1.5, 2.0, 2.5, 50.0])
    y = np.array([1.1, 1.6, 2.1, 2.6, 40.0])  # fast points: +0.1 ms; the slow one measured 20 % under
    f = fit_affine(x, y)
    rel = np.abs(f.scale * x + f.offset_ms - y) / y
    a, b = np.polyfit(x, y, 1)  # plain least squares in ms
    rel_ms = np.abs(a * x + b - y) / y
    assert np.sum(rel**2) < np.sum(rel_ms**2)
    assert rel[:4].max() < rel_ms[:4].max()
    assert f.residual_max_pct == pytest.approx(100 * rel.max())


def test_calibrate_fits_exact_scale_and_offset_and_search_uses_it(run, folder, tmp_path):
    r, t = _copy_run(run, _table_of(run), tmp_path)
    a, b = 1.23, 0.0417  # synthetic truth written into the real export's manifests
    for p, m in _manifests(r):
        m["measured_ms"] = a * m["base_predicted_ms"] + b
        m["dense_measured_ms"] = a * m["dense_base_predicted_ms"] + b
        p.write_text(json.dumps(m))
    res = invoke("calibrate", r)
    assert res.exit_code == 0, res.output
    corr = load_correction(t)
    assert corr is not None and corr.version == 1 and corr.source == "manifests"
    assert corr.fit.scale == pytest.approx(a, rel=1e-9) and corr.fit.offset_ms == pytest.approx(b, rel=1e-6)
    assert corr.fit.residual_rms_ms == pytest.approx(0, abs=1e-9) and corr.fit.n_points == len(_manifests(r)) + 1
    assert corr.table["digest"] == LatencyTable.load(t).digest() and "measured = 1.2300 x predicted" in res.output
    assert not list(t.parent.glob(".*tmp"))  # written atomically: no temporary left
    # the predictor (search and export) now predicts a * base + b, and says which correction
    table = LatencyTable.load(t)
    adapter = load_adapter(str(folder))
    space = adapter.space(str(folder / "space.yaml"))
    pred, base = make_predictor(table, space, adapter), make_predictor(table, space, adapter, correct=False)
    for c in (space.dense(), space.smallest()):
        assert pred.predict(c) == pytest.approx(a * base.predict(c) + b, rel=1e-12)
    assert pred.info["correction"]["version"] == 1 and pred.info["correction"]["scale"] == pytest.approx(a)
    # a real export with it: the manifest records the correction it applied
    res = invoke("export", r, "--no-progress")
    assert res.exit_code == 0, res.output
    assert "then correction v1 (x 1.2300 +0.0417 ms" in " ".join(res.output.split()), res.output
    for _, m in _manifests(r):
        assert m["latency_model"]["correction"]["version"] == 1
        assert m["predicted_ms"] == pytest.approx(a * m["base_predicted_ms"] + b, rel=1e-12)
    # calibrating again makes version 2 and keeps version 1 as previous
    res = invoke("calibrate", r)
    assert res.exit_code == 0, res.output
    corr2 = load_correction(t)
    assert corr2 is not None and corr2.version == 2 and corr2.previous[0]["version"] == 1
    show = invoke("tables", "show", t)
    assert show.exit_code == 0 and "correction v2" in show.output and "v1" in show.output, show.output


def test_calibrate_remeasure_times_the_exports_here(run, tmp_path):
    r, t = _copy_run(run, _table_of(run), tmp_path)
    res = invoke("calibrate", r, "--remeasure", "--rounds", 2, "--repeats", 5)
    assert res.exit_code == 0, res.output
    corr = load_correction(t)
    assert corr is not None and corr.source == "remeasured" and corr.fit.scale > 0
    dense = [p for p in corr.points if p["dense"]]
    assert len(dense) == 1 and corr.fit.n_points == len(_manifests(r)) + 1
    stated = {p.parent.name: m["measured_ms"] for p, m in _manifests(r)}
    assert all(p["measured_ms"] != stated.get(p["key"]) for p in corr.points if not p["dense"])  # fresh timings
    assert any("calibrate --remeasure" in h["source"] for h in read_history(t))


def test_table_without_correction_is_unchanged_and_stale_or_foreign_corrections_warn(run, folder, tmp_path):
    r, t = _copy_run(run, _table_of(run), tmp_path)
    adapter = load_adapter(str(folder))
    space = adapter.space(str(folder / "space.yaml"))
    before = make_predictor(LatencyTable.load(t), space, adapter).predict(space.smallest())
    assert before == make_predictor(LatencyTable.load(t), space, adapter, correct=False).predict(space.smallest())
    assert invoke("calibrate", r).exit_code == 0
    cp = correction_path(t)
    doc = json.loads(cp.read_text())
    # fitted on another machine: applied, with a warning naming the fix
    doc["fingerprint"]["cpu"] = "Some Other CPU"
    cp.write_text(json.dumps(doc))
    said: list[str] = []
    p = make_predictor(LatencyTable.load(t), space, adapter, log=said.append)
    assert p.info["correction"] is not None
    assert any("another setup" in s and "--remeasure" in s and "Some Other CPU" in s for s in said), said
    # a re-profiled table (other measurements): not applied, a warning says to calibrate again
    side = json.loads(t.with_suffix(".json").read_text())
    side["created"] = "2030-01-01T00:00:00+0000"
    t.with_suffix(".json").write_text(json.dumps(side))
    said.clear()
    p = make_predictor(LatencyTable.load(t), space, adapter, log=said.append)
    assert p.info["correction"] is None and p.predict(space.smallest()) == pytest.approx(before, rel=1e-12)
    assert any("earlier profile" in s and "hwprune calibrate" in s for s in said), said
    # a table older than the installed runtime: a warning naming the fix
    side["fingerprint"]["runtime_version"] = "onnxruntime 0.0.1"
    t.with_suffix(".json").write_text(json.dumps(side))
    warns = LatencyTable.load(t).machine_warnings("ort-cpu", 1)
    assert any("runtime version" in w and "hwprune profile --model" in w for w in warns), warns


def test_corrupt_inputs_are_one_line_errors(run, folder, tmp_path):
    r, t = _copy_run(run, _table_of(run), tmp_path)
    # a corrupt correction file: search and export refuse it in one line naming it
    correction_path(t).write_text("{not json")
    res = invoke("export", r, "--no-progress")
    one_line_error(res, "correction.json: corrupt JSON")
    correction_path(t).write_text(json.dumps({"format": "hwprune.table-correction/1", "scale": 1}))
    one_line_error(invoke("export", r, "--no-progress"), "lacks or mangles")
    correction_path(t).unlink()
    # a run without exports, not a run, a corrupt manifest
    bare = tmp_path / "bare"
    shutil.copytree(r, bare)
    for m in bare.glob("candidates/*/manifest.json"):
        m.unlink()
    one_line_error(invoke("calibrate", bare), "has no exported candidate")
    one_line_error(invoke("calibrate", tmp_path / "nothing"), "is not a search run")
    bad = tmp_path / "bad"
    shutil.copytree(r, bad)
    next(iter(bad.glob("candidates/*/manifest.json"))).write_text("[1, 2")
    one_line_error(invoke("calibrate", bad), "not valid JSON")
    # runs from another table, or another model
    other, t2 = _copy_run(run, _table_of(run), tmp_path / "o")
    side = json.loads(t2.with_suffix(".json").read_text())
    side["created"] = "2031-01-01T00:00:00+0000"
    t2.with_suffix(".json").write_text(json.dumps(side))
    one_line_error(invoke("calibrate", r, other), "calibrate the runs of one table at a time")
    doc = json.loads((other / "run.json").read_text())
    doc["table"], doc["adapter"] = str(t), {**doc["adapter"], "model": "something-else"}
    (other / "run.json").write_text(json.dumps(doc))
    one_line_error(invoke("calibrate", r, other), "searched another model")
    assert not correction_path(t).exists()  # nothing written by a refused calibrate


def test_a_corrected_non_additive_predictor_keeps_the_dp_exact():
    """CNN convs depend on two groups: the correction wraps the re-linearisation, which stays exact at
    the pick, and the DP still meets the (corrected) budget."""
    import numpy as np
    from test_cnn_latency import _bilinear, _synthetic_table

    from hwprune.families.cnn.adapter import CnnAdapter
    from hwprune.families.cnn.predictor import CnnPredictor
    from hwprune.latency.correction import CorrectedPredictor
    from hwprune.search.run import dp_pick

    tiny = CnnAdapter("test_cnn_adapter:tiny_net", input_shape="1,3,32,32")
    space = tiny.space()
    inner = CnnPredictor(_synthetic_table(tiny, _bilinear), space)
    pred = CorrectedPredictor(inner, scale=1.3, offset_ms=0.25, info={"context_factor": 1.0})
    assert not pred.additive
    small = space.smallest()
    assert pred.predict(small) == pytest.approx(1.3 * inner.predict(small) + 0.25, rel=1e-12)
    errors = [np.linspace(1.0, 0.0, len(u.sizes)) ** 2 for u in space.units]
    budget = pred.dense_ms() / 1.5
    sol = dp_pick(space, pred, errors, budget, buckets=4000, dense_ms=pred.dense_ms())
    assert sol is not None and pred.predict(sol.candidate) <= budget * (1 + 1e-9)
    base, costs = pred.linearized_at(sol.candidate).unit_costs()
    ix = [u.sizes.index(s) for u, s in zip(space.units, sol.candidate.sizes)]
    assert base + sum(c[i] for c, i in zip(costs, ix)) == pytest.approx(pred.predict(sol.candidate), rel=1e-12)


def test_a_store_folder_keeps_its_legacy_history_json(profiled, tmp_path):
    from hwprune.latency.store import append_history, file_table

    st = file_table(LatencyTable.load(profiled[0]), tmp_path / "store", device="here")
    old = {"when": "2026-01-01", "key": "k", "predicted_ms": 1.0, "measured_ms": 1.0, "error_pct": 0.0, "source": "x"}
    (st.folder / "history.json").write_text(json.dumps({"format": "hwprune.table-history/1", "entries": [old]}))
    assert read_history(st.path) == [old]  # the name before issue 10 is read
    append_history(st.path, [{**old, "key": "new"}])
    assert [e["key"] for e in read_history(st.path)] == ["k", "new"] and (st.folder / "table.history.json").is_file()
    res = invoke("tables", "show", st.name, "--store", tmp_path / "store")
    assert res.exit_code == 0 and "new" in res.output and "context factor:" in res.output, res.output


def test_fit_through_the_dense_point():
    """The affine context passes through the dense point exactly and recovers a line from its anchors;
    it declines (None) without an anchor of another prediction or with a scale <= 0."""
    from hwprune.latency.context import fit_through

    a, b = fit_through(10.0, 8.5, [7.0, 5.0, 2.0], [0.8 * 7 + 0.5, 0.8 * 5 + 0.5, 0.8 * 2 + 0.5])
    assert a == pytest.approx(0.8) and b == pytest.approx(0.5)
    assert a * 10.0 + b == pytest.approx(8.5)
    assert fit_through(10.0, 8.5, [], []) is None
    assert fit_through(10.0, 8.5, [10.0], [9.0]) is None
    assert fit_through(10.0, 8.5, [5.0], [9.0]) is None  # smaller prediction, slower measurement
