"""Layer-by-layer calibration, spilled statistics, pruned views and depth figures of the decoder family."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from hwprune.families.decoder import database
from hwprune.families.decoder.adapter import DecoderAdapter
from hwprune.families.decoder.collect import collect_stats
from hwprune.families.decoder.stream import PrunedView
from hwprune.proxies._base import CalibData, fit_proxy
from hwprune.space import Candidate

VOCAB = 300


def _adapter(arch: str, seed: int = 0) -> DecoderAdapter:
    a = DecoderAdapter.tiny(arch=arch, vocab=VOCAB, seed=seed)
    gen = torch.Generator().manual_seed(seed + 5)
    with torch.no_grad():
        for name, p in a.dense().named_parameters():
            base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            p.copy_(base + 0.15 * torch.randn(p.shape, generator=gen))
    return a


def _inputs(n: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, seq), generator=gen)
    lens = torch.randint(3, seq + 1, (n,), generator=gen)
    lens[0] = seq
    return {"input_ids": ids, "attention_mask": (torch.arange(seq)[None, :] < lens[:, None]).long()}


def _whole_model_stats(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Reference: every o_proj / down_proj input and every block's input/output from ONE ordinary forward pass."""
    got: dict[str, torch.Tensor] = {}
    handles = []
    for i, layer in enumerate(model.layers):  # type: ignore[attr-defined]
        handles.append(layer.attn.o_proj.register_forward_pre_hook(lambda _m, a, i=i: got.__setitem__(f"a{i}", a[0])))
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(lambda _m, a, i=i: got.__setitem__(f"f{i}", a[0])))
        handles.append(layer.register_forward_hook(lambda _m, a, o, i=i: got.update({f"in{i}": a[0], f"out{i}": o[0]})))
    with torch.inference_mode():
        model(inputs["input_ids"], inputs["attention_mask"])
    for h in handles:
        h.remove()
    keep = inputs["attention_mask"].bool()
    out = []
    for i in range(len(model.layers)):  # type: ignore[attr-defined]
        out.append({k: got[f"{k}{i}"][keep].double() for k in ("a", "f", "in", "out")})
    return out


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("spill", [False, True])
def test_layer_by_layer_equals_whole_model(arch: str, spill: bool, tmp_path: Path) -> None:
    a = _adapter(arch)
    model = a.dense()
    data = _inputs(12, 16, 1)
    stats = collect_stats(model, data, batch=5, threads=1, spill=tmp_path if spill else None)
    ref = _whole_model_stats(model, data)
    for st, r in zip(stats, ref):
        assert st.attn.spilled == spill and st.ffn.spilled == spill
        for s, x in ((st.attn, r["a"]), (st.ffn, r["f"])):
            assert s.count == x.shape[0]
            xtx = x.T @ x
            torch.testing.assert_close(s.xtx.double(), xtx, rtol=1e-5, atol=1e-6 * float(xtx.abs().max()))
            torch.testing.assert_close(s.mean, x.mean(0), rtol=1e-5, atol=1e-7)
        cos = torch.nn.functional.cosine_similarity(r["in"], r["out"], dim=-1).mean()
        assert st.cos_block == pytest.approx(float(cos), abs=1e-6)
    if spill:
        assert sorted(p.name for p in tmp_path.iterdir())[:2] == ["layer0.attn.npy", "layer0.ffn.npy"]


def test_spilled_statistics_fit_the_same_proxies(tmp_path: Path) -> None:
    a = _adapter("llama")
    space = a.space()
    data = CalibData(calib=_inputs(16, 16, 1), heldout=_inputs(4, 16, 2), source="random ids")
    mem = collect_stats(a.dense(), data.calib, threads=1)
    disk = collect_stats(a.dense(), data.calib, threads=1, spill=tmp_path)
    for name in ("obs", "flap"):
        s1 = fit_proxy(name, a, space, data, stats=mem, progress=False)
        s2 = fit_proxy(name, a, space, data, stats=disk, progress=False)
        for e1, e2 in zip(s1.unit_errors(), s2.unit_errors()):
            np.testing.assert_allclose(e1, e2, rtol=1e-9, atol=1e-12)
        cand = Candidate(tuple(u.sizes[len(u.sizes) // 2] for u in space.units))
        _, o1 = s1.materialize(cand)
        _, o2 = s2.materialize(cand)
        assert o1.keys() == o2.keys()
        for k in o1:
            torch.testing.assert_close(o1[k], o2[k])


def test_wide_projections_accumulate_in_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    from hwprune.families.decoder import collect

    monkeypatch.setattr(collect, "WIDE", 8)  # every projection of the tiny model is "wide" now
    a = _adapter("llama")
    stats = collect.collect_stats(a.dense(), _inputs(6, 12, 3), threads=1)
    assert stats[0].ffn.xtx.dtype == torch.float32
    data = CalibData(calib=_inputs(6, 12, 3), heldout=_inputs(2, 12, 4), source="random ids")
    state: Any = fit_proxy("obs", a, a.space(), data, stats=stats, progress=False)
    errs = state.unit_errors()
    assert all(e[-1] == 0 and np.all(np.diff(e) <= 1e-9) for e in errs)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_pruned_view_equals_the_pruned_model(arch: str) -> None:
    a = _adapter(arch)
    space = a.space()
    data = CalibData(calib=_inputs(16, 16, 1), heldout=_inputs(4, 16, 2), source="random ids")
    state: Any = fit_proxy("obs", a, space, data, progress=False)
    sizes = [u.sizes[i % len(u.sizes)] for i, u in enumerate(space.units)]
    cand = Candidate(tuple(sizes))
    view = state.scoring_model(cand)
    assert isinstance(view, PrunedView)
    assert not list(view.parameters())  # nothing of its own: slices are made per block, on demand
    built = state.build(cand)
    x = _inputs(3, 10, 9)
    with torch.inference_mode():
        torch.testing.assert_close(
            view(x["input_ids"], x["attention_mask"]), built(x["input_ids"], x["attention_mask"]), rtol=1e-5, atol=1e-5
        )
    # the scorer sees the same numbers either way
    from hwprune.families.decoder.scorer import DecoderScorer

    scorer = DecoderScorer(a, data.heldout, threads=1)
    s_view, s_built = scorer.score(view), scorer.score(built)
    assert s_view["kl"] == pytest.approx(s_built["kl"], rel=1e-5, abs=1e-8)
    assert s_view["perplexity"] == pytest.approx(s_built["perplexity"], rel=1e-5)


def test_level_cache_is_bounded() -> None:
    a = _adapter("llama")
    space = a.space()
    data = CalibData(calib=_inputs(16, 16, 1), heldout=_inputs(4, 16, 2), source="random ids")
    state: Any = fit_proxy("obs", a, space, data, progress=False)
    state.cache_bytes = 1  # keep only the newest level
    for size in space.units[1].sizes:
        state.level(1, size)
    assert len(state._levels) == 1


def test_a_trial_holds_the_level_cache_and_one_block() -> None:
    """The scoring view asks for a block's reconstructed weights when it reaches the block: with a cache of
    one level the scores are still the pruned model's, and the cache is sized by the model."""
    a = _adapter("llama")
    space = a.space()
    data = CalibData(calib=_inputs(16, 16, 1), heldout=_inputs(4, 16, 2), source="random ids")
    state: Any = fit_proxy("obs", a, space, data, progress=False)
    dense_bytes = sum(p.numel() * p.element_size() for p in a.dense().parameters())
    assert state.cache_bytes == min(database.LEVEL_CACHE_BYTES, int(database.LEVEL_CACHE_SHARE * dense_bytes))
    cand = Candidate(tuple(u.sizes[len(u.sizes) // 2] for u in space.units))
    built = state.build(cand)
    state.cache_bytes = 1
    state._levels.clear()
    view = state.scoring_model(cand)
    assert callable(view.overrides) and not state._levels  # nothing reconstructed before the blocks run
    x = _inputs(3, 10, 9)
    with torch.inference_mode():
        torch.testing.assert_close(
            view(x["input_ids"], x["attention_mask"]), built(x["input_ids"], x["attention_mask"]), rtol=1e-5, atol=1e-5
        )
    assert len(state._levels) == 1


def test_spill_policy_follows_the_model_size() -> None:
    from hwprune.families.decoder.config import named_config

    assert database.spill_folder(named_config("smollm2")) is None  # 0.6 GB of statistics: kept in memory
    big = database.stats_bytes(named_config("llama-3.2-1b"))
    assert big > database.SPILL_BYTES


def test_disk_streams_round_trip_and_the_batch_cap(tmp_path: Path) -> None:
    """Streams written to the unlinked file read back bit for bit, overwrite in place, refuse another shape;
    a wide model gets fewer rows per batch than asked, a narrow one all of them."""
    from hwprune.families.decoder.collect import DiskStreams, rows_per_batch
    from hwprune.families.decoder.config import named_config

    xs = DiskStreams(tmp_path)
    a, b = torch.randn(3, 5, 4), torch.randn(2, 7, 4)
    xs.append(a)
    xs.append(b)
    assert len(xs) == 2 and torch.equal(xs[0], a) and torch.equal(xs[1], b)
    xs[0] = a * 2
    assert torch.equal(xs[0], a * 2) and torch.equal(xs[1], b) and [t.shape for t in xs] == [a.shape, b.shape]
    with pytest.raises(ValueError, match="holds"):
        xs[1] = a
    assert rows_per_batch(named_config("llama-3.2-1b"), 256, 8) == 2  # 8192-wide FFN: 8 MiB per row
    assert rows_per_batch(named_config("smollm2"), 256, 8) == 7  # 9 heads x 256 scores: 2.25 MiB per row
    assert rows_per_batch(named_config("smollm2"), 16, 8) == 8
