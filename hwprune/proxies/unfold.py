"""Input statistics of every *consumer* layer of a CNN (the convs/linears reading a prunable group).

A consumer's input is seen the way its weight sees it: a conv's input is unfolded into patches, so
column ``c * kh * kw + t`` is input channel ``c`` at kernel offset ``t`` and the conv is a matrix
product ``W (out, C*kh*kw) @ patch``; a linear's input is its feature vector. Per consumer we keep
``sum x x^T`` (float64), ``sum x`` and the count of patches; the covariance of these columns is what
every CNN proxy's error and the least-squares reconstruction need. Activations are folded into the
sums batch by batch; consumers are split over several passes when their matrices would exceed
``max_bytes`` (resnet50 at 224: ~1 GB in all).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["InputStats", "collect_input_stats", "unfold_input"]


@dataclass
class InputStats:
    width: int  # columns: C * kh * kw (conv) or in_features (linear)
    xtx: torch.Tensor = field(init=False)  # (width, width) float64, sum of x x^T over patches
    sum: torch.Tensor = field(init=False)  # (width,) float64
    count: int = 0

    def __post_init__(self) -> None:
        self.xtx = torch.zeros(self.width, self.width, dtype=torch.float64)
        self.sum = torch.zeros(self.width, dtype=torch.float64)

    def add(self, x: torch.Tensor) -> None:
        x = x.double()
        self.xtx += x.T @ x
        self.sum += x.sum(0)
        self.count += x.shape[0]

    def mean(self) -> torch.Tensor:
        return self.sum / max(self.count, 1)

    def cov(self) -> torch.Tensor:
        """Centred second moment (a bias or the next BatchNorm absorbs the mean)."""
        mu = self.mean()
        return self.xtx / max(self.count, 1) - torch.outer(mu, mu)


def unfold_input(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Rows = patches (or samples), columns = what the weight multiplies: (patches, width)."""
    if isinstance(layer, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    assert isinstance(layer, nn.Conv2d) and layer.groups == 1
    cols = nn.functional.unfold(
        x, layer.kernel_size, dilation=layer.dilation, padding=layer.padding, stride=layer.stride
    )  # (N, C*kh*kw, L)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _width(layer: nn.Module) -> int:
    if isinstance(layer, nn.Linear):
        return int(layer.in_features)
    return int(layer.in_channels * layer.kernel_size[0] * layer.kernel_size[1])


@torch.no_grad()
def collect_input_stats(
    model: nn.Module,
    names: Sequence[str],
    images: torch.Tensor,
    *,
    batch: int = 16,
    max_bytes: int = 1 << 30,
    max_rows: int = 4096,
) -> dict[str, InputStats]:
    """Statistics of the inputs of layers ``names`` of ``model`` over ``images``.

    ``max_rows`` patches per layer and batch are kept (a fixed random subset of positions): large
    early feature maps have thousands of strongly correlated patches and a subset estimates the
    same covariance at a fraction of the cost.
    """
    model.eval()
    mods = {n: model.get_submodule(n) for n in names}
    todo = sorted(names, key=lambda n: _width(mods[n]))
    passes: list[list[str]] = [[]]
    used = 0
    for n in todo:
        b = 8 * _width(mods[n]) ** 2
        if passes[-1] and used + b > max_bytes:
            passes.append([])
            used = 0
        passes[-1].append(n)
        used += b
    out: dict[str, InputStats] = {}
    gen = torch.Generator().manual_seed(0)
    for group in passes:
        stats = {n: InputStats(_width(mods[n])) for n in group}

        def hook(name: str) -> Any:
            def fn(mod: nn.Module, inp: tuple[torch.Tensor, ...], _: Any) -> None:
                rows = unfold_input(mod, inp[0])
                if rows.shape[0] > max_rows:
                    rows = rows[torch.randperm(rows.shape[0], generator=gen)[:max_rows]]
                stats[name].add(rows)  # noqa: B023 (the hook is removed before stats is rebound)

            return fn

        handles = [mods[n].register_forward_hook(hook(n)) for n in group]
        try:
            for i in range(0, images.shape[0], batch):
                model(images[i : i + batch])
        finally:
            for h in handles:
                h.remove()
        out.update(stats)
    return out
