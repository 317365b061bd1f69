"""End-to-end distance of a pruned encoder to the dense one on held-out text.

``cosine`` is the mean cosine similarity of sentence embeddings -- mean pooling over real tokens
(masked by ``attention_mask``) then L2 normalisation, which is how all-MiniLM-L6-v2 makes them;
``distance = 1 - cosine`` is the search objective (lower is better); ``rel_mse`` is
``sum ||y - y_dense||^2 / sum ||y_dense||^2`` of last hidden states over non-padding tokens.

Batches are sorted by length and cut to their longest row; with right padding and a -1e4
additive mask, trailing pads change no real token's output, so this is exact and cheaper.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from hwprune.families._base import Family
from hwprune.proxies._base import CalibData
from hwprune.proxies.stats import length_batches, num_threads

__all__ = ["EndToEndScorer", "sentence_embeddings"]


def sentence_embeddings(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens, then L2-normalised: (batch, seq, d), (batch, seq) -> (batch, d)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)
    return nn.functional.normalize(pooled, dim=-1)


class EndToEndScorer:
    """Caches the dense model's outputs on ``heldout_inputs``; ``score(model)`` compares against them."""

    def __init__(
        self,
        adapter: Family,
        heldout_inputs: Mapping[str, torch.Tensor],
        *,
        batch: int = 32,
        threads: int | None = None,
    ) -> None:
        self.adapter, self.threads = adapter, threads
        self._batches = length_batches(heldout_inputs, batch)
        self._dense = [self._outputs(adapter.dense(), ids, mask) for ids, mask in self._batches]
        self._dense_energy = sum(float(h.double().square().sum()) for h, _ in self._dense)

    @classmethod
    def from_calib(cls, adapter: Family, calib: CalibData, **kw: int | None) -> "EndToEndScorer":
        return cls(adapter, calib.heldout, **kw)  # type: ignore[arg-type]  # kw are the int options above

    @property
    def n(self) -> int:
        return sum(int(ids.shape[0]) for ids, _ in self._batches)

    def _outputs(self, model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden states of real tokens (tokens, d), sentence embeddings (batch, d))."""
        with torch.inference_mode(), num_threads(self.threads):
            hidden = model(ids, mask).float()
        return hidden[mask.bool()], sentence_embeddings(hidden, mask)

    def score(self, model: nn.Module) -> dict[str, float]:
        """``{"cosine", "distance", "rel_mse"}`` of ``model`` against the dense outputs."""
        cos_sum, err = 0.0, 0.0
        for (ids, mask), (h_ref, e_ref) in zip(self._batches, self._dense):
            h, e = self._outputs(model, ids, mask)
            cos_sum += float((e * e_ref).sum(-1).double().sum())
            err += float((h - h_ref).double().square().sum())
        cosine = cos_sum / max(self.n, 1)
        return {"cosine": cosine, "distance": 1.0 - cosine, "rel_mse": err / max(self._dense_energy, 1e-30)}
