"""Decoder accuracy side: calibration data, activation statistics, the four proxies and the scorer.

Tiny random decoders (2 layers, hidden 32, 4 query heads over 2 KV groups of head_dim 8, FFN 48,
vocabulary 300) in three styles: llama (no biases), qwen2 (q/k/v biases), gpt2 (every bias, one KV
head per query head). Every parameter is re-drawn with a sizeable spread (biases and norm gains
too), so no mapping hides behind zero biases or unit gains. Token ids are random (no tokenizer).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from hwprune.errors import HwpruneError
from hwprune.families.decoder.adapter import DecoderAdapter
from hwprune.families.decoder.calib import load_calib
from hwprune.families.decoder.collect import collect_stats
from hwprune.families.decoder.database import group_columns
from hwprune.families.decoder.scorer import DecoderScorer
from hwprune.proxies._base import CalibData, fit_proxy, get_proxy, proxy_names
from hwprune.space import Candidate, PruningSpace

PROXIES = ["magnitude", "wanda_sp", "flap", "obs"]
ARCHS = ["llama", "qwen2", "gpt2"]
VOCAB = 300


def _randomize(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            p.copy_(base + 0.15 * torch.randn(p.shape, generator=gen))


def _inputs(n: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
    """Random ids, right-padded rows of random length (at least 3 real tokens)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, seq), generator=gen)
    lens = torch.randint(3, seq + 1, (n,), generator=gen)
    lens[0] = seq  # one full row
    mask = (torch.arange(seq)[None, :] < lens[:, None]).long()
    return {"input_ids": ids, "attention_mask": mask}


def _adapter(arch: str, seed: int = 0) -> DecoderAdapter:
    a = DecoderAdapter.tiny(arch=arch, vocab=VOCAB, seed=seed)
    _randomize(a.dense(), seed + 11)
    return a


def _setup(a: DecoderAdapter) -> dict[str, Any]:
    space = a.space()
    data = CalibData(calib=_inputs(24, 20, 1), heldout=_inputs(8, 20, 2), source="random ids")
    stats = collect_stats(a.dense(), data.calib, threads=1)
    states = {n: fit_proxy(n, a, space, data, stats=stats, progress=False) for n in PROXIES}
    return {"adapter": a, "space": space, "data": data, "stats": stats, "states": states}


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request: pytest.FixtureRequest) -> dict[str, Any]:
    return _setup(_adapter(request.param))


def _cand(space: PruningSpace, **sizes: int) -> Candidate:
    """Dense candidate except ``layer_0_attn=1``-style overrides."""
    named = {k.replace("_", "."): v for k, v in sizes.items()}
    assert set(named) <= set(space.names)
    return Candidate(tuple(named.get(u.name, u.full) for u in space.units))


def _inputs_of(model: torch.nn.Module, module: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """All inputs of ``module`` (one call per forward) over non-pad tokens, (tokens, width) float64."""
    got: list[torch.Tensor] = []
    hook = module.register_forward_pre_hook(lambda _m, args: got.append(args[0]))
    with torch.inference_mode():
        model(inputs["input_ids"], inputs["attention_mask"])
    hook.remove()
    return got[0][inputs["attention_mask"].bool()].double()


def _logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.inference_mode():
        return model(inputs["input_ids"], inputs["attention_mask"])


# ---- statistics ------------------------------------------------------------------------------------


def test_registry() -> None:
    assert set(PROXIES) <= set(proxy_names("decoder"))
    with pytest.raises(HwpruneError, match="unknown proxy 'nope' for decoder models"):
        get_proxy("nope", "decoder")


def test_stats_match_brute_force(tiny: dict[str, Any]) -> None:
    model, data, stats = tiny["adapter"].dense(), tiny["data"], tiny["stats"]
    layer = model.layers[1]
    for module, st in ((layer.attn.o_proj, stats[1].attn), (layer.mlp.down_proj, stats[1].ffn)):
        x = _inputs_of(model, module, data.calib)
        assert st.count == int(data.calib["attention_mask"].sum()) == x.shape[0]  # pads excluded
        xtx = x.T @ x  # the hooks multiply in float32: tolerance relative to the largest entry
        torch.testing.assert_close(st.xtx, xtx, rtol=1e-5, atol=1e-6 * float(xtx.abs().max()))
        torch.testing.assert_close(st.mean, x.mean(0), rtol=1e-5, atol=1e-7)
    for norm, st in ((layer.attn_norm, stats[1].attn), (layer.mlp_norm, stats[1].ffn)):
        r = _inputs_of(model, norm, data.calib)  # residual stream entering the sublayer
        assert st.resid_energy == pytest.approx(float(r.square().sum(1).mean()), rel=1e-6)


def test_stats_reject_left_padding(tiny: dict[str, Any]) -> None:
    bad = {k: v.flip(1) for k, v in tiny["data"].calib.items()}
    with pytest.raises(HwpruneError, match="right-padded"):
        collect_stats(tiny["adapter"].dense(), bad)


# ---- proxies ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PROXIES)
def test_unit_errors_contract(tiny: dict[str, Any], name: str) -> None:
    state, space = tiny["states"][name], tiny["space"]
    errs = state.unit_errors()
    assert len(errs) == len(space.units)
    for e, u in zip(errs, space.units):
        assert e.shape == (len(u.sizes),) and e.dtype == np.float64
        assert np.isfinite(e).all() and (e >= 0).all()
        assert e[-1] == 0.0  # full size
        assert (np.diff(e) <= 1e-15).all()  # non-increasing in kept size
        assert e[0] > 0  # removing a random sublayer hurts
    assert sorted(state.tracks[0].order.tolist()) == list(range(space.units[0].full))


@pytest.mark.parametrize("name", PROXIES)
def test_dense_level_is_the_dense_model(tiny: dict[str, Any], name: str) -> None:
    state, space, data = tiny["states"][name], tiny["space"], tiny["data"]
    plan, overrides = state.materialize(space.dense())
    assert overrides == {} and plan.units == {u.name: tuple(range(u.full)) for u in space.units}
    dense = tiny["adapter"].dense()
    built = state.build(space.dense())
    assert built is not dense
    assert built.state_dict().keys() == dense.state_dict().keys()
    for k, v in dense.state_dict().items():
        assert torch.equal(built.state_dict()[k], v), k
    assert torch.equal(_logits(built, data.heldout), _logits(dense, data.heldout))


@pytest.mark.parametrize("name", PROXIES)
def test_every_candidate_builds_and_plain_errors_are_exact(tiny: dict[str, Any], name: str) -> None:
    """Smallest and mixed candidates build; the first removal's error is the measured output error."""
    state, space, data = tiny["states"][name], tiny["space"], tiny["data"]
    a = tiny["adapter"]
    cfg = a.config
    for cand in (space.smallest(), space.uniform(0.5), _cand(space, layer_0_attn=0, layer_1_ffn=0)):
        model = state.build(cand)
        assert torch.isfinite(_logits(model, data.heldout)).all()
        assert model.config.kv_groups == tuple(cand.as_dict(space)[f"layer.{i}.attn"] for i in range(2))
    # removed sublayers leave their bias only where the module has one (out_bias overrides)
    _, overrides = state.materialize(space.smallest())
    has_bias = {"attn": cfg.o_proj_bias, "mlp": cfg.mlp_bias}
    compensates = name in ("flap", "obs")
    for i in range(cfg.num_layers):
        for part in ("attn", "mlp"):
            assert (f"layers.{i}.{part}.out_bias" in overrides) == (has_bias[part] and compensates)
    if name in ("magnitude", "wanda_sp") or not cfg.o_proj_bias:
        return
    # with a bias: removing a whole sublayer leaves b + W mu (its average output)
    w, b = a.dense().layers[0].attn.o_proj.weight.double(), a.dense().layers[0].attn.o_proj.bias.double()
    torch.testing.assert_close(
        overrides["layers.0.attn.out_bias"].double(), b + w @ tiny["stats"][0].attn.mean, rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("name", ["magnitude", "wanda_sp"])
def test_plain_removal_error_is_measured_error(tiny: dict[str, Any], name: str) -> None:
    """Error at full - 1 (one element removed) = mean ||W_e x_e||^2 / residual energy, measured."""
    state, space, data, stats = tiny["states"][name], tiny["space"], tiny["data"], tiny["stats"]
    model = tiny["adapter"].dense()
    for index, u in enumerate(space.units):
        if u.full - 1 not in u.sizes:
            continue
        layer = model.layers[u.layer]
        lin = layer.attn.o_proj if u.kind == "attn" else layer.mlp.down_proj
        st = stats[u.layer].attn if u.kind == "attn" else stats[u.layer].ffn
        x = _inputs_of(model, lin, data.calib)
        cols = group_columns([int(state.tracks[index].order[0])], u.granule)
        measured = (
            float((x[:, cols] @ lin.weight.detach().double()[:, cols].T).square().sum(1).mean()) / st.resid_energy
        )
        got = state.unit_errors()[index][list(u.sizes).index(u.full - 1)]
        assert got == pytest.approx(measured, rel=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_zero_weight_units_go_first(arch: str) -> None:
    a = _adapter(arch, seed=5)
    cfg = a.config
    dead_group = 1
    dead_neurons = [3, 17, 40]
    layer = a.dense().layers[1]
    with torch.no_grad():
        layer.attn.o_proj.weight[:, group_columns([dead_group], cfg.group_size * cfg.head_dim)] = 0.0
        layer.mlp.down_proj.weight[:, dead_neurons] = 0.0
    t = _setup(a)
    space = t["space"]
    attn, ffn = space.names.index("layer.1.attn"), space.names.index("layer.1.ffn")
    for name in PROXIES:
        state = t["states"][name]
        assert int(state.tracks[attn].order[0]) == dead_group, name
        assert sorted(state.tracks[ffn].order[:3].tolist()) == dead_neurons, name
        e = state.tracks[attn].errors
        assert e[cfg.num_kv_heads - 1] == pytest.approx(0.0, abs=1e-12), name
        assert state.tracks[ffn].errors[cfg.intermediate_size - 3] == pytest.approx(0.0, abs=1e-12), name


def test_obs_reconstruction_beats_plain_removal(tiny: dict[str, Any]) -> None:
    """Same kept set: the OBS refit's sublayer output error is below plain slicing's (and end to end)."""
    obs, space, data = tiny["states"]["obs"], tiny["space"], tiny["data"]
    a = tiny["adapter"]
    dense = a.dense()
    cand = _cand(space, layer_1_ffn=space.unit("layer.1.ffn").sizes[len(space.unit("layer.1.ffn").sizes) // 2])
    plan, overrides = obs.materialize(cand)
    assert "layers.1.mlp.down_proj.weight" in overrides
    refit, plain = a.prune(dense, plan, overrides), a.prune(dense, plan)
    x = _inputs_of(dense, dense.layers[1].mlp.down_proj, data.calib)
    ref = dense.layers[1].mlp.down_proj(x.float()).double()
    kept = group_columns(plan.units["layer.1.ffn"], 1)

    def err(m: torch.nn.Module) -> float:
        with torch.inference_mode():
            return float((m.layers[1].mlp.down_proj(x[:, kept].float()).double() - ref).square().sum())

    assert err(refit) < 0.9 * err(plain)
    scorer = DecoderScorer(a, data.calib)  # the data OBS was fitted on
    assert scorer.score(refit)["kl"] < scorer.score(plain)["kl"]
    # obs on the attention unit: one KV group removed, weights of the rest rebuilt
    plan, overrides = obs.materialize(_cand(space, layer_0_attn=1))
    assert tuple(overrides["layers.0.attn.o_proj.weight"].shape) == (
        a.config.hidden_size,
        a.config.group_size * a.config.head_dim,
    )


def test_fit_without_stats_runs_its_own_pass() -> None:
    a = _adapter("qwen2", seed=2)
    space = a.space()
    data = CalibData(calib=_inputs(8, 12, 3), heldout=_inputs(4, 12, 4))
    state = a.fit_proxy("obs", space, data, batch=4, threads=1, progress=False)
    assert state.name == "obs" and state.meta["damp"] == 0.01
    assert all(np.isfinite(e).all() for e in state.unit_errors())


# ---- scorer ----------------------------------------------------------------------------------------


def test_scorer_dense_zero_pruned_positive(tiny: dict[str, Any]) -> None:
    a, data, space = tiny["adapter"], tiny["data"], tiny["space"]
    scorer = DecoderScorer(a, data.heldout, batch=3, cache_mb=1024)
    dense = scorer.score(a.dense())
    assert dense["distance"] == dense["kl"] == 0.0
    assert dense["top1_agreement"] == 1.0
    assert dense["perplexity"] == pytest.approx(dense["dense_perplexity"], rel=1e-12)
    pruned = tiny["states"]["obs"].build(space.uniform(0.5))
    got = scorer.score(pruned)
    assert got["distance"] > 0 and 0 <= got["top1_agreement"] <= 1 and np.isfinite(got["perplexity"])
    # the dense log-probs read back from the temporary file (no in-memory cache) give the same figures
    uncached = DecoderScorer(a, data.heldout, batch=3, cache_mb=0, rows=7)
    assert not uncached.cached and scorer.cached and uncached._file is not None
    assert uncached.n_positions > uncached.rows  # more than one chunk per file read
    assert uncached.score(a.dense())["kl"] == 0.0
    for k, v in uncached.score(pruned).items():
        assert v == pytest.approx(got[k], rel=1e-6, abs=1e-9), k


def test_scorer_matches_brute_force() -> None:
    a = _adapter("llama", seed=9)
    held = _inputs(5, 10, 8)
    pruned = a.prune(a.dense(), a.plan({"layer.0.ffn": list(range(0, 48, 2)), "layer.1.attn": [0]}))
    got = DecoderScorer(a, held, batch=2).score(pruned)
    mask = held["attention_mask"].bool()
    p = torch.log_softmax(_logits(a.dense(), held).double(), -1)
    q = torch.log_softmax(_logits(pruned, held).double(), -1)
    kl = (p.exp() * (p - q)).sum(-1)[mask].mean()
    tgt = mask[:, 1:] & mask[:, :-1]
    nll = -q[:, :-1].gather(-1, held["input_ids"][:, 1:, None]).squeeze(-1)[tgt].mean()
    dense_nll = -p[:, :-1].gather(-1, held["input_ids"][:, 1:, None]).squeeze(-1)[tgt].mean()
    assert got["kl"] == pytest.approx(float(kl), rel=1e-4)
    assert got["perplexity"] == pytest.approx(float(nll.exp()), rel=1e-5)
    assert got["dense_perplexity"] == pytest.approx(float(dense_nll.exp()), rel=1e-5)
    assert got["top1_agreement"] == pytest.approx(float((p.argmax(-1) == q.argmax(-1))[mask].double().mean()))


# ---- calibration data ------------------------------------------------------------------------------


class _WordTokenizer:
    """Stand-in for a tokenizer: one id per whitespace word (hashed), right-padded to ``seq``."""

    def tokenize(self, texts: Sequence[str], *, seq: int) -> dict[str, torch.Tensor]:
        ids = torch.zeros(len(texts), seq, dtype=torch.int64)
        mask = torch.zeros(len(texts), seq, dtype=torch.int64)
        for r, t in enumerate(texts):
            row = [sum(map(ord, w)) % VOCAB for w in t.split()][:seq]
            ids[r, : len(row)] = torch.tensor(row, dtype=torch.int64)
            mask[r, : len(row)] = 1
        return {"input_ids": ids, "attention_mask": mask}


def test_load_calib_default_corpus() -> None:
    data = load_calib(_WordTokenizer(), n_calib=6, n_heldout=4, n_report=3, seq=32, seed=3)
    assert data.calib["input_ids"].shape == (6, 32) and data.heldout["input_ids"].shape == (4, 32)
    assert data.report["input_ids"].shape == (3, 32)
    assert "hwprune-builtin" in data.source and "seed=3" in data.source and "seq=32" in data.source
    assert data.splits["report_domain"] == "legal" and data.splits["splits"]["selection"]["n"] == 4
    calib_rows = {tuple(r.tolist()) for r in data.calib["input_ids"]}
    assert not calib_rows & {tuple(r.tolist()) for r in data.heldout["input_ids"]}
    assert not calib_rows & {tuple(r.tolist()) for r in data.report["input_ids"]}
    mask = data.calib["attention_mask"]
    assert int(mask.sum()) > 0 and bool((mask[:, 1:] <= mask[:, :-1]).all())  # right-padded


def test_load_calib_too_little_text(tmp_path: Path) -> None:
    f = tmp_path / "short.txt"
    f.write_text("one two three\nfour five\nsix seven eight\nnine ten\n")
    data = load_calib(_WordTokenizer(), str(f), n_calib=2, n_heldout=2, seq=4)
    assert data.source.startswith(str(f))
    with pytest.raises(HwpruneError, match=r"less than one sequence \(--seq 64\).*lower --seq") as e:
        load_calib(_WordTokenizer(), str(f), n_calib=2, n_heldout=2, seq=64)
    assert "\n" not in str(e.value)
    with pytest.raises(HwpruneError, match="n_calib=3 \\+ n_heldout=2"):
        load_calib(_WordTokenizer(), str(f), n_calib=3, n_heldout=2, seq=4)
