"""Real-weight CNN check: hwprune against Torch-Pruning's *whole accuracy-vs-measured-latency front* on
the digits ResNet, without fine-tuning and (``--finetune-epochs N``) with a short fine-tune.

    python scripts/train_digits_cnn.py -o runs/digits
    python scripts/bench_cnn_digits.py --data runs/digits -o bench_out/cnn_digits.json [--finetune-epochs 2]

Three disjoint splits of scikit-learn's digits (written by ``train_digits_cnn.py``), each with one job:

* **calibration**: 256 images of the training split (the model was trained on them): hwprune's proxy
  fit and least-squares refit, and BatchNorm re-estimation of *every* pruned model, hwprune's and peers';
* **selection**: the 300 validation images (never trained on): hwprune's search scores candidates on
  them (label-free: agreement with the dense model), and each peer's point is chosen on their labels;
* **report**: the 450 test images: every accuracy in the summary. Nothing is chosen on them, except the
  ``oracle`` view, which is labelled as the peer's upper bound.

hwprune: profile the model (ORT CPU, 1 thread, batch 1), fit the ``--proxy`` on the calibration images,
search each target speedup (DP re-linearised on the exact predictor, then NSGA-II scored on the
selection images), build each pick (least-squares refit + BN re-estimation).

Peers: Torch-Pruning pruners (``--peers``), each swept over uniform ratios ``--peer-ratios`` and channel
roundings ``--peer-round`` (tp's default, and rounded to 8 / 16: ORT's aligned fast paths); classifier
kept, BN re-estimated. Ratios that give the very same network are timed once (``aliases``).

Measurement: the dense model, hwprune's picks and every peer network are exported and timed together by
``hwprune.export.measure.measure_dense_and_pruned`` (ORT CPU, 1 thread, batch 1, thread CPU clock with
the wall clock beside it): one process, interleaved call by call in shuffled order, two sessions per
model created in mirrored order, the dense model's second session against its first as the control.
hwprune's picks are reported with their raw prediction error (predicted vs measured ms) first.

Comparison, per pick and per peer, at hwprune's *measured* time ``h_ms``:

* ``best`` (the headline): the peer point with the highest selection accuracy among those measured at
  ``<= h_ms``, reported with its test accuracy;
* ``best_within_noise``: the same with ``<= h_ms * (1 + noise)``, ``noise`` the measurement's own
  (largest of the |dense control| and the 90th percentile of |session gap| over all models): the peer
  may be that much slower;
* ``oracle``: the highest *test* accuracy at ``<= h_ms * (1 + noise)``: chosen on the report split, in the
  peer's favour.

Each peer's front (on the selection split, and on the report split for the figure) goes in the JSON; the
figure (``<out>.png``) plots every peer point, each peer's front and hwprune's picks. With
``--finetune-epochs N`` each pick and, per pick and peer, the ``--finetune-top`` points with the best
selection accuracy at ``<= h_ms * (1 + noise)`` are fine-tuned on the training split (lr 0.01); the
peer's fine-tuned figures are the same three views over its tuned points, on their tuned accuracies.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: the factory lives in scripts/

from _common import OUT_DIR, fail, machine, write_result
from _peer_fronts import best_at_or_below, front, plot_fronts

from hwprune.api import load_adapter, make_predictor
from hwprune.errors import HwpruneError
from hwprune.export.measure import Comparison, measure_dense_and_pruned
from hwprune.export.onnx_io import to_onnx
from hwprune.families import Family
from hwprune.families.cnn.calib import recalibrate_bn  # the peers' BN re-estimation is hwprune's own
from hwprune.latency import get_backend, profile
from hwprune.latency.pages import reexec_for_timing
from hwprune.proxies import CalibData
from hwprune.search.pareto import Evaluation
from hwprune.search.run import ErrorModel, LatencyModel, ScorerLike, SearchConfig, search
from hwprune.space import PruningSpace
from scripts.train_digits_cnn import accuracy, train

MODEL = "scripts.train_digits_cnn:digits_resnet"
SHAPE = "1,1,32,32"
N_CALIB = 256


def _tp_importance(peer: str) -> Any:
    import torch_pruning as tp

    return {
        "tp-magnitude": lambda: tp.importance.MagnitudeImportance(p=2),  # group L2 norm
        "tp-bn-scale": lambda: tp.importance.BNScaleImportance(),  # |gamma| (network slimming's criterion)
        "tp-taylor": lambda: tp.importance.TaylorImportance(),  # |w * dL/dw|, gradients on the calibration set
        "tp-lamp-global": lambda: tp.importance.LAMPImportance(p=2),  # layer-adaptive, one global threshold
    }[peer]()


#: the peers a ``--peers`` list may name: Torch-Pruning's pruner with one importance each
PEERS = ("tp-magnitude", "tp-bn-scale", "tp-taylor", "tp-lamp-global")


def peer_prune(
    dense: nn.Module, peer: str, ratio: float, calib: tuple[torch.Tensor, torch.Tensor], *, round_to: int | None
) -> nn.Module:
    """One point of a peer: Torch-Pruning at ``ratio`` (uniform per layer, or one global ranking for
    ``*-global``; at most 90 % of a layer), classifier kept. BatchNorm is *not* re-estimated here."""
    import torch_pruning as tp

    m = copy.deepcopy(dense).eval()
    x, y = calib
    pruner = tp.pruner.MagnitudePruner(
        m,
        torch.zeros(1, *x.shape[1:]),
        importance=_tp_importance(peer),
        pruning_ratio=ratio,
        max_pruning_ratio=0.9,
        ignored_layers=[m.fc],
        global_pruning=peer.endswith("-global"),
        round_to=round_to,
    )
    if peer == "tp-taylor":  # its importance reads the gradients of the loss on the calibration images
        m.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
    pruner.step()
    m.zero_grad(set_to_none=True)
    return m


def _fingerprint(m: nn.Module) -> str:
    h = hashlib.sha1()
    for k, v in m.state_dict().items():
        h.update(f"{k}{tuple(v.shape)}".encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def peer_sweep(
    dense: nn.Module,
    peer: str,
    calib: tuple[torch.Tensor, torch.Tensor],
    ratios: list[float],
    roundings: list[int | None],
) -> tuple[dict[str, nn.Module], dict[str, dict[str, Any]]]:
    """Every (ratio, rounding) of ``peer``; ratios that give the same network (same weights) are kept
    once, under the first name, with the others as ``aliases``. BN re-estimated on the calibration images."""
    models: dict[str, nn.Module] = {}
    info: dict[str, dict[str, Any]] = {}
    seen: dict[str, str] = {}
    for rt in roundings:
        for r in ratios:
            name = f"{peer}_{r:.2f}" + (f"_r{rt}" if rt else "")
            m = peer_prune(dense, peer, r, calib, round_to=rt)
            key = _fingerprint(m)
            if key in seen:
                info[seen[key]]["aliases"].append(name)
                continue
            seen[key] = name
            models[name] = recalibrate_bn(m, calib[0])
            info[name] = {
                "peer": peer,
                "ratio": r,
                "round_to": rt,
                "aliases": [],
                "conv_out_channels": [c.out_channels for c in m.modules() if isinstance(c, nn.Conv2d)],
            }
    return models, info


def time_models(
    models: dict[str, nn.Module], x: torch.Tensor, *, rounds: int, repeats: int, warmup: int, seed: int
) -> Comparison:
    """Every model in ``models`` (``"dense"`` among them) exported to ONNX and timed by
    :func:`hwprune.export.measure.measure_dense_and_pruned`: one process, ORT CPU, 1 thread, batch 1,
    interleaved call by call, two sessions per model in mirrored creation order. The others are passed
    in a seeded random order, so no kind of model is always created early or late."""
    be = get_backend("ort-cpu", threads=1)

    def onnx(m: nn.Module) -> bytes:
        return to_onnx(m, {"input": x}, output_names=["output"])

    others = [k for k in models if k != "dense"]
    order = [others[i] for i in np.random.default_rng(seed).permutation(len(others))]
    return measure_dense_and_pruned(
        be,
        dense=onnx(models["dense"]),
        pruned={k: onnx(models[k]) for k in order},
        feed={"input": x.numpy()},
        rounds=rounds,
        repeats=repeats,
        warmup=warmup,
    )


def _ratios(spec: str) -> list[float]:
    lo, hi, step = (float(v) for v in spec.split(":"))
    return [round(float(r), 4) for r in np.arange(lo, hi + step / 2, step)]


def search_picks(
    space: PruningSpace,
    predictor: LatencyModel,
    state: ErrorModel,
    scorer: ScorerLike,
    targets: list[float],
    *,
    trials: int,
    seed: int,
    run_dir: Path,
) -> dict[float, Evaluation]:
    """hwprune's own search (``hwprune.search.run.search``: DP seeds re-linearised on the exact predictor,
    uniform seeds and the dense model, then NSGA-II), one pick per target.

    Budgets are ``dense / target`` (no margin: the comparison is at equal *measured* latency, the margin
    would only hand the peer slack) and a pick is the best scored candidate anywhere under its budget
    (``pick_band=1``): this benchmark asks how accurate hwprune is at a speed, so a faster pick that is
    also more accurate counts. The study is started afresh every run, never resumed.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    for f in ("study.db", "study.db-wal", "study.db-shm"):  # a fresh search on this run's table, never resumed
        (run_dir / f).unlink(missing_ok=True)
    config = SearchConfig(targets=tuple(targets), trials=trials, seed=seed, margin=0.0, pick_band=1.0)
    result = search(
        space=space,
        predictor=predictor,
        proxy_state=state,
        scorer=scorer,
        config=config,
        run_dir=run_dir,
        progress=False,
    )
    return dict(result.picks)


Split = tuple[torch.Tensor, torch.Tensor]


def load_splits(data: Path, seed: int) -> tuple[CalibData, dict[str, Split], dict[str, Any]]:
    """The digits written by ``train_digits_cnn.py`` as three disjoint sets: calibration (``N_CALIB``
    training images, seeded), selection (the validation split) and report (the test split). Returns the
    ``CalibData`` hwprune uses (calib = calibration, heldout = selection), ``{"train", "calibration",
    "selection", "report"}`` -> (x, y), and the JSON description of the splits."""
    try:
        xtr, ytr, xva, yva, xte, yte = (
            torch.from_numpy(np.load(data / f"{s}.npy"))
            for name in ("train", "val", "test")
            for s in (name, f"{name}_labels")
        )
    except (OSError, ValueError) as e:
        raise HwpruneError(
            f"--data {data}: cannot read the digits' train/val/test splits ({type(e).__name__}: {e}); run "
            f"python scripts/train_digits_cnn.py -o {data} (it writes val.npy since issue 10)"
        ) from None
    pick = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(seed))[:N_CALIB]
    calib = CalibData(calib={"input": xtr[pick]}, heldout={"input": xva}, source=f"{data}: train[{N_CALIB}] / val")
    splits = {"train": (xtr, ytr), "calibration": (xtr[pick], ytr[pick]), "selection": (xva, yva), "report": (xte, yte)}
    about = {
        "calibration": {
            "data": f"{data}/train.npy, {N_CALIB} images (seed {seed}) of {len(xtr)}",
            "n": N_CALIB,
            "used_for": "hwprune's proxy fit and refit; BN re-estimation of every pruned model; tp-taylor's gradients",
        },
        "selection": {
            "data": f"{data}/val.npy (never trained on)",
            "n": len(xva),
            "used_for": "hwprune's search scores (label-free, agreement with dense); each peer's point (accuracy)",
        },
        "report": {"data": f"{data}/test.npy", "n": len(xte), "used_for": "every accuracy reported"},
        "fine_tune": f"{data}/train.npy, all {len(xtr)} images (--finetune-epochs only)",
    }
    return calib, splits, about


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="runs/digits", help="folder written by scripts/train_digits_cnn.py")
    ap.add_argument("--targets", default="1.5,2,3")
    ap.add_argument("--proxy", default="obs", choices=["obs", "flap", "bn_scale", "magnitude"])
    ap.add_argument("--trials", type=int, default=100, help="NSGA-II trials (seeds included)")
    ap.add_argument("--finetune-epochs", type=int, default=0, help="also fine-tune the compared models N epochs")
    ap.add_argument(
        "--finetune-top", type=int, default=2, help="per pick and peer, fine-tune this many peer points (see above)"
    )
    ap.add_argument("--profile-budget-s", type=float, default=40.0, help="timing budget of the latency profile")
    ap.add_argument("--peers", default=",".join(PEERS), help=f"comma-separated, from {', '.join(PEERS)}")
    ap.add_argument("--peer-ratios", default="0.04:0.88:0.04", help="each peer's pruning ratios, lo:hi:step")
    ap.add_argument("--peer-round", default="none,8,16", help="each peer's round_to values (none: tp's default)")
    ap.add_argument(
        "--rounds",
        type=int,
        default=10,
        help="timing rounds; every session runs --repeats calls per round, interleaved with all others. "
        "Cost: 2 x (models) x (warmup + rounds x repeats) calls of ~0.3-1.5 ms",
    )
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "-o",
        "--out",
        default=str(OUT_DIR / "cnn_digits.json"),
        help="JSON result; the figure goes beside it as <out>.png, the latency table as "
        "<out>_table.parquet/.json and the search's files in <out>_search/",
    )
    a = ap.parse_args(argv)
    torch.set_num_threads(1)  # shared 2-core machine: one thread is faster than two contended ones
    try:
        peers = [p.strip() for p in a.peers.split(",") if p.strip()]
        if not peers or set(peers) - set(PEERS):
            raise HwpruneError(f"--peers {a.peers!r}: choose from {', '.join(PEERS)}")
        return run(a, peers, argv)
    except HwpruneError as e:
        return fail(e)


def _noise(cmp: Comparison) -> dict[str, Any]:
    """The measurement's own noise: the dense control and each model's second session against its first."""
    gaps = np.abs([100.0 * (m.sessions_ms[1] / m.sessions_ms[0] - 1.0) for m in [cmp.dense, *cmp.pruned.values()]])
    control = cmp.control_pct or 0.0
    return {
        "dense_control_pct": cmp.control_pct,
        "abs_session_gap_pct_median": float(np.median(gaps)),
        "abs_session_gap_pct_p90": float(np.percentile(gaps, 90)),
        "abs_session_gap_pct_max": float(gaps.max()),
        "noise_pct": float(max(abs(control), np.percentile(gaps, 90))),
    }


def _point(name: str, row: dict[str, Any], dense_ms: float, *, ft: bool = False) -> dict[str, Any]:
    keys = ("val_accuracy_ft", "test_accuracy_ft") if ft else ("val_accuracy", "test_accuracy")
    return {
        "name": name,
        "measured_ms": row["measured_ms"],
        "measured_speedup": dense_ms / row["measured_ms"],
        "val_accuracy": row[keys[0]],
        "test_accuracy": row[keys[1]],
        **{k: row[k] for k in ("ratio", "round_to") if k in row},
    }


def _views(points: list[dict[str, Any]], h_ms: float, noise: float) -> dict[str, Any]:
    """The three views of one peer at one of hwprune's measured times (see the module doc)."""
    val, test = "val_accuracy", "test_accuracy"
    return {
        "best": best_at_or_below(points, h_ms, select_key=val, report_key=test),
        "best_within_noise": best_at_or_below(points, h_ms, select_key=val, report_key=test, slack=noise),
        "oracle": best_at_or_below(points, h_ms, select_key=test, report_key=val, slack=noise),
    }


def run(a: argparse.Namespace, peers: list[str], argv: list[str] | None) -> int:
    """The benchmark (see the module docstring); :func:`main` turns a user error into one line."""
    data, out = Path(a.data), Path(a.out)
    t_start = time.perf_counter()
    seconds: dict[str, float] = {}

    def lap(key: str, t0: float) -> None:
        seconds[key] = time.perf_counter() - t0

    adapter: Family = load_adapter(
        MODEL, weights=str(data / "model.safetensors"), input_shape=tuple(int(v) for v in SHAPE.split(","))
    )
    calib, splits, about = load_splits(data, a.seed)
    space = adapter.space()
    # the table as hwprune profile builds it (ORT CPU, 1 thread, batch 1), saved beside the result
    table = profile(
        adapter,
        runtime="ort-cpu",
        threads=1,
        space=space,
        out=out.with_suffix("").as_posix() + "_table",
        progress=False,
        budget_s=a.profile_budget_s,
    )
    seconds["profile"] = table.profile_seconds
    pred = make_predictor(table, space, adapter)
    state = adapter.fit_proxy(a.proxy, space, calib, threads=1)
    dense = adapter.dense()
    models: dict[str, nn.Module] = {"dense": dense}
    t0 = time.perf_counter()
    targets = [float(s) for s in a.targets.split(",")]
    found = search_picks(
        space,
        pred,
        state,
        adapter.scorer(calib),
        targets,
        trials=a.trials,
        seed=a.seed,
        run_dir=out.parent / f"{out.stem}_search",
    )
    lap("search", t0)
    picks: dict[str, Any] = {}
    for t, pick in found.items():
        models[f"hwprune_{t:g}x"] = state.build(pick.candidate)
        picks[f"hwprune_{t:g}x"] = {
            "target": t,
            "candidate": pick.candidate.as_dict(space),
            "predicted_ms": pred.predict(pick.candidate),
            "scores": dict(pick.scores),
            "source": pick.source,
        }
        if t == 2.0:  # the same pick without BatchNorm re-estimation (an ablation)
            plan, over = state.materialize(pick.candidate)
            models["hwprune_2x_no_bn_recal"] = adapter.prune(
                dense, plan, {k: v for k, v in over.items() if not k.endswith(("running_mean", "running_var"))}
            )
    t0 = time.perf_counter()
    roundings = [None if v.strip().lower() == "none" else int(v) for v in a.peer_round.split(",")]
    peer_info: dict[str, dict[str, Any]] = {}
    peer_names: dict[str, list[str]] = {}
    for peer in peers:
        got, info = peer_sweep(dense, peer, splits["calibration"], _ratios(a.peer_ratios), roundings)
        models.update(got)
        peer_info.update(info)
        peer_names[peer] = list(got)
        print(f"{peer}: {len(got)} distinct networks", flush=True)
    lap("peer_sweep", t0)
    t0 = time.perf_counter()
    xrep = splits["report"][0]
    cmp = time_models(models, xrep[:1], rounds=a.rounds, repeats=a.repeats, warmup=a.warmup, seed=a.seed)
    lap("timing", t0)
    noise = _noise(cmp)
    slack = noise["noise_pct"] / 100.0
    dense_ms = cmp.dense.median_ms
    rows: dict[str, dict[str, Any]] = {}
    for k, m in models.items():
        meas = cmp.dense if k == "dense" else cmp.pruned[k]
        rows[k] = {
            "measured_ms": meas.median_ms,
            "measured_speedup": dense_ms / meas.median_ms,
            "val_accuracy": accuracy(m, *splits["selection"]),
            "test_accuracy": accuracy(m, *splits["report"]),
            "params": sum(p.numel() for p in m.parameters()),
            "timing": meas.to_json(),
            **peer_info.get(k, {}),
        }
    dense_pred = pred.predict(space.dense())
    for k, p in picks.items():  # the raw prediction error first, the speedup error beside it
        ms, pms = rows[k]["measured_ms"], p["predicted_ms"]
        p["measured_ms"] = ms
        p["prediction_error_pct"] = 100.0 * (pms - ms) / ms
        p["predicted_speedup"] = dense_pred / pms
        p["measured_speedup"] = dense_ms / ms
        p["speedup_error_pct"] = 100.0 * (p["measured_speedup"] / p["predicted_speedup"] - 1.0)
    peer_points = {peer: [_point(n, rows[n], dense_ms) for n in names] for peer, names in peer_names.items()}
    tuned: list[str] = []
    if a.finetune_epochs:
        t0 = time.perf_counter()
        tune = list(picks)
        for k in picks:
            h_ms = rows[k]["measured_ms"]
            for pts in peer_points.values():
                ok = [p for p in pts if p["measured_ms"] <= h_ms * (1 + slack)]
                best = sorted(ok, key=lambda p: (-p["val_accuracy"], p["measured_ms"]))
                tune += [p["name"] for p in best[: a.finetune_top]]
        tuned = list(dict.fromkeys(tune))
        for k in tuned:
            m = copy.deepcopy(models[k])
            train(m, *splits["train"], epochs=a.finetune_epochs, lr=0.01, seed=a.seed, log=False)
            rows[k]["val_accuracy_ft"] = accuracy(m, *splits["selection"])
            rows[k]["test_accuracy_ft"] = accuracy(m, *splits["report"])
        lap("finetune", t0)
    summary = []
    for k, p in picks.items():
        h = rows[k]
        line: dict[str, Any] = {
            "target": p["target"],
            "hwprune": {
                "model": k,
                "predicted_ms": p["predicted_ms"],
                "measured_ms": h["measured_ms"],
                "prediction_error_pct": p["prediction_error_pct"],
                "predicted_speedup": p["predicted_speedup"],
                "measured_speedup": h["measured_speedup"],
                "speedup_error_pct": p["speedup_error_pct"],
                "val_accuracy": h["val_accuracy"],
                "test_accuracy": h["test_accuracy"],
                **({"test_accuracy_ft": h["test_accuracy_ft"]} if a.finetune_epochs else {}),
            },
            "peers": {peer: _views(pts, h["measured_ms"], slack) for peer, pts in peer_points.items()},
        }
        if a.finetune_epochs:
            line["peers_finetuned"] = {
                peer: _views(
                    [_point(n, rows[n], dense_ms, ft=True) for n in names if n in tuned], h["measured_ms"], slack
                )
                for peer, names in peer_names.items()
            }
        summary.append(line)
    figure = plot_fronts(
        out.with_suffix(".png"),
        peers=peer_points,
        picks=[_point(k, rows[k], dense_ms) for k in picks],
        dense=_point("dense", rows["dense"], dense_ms),
        acc_key="test_accuracy",
        title=f"digits ResNet, ORT CPU 1 thread, no fine-tuning: test accuracy vs measured speedup (dense "
        f"{dense_ms:.3f} ms)\npeer fronts drawn on test accuracy (in the peers' favour)",
    )
    report = {
        "splits": about,
        "rule": {
            "best": "per peer: highest selection (val) accuracy among points measured <= hwprune's measured ms; "
            "test accuracy reported",
            "best_within_noise": "the same, up to noise_pct slower than hwprune's pick",
            "oracle": "highest test accuracy up to noise_pct slower: chosen on the report split, in the peer's favour",
            "latency_gap_pct": "100 * (peer_ms / hwprune_ms - 1); negative: the peer point is faster",
            "noise_pct": noise["noise_pct"],
        },
        "summary": summary,
        "dense": {k: rows["dense"][k] for k in ("measured_ms", "val_accuracy", "test_accuracy")}
        | {"predicted_ms": dense_pred, "prediction_error_pct": 100.0 * (dense_pred - dense_ms) / dense_ms},
        "no_bn_recal_2x_test_accuracy": rows.get("hwprune_2x_no_bn_recal", {}).get("test_accuracy"),
        "timing": {
            **dict(cmp.settings),
            **noise,
            "warnings": cmp.warnings(list(picks)),
            "models": len(models),
            "sessions": 2 * len(models),
        },
        "fronts": {
            peer: {
                "networks": len(pts),
                "aliases": sum(len(peer_info[p["name"]]["aliases"]) for p in pts),
                "slower_than_dense": sum(p["measured_ms"] > dense_ms for p in pts),
                "front_selection": front(pts, acc_key="val_accuracy"),
                "front_report": front(pts, acc_key="test_accuracy"),
            }
            for peer, pts in peer_points.items()
        },
        "peer_sweep": {"peers": peers, "ratios": a.peer_ratios, "round_to": [r or "none" for r in roundings]},
        "figure": str(figure),
        "finetuned_models": tuned,
        "seconds": seconds,
        "total_seconds": time.perf_counter() - t_start,
        "picks": picks,
        "models": rows,
    }
    st = table.settings
    write_result(
        out,
        report,
        script=__file__,
        argv=argv,
        machine_facts=machine(st["runtime"], threads=int(st["threads"]), batch=int(st["batch"]), seq=int(st["seq"])),
    )
    _print(report, a.finetune_epochs > 0)
    return 0


def _print(report: dict[str, Any], ft: bool) -> None:
    def fmt(v: dict[str, Any] | None, acc: str = "test_accuracy") -> str:
        if v is None:
            return "none as fast"
        return f"{v['measured_speedup']:.2f}x ({v['latency_gap_pct']:+.1f}%) {v[acc]:.3f}"

    for s in report["summary"]:
        h = s["hwprune"]
        print(
            f"{s['target']:g}x hwprune: predicted {h['predicted_ms']:.3f} ms measured {h['measured_ms']:.3f} ms "
            f"(raw error {h['prediction_error_pct']:+.1f}%, speedup error {h['speedup_error_pct']:+.1f}%), "
            f"{h['measured_speedup']:.2f}x, test acc {h['test_accuracy']:.3f}"
            + (f" ft {h['test_accuracy_ft']:.3f}" if ft else "")
        )
        for peer, v in s["peers"].items():
            print(
                f"    {peer:16s} best {fmt(v['best'])} | within noise {fmt(v['best_within_noise'])}"
                f" | oracle {fmt(v['oracle'])}"
            )
            if ft:
                f = s["peers_finetuned"][peer]
                print(f"    {'':16s} ft: best {fmt(f['best'])} | within noise {fmt(f['best_within_noise'])}")
    d, t = report["dense"], report["timing"]
    print(
        f"dense: test acc {d['test_accuracy']:.3f}, {d['measured_ms']:.3f} ms (predicted {d['predicted_ms']:.3f}, "
        f"raw error {d['prediction_error_pct']:+.1f}%); control {t['dense_control_pct']:+.2f}%, |session gap| "
        f"median {t['abs_session_gap_pct_median']:.2f}% p90 {t['abs_session_gap_pct_p90']:.2f}%; "
        f"{t['models']} models; total {report['total_seconds']:.0f} s"
    )
    for w in t["warnings"]:
        print("warning: " + w)


if __name__ == "__main__":
    reexec_for_timing()  # huge pages: identical sessions time alike (hwprune.latency.pages)
    sys.exit(main())
