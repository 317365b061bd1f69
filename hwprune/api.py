"""The three jobs as Python functions: profile, search, export. The CLI is a thin layer over these.

Each takes plain arguments (or a config), validates everything it can *before* writing anything,
and writes its outputs atomically, so a bad input never leaves a half-written run behind.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from hwprune._io import read_json, write_json
from hwprune.errors import HwpruneError
from hwprune.models import ModelAdapter, resolve_model

__all__ = ["default_table_path", "run_profile", "SearchRequest", "run_search", "run_export", "load_adapter"]

Log = Callable[[str], None]
TABLES_DIR = Path("latency_tables")


def _noop(msg: str) -> None:
    pass


def load_adapter(model: str, *, weights: str | None = None, input_shape: Sequence[int] | None = None) -> ModelAdapter:
    kw: dict[str, Any] = {}
    if weights is not None:
        kw["weights"] = weights
    if input_shape is not None:
        kw["input_shape"] = tuple(input_shape)
    adapter = resolve_model(model)
    if kw:
        configure = getattr(adapter, "configure", None)
        if configure is None:
            raise HwpruneError(f"--weights/--input-shape apply to CNN models; {model!r} does not take them")
        adapter = configure(**kw)
    return adapter


def default_table_path(adapter: ModelAdapter, *, runtime: str, threads: int, batch: int, seq: int) -> Path:
    tag = getattr(adapter, "shape_tag", None)
    shape = tag() if callable(tag) else f"s{seq}"
    return TABLES_DIR / f"{adapter.name}_{runtime}_t{threads}_b{batch}_{shape}.parquet"


def run_profile(model: str, *, runtime: str = "ort-cpu", threads: int = 1, batch: int = 1, seq: int = 128,
                out: str | Path | None = None, space_file: str | Path | None = None,
                weights: str | None = None, input_shape: Sequence[int] | None = None,
                progress: bool = True, budget_s: float | None = None) -> tuple[Any, Path, float]:
    """Profile ``model`` on this machine; returns (table, parquet path, predicted dense ms)."""
    from hwprune.latency import profile

    if batch < 1 or seq < 1:
        raise HwpruneError(f"--batch and --seq must be >= 1 (got batch={batch}, seq={seq})")
    adapter = load_adapter(model, weights=weights, input_shape=input_shape)
    if adapter.family == "cnn":  # images: batch comes from --input-shape, there is no sequence
        batch, seq = int(getattr(adapter, "input_shape")[0]), 0
    space = adapter.space(space_file)
    path = Path(out) if out else default_table_path(adapter, runtime=runtime, threads=threads, batch=batch, seq=seq)
    if path.suffix != ".parquet":
        raise HwpruneError(f"-o {path}: a latency table is a .parquet file (its fingerprint goes beside it as .json)")
    if budget_s is not None and budget_s <= 0:
        raise HwpruneError(f"--budget-s must be > 0 seconds (got {budget_s})")
    table = profile(adapter, runtime=runtime, threads=threads, batch=batch, seq=seq, space=space, out=path,
                    progress=progress, budget_s=budget_s)
    return table, path, make_predictor(table, space, adapter).dense_ms()


@dataclass(frozen=True)
class SearchRequest:
    model: str = "minilm"
    table: str | None = None
    targets: tuple[float, ...] = (2.0,)
    proxy: str = "obs"
    calib: str | None = None
    space: str | None = None
    trials: int = 150
    seed: int = 0
    margin: float = 0.01
    n_calib: int = 128
    n_heldout: int = 64
    out: str = "runs/latest"
    weights: str | None = None
    input_shape: tuple[int, ...] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["targets"] = list(self.targets)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "SearchRequest":
        d = dict(d)
        d["targets"] = tuple(d["targets"])
        if d.get("input_shape") is not None:
            d["input_shape"] = tuple(d["input_shape"])
        return cls(**d)


def _table_settings(table: Any) -> dict[str, Any]:
    return dict(table.settings)


def find_table(adapter: ModelAdapter) -> tuple[Path | None, Path]:
    """(the table search uses by default if one exists, where a fresh local profile belongs):
    ``latency_tables/local/<name>`` (this machine's) first, then the shipped ``latency_tables/<name>``."""
    path = default_table_path(adapter, runtime="ort-cpu", threads=1, batch=1, seq=128)
    local = TABLES_DIR / "local" / path.name
    return next((p for p in (local, path) if p.is_file()), None), local


def _resolve_table(adapter: ModelAdapter, req_table: str | None) -> Path:
    if req_table:
        return Path(req_table)
    found, _ = find_table(adapter)
    if found is not None:
        return found
    path = default_table_path(adapter, runtime="ort-cpu", threads=1, batch=1, seq=128)
    raise HwpruneError(f"no latency table for {adapter.name} at {path}; run `hwprune profile --model "
                       f"{adapter.name}` first or pass --table FILE")


def run_search(req: SearchRequest, *, log: Log = _noop, progress: bool = True) -> Any:
    """Validate every input, then: table -> predictor, calibration -> proxy + scorer, DP + NSGA-II.

    Nothing is written to ``req.out`` until all inputs have been checked and every target is known to
    be reachable; the chosen subnet per target is then materialised under ``candidates/<key>/``.
    """
    from hwprune.latency import LatencyTable
    from hwprune.proxies._base import fit_proxy, get_proxy
    from hwprune.search.run import SearchConfig, _check_reachable, search

    adapter = load_adapter(req.model, weights=req.weights, input_shape=req.input_shape)
    space = adapter.space(req.space)
    table_path = _resolve_table(adapter, req.table)
    table = LatencyTable.load(table_path)
    table.check_model(adapter)
    settings = _table_settings(table)
    for w in table.machine_warnings(settings.get("runtime", "ort-cpu"), int(settings.get("threads", 1))):
        log(w)
    predictor = make_predictor(table, space, adapter)
    get_proxy(req.proxy, adapter.family)  # unknown proxy -> error before any work
    config = SearchConfig(targets=tuple(req.targets), trials=req.trials, seed=req.seed, margin=req.margin)
    base_ms, costs = predictor.unit_costs()
    _check_reachable(config, dense_ms=predictor.dense_ms(), base_ms=base_ms, costs=costs,
                     smallest_ms=None if getattr(predictor, "additive", True) else predictor.predict(space.smallest()))
    seq = int(settings.get("seq", 128))
    calib = _load_calib(adapter, req, seq=seq)
    state = fit_proxy(req.proxy, adapter, space, calib)
    scorer = make_scorer(adapter, calib)
    run_dir = Path(req.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "run.json", {"format": "hwprune.run/1", "request": req.to_json(),
                                      "adapter": adapter.spec(), "table": str(table_path),
                                      "space_source": space.source, "settings": settings,
                                      "fingerprint": table.fingerprint.to_json(), "calib_source": calib.source})
    result = search(space=space, predictor=predictor, proxy_state=state, scorer=scorer, config=config,
                    run_dir=run_dir, progress=progress)
    _materialize_picks(adapter, state, result, run_dir)
    return result


def _materialize_picks(adapter: ModelAdapter, state: Any, result: Any, run_dir: Path) -> None:
    import hwprune
    from hwprune._io import atomic_dir

    for target, ev in result.picks.items():
        key = ev.candidate.key()
        dest = run_dir / "candidates" / key
        plan, overrides = state.materialize(ev.candidate)
        model = adapter.prune(adapter.dense(), plan, overrides)
        with atomic_dir(dest) as tmp:
            hwprune.save(model, plan, tmp)


def _read_run(run_dir: Path) -> dict[str, Any]:
    p = run_dir / "run.json"
    if not p.is_file():
        raise HwpruneError(f"{run_dir} is not a search run (no run.json); run `hwprune search -o {run_dir}` first")
    try:
        return read_json(p)
    except json.JSONDecodeError:
        raise HwpruneError(f"{p} is corrupt (not JSON); re-run the search") from None


def _selection(run_dir: Path, pick: str) -> list[dict[str, Any]]:
    """Rows to export: each has key, sizes (unit -> size), predicted_ms, target_speedup, scores."""
    import pandas as pd

    picks_path = run_dir / "picks.json"
    picks = []
    if picks_path.is_file():
        for p in read_json(picks_path)["picks"].values():  # keyed by target; one row per target
            picks.append({**p, "target_speedup": p.get("target")})
    if pick == "targets":
        if not picks:
            raise HwpruneError(f"{run_dir} has no picks.json; the search did not finish — re-run it to resume")
        return picks
    csv = run_dir / "pareto.csv"
    if not csv.is_file():
        raise HwpruneError(f"{run_dir} has no pareto.csv; the search did not finish — re-run it to resume")
    df = pd.read_csv(csv, dtype={"key": str})
    rows = df[df["pareto"]] if pick == "all" else df[df["key"] == pick]
    if rows.empty:
        raise HwpruneError(f"--pick {pick!r} matches no candidate in {csv}; use targets, all or a key from its 'key' column")
    by_key = {p["key"]: p for p in picks}
    out = []
    for _, r in rows.iterrows():
        sc = {k: float(r[k]) for k in ("distance", "cosine") if k in r and r[k] == r[k]}
        out.append(by_key.get(r["key"]) or {"key": r["key"], "sizes": json.loads(r["sizes"]),
                                            "predicted_ms": float(r["predicted_ms"]), "target_speedup": None,
                                            "scores": sc})
    return out


def run_export(run_dir: str | Path, *, pick: str = "targets", parity_tol: float = 1e-3, progress: bool = True,
               rounds: int = 5, repeats: int = 20) -> list[dict[str, Any]]:
    """Export the selected candidates of a run: plan + safetensors + ONNX + parity + measured latency.

    All selected candidates and the dense model are timed together, interleaved, in one process, so
    every manifest's measured speedup compares numbers taken under the same conditions.
    """
    import hwprune
    from hwprune.export.candidate import candidate_onnx, export_candidate, timing_feed
    from hwprune.export.measure import measure_dense_and_pruned
    from hwprune.latency import LatencyTable, get_backend
    from hwprune.space import Candidate

    run_dir = Path(run_dir)
    run = _read_run(run_dir)
    req = SearchRequest.from_json(run["request"])
    rows = _selection(run_dir, pick)
    adapter = load_adapter(req.model, weights=req.weights, input_shape=req.input_shape)
    space = adapter.space(req.space)
    table = LatencyTable.load(run["table"])
    settings = _table_settings(table)
    predictor = make_predictor(table, space, adapter)
    backend = get_backend(settings.get("runtime", "ort-cpu"), threads=int(settings.get("threads", 1)))
    batch, seq = int(settings.get("batch", 1)), int(settings.get("seq", 128))
    state = None
    models: dict[str, tuple[Any, Any]] = {}
    for row in rows:
        key, folder = row["key"], run_dir / "candidates" / row["key"]
        if (folder / "model.safetensors").is_file():
            from hwprune.surgery.plan import Plan

            models[key] = (hwprune.load(folder), Plan.load(folder / "plan.json"))
            continue
        if state is None:
            state = _refit(adapter, space, req, seq=seq)
        cand = Candidate.from_json({"sizes": row["sizes"]}, space)
        plan, overrides = state.materialize(cand)
        models[key] = (adapter.prune(adapter.dense(), plan, overrides), plan)
    onnx = {k: candidate_onnx(adapter, m, batch=batch, seq=seq) for k, (m, _) in models.items()}
    dense_onnx = candidate_onnx(adapter, adapter.dense(), batch=batch, seq=seq)
    cmp = measure_dense_and_pruned(backend, dense=dense_onnx, pruned=onnx, feed=timing_feed(adapter, batch=batch, seq=seq),
                                   rounds=rounds, repeats=repeats)
    manifests = []
    for row in rows:
        key = row["key"]
        model, plan = models[key]
        cand = plan.candidate(space)
        m = export_candidate(
            adapter, model, plan, run_dir / "candidates" / key, backend=backend, batch=batch, seq=seq,
            predicted_ms=predictor.predict(cand), dense_predicted_ms=predictor.dense_ms(),
            target_speedup=row.get("target_speedup"), dense_ms_measured=cmp.dense.median_ms,
            measured_ms=cmp.pruned[key].median_ms, dense_onnx=dense_onnx, scores=row.get("scores"),
            fingerprint=table.fingerprint.to_json(), parity_tol=parity_tol,
            extra={"key": key, "run": str(run_dir), "proxy": req.proxy, "table": run["table"],
                   "clock": "thread-cpu" if getattr(backend, "cpu_clock", False) else "wall"},
        )
        m.setdefault("key", key)
        manifests.append(m)
    write_json(run_dir / "exports.json", {"pick": pick, "manifests": manifests})
    return manifests


def _load_calib(adapter: ModelAdapter, req: SearchRequest, *, seq: int) -> Any:
    """Calibration + held-out data: text for encoders, images (.npy/.pt or generated) for CNNs."""
    if adapter.family == "cnn":
        from hwprune.proxies.cnn_calib import load_cnn_calib

        return load_cnn_calib(adapter, req.calib, n_calib=min(req.n_calib, 64), n_heldout=req.n_heldout,
                              seed=req.seed)
    from hwprune.proxies.calib import load_calib

    return load_calib(adapter, req.calib, n_calib=req.n_calib, n_heldout=req.n_heldout, seq=seq, seed=req.seed)


def _refit(adapter: ModelAdapter, space: Any, req: SearchRequest, *, seq: int) -> Any:
    from hwprune.proxies._base import fit_proxy

    return fit_proxy(req.proxy, adapter, space, _load_calib(adapter, req, seq=seq))


def make_predictor(table: Any, space: Any, adapter: ModelAdapter) -> Any:
    """The table's predictor for this model family (encoders: LUT sum; CNNs: per-conv lookups)."""
    if table.family != adapter.family:
        raise HwpruneError(f"latency table {table.path or ''} was measured for a {table.family} model, not {adapter.family}")
    if adapter.family == "cnn":
        from hwprune.latency.predictor_cnn import CnnPredictor

        return CnnPredictor(table, space)
    from hwprune.latency import LUTPredictor

    return LUTPredictor(table, space)


def make_scorer(adapter: ModelAdapter, calib: Any) -> Any:
    """End-to-end distance to the dense model on held-out data, per model family."""
    if adapter.family == "cnn":
        from hwprune.proxies.cnn import CnnScorer

        return CnnScorer(adapter, calib.heldout)
    from hwprune.proxies.e2e import EndToEndScorer

    return EndToEndScorer(adapter, calib.heldout)
