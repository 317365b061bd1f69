"""CNN proxies: dead and duplicate channels go first at ~zero error, the least-squares refit absorbs a
duplicate exactly, BatchNorm re-estimation matches the data, calibration files are read safely."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from hwprune.errors import HwpruneError
from hwprune.families.cnn.adapter import CnnAdapter
from hwprune.families.cnn.calib import load_cnn_calib, read_images, recalibrate_bn
from hwprune.families.cnn.proxies import _plain_errors, fit_cnn_proxy
from hwprune.families.cnn.scorer import CnnScorer
from hwprune.proxies._base import CalibData
from hwprune.space import Candidate, build_space

PROXIES = ("magnitude", "bn_scale", "flap", "obs")


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: OpenMP spin-waits on a shared machine cost 20x
    yield
    torch.set_num_threads(old)


def _adapter_with(edit) -> tuple[CnnAdapter, CalibData]:
    """The tiny test net with ``edit`` applied and BN statistics of its own data (as if trained)."""
    a = CnnAdapter("test_cnn_adapter:tiny_net", input_shape="1,3,32,32")
    calib = load_cnn_calib(a, None, n_calib=48, n_heldout=16)
    m = a.dense()
    with torch.no_grad():
        edit(m)
    recalibrate_bn(m, calib.calib["input"])
    return a, calib


def _dead(m) -> None:
    m.res1[1].weight[[2, 9]] = 0.0  # res1's channels 2 and 9 are constant zero after BN + ReLU
    m.res1[1].bias[[2, 9]] = -5.0


def _duplicate(m) -> None:
    m.res1[0].weight[7] = m.res1[0].weight[3]  # channel 7 is a copy of channel 3 (same filter, BN)
    for t in (m.res1[1].weight, m.res1[1].bias):
        t[7] = t[3]


@pytest.mark.parametrize("kind", PROXIES)
def test_dead_channels_go_first_at_no_error(kind: str) -> None:
    a, calib = _adapter_with(_dead)
    space = build_space(a.raw_units(), {"overrides": [{"match": "group.res1.0", "step": 2, "min": 2}]})
    st = fit_cnn_proxy(kind, a, space, calib)
    i = space.names.index("group.res1.0")
    errs = st.unit_errors()
    for e, u in zip(errs, space.units):  # contract: 0 at full, non-increasing in kept size
        assert e.shape == (len(u.sizes),) and e[-1] == 0.0 and np.all(np.diff(e) <= 1e-12)
    if kind != "bn_scale":  # bn_scale ranks |gamma| = 0 first too, but the magnitude of bias is not its business
        assert set(st.orders[i][:2].tolist()) == {2, 9}
    assert st.errors[i][30] < 1e-9  # both dead channels removed: nothing changed at the consumer
    cand = Candidate(tuple(30 if u.name == "group.res1.0" else u.full for u in space.units))
    x = calib.heldout["input"]
    with torch.no_grad():
        pruned, dense = st.build(cand)(x), a.dense()(x)
    if kind != "bn_scale":
        assert torch.allclose(pruned, dense, atol=1e-4)


def test_least_squares_absorbs_a_duplicate_channel() -> None:
    a, calib = _adapter_with(_duplicate)
    space = build_space(a.raw_units(), {"overrides": [{"match": "group.res1.0", "step": 1, "min": 1}]})
    i = space.names.index("group.res1.0")
    obs, mag = fit_cnn_proxy("obs", a, space, calib), fit_cnn_proxy("magnitude", a, space, calib)
    assert obs.orders[i][0] in (3, 7) and obs.errors[i][31] < 1e-4  # the copy is free (up to damping)
    cand = Candidate(tuple(31 if u.name == "group.res1.0" else u.full for u in space.units))
    plan, over = obs.materialize(cand)
    assert len(plan.units["group.res1.0"]) == 31 and over["res2.0.weight"].shape == (16, 31, 3, 3)
    x = calib.heldout["input"]
    with torch.no_grad():
        dense = a.dense()(x)
        assert torch.allclose(a.prune(a.dense(), plan, over)(x), dense, atol=1e-3)  # plan + overrides suffice
        assert torch.allclose(obs.build(cand)(x), dense, atol=1e-3)
    # plain removal of any one channel changes the output; the refit does not
    assert mag.errors[i][31] > 100 * max(obs.errors[i][31], 1e-12)


def test_refit_never_loses_to_plain_removal_of_the_same_channels() -> None:
    a, calib = _adapter_with(lambda m: None)
    space = a.space()
    obs = fit_cnn_proxy("obs", a, space, calib)
    for i, u in enumerate(space.units):
        plain = _plain_errors(obs.consumers[i], obs.orders[i])[::-1]  # by kept size
        energy = sum(c.energy for c in obs.consumers[i])
        for s in u.sizes:
            assert obs.errors[i][s] <= plain[s] / energy * (1 + 1e-6) + 1e-12, (u.name, s)
    scorer = CnnScorer.from_calib(a, calib)
    assert scorer.score(a.dense()) == {
        "distance": 0.0,
        "rel_mse": 0.0,
        "distance_se": 0.0,
        "cosine": pytest.approx(1.0),
        "agreement": 1.0,
    }
    assert scorer.score(obs.build(space.uniform(0.5)))["distance"] > 0


def test_bn_recalibration_matches_the_data() -> None:
    a = CnnAdapter("test_cnn_adapter:tiny_net", input_shape="1,3,32,32")
    m = a.prune(a.dense(), a.plan({"group.res1.0": range(12)}))
    x = torch.randn(48, 3, 32, 32)
    recalibrate_bn(m, x, batch=16)  # equal batches: the cumulative average of batch means is the mean
    with torch.no_grad():
        h = m.res1[0](m.stem(x))  # the input of res1's BatchNorm
    bn = m.res1[1]
    assert not bn.training and bn.momentum == 0.1  # restored
    # upstream BNs normalise by batch statistics while re-estimating, by running ones afterwards: ~1e-4 apart
    assert torch.allclose(bn.running_mean, h.mean((0, 2, 3)), atol=1e-3)
    assert torch.allclose(bn.running_var, h.var((0, 2, 3)), rtol=0.02)  # misses only the spread of batch means


def test_calibration_files(tmp_path: Path) -> None:
    a = CnnAdapter("test_cnn_adapter:tiny_net", input_shape="1,3,32,32")
    x = np.random.default_rng(0).normal(size=(10, 3, 32, 32)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    torch.save(torch.from_numpy(x), tmp_path / "x.pt")
    save_file({"input": torch.from_numpy(x)}, str(tmp_path / "x.safetensors"))
    for ext in ("npy", "pt", "safetensors"):
        assert torch.equal(read_images(tmp_path / f"x.{ext}"), torch.from_numpy(x))
    c = load_cnn_calib(a, tmp_path / "x.npy", n_calib=6, n_heldout=4)
    assert c.n_calib == 6 and c.heldout["input"].shape == (4, 3, 32, 32)
    r = load_cnn_calib(a, tmp_path / "x.npy", n_calib=6, n_heldout=4, n_report=3)
    assert r.report["input"].shape[0] >= 1 and r.splits["held_out_by"] == "image"
    parts = [r.calib["input"], r.heldout["input"], r.report["input"]]
    rows = [{tuple(v.flatten()[:8].tolist()) for v in p} for p in parts]
    assert not rows[0] & rows[1] and not rows[0] & rows[2] and not rows[1] & rows[2]
    np.save(tmp_path / "bad.npy", x[:, :, :16])
    with pytest.raises(HwpruneError, match=r"shape \(10, 3, 16, 32\); the model takes \(N, 3, 32, 32\)"):
        load_cnn_calib(a, tmp_path / "bad.npy")
    torch.save({"images": torch.from_numpy(x), "note": Path("x")}, tmp_path / "pickled.pt")
    with pytest.raises(HwpruneError, match="cannot read it as .pt"):  # weights_only refuses the object
        read_images(tmp_path / "pickled.pt")
    with pytest.raises(HwpruneError, match="unknown calibration format '.png'"):
        read_images((tmp_path / "x.png").resolve() if (tmp_path / "x.png").write_bytes(b"x") else None)
