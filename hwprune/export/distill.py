"""Recovery distillation: train a cut model's kept weights to reproduce the dense model's outputs.

Structured pruning with OBS reconstruction matches each layer's outputs on the calibration data one
layer at a time; errors still compound through the network, and text from a domain the search never
saw shows it (MiniLM at 2×: cosine 0.76 to the dense embeddings on license text, 0.83 on the selection
texts). Minitron and Sheared-LLaMA close that gap with knowledge distillation from the dense model after
pruning; hwprune does the same, briefly, on the CPU, when asked (``hwprune export RUN --distill-steps N``):

- the architecture does not change, so the latency table's prediction and the measured latency do not
  either; parity is checked on the distilled weights, which are the ones saved;
- the data is the run's *calibration* split drawn larger (``--distill-samples``), never the selection
  split that chose the pick nor the report split its quality is stated on (the three stay disjoint);
- the loss is the family's (:meth:`hwprune.families._base.Family.distill_loss`): for encoders the
  hidden states' relative error plus the sentence embeddings' cosine distance, for decoders the KL
  divergence of the next-token distributions, otherwise the outputs' relative squared error;
- the model stays in eval mode (batch-norm statistics frozen, no dropout); every weight trains;
- AdamW, a linear warm-up over the first 5 % of steps then cosine decay, gradients clipped at norm 1;
  seeded, so a rerun gives the same weights on the same machine.

:func:`distill` trains in place and returns the record the manifest keeps under ``distill``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from hwprune.errors import HwpruneError

if TYPE_CHECKING:
    from hwprune.families._base import Family

__all__ = ["DistillConfig", "distill"]

#: where the training data comes from (the manifest says it)
SPLIT = "calibration"


@dataclass(frozen=True)
class DistillConfig:
    """``steps`` optimizer steps of ``batch`` rows drawn (with replacement, seeded) from ``samples``
    calibration rows; peak learning rate ``lr``. ``steps == 0`` turns distillation off."""

    steps: int = 0
    lr: float = 5e-4
    batch: int = 16
    samples: int = 1024
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise HwpruneError(f"--distill-steps must be >= 0 (got {self.steps}); 0 turns distillation off")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise HwpruneError(f"--distill-lr must be a positive number (got {self.lr}); 5e-4 is a good start")
        if self.batch < 1 or self.samples < 1:
            raise HwpruneError(f"--distill-batch and --distill-samples must be >= 1 (got {self.batch}, {self.samples})")

    @property
    def enabled(self) -> bool:
        return self.steps > 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _schedule(step: int, steps: int) -> float:
    """Learning-rate multiplier: linear warm-up over 5 % of the steps, then cosine to 0."""
    warm = max(1, steps // 20)
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1.0 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


def distill(
    adapter: "Family",
    student: nn.Module,
    data: Mapping[str, torch.Tensor],
    cfg: DistillConfig,
    *,
    teacher: nn.Module | None = None,
    progress: Callable[[int, float], None] | None = None,
) -> dict[str, Any]:
    """Train ``student`` (in place) towards ``teacher`` (default: the family's dense model) on ``data``
    (batch-first model inputs, the calibration split). Returns the manifest's ``distill`` record:
    the settings, the split, the mean loss of the first and last tenth of the steps, and the seconds.
    ``progress(step, loss)`` is called after every step."""
    if not cfg.enabled:
        raise HwpruneError("distillation asked with 0 steps; pass --distill-steps N (N >= 1)")
    rows = int(next(iter(data.values())).shape[0]) if data else 0
    if rows == 0:
        raise HwpruneError("no calibration rows to distill on; pass --distill-samples N (N >= 1)")
    teacher = (teacher if teacher is not None else adapter.dense()).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise HwpruneError("the pruned model has no trainable weights to distill")
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed)
    losses: list[float] = []
    t0 = time.perf_counter()
    # eval mode throughout: normalisation statistics stay the dense model's (a few hundred calibration
    # batches would only add noise to them) and no dropout; the weights still train
    student.eval()
    try:
        for step in range(cfg.steps):
            for g in opt.param_groups:
                g["lr"] = cfg.lr * _schedule(step, cfg.steps)
            idx = torch.randint(0, rows, (cfg.batch,), generator=gen)
            loss = adapter.distill_loss(student, teacher, {k: v[idx] for k, v in data.items()})
            if not torch.isfinite(loss):
                raise HwpruneError(
                    f"distillation diverged at step {step + 1} (loss {float(loss)}); lower --distill-lr "
                    f"(now {cfg.lr:g})"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            losses.append(float(loss.detach()))
            if progress is not None:
                progress(step + 1, losses[-1])
    finally:
        student.eval()
        opt.zero_grad(set_to_none=True)
    tenth = max(1, len(losses) // 10)
    return {
        **cfg.to_json(),
        "split": SPLIT,
        "rows": rows,
        "loss_first": sum(losses[:tenth]) / tenth,
        "loss_last": sum(losses[-tenth:]) / tenth,
        "seconds": round(time.perf_counter() - t0, 1),
    }
