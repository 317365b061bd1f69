"""hwprune command line: profile | search | export | calibrate | generate | picks | tables. Thin: arguments -> one
call in hwprune.api -> exit code."""

from __future__ import annotations

import errno
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from hwprune.errors import HwpruneError

if TYPE_CHECKING:
    from hwprune.api import Manifest, ProfileResult
    from hwprune.search.run import SearchResult

app = typer.Typer(
    name="hwprune",
    help=(
        "Make a trained network faster on THIS device by structured pruning, and prove it by measurement.\n\n"
        "1. profile: measure block latencies on this machine -> latency_tables/*.parquet\n\n"
        "2. search:  find the most accurate subnets for target speedups -> runs/NAME/\n\n"
        "3. export:  cut them physically, export ONNX, check parity, measure predicted vs real speedup.\n\n"
        "4. calibrate: fit predicted -> measured ms over exported runs; later searches predict with it.\n\n"
        "5. generate: try an exported language model in one line (ONNX Runtime, streamed).\n\n"
        "Quick start:  hwprune search --model minilm --target-speedup 2 --export"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)
out = Console(width=None if sys.stdout.isatty() else 100)


def _fail(e: HwpruneError) -> None:
    err.print(f"[bold red]error:[/] {e}", soft_wrap=True, markup=True, highlight=False)
    raise typer.Exit(2)


def _warner() -> Callable[[str], None]:
    """A warning printer for one command that says each warning once (search --export checks the table twice)."""
    said: set[str] = set()

    def warn(msg: str) -> None:
        if msg not in said:
            said.add(msg)
            err.print(f"[yellow]warning:[/] {msg}", soft_wrap=True, highlight=False)

    return warn


def _known(e: Exception, *, study: Optional[Path] = None) -> HwpruneError:
    """An environment failure the user can fix, as one line (re-raises anything else: a bug keeps its
    traceback): out of memory, an unwritable output path, a corrupt study database."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if isinstance(e, MemoryError) or (
        isinstance(e, RuntimeError) and ("enough memory" in first or "allocate" in first)
    ):
        return HwpruneError(f"out of memory ({first}); free memory (other jobs) or use a smaller model, batch or --seq")
    if isinstance(e, OSError):  # permissions, a file where a folder should be, a full disk
        where = e.filename or "the output path"
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EEXIST, errno.EISDIR, errno.ENOSPC):
            return HwpruneError(
                f"cannot write {where}: {e.strerror}; choose a writable output folder (-o) or fix its permissions"
            )
        return HwpruneError(f"cannot read or write {where}: {e.strerror or first}; check the path")
    if study is not None and type(e).__module__.startswith("sqlalchemy"):
        return HwpruneError(
            f"the search study in {study} cannot be opened ({first}); it is corrupt or not an optuna "
            f"database: delete {study} to start the search afresh, or choose another -o"
        )
    raise e


def _shape(s: Optional[str]) -> Optional[tuple[int, ...]]:
    if s is None:
        return None
    try:
        return tuple(int(v) for v in s.split(","))
    except ValueError:
        raise HwpruneError(f"--input-shape {s!r} must be comma-separated integers, e.g. 1,3,224,224") from None


def _ints(s: Optional[str], opt: str, example: str) -> tuple[int, ...]:
    if s is None:
        return ()
    try:
        vals = tuple(int(v) for v in s.split(",") if v.strip())
    except ValueError:
        raise HwpruneError(f"{opt} {s!r} must be comma-separated integers, e.g. {example}") from None
    if not vals or min(vals) < 1:
        raise HwpruneError(f"{opt} {s!r} must be positive integers, e.g. {example}")
    return vals


MODEL_HELP = (
    "minilm (all-MiniLM-L6-v2, real weights, offline), bert-base (random weights, bert-base shape), "
    "smollm2 (SmolLM2-135M-Instruct, real weights from a GGUF), llama-3.2-1b / qwen2.5-0.5b / gpt2 (random "
    "weights), a local Hugging Face folder (BERT family, LLaMA, Mistral, Qwen2, GPT-2), a torchvision CNN "
    "(resnet18, resnet50, mobilenet_v2, vgg16_bn) or package.module:factory"
)


@app.command()
def profile(
    model: str = typer.Option("minilm", "--model", "-m", help=MODEL_HELP),
    runtime: str = typer.Option(
        "ort-cpu", "--runtime", help="Deployment runtime to time in: ort-cpu (ort-cuda, tensorrt where installed)."
    ),
    threads: int = typer.Option(
        1, "--threads", help="Intra-op threads, as you will deploy; 1 gives the steadiest numbers."
    ),
    batch: str = typer.Option(
        "1",
        "--batch",
        help="Batch size to time; several (e.g. 1,4) make one table per batch, -o T.parquet becoming T_b1.parquet, T_b4.parquet.",
    ),
    seq: int = typer.Option(
        128, "--seq", help="Sequence length: tokens per input for encoders, prompt length for decoders (e.g. 256)."
    ),
    input_shape: Optional[str] = typer.Option(None, "--input-shape", help="CNN input N,C,H,W, e.g. 1,3,224,224."),
    weights: Optional[str] = typer.Option(None, "--weights", help="CNN weights as .safetensors (never unpickled)."),
    space: Optional[Path] = typer.Option(
        None, "--space", help="Pruning space YAML; default search_spaces/<model>.yaml."
    ),
    output: Optional[Path] = typer.Option(
        None,
        "-o",
        "--output",
        help="Table file (.parquet); a .json fingerprint is written beside it. Default latency_tables/<model>_<runtime>_t<threads>_b<batch>_<shape>.parquet",
    ),
    budget_s: Optional[float] = typer.Option(
        None,
        "--budget-s",
        help="Seconds for the timing phase; longer gives steadier medians (default: 120 s for encoders, per-model for CNNs).",
    ),
    no_progress: bool = typer.Option(False, "--no-progress", help="Hide progress bars."),
    store: Optional[Path] = typer.Option(
        None, "--store", help="Also file the table in this registry under its fingerprint (see hwprune tables)."
    ),
    device: Optional[str] = typer.Option(
        None, "--device", help="Device name in --store (default: CPU/GPU model + runtime)."
    ),
    regime: str = typer.Option(
        "prefill",
        "--regime",
        help="prefill: one pass over a --seq-token prompt; decode (LLMs): one new token after a KV cache of each --context.",
    ),
    context: Optional[str] = typer.Option(
        None,
        "--context",
        help="With --regime decode: KV-cache lengths to time, comma-separated, e.g. 128,512,1024 (searches interpolate between them).",
    ),
) -> None:
    """Measure this device: time every prunable block shape (attention with k heads, FFN with n neurons, convs over channel grids, and the unprunable rest) in the deployment runtime, median and spread after warm-up, and save a latency table with a device fingerprint.

    Example:  hwprune profile --model minilm --threads 1 --seq 128

    Decode (tokens of an LLM):  hwprune profile --model smollm2 --regime decode --context 128,512,1024
    """
    from hwprune.api import ProfileRequest, run_profile

    try:
        batches = _ints(batch, "--batch", "1,4")
        contexts = _ints(context, "--context", "128,512,1024")
        reqs = [
            ProfileRequest(
                model=model,
                runtime=runtime,
                threads=threads,
                batch=b,
                seq=seq,
                out=str(_per_batch(output, b, len(batches))) if output else None,
                space=str(space) if space else None,
                weights=weights,
                input_shape=_shape(input_shape),
                budget_s=budget_s,
                table_store=str(store) if store else None,
                device=device,
                regime=regime,
                contexts=contexts,
            )
            for b in batches
        ]
        for req in reqs:
            _print_profile(run_profile(req, progress=not no_progress), store, len(batches) > 1)
    except HwpruneError as e:
        _fail(e)
    except Exception as e:
        _fail(_known(e))


def _per_batch(output: Path, batch: int, n: int) -> Path:
    """``T.parquet`` for one batch size; ``T_b4.parquet`` for batch 4 of several."""
    return output if n == 1 else output.with_name(f"{output.stem}_b{batch}{output.suffix}")


def _print_profile(res: "ProfileResult", store: Optional[Path], label: bool) -> None:
    head = f"batch {res.table.settings.get('batch')}: " if label else ""
    out.print(f"{head}[green]wrote[/] {res.path} ({len(res.table.frame)} rows) and {res.path.with_suffix('.json')}")
    if store:
        out.print(f"filed in {store} as {res.table.path.parent.name if res.table.path else '?'}")
    if res.dense_by_context:
        per = ", ".join(
            f"{ms:.3f} ms at context {c}" + (f" ({_context_how(r)})" if r else "")
            for c, ms in res.dense_by_context.items()
            for r in [res.table.at_context(c).context]
        )
        out.print(
            f"dense model, one new token, predicted: {per} (profiled in {res.table.profile_seconds:.0f} s)",
            soft_wrap=True,
        )
        return
    ctx = res.table.context
    aff = res.table.context_affine
    if ctx is not None and aff is not None:
        n = len(ctx["affine"]["points"])
        out.print(
            f"dense model: {res.dense_ms:.3f} ms predicted = block sum {res.dense_block_sum_ms:.3f} ms x {aff[0]:.3f} "
            f"{aff[1]:+.3f} ms (affine context fitted to the dense model and {n - 1} anchor subnets timed as export "
            f"times them, worst residual {ctx['affine']['residual_max_pct']:.2f} %; the dense model measured "
            f"{ctx['dense_measured_ms']:.3f} ms; profiled in {res.table.profile_seconds:.0f} s)",
            soft_wrap=True,
        )
    elif ctx is not None:
        out.print(
            f"dense model: {res.dense_ms:.3f} ms predicted = block sum {res.dense_block_sum_ms:.3f} ms x context factor "
            f"{res.table.context_factor:.3f} (the whole model timed as export times it: {ctx['dense_measured_ms']:.3f} ms;"
            f" profiled in {res.table.profile_seconds:.0f} s)",
            soft_wrap=True,
        )
    else:
        out.print(f"dense model: {res.dense_ms:.3f} ms predicted (profiled in {res.table.profile_seconds:.0f} s)")


def _context_how(r: dict[str, Any]) -> str:
    """How one decode context's block sums become milliseconds: the factor, or the anchors' part scales."""
    sc = r.get("scales")
    if not sc:
        return f"block sum x context factor {r['factor']:.3f}"
    parts = ", ".join(f"{k} x{v:.3f}" for k, v in sc["kinds"].items())
    n = len(r.get("anchors", []))
    worst = sc.get("residual_max_pct")
    off = f", worst {worst:.1f} % off" if worst is not None else ""
    return f"base x{sc['base']:.3f}, {parts}: fitted to {n} whole subnets{off}"


def _targets(target_speedup: Optional[float], targets: Optional[str]) -> tuple[float, ...]:
    vals: list[float] = []
    if targets:
        try:
            vals += [float(t) for t in targets.split(",") if t.strip()]
        except ValueError:
            raise HwpruneError(f"--targets {targets!r} must be comma-separated numbers, e.g. 1.5,2,3") from None
    if target_speedup is not None:
        vals.append(target_speedup)
    vals = sorted(set(vals)) or [2.0]
    bad = [v for v in vals if v <= 1.0]
    if bad:
        raise HwpruneError(f"target speedup {bad[0]} must be > 1 (2 means twice as fast as the dense model)")
    return tuple(vals)


DISTILL_STEPS = typer.Option(
    0,
    "--distill-steps",
    help="Recovery distillation: train each pruned model's kept weights this many steps to reproduce the dense "
    "model's outputs on the run's calibration split (never the selection or report texts) before export. "
    "Shapes, and so latency, do not change. 0 (default): off; 200-500 is a good start on a CPU.",
)
DISTILL_LR = typer.Option(5e-4, "--distill-lr", help="Peak learning rate of the distillation (AdamW).")
DISTILL_BATCH = typer.Option(16, "--distill-batch", help="Rows per distillation step.")
DISTILL_SAMPLES = typer.Option(
    1024, "--distill-samples", help="Calibration rows drawn for distillation (disjoint from selection and report)."
)


@app.command()
def search(
    model: str = typer.Option("minilm", "--model", "-m", help=MODEL_HELP),
    table: Optional[Path] = typer.Option(
        None,
        "--table",
        "-t",
        help="Latency table from `hwprune profile`; default: the shipped/last table for this model and settings.",
    ),
    target_speedup: Optional[float] = typer.Option(
        None, "--target-speedup", help="One target, e.g. 2 = twice as fast as dense."
    ),
    targets: Optional[str] = typer.Option(None, "--targets", help="Several targets, comma-separated: 1.5,2,3."),
    proxy: str = typer.Option(
        "obs",
        "--proxy",
        help="Accuracy proxy: obs (ZipLM structured OBS with weight reconstruction), flap (fluctuation + bias compensation), magnitude (baseline); CNNs also bn_scale; decoders also wanda_sp and the depth proxies bi (ShortGPT Block Influence) and angular (angular distance).",
    ),
    calib: Optional[Path] = typer.Option(
        None,
        "--calib",
        help="Calibration data: .txt (one text per line) or .jsonl ('text' field) for encoders and decoders; .npy/.pt tensor for CNNs. Default: the built-in corpus hwprune-builtin-v2 (five domains of text already installed; see README) / generated images.",
    ),
    space: Optional[Path] = typer.Option(
        None, "--space", help="Pruning space YAML; default search_spaces/<model>.yaml."
    ),
    trials: Optional[int] = typer.Option(
        None,
        "--trials",
        help="Finished trials in the study in all, DP seeds included, however many workers share it (each builds and scores one subnet). Default: 150; LLMs 48.",
    ),
    seed: int = typer.Option(0, "--seed", help="Random seed (same seed, same front)."),
    n_calib: Optional[int] = typer.Option(
        None, "--n-calib", help="Calibration samples (texts or images) for the proxy's statistics. Default: 128."
    ),
    n_heldout: Optional[int] = typer.Option(
        None,
        "--n-heldout",
        help="Selection samples, disjoint from calibration, that score each trial end to end (fewer = faster trials). Default: 64; LLMs 16.",
    ),
    n_report: Optional[int] = typer.Option(
        None,
        "--n-report",
        help="Report samples, held back from the search (disjoint from calibration and selection; with the built-in text corpus, from a domain the search never sees: licenses); export scores each pick on them. Default with the built-in corpus: 64, LLMs 16 (a domain of its own, so free); with --calib FILE and for CNNs: 0.",
    ),
    margin: float = typer.Option(0.01, "--margin", help="Safety margin on the latency budget (0.01 = aim 1 % below)."),
    output: Path = typer.Option(
        Path("runs/latest"), "-o", "--output", help="Run directory (resumable: rerun to continue the study)."
    ),
    export: bool = typer.Option(False, "--export", help="Export the chosen subnet per target right away."),
    input_shape: Optional[str] = typer.Option(None, "--input-shape", help="CNN input N,C,H,W."),
    weights: Optional[str] = typer.Option(None, "--weights", help="CNN weights (.safetensors)."),
    no_progress: bool = typer.Option(False, "--no-progress", help="Hide progress bars."),
    storage: Optional[str] = typer.Option(
        None,
        "--storage",
        help="Where the study lives, shared by every worker that joins it: postgresql://user:pass@host:5432/db, journal:PATH (a shared file system) or an SQLite path. Default: <run dir>/study.db.",
    ),
    study: str = typer.Option(
        "hwprune", "--study", help="Study name in --storage; every worker of one search uses the same."
    ),
    fresh: bool = typer.Option(
        False,
        "--fresh",
        help="Delete the study's trials first and start over (for every worker of it: give it to one worker only, start the others without it).",
    ),
    device: Optional[str] = typer.Option(
        None, "--device", help="Use this device's table from --table-store (instead of --table)."
    ),
    table_store: Optional[Path] = typer.Option(
        None, "--table-store", help="Table registry for --device (default latency_tables/store)."
    ),
    heartbeat_s: int = typer.Option(
        10, "--heartbeat-s", help="A killed worker's trial is failed and retried after 3x this."
    ),
    regime: str = typer.Option(
        "prefill",
        "--regime",
        help="What the targets speed up (LLMs): prefill = prompt latency; decode = tokens/s (a decode --table); serve = one request's latency, prefill(prompt) + every decode step (--table prefill, --decode-table decode).",
    ),
    workload: Optional[str] = typer.Option(
        None,
        "--workload",
        help="The request to optimise for, e.g. prompt=512,new=128,batch=1 (needed for decode and serve). Several, weighted by their share of traffic, separated by ';': 'prompt=64,new=256,weight=3;prompt=64,new=16,weight=1' (one batch; with prefill/serve one prompt length).",
    ),
    decode_table: Optional[Path] = typer.Option(
        None, "--decode-table", help="With --regime serve: the decode table (hwprune profile --regime decode)."
    ),
    distill_steps: int = DISTILL_STEPS,  # with --export
    distill_lr: float = DISTILL_LR,
    distill_batch: int = DISTILL_BATCH,
    distill_samples: int = DISTILL_SAMPLES,
) -> None:
    """Find the most accurate subnets for target speedups: exact DP under the table's additive latency model seeds an Optuna NSGA-II search over (predicted latency, end-to-end distance to the dense model). Writes study.db (resumable), pareto.csv, pareto.png and picks.json into the run directory.

    Example:  hwprune search --model minilm --targets 1.5,2,3 -o runs/minilm --export

    LLM tokens/s:  hwprune search --model smollm2 --table T_decode --regime decode --workload prompt=64,new=128 --targets 1.5,2

    Many workers (any machines; --trials is the study's total):  hwprune search --model minilm --storage postgresql://hw:pw@db:5432/hw --study minilm-2x --trials 400 -o runs/w1
    """
    from hwprune.api import ExportRequest, SearchRequest, run_export, run_search
    from hwprune.search import SearchConfig
    from hwprune.search.storage import StudyStore

    try:
        if distill_steps and not export:
            raise HwpruneError(
                "--distill-steps trains the exported picks: add --export, or run "
                "`hwprune export RUN --distill-steps N` after the search"
            )
        ereq = ExportRequest(  # built (and its settings checked) before the search, not after it
            run=str(output),
            distill_steps=distill_steps,
            distill_lr=distill_lr,
            distill_batch=distill_batch,
            distill_samples=distill_samples,
        )
        cfg = SearchConfig(targets=_targets(target_speedup, targets), trials=trials, seed=seed, margin=margin)
        req = SearchRequest(
            model=model,
            table=str(table) if table else None,
            proxy=proxy,
            calib=str(calib) if calib else None,
            space=str(space) if space else None,
            out=str(output),
            weights=weights,
            input_shape=_shape(input_shape),
            n_calib=n_calib,
            n_heldout=n_heldout,
            n_report=n_report,
            search=cfg,
            device=device,
            table_store=str(table_store) if table_store else None,
            regime=regime,
            workload=workload,
            decode_table=str(decode_table) if decode_table else None,
        )
        store = StudyStore(url=storage, name=study, fresh=fresh, heartbeat_s=heartbeat_s)
        warn = _warner()
        result = run_search(req, log=warn, progress=not no_progress, store=store)
        _print_picks(result)
        if export:
            _print_manifests(run_export(ereq, progress=not no_progress, log=warn))
    except HwpruneError as e:
        _fail(e)
    except KeyboardInterrupt as e:
        err.print("interrupted: finished trials stay in the study; run the same command again to resume")
        raise typer.Exit(128 + int(getattr(e, "signum", 2))) from None  # 130 for Ctrl-C, 143 for SIGTERM
    except Exception as e:
        _fail(_known(e, study=output / "study.db" if storage is None else None))


@app.command()
def export(
    run_dir: Path = typer.Argument(..., help="Run directory written by `hwprune search`."),
    pick: str = typer.Option(
        "targets",
        "--pick",
        help="targets (the chosen subnet per target), all (the whole Pareto front) or a candidate key from pareto.csv.",
    ),
    parity_tol: Optional[float] = typer.Option(
        None,
        "--parity-tol",
        help="Max abs difference allowed between ONNX Runtime and torch outputs (default: the family's, 1e-3; 1e-2 for LLM logits).",
    ),
    distill_steps: int = DISTILL_STEPS,
    distill_lr: float = DISTILL_LR,
    distill_batch: int = DISTILL_BATCH,
    distill_samples: int = DISTILL_SAMPLES,
    host_retries: int = typer.Option(
        3,
        "--host-retries",
        help="Time a candidate again (after 5, 10, then 20 s) while the dense model timed beside it lands more "
        "than 5 % from its latency table: the host is busier than when profiled. The dense model alone decides; "
        "every attempt is in the manifest (timings.host_check). 0: time once.",
    ),
    no_progress: bool = typer.Option(False, "--no-progress", help="Hide progress bars."),
) -> None:
    """Cut the chosen subnets physically (smaller dense tensors, never masks), save plan.json + model.safetensors (reload with hwprune.load), export model.onnx, check ONNX Runtime parity, and measure dense vs pruned latency in one process: manifest.json states predicted vs measured.

    Example:  hwprune export runs/minilm --pick targets
              hwprune export runs/minilm --distill-steps 300     # recover quality first (same latency)
    """
    from hwprune.api import ExportRequest, run_export

    try:
        _print_manifests(
            run_export(
                ExportRequest(
                    run=str(run_dir),
                    pick=pick,
                    parity_tol=parity_tol,
                    distill_steps=distill_steps,
                    distill_lr=distill_lr,
                    distill_batch=distill_batch,
                    distill_samples=distill_samples,
                    host_retries=host_retries,
                ),
                progress=not no_progress,
                log=_warner(),
            )
        )
    except HwpruneError as e:
        _fail(e)
    except Exception as e:
        _fail(_known(e))


@app.command()
def generate(
    folder: Path = typer.Argument(
        ..., help="An exported candidate: RUN/candidates/KEY (manifest.json, decoder.onnx, tokenizer.json)."
    ),
    prompt: str = typer.Option(..., "--prompt", "-p", help="Text to continue."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", help="New tokens at most (stops at end-of-text)."),
    temperature: float = typer.Option(
        0.0, "--temperature", help="0 = greedy (the most likely token, reproducible); > 0 samples softmax(logits / T)."
    ),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="With --temperature: sample among the k most likely."),
    seed: int = typer.Option(0, "--seed", help="Random seed for sampling."),
    threads: int = typer.Option(1, "--threads", help="ONNX Runtime intra-op threads."),
) -> None:
    """Generate text with an exported language model in ONNX Runtime (CPU), streaming tokens as they come: the prompt runs through decoder.onnx with an empty KV cache, then one token per call with the cache. Prints time to first token and tokens/s on stderr.

    Example:  hwprune generate runs/smollm2/candidates/KEY --prompt "The capital of France is" --max-new-tokens 32
    """
    from hwprune.generate import GenerateRequest, run_generate

    def show(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    try:
        req = GenerateRequest(
            folder=str(folder),
            prompt=prompt,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            seed=seed,
            threads=threads,
        )
        _, stats = run_generate(req, on_text=show)
    except HwpruneError as e:
        _fail(e)
    except Exception as e:
        _fail(_known(e))
    sys.stdout.write("\n")
    sys.stdout.flush()
    err.print(
        f"{stats.new_tokens} new tokens after a {stats.prompt_tokens}-token prompt: first after {stats.ttft_ms:.1f} ms, "
        f"then {stats.tokens_per_s:.1f} tokens/s (ONNX Runtime CPU, {threads} thread{'s' if threads > 1 else ''}, wall clock)",
        highlight=False,
        soft_wrap=True,
    )


@app.command()
def picks(
    storage: str = typer.Option(
        ..., "--storage", help="The study's storage: postgresql://..., journal:PATH or a study.db path."
    ),
    study: str = typer.Option("hwprune", "--study", help="Study name in --storage."),
    output: Path = typer.Option(
        Path("runs/picks"), "-o", "--output", help="Run directory to write (then: hwprune export DIR)."
    ),
    device: Optional[list[str]] = typer.Option(
        None,
        "--device",
        help="Also pick for this device (repeatable): its table from --table-store re-predicts every trial; "
        "written to OUTPUT/<device>, all fronts in OUTPUT/pareto_devices.png.",
    ),
    table_store: Optional[Path] = typer.Option(
        None, "--table-store", help="Table registry for --device (default latency_tables/store)."
    ),
) -> None:
    """Read a study's Pareto front and the pick per target from any machine, without searching: writes run.json, pareto.csv, pareto.png and picks.json for `hwprune export`.

    Scores do not depend on the device, so one study serves a fleet: --device re-predicts its trials with
    each device's table and picks per device (export each on its device).

    Example:  hwprune picks --storage postgresql://hw:pw@db:5432/hw --study minilm-2x -o runs/minilm && hwprune export runs/minilm
    Example:  hwprune picks --storage runs/minilm/study.db --device edge-1 --device server-2 -o runs/fleet && hwprune export runs/fleet/edge-1
    """
    from hwprune.api import run_device_picks
    from hwprune.search.storage import StudyStore

    try:
        results = run_device_picks(
            StudyStore(url=storage, name=study),
            out=str(output),
            devices=list(device or []),
            table_store=str(table_store) if table_store else None,
        )
    except HwpruneError as e:
        _fail(e)
    for name, result in results.items():
        where = output / name if name else output
        label = f"device {name}: " if name else ""
        out.print(f"{label}{len(result.evaluations)} distinct subnets, {len(result.front)} on the front; wrote {where}")
        _print_picks(result)


@app.command()
def calibrate(
    runs: list[Path] = typer.Argument(..., help="Run folders with exported candidates, all searched with one table."),
    remeasure: bool = typer.Option(
        False,
        "--remeasure",
        help="Time every exported model.onnx and the dense model again here, together, instead of trusting the manifests.",
    ),
    rounds: int = typer.Option(5, "--rounds", help="Interleaved timing rounds with --remeasure."),
    repeats: Optional[int] = typer.Option(
        None, "--repeats", help="Calls per model per round with --remeasure (default: 20, fewer for slow models)."
    ),
) -> None:
    """Close the loop: fit measured = scale x predicted + offset (least squares on relative error) over the exported candidates and dense models of RUNS, and store it beside their latency table (TABLE.correction.json: versioned, fingerprinted, written atomically). search and export then predict with it, and their manifests say which correction they applied.

    Example:  hwprune calibrate runs/minilm --remeasure
    """
    from hwprune.api import CalibrateRequest, run_calibrate

    try:
        res = run_calibrate(
            CalibrateRequest(runs=tuple(str(r) for r in runs), remeasure=remeasure, rounds=rounds, repeats=repeats),
            log=_warner(),
        )
    except HwpruneError as e:
        _fail(e)
    except Exception as e:
        _fail(_known(e))
    f = res.correction.fit
    t = Table(title=f"predicted (table x context factor) vs measured, {res.correction.source}")
    for c in ("run", "key", "base pred ms", "measured ms", "error before", "error after"):
        t.add_column(c, justify="right")
    for p in res.points:
        after = f(p.base_predicted_ms)
        t.add_row(
            p.run,
            p.key,
            f"{p.base_predicted_ms:.3f}",
            f"{p.measured_ms:.3f}",
            _pct(100 * (p.base_predicted_ms - p.measured_ms) / p.measured_ms),
            _pct(100 * (after - p.measured_ms) / p.measured_ms),
        )
    out.print(t)
    out.print(
        f"measured = {f.scale:.4f} x predicted {f.offset_ms:+.4f} ms over {f.n_points} points; residual rms "
        f"{f.residual_rms_ms:.4f} ms, worst {f.residual_max_pct:.2f} %; wrote {res.path} (version "
        f"{res.correction.version}) for table {res.table}",
        soft_wrap=True,
        highlight=False,
    )


tables_app = typer.Typer(
    help="The latency-table registry of a fleet (filed by hwprune profile --store DIR).", no_args_is_help=True
)
app.add_typer(tables_app, name="tables")
STORE_OPT = typer.Option(Path("latency_tables/store"), "--store", help="Table registry folder.")


@tables_app.command("list")
def tables_list(store: Path = STORE_OPT) -> None:
    """Every table in the registry: device, model, runtime, threads, batch, seq, when.

    Example:  hwprune tables list --store latency_tables/store
    """
    from hwprune.latency.store import list_tables

    try:
        tables = list_tables(store)
    except HwpruneError as e:
        _fail(e)
    t = Table(title=f"{len(tables)} latency tables in {store}")
    for c in ("name", "model", "runtime", "threads", "batch", "seq", "cpu / gpu", "created"):
        t.add_column(c)
    for st in tables:
        sd, fp = st.sidecar.get("settings", {}), st.sidecar.get("fingerprint", {})
        cells = (st.sidecar.get("model"), *(sd.get(k) for k in ("runtime", "threads", "batch", "seq")))
        t.add_row(st.name, *map(str, cells), str(fp.get("gpu") or fp.get("cpu")), str(st.sidecar.get("created")))
    out.print(t)


@tables_app.command("show")
def tables_show(
    ref: str = typer.Argument(
        ..., help="Folder name, id prefix or device name in --store, or a table file (.parquet)."
    ),
    store: Path = STORE_OPT,
) -> None:
    """One table: its fingerprint, settings, context factor, calibration correction and the predicted-vs-measured history recorded beside it (TABLE.history.json; export and calibrate --remeasure append to it).

    Example:  hwprune tables show 3fa2c1    or    hwprune tables show latency_tables/local/minilm.parquet
    """
    from hwprune.latency.correction import load_correction
    from hwprune.latency.store import find_table, read_history
    from hwprune.latency.table import LatencyTable, table_paths

    try:
        if ref.endswith((".parquet", ".json")) and Path(ref).is_file():  # a table file outside a store
            table = LatencyTable.load(ref)
            name, path, side = ref, table_paths(ref)[0], table.sidecar()
        else:
            st = find_table(store, ref)
            name, path, side = st.name, st.path, st.sidecar
            table = LatencyTable.load(path)
        hist = read_history(path)
        corr = load_correction(path)
    except HwpruneError as e:
        _fail(e)
    out.print(f"{name}  {path}", highlight=False)
    keys = ("model", "shape_key", "settings", "created", "profile_seconds", "fingerprint")
    out.print(json.dumps({k: side.get(k) for k in keys}, indent=2), highlight=False)
    ctx = table.context
    if table.regime == "decode":
        for c, t in table.per_context().items():
            r = t.context
            out.print(
                f"context {c}: "
                + (
                    f"context factor {r['factor']:.4f} (whole dense decode step {r['dense_measured_ms']:.3f} ms as "
                    f"export times it / table sum {r['dense_predicted_ms']:.3f} ms)"
                    + (f"; used instead: {_context_how(r)}" if r.get("scales") else "")
                    if r
                    else "no context factor (profiled before hwprune measured one; predictions use 1)"
                ),
                highlight=False,
            )
    elif ctx is None:
        out.print("context factor: none (profiled before hwprune measured one; predictions use 1)")
    else:
        out.print(
            f"context factor: {ctx['factor']:.4f} (whole dense model {ctx['dense_measured_ms']:.3f} ms as export times "
            f"it / table sum {ctx['dense_predicted_ms']:.3f} ms)",
            highlight=False,
        )
    if corr is None and table.regime == "decode":
        out.print("correction: none (hwprune calibrate fits prompt-latency runs; decode tables use their factors)")
    elif corr is None:
        out.print("correction: none (fit one with: hwprune calibrate RUN)")
    else:
        f = corr.fit
        stale = (
            "" if corr.table.get("digest") == table.digest() else " [STALE: fitted to an earlier profile, not applied]"
        )
        out.print(
            f"correction v{corr.version}: measured = {f.scale:.4f} x predicted {f.offset_ms:+.4f} ms, residual rms "
            f"{f.residual_rms_ms:.4f} ms (worst {f.residual_max_pct:.2f} %), {f.n_points} points from "
            f"{', '.join(corr.runs)} ({corr.source}, {corr.created}){stale}"
            + (
                f"; earlier versions: {', '.join('v' + str(p.get('version')) for p in corr.previous)}"
                if corr.previous
                else ""
            ),
            soft_wrap=True,
            highlight=False,
        )
    if not hist:
        out.print("no predicted-vs-measured history recorded (TABLE.history.json)")
    nan = float("nan")
    for h in hist:
        out.print(
            f"{h.get('when', '?')}  {h.get('key', '?')}  predicted {h.get('predicted_ms', nan):.3f} ms  "
            f"measured {h.get('measured_ms', nan):.3f} ms  error {h.get('error_pct', nan):+.1f} %  {h.get('source', '')}"
            + (f"  (correction {h['correction']})" if h.get("correction") else ""),
            highlight=False,
        )


@tables_app.command("diff")
def tables_diff(
    a: str = typer.Argument(..., help="First table."),
    b: str = typer.Argument(..., help="Second table."),
    store: Path = STORE_OPT,
) -> None:
    """What differs between two tables: device fingerprint, settings, and block latencies.

    Example:  hwprune tables diff xeon-ort-cpu-t1 xeon-ort-cpu-t4
    """
    from hwprune.latency.store import diff, find_table

    try:
        lines = diff(find_table(store, a), find_table(store, b))
    except HwpruneError as e:
        _fail(e)
    for line in lines:
        out.print(line, highlight=False)


def _print_picks(result: "SearchResult") -> None:
    """One row per target; the score columns are whatever the family's scorer measured on the selection
    set (encoders: cosine to dense; decoders: KL and perplexity; CNNs: agreement with dense)."""
    names: list[str] = []
    for ev in result.picks.values():
        names += [k for k in ev.scores if k not in names and isinstance(ev.scores[k], (int, float))]
    t = Table(title="chosen subnet per target (predicted; scores on the selection set)")
    for c in ("target", "key", "pred ms", "pred speedup", *names):
        t.add_column(c, justify="right")
    for target, ev in sorted(result.picks.items()):
        t.add_row(
            f"{target:g}x",
            ev.candidate.key(),
            f"{ev.predicted_ms:.2f}",
            f"{result.dense_ms / ev.predicted_ms:.2f}x",
            *(f"{ev.scores[k]:.4g}" if k in ev.scores else "-" for k in names),
        )
    out.print(t)


def _pct(v: object) -> str:
    return f"{v:+.1f}%" if isinstance(v, (int, float)) else "-"


def _print_manifests(manifests: "list[Manifest]") -> None:
    t = Table(title="predicted vs measured (speedup = dense / pruned, measured in one process)")
    cols = ("target", "key", "pred ms", "meas ms", "dense ms", "speedup", "pred err", "speedup err", "control")
    for c in (*cols, "parity"):
        t.add_column(c, justify="right")
    for m in manifests:
        tgt = m.get("target_speedup")
        t.add_row(
            f"{tgt:g}x" if tgt else "-",
            m["key"],
            f"{m['predicted_ms']:.2f}",
            f"{m['measured_ms']:.2f}",
            f"{m['dense_measured_ms']:.2f}",
            f"{m['measured_speedup']:.2f}x",
            _pct(m.get("prediction_error_pct")),
            _pct(m.get("speedup_error_pct")),
            _pct(m.get("dense_control_pct")),
            f"{m['parity_max_abs_diff']:.1e}",
        )
    out.print(t)
    out.print(
        "pred err: predicted vs measured ms, raw. speedup err: predicted vs measured speedup. "
        "control: the dense model's second session vs its first, same rounds (the timing's own noise).",
        soft_wrap=True,
    )
    models = {json.dumps(m.get("latency_model"), sort_keys=True): m.get("latency_model") for m in manifests}
    for lm in models.values():
        if lm:
            c = lm.get("correction")
            out.print(
                f"predicted ms = table x context factor {lm['context_factor']:.3f}"
                + (f" {lm['context_offset_ms']:+.4f} ms (affine context)" if lm.get("context_offset_ms") else "")
                + (
                    f", then correction v{c['version']} (x {c['scale']:.4f} {c['offset_ms']:+.4f} ms, hwprune calibrate)"
                    if c
                    else "; no calibration correction (hwprune calibrate RUN fits one)"
                ),
                soft_wrap=True,
                highlight=False,
            )
    for w in dict.fromkeys(w for m in manifests for w in m.get("warnings") or []):
        err.print(f"[yellow]warning:[/] {w}", soft_wrap=True, highlight=False)


def main() -> int:  # pragma: no cover
    app()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
