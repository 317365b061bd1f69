"""FLAP maths (An et al., AAAI 2024): fluctuation scores and bias compensation, for every family.

The fluctuation of input channel j of an output projection is Var(x_j) * ||W[:, j]||^2: a channel
that barely varies can be replaced by its mean, which the bias absorbs (b += W[:, P] mean(x_P)).
"""

from __future__ import annotations

import torch

__all__ = ["compensated_bias", "fluctuation"]


def fluctuation(weight: torch.Tensor, var: torch.Tensor, granule: int = 1) -> torch.Tensor:
    """Var(x_j) * ||W[:, j]||^2 summed over each element's ``granule`` columns: (n,) for (out, n*granule)."""
    return (var * weight.square().sum(0)).reshape(-1, granule).sum(1)


def compensated_bias(
    weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor, kept_cols: torch.Tensor
) -> torch.Tensor:
    """b + W[:, P] mean(x_P) for the removed columns P: the removed channels' average contribution."""
    removed = torch.ones(weight.shape[1], dtype=torch.bool)
    removed[kept_cols] = False
    return bias + weight[:, removed] @ mean[removed]
