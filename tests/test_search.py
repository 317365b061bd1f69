"""Search: DP equals brute force, budgets hold, NSGA-II is seeded, deterministic and resumable."""

from __future__ import annotations

import itertools
import json
import sqlite3
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from hwprune.errors import HwpruneError, TargetUnreachableError
from hwprune.latency.predictor import Predictor
from hwprune.search import Evaluation, ParetoSet, SearchConfig, pareto_mask, pick_within, search, solve_dp
from hwprune.space import Candidate, PruningSpace, Unit


# ---- synthetic parts -------------------------------------------------------------------------
def _space(n_units: int, rng: np.random.Generator, *, max_levels: int = 4) -> PruningSpace:
    units = []
    for i in range(n_units):
        full = int(rng.integers(4, 9))
        k = int(rng.integers(2, max_levels + 1))
        sizes = tuple(sorted(set(rng.choice(np.arange(0, full), size=k - 1, replace=False).tolist()) | {full}))
        units.append(Unit(name=f"u{i}", kind="ffn", full=full, sizes=sizes))
    return PruningSpace(units=tuple(units))


class AdditivePredictor(Predictor):
    def __init__(self, space: PruningSpace, base: float, costs: list[np.ndarray]) -> None:
        super().__init__(space)
        self.base, self.costs = base, costs

    def predict(self, cand: Candidate) -> float:
        return self.base + sum(float(c[u.sizes.index(s)]) for u, c, s in zip(self.space.units, self.costs, cand.sizes))

    def unit_costs(self) -> tuple[float, list[np.ndarray]]:
        return self.base, self.costs


class _Sized(nn.Module):
    def __init__(self, sizes: tuple[int, ...]) -> None:
        super().__init__()
        self.sizes = sizes
        self.w = nn.Parameter(torch.zeros(sum(sizes) + 1))  # params = kept width + 1


class FakeProxy:
    def __init__(self, space: PruningSpace, errors: list[np.ndarray]) -> None:
        self.space, self.errors = space, errors

    def unit_errors(self) -> list[np.ndarray]:
        return self.errors

    def build(self, cand: Candidate) -> nn.Module:
        return _Sized(cand.sizes)

    scoring_model = build


class FakeScorer:
    """Additive error plus an interaction term, so end-to-end ranking can differ from the DP's."""

    def __init__(self, space: PruningSpace, errors: list[np.ndarray]) -> None:
        self.space, self.errors, self.calls = space, errors, 0

    def score(self, model: nn.Module) -> dict[str, float]:
        self.calls += 1
        idx = [u.sizes.index(s) for u, s in zip(self.space.units, model.sizes)]
        add = sum(float(e[j]) for e, j in zip(self.errors, idx))
        pruned = sum(s < u.full for u, s in zip(self.space.units, model.sizes))
        d = add * (1 + 0.1 * pruned)
        return {"distance": d, "cosine": 1 - d / 100}


def _problem(seed: int, n_units: int = 5):
    rng = np.random.default_rng(seed)
    space = _space(n_units, rng)
    costs = [np.sort(rng.uniform(0.1, 2.0, len(u.sizes))) for u in space.units]  # more kept -> slower
    errors = [np.sort(rng.uniform(0, 1, len(u.sizes)))[::-1].copy() for u in space.units]
    for e in errors:
        e[-1] = 0.0
    return space, AdditivePredictor(space, 1.0, costs), FakeProxy(space, errors), FakeScorer(space, errors)


def _brute(space, base, costs, errors, budget):
    best = np.inf
    for idx in itertools.product(*[range(len(u.sizes)) for u in space.units]):
        ms = base + sum(c[j] for c, j in zip(costs, idx))
        if ms <= budget:
            best = min(best, sum(e[j] for e, j in zip(errors, idx)))
    return best


# ---- DP --------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(40))
def test_dp_equals_brute_force_on_integer_costs(seed: int) -> None:
    # Integer costs and one bucket per ms: bucketing is exact, so the DP must equal brute force.
    rng = np.random.default_rng(seed)
    space = _space(int(rng.integers(2, 5)), rng)
    costs = [rng.integers(0, 6, len(u.sizes)).astype(float) for u in space.units]
    errors = [rng.uniform(0, 1, len(u.sizes)) for u in space.units]
    base = 3.0
    lo = base + sum(c.min() for c in costs)
    budget = float(lo + rng.integers(0, 12))
    sol = solve_dp(space, base_ms=base, costs=costs, errors=errors, budget_ms=budget, buckets=max(1, int(budget - lo)))
    assert sol.predicted_ms <= budget
    assert sol.error == pytest.approx(_brute(space, base, costs, errors, budget), abs=1e-12)
    space.validate(sol.candidate)


@pytest.mark.parametrize("seed", range(25))
def test_dp_float_costs_within_bucket_bound(seed: int) -> None:
    # Rounding costs up loses at most one bucket per unit: brute(B) <= dp(B) <= brute(B - n * width).
    space, pred, proxy, _ = _problem(seed, n_units=4)
    base, costs = pred.unit_costs()
    errors = proxy.unit_errors()
    lo, hi = base + sum(c.min() for c in costs), pred.dense_ms()
    budget = float(lo + np.random.default_rng(seed).uniform(0.05, 1.0) * (hi - lo))
    buckets = 40
    sol = solve_dp(space, base_ms=base, costs=costs, errors=errors, budget_ms=budget, buckets=buckets)
    assert sol.predicted_ms <= budget
    assert sol.predicted_ms == pytest.approx(pred.predict(sol.candidate), abs=1e-12)
    width = (budget - lo) / buckets
    assert _brute(space, base, costs, errors, budget) <= sol.error + 1e-12
    assert sol.error <= _brute(space, base, costs, errors, budget - len(space.units) * width) + 1e-12


def test_dp_exact_fastest_budget_and_unreachable_message() -> None:
    space = PruningSpace(units=(Unit("a", "ffn", 4, (0, 2, 4)), Unit("b", "ffn", 4, (2, 4))))
    costs = [np.array([0.0, 1.0, 2.0]), np.array([1.0, 2.0])]
    errors = [np.array([1.0, 0.5, 0.0]), np.array([0.3, 0.0])]
    # dense 5 ms, fastest 2 ms -> max speedup 2.5x; a budget of exactly 2 ms is reachable.
    sol = solve_dp(space, base_ms=1.0, costs=costs, errors=errors, budget_ms=2.0, buckets=100)
    assert sol.candidate.sizes == (0, 2) and sol.predicted_ms == 2.0 and sol.error == pytest.approx(1.3)
    with pytest.raises(TargetUnreachableError, match=r"largest reachable speedup is 2\.50x") as ei:
        solve_dp(space, base_ms=1.0, costs=costs, errors=errors, budget_ms=1.9)
    assert "\n" not in str(ei.value)


# ---- Pareto ----------------------------------------------------------------------------------
def test_pareto_mask_and_flags() -> None:
    ms = np.array([1.0, 2.0, 2.0, 3.0, 1.5, 3.0, 0.5])
    d = np.array([5.0, 1.0, 1.0, 0.0, 6.0, 0.0, np.nan])
    # 4 dominated by 0; 1 and 2 equal (both stay); 3 and 5 equal; NaN never on the front.
    assert pareto_mask(ms, d).tolist() == [True, True, True, True, False, True, False]
    space = PruningSpace(units=(Unit("a", "ffn", 8, tuple(range(9))),))
    evs = [
        Evaluation(Candidate((i,)), float(m), {"distance": float(x)}, source="nsga")
        for i, (m, x) in enumerate(zip(ms[:6], d[:6]))
    ]
    evs.append(Evaluation(Candidate((0,)), 9.0, {"distance": 9.0}, source="dp"))  # duplicate key: dropped
    ps = ParetoSet.of(evs, space=space, dense_ms=3.0)
    df = ps.to_frame()
    assert len(df) == 6
    assert df.set_index("key").loc[Candidate((4,)).key(), "pareto"] == False  # noqa: E712
    assert int(df["pareto"].sum()) == 5 and np.isnan(df["cosine"]).all()
    assert df["predicted_speedup"].tolist() == pytest.approx([3.0, 2.0, 1.5, 1.5, 1.0, 1.0])
    assert pick_within(evs, 1.9).key == Candidate((0,)).key()  # 5.0 beats 6.0 within 1.9 ms
    assert pick_within(evs, 2.0).distance == 1.0 and pick_within(evs, 0.9) is None
    near = [
        Evaluation(Candidate((i,)), m, {"distance": x}, source="nsga")
        for i, (m, x) in enumerate([(1.0, 1.0), (1.9, 2.0), (2.0, 3.0)])
    ]
    assert pick_within(near, 2.0).predicted_ms == 1.0  # best score anywhere under the budget
    assert pick_within(near, 2.0, band=0.15).predicted_ms == 1.9  # best near the speedup asked for
    assert pick_within(near, 1.5, band=0.15).predicted_ms == 1.0  # nothing in the band: whole budget


def test_pick_aims_at_the_budget_among_tied_scores() -> None:
    """Flat scores (random weights): a distance within its standard error of the best is a tie, and the
    tie predicted closest to the budget wins; a measurably better candidate still wins when faster."""

    def ev(i: int, ms: float, d: float, se: float | None = 0.01) -> Evaluation:
        scores = {"distance": d} if se is None else {"distance": d, "distance_se": se}
        return Evaluation(Candidate((i,)), ms, scores, source="nsga")

    flat = [ev(0, 7.0, 0.100), ev(1, 9.9, 0.112), ev(2, 8.5, 0.105), ev(3, 10.2, 0.05)]  # 3: over budget
    assert pick_within(flat, 10.0).predicted_ms == 9.9  # 0.112 is within 1 se of 0.100: aim at 10 ms
    assert pick_within(flat, 10.0, tie_z=0.5).predicted_ms == 8.5  # 0.105 ties, 0.112 no longer does
    assert pick_within(flat, 10.0, tie_z=0.0).predicted_ms == 7.0  # no ties: best distance
    better = [ev(0, 7.0, 0.100), ev(1, 9.9, 0.200)]  # 0.1 apart with se 0.014: measurably better
    assert pick_within(better, 10.0).predicted_ms == 7.0
    no_se = [ev(0, 7.0, 0.1, None), ev(1, 9.9, 0.1, None), ev(2, 9.0, 0.1000001, None)]
    assert pick_within(no_se, 10.0).predicted_ms == 9.9  # without se only equal distances tie
    bad_se = [ev(0, 7.0, 0.1, float("nan")), ev(1, 9.9, 0.11, float("inf"))]
    assert pick_within(bad_se, 10.0).predicted_ms == 7.0  # an unusable se counts as none
    # the default band: the best within 5 % of the budget, before anything further away
    band = [ev(0, 7.0, 0.01, 0.0), ev(1, 9.6, 0.5, 0.0)]
    assert pick_within(band, 10.0, band=SearchConfig(targets=(2.0,)).pick_band).predicted_ms == 9.6


# ---- config ----------------------------------------------------------------------------------
def test_config_json_round_trip_and_checks() -> None:
    cfg = SearchConfig(targets=(1.5, 2), trials=30, seed=3, margin=0.05)
    assert SearchConfig.from_json(json.loads(json.dumps(cfg.to_json()))) == cfg
    assert cfg.targets == (1.5, 2.0)
    for bad in (
        {"targets": (1.0,)},
        {"targets": ()},
        {"targets": (2.0, 2.0)},
        {"targets": (2.0,), "trials": 0},
        {"targets": (2.0,), "margin": 1.0},
        {"targets": (2.0,), "buckets": 3},
        {"targets": (2.0,), "pick_tie_z": -1.0},
        {"targets": (2.0,), "pick_tie_z": float("nan")},
        {"targets": 2.0},
    ):
        with pytest.raises(HwpruneError):
            SearchConfig(**bad)
    with pytest.raises(HwpruneError, match="unknown key 'trails'"):
        SearchConfig.from_json({"targets": [2.0], "trails": 5})


# ---- search ----------------------------------------------------------------------------------
def test_search_unreachable_writes_nothing(tmp_path) -> None:
    space, pred, proxy, scorer = _problem(0)
    cfg = SearchConfig(targets=(1.5, 50.0), trials=5)
    reach = pred.dense_ms() / (pred.base + sum(c.min() for c in pred.costs))
    with pytest.raises(TargetUnreachableError, match=rf"target 50x .* {np.floor(reach * 100) / 100:.2f}x"):
        search(
            space=space,
            predictor=pred,
            proxy_state=proxy,
            scorer=scorer,
            config=cfg,
            run_dir=tmp_path / "run",
            progress=False,
        )
    assert not (tmp_path / "run").exists() and scorer.calls == 0


def test_search_end_to_end_files_picks_and_budgets(tmp_path) -> None:
    space, pred, proxy, scorer = _problem(1, n_units=6)
    cfg = SearchConfig(targets=(1.3, 1.8), trials=20, seed=0, population=6, buckets=500)
    res = search(
        space=space, predictor=pred, proxy_state=proxy, scorer=scorer, config=cfg, run_dir=tmp_path, progress=False
    )
    assert {p.name for p in tmp_path.iterdir()} == {"study.db", "pareto.csv", "pareto.png", "picks.json"}
    assert (tmp_path / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert scorer.calls == len(res.evaluations)  # each distinct candidate scored once
    by_key = {e.key: e for e in res.evaluations}
    for t, b in res.budgets.items():
        assert b == pytest.approx(pred.dense_ms() / t)
        p = res.picks[t]
        assert p.predicted_ms <= b
        dp = by_key[res.dp[t].candidate.key()]  # the DP seed was scored ...
        assert p.distance <= dp.distance  # ... and the pick is never worse end to end
        assert min(e.distance for e in res.evaluations if e.predicted_ms <= b) == p.distance
    assert all(e.predicted_ms <= pred.dense_ms() * (1 + 1e-9) for e in res.evaluations)
    assert {"dp", "uniform", "dense", "nsga"} <= {e.source for e in res.evaluations}
    df = pd.read_csv(tmp_path / "pareto.csv")
    assert len(df) == len(res.evaluations) and df["predicted_ms"].is_monotonic_increasing
    assert set(df.loc[df["pareto"], "key"]) == {e.key for e in res.front}
    assert df["params"].tolist() == [sum(json.loads(s).values()) + 1 for s in df["sizes"]]
    picks = json.loads((tmp_path / "picks.json").read_text())["picks"]
    assert picks["1.8"]["key"] == res.picks[1.8].key
    assert picks["1.8"]["predicted_speedup"] == pytest.approx(pred.dense_ms() / res.picks[1.8].predicted_ms)
    assert set(picks["1.3"]) >= {"key", "sizes", "predicted_ms", "predicted_speedup", "budget_ms", "scores"}


def test_uniform_seeds_are_also_grown_to_their_budget(tmp_path) -> None:
    """Besides the least-pruned uniform candidate under each budget, the search scores that candidate grown
    to the budget on the exact prediction (uniform steps are coarse: it often stops well under)."""
    from hwprune.search.dp import fill_budget
    from hwprune.search.nsga import uniform_seed

    space, pred, proxy, scorer = _problem(1, n_units=6)
    cfg = SearchConfig(targets=(1.3, 1.8), trials=20, seed=0, population=6, buckets=500)
    res = search(
        space=space, predictor=pred, proxy_state=proxy, scorer=scorer, config=cfg, run_dir=tmp_path, progress=False
    )
    by_key = {e.key: e for e in res.evaluations}
    grown_any = False
    for b in res.budgets.values():
        u = uniform_seed(space, pred.predict, b)
        assert u is not None
        grown, ms = fill_budget(space, pred.predict, proxy.unit_errors(), u, b)
        assert ms <= b and all(g >= s for g, s in zip(grown.sizes, u.sizes))
        if grown != u:
            grown_any = True
            assert grown.key() in by_key and by_key[grown.key()].predicted_ms >= by_key[u.key()].predicted_ms
    assert grown_any and "uniform-fill" in {e.source for e in res.evaluations}


def test_fixed_seed_same_front_and_resume_counts_trials(tmp_path) -> None:
    space, pred, proxy, _ = _problem(2, n_units=6)
    cfg = SearchConfig(targets=(1.5,), trials=12, seed=7, population=4, buckets=200)

    def run(d, trials):
        sc = FakeScorer(space, proxy.errors)
        r = search(
            space=space,
            predictor=pred,
            proxy_state=proxy,
            scorer=sc,
            config=SearchConfig.from_json({**cfg.to_json(), "trials": trials}),
            run_dir=d,
            progress=False,
        )
        return r, sc

    a, _ = run(tmp_path / "a", 12)
    b, _ = run(tmp_path / "b", 12)
    front = lambda r: [(e.key, e.predicted_ms, e.distance) for e in r.front]  # noqa: E731
    assert front(a) == front(b) and len(front(a)) >= 2

    r6, _ = run(tmp_path / "c", 6)
    r12, sc = run(tmp_path / "c", 12)
    with sqlite3.connect(tmp_path / "c" / "study.db") as con:
        (n,) = con.execute("select count(*) from trials where state in ('COMPLETE', 'PRUNED')").fetchone()
    assert n == 12  # 6 done + 6 more, not 6 + 12
    assert sc.calls == len(r12.evaluations) - len(r6.evaluations)  # old evaluations come from the study
    assert {e.key for e in r6.evaluations} <= {e.key for e in r12.evaluations}
    r12b, sc = run(tmp_path / "c", 12)  # nothing left to do
    assert sc.calls == 0 and len(r12b.evaluations) == len(r12.evaluations)
    other, opred, oproxy, oscorer = _problem(3, n_units=6)
    with pytest.raises(HwpruneError, match="different pruning space"):
        search(
            space=other,
            predictor=opred,
            proxy_state=oproxy,
            scorer=oscorer,
            config=cfg,
            run_dir=tmp_path / "c",
            progress=False,
        )


def test_candidates_slower_than_dense_are_never_scored(tmp_path) -> None:
    # Pruning unit a *slows* the model (a padding cliff): half the space is slower than dense.
    space = PruningSpace(
        units=(Unit("a", "ffn", 8, (4, 8)), Unit("b", "ffn", 8, (2, 4, 6, 8)), Unit("c", "ffn", 8, (2, 4, 8)))
    )
    pred = AdditivePredictor(
        space, 1.0, [np.array([3.0, 1.0]), np.array([0.2, 0.5, 0.8, 1.0]), np.array([0.3, 0.6, 1.0])]
    )
    errors = [np.array([0.5, 0.0]), np.array([0.6, 0.3, 0.1, 0.0]), np.array([0.5, 0.2, 0.0])]
    scorer = FakeScorer(space, errors)
    res = search(
        space=space,
        predictor=pred,
        proxy_state=FakeProxy(space, errors),
        scorer=scorer,
        config=SearchConfig(targets=(1.2,), trials=12, population=4),
        run_dir=tmp_path,
        progress=False,
    )
    assert all(e.candidate.sizes[0] == 8 for e in res.evaluations)
    with sqlite3.connect(tmp_path / "study.db") as con:
        (pruned,) = con.execute("select count(*) from trials where state = 'PRUNED'").fetchone()
    assert pruned > 0 and scorer.calls == len(res.evaluations)
    assert res.picks[1.2].predicted_ms <= 4.0 / 1.2


def test_a_signal_outside_a_trial_is_held_to_the_next_safe_point() -> None:
    """Inside a trial's work a signal stops at once; in Optuna's bookkeeping it is held (raised there it
    left a trial RUNNING with no heartbeat, whose slot a resumed search waited on forever); a second one
    stops at once. The exception carries the signal for the exit code."""
    import os
    import signal

    from hwprune.search.nsga import Interrupted, _Interrupts

    before = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # CI may run us with SIGINT ignored
    intr = _Interrupts()
    with intr.installed():
        os.kill(os.getpid(), signal.SIGTERM)  # between trials: held
        assert intr.pending == signal.SIGTERM
        with pytest.raises(Interrupted) as e:
            intr.check()
        assert e.value.signum == signal.SIGTERM
        with pytest.raises(Interrupted), intr.armed_here():  # and at the start of the next trial's work
            pass
        with pytest.raises(Interrupted):  # a second signal while one is held: at once
            os.kill(os.getpid(), signal.SIGINT)
    fresh = _Interrupts()
    with fresh.installed():
        with pytest.raises(Interrupted) as e, fresh.armed_here():  # inside the work: at once
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(100):  # the handler runs at the next bytecode boundary
                pass
        assert e.value.signum == signal.SIGINT
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # an ignored signal stays ignored while a search runs
    try:
        with _Interrupts().installed():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


@pytest.mark.parametrize("signum,code", [(2, 130), (15, 143)])
def test_search_cli_exits_with_the_shells_code_for_the_signal(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, signum: int, code: int
) -> None:
    from typer.testing import CliRunner

    import hwprune.api
    from hwprune.cli import app
    from hwprune.search.nsga import Interrupted

    def interrupted(*_a: object, **_k: object) -> None:
        raise Interrupted(signum)

    monkeypatch.setattr(hwprune.api, "run_search", interrupted)
    res = CliRunner().invoke(app, ["search", "--model", "minilm", "-o", str(tmp_path / "run"), "--no-progress"])
    assert res.exit_code == code and "run the same command again to resume" in " ".join(res.output.split())
    assert "Traceback" not in res.output


def test_fill_budget_grows_a_candidate_until_no_step_fits() -> None:
    """The DP's exact finish: from a candidate well under its budget, every step that still fits is taken
    (most error removed per ms first), the result stays within the budget on the exact prediction, and
    its summed error never grows."""
    from hwprune.search.dp import fill_budget

    rng = np.random.default_rng(3)
    space = _space(6, rng, max_levels=5)

    def predict(c: Candidate) -> float:  # not additive: neighbouring units multiply, as a conv's c_in x c_out
        s = np.array(c.sizes, dtype=float) + 1
        return 1.0 + float(np.sum(s[:-1] * s[1:])) / 40

    errors = [np.linspace(1.0, 0.0, len(u.sizes)) ** 2 for u in space.units]
    start = space.smallest()
    budget = 0.8 * predict(space.dense())
    grown, ms = fill_budget(space, predict, errors, start, budget)
    assert ms == pytest.approx(predict(grown)) and ms <= budget
    idx = [u.sizes.index(s) for u, s in zip(space.units, grown.sizes)]
    err = sum(e[i] for e, i in zip(errors, idx))
    assert err < sum(e[0] for e in errors)
    for i, u in enumerate(space.units):  # no single step is left that fits
        if idx[i] + 1 < len(u.sizes):
            bigger = list(grown.sizes)
            bigger[i] = u.sizes[idx[i] + 1]
            assert predict(Candidate(tuple(bigger))) > budget
    assert fill_budget(space, predict, errors, space.dense(), budget)[0] == space.dense()  # nothing to add
