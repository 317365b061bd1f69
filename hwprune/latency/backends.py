"""Built-in latency backends: ONNX Runtime on CPU (the reference), ONNX Runtime CUDA and TensorRT EPs.

Every backend times ``session.run`` on numpy feeds, so what it measures is what a user of the exported
``model.onnx`` pays per call. Optional runtimes are imported only when their backend is built, so
``import hwprune`` works on a machine without CUDA or TensorRT.

Besides the :class:`~hwprune.latency._base.Backend` contract, ORT backends offer :meth:`prepare`, a
ready :class:`Runner` per graph, and :func:`interleave` times many runners round-robin. Interleaving
is how profiling and the benchmark stay honest on a shared machine: a burst of someone else's load
lands on every graph of a round alike instead of on whichever graph happened to be running.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from hwprune.errors import HwpruneError
from hwprune.latency._base import Backend, Profiling, Timing, register_backend

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "OrtCpuBackend",
    "OrtCudaBackend",
    "OrtTensorRTBackend",
    "ClockLog",
    "Runner",
    "interleave",
    "run_failure",
    "timing_of",
    "time_profile",
]


def _import_ort() -> Any:
    try:
        import onnxruntime
    except ImportError:  # pragma: no cover - a declared dependency
        raise HwpruneError("onnxruntime is missing; pip install onnxruntime") from None
    return onnxruntime


def timing_of(samples_ms: Sequence[float]) -> Timing:
    """Median and p10/p90 of per-call times in milliseconds."""
    a = np.asarray(samples_ms, dtype=np.float64)
    if a.size == 0:
        raise ValueError("no timing samples")
    p10, med, p90 = np.percentile(a, [10, 50, 90])
    return Timing(median_ms=float(med), p10_ms=float(p10), p90_ms=float(p90), n=int(a.size))


class ClockLog:
    """What a runner's timed calls cost on every clock, beside the one its timings use.

    ``wall_ms``: wall time per call (it includes the slices in which the scheduler ran someone else,
    and throttling). ``thread_ns`` / ``process_ns``: CPU time of the calling thread and of the whole
    process over the same calls. With one intra-op thread ORT runs the graph on the calling thread, so
    the two CPU times agree; a process that used more CPU than the thread means other threads worked
    during the timed calls (ORT not on one thread after all), and a thread-CPU timing then leaves
    their work out.
    """

    def __init__(self) -> None:
        self.wall_ms: list[float] = []
        self.thread_ns = 0
        self.process_ns = 0

    def reset(self) -> None:
        """Forget the calls so far (e.g. the warm-up)."""
        self.wall_ms, self.thread_ns, self.process_ns = [], 0, 0

    @property
    def cpu_excess_pct(self) -> float | None:
        """Process CPU over thread CPU during the logged calls, in % of the thread's (0: one thread did it
        all); None before any call was logged."""
        return 100.0 * (self.process_ns / self.thread_ns - 1) if self.thread_ns > 0 else None


class Runner:
    """One loaded session plus its feed: call it to run once, :meth:`sample` to time ``n`` calls.

    ``cpu_clock``: time a call by the calling thread's CPU time instead of wall time. With one intra-op
    thread ORT runs the whole graph on the calling thread, so on an idle core the two agree; on a shared
    machine CPU time leaves out the slices in which the scheduler ran someone else, which wall time
    would add to our latency at random. CPU time is a lower bound, so every call is also logged on the
    wall clock and against the process's CPU time (:attr:`log`, a :class:`ClockLog`).
    """

    def __init__(self, session: Any, feed: Mapping[str, np.ndarray], *, cpu_clock: bool = False) -> None:
        self.session = session
        self.cpu_clock = cpu_clock
        self.log = ClockLog()
        # the exporter drops inputs a graph ignores (the mask of a zero-head block); feed only the rest
        names = {i.name for i in session.get_inputs()}
        missing = names - set(feed)
        if missing:
            raise HwpruneError(f"the feed lacks graph input {sorted(missing)[0]!r}; pass every model input")
        self.feed = {k: np.ascontiguousarray(v) for k, v in feed.items() if k in names}

    def __call__(self) -> list[np.ndarray]:
        try:
            return self.session.run(None, self.feed)
        except Exception as e:  # ORT's own exception types, or MemoryError
            raise run_failure(e) from None

    def sample(self, n: int) -> list[float]:
        """Time ``n`` calls: ms on the runner's clock; every call is also added to :attr:`log`."""
        run, feed, out, walls = self.session.run, self.feed, [], self.log.wall_ms
        wall, thread, process = time.perf_counter_ns, time.thread_time_ns, time.process_time_ns
        cpu, thread_ns, process_ns = self.cpu_clock, 0, 0
        try:
            for _ in range(n):
                p0 = process()
                w0 = wall()
                t0 = thread()
                run(None, feed)
                t1 = thread()  # the thread-CPU window holds the call and nothing else
                w1 = wall()
                p1 = process()
                walls.append((w1 - w0) / 1e6)
                thread_ns += t1 - t0
                process_ns += p1 - p0
                out.append((t1 - t0 if cpu else w1 - w0) / 1e6)
        except Exception as e:
            raise run_failure(e) from None
        self.log.thread_ns += thread_ns
        self.log.process_ns += process_ns
        return out


def run_failure(e: BaseException, *, doing: str = "running a graph") -> HwpruneError:
    """ONNX Runtime failing while ``doing`` something (out of memory included), as one line."""
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    if isinstance(e, MemoryError) or "alloc" in first.lower():
        return HwpruneError(
            f"out of memory in ONNX Runtime while {doing} ({first}); free memory (other jobs), or time "
            "fewer or smaller graphs at once (export: --pick KEY)"
        )
    return HwpruneError(f"ONNX Runtime failed while {doing}: {first}")


def interleave(
    runners: Sequence[Runner],
    *,
    rounds: int = 0,
    per_round: int = 1,
    seconds: float = 0.0,
    min_rounds: int = 15,
    warmup: int = 3,
    common_mode: bool = False,
    seed: int = 0,
    on_round: Callable[[float], None] | None = None,
) -> list[Timing]:
    """Time every runner ``per_round`` times per round, round-robin in a fresh random order each round.

    Stops after ``rounds`` rounds or ``seconds`` (but not before ``min_rounds``), whichever comes
    first; give one or both. The order is
    shuffled so no graph always follows the same neighbour (cache state); the Python GC is paused so a
    collection never lands inside a timed call. ``common_mode`` divides each round by its load factor
    (median over graphs of sample / graph median): when another process slows the whole machine for
    a round, every graph of that round is scaled back alike. Needs many graphs; ``on_round`` gets the
    fraction done.
    """
    if not rounds and not seconds:
        raise ValueError("give rounds or seconds")
    rng = np.random.default_rng(seed)
    samples: list[list[float]] = []
    for r in runners:
        r.sample(warmup)
    enabled = gc.isenabled()
    gc.disable()
    t0 = time.perf_counter()
    try:
        while True:
            rows = [[0.0] * len(runners) for _ in range(per_round)]
            for j in rng.permutation(len(runners)):
                for row, t in zip(rows, runners[j].sample(per_round)):
                    row[j] = t
            samples.extend(rows)
            elapsed = time.perf_counter() - t0
            done = len(samples) // per_round
            if on_round is not None:
                on_round(min(max(done / rounds if rounds else 0.0, elapsed / seconds if seconds else 0.0), 1.0))
            if (rounds and done >= rounds) or (seconds and elapsed >= seconds and done >= min_rounds):
                break
    finally:
        if enabled:
            gc.enable()
    a = np.asarray(samples)  # (rounds * per_round, graphs)
    if common_mode and len(runners) > 1:
        load = np.median(a / np.median(a, axis=0, keepdims=True), axis=1, keepdims=True)
        a = a / load
    return [timing_of(a[:, j].tolist()) for j in range(a.shape[1])]


@register_backend("ort-cpu")
class OrtCpuBackend(Backend):
    """ONNX Runtime, CPU execution provider: intra-op = ``threads``, inter-op = 1, sequential, opt ALL."""

    name = "ort-cpu"
    providers: tuple[str, ...] = ("CPUExecutionProvider",)

    def __init__(self, *, threads: int = 1) -> None:
        super().__init__(threads=threads)
        self._ort = _import_ort()
        self._check_providers()

    def _check_providers(self) -> None:
        if self.providers[0] not in self._ort.get_available_providers():  # pragma: no cover
            raise HwpruneError(f"onnxruntime here lacks {self.providers[0]}; reinstall onnxruntime")

    def version(self) -> str:
        return f"onnxruntime {self._ort.__version__}"

    def session_options(self) -> Any:
        so = self._ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.execution_mode = self._ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = self._ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        return so

    def session(self, onnx: bytes) -> Any:
        try:
            return self._ort.InferenceSession(onnx, self.session_options(), providers=list(self.providers))
        except MemoryError as e:
            raise run_failure(e, doing="loading a graph") from None
        except Exception as e:  # ORT raises its own exception types for bad graphs
            if "alloc" in str(e).lower():
                raise run_failure(e, doing="loading a graph") from None
            raise HwpruneError(f"{self.name}: cannot load the ONNX graph ({str(e).splitlines()[0]})") from None

    def prepare(self, onnx: bytes, feed: Mapping[str, np.ndarray]) -> Runner:
        return Runner(self.session(onnx), feed, cpu_clock=self.cpu_clock)

    @property
    def cpu_clock(self) -> bool:
        """Single-threaded CPU runs are timed by thread CPU time (see :class:`Runner`) where that clock is
        fine-grained (Linux, macOS; Windows ticks in ~16 ms); GPU and multi-threaded runs by wall time."""
        return (
            self.threads == 1
            and self.providers[0] == "CPUExecutionProvider"
            and time.get_clock_info("thread_time").resolution <= 1e-6
        )

    def time(self, onnx: bytes, feed: Mapping[str, np.ndarray], *, warmup: int = 10, repeats: int = 50) -> Timing:
        if repeats < 1:
            raise HwpruneError(f"repeats must be >= 1 (got {repeats})")
        runner = self.prepare(onnx, feed)
        return interleave([runner], rounds=repeats, warmup=warmup)[0]

    def run(self, onnx: bytes, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return self.prepare(onnx, feed)()


@register_backend("ort-cuda")
class OrtCudaBackend(OrtCpuBackend):
    """ONNX Runtime, CUDA execution provider (needs ``onnxruntime-gpu`` and an NVIDIA GPU)."""

    name = "ort-cuda"
    providers = ("CUDAExecutionProvider", "CPUExecutionProvider")

    def _check_providers(self) -> None:
        if "CUDAExecutionProvider" not in self._ort.get_available_providers():
            raise HwpruneError(
                "runtime ort-cuda needs CUDAExecutionProvider, which this onnxruntime lacks; "
                "pip install onnxruntime-gpu on a machine with an NVIDIA GPU, or use --runtime ort-cpu"
            )


@register_backend("tensorrt")
class OrtTensorRTBackend(OrtCpuBackend):
    """TensorRT through ONNX Runtime's TensorRT execution provider (native engines come later)."""

    name = "tensorrt"
    providers = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")

    def _check_providers(self) -> None:
        try:
            import tensorrt
        except ImportError:
            raise HwpruneError(
                "runtime tensorrt needs the tensorrt package; pip install 'hwprune[tensorrt]' "
                "onnxruntime-gpu on a machine with an NVIDIA GPU, or use --runtime ort-cpu"
            ) from None
        self._trt_version = str(getattr(tensorrt, "__version__", "?"))
        if "TensorrtExecutionProvider" not in self._ort.get_available_providers():
            raise HwpruneError(
                "runtime tensorrt needs onnxruntime's TensorrtExecutionProvider; "
                "pip install onnxruntime-gpu (built with TensorRT), or use --runtime ort-cpu"
            )

    def version(self) -> str:
        return f"onnxruntime {self._ort.__version__} + tensorrt {self._trt_version}"


def time_profile(
    prepare: Callable[[], Profiling], backend: Backend, *, budget_s: float, rounds: int, progress: bool = True
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Load a family's profile graphs (``prepare``) and time them in interleaved, common-mode rounds.

    Stops after ``rounds`` rounds or ``budget_s`` seconds; returns the table's rows and its meta, with the
    export time and the clock recorded. Families whose profile fits in memory at once share this loop.
    """
    from rich.progress import Progress

    t0 = time.perf_counter()
    prof = prepare()
    t_export = time.perf_counter() - t0
    with Progress(disable=not progress, transient=False) as bar:
        task = bar.add_task(f"time {len(prof.runners)} graphs (~{budget_s:.0f} s)", total=100)
        timings = interleave(
            prof.runners,
            rounds=rounds,
            seconds=budget_s,
            common_mode=True,
            on_round=lambda f: bar.update(task, completed=100 * f),
        )
    meta = prof.meta(timings)
    meta.update(export_seconds=round(t_export, 1), clock=backend.clock)
    return prof.frame(timings), meta
