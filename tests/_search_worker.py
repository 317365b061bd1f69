"""One search worker as its own process, for tests/test_workers.py: the real search loop and the real
storage, on a synthetic 6-unit problem whose scorer costs ``--score-s`` seconds (no torch import,
so a process starts in ~2 s).

    python tests/_search_worker.py --storage URL --study NAME --trials N -o DIR [--score-s S]
        [--seed K] [--heartbeat-s H] [--fresh]

Exit codes: 0 done, 2 HwpruneError (its one line on stderr). Prints ``scored <n>`` at the end.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hwprune.errors import HwpruneError
from hwprune.latency.predictor import Predictor
from hwprune.search import SearchConfig, search
from hwprune.search.storage import StudyStore
from hwprune.space import Candidate, PruningSpace, Unit


class Additive(Predictor):
    def __init__(self, space: PruningSpace, costs: list[np.ndarray]) -> None:
        super().__init__(space)
        self.costs = costs

    def predict(self, cand: Candidate) -> float:
        return 1.0 + sum(float(c[u.sizes.index(s)]) for u, c, s in zip(self.space.units, self.costs, cand.sizes))

    def unit_costs(self) -> tuple[float, list[np.ndarray]]:
        return 1.0, self.costs


class _Param:
    def __init__(self, n: int) -> None:
        self.n = n

    def numel(self) -> int:
        return self.n


class _Model:
    def __init__(self, sizes: tuple[int, ...]) -> None:
        self.sizes = sizes

    def parameters(self) -> list[_Param]:
        return [_Param(sum(self.sizes) + 1)]


class Proxy:
    def __init__(self, errors: list[np.ndarray]) -> None:
        self.errors = errors

    def unit_errors(self) -> list[np.ndarray]:
        return self.errors

    def build(self, cand: Candidate) -> _Model:
        return _Model(cand.sizes)

    scoring_model = build


class Scorer:
    def __init__(self, space: PruningSpace, errors: list[np.ndarray], seconds: float) -> None:
        self.space, self.errors, self.seconds, self.calls = space, errors, seconds, 0

    def score(self, model: _Model) -> dict[str, float]:
        self.calls += 1
        time.sleep(self.seconds)
        idx = [u.sizes.index(s) for u, s in zip(self.space.units, model.sizes)]
        d = sum(float(e[j]) for e, j in zip(self.errors, idx))
        d *= 1 + 0.1 * sum(s < u.full for u, s in zip(self.space.units, model.sizes))
        return {"distance": d, "cosine": 1 - d / 100}


def problem() -> tuple[PruningSpace, Additive, Proxy, list[np.ndarray]]:
    rng = np.random.default_rng(5)
    units = tuple(Unit(name=f"u{i}", kind="ffn", full=8, sizes=(0, 2, 4, 6, 8)) for i in range(6))
    space = PruningSpace(units=units)
    costs = [np.sort(rng.uniform(0.1, 2.0, 5)) for _ in units]
    errors = [np.sort(rng.uniform(0, 1, 5))[::-1].copy() for _ in units]
    for e in errors:
        e[-1] = 0.0
    return space, Additive(space, costs), Proxy(errors), errors


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--storage", default=None)
    ap.add_argument("--study", default="hwprune")
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--score-s", type=float, default=0.02)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--heartbeat-s", type=int, default=1)
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument("-o", "--out", required=True)
    a = ap.parse_args(argv)
    space, pred, proxy, errors = problem()
    scorer = Scorer(space, errors, a.score_s)
    cfg = SearchConfig(targets=(1.5, 2.0), trials=a.trials, seed=a.seed, population=6, buckets=200)
    key = {"problem": "synthetic-6", "seed": a.seed}
    try:
        search(
            space=space,
            predictor=pred,
            proxy_state=proxy,
            scorer=scorer,
            config=cfg,
            run_dir=a.out,
            progress=False,
            store=StudyStore(url=a.storage, name=a.study, heartbeat_s=a.heartbeat_s, fresh=a.fresh),
            key=key,
            request={"request": {"search": cfg.to_json()}},
        )
    except HwpruneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"scored {scorer.calls}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
