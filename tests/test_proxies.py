"""Accuracy proxies: the shared contract for every proxy, OBS algebra, FLAP compensation, real MiniLM."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from hwprune.errors import HwpruneError
from hwprune.families import resolve_model
from hwprune.families.encoder.adapter import EncoderAdapter
from hwprune.families.encoder.calib import load_calib
from hwprune.families.encoder.collect import collect_stats
from hwprune.families.encoder.scorer import EndToEndScorer
from hwprune.families.encoder.surgery import kept_columns
from hwprune.proxies._base import fit_proxy, get_proxy, proxy_names
from hwprune.proxies.flap import compensated_bias
from hwprune.proxies.obs import (
    cholesky_,
    damped,
    inverse_spd_,
    ls_weights,
    ls_weights_blocks,
    obs_order,
    symmetrize_,
)
from hwprune.proxies.stats import SublayerStats
from hwprune.space import Candidate, PruningSpace

PROXIES = ["magnitude", "flap", "obs"]


@pytest.fixture(scope="module")
def tiny() -> dict[str, Any]:
    a = EncoderAdapter.tiny(seed=3)
    space = a.space()
    data = load_calib(a, n_calib=48, n_heldout=16, seq=32)
    stats = collect_stats(a.dense(), data.calib, threads=1)
    states = {n: fit_proxy(n, a, space, data, stats=stats, progress=False) for n in PROXIES}
    return {"adapter": a, "space": space, "data": data, "stats": stats, "states": states}


def _cand(space: PruningSpace, **sizes: int) -> Candidate:
    """Dense candidate except ``layer_0_heads=2``-style overrides."""
    named = {k.replace("_", "."): v for k, v in sizes.items()}
    return Candidate(tuple(named.get(u.name, u.full) for u in space.units))


def _inputs_of(model: torch.nn.Module, module: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """All inputs of ``module`` over non-pad tokens, (tokens, width) float64 (small models only)."""
    got: list[torch.Tensor] = []
    hook = module.register_forward_hook(lambda _m, args, _o: got.append(args[0]))
    with torch.inference_mode():
        model(inputs["input_ids"], inputs["attention_mask"])
    hook.remove()
    return got[0][inputs["attention_mask"].bool()].double()


def _forward(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.inference_mode():
        return model(inputs["input_ids"], inputs["attention_mask"])


def test_registry() -> None:
    assert {"magnitude", "flap", "obs"} <= set(proxy_names("encoder"))
    with pytest.raises(HwpruneError, match="unknown proxy 'nope' for encoder models; supported: flap"):
        get_proxy("nope", "encoder")


def test_stats_match_brute_force(tiny: dict[str, Any]) -> None:
    model, data, stats = tiny["adapter"].dense(), tiny["data"], tiny["stats"]
    x = _inputs_of(model, model.layers[1].ffn.output, data.calib)
    st = stats[1].ffn
    assert st.count == int(data.calib["attention_mask"].sum()) == x.shape[0]  # pads excluded
    torch.testing.assert_close(st.xtx, x.T @ x, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(st.mean, x.mean(0), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(st.var, x.var(0, unbiased=False), rtol=1e-4, atol=1e-8)
    r = _inputs_of(model, model.layers[1].attention.query, data.calib)  # residual entering attention
    assert stats[1].attn.resid_energy == pytest.approx(float(r.square().sum(1).mean()), rel=1e-6)


@pytest.mark.parametrize("name", PROXIES)
def test_unit_errors_contract(tiny: dict[str, Any], name: str) -> None:
    state, space = tiny["states"][name], tiny["space"]
    errs = state.unit_errors()
    assert len(errs) == len(space.units)
    for e, u in zip(errs, space.units):
        assert e.shape == (len(u.sizes),) and e.dtype == np.float64 and np.isfinite(e).all()
        assert e[-1] == 0.0 and (e >= 0).all() and (np.diff(e) <= 0).all()
        assert e[0] > 0  # removing a whole sublayer of a random model costs something
    plan, overrides = state.materialize(space.dense())
    assert overrides == {} and plan.sizes() == {u.name: u.full for u in space.units}
    small = state.build(space.smallest())
    assert small.config.heads == (0, 0) and small.config.ffn == (0, 0)
    assert torch.isfinite(_forward(small, tiny["data"].heldout)).all()


@pytest.mark.parametrize("name", PROXIES)
def test_pruning_zero_weight_units_changes_nothing(tiny: dict[str, Any], name: str) -> None:
    a = EncoderAdapter.tiny(seed=3)
    model = a.dense()
    dead_heads, dead_neurons = [1, 3], list(range(3, 64, 4))  # 2 of 4 heads, 16 of 64 neurons
    with torch.no_grad():
        model.layers[0].attention.dense.weight[:, kept_columns(tuple(dead_heads), 8)] = 0.0
        model.layers[1].ffn.output.weight[:, dead_neurons] = 0.0
    ref = _forward(model, tiny["data"].heldout)
    state = fit_proxy(name, a, tiny["space"], tiny["data"], progress=False, threads=1)
    cand = _cand(tiny["space"], layer_0_heads=2, layer_1_ffn=48)
    kept = state.kept(cand)
    assert kept["layer.0.heads"] == (0, 2)
    assert set(kept["layer.1.ffn"]) == set(range(64)) - set(dead_neurons)
    torch.testing.assert_close(_forward(state.build(cand), tiny["data"].heldout), ref, rtol=0, atol=1e-5)


def test_obs_beats_mean_compensation_beats_plain_removal(tiny: dict[str, Any]) -> None:
    a, data, stats = tiny["adapter"], tiny["data"], tiny["stats"]
    obs = tiny["states"]["obs"]
    lin = a.dense().layers[1].ffn.output
    x = _inputs_of(a.dense(), lin, data.calib)
    w, b = lin.weight.detach().double(), lin.bias.detach().double()
    y = x @ w.T + b
    i = tiny["space"].names.index("layer.1.ffn")
    for size in (48, 32, 16):
        cols = torch.tensor(obs.tracks[i].kept(size))
        plain = float((y - x[:, cols] @ w[:, cols].T - b).square().sum(1).mean())
        comp = compensated_bias(w, b, stats[1].ffn.mean, cols)  # FLAP's mean term on the same columns
        flap_err = float((y - x[:, cols] @ w[:, cols].T - comp).square().sum(1).mean())
        lv = obs.level(i, size)
        w_new, b_new = lv["layers.1.ffn.output.weight"].double(), lv["layers.1.ffn.output.bias"].double()
        obs_err = float((y - x[:, cols] @ w_new.T - b_new).square().sum(1).mean())
        assert obs_err < 0.8 * flap_err < 0.8 * plain
        # the curve is the damped OBS objective: in-sample error + lam * ||dW||^2, a deliberate margin
        dw = w.clone()
        dw[:, cols] -= w_new
        lam = 0.01 * float(torch.diagonal(stats[1].ffn.cov()).mean())
        curve = obs.unit_errors()[i][tiny["space"].units[i].sizes.index(size)] * stats[1].ffn.resid_energy
        assert curve == pytest.approx(obs_err + lam * float(dw.square().sum()), rel=1e-4)


def _sequential_obs(w: torch.Tensor, hd: torch.Tensor, groups: list[int], g: int) -> torch.Tensor:
    """Reference: remove ``groups`` one at a time with the OBS update on the full matrices."""
    w, hinv = w.clone(), torch.linalg.inv(hd)
    for grp in groups:
        c = torch.arange(grp * g, (grp + 1) * g)
        inv = torch.linalg.inv(hinv[c][:, c])
        w -= w[:, c] @ inv @ hinv[c]
        hinv -= hinv[:, c] @ inv @ hinv[c]
    return w


@pytest.mark.parametrize(("unit", "size"), [("layer.0.ffn", 20), ("layer.1.heads", 1), ("layer.1.heads", 3)])
def test_obs_database_levels_equal_sequential_updates(tiny: dict[str, Any], unit: str, size: int) -> None:
    obs, space, stats = tiny["states"]["obs"], tiny["space"], tiny["stats"]
    i = space.names.index(unit)
    t = obs.tracks[i]
    assert sorted(t.order.tolist()) == list(range(t.unit.full))
    assert all(set(t.kept(s)) <= set(t.kept(s2)) for s, s2 in zip(t.unit.sizes, t.unit.sizes[1:]))
    layer = obs.adapter.dense().layers[t.unit.layer]
    lin, st = (
        (layer.attention.dense, stats[t.unit.layer].attn)
        if t.unit.kind == "heads"
        else (layer.ffn.output, stats[t.unit.layer].ffn)
    )
    w, hd = lin.weight.detach().double(), damped(st.cov(), 0.01)
    gone = t.order[: t.unit.full - size].tolist()
    seq = _sequential_obs(w, hd, gone, t.unit.granule)
    cols = kept_columns(t.kept(size), t.unit.granule)
    assert seq[:, kept_columns(tuple(sorted(gone)), t.unit.granule)].abs().max() < 1e-9  # removed columns are 0
    prefix = f"layers.{t.unit.layer}." + ("attention.dense." if t.unit.kind == "heads" else "ffn.output.")
    stored = obs.level(i, size)[prefix + "weight"].double()
    torch.testing.assert_close(stored, seq[:, cols], rtol=1e-5, atol=1e-6)
    d = w.clone()
    d[:, cols] -= seq[:, cols]
    d[:, kept_columns(tuple(sorted(gone)), t.unit.granule)] = w[:, kept_columns(tuple(sorted(gone)), t.unit.granule)]
    err = float(torch.trace(d @ hd @ d.T)) / st.resid_energy  # the step errors add up to the LS error
    assert t.errors[size] == pytest.approx(err, rel=1e-6)


def test_obs_block_rounds_track_exact_greedy() -> None:
    g = torch.Generator().manual_seed(0)
    n = 384  # GELU features of a low-rank input: correlated like real FFN activations
    x = torch.nn.functional.gelu(
        torch.randn(2000, 64, dtype=torch.float64, generator=g) @ torch.randn(64, n, dtype=torch.float64, generator=g)
    )
    hinv = torch.linalg.inv(damped(torch.cov(x.T), 0.01))
    w = torch.randn(64, n, dtype=torch.float64, generator=g)
    _, exact = obs_order(w, hinv, block=0.0)
    order, steps = obs_order(w, hinv, block=0.05)
    assert sorted(order.tolist()) == list(range(n)) and len(steps) == n
    e, c = np.cumsum(exact), np.cumsum(steps)
    assert np.abs(c / e - 1).max() < 0.02 and c.sum() / e.sum() == pytest.approx(1.0, abs=0.005)
    assert (np.diff(c) >= 0).all()


def test_in_place_linear_algebra_equals_the_out_of_place_results() -> None:
    """The memory-lean helpers (one width^2 buffer) give the numbers the plain torch calls give."""
    g = torch.Generator().manual_seed(1)
    for dt in (torch.float32, torch.float64):
        x = torch.randn(900, 300, dtype=dt, generator=g) + 0.3
        a = x.T @ x / 900
        a[3, 7] += 1e-3  # not symmetric
        assert torch.equal(symmetrize_(a.clone(), block=70), (a + a.T) / 2)
        h = damped((a + a.T) / 2, 0.01)
        inv = inverse_spd_(h.clone(), block=64)
        ref = torch.linalg.inv(h)
        assert float((inv - ref).abs().max() / ref.abs().max()) < (1e-5 if dt == torch.float32 else 1e-12)
        assert torch.equal(inv, inv.T)
        w = torch.randn(40, 300, dtype=dt, generator=g)
        keep = torch.sort(torch.randperm(300, generator=g)[:170]).values
        blocks = [(s, h[keep[s : s + 37]]) for s in range(0, len(keep), 37)]
        lsq = w @ h[:, keep] @ torch.linalg.inv(h[keep][:, keep])  # the textbook formula, independently
        for got in (ls_weights_blocks(w, blocks, keep), ls_weights(w, h, keep)):
            assert got.is_contiguous() and got.shape == (40, 170)
            torch.testing.assert_close(got, lsq, rtol=1e-4 if dt == torch.float32 else 1e-9, atol=1e-5)
        hinv = torch.linalg.inv(h).contiguous()
        for granule in (1, 10):  # compaction in place (overwrite) follows the copying path exactly
            o1, s1 = obs_order(w, hinv, granule=granule, stop=3)
            o2, s2 = obs_order(w.clone(), hinv.clone(), granule=granule, stop=3, overwrite=True)
            assert (o1 == o2).all() and np.array_equal(s1, s2)
    with pytest.raises(torch.linalg.LinAlgError, match="not positive-definite"):
        cholesky_(-torch.eye(4))


@pytest.mark.parametrize("centered", [False, True])
def test_spilled_hessian_rows_equal_the_whole_hessian(tmp_path: Any, centered: bool) -> None:
    """A reconstruction reads only the kept rows of spilled statistics; they equal the whole matrix's."""
    g = torch.Generator().manual_seed(2)
    st = SublayerStats(96, dtype=torch.float32)
    for _ in range(3):
        st.add(torch.randn(50, 96, generator=g) * torch.linspace(0.1, 2, 96) + 0.5)
    whole = damped(st.cov() if centered else st.second_moment(), 0.01, inplace=True)
    cols = torch.tensor([0, 3, 4, 10, 50, 95])
    mem = torch.cat([r for _, r in st.hessian_blocks(cols, centered=centered, damp=0.01, rows=4)])
    torch.testing.assert_close(mem, whole[cols], rtol=0, atol=0)
    st.spill(tmp_path, "h")
    assert st.spilled
    blocks = list(st.hessian_blocks(cols, centered=centered, damp=0.01, rows=4))
    assert [s for s, _ in blocks] == [0, 4]
    torch.testing.assert_close(torch.cat([r for _, r in blocks]), whole[cols], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(
        damped(st.cov() if centered else st.second_moment(), 0.01, inplace=True), whole, rtol=1e-6, atol=1e-6
    )


def test_flap_bias_compensation_lowers_output_error(tiny: dict[str, Any]) -> None:
    a, space, data = tiny["adapter"], tiny["space"], tiny["data"]
    flap = tiny["states"]["flap"]
    cand = space.uniform(0.5)
    plan, overrides = flap.materialize(cand)
    assert {k.rsplit(".", 1)[-1] for k in overrides} == {"bias"}  # FLAP keeps the weights, moves biases
    scorer = EndToEndScorer(a, data.heldout, threads=1)
    with_comp = scorer.score(a.prune(a.dense(), plan, overrides))
    without = scorer.score(a.prune(a.dense(), plan))
    assert with_comp["rel_mse"] < 0.9 * without["rel_mse"]
    assert with_comp["cosine"] > without["cosine"]


@pytest.mark.parametrize("name", ["flap", "obs"])
def test_removed_sublayer_keeps_mean_output_as_bias(tiny: dict[str, Any], name: str) -> None:
    state, stats = tiny["states"][name], tiny["stats"]
    _, overrides = state.materialize(_cand(tiny["space"], layer_0_heads=0, layer_1_ffn=0))
    assert set(overrides) == {"layers.0.attention.bias", "layers.1.ffn.bias"}
    lin = state.adapter.dense().layers[1].ffn.output
    want = (lin.bias.detach().double() + lin.weight.detach().double() @ stats[1].ffn.mean).float()
    torch.testing.assert_close(overrides["layers.1.ffn.bias"], want)
    mag = tiny["states"]["magnitude"].materialize(_cand(tiny["space"], layer_0_heads=0))[1]
    assert mag == {}  # the baseline compensates nothing


def test_e2e_scorer(tiny: dict[str, Any]) -> None:
    a, data = tiny["adapter"], tiny["data"]
    scorer = EndToEndScorer(a, data.heldout, batch=16, threads=1)
    dense = scorer.score(a.dense())
    assert dense["cosine"] == pytest.approx(1.0, abs=1e-6) and dense["rel_mse"] == pytest.approx(0.0, abs=1e-10)
    pruned = tiny["states"]["obs"].build(tiny["space"].uniform(0.5))
    small_batches = EndToEndScorer(a, data.heldout, batch=3, threads=1).score(pruned)  # other padding cuts
    got = scorer.score(pruned)
    assert got["distance"] == pytest.approx(1 - got["cosine"]) and 0 < got["distance"] < 1
    assert got["cosine"] == pytest.approx(small_batches["cosine"], abs=1e-5)
    assert got["rel_mse"] == pytest.approx(small_batches["rel_mse"], rel=1e-4)


@pytest.mark.slow
def test_minilm_obs_beats_flap_beats_magnitude() -> None:
    a = resolve_model("minilm")
    space = a.space()
    data = load_calib(a)  # default corpus, 128 calibration + 64 held-out texts
    stats = collect_stats(a.dense(), data.calib, threads=1)
    scorer = EndToEndScorer(a, data.heldout, threads=1)
    cand = space.uniform(0.5)
    assert set(cand.sizes) == {6, 768}  # half the heads and half the FFN everywhere
    cos, summed = {}, {}
    for name in PROXIES:
        state = fit_proxy(name, a, space, data, stats=stats, progress=False)
        cos[name] = scorer.score(state.build(cand))["cosine"]
        summed[name] = sum(float(e[u.sizes.index(s)]) for e, u, s in zip(state.unit_errors(), space.units, cand.sizes))
    assert cos["obs"] > 0.8 and cos["obs"] > cos["flap"] + 0.05 > cos["magnitude"] + 0.15
    assert summed["obs"] < summed["flap"] < summed["magnitude"]  # the additive proxy agrees with e2e
