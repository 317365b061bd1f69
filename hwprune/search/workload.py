"""Serving workloads: what one request costs, predicted from a prefill and/or a decode latency table.

A request with ``prompt`` tokens asking for ``new`` tokens (``batch`` requests at once) runs the prompt
once (prefill, which yields the first new token) and then ``new - 1`` decode steps, the step after
``k`` generated tokens reading a KV cache of ``prompt + k - 1`` positions. The regimes a search can
optimise:

- ``prefill``: the prompt alone (time to first token), from a prefill table profiled at ``seq = prompt``;
- ``decode``: the mean time of one decode step over the request's contexts, i.e. 1 / tokens-per-second;
  targets are speedups of tokens/s;
- ``serve``: the whole request, ``prefill(prompt) + sum of decode(context)`` over its decode steps;
  targets are speedups of request latency.

Each is a :class:`~hwprune.latency.predictor.WeightedPredictor` over the tables' per-context predictors
(a context between two profiled ones is their linear mix), hence additive and exact for the DP.

Several workloads may be weighted in one objective (:class:`WorkloadMix`):
``prompt=64,new=256,weight=3;prompt=64,new=16,weight=1`` minimises ``sum_i w_i objective_i / sum_i w_i``
(weights are relative shares of the traffic). They share the batch (a table is profiled at one batch),
and for ``prefill`` / ``serve`` the prompt length (one prefill table, profiled at ``seq = prompt``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from hwprune.errors import HwpruneError
from hwprune.latency.predictor import ContextPredictor, Predictor, WeightedPredictor, context_weights
from hwprune.latency.table import LatencyTable
from hwprune.space import Candidate

__all__ = [
    "REGIMES",
    "Workload",
    "WorkloadPredictor",
    "WorkloadMix",
    "parse_workloads",
    "workload_predictor",
    "describe_pick",
]

REGIMES = ("prefill", "decode", "serve")
_KEYS = ("prompt", "new", "batch")
_EXAMPLE = "e.g. prompt=512,new=128,batch=1 (several: prompt=64,new=256,weight=3;prompt=64,new=16,weight=1)"


@dataclass(frozen=True)
class Workload:
    """One kind of request: ``prompt`` tokens in, ``new`` tokens out, ``batch`` requests at once."""

    prompt: int
    new: int = 1
    batch: int = 1
    weight: float = 1.0  # its share in a weighted mix of workloads (relative)

    def __post_init__(self) -> None:
        for k in _KEYS:
            if int(getattr(self, k)) < 1:
                raise HwpruneError(f"--workload {k}={getattr(self, k)} must be >= 1")
        if not (self.weight > 0 and self.weight < float("inf")):
            raise HwpruneError(f"--workload weight={self.weight} must be a number > 0")

    @classmethod
    def parse(cls, text: str) -> Workload:
        """``prompt=512,new=128,batch=1`` (``prompt`` required; ``new`` and ``batch`` default to 1; ``weight``
        matters in a mix, see :func:`parse_workloads`)."""
        vals: dict[str, Any] = {}
        for part in (p.strip() for p in text.split(",") if p.strip()):
            k, eq, v = part.partition("=")
            k = k.strip()
            if not eq or k not in (*_KEYS, "weight"):
                raise HwpruneError(
                    f"--workload {text!r}: {part!r} is not KEY=N; keys: prompt (tokens in), new (tokens out), "
                    f"batch (requests at once), weight (share in a mix), {_EXAMPLE}"
                )
            try:
                vals[k] = float(v) if k == "weight" else int(v)
            except ValueError:
                kind = "a number" if k == "weight" else "a whole number"
                raise HwpruneError(f"--workload {text!r}: {k}={v.strip()!r} is not {kind}") from None
        if "prompt" not in vals:
            raise HwpruneError(f"--workload {text!r} lacks prompt=N; keys: prompt, new, batch, weight")
        return cls(**vals)

    def decode_contexts(self) -> list[int]:
        """KV-cache length before each decode step (the first new token comes from the prefill)."""
        return list(range(self.prompt, self.prompt + self.new - 1)) or [self.prompt]

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        if d["weight"] == 1.0:  # a single workload's record (and study key) as before mixes existed
            del d["weight"]
        return d


def parse_workloads(text: str, regime: str = "decode") -> list[Workload]:
    """One workload, or several separated by ``;`` (each with an optional ``weight``). Several must share
    the batch, and for ``prefill`` / ``serve`` the prompt (see the module doc)."""
    wls = [Workload.parse(part) for part in text.split(";") if part.strip()]
    if not wls:
        raise HwpruneError(f"--workload {text!r} is empty; {_EXAMPLE}")
    if len({w.batch for w in wls}) > 1:
        raise HwpruneError(
            f"--workload {text!r}: the workloads of a mix must share batch= (a table is profiled at one batch); "
            "search each batch separately"
        )
    if regime in ("prefill", "serve") and len({w.prompt for w in wls}) > 1:
        raise HwpruneError(
            f"--workload {text!r}: with --regime {regime} the workloads of a mix must share prompt= (one prefill "
            "table, profiled at --seq PROMPT); mix prompt lengths with --regime decode"
        )
    return wls


class WorkloadPredictor(WeightedPredictor):
    """The regime's objective in ms (see the module doc), plus :meth:`breakdown` of one request."""

    def __init__(
        self,
        regime: str,
        workload: Workload,
        *,
        prefill: Predictor | None,
        decode: dict[int, Predictor] | None,
        where: str,
    ) -> None:
        self.regime, self.workload, self.prefill, self.decode = regime, workload, prefill, decode
        self.warnings: list[str] = []
        steps: dict[int, float] = {}  # decode-table context -> summed interpolation weight over the request
        if decode is not None:
            grid = sorted(decode)
            ctx = workload.decode_contexts()
            for c in sorted({min(ctx), max(ctx)}):
                warning = ContextPredictor(decode, c, where=where).warning
                if warning:
                    self.warnings.append(warning)
            for c in ctx:
                for g, w in context_weights(grid, c).items():
                    steps[g] = steps.get(g, 0.0) + w
        self.decode_weights = steps
        self.n_steps = len(workload.decode_contexts()) if workload.new > 1 else 0
        parts: list[tuple[float, Predictor]] = []
        if regime in ("prefill", "serve"):
            assert prefill is not None
            parts.append((1.0, prefill))
        if regime == "decode":
            assert decode is not None
            n = len(workload.decode_contexts())
            parts += [(w / n, decode[g]) for g, w in steps.items()]
        if regime == "serve" and self.n_steps:
            assert decode is not None
            parts += [(w, decode[g]) for g, w in steps.items()]
        super().__init__(parts)

    def breakdown(self, cand: Candidate) -> dict[str, float | None]:
        """Time to first token, mean decode step, tokens/s and request latency (ms) where the tables give them."""
        ttft = self.prefill.predict(cand) if self.prefill is not None else None
        step = None
        if self.decode is not None:
            n = len(self.workload.decode_contexts())
            step = sum(w * self.decode[g].predict(cand) for g, w in self.decode_weights.items()) / n
        out: dict[str, float | None] = {"ttft_ms": ttft, "decode_step_ms": step}
        out["tokens_per_s"] = 1e3 * self.workload.batch / step if step else None
        out["request_ms"] = ttft + self.n_steps * step if ttft is not None and step is not None else None
        return out


class WorkloadMix(WeightedPredictor):
    """``sum_i w_i objective_i / sum_i w_i`` over the members' :class:`WorkloadPredictor`: additive, so the
    DP stays exact. :meth:`breakdown` gives every member's figures."""

    def __init__(self, members: list[WorkloadPredictor]) -> None:
        total = sum(m.workload.weight for m in members)
        self.members, self.regime = members, members[0].regime
        self.workloads = [m.workload for m in members]
        self.warnings = list(dict.fromkeys(w for m in members for w in m.warnings))
        super().__init__([(m.workload.weight / total, m) for m in members])

    def breakdown(self, cand: Candidate) -> dict[str, Any]:
        return {
            "objective_ms": self.predict(cand),
            "workloads": [{**m.workload.to_json(), **m.breakdown(cand)} for m in self.members],
        }


def workload_predictor(
    regime: str,
    workload: Workload | list[Workload],
    *,
    tables: dict[str, LatencyTable],
    predictor: Callable[[LatencyTable], Predictor],
) -> WorkloadPredictor | WorkloadMix:
    """The objective of ``regime`` for ``workload`` (or a weighted mix of several, :class:`WorkloadMix`)."""
    if isinstance(workload, list):
        if len(workload) == 1:
            return workload_predictor(regime, workload[0], tables=tables, predictor=predictor)
        members = [workload_predictor(regime, w, tables=tables, predictor=predictor) for w in workload]
        return WorkloadMix([m for m in members if isinstance(m, WorkloadPredictor)])
    return _single(regime, workload, tables=tables, predictor=predictor)


def _single(
    regime: str,
    workload: Workload,
    *,
    tables: dict[str, LatencyTable],
    predictor: Callable[[LatencyTable], Predictor],
) -> WorkloadPredictor:
    """The objective of ``regime`` for ``workload`` from ``tables`` (``prefill`` and/or ``decode``, each
    checked for its regime, batch and prompt length); ``predictor(table)`` is the family's predictor."""
    if regime not in REGIMES:
        raise HwpruneError(f"--regime {regime!r} is not one of {', '.join(REGIMES)}")
    need = {"prefill": ("prefill",), "decode": ("decode",), "serve": ("prefill", "decode")}[regime]
    for r in need:
        if r not in tables:
            flag = "--decode-table" if regime == "serve" and r == "decode" else "--table"
            raise HwpruneError(
                f"--regime {regime} needs a {r} latency table ({flag}); make one with hwprune profile"
                + (" --regime decode --context 128,512,1024" if r == "decode" else f" --seq {workload.prompt}")
            )
    for r, t in tables.items():
        t.check_regime(r)
        where = f"latency table {t.path.name}" if t.path else f"the {r} table"
        if int(t.settings.get("batch", 1)) != workload.batch:
            raise HwpruneError(
                f"{where} was profiled at batch {t.settings.get('batch')}, the workload has batch={workload.batch}; "
                "profile it with --batch as the workload"
            )
        if r == "prefill" and int(t.settings.get("seq", 0)) != workload.prompt:
            raise HwpruneError(
                f"{where} was profiled for prompts of {t.settings.get('seq')} tokens, the workload's prompt is "
                f"{workload.prompt}: profile it with --seq {workload.prompt}"
            )
    prefill = predictor(tables["prefill"]) if "prefill" in need else None
    decode = None
    if "decode" in need:
        t = tables["decode"]
        decode = {c: predictor(t.at_context(c)) for c in t.contexts}
    where = f"latency table {tables['decode'].path.name}" if "decode" in need and tables["decode"].path else "the table"
    return WorkloadPredictor(regime, workload, prefill=prefill, decode=decode, where=where)


def describe_pick(pred: WorkloadPredictor | WorkloadMix, cand: Candidate, dense: Candidate) -> dict[str, Any]:
    """A pick's predicted request figures beside the dense model's (for ``workload.json``)."""
    return {"predicted": pred.breakdown(cand), "dense_predicted": pred.breakdown(dense)}
