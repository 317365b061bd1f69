"""Read a study's front from any machine, without running anything: ``hwprune picks``.

Everything comes from the study itself: the units, the dense model's predicted ms and the creator's
run description (``run.json``) are study attributes, and every complete trial holds its candidate,
predicted ms (its first objective) and scores. The run directory written here is what ``hwprune
export`` reads, so the chosen subnets can be cut and measured on the machine that will run them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from optuna.trial import TrialState

from hwprune._io import write_json
from hwprune.errors import HwpruneError
from hwprune.search.pareto import SOURCES, Evaluation, ParetoSet
from hwprune.search.run import SearchConfig, SearchResult, budgets_for, pick_within, write_outputs
from hwprune.search.storage import StudyStore, close_storage, describe, open_storage
from hwprune.search.study import finished, load_study, units_space
from hwprune.space import Candidate

__all__ = ["read_front", "repredict", "plot_fronts"]


def read_front(store: StudyStore, *, out: str | Path) -> tuple[SearchResult, dict[str, Any], int]:
    """(the search result rebuilt from the study, its run.json document, finished trials); writes
    ``run.json``, ``pareto.csv``, ``pareto.png`` and ``picks.json`` into ``out``."""
    if store.url is None:
        raise HwpruneError("picks needs --storage: a PostgreSQL URL, journal:PATH or a study.db path")
    where = f"{describe(store.url)}"
    storage = open_storage(store.url, heartbeat_s=None, create=False)
    try:
        study = load_study(storage, name=store.name, where=where)
        attrs = study.user_attrs
        run = attrs.get("request")
        if not isinstance(run, dict) or "request" not in run:
            raise HwpruneError(
                f"study {store.name!r} in {where} records no search request (it was made by the Python "
                "search() call, not hwprune search); read its trials with optuna instead"
            )
        space = units_space(attrs["units"])
        dense_ms = float(attrs["dense_ms"])
        evals: list[Evaluation] = []
        for t in sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: t.number):
            ua = t.user_attrs
            if "sizes" not in ua or "scores" not in ua or t.values is None:
                continue
            src = str(ua.get("source", "nsga"))
            evals.append(
                Evaluation(
                    candidate=Candidate(tuple(int(s) for s in ua["sizes"])),
                    predicted_ms=float(t.values[0]),
                    scores={k: float(v) for k, v in ua["scores"].items()},
                    params=int(ua.get("params", 0)),
                    source=src if src in SOURCES else "nsga",
                )
            )
        n_done = finished(study)
    finally:
        close_storage(storage)
    if not evals:
        raise HwpruneError(
            f"study {store.name!r} in {where} has no complete trial yet; start workers with hwprune search"
        )
    config = SearchConfig.from_json(run["request"]["search"])
    budgets = budgets_for(config, dense_ms)
    picks: dict[float, Evaluation] = {}
    for target, b in budgets.items():
        p = pick_within(evals, b, band=config.pick_band, tie_z=config.pick_tie_z)
        if p is not None:
            picks[target] = p
    pareto = ParetoSet.of(evals, space=space, dense_ms=dense_ms)
    out = Path(out)
    result = SearchResult(
        config=config,
        dense_ms=dense_ms,
        budgets=budgets,
        dp={},
        evaluations=pareto.evaluations,
        pareto=pareto,
        picks=picks,
        run_dir=out,
    )
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "run.json", {**run, "storage": where, "study": store.name})
    write_outputs(result)
    return result, run, n_done


def repredict(
    result: SearchResult, *, predict: Callable[[Candidate], float], dense_ms: float, out: str | Path
) -> SearchResult:
    """``result``'s evaluated subnets with another device's predicted ms: its own front and picks.

    Scores do not depend on the device (they compare outputs), so one study's trials serve every table;
    only latency is re-predicted. The trials were steered by the study's own table, so another device's
    front is the best *among them*, not a search of its own.
    """
    evals = [dataclasses.replace(e, predicted_ms=float(predict(e.candidate))) for e in result.evaluations]
    budgets = budgets_for(result.config, dense_ms)
    picks: dict[float, Evaluation] = {}
    for target, b in budgets.items():
        p = pick_within(evals, b, band=result.config.pick_band, tie_z=result.config.pick_tie_z)
        if p is not None:
            picks[target] = p
    pareto = ParetoSet.of(evals, space=result.pareto.space, dense_ms=dense_ms)
    return SearchResult(
        config=result.config,
        dense_ms=dense_ms,
        budgets=budgets,
        dp={},
        evaluations=pareto.evaluations,
        pareto=pareto,
        picks=picks,
        run_dir=Path(out),
    )


def plot_fronts(results: Mapping[str, SearchResult], path: str | Path) -> Path:
    """One Pareto front per device (predicted speedup over that device's dense model vs distance), PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from hwprune._io import atomic_path

    fig = Figure(figsize=(7.5, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for name, res in results.items():
        front = res.pareto.front
        line = ax.plot(
            [res.dense_ms / e.predicted_ms for e in front],
            [e.distance for e in front],
            "-o",
            ms=4,
            drawstyle="steps-pre",
            label=f"{name} (dense {res.dense_ms:.3g} ms)",
        )[0]
        for target, ev in res.picks.items():
            ax.scatter([res.dense_ms / ev.predicted_ms], [ev.distance], marker="*", s=120, color=line.get_color())
            ax.annotate(f"{target:g}x", (res.dense_ms / ev.predicted_ms, ev.distance), fontsize=8)
    ax.set_xlabel("predicted speedup over the dense model on that device")
    ax.set_ylabel("distance to the dense model (lower is better)")
    ax.set_title("One study, one front per device (stars: picks per target)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    return Path(path)
