"""NSGA-II over the pruning space with Optuna: minimise (predicted latency ms, end-to-end distance).

One categorical parameter per unit (named like the unit) over its allowed sizes. The study lives in
an SQLite file by default, or on a PostgreSQL server / journal file shared by many workers
(:mod:`hwprune.search.storage`); an interrupted search resumes: trials already finished (complete or
pruned) by any worker count toward ``trials``, the study's exact total (:mod:`hwprune.search.study`).
Every complete trial stores ``sizes``, ``scores``, ``params`` and ``source`` as user attributes, so a
resumed study rebuilds its evaluations without scoring anything again. Seeds (DP picks, uniform
baselines, the dense model, then the uniform baselines grown to their budgets) are enqueued first.

``evaluate(candidate) -> {"distance": ..., "cosine": ..., "params": ...}`` is called at most once
per distinct candidate; ``params`` (if present) becomes :attr:`Evaluation.params`.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import os
import signal
import socket
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from hwprune.errors import HwpruneError
from hwprune.search.pareto import Evaluation
from hwprune.search.storage import STUDY_NAME, StudyStore, close_storage, describe, open_storage, storage_kind
from hwprune.search.study import finished, join_study, slot
from hwprune.space import Candidate, PruningSpace

__all__ = ["Seed", "Evaluate", "Interrupted", "run_nsga", "uniform_seed", "STUDY_NAME"]

Evaluate = Callable[[Candidate], Mapping[str, float]]
_SLOWER_TOL = 1e-9  # relative; a candidate equal to dense (the dense seed itself) is kept


@dataclass(frozen=True)
class Seed:
    candidate: Candidate
    source: str  # "dp", "uniform", "dense" or "uniform-fill" (a uniform seed grown to its budget)


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


@contextlib.contextmanager
def _quiet_optuna() -> Iterator[None]:
    # Optuna logs one INFO line per trial (and a WARNING per surplus trial); the progress bar says it once.
    old = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(old)


_NO_HEARTBEAT = (
    "still waiting for a trial another worker of {where} runs; Optuna's journal storage has no heartbeats, so "
    "if that worker was killed its trial keeps its slot: stop here (Ctrl-C keeps every finished trial), and use "
    "PostgreSQL when workers may die"
)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during a search; ``signum`` says which (exit code 128 + signum, as a shell does)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class _Interrupts:
    """Ctrl-C / SIGTERM only ever stop a search inside a trial's own work (the objective), where Optuna
    marks the trial FAIL and the next run queues it again. One that lands in Optuna's bookkeeping (asking
    for a trial, telling its result, between trials) is held until the next safe point: raised there, it
    would leave a trial RUNNING without a heartbeat, a slot that no worker ever frees (a resumed search
    then waits for it forever). A second signal while one is held stops at once."""

    def __init__(self) -> None:
        self.pending: int | None = None
        self.armed = False

    def _handle(self, signum: int, _frame: object) -> None:
        again = self.pending is not None
        self.pending = signum
        if self.armed or again:
            raise Interrupted(signum)

    def check(self) -> None:
        if self.pending is not None:
            raise Interrupted(self.pending)

    @contextlib.contextmanager
    def installed(self) -> Iterator["_Interrupts"]:
        if threading.current_thread() is not threading.main_thread():  # signals go to the main thread only
            yield self
            return
        # a signal the process ignores (SIGINT of a `nohup ... &` job) stays ignored
        sigs = [s for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) is not signal.SIG_IGN]
        old = {s: signal.signal(s, self._handle) for s in sigs}
        try:
            yield self
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    @contextlib.contextmanager
    def armed_here(self) -> Iterator[None]:
        """The trial's own work: a signal raises KeyboardInterrupt at once."""
        self.check()
        self.armed = True
        try:
            yield
        finally:
            self.armed = False


class _Surplus(Exception):
    """Every one of the study's ``trials`` slots is taken by a finished trial: this one is not counted."""


def run_nsga(
    *,
    space: PruningSpace,
    predict: Callable[[Candidate], float],
    evaluate: Evaluate,
    dense_ms: float,
    store: StudyStore | None = None,
    run_dir: str | Path = ".",
    key: Mapping[str, Any] | None = None,
    request: Mapping[str, Any] | None = None,
    trials: int,
    seed: int = 0,
    population: int = 24,
    seeds: Sequence[Seed] = (),
    progress: bool = True,
) -> list[Evaluation]:
    """Join (or create) the study and work on it until it holds ``trials`` finished trials in all;
    return every distinct evaluation in it.

    Candidates predicted slower than dense are pruned before scoring: they can never be picked.
    ``key``: what the request's scores depend on (see :mod:`hwprune.search.study`).
    """
    store = store or StudyStore()
    url = store.resolved(Path(run_dir))
    where = f"{describe(url)} (study {store.name!r})" if store.url else url
    cache: dict[str, Evaluation] = {}
    with _quiet_optuna():
        if store.fresh and storage_kind(url) == "sqlite":  # a corrupt file cannot even be opened to delete a study
            for f in (url, f"{url}-wal", f"{url}-shm"):
                Path(f.removeprefix("sqlite:///")).unlink(missing_ok=True)
        storage = open_storage(url, heartbeat_s=store.heartbeat_s)
        try:
            study, _ = join_study(
                storage,
                name=store.name,
                where=where,
                space=space,
                key=key,
                request=request,
                dense_ms=dense_ms,
                seeds=[(s.candidate, s.source) for s in seeds],
                seed=seed,
                population=population,
                fresh=store.fresh,
            )

            def rebuild(trials: Sequence[FrozenTrial]) -> None:
                # Evaluations of finished trials (any worker's); latency is re-predicted (the table may be newer).
                for t in trials:
                    if t.state == TrialState.COMPLETE and "sizes" in t.user_attrs and "scores" in t.user_attrs:
                        cand = Candidate(tuple(int(s) for s in t.user_attrs["sizes"]))
                        if cand.key() not in cache:
                            scores = {**t.user_attrs["scores"], "params": t.user_attrs.get("params", 0)}
                            src = t.user_attrs.get("source", "nsga")
                            cache[cand.key()] = _to_evaluation(cand, float(predict(cand)), scores, src)

            rebuild(study.get_trials(deepcopy=False))
            worker = f"{socket.gethostname()}:{os.getpid()}"  # which machine and process ran a trial
            heartbeats = storage_kind(url) != "journal"

            interrupts = _Interrupts()

            def objective(trial: optuna.Trial) -> tuple[float, float]:
                with interrupts.armed_here():
                    return work(trial)

            def work(trial: optuna.Trial) -> tuple[float, float]:
                seen = study.get_trials(deepcopy=False)
                waited = 0
                while (state := slot(seen, trial.number, trials)) == "wait":
                    time.sleep(0.5)  # a lower trial still runs; if its worker died, heartbeats fail it
                    waited += 1
                    if waited == 120 and not heartbeats:
                        print(_NO_HEARTBEAT.format(where=where), file=sys.stderr)
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                        optuna.storages.fail_stale_trials(study)
                    seen = study.get_trials(deepcopy=False)
                    if any(t.state == TrialState.WAITING for t in seen):
                        state = "surplus"  # a dead worker's trial was queued again: it takes the freed slot
                        break
                rebuild(seen)  # another worker may have scored this very candidate already
                if state == "surplus":
                    trial.set_user_attr("surplus", f"not counted: the study's {trials} trial slots were taken")
                    raise _Surplus(trial.number)
                cand = Candidate(tuple(int(trial.suggest_categorical(u.name, list(u.sizes))) for u in space.units))
                source = str(trial.user_attrs.get("source", "nsga"))
                trial.set_user_attr("source", source)
                trial.set_user_attr("worker", worker)
                trial.set_user_attr("sizes", list(cand.sizes))
                ms = float(predict(cand))
                trial.set_user_attr("predicted_ms", ms)
                trial.set_user_attr("predicted_speedup", dense_ms / ms)
                if ms > dense_ms * (1 + _SLOWER_TOL):
                    raise optuna.TrialPruned()
                ev = cache.get(cand.key())
                if ev is None:
                    t0 = time.perf_counter()
                    ev = _to_evaluation(cand, ms, _clean_scores(evaluate(cand)), source)
                    trial.set_user_attr("score_s", time.perf_counter() - t0)  # the rest of a trial is overhead
                    cache[cand.key()] = ev
                trial.set_user_attr("scores", dict(ev.scores))
                trial.set_user_attr("distance", ev.distance)
                trial.set_user_attr("params", ev.params)
                return ms, ev.distance

            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            with Progress(
                TextColumn("[bold]NSGA-II"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                disable=not progress,
                transient=False,
            ) as bar:
                task = bar.add_task("trials", total=trials, completed=min(trials, finished(study)))

                def after(st: optuna.Study, _t: FrozenTrial) -> None:
                    n = finished(st)
                    bar.update(task, completed=min(trials, n))
                    if n >= trials:
                        st.stop()

                if finished(study) < trials:
                    with interrupts.installed():
                        study.optimize(objective, catch=(_Surplus,), callbacks=[after])
                        interrupts.check()  # one held after the last trial still stops the run
            rebuild(study.get_trials(deepcopy=False))
        finally:
            close_storage(storage)
    return list(cache.values())
