"""Parameter and FLOP counts that go into manifests and Pareto sets (each family counts its own FLOPs).

Convention for every family: FLOPs are **2 x multiply-accumulates** of the matrix products only
(Linear layers, attention ``Q K^T`` and ``P V``, convolutions), for one forward pass at the given batch
and input size. Softmax, activations, normalisation, bias adds, pooling and embedding lookups are
left out: they are a few percent of the total and every counter disagrees on them, whereas matmul
FLOPs agree with ``torch.utils.flop_counter`` exactly (the tests check that).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

__all__ = ["ModelStats", "count_params"]


@dataclass(frozen=True)
class ModelStats:
    params: int
    flops: int | None  # 2 x MACs of matmuls, one forward at (batch, seq); None when not countable
    batch: int
    seq: int

    def to_json(self) -> dict[str, int | None]:
        return asdict(self)


def count_params(module: nn.Module) -> int:
    """Number of parameters of any module (shared tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total
