"""Parameter and FLOP counts of CNNs for manifests and Pareto sets (the encoder exporter does the rest).

FLOPs follow :mod:`hwprune.export.stats`: **2 x multiply-accumulates** of the matrix products only,
here every Conv2d (``out_h * out_w * c_out * c_in / groups * kh * kw`` per image) and Linear, for one
forward pass at the given input shape. BatchNorm (folded by every runtime), activations, pooling and
residual adds are left out. Counted by forward hooks on one forward pass, so any graph is covered.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from hwprune.export.stats import ModelStats, count_params

__all__ = ["cnn_macs", "cnn_stats"]


@torch.no_grad()
def cnn_macs(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Multiply-accumulates of every conv and linear layer for one forward pass on ``input_shape``."""
    total = 0

    def conv(m: nn.Conv2d, _: Any, out: torch.Tensor) -> None:
        nonlocal total
        kh, kw = m.kernel_size
        total += out.numel() * (m.in_channels // m.groups) * kh * kw

    def linear(m: nn.Linear, _: Any, out: torch.Tensor) -> None:
        nonlocal total
        total += out.numel() * m.in_features

    hooks = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(linear))
    was_training = model.training
    try:
        model.eval()(torch.zeros(*input_shape))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return int(total)


def cnn_stats(model: nn.Module, input_shape: Sequence[int]) -> ModelStats:
    """Params and FLOPs (2 x MACs) at ``input_shape``; ``seq`` holds the image height for the record."""
    return ModelStats(
        params=count_params(model),
        flops=2 * cnn_macs(model, input_shape),
        batch=int(input_shape[0]),
        seq=int(input_shape[2]),
    )
