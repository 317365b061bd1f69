"""The family contract: every registered model family passes the same checks.

A new family joins with one :class:`Case` in ``CASES`` (a tiny model of it, and how to silence some of
a unit's elements so that removing them must change nothing). The suite fails when a family is
registered without a case, when a hook is missing (the ABC refuses to instantiate), or when a hook
breaks its documented promise.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import hwprune
from hwprune.export.candidate import export_candidate
from hwprune.families import Family, family_class, family_names
from hwprune.families.cnn.adapter import CnnAdapter
from hwprune.families.decoder.adapter import DecoderAdapter
from hwprune.families.encoder.adapter import EncoderAdapter
from hwprune.latency import get_backend, profile
from hwprune.proxies import proxy_names


def _silence_encoder(model: nn.Module, unit: str, idx: list[int]) -> None:
    """Zero the output-projection columns of heads / neurons ``idx`` of ``unit``."""
    _, i, kind = unit.split(".")
    layer = model.layers[int(i)]
    with torch.no_grad():
        if kind == "heads":
            d = layer.attention.head_dim
            for h in idx:
                layer.attention.dense.weight[:, h * d : (h + 1) * d] = 0
        else:
            layer.ffn.output.weight[:, idx] = 0


def _silence_decoder(model: nn.Module, unit: str, idx: list[int]) -> None:
    """Zero the o_proj columns of KV groups ``idx`` (all their query heads) or down_proj columns of neurons."""
    _, i, kind = unit.split(".")
    layer = model.layers[int(i)]
    with torch.no_grad():
        if kind == "attn":
            w = layer.attn.per_group * layer.attn.head_dim  # o_proj columns of one KV group
            for g in idx:
                layer.attn.o_proj.weight[:, g * w : (g + 1) * w] = 0
        else:
            layer.mlp.down_proj.weight[:, idx] = 0


def _silence_cnn(model: nn.Module, unit: str, idx: list[int]) -> None:
    """Zero every consumer's input columns of channels ``idx`` of the group (its readers see zeros)."""
    a = _CNN_ADAPTER[0]
    g = a.graph.group(unit)
    with torch.no_grad():
        for name in g.consumers:
            m = model.get_submodule(name)
            cols = torch.as_tensor(g.columns(name)[idx].ravel())
            m.weight[:, cols] = 0


_CNN_ADAPTER: list[CnnAdapter] = []


def _tiny_cnn() -> CnnAdapter:
    a = CnnAdapter("test_cnn_adapter:tiny_net", input_shape=(1, 3, 32, 32))
    _CNN_ADAPTER[:] = [a]
    return a


@dataclass(frozen=True)
class Case:
    make: Callable[[], Family]
    silence: Callable[[nn.Module, str, list[int]], None]
    unit: str  # a unit whose elements ``silence`` can zero
    seq: int = 16  # sequence length for text families (ignored by image families)


CASES: dict[str, Case] = {
    "encoder": Case(
        lambda: EncoderAdapter.tiny(layers=2, heads=4, head_dim=8, ffn=32), _silence_encoder, "layer.1.ffn"
    ),
    "cnn": Case(_tiny_cnn, _silence_cnn, "group.mix.0"),
    "decoder": Case(
        lambda: DecoderAdapter.tiny(arch="llama", layers=2, heads=4, kv_heads=2, head_dim=8, ffn=48),
        _silence_decoder,
        "layer.1.attn",
    ),
}


def test_every_registered_family_has_a_case() -> None:
    assert sorted(CASES) == family_names()


@pytest.fixture(params=sorted(CASES), scope="module")
def case(request: pytest.FixtureRequest) -> tuple[Case, Family]:
    c = CASES[request.param]
    return c, c.make()


def _half_plan(a: Family) -> dict[str, list[int]]:
    """Every unit keeps its odd-numbered half (at least ``min_kept``): a non-trivial pruned model."""
    out = {}
    for name, _, full, *_ in a.raw_units():
        keep = list(range(1, full, 2)) or list(range(max(a.min_kept, 1)))
        out[name] = keep
    return out


def _run(model: nn.Module, a: Family, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    names = a.onnx_io()[0]
    with torch.no_grad():
        out = model.eval()(*[inputs[k] for k in names])
    return out[0] if isinstance(out, (tuple, list)) else out


def test_hooks_are_declared_and_implemented(case: tuple[Case, Family]) -> None:
    _, a = case
    cls = family_class(a.family)
    assert type(a) is cls and not inspect.isabstract(cls)
    assert a.name and a.shape_key() and a.raw_units()
    again = cls.from_arch(a.arch())  # what hwprune.load rebuilds from a plan
    assert again.arch() == a.arch() and again.shape_key() == a.shape_key()
    assert [u[0] for u in again.raw_units()] == [u[0] for u in a.raw_units()]
    b, s = a.io_settings(batch=1, seq=case[0].seq)
    assert b >= 1 and s >= 0 and a.shape_tag(seq=s)


def test_plan_surgery_save_load_round_trip(case: tuple[Case, Family], tmp_path: Path) -> None:
    c, a = case
    plan = a.plan(_half_plan(a), note="contract")
    pruned = a.prune(a.dense(), plan)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in a.dense().parameters())
    hwprune.save(pruned, plan, tmp_path)
    loaded = hwprune.load(tmp_path)
    x = a.parity_inputs(seq=c.seq)
    assert torch.equal(_run(loaded, a, x), _run(pruned, a, x))
    assert a.plan_summary(plan)["family"] == a.family


def test_zero_weight_units_change_nothing(case: tuple[Case, Family]) -> None:
    c, a = case
    full = next(f for n, _, f, *_ in a.raw_units() if n == c.unit)
    dead = list(range(0, full, 2))
    model = a.prune(a.dense(), a.plan({}))  # a copy: the cached dense model stays untouched
    c.silence(model, c.unit, dead)
    pruned = a.prune(model, a.plan({c.unit: [i for i in range(full) if i not in dead]}))
    x = a.parity_inputs(seq=c.seq)
    ref, got = _run(model, a, x), _run(pruned, a, x)
    mask = a.parity_mask(x)
    if mask is not None:
        ref, got = ref[torch.as_tensor(mask)], got[torch.as_tensor(mask)]
    assert torch.allclose(got, ref, atol=1e-5)


def test_proxy_curves_are_monotone_and_dense_is_identity(case: tuple[Case, Family]) -> None:
    c, a = case
    space = a.space()
    calib = a.load_calib(None, n_calib=8, n_heldout=4, seq=c.seq)
    names = proxy_names(a.family)
    assert "obs" in names and "magnitude" in names
    x = a.parity_inputs(seq=c.seq)
    for name in names:
        state = a.fit_proxy(name, space, calib, progress=False)
        errs = state.unit_errors()
        assert len(errs) == len(space.units)
        for u, e in zip(space.units, errs):
            assert e.shape == (len(u.sizes),) and np.isfinite(e).all(), (name, u.name)
            assert e[-1] == 0.0 and (np.diff(e) <= 1e-12).all(), (name, u.name, e)  # sizes ascend, errors fall
        plan, _ = state.materialize(space.dense())
        assert all(len(k) == f for n, k in plan.units.items() for m, _, f, *_ in a.raw_units() if m == n)
        assert torch.allclose(_run(state.build(space.dense()), a, x), _run(a.dense(), a, x), atol=1e-5), name
    scorer = a.scorer(calib)
    assert scorer.score(a.dense())["distance"] == pytest.approx(0.0, abs=1e-6)  # float32 round-off


def test_load_calib_gives_three_disjoint_named_splits(case: tuple[Case, Family]) -> None:
    c, a = case
    calib = a.load_calib(None, n_calib=8, n_heldout=4, n_report=3, seq=c.seq)
    assert calib.n_report == 3 and set(calib.splits["splits"]) == {"calibration", "selection", "report"}
    assert {k: v["n"] for k, v in calib.splits["splits"].items()} == {"calibration": 8, "selection": 4, "report": 3}
    sizes = [int(next(iter(part.values())).shape[0]) for part in (calib.calib, calib.heldout, calib.report)]
    assert sizes == [8, 4, 3]  # texts are disjoint by construction (test_calib); short seqs may truncate alike
    assert a.scorer(calib.for_report()).score(a.dense())["distance"] == pytest.approx(0.0, abs=1e-6)


def test_predictor_reads_the_table_as_profiled(case: tuple[Case, Family]) -> None:
    c, a = case
    space = a.space()
    b, s = a.io_settings(batch=1, seq=c.seq)
    table = profile(a, seq=s, batch=b, space=space, progress=False, budget_s=2.0)
    pred = a.predictor(table, space)
    assert pred.dense_ms() == pytest.approx(table.meta["dense_predicted_ms"], rel=1e-3)
    assert 0 < pred.fastest_ms() < pred.dense_ms()
    if pred.additive:
        base, costs = pred.unit_costs()
        assert pred.dense_ms() == pytest.approx(base + sum(float(c_[-1]) for c_ in costs), rel=1e-9)
    lin = pred.linearized_at(space.smallest())  # exact at its reference, additive or not
    base, costs = lin.unit_costs()
    assert base + sum(float(c_[0]) for c_ in costs) == pytest.approx(pred.predict(space.smallest()), rel=1e-9)


def test_export_parity_and_stats(case: tuple[Case, Family], tmp_path: Path) -> None:
    c, a = case
    b, s = a.io_settings(batch=1, seq=c.seq)
    plan = a.plan(_half_plan(a))
    model = a.prune(a.dense(), plan)
    man = export_candidate(
        a,
        model,
        plan,
        tmp_path / "cand",
        backend=get_backend("ort-cpu", threads=1),
        batch=b,
        seq=s,
        timing={"rounds": 1, "repeats": 2, "warmup": 1},
    )
    assert man["parity_max_abs_diff"] <= 1e-4
    assert 0 < man["params"] < man["dense_params"] and 0 < man["flops"] < man["dense_flops"]
    st = a.stats(a.dense(), batch=b, seq=s)
    assert st.params == man["dense_params"] and st.flops == man["dense_flops"]
