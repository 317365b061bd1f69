"""One study, many workers: create or join, refuse a different request, seed once, count exactly.

Study user attributes (all JSON; ``optuna-dashboard`` shows them):
- ``format``: ``hwprune.study/1``; ``ready``: True once the creator has written the rest;
- ``request_hash`` + ``request_key``: everything that changes a score (model, weights, space, proxy,
  calibration, table fingerprint, seed); a worker with another hash is refused, the study unharmed;
- ``space_signature``, ``units`` (name, kind, full, sizes), ``dense_ms``, ``request`` (the creator's
  request, for ``hwprune picks``).

Seeds (DP picks, uniform baselines, dense, uniform grown to the budget) are enqueued by the worker
whose ``create_new_study`` succeeded; the storage's unique study name decides that race. Joiners wait
for ``ready``.

Exact count: a trial numbered ``k`` runs only while fewer than ``trials`` non-failed trials are
numbered below it (:func:`slot`). Trial numbers are handed out atomically by the storage, so at most
``trials`` trials can pass, and workers go on until that many have finished (COMPLETE or PRUNED); a
trial that finds every slot taken waits while a lower one is still running (it may fail and free its
slot) and otherwise ends FAIL with the user attribute ``surplus`` (never counted, never retried).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import secrets
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import optuna
from optuna.storages import BaseStorage
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from hwprune.errors import HwpruneError
from hwprune.space import Candidate, PruningSpace, Unit

__all__ = ["join_study", "study_key", "load_study", "slot", "finished", "space_signature", "request_hash"]

STUDY_FORMAT = "hwprune.study/1"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
_SEED_SOURCES = ("dp", "uniform", "dense", "uniform-fill")


def space_signature(space: PruningSpace) -> str:
    spec = [[u.name, list(u.sizes)] for u in space.units]
    return hashlib.sha1(json.dumps(spec).encode()).hexdigest()


def request_hash(key: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _digest(path: object) -> str | None:
    if not isinstance(path, str) or not Path(path).is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def study_key(run: Mapping[str, Any], space: PruningSpace) -> dict[str, Any]:
    """What a trial's scores depend on, from a run.json document: the model (and its weights file's
    content), space, proxy, calibration (source and file content, sizes, seed) and the table's
    fingerprint. Targets, margin and trial count are left out: workers may differ in them."""
    req = run["request"]
    key = {
        "model": run["adapter"],
        # files by content, so workers may keep them at different paths
        "weights": _digest(req.get("weights")) or req.get("weights"),
        "input_shape": req.get("input_shape"),
        "space": space_signature(space),
        "proxy": req["proxy"],
        "calib": _digest(req.get("calib")) or run.get("calib_source"),
        "n_calib": req["n_calib"],
        "n_heldout": req["n_heldout"],
        "seed": req["search"]["seed"],
        "table_fingerprint": run["fingerprint"],
    }
    if req.get("n_report") is not None:  # texts held back for the report move a file's other splits
        key["n_report"] = req["n_report"]
    if run.get("workload") is not None:  # what predicted ms means (issue 9); absent keys keep older studies'
        key["workload"] = run["workload"]
    return key


def units_space(units: Sequence[Mapping[str, Any]]) -> PruningSpace:
    return PruningSpace(
        units=tuple(
            Unit(
                name=u["name"],
                kind=u["kind"],
                full=int(u["full"]),
                sizes=tuple(int(s) for s in u["sizes"]),
                layer=int(u.get("layer", -1)),
                granule=int(u.get("granule", 1)),
            )
            for u in units
        )
    )


def finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def slot(trials: Sequence[FrozenTrial], number: int, total: int) -> Literal["go", "wait", "surplus"]:
    """May trial ``number`` run (``trials``: all of the study's)? ``go`` while fewer than ``total``
    non-failed trials are numbered below it; ``wait`` while one below still runs."""
    below = [t for t in trials if t.number < number]
    if sum(t.state != TrialState.FAIL for t in below) < total:
        return "go"
    return "wait" if any(t.state == TrialState.RUNNING for t in below) else "surplus"


def _sizes(t: FrozenTrial, names: Sequence[str]) -> str | None:
    p = t.system_attrs.get("fixed_params") or t.params or {}
    return Candidate(tuple(int(p[n]) for n in names)).key() if all(n in p for n in names) else None


def _mismatch(attrs: Mapping[str, Any], key: Mapping[str, Any], where: str, fix: str) -> str:
    old = attrs.get("request_key") or {}
    diff = sorted(k for k in set(old) | set(key) if old.get(k) != key.get(k))
    which = ", ".join(diff) if diff else "the request"
    return (
        f"{where} holds a search with a different request ({which} differ: study {attrs['request_hash']}, "
        f"this run {request_hash(key)}); {fix}"
    )


def join_study(
    storage: BaseStorage,
    *,
    name: str,
    where: str,
    space: PruningSpace,
    key: Mapping[str, Any] | None,
    request: Mapping[str, Any] | None,
    dense_ms: float,
    seeds: Sequence[tuple[Candidate, str]],
    seed: int,
    population: int,
    fresh: bool = False,
    wait_s: float = 60.0,
) -> tuple[optuna.Study, bool]:
    """(the study, whether this worker created it). ``key=None``: check the pruning space only."""
    fix = "use another --study name or output directory, or --fresh to delete it and start over"
    if fresh:
        with contextlib.suppress(KeyError):  # nothing to delete
            optuna.delete_study(study_name=name, storage=storage)
    try:
        storage.create_new_study([StudyDirection.MINIMIZE] * 2, study_name=name)
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        created = False
    # The creator samples with the requested seed (one worker: same seed, same front); a joiner with
    # the same seed would propose the very same children, so it draws its own.
    sampler = optuna.samplers.NSGAIISampler(
        population_size=population, seed=seed if created else secrets.randbelow(2**31)
    )
    study = optuna.load_study(study_name=name, storage=storage, sampler=sampler)
    names = [u.name for u in space.units]
    if created:
        attrs: dict[str, Any] = {
            "format": STUDY_FORMAT,
            "space_signature": space_signature(space),
            "units": [
                {
                    "name": u.name,
                    "kind": u.kind,
                    "full": u.full,
                    "sizes": list(u.sizes),
                    "layer": u.layer,
                    "granule": u.granule,
                }
                for u in space.units
            ],
            "dense_ms": float(dense_ms),
            "request_hash": request_hash(key) if key is not None else None,
            "request_key": dict(key) if key is not None else None,
            "request": dict(request) if request is not None else None,
        }
        for k, v in attrs.items():
            study.set_user_attr(k, v)
        for cand, source in seeds:
            study.enqueue_trial(dict(zip(names, cand.sizes)), user_attrs={"source": source}, skip_if_exists=True)
        study.set_user_attr("ready", True)
        return study, True

    deadline = time.monotonic() + wait_s
    while not study.user_attrs.get("ready"):
        if "space_signature" in study.user_attrs and "format" not in study.user_attrs:
            raise HwpruneError(f"{where} was written by an older hwprune that did not record its request; {fix}")
        if time.monotonic() > deadline:
            raise HwpruneError(f"{where}: study {name!r} was created but never set up (its creator stopped); {fix}")
        time.sleep(0.2)
    attrs = study.user_attrs
    if attrs.get("space_signature") != space_signature(space):
        raise HwpruneError(f"{where} holds a study over a different pruning space; {fix}")
    if key is not None and attrs.get("request_hash") != request_hash(key):
        raise HwpruneError(_mismatch(attrs, key, where, fix))
    # A seed whose trial failed (Ctrl-C) and is not queued or finished elsewhere is queued again.
    trials = study.get_trials(deepcopy=False)
    alive = {_sizes(t, names) for t in trials if t.state != TrialState.FAIL}
    for t in trials:
        src = t.user_attrs.get("source")
        ck = _sizes(t, names)
        lost = t.state == TrialState.FAIL and "retry_history" not in t.system_attrs and not t.user_attrs.get("surplus")
        if lost and src in _SEED_SOURCES and ck is not None and ck not in alive:
            fixed = t.system_attrs.get("fixed_params") or t.params
            study.enqueue_trial({n: int(fixed[n]) for n in names}, user_attrs={"source": src})
            alive.add(ck)
    return study, False


def load_study(storage: BaseStorage, *, name: str, where: str) -> optuna.Study:
    """An existing hwprune study, read only; one line when it is missing or not hwprune's."""
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        known = [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]
        listed = ", ".join(sorted(known)[:10]) or "none"
        raise HwpruneError(f"no study {name!r} in {where} (studies there: {listed}); check --study") from None
    if study.user_attrs.get("format") != STUDY_FORMAT or "units" not in study.user_attrs:
        raise HwpruneError(f"study {name!r} in {where} was not written by this hwprune (no request recorded)")
    return study
