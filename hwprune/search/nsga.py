"""NSGA-II over the pruning space with Optuna: minimise (predicted latency ms, end-to-end distance).

One categorical parameter per unit (named like the unit) over its allowed sizes. The study lives in
an SQLite file, so an interrupted search resumes: trials already finished (complete or pruned)
count toward ``trials`` and only the rest run. Every complete trial stores ``sizes``, ``scores``,
``params`` and ``source`` as user attributes, so a resumed study rebuilds its evaluations without
scoring anything again. Seeds (DP picks, uniform baselines, the dense model) are enqueued first.

``evaluate(candidate) -> {"distance": ..., "cosine": ..., "params": ...}`` is called at most once
per distinct candidate; ``params`` (if present) becomes :attr:`Evaluation.params`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import numbers
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
import sqlalchemy
from optuna.trial import TrialState

from hwprune.errors import HwpruneError
from hwprune.search.pareto import Evaluation
from hwprune.space import Candidate, PruningSpace

__all__ = ["Seed", "Evaluate", "run_nsga", "uniform_seed", "STUDY_NAME"]

STUDY_NAME = "hwprune"
Evaluate = Callable[[Candidate], Mapping[str, float]]
_DONE = (TrialState.COMPLETE, TrialState.PRUNED)
_SLOWER_TOL = 1e-9  # relative; a candidate equal to dense (the dense seed itself) is kept


@dataclass(frozen=True)
class Seed:
    candidate: Candidate
    source: str  # "dp", "uniform" or "dense"


def uniform_seed(
    space: PruningSpace, predict: Callable[[Candidate], float], budget_ms: float, *, steps: int = 200
) -> Candidate | None:
    """The least-pruned uniform candidate (same fraction kept everywhere) within ``budget_ms``."""
    best: tuple[float, float, Candidate] | None = None
    for f in np.linspace(0.0, 1.0, steps + 1):
        cand = space.uniform(float(f))
        ms = float(predict(cand))
        if ms <= budget_ms and (best is None or (ms, f) > best[:2]):
            best = (ms, float(f), cand)
    return None if best is None else best[2]


def _space_signature(space: PruningSpace) -> str:
    spec = [[u.name, list(u.sizes)] for u in space.units]
    return hashlib.sha1(json.dumps(spec).encode()).hexdigest()


def _clean_scores(raw: Mapping[str, object]) -> dict[str, float]:
    # user_attrs must be JSON: keep scalar numbers only, as plain floats (numpy/torch scalars too).
    out: dict[str, float] = {}
    for k, v in raw.items():
        if isinstance(v, numbers.Real) or (hasattr(v, "item") and getattr(v, "ndim", 1) == 0):
            out[str(k)] = float(v)  # type: ignore[arg-type]  # numpy 0-d arrays convert, their stub says no
    if "distance" not in out:
        raise HwpruneError(
            f"the end-to-end scorer returned no 'distance' (keys: {sorted(raw)}); "
            "it must return a dict with a numeric 'distance'"
        )
    return out


def _to_evaluation(cand: Candidate, ms: float, scores: Mapping[str, float], source: str) -> Evaluation:
    s = dict(scores)
    params = s.pop("params", 0.0)
    return Evaluation(
        candidate=cand, predicted_ms=ms, scores=s, params=int(params) if math.isfinite(params) else 0, source=source
    )


def _sqlite_pragmas(dbapi_conn: object, _record: object) -> None:
    cur = dbapi_conn.cursor()  # type: ignore[attr-defined]  # SQLAlchemy types the DB-API connection as Any-less
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


@contextlib.contextmanager
def _quiet_optuna() -> Iterator[None]:
    # Optuna logs one INFO line per trial; the progress bar says the same thing once.
    old = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(old)


def _open_study(
    path: Path, *, space: PruningSpace, seed: int, population: int
) -> tuple[optuna.Study, optuna.storages.RDBStorage]:
    storage = optuna.storages.RDBStorage(url=f"sqlite:///{path.resolve()}")
    # Optuna commits once per suggested parameter; with SQLite's default rollback journal each
    # commit is an fsync (~10 ms here), which made storage 2/3 of a search. WAL + synchronous=NORMAL
    # keeps the file consistent across crashes and power loss (it may lose the last trials only).
    sqlalchemy.event.listen(storage.engine, "connect", _sqlite_pragmas)
    storage.engine.dispose()  # reopen pooled connections so they get the pragmas
    sampler = optuna.samplers.NSGAIISampler(population_size=population, seed=seed)
    study = optuna.create_study(
        storage=storage,
        sampler=sampler,
        study_name=STUDY_NAME,
        directions=["minimize", "minimize"],
        load_if_exists=True,
    )
    sig = _space_signature(space)
    old = study.user_attrs.get("space_signature")
    if old is None:
        study.set_user_attr("space_signature", sig)
        study.set_user_attr("units", [u.name for u in space.units])
    elif old != sig:
        raise HwpruneError(
            f"{path} holds a study over a different pruning space; "
            "use a new run directory or delete study.db to start over"
        )
    return study, storage


def run_nsga(
    *,
    space: PruningSpace,
    predict: Callable[[Candidate], float],
    evaluate: Evaluate,
    dense_ms: float,
    storage_path: str | Path,
    trials: int,
    seed: int = 0,
    population: int = 24,
    seeds: Sequence[Seed] = (),
    progress: bool = True,
) -> list[Evaluation]:
    """Run (or resume) the study up to ``trials`` finished trials; return every distinct evaluation.

    Candidates predicted slower than dense are pruned before scoring: they can never be picked.
    """
    names = [u.name for u in space.units]
    cache: dict[str, Evaluation] = {}
    with _quiet_optuna():
        study, storage = _open_study(Path(storage_path), space=space, seed=seed, population=population)
        try:
            # Rebuild evaluations of finished trials; latency is re-predicted (the table may be newer).
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
                if "sizes" in t.user_attrs and "scores" in t.user_attrs:
                    cand = Candidate(tuple(int(s) for s in t.user_attrs["sizes"]))
                    scores = {**t.user_attrs["scores"], "params": t.user_attrs.get("params", 0)}
                    cache.setdefault(
                        cand.key(),
                        _to_evaluation(cand, float(predict(cand)), scores, t.user_attrs.get("source", "nsga")),
                    )
            done = sum(t.state in _DONE for t in study.get_trials(deepcopy=False))
            # A trial left RUNNING by an interrupted run is not counted and its seed is enqueued again.
            queued = {
                Candidate(tuple(int(t.system_attrs["fixed_params"][n]) for n in names)).key()
                for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
            }
            taken = {
                Candidate(tuple(int(t.params[n]) for n in names)).key()
                for t in study.get_trials(deepcopy=False, states=_DONE)
            }
            for s in seeds:
                k = s.candidate.key()
                if k not in queued and k not in taken:
                    study.enqueue_trial(dict(zip(names, s.candidate.sizes)), user_attrs={"source": s.source})
                    queued.add(k)

            def objective(trial: optuna.Trial) -> tuple[float, float]:
                cand = Candidate(tuple(int(trial.suggest_categorical(u.name, list(u.sizes))) for u in space.units))
                source = str(trial.user_attrs.get("source", "nsga"))
                trial.set_user_attr("source", source)
                trial.set_user_attr("sizes", list(cand.sizes))
                ms = float(predict(cand))
                if ms > dense_ms * (1 + _SLOWER_TOL):
                    raise optuna.TrialPruned()
                ev = cache.get(cand.key())
                if ev is None:
                    ev = _to_evaluation(cand, ms, _clean_scores(evaluate(cand)), source)
                    cache[cand.key()] = ev
                trial.set_user_attr("scores", dict(ev.scores))
                trial.set_user_attr("params", ev.params)
                return ms, ev.distance

            remaining = max(0, trials - done)
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            with Progress(
                TextColumn("[bold]NSGA-II"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                disable=not progress,
                transient=False,
            ) as bar:
                task = bar.add_task("trials", total=trials, completed=done)
                study.optimize(objective, n_trials=remaining, catch=(), callbacks=[lambda _s, _t: bar.advance(task)])
        finally:
            # Release the SQLite file so the run directory can be moved or deleted right away.
            storage.remove_session()
            storage.engine.dispose()
    return list(cache.values())
