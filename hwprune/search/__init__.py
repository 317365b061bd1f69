"""Search: exact DP under the additive latency model, then NSGA-II on end-to-end scores.

``search(space=, predictor=, proxy_state=, scorer=, config=SearchConfig(targets=(2.0,)), run_dir=)``
returns a :class:`SearchResult` with the Pareto set and one pick per speedup target.
"""

from __future__ import annotations

from hwprune.search.dp import DPSolution, fastest_ms, max_speedup, solve_dp
from hwprune.search.nsga import Seed, run_nsga, uniform_seed
from hwprune.search.pareto import Evaluation, ParetoSet, pareto_mask
from hwprune.search.run import SearchConfig, SearchResult, budgets_for, pick_within, search
from hwprune.search.storage import StudyStore

__all__ = [
    "DPSolution",
    "solve_dp",
    "fastest_ms",
    "max_speedup",
    "Seed",
    "run_nsga",
    "uniform_seed",
    "Evaluation",
    "ParetoSet",
    "pareto_mask",
    "SearchConfig",
    "SearchResult",
    "search",
    "budgets_for",
    "pick_within",
    "StudyStore",
]
