"""The three jobs as Python functions over typed requests: profile, search, export.

The CLI is a thin layer over these. Each validates everything it can *before* writing anything and
writes its outputs atomically, so a bad input never leaves a half-written run behind::

    from hwprune.api import ProfileRequest, SearchRequest, ExportRequest, run_profile, run_search, run_export
    from hwprune.search import SearchConfig

    prof = run_profile(ProfileRequest(model="minilm", out="latency_tables/local/minilm.parquet"))
    res = run_search(SearchRequest(model="minilm", table=str(prof.path), out="runs/minilm",
                                   search=SearchConfig(targets=(2.0,), trials=100)))
    manifests = run_export(ExportRequest(run="runs/minilm"))

Nothing here names a model family: every family-specific step goes through the adapter's
:class:`~hwprune.families.Family` hooks.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hwprune._io import check_writable, read_json, write_json
from hwprune.errors import HwpruneError
from hwprune.families import Family, resolve_model
from hwprune.latency.correction import CorrectedPredictor, corrected, decode_context_info, with_context_factor
from hwprune.latency.predictor import Predictor
from hwprune.latency.table import LatencyTable
from hwprune.proxies._base import CalibData, ProxyState
from hwprune.search.run import SearchConfig, SearchResult
from hwprune.search.storage import StudyStore, describe
from hwprune.search.study import study_key
from hwprune.space import PruningSpace

if TYPE_CHECKING:
    from torch import nn

    from hwprune.export.distill import DistillConfig

__all__ = [
    "ProfileRequest",
    "ProfileResult",
    "SearchRequest",
    "ExportRequest",
    "Manifest",
    "run_profile",
    "run_search",
    "run_export",
    "run_picks",
    "CalibrateRequest",
    "CalibrateResult",
    "run_calibrate",
    "load_adapter",
    "default_table_path",
    "find_table",
    "make_predictor",
]

Log = Callable[[str], None]
Manifest = dict[str, Any]  # a manifest.json document (see hwprune.export.manifest)
TABLES_DIR = Path("latency_tables")
RUN_FORMAT = "hwprune.run/2"


def _noop(msg: str) -> None:
    pass


def load_adapter(model: str, *, weights: str | None = None, input_shape: Sequence[int] | None = None) -> Family:
    """``--model`` (+ ``--weights`` / ``--input-shape`` for families that take them) -> its adapter."""
    return resolve_model(model).configure(
        weights=weights, input_shape=tuple(input_shape) if input_shape is not None else None
    )


def default_table_path(adapter: Family, *, runtime: str, threads: int, batch: int, seq: int) -> Path:
    return TABLES_DIR / f"{adapter.name}_{runtime}_t{threads}_b{batch}_{adapter.shape_tag(seq=seq)}.parquet"


def find_table(adapter: Family) -> tuple[Path | None, Path]:
    """(the table search uses by default if one exists, where a fresh local profile belongs):
    ``latency_tables/local/<name>`` (this machine's) first, then the shipped ``latency_tables/<name>``."""
    path = default_table_path(adapter, runtime="ort-cpu", threads=1, batch=1, seq=128)
    local = TABLES_DIR / "local" / path.name
    return next((p for p in (local, path) if p.is_file()), None), local


def make_predictor(
    table: LatencyTable,
    space: PruningSpace,
    adapter: Family,
    *,
    regime: str = "prefill",
    context: int | None = None,
    correct: bool = True,
    log: Log = _noop,
) -> CorrectedPredictor:
    """The table's predictor for this model (the family chooses: additive lookups, per-conv grids...).

    Prefill tables: times the table's context factor and, when ``correct``, with the calibration
    correction stored beside the table (:mod:`hwprune.latency.correction`); ``log`` gets one-time
    warnings about them. ``regime="decode"``: one new token after a KV cache of ``context`` positions,
    from a decode table (interpolated between its contexts; ``log`` gets the warning when ``context`` is
    outside them; no context factor or correction: those are measured on the prompt graph). A table of
    the other regime is refused in one line.
    """
    from hwprune.latency.predictor import ContextPredictor

    if table.family != adapter.family:
        raise HwpruneError(
            f"latency table {table.path or ''} was measured for a {table.family} model, not {adapter.family}"
        )
    table.check_regime(regime)
    if regime == "prefill":
        return corrected(adapter.predictor(table, space), table, log=log, correct=correct)
    if context is None:
        raise HwpruneError("a decode prediction needs the KV-cache length (context) to predict at")
    where = f"latency table {table.path.name}" if table.path else "the latency table"
    per = {c: with_context_factor(adapter.predictor(t, space), t) for c, t in table.per_context().items()}
    pred = ContextPredictor(per, context, where=where)
    if pred.warning:
        log(pred.warning)
    return CorrectedPredictor(pred, info=decode_context_info(table, log=log))


# ---- profile ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProfileRequest:
    """``hwprune profile``: which model, how to time it, where the table goes."""

    model: str = "minilm"
    runtime: str = "ort-cpu"
    threads: int = 1
    batch: int = 1
    seq: int = 128
    out: str | None = None  # default: latency_tables/<model>_<runtime>_t<threads>_b<batch>_<shape>.parquet
    space: str | None = None
    weights: str | None = None
    input_shape: tuple[int, ...] | None = None
    budget_s: float | None = None
    table_store: str | None = None  # also file the table in this registry (hwprune.latency.store) ...
    device: str | None = None  # ... under this device name
    regime: str = "prefill"  # or "decode": one new token after a KV cache of each of `contexts`
    contexts: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.budget_s is not None and not self.budget_s > 0:
            raise HwpruneError(f"--budget-s must be > 0 seconds (got {self.budget_s})")
        if self.threads < 1:
            raise HwpruneError(f"--threads must be >= 1 (got {self.threads})")


@dataclass(frozen=True)
class ProfileResult:
    table: LatencyTable
    path: Path
    dense_ms: float  # the dense model as the table predicts it (decode: at the first context; prefill: block
    # sum times the context factor)
    dense_block_sum_ms: float  # the bare sum of the table's blocks
    dense_by_context: dict[int, float] = field(default_factory=dict)  # decode tables: context -> dense ms


def run_profile(req: ProfileRequest, *, progress: bool = True) -> ProfileResult:
    """Profile ``req.model`` on this machine and save the table (parquet + JSON fingerprint)."""
    from hwprune.latency import profile

    adapter = load_adapter(req.model, weights=req.weights, input_shape=req.input_shape)
    batch, seq = adapter.io_settings(batch=req.batch, seq=req.seq)
    space = adapter.space(req.space)
    path = (
        Path(req.out)
        if req.out
        else default_table_path(adapter, runtime=req.runtime, threads=req.threads, batch=batch, seq=seq)
    )
    if req.regime == "decode" and not req.out:
        path = path.with_name(path.stem.rsplit("_", 1)[0] + f"_decode-c{'-'.join(map(str, req.contexts))}.parquet")
    if path.suffix != ".parquet":
        raise HwpruneError(f"-o {path}: a latency table is a .parquet file (its fingerprint goes beside it as .json)")
    check_writable(path, what="table")
    table = profile(
        adapter,
        runtime=req.runtime,
        threads=req.threads,
        batch=batch,
        seq=seq,
        space=space,
        out=path,
        progress=progress,
        budget_s=req.budget_s,
        regime=req.regime,
        contexts=req.contexts,
    )
    if req.table_store:
        from hwprune.latency.store import file_table

        file_table(table, req.table_store, device=req.device)
    if table.regime == "decode":
        by = {c: make_predictor(table, space, adapter, regime="decode", context=c).dense_ms() for c in table.contexts}
        first = by[table.contexts[0]]
        return ProfileResult(table=table, path=path, dense_ms=first, dense_block_sum_ms=first, dense_by_context=by)
    pred = make_predictor(table, space, adapter, correct=False)
    return ProfileResult(table=table, path=path, dense_ms=pred.dense_ms(), dense_block_sum_ms=pred.inner.dense_ms())


# ---- search -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SearchRequest:
    """``hwprune search``: the model, its table, the proxy and data, and the search settings (embedded)."""

    model: str = "minilm"
    table: str | None = None
    proxy: str = "obs"
    calib: str | None = None
    space: str | None = None
    n_calib: int | None = None  # None: the family's default (``Family.search_defaults``)
    n_heldout: int | None = None  # the selection split: what the search's end-to-end score sees
    n_report: int | None = None  # the report split, held back from the search (manifests score picks on it)
    out: str = "runs/latest"
    weights: str | None = None
    input_shape: tuple[int, ...] | None = None
    search: SearchConfig = field(default_factory=lambda: SearchConfig(targets=(2.0,), margin=0.01))
    device: str | None = None  # instead of table: this device's table in the registry table_store
    table_store: str | None = None  # default latency_tables/store
    regime: str = "prefill"  # prefill | decode | serve (hwprune.search.workload)
    workload: str | None = None  # "prompt=512,new=128,batch=1"; needed for decode and serve
    decode_table: str | None = None  # serve: the decode table beside the prefill one (table)

    def to_json(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "search"}
        d["input_shape"] = list(self.input_shape) if self.input_shape is not None else None
        d["search"] = self.search.to_json()
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "SearchRequest":
        d = dict(d)
        if "search" not in d:  # hwprune.run/1: search settings were top-level keys
            d.pop("extra", None)
            d["search"] = {k: d.pop(k) for k in ("targets", "trials", "seed", "margin") if k in d}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise HwpruneError(f"search request: unknown key {unknown[0]!r}; known: {', '.join(sorted(known))}")
        d["search"] = SearchConfig.from_json(d["search"])
        if d.get("input_shape") is not None:
            d["input_shape"] = tuple(d["input_shape"])
        return cls(**d)


def _resolve_table(adapter: Family, req_table: str | None) -> Path:
    if req_table:
        return Path(req_table)
    found, _ = find_table(adapter)
    if found is not None:
        return found
    path = default_table_path(adapter, runtime="ort-cpu", threads=1, batch=1, seq=128)
    raise HwpruneError(
        f"no latency table for {adapter.name} at {path}; run `hwprune profile --model "
        f"{adapter.name}` first or pass --table FILE"
    )


def _calib(adapter: Family, req: SearchRequest, *, seq: int) -> CalibData:
    assert req.n_calib is not None and req.n_heldout is not None  # with_defaults ran
    return adapter.load_calib(
        req.calib,
        n_calib=req.n_calib,
        n_heldout=req.n_heldout,
        n_report=req.n_report or 0,
        seq=seq,
        seed=req.search.seed,
    )


def with_defaults(req: SearchRequest, adapter: Family) -> SearchRequest:
    """``req`` with every setting left None filled from the family's ``search_defaults``."""
    d = adapter.search_defaults
    search = req.search if req.search.trials is not None else dataclasses.replace(req.search, trials=d["trials"])
    return dataclasses.replace(
        req,
        n_calib=req.n_calib if req.n_calib is not None else d["n_calib"],
        n_heldout=req.n_heldout if req.n_heldout is not None else d["n_heldout"],
        # a user's --calib file is not shrunk behind their back: it holds texts back only when asked
        n_report=req.n_report if req.n_report is not None else (d.get("n_report", 0) if req.calib is None else 0),
        search=search,
    )


def run_search(
    req: SearchRequest, *, log: Log = _noop, progress: bool = True, store: StudyStore | None = None
) -> SearchResult:
    """Validate every input, then: table -> predictor, calibration -> proxy + scorer, DP + NSGA-II.

    Nothing is written to ``req.out`` until all inputs have been checked and every target is known to
    be reachable; the chosen subnet per target is then materialised under ``candidates/<key>/``.
    ``store``: the study this worker joins (default ``<out>/study.db``; see :mod:`hwprune.search.storage`).
    """
    from hwprune.proxies._base import get_proxy
    from hwprune.search.run import check_reachable, search

    check_writable(req.out, what="run folder")
    adapter = load_adapter(req.model, weights=req.weights, input_shape=req.input_shape)
    req = with_defaults(req, adapter)
    space = adapter.space(req.space)
    if req.device:
        from hwprune.latency.store import for_device

        registry = req.table_store or str(TABLES_DIR / "store")
        table_path = for_device(registry, device=req.device, model=adapter.name, shape_key=adapter.shape_key())
    else:
        table_path = _resolve_table(adapter, req.table)
    table = LatencyTable.load(table_path)
    table.check_model(adapter)
    settings = dict(table.settings)
    for w in table.machine_warnings(settings.get("runtime", "ort-cpu"), int(settings.get("threads", 1))):
        log(w)
    predictor, workload, calib_seq = _objective(req, table, space, adapter, log)
    get_proxy(req.proxy, adapter.family)  # unknown proxy -> error before any work
    check_reachable(req.search, predictor)
    calib = _calib(adapter, req, seq=calib_seq)
    state = adapter.fit_proxy(req.proxy, space, calib)
    scorer = adapter.scorer(calib)
    run_dir = Path(req.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    run_doc = {
        "format": RUN_FORMAT,
        "request": req.to_json(),
        "adapter": adapter.spec(),
        "table": str(table_path),
        "space_source": space.source,
        "settings": settings,
        "fingerprint": table.fingerprint.to_json(),
        "calib_source": calib.source,
        "latency_model": _latency_model(predictor),  # not in the study key: latency is re-predicted, scores are not
        "data": calib.splits,  # corpus, domains and the three splits' sizes (calibration, selection, report)
    }
    if workload is not None:
        run_doc["workload"] = workload
    store = store or StudyStore()
    write_json(run_dir / "run.json", {**run_doc, "storage": describe(store.resolved(run_dir)), "study": store.name})
    result = search(
        space=space,
        predictor=predictor,
        proxy_state=state,
        scorer=scorer,
        config=req.search,
        run_dir=run_dir,
        progress=progress,
        store=store,
        key=study_key(run_doc, space),
        request=run_doc,
    )
    _materialize_picks(adapter, state, result, run_dir)
    if workload is not None:
        from hwprune.search.workload import WorkloadMix, WorkloadPredictor, describe_pick

        assert isinstance(predictor, (WorkloadPredictor, WorkloadMix))
        picks = {
            str(t): {"key": ev.candidate.key(), **describe_pick(predictor, ev.candidate, space.dense())}
            for t, ev in result.picks.items()
        }
        write_json(run_dir / "workload.json", {**workload, "picks": picks})
    return result


def _report_scores(
    adapter: Family, sreq: SearchRequest, models: Mapping[str, nn.Module], *, seq: int
) -> dict[str, dict[str, float]]:
    """Each model's end-to-end scores on the run's report split (none when the run held none back)."""
    if not sreq.n_report or sreq.n_calib is None:
        return {}
    scorer = adapter.scorer(_calib(adapter, sreq, seq=seq).for_report())
    return {k: dict(scorer.score(m)) for k, m in models.items()}


def _objective(
    req: SearchRequest, table: LatencyTable, space: PruningSpace, adapter: Family, log: Log
) -> tuple[Predictor, dict[str, Any] | None, int]:
    """(what the search minimises, the workload for run.json, the calibration sequence length).

    Without ``--workload``: the prefill table's prompt latency, as before issue 9. With it: the regime's
    objective for that request (:mod:`hwprune.search.workload`); tables of the wrong regime, batch or
    prompt length are refused in one line, contexts outside a decode table's grid warned about.
    """
    from hwprune.search.workload import REGIMES, parse_workloads, workload_predictor

    if req.regime not in REGIMES:
        raise HwpruneError(f"--regime {req.regime!r} is not one of {', '.join(REGIMES)}")
    if req.workload is None:
        if req.regime != "prefill":
            raise HwpruneError(f"--regime {req.regime} needs --workload, e.g. prompt=512,new=128,batch=1")
        return make_predictor(table, space, adapter), None, int(table.settings.get("seq", 128))
    wls = parse_workloads(req.workload, req.regime)
    tables = {"decode" if req.regime == "decode" else "prefill": table}
    if req.regime == "serve":
        if not req.decode_table:
            raise HwpruneError(
                "--regime serve needs a decode table too (--decode-table), beside the prefill --table; make one "
                "with hwprune profile --regime decode --context 128,512,1024"
            )
        tables["decode"] = LatencyTable.load(req.decode_table)
    elif req.decode_table:
        raise HwpruneError(f"--decode-table is for --regime serve; with --regime {req.regime} give one --table")
    for r, t in tables.items():
        t.check_model(adapter)
        # family and regime checked; a decode table without context factors says so here, once (a prefill
        # table's correction is not used by a workload, so its warnings are not said)
        ctx = t.contexts[0] if t.contexts else None
        make_predictor(t, space, adapter, regime=r, context=ctx, log=log if r == "decode" else _noop)
    # each table's context factor (a decode table's per context), no calibration correction: that is
    # fitted to prompt exports
    pred = workload_predictor(
        req.regime, wls, tables=tables, predictor=lambda t: with_context_factor(adapter.predictor(t, space), t)
    )
    for w in pred.warnings:
        log(w)
    # calibration reads sequences as long as the prompts the model will serve (at most 256 tokens)
    longest = max(w.prompt for w in wls)
    calib_seq = int(tables["prefill"].settings.get("seq", 128)) if "prefill" in tables else min(longest, 256)
    shape = wls[0].to_json() if len(wls) == 1 else {"workloads": [w.to_json() for w in wls]}
    doc = {"regime": req.regime, **shape, "tables": {r: str(t.path) for r, t in tables.items()}}
    doc["fingerprints"] = {r: t.fingerprint.to_json() for r, t in tables.items()}
    return pred, doc, calib_seq


def run_picks(store: StudyStore, *, out: str) -> SearchResult:
    """``hwprune picks``: the front and one pick per target from a study, written as a run directory
    that ``run_export`` reads; nothing is searched."""
    return run_device_picks(store, out=out)[""]


def run_device_picks(
    store: StudyStore, *, out: str, devices: Sequence[str] = (), table_store: str | None = None
) -> dict[str, SearchResult]:
    """``hwprune picks --device A --device B``: one study, a front and picks per device.

    ``""`` is the study's own table, written to ``out``; each device's table comes from the registry
    (``table_store``) and its run directory is ``out/<device>`` (``hwprune export out/<device>`` on that
    device). With devices, ``out/pareto_devices.png`` draws every front.
    """
    from hwprune.latency.store import for_device
    from hwprune.search.front import plot_fronts, read_front, repredict
    from hwprune.search.run import write_outputs

    base, run, _ = read_front(store, out=out)
    results = {"": base}
    if not devices:
        return results
    sreq = SearchRequest.from_json(run["request"])
    adapter = load_adapter(sreq.model, weights=sreq.weights, input_shape=sreq.input_shape)
    registry = table_store or str(TABLES_DIR / "store")
    space = base.pareto.space
    for device in devices:
        path = for_device(registry, device=device, model=adapter.name, shape_key=adapter.shape_key())
        table = LatencyTable.load(path)
        table.check_model(adapter)
        predictor = make_predictor(table, space, adapter)
        dest = Path(out) / Path(path).parent.name.split("--")[0]
        res = repredict(base, predict=predictor.predict, dense_ms=float(predictor.dense_ms()), out=dest)
        dest.mkdir(parents=True, exist_ok=True)
        doc = {**run, "table": str(path), "settings": dict(table.settings), "fingerprint": table.fingerprint.to_json()}
        write_json(
            dest / "run.json", {**doc, "device": device, "storage": describe(str(store.url)), "study": store.name}
        )
        write_outputs(res)
        results[device] = res
    plot_fronts({"study's table": base, **{d: r for d, r in results.items() if d}}, Path(out) / "pareto_devices.png")
    return results


def _materialize_picks(adapter: Family, state: ProxyState, result: SearchResult, run_dir: Path) -> None:
    import hwprune
    from hwprune._io import atomic_dir

    for ev in result.picks.values():
        dest = run_dir / "candidates" / ev.candidate.key()
        plan, overrides = state.materialize(ev.candidate)
        model = adapter.prune(adapter.dense(), plan, overrides)
        with atomic_dir(dest) as tmp:
            hwprune.save(model, plan, tmp)


# ---- export -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportRequest:
    """``hwprune export``: which candidates of a run, the parity tolerance, how long to time."""

    run: str
    pick: str = "targets"  # targets | all (the Pareto front) | a candidate key from pareto.csv
    parity_tol: float | None = None  # None: the family's default (Family.parity_tol)
    rounds: int = 5
    repeats: int | None = None  # None: from the dense model's time (hwprune.export.measure.timing_plan)
    # re-timings of a pair whose dense model lands > 5 % from the table (hwprune.export.measure, "Host state")
    host_retries: int = 3
    # recovery distillation before export (hwprune.export.distill); steps 0: off
    distill_steps: int = 0
    distill_lr: float = 5e-4
    distill_batch: int = 16
    distill_samples: int = 1024

    def __post_init__(self) -> None:
        self.distill_config()  # validates
        if self.parity_tol is not None and self.parity_tol < 0:
            raise HwpruneError(f"--parity-tol must be >= 0 (got {self.parity_tol})")
        if self.rounds < 1 or (self.repeats is not None and self.repeats < 1):
            raise HwpruneError(f"rounds and repeats must be >= 1 (got {self.rounds}, {self.repeats})")
        if self.host_retries < 0:
            raise HwpruneError(f"--host-retries must be >= 0 (got {self.host_retries}); 0 times each pair once")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def distill_config(self) -> "DistillConfig":
        from hwprune.export.distill import DistillConfig

        return DistillConfig(
            steps=self.distill_steps, lr=self.distill_lr, batch=self.distill_batch, samples=self.distill_samples
        )


def _read_run(run_dir: Path) -> dict[str, Any]:
    p = run_dir / "run.json"
    if not p.is_file():
        raise HwpruneError(f"{run_dir} is not a search run (no run.json); run `hwprune search -o {run_dir}` first")
    try:
        run = read_json(p)
    except (ValueError, OSError):  # not JSON, not UTF-8, unreadable
        raise HwpruneError(f"{p} is corrupt (not JSON); re-run the search") from None
    fmt = run.get("format") if isinstance(run, dict) else None
    ours = isinstance(fmt, str) and fmt.startswith("hwprune.run/")
    if not (ours and isinstance(run.get("request"), dict) and isinstance(run.get("table"), str)):
        raise HwpruneError(
            f"{p} is not a hwprune run file (format {fmt!r}, expected {RUN_FORMAT!r} with a request and a table); "
            f"point export at a folder written by `hwprune search -o DIR`"
        )
    return run


def _corrupt(path: Path, e: Exception) -> HwpruneError:
    why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return HwpruneError(f"{path} is corrupt ({why}); re-run the search with the same -o to rewrite it")


def _read_picks(path: Path) -> list[dict[str, Any]]:
    """picks.json as rows (one per target); a corrupt file is one line naming it."""
    try:
        picks = [{**p, "target_speedup": p.get("target")} for p in read_json(path)["picks"].values()]
        for p in picks:
            if not (isinstance(p["key"], str) and isinstance(p["sizes"], dict)):
                raise ValueError("a pick lacks its key or sizes")
    except (ValueError, KeyError, TypeError, AttributeError, OSError) as e:
        raise _corrupt(path, e) from None
    return picks


def _selection(run_dir: Path, pick: str) -> list[dict[str, Any]]:
    """Rows to export: each has key, sizes (unit -> size), predicted_ms, target_speedup, scores."""
    import pandas as pd

    picks_path = run_dir / "picks.json"
    picks = _read_picks(picks_path) if picks_path.is_file() else []  # keyed by target; one row per target
    if pick == "targets":
        if not picks:
            raise HwpruneError(f"{run_dir} has no picks.json; the search did not finish — re-run it to resume")
        return picks
    csv = run_dir / "pareto.csv"
    if not csv.is_file():
        raise HwpruneError(f"{run_dir} has no pareto.csv; the search did not finish — re-run it to resume")
    try:
        df = pd.read_csv(csv, dtype={"key": str})
        rows = df[df["pareto"]] if pick == "all" else df[df["key"] == pick]
        by_key = {p["key"]: p for p in picks}
        out = []
        for _, r in rows.iterrows():
            sc = {k: float(r[k]) for k in ("distance", "cosine") if k in r and r[k] == r[k]}
            row = by_key.get(r["key"]) or {
                "key": str(r["key"]),
                "sizes": json.loads(r["sizes"]),
                "predicted_ms": float(r["predicted_ms"]),
                "target_speedup": None,
                "scores": sc,
            }
            if not isinstance(row["sizes"], dict):
                raise ValueError(f"row {r['key']}: sizes is not a JSON object")
            out.append(row)
    except (ValueError, KeyError, TypeError, OSError) as e:  # pandas' parser errors are ValueErrors
        raise _corrupt(csv, e) from None
    if not out:
        raise HwpruneError(
            f"--pick {pick!r} matches no candidate in {csv}; use targets, all or a key from its 'key' column"
        )
    return out


def _measure_serving(
    adapter: Family,
    models: Mapping[str, tuple[Any, Any]],
    wls: Sequence[Any],
    regime: str,
    backend: Any,
    req: ExportRequest,
    predictor: Predictor,
    log: Log = _noop,
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Decode/serve runs: the dense and every candidate's decode graph timed together
    (:func:`~hwprune.export.workload_timing.measure_workload`), once per workload of the request; per key
    its :class:`Measurement` of the regime's objective (decode: the mean decode step, i.e. 1 /
    tokens-per-second; serve: the request; a mix: their weighted mean, as the search minimised it) and the
    manifest's ``extra.workload`` (measured and predicted TTFT, tokens/s, request ms, dense beside). While the
    dense model's objective lands more than 5 % from its prediction, everything is timed again
    (``--host-retries``; ``extra.workload.host_check`` lists the attempts)."""
    from hwprune.export.measure import DENSE, Measurement, host_check_json, host_check_note, host_pauses, host_retry
    from hwprune.export.workload_timing import decode_graph, measure_workloads
    from hwprune.search.workload import WorkloadMix, WorkloadPredictor

    graphs = {DENSE: decode_graph(adapter, adapter.dense())}
    graphs.update({k: decode_graph(adapter, m) for k, (m, _) in models.items()})
    repeats = req.repeats if req.repeats is not None else 10
    objective = "decode_step_ms" if regime == "decode" else "request_ms"
    total = sum(wl.weight for wl in wls)

    def of(timed: Sequence[Mapping[str, Any]], key: str) -> float:
        return float(sum(wl.weight / total * t[key][objective] for wl, t in zip(wls, timed)))

    def once() -> list[dict[str, Any]]:  # in an ORT-only process
        return measure_workloads(backend, graphs, wls, rounds=req.rounds, repeats=repeats)

    # timed again while the dense model's objective lands > 5 % from its table (the host busier than profiled)
    expected = predictor.dense_ms()
    per, attempts, used, within = host_retry(once, lambda t: of(t, DENSE), expected, host_pauses(req.host_retries))

    def mixed(key: str) -> float:
        return of(per, key)

    assert isinstance(predictor, (WorkloadPredictor, WorkloadMix))
    space = predictor.space
    method = (
        "decode graphs (decoder.onnx) of dense and candidates in one new process that runs ONNX Runtime only, "
        "two sessions each in mirrored "
        "creation order, shuffled interleaved rounds: the "
        "prompt with an empty cache (TTFT) and one token after the request's first, middle and last contexts; "
        "the mean step interpolated between them"
    )
    checks = {k: host_check_json(expected, [(of(t, DENSE), of(t, k)) for t in attempts], used, within) for k in models}
    note = host_check_note("every candidate", next(iter(checks.values()), None))
    if note:
        log(note)
    control = max((t[DENSE]["control_pct"] for t in per), key=abs)  # dense-vs-dense, the worst workload's
    measured, docs = {}, {}
    for k, (_, plan) in models.items():
        measured[k] = Measurement(measured_ms=mixed(k), dense_ms=mixed(DENSE), clock=backend.clock, control_pct=control)
        doc: dict[str, Any] = {
            "regime": regime,
            "objective": objective,
            "predicted": predictor.breakdown(plan.candidate(space)),
            "dense_predicted": predictor.breakdown(space.dense()),
            "method": method,
            "host_check": checks[k],
        }
        if len(wls) == 1:
            doc.update({**wls[0].to_json(), "measured": per[0][k], "dense_measured": per[0][DENSE]})
        else:
            doc["workloads"] = [
                {**wl.to_json(), "measured": t[k], "dense_measured": t[DENSE]} for wl, t in zip(wls, per)
            ]
            doc["measured_objective_ms"], doc["dense_measured_objective_ms"] = mixed(k), mixed(DENSE)
            doc["method"] += "; each workload timed in its own rounds, the objective their weighted mean"
        docs[k] = doc
    return measured, docs


def run_export(req: ExportRequest, *, progress: bool = True, log: Log = _noop) -> list[Manifest]:
    """Export the selected candidates of a run: plan + safetensors + ONNX + parity + measured latency.

    Each selected candidate is timed with the dense model in its own interleaved rounds, in one process
    (:func:`hwprune.export.measure.measure_pairs`: four sessions, as the profile's context anchors), so
    every manifest's measured speedup compares numbers taken under the same conditions, and its
    milliseconds do not depend on how many candidates were exported together. Predictions
    use the table's context factor and stored correction (the manifest's ``latency_model`` says which);
    each predicted-vs-measured pair is appended to the table's history (``hwprune tables show``).
    """
    import hwprune
    from hwprune.export.candidate import candidate_onnx, export_candidate, timing_feed
    from hwprune.export.manifest import Prediction
    from hwprune.export.measure import Measurement, host_check_note, host_pauses, measure_pairs
    from hwprune.latency import get_backend
    from hwprune.space import Candidate
    from hwprune.surgery.plan import Plan

    run_dir = Path(req.run)
    run = _read_run(run_dir)
    sreq = SearchRequest.from_json(run["request"])
    rows = _selection(run_dir, req.pick)
    adapter = load_adapter(sreq.model, weights=sreq.weights, input_shape=sreq.input_shape)
    space = adapter.space(sreq.space)
    table = LatencyTable.load(run["table"])
    settings = dict(table.settings)
    for w in table.machine_warnings(settings.get("runtime", "ort-cpu"), int(settings.get("threads", 1))):
        log(w)
    serving = sreq.regime != "prefill"
    predictor: Predictor
    if serving:  # the search's own objective: from the tables it used, measured on the decode graphs
        from hwprune.search.workload import parse_workloads

        wls = parse_workloads(str(sreq.workload), sreq.regime)
        predictor, _, calib_seq = _objective(
            dataclasses.replace(sreq, table=run["table"]), table, space, adapter, _noop
        )
        batch = wls[0].batch  # a mix shares it
        seq = int(settings["seq"]) if sreq.regime == "serve" else wls[0].prompt  # parity, params, FLOPs
    else:
        predictor = make_predictor(table, space, adapter, log=log)
        batch, seq = int(settings.get("batch", 1)), int(settings.get("seq", 128))
        calib_seq = seq
    backend = get_backend(settings.get("runtime", "ort-cpu"), threads=int(settings.get("threads", 1)))
    state: ProxyState | None = None
    models = {}
    dcfg = req.distill_config()
    for row in rows:
        key, folder = row["key"], run_dir / "candidates" / row["key"]
        # distillation starts from the search's weights, never from an earlier export's (maybe distilled)
        if (folder / "model.safetensors").is_file() and not dcfg.enabled:
            models[key] = (hwprune.load(folder), Plan.load(folder / "plan.json"))
            continue
        if state is None:
            # the search's calibration, so the pruned weights are the ones it scored
            state = adapter.fit_proxy(sreq.proxy, space, _calib(adapter, sreq, seq=calib_seq))
        plan, overrides = state.materialize(Candidate.from_json({"sizes": row["sizes"]}, space))
        models[key] = (adapter.prune(adapter.dense(), plan, overrides), plan)
    nets = {k: m for k, (m, _) in models.items()}
    distilled = _distill_models(adapter, sreq, nets, dcfg, seq=calib_seq, log=log)  # in place, before scoring
    report = _report_scores(adapter, sreq, nets, seq=calib_seq)
    measured: dict[str, Measurement] = {}
    serve_doc: dict[str, dict[str, Any]] = {}
    if serving:
        measured, serve_doc = _measure_serving(adapter, models, wls, sreq.regime, backend, req, predictor, log)
    else:
        onnx = {k: candidate_onnx(adapter, m, batch=batch, seq=seq) for k, (m, _) in models.items()}
        dense_onnx = candidate_onnx(adapter, adapter.dense(), batch=batch, seq=seq)
        # each candidate in its own rounds with the dense model: the context its table predicts
        cmps = measure_pairs(
            backend,
            dense=dense_onnx,
            pruned=onnx,
            feed=timing_feed(adapter, batch=batch, seq=seq),
            rounds=req.rounds,
            repeats=req.repeats,
            # a pair timed while the host ran slower than the table describes is timed again
            dense_expected_ms=predictor.dense_ms(),
            host_pauses_s=host_pauses(req.host_retries),
        )
        measured = {k: Measurement.of(cmps[k], k, clock=backend.clock) for k in models}
        for k, cmp in cmps.items():
            note = host_check_note(k, cmp.settings.get("host_check"))
            if note:
                log(note)
    manifests = []
    corr = predictor if isinstance(predictor, CorrectedPredictor) else None
    for row in rows:
        key = row["key"]
        model, plan = models[key]
        cand = plan.candidate(space)
        prediction = Prediction(
            predicted_ms=predictor.predict(cand),
            dense_predicted_ms=predictor.dense_ms(),
            target_speedup=row.get("target_speedup"),
            base_predicted_ms=corr.base_predict(cand) if corr else None,
            dense_base_predicted_ms=corr.base_predict(space.dense()) if corr else None,
            latency_model=_latency_model(predictor),
        )
        extra = {"key": key, "run": str(run_dir), "proxy": sreq.proxy, "table": run["table"]}
        # ``scores`` are on the selection split, which chose the pick; ``report_scores`` on texts it never saw
        extra.update({"scores_split": "selection", "data": run.get("data"), "report_scores": report.get(key)})
        if serving:
            extra["workload"] = serve_doc[key]
        if key in distilled:
            extra["distill"] = distilled[key]
        m = export_candidate(
            adapter,
            model,
            plan,
            run_dir / "candidates" / key,
            backend=backend,
            batch=batch,
            seq=seq,
            measurement=measured[key],
            prediction=prediction,
            # distilled: its selection scores now (the search's are in distill.selection_before)
            scores=distilled[key]["selection_after"] if key in distilled else row.get("scores"),
            fingerprint=table.fingerprint.to_json(),
            parity_tol=req.parity_tol if req.parity_tol is not None else adapter.parity_tol,
            extra=extra,
        )
        m.setdefault("key", key)
        manifests.append(m)
    write_json(run_dir / "exports.json", {"pick": req.pick, "manifests": manifests})
    if manifests and corr is not None:  # prompt-graph runs: the table's own prediction vs its measurement
        hist = [(str(m["key"]), m["predicted_ms"], float(m["measured_ms"])) for m in manifests]
        hist.append(("dense", manifests[0]["dense_predicted_ms"], float(manifests[0]["dense_measured_ms"])))
        _record_history(table, hist, source=f"export {run_dir}", correction=corr.info["correction"], log=log)
    return manifests


def _distill_models(
    adapter: Family,
    sreq: SearchRequest,
    models: Mapping[str, nn.Module],
    cfg: "DistillConfig",
    *,
    seq: int,
    log: Log,
) -> dict[str, dict[str, Any]]:
    """Recovery-distil each model in place on the run's calibration split drawn ``cfg.samples`` large
    (selection and report stay out: :mod:`hwprune.proxies.calib` draws them first); per key the
    manifest's ``distill`` record, with the selection scores before and after."""
    if not cfg.enabled or not models:
        return {}
    from hwprune.export.distill import distill

    data = _calib(adapter, dataclasses.replace(sreq, n_calib=cfg.samples), seq=seq)
    scorer = adapter.scorer(data)  # the selection split: what chose the pick
    out = {}
    for key, model in models.items():
        before = dict(scorer.score(model))
        doc = distill(adapter, model, data.calib, cfg)
        doc.update(selection_before=before, selection_after=dict(scorer.score(model)))
        log(
            f"distilled {key}: {cfg.steps} steps on {doc['rows']} calibration rows in {doc['seconds']:.0f} s, "
            f"loss {doc['loss_first']:.4g} -> {doc['loss_last']:.4g}"
        )
        out[key] = doc
    return out


def _latency_model(predictor: Predictor) -> dict[str, Any] | None:
    """The context factor and correction a prefill prediction used (None for a workload's objective)."""
    return predictor.info if isinstance(predictor, CorrectedPredictor) else None


def _record_history(
    table: LatencyTable,
    rows: Sequence[tuple[str, float | None, float]],
    *,
    source: str,
    correction: Mapping[str, Any] | None,
    log: Log,
) -> None:
    """Append (key, predicted ms, measured ms) rows to the table's history (``hwprune tables show``).
    A table folder we may not write (a shared, read-only one) costs a warning, never the export."""
    import datetime as _dt

    from hwprune.latency.store import append_history

    if table.path is None:
        return
    when = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    entries = [
        {
            "when": when,
            "key": key,
            "predicted_ms": pred,
            "measured_ms": meas,
            "error_pct": 100.0 * (pred - meas) / meas,
            "source": source,
            "correction": f"v{correction['version']}" if correction else None,
        }
        for key, pred, meas in rows
        if pred is not None
    ]
    try:
        append_history(table.path, entries)
    except (OSError, HwpruneError) as e:
        log(f"could not record predicted vs measured in the table's history ({e}); the export itself is complete")


# ---- calibrate ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CalibrateRequest:
    """``hwprune calibrate``: exported runs of one table; re-measure them here or trust their manifests."""

    runs: tuple[str, ...]
    remeasure: bool = False
    rounds: int = 5
    repeats: int | None = None  # None: from the dense model's time (hwprune.export.measure.timing_plan)

    def __post_init__(self) -> None:
        if not self.runs:
            raise HwpruneError("give at least one run folder: hwprune calibrate runs/NAME [runs/OTHER...]")
        if self.rounds < 1 or (self.repeats is not None and self.repeats < 1):
            raise HwpruneError(f"rounds and repeats must be >= 1 (got {self.rounds}, {self.repeats})")


@dataclass(frozen=True)
class CalibrateResult:
    correction: Any  # hwprune.latency.correction.Correction
    path: Path  # where it was written
    table: Path
    points: list[Any]  # hwprune.export.calibrate.Point, as fitted
    measure: Mapping[str, Any] | None  # the re-measurement's settings and control (None: manifests)


def run_calibrate(req: CalibrateRequest, *, log: Log = _noop) -> CalibrateResult:
    """Fit ``measured = scale * base_predicted + offset`` over the exported candidates (and dense
    models) of ``req.runs`` and store it beside their table (:mod:`hwprune.latency.correction`);
    ``search`` and ``export`` then predict with it. Every run must come from the same table and model."""
    from hwprune.export.calibrate import remeasure, run_points
    from hwprune.latency import get_backend
    from hwprune.latency.correction import Correction, fit_affine, load_correction, save_correction
    from hwprune.latency.fingerprint import DeviceFingerprint

    docs = [(Path(r), _read_run(Path(r))) for r in req.runs]
    first_dir, first = docs[0]
    table = LatencyTable.load(first["table"])
    for r, doc in docs[1:]:
        if doc.get("adapter") != first.get("adapter"):
            raise HwpruneError(
                f"{r} searched another model than {first_dir} ({doc.get('adapter')} vs {first.get('adapter')}); "
                "calibrate the runs of one model and table at a time"
            )
        other = LatencyTable.load(doc["table"])
        if other.digest() != table.digest():
            raise HwpruneError(
                f"{r} was searched with table {doc['table']}, {first_dir} with {first['table']}; "
                "calibrate the runs of one table at a time"
            )
    sreq = SearchRequest.from_json(first["request"])
    adapter = load_adapter(sreq.model, weights=sreq.weights, input_shape=sreq.input_shape)
    table.check_model(adapter)
    for r, doc in docs:
        regime = SearchRequest.from_json(doc["request"]).regime
        if regime != "prefill":
            raise HwpruneError(
                f"{r} was searched with --regime {regime}: calibrate fits prompt-latency tables from prefill "
                "runs only (a decode or serve run is measured on its decode graph)"
            )
    points = []
    for r, doc in docs:
        space = adapter.space(SearchRequest.from_json(doc["request"]).space)
        points += run_points(r, space=space, predictor=make_predictor(table, space, adapter, correct=False))
    settings = dict(table.settings)
    runtime, threads = str(settings.get("runtime", "ort-cpu")), int(settings.get("threads", 1))
    batch, seq = int(settings.get("batch", 1)), int(settings.get("seq", 128))
    measure: Mapping[str, Any] | None = None
    if req.remeasure:
        for w in table.machine_warnings(runtime, threads):
            log(w)
        points, measure = remeasure(
            points,
            adapter=adapter,
            backend=get_backend(runtime, threads=threads),
            batch=batch,
            seq=seq,
            rounds=req.rounds,
            repeats=req.repeats,
        )
        for w in measure["warnings"]:
            log(w)
    fit = fit_affine([p.base_predicted_ms for p in points], [p.measured_ms for p in points])
    try:
        old = load_correction(table.path) if table.path else None
    except HwpruneError as e:
        log(f"{e}; replacing it")
        old = None
    here = DeviceFingerprint.current(
        runtime, threads=threads, batch=batch, seq=seq, dtype=str(settings.get("dtype", "float32"))
    )
    corr = Correction(
        fit=fit,
        version=old.version + 1 if old else 1,
        table={
            "path": str(table.path),
            "digest": table.digest(),
            "created": table.created,
            "model": table.model,
            "shape_key": table.shape_key,
        },
        # manifests: the export machine (this table's); re-measured: this one
        fingerprint=here.to_json() if req.remeasure else table.fingerprint.to_json(),
        source="remeasured" if req.remeasure else "manifests",
        runs=tuple(str(r) for r, _ in docs),
        points=tuple(p.to_json() for p in points),
        previous=(_without_path(old.summary()), *old.previous) if old else (),
    )
    path = save_correction(table, corr)
    if req.remeasure and table.path is not None:
        _record_history(
            table,
            [(p.key, p.base_predicted_ms, p.measured_ms) for p in points],
            source=f"calibrate --remeasure {' '.join(req.runs)} (before the new fit)",
            correction=None,
            log=log,
        )
    return CalibrateResult(correction=corr, path=path, table=Path(str(table.path)), points=points, measure=measure)


def _without_path(d: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k != "path"}
