"""End-to-end distance of a pruned CNN to the dense one on held-out images.

``distance = rel_mse = sum ||y - y_dense||^2 / sum ||y_dense - mean(y_dense)||^2`` over the model's
output (logits or features): 0 is the dense model, 1 is as far as predicting the average output.
``agreement`` is the fraction of held-out images whose arg-max class matches the dense model's and
``cosine`` the mean cosine similarity of outputs; with ``labels`` the ``accuracy`` is reported too.
``distance_se`` is the distance's standard error over the held-out images (``sqrt(N) * std_i(e_i) / E``
for per-image errors ``e_i`` and the fixed denominator ``E``): what the search's pick treats as a tie
(:func:`hwprune.search.pick_within`), so a flat score with random weights never decides the speedup.
The model handed in is scored as it is: proxies re-estimate BatchNorm before handing it over.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from hwprune.families._base import Family
from hwprune.proxies._base import CalibData

__all__ = ["CnnScorer"]


class CnnScorer:
    """Caches the dense model's outputs on the held-out images; ``score(model)`` compares against them."""

    def __init__(
        self,
        adapter: Family,
        images: torch.Tensor | Mapping[str, torch.Tensor],
        *,
        labels: torch.Tensor | None = None,
        batch: int = 64,
    ) -> None:
        """``images``: (N, C, H, W), or the held-out mapping of :class:`CalibData` (its ``input``)."""
        self.images = images["input"] if isinstance(images, Mapping) else images
        self.labels, self.batch = labels, batch
        self._dense = self._outputs(adapter.dense())
        centred = self._dense - self._dense.mean(0, keepdim=True)
        self._energy = float(centred.square().sum())

    @classmethod
    def from_calib(cls, adapter: Family, calib: CalibData, **kw: int) -> "CnnScorer":
        return cls(adapter, calib.heldout, **kw)  # type: ignore[arg-type]  # kw are the int options above

    @torch.no_grad()
    def _outputs(self, model: nn.Module) -> torch.Tensor:
        model.eval()
        out = [model(self.images[i : i + self.batch]).float() for i in range(0, self.images.shape[0], self.batch)]
        return torch.cat(out).reshape(self.images.shape[0], -1).double()

    def score(self, model: nn.Module) -> dict[str, float]:
        y = self._outputs(model)
        ref = self._dense
        per_image = (y - ref).square().sum(1)  # (N,)
        energy = max(self._energy, 1e-30)
        rel = float(per_image.sum()) / energy
        n = per_image.numel()
        se = float(per_image.std(unbiased=True)) * n**0.5 / energy if n > 1 else 0.0
        cos = float(nn.functional.cosine_similarity(y, ref, dim=1).mean())
        out = {
            "distance": rel,
            "rel_mse": rel,
            "distance_se": se,
            "cosine": cos,
            "agreement": float((y.argmax(1) == ref.argmax(1)).double().mean()),
        }
        if self.labels is not None:
            out["accuracy"] = float((y.argmax(1) == self.labels).double().mean())
        return out

    def outputs(self, model: nn.Module) -> Mapping[str, torch.Tensor]:
        return {"output": self._outputs(model)}
