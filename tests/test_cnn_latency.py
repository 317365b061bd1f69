"""CNN latency: the profiling design covers every conv's width grid; the predictor interpolates exactly,
its additive unit costs agree with it at the reference; a real (tiny) profile round-trips as a table."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from hwprune.errors import HwpruneError
from hwprune.families.cnn import design as cnn_design
from hwprune.families.cnn import profile as profile_cnn
from hwprune.families.cnn.adapter import CnnAdapter
from hwprune.families.cnn.predictor import CnnPredictor
from hwprune.latency import DeviceFingerprint, LatencyTable, Timing, get_backend
from hwprune.search.run import dp_pick
from hwprune.space import Candidate

FP = DeviceFingerprint.current("ort-cpu", threads=1, batch=1, seq=32, runtime_version="onnxruntime test")


@pytest.fixture(scope="module")
def tiny() -> CnnAdapter:
    return CnnAdapter("test_cnn_adapter:tiny_net", input_shape="1,3,32,32")


def test_design_puts_every_conv_at_every_level_pair(tiny: CnnAdapter) -> None:
    space = tiny.space()
    k, nets = cnn_design.design(space, tiny.graph.layers, levels=5)
    assert k == 5 and len(nets) == 25
    levels = cnn_design.unit_levels(space, 5)
    assert levels["group.res1.0"] == (16, 24, 32) and levels["group.expand.0"] == (16, 24, 32, 40, 48)
    dense = {u.name: u.full for u in space.units}
    assert dense in nets  # (a, b) = (K-1, 0)
    for layer in tiny.graph.layers:
        seen = {cnn_design.layer_sizes(layer, n) for n in nets}
        p, q = layer.in_group, layer.out_group
        want_in = [lv * layer.in_mult for lv in levels[p]] if p else [layer.c_in]
        want_out = levels[q] if q else (layer.c_out,)
        want = {(a, a) for a in want_in} if layer.kind == "dw" else set(itertools.product(want_in, want_out))
        assert seen == want, layer.name


def _synthetic_table(tiny: CnnAdapter, f) -> LatencyTable:
    """A table as the profiler writes it, with ms = f(layer, c_in, c_out) at every design point."""
    space = tiny.space()
    _, nets = cnn_design.design(space, tiny.graph.layers, levels=5)
    rows = {}
    for net in nets:
        for layer in tiny.graph.layers:
            ci, co = cnn_design.layer_sizes(layer, net)
            rows[(layer.name, ci, co)] = {
                "kind": layer.kind,
                "key": layer.name,
                "size": ci,
                "size2": co,
                "median_ms": f(layer, ci, co),
                "p10_ms": 0.0,
                "p90_ms": 0.0,
                "n": 1,
            }
    frame = pd.DataFrame(
        [
            {"kind": "base", "key": "", "size": 0, "size2": -1, "median_ms": 0.5, "p10_ms": 0.5, "p90_ms": 0.5, "n": 1},
            *rows.values(),
        ]
    )
    return LatencyTable(
        frame=frame,
        fingerprint=FP,
        model=tiny.name,
        family="cnn",
        shape_key=tiny.shape_key(),
        settings={"runtime": "ort-cpu", "threads": 1, "batch": 1, "seq": 32},
        meta={"layers": cnn_design.layers_meta(tiny.graph.layers)},
    )


def _bilinear(layer, ci: int, co: int) -> float:
    w = 1.0 + len(layer.name)  # a different slope per layer
    if layer.kind == "dw":  # a depthwise conv's MACs grow linearly in its one width
        return 0.01 + 1e-3 * w * ci
    return 0.01 + 1e-3 * (ci + 2 * co) + 1e-4 * w * ci * co


def test_predict_is_exact_for_bilinear_costs_off_grid(tiny: CnnAdapter) -> None:
    space = tiny.space()
    pred = CnnPredictor(_synthetic_table(tiny, _bilinear), space)
    rng = np.random.default_rng(0)
    for _ in range(20):
        cand = Candidate(tuple(int(rng.choice(u.sizes)) for u in space.units))
        sizes = cand.as_dict(space)
        want = 0.5 + sum(_bilinear(l, *cnn_design.layer_sizes(l, sizes)) for l in tiny.graph.layers)
        assert pred.predict(cand) == pytest.approx(want, rel=1e-12)


def test_unit_costs_are_exact_at_the_reference_and_along_one_unit(tiny: CnnAdapter) -> None:
    space = tiny.space()
    pred = CnnPredictor(_synthetic_table(tiny, _bilinear), space)
    base, costs = pred.unit_costs()
    additive = lambda c: base + sum(k[u.sizes.index(s)] for k, u, s in zip(costs, space.units, c.sizes))  # noqa: E731
    assert additive(space.dense()) == pytest.approx(pred.dense_ms(), rel=1e-12)
    for i, u in enumerate(space.units):  # one unit moved: every conv has one free width, so exact
        c = list(space.dense().sizes)
        c[i] = u.sizes[0]
        assert additive(Candidate(tuple(c))) == pytest.approx(pred.predict(Candidate(tuple(c))), rel=1e-12)
    small = space.smallest()
    assert additive(small) < pred.predict(small)  # around dense the additive model is optimistic
    relin = pred.linearized_at(small)
    b2, c2 = relin.unit_costs()
    assert b2 + sum(k[0] for k in c2) == pytest.approx(pred.predict(small), rel=1e-12)


def test_predictor_refuses_widths_outside_the_profile(tiny: CnnAdapter, tmp_path: Path) -> None:
    y = tmp_path / "s.yaml"
    y.write_text("defaults:\n  conv: {step: 1, min: 1}\n")
    with pytest.raises(HwpruneError, match="outside the measured range"):
        CnnPredictor(_synthetic_table(tiny, _bilinear), tiny.space(y))


def test_profile_tiny_model_round_trips(tiny: CnnAdapter, tmp_path: Path) -> None:
    space = tiny.space()
    frame, meta = profile_cnn.measure(
        tiny, get_backend("ort-cpu", threads=1), batch=1, space=space, progress=False, levels=3, budget_s=2.0
    )
    assert meta["networks"] == 9 and meta["unmatched_layer_samples"] == 0
    conv = frame[frame["key"] == "res2.0"]  # reads group.res1.0 (3 levels), writes group.stem.0 (3 levels)
    lv = cnn_design.unit_levels(space, 3)
    assert lv["group.res1.0"] == (16, 24, 32) and lv["group.stem.0"] == (4, 12, 16)
    assert sorted(zip(conv["size"], conv["size2"])) == [(a, b) for a in (16, 24, 32) for b in (4, 12, 16)]
    assert (frame[frame["kind"] != "base"]["median_ms"] > 0).all()
    table = LatencyTable(
        frame=frame,
        fingerprint=FP,
        model=tiny.name,
        family="cnn",
        shape_key=tiny.shape_key(),
        settings={"runtime": "ort-cpu", "threads": 1, "batch": 1, "seq": 32},
        meta=meta,
    )
    table = LatencyTable.load(table.save(tmp_path / "t"))
    pred = CnnPredictor(table, space)
    # the table predicts the dense model as export measures it: its anchor, timed after the profile
    anchors = meta["network_fit"]["anchors"]
    assert len(anchors["measured_ms"]) == 3  # dense, smallest, middle uniform network
    assert pred.dense_ms() == pytest.approx(anchors["measured_ms"][0], rel=0.2)  # a loose sanity check
    assert pred.dense_ms() == pytest.approx(meta["dense_predicted_ms"], rel=1e-4)
    assert pred.predict(space.smallest()) < pred.dense_ms()


def test_conv_entries_split_network_times(tiny: CnnAdapter) -> None:
    space = tiny.space()
    prof = profile_cnn.prepare(
        tiny, get_backend("ort-cpu", threads=1), batch=1, space=space, progress=False, levels=3, profile_runs=3
    )
    assert len(prof.runners) == 1 + len(prof.nets) == 10 and prof.unmatched == 0
    for kern, total in zip(prof.kernels, prof.node_sum):  # every layer found, within its network's node sum
        assert len(kern) == len(tiny.graph.layers) and 0 < sum(kern.values()) <= total + 1e-9
    fake = [Timing(median_ms=10.0 + i, p10_ms=9.0 + i, p90_ms=11.0 + i, n=5) for i in range(len(prof.runners))]
    frame = prof.frame(fake)
    assert prof.nets[2] == {u.name: u.full for u in space.units}  # (a, b) = (K-1, 0) is the dense network
    row = frame[(frame["key"] == "res2.0") & (frame["size"] == 16) & (frame["size2"] == 4)]  # seen in one network
    i = next(i for i, k in enumerate(prof.kernels) if ("res2.0", 16, 4) in k)
    share = prof.kernels[i][("res2.0", 16, 4)] / prof.node_sum[i]
    assert float(row["median_ms"].iloc[0]) == pytest.approx(share * fake[1 + i].median_ms)
    base = float(frame[frame["kind"] == "base"]["median_ms"].iloc[0])
    entry = {(r.key, r.size, r.size2): r.median_ms for r in frame.itertuples()}
    resid = [fake[1 + i].median_ms - sum(entry[k] for k in kern) for i, kern in enumerate(prof.kernels)]
    assert base == pytest.approx(float(np.median(resid)))  # what the entries leave unexplained, typically


def test_relinearized_dp_meets_the_budget_exactly(tiny: CnnAdapter) -> None:
    space = tiny.space()
    pred = CnnPredictor(_synthetic_table(tiny, _bilinear), space)
    errors = [np.linspace(1.0, 0.0, len(u.sizes)) ** 2 for u in space.units]  # any non-increasing curves
    for target in (1.5, 2.0):
        budget = pred.dense_ms() / target
        sol = dp_pick(space, pred, errors, budget, buckets=4000, dense_ms=pred.dense_ms())
        assert sol is not None
        pick = sol.candidate
        assert pred.predict(pick) <= budget * (1 + 1e-9) and sol.predicted_ms == pytest.approx(pred.predict(pick))
        # ... and aims at it: the DP's budget also grows after an undershoot (2x used 0.90 before, 0.98 now)
        assert pred.predict(pick) >= 0.95 * budget
        base, costs = pred.linearized_at(pick).unit_costs()  # the linearisation is exact at the pick
        ix = [u.sizes.index(s) for u, s in zip(space.units, pick.sizes)]
        assert base + sum(c[i] for c, i in zip(costs, ix)) == pytest.approx(pred.predict(pick), rel=1e-12)


def test_chunked_timing_for_big_models(tiny: CnnAdapter) -> None:
    space = tiny.space()  # a 1-byte budget forces one network per chunk, each timed beside the dense model
    frame, meta = profile_cnn.measure(
        tiny,
        get_backend("ort-cpu", threads=1),
        batch=1,
        space=space,
        progress=False,
        levels=3,
        budget_s=1.0,
        max_live_bytes=1,
    )
    assert meta["networks"] == 9 and set(frame["key"]) - {""} == {l.name for l in tiny.graph.layers}
    assert (frame[frame["kind"] != "base"]["median_ms"] > 0).all()


# ---- the whole-network fit, and a model nobody profiled by hand ------------------------------------------
def test_network_fit_recovers_an_affine_context_and_refuses_a_broken_one() -> None:
    x = np.array([10.0, 6.0, 4.0, 2.5, 1.2])
    fit = profile_cnn.network_fit(x, 1.04 * x - 0.15)
    assert fit is not None
    assert fit["scale"] == pytest.approx(1.04) and fit["offset_ms"] == pytest.approx(-0.15)
    assert fit["mape_after_pct"] == pytest.approx(0.0, abs=1e-9) and fit["worst_before_pct"] > 7
    assert profile_cnn.network_fit(x, 3.0 * x) is None  # a 3x scale is a broken profile, not a context
    y = 1.04 * x - 0.15
    y[2] *= 1.3  # one network timed during a burst of load
    robust = profile_cnn.network_fit(x, y)
    assert robust is not None and robust["excluded"] == 1 and robust["scale"] == pytest.approx(1.04)
    assert profile_cnn.network_fit([2.0, 2.0], [1.0, 1.1]) is None  # nothing to fit


def test_predictor_applies_the_network_fit_and_stays_exact_for_the_dp(tiny: CnnAdapter) -> None:
    space = tiny.space()
    bare = _synthetic_table(tiny, _bilinear)
    fitted = _synthetic_table(tiny, _bilinear)
    fitted.meta["network_fit"] = {"scale": 1.1, "offset_ms": -0.2}
    p0, p1 = CnnPredictor(bare, space), CnnPredictor(fitted, space)
    for cand in (space.dense(), space.uniform(0.5), space.smallest()):
        assert p1.predict(cand) == pytest.approx(1.1 * p0.predict(cand) - 0.2)
    pick = space.uniform(0.4)
    base, costs = p1.linearized_at(pick).unit_costs()
    ix = [u.sizes.index(s) for u, s in zip(space.units, pick.sizes)]
    assert base + sum(c[i] for c, i in zip(costs, ix)) == pytest.approx(p1.predict(pick), rel=1e-12)


class _SEBlock(nn.Module):
    """Inverted residual with a squeeze-and-excitation gate (mobilenet_v3 / efficientnet style)."""

    def __init__(self, c: int, e: int, s: int) -> None:
        super().__init__()
        self.expand = nn.Sequential(nn.Conv2d(c, e, 1, bias=False), nn.BatchNorm2d(e), nn.Hardswish())
        self.dw = nn.Sequential(nn.Conv2d(e, e, 3, 1, 1, groups=e, bias=False), nn.BatchNorm2d(e), nn.SiLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1, self.fc2 = nn.Conv2d(e, s, 1), nn.Conv2d(s, e, 1)
        self.project = nn.Sequential(nn.Conv2d(e, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dw(self.expand(x))
        y = y * torch.nn.functional.hardsigmoid(self.fc2(torch.relu(self.fc1(self.pool(y)))))
        return x + self.project(y)


class _SENet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.b1, self.b2 = _SEBlock(32, 128, 32), _SEBlock(32, 192, 48)
        self.head = nn.Linear(32, 100)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.b2(self.b1(self.pool(self.stem(x)))).mean((2, 3)))


def se_net() -> nn.Module:
    return _SENet()


def test_profile_predicts_a_model_with_se_gates_depthwise_and_pooling(tmp_path: Path) -> None:
    """Profile a model outside the named four (SE gates, depthwise, max/avg pooling, hardswish, SiLU,
    residual adds), then measure its dense model and subnets whole, as export does: the table predicts
    each subnet's time relative to the dense model's within 30 % (the error that grew as subnets shrank,
    +52 % for the smallest before the network fit; on a quiet machine it is within 12 %, but with a
    two-thread job beside the test the smallest subnet came out +21 %). Raw milliseconds are only checked for their unit
    (within a factor of 3): a shared CI machine moved every raw figure alike by +20 % and, with another
    job beside it, by +43 %; raw figures belong to bench_cnn_zoo, not to a timed unit test."""
    from hwprune.api import ProfileRequest, load_adapter, make_predictor, run_profile
    from hwprune.export.candidate import candidate_onnx, timing_feed
    from hwprune.export.measure import measure_dense_and_pruned

    model = "test_cnn_latency:se_net"
    out = tmp_path / "se.parquet"
    run_profile(ProfileRequest(model=model, input_shape=(1, 3, 96, 96), out=str(out), budget_s=4.0), progress=False)
    ad = load_adapter(model, input_shape=(1, 3, 96, 96))
    space = ad.space()
    table = LatencyTable.load(out)
    assert table.meta["network_fit"] is not None and table.meta["network_fit"]["mape_after_pct"] < 10
    pred = make_predictor(table, space, ad)
    cands = {"half": space.uniform(0.5), "small": space.smallest()}

    def onnx(c: Candidate) -> bytes:
        m = ad.prune(ad.dense(), ad.plan({u.name: range(s) for u, s in zip(space.units, c.sizes)}))
        return candidate_onnx(ad, m, batch=1, seq=0)

    cmp = measure_dense_and_pruned(
        get_backend("ort-cpu", threads=1),
        dense=candidate_onnx(ad, ad.dense(), batch=1, seq=0),
        pruned={k: onnx(c) for k, c in cands.items()},
        feed=timing_feed(ad, batch=1, seq=0),
        rounds=5,
        repeats=20,
        warmup=5,
    )
    measured = {"dense": cmp.dense.median_ms, **{k: cmp.pruned[k].median_ms for k in cands}}
    predicted = {"dense": pred.predict(space.dense()), **{k: pred.predict(c) for k, c in cands.items()}}
    errors = {k: 100 * (predicted[k] - measured[k]) / measured[k] for k in measured}
    assert measured["small"] < measured["half"] < measured["dense"]
    relative = {k: 100 * ((predicted[k] / predicted["dense"]) / (measured[k] / measured["dense"]) - 1) for k in cands}
    assert all(abs(e) < 30 for e in relative.values()), (relative, errors)
    assert all(1 / 3 < predicted[k] / measured[k] < 3 for k in measured), errors  # ms, not s or us
