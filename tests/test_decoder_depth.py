"""Depth proxies of the decoder family: ShortGPT's Block Influence (``bi``) and the angular distance
(``angular``, Gromov et al.'s rule for runs of blocks), checked against a brute-force pass.

Tiny random decoders (3 layers) as in ``test_decoder_proxies``; streams are captured by hooks on a
plain forward of the dense model and compared with what the layer-major calibration pass collected.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from hwprune.errors import HwpruneError
from hwprune.families.decoder.adapter import DecoderAdapter
from hwprune.families.decoder.collect import collect_stats
from hwprune.proxies._base import CalibData, fit_proxy, proxy_names
from hwprune.space import Candidate

VOCAB = 300


def _inputs(n: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, seq), generator=gen)
    lens = torch.randint(3, seq + 1, (n,), generator=gen)
    lens[0] = seq
    mask = (torch.arange(seq)[None, :] < lens[:, None]).long()
    return {"input_ids": ids, "attention_mask": mask}


def _adapter(arch: str) -> DecoderAdapter:
    a = DecoderAdapter.tiny(arch=arch, vocab=VOCAB, layers=3, seed=3)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in a.dense().named_parameters():
            base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            p.copy_(base + 0.15 * torch.randn(p.shape, generator=gen))
        a.dense().layers[1].mlp.down_proj.weight.zero_()  # layer 1's FFN adds nothing (but its bias)
        if a.dense().layers[1].mlp.down_proj.bias is not None:
            a.dense().layers[1].mlp.down_proj.bias.zero_()
    return a


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def setup(request: pytest.FixtureRequest) -> dict[str, Any]:
    a = _adapter(request.param)
    data = CalibData(calib=_inputs(12, 16, 1), heldout=_inputs(4, 16, 2), source="random ids")
    stats = collect_stats(a.dense(), data.calib, threads=1)
    states = {n: fit_proxy(n, a, a.space(), data, stats=stats, progress=False) for n in ("bi", "angular")}
    return {"adapter": a, "data": data, "stats": stats, "states": states}


def _streams(a: DecoderAdapter, inputs: dict[str, torch.Tensor]) -> dict[str, list[torch.Tensor]]:
    """Per block: stream entering, between the sublayers, leaving; (batch, seq, hidden) each."""
    model = a.dense()
    got: dict[str, list[torch.Tensor]] = {"in": [], "mid": [], "out": []}
    hooks = []
    for layer in model.layers:
        hooks.append(layer.register_forward_pre_hook(lambda _m, args: got["in"].append(args[0])))
        hooks.append(layer.mlp_norm.register_forward_pre_hook(lambda _m, args: got["mid"].append(args[0])))
        hooks.append(layer.register_forward_hook(lambda _m, _a, out: got["out"].append(out[0])))
    with torch.inference_mode():
        model(inputs["input_ids"], inputs["attention_mask"])
    for h in hooks:
        h.remove()
    return got


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.double(), b.double()
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


def test_registered() -> None:
    assert {"bi", "angular"} <= set(proxy_names("decoder"))


def test_block_influence_is_brute_force(setup: dict[str, Any]) -> None:
    a, data, state = setup["adapter"], setup["data"], setup["states"]["bi"]
    s = _streams(a, data.calib)
    real = data.calib["attention_mask"].bool()
    for i in range(3):
        for key, x, y in (("attn", "in", "mid"), ("ffn", "mid", "out"), ("block", "in", "out")):
            want = 1.0 - float(_cos(s[x][i], s[y][i])[real].mean())
            assert state.depth[key][i] == pytest.approx(want, rel=1e-6, abs=1e-9), (key, i)
    assert state.depth["ffn"][1] == pytest.approx(0.0, abs=1e-9)  # the zeroed FFN changes nothing
    assert state.removal_order()[0] == int(np.argmin(state.depth["block"]))


@pytest.mark.parametrize("name", ["bi", "angular"])
def test_depth_errors_price_removal_only(setup: dict[str, Any], name: str) -> None:
    state, space = setup["states"][name], setup["adapter"].space()
    for e, u in zip(state.unit_errors(), space.units):
        assert e[-1] == 0.0 and np.isfinite(e).all()
        assert np.allclose(e[:-1], e[0])  # every size below full costs the removal score
        assert e[0] == pytest.approx(max(float(state.depth[u.kind][u.layer]), 0.0))
    errs = {u.name: e[0] for u, e in zip(space.units, state.unit_errors())}
    assert errs["layer.1.ffn"] == min(errs.values())  # the zeroed FFN is the cheapest removal
    # candidates at intermediate widths still build (magnitude order, plain removal) and run
    model = state.build(space.uniform(0.5))
    ids = setup["data"].heldout["input_ids"]
    with torch.inference_mode():
        assert torch.isfinite(model(ids, torch.ones_like(ids))).all()


def test_angular_runs_are_brute_force(setup: dict[str, Any]) -> None:
    a, data, state = setup["adapter"], setup["data"], setup["states"]["angular"]
    s = _streams(a, data.calib)
    last = data.calib["attention_mask"].sum(1) - 1
    rows = torch.arange(len(last))
    for first in range(3):
        for n in range(1, 4 - first):
            cos = _cos(s["in"][first][rows, last], s["out"][first + n - 1][rows, last])
            want = float((torch.arccos(cos.clamp(-1, 1)) / torch.pi).mean())
            assert state.runs[n - 1, first] == pytest.approx(want, rel=1e-5, abs=1e-7)
    assert np.isnan(state.runs[2, 1])  # a run of 3 from block 1 passes the last block
    start, dist = state.best_run(2)
    assert dist == np.nanmin(state.runs[1]) and start in (0, 1)
    with pytest.raises(HwpruneError, match="choose 1 to 3"):
        state.best_run(4)


def test_depth_proxy_in_a_candidate_removes_sublayers(setup: dict[str, Any]) -> None:
    """Block removal through the proxy state: both sublayers at 0 build a model without that block's work."""
    state, space = setup["states"]["bi"], setup["adapter"].space()
    cand = Candidate(tuple(0 if u.layer == 1 else u.full for u in space.units))
    plan, _ = state.materialize(cand)
    assert all(len(plan.units[u.name]) == 0 for u in space.units if u.layer == 1)
