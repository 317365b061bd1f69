"""End-to-end distance of a pruned decoder to the dense one on held-out text: next-token distributions.

``distance = kl`` is the mean over real (non-pad) positions of ``KL(p_dense || p_pruned)`` of the
next-token distributions, in nats: 0 for the dense model, the search objective. ``top1_agreement`` is
the fraction of those positions whose arg-max token matches the dense model's. ``perplexity`` is the
pruned model's on the held-out tokens (positions whose next token is real), ``dense_perplexity``
the dense model's on the same tokens.

Memory: the dense log-probabilities of every real position take ``4 * tokens * vocab`` bytes (64 rows
of 128 tokens at SmolLM2's 49152 words: up to 1.6 GB; real held-out texts are shorter than ``seq``,
typically half of that). They are cached in float32 when they fit in ``cache_mb`` (default 1 GiB),
else recomputed batch by batch at every :meth:`DecoderScorer.score` (exact either way, twice the
compute). Per batch the scorer holds ``(batch, len, vocab)`` float32 logits twice (logits and
log-probs): 8 x 128 x 49152 x 4 B = 200 MB each; the KL then runs 256 positions at a time.

Batches are length-sorted and cut to their longest row (``length_batches``): with right padding and
causal attention, trailing pads change no real token's output, so this is exact and cheaper.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from hwprune.families._base import Family
from hwprune.proxies._base import CalibData
from hwprune.proxies.stats import length_batches, num_threads

from .calib import check_right_padded

__all__ = ["DecoderScorer", "next_token_logprobs"]


def next_token_logprobs(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Log-softmax of ``model``'s logits (batch, len, vocab) float32 for ids/mask (batch, len)."""
    logits = model(ids, mask)
    return torch.log_softmax(logits.float(), dim=-1)


def _kl_sum(ref: torch.Tensor, q: torch.Tensor, rows: int = 256) -> float:
    """Sum over rows of KL(exp(ref) || exp(q)) for log-probs (positions, vocab); ``rows`` at a time (bounded
    temporaries). Each row is clamped at 0: KL is, float rounding may dip a hair below."""
    total = 0.0
    for i in range(0, ref.shape[0], rows):
        r, lq = ref[i : i + rows], q[i : i + rows]
        total += float((r.exp() * (r - lq)).sum(-1).clamp_min(0.0).double().sum())
    return total


def _perplexity(nll: float, n: int) -> float:
    """exp(mean NLL); NaN without targets, inf past float range (a wrecked model)."""
    if n == 0:
        return math.nan
    mean = nll / n
    return math.exp(mean) if mean < 700 else math.inf


class DecoderScorer:
    """Caches the dense model's next-token figures on ``heldout``; ``score(model)`` compares against them."""

    def __init__(
        self,
        adapter: Family,
        heldout: Mapping[str, torch.Tensor],
        *,
        batch: int = 8,
        threads: int | None = None,
        cache_mb: float = 1024.0,
    ) -> None:
        check_right_padded(heldout, "held-out inputs")
        self.adapter, self.threads = adapter, threads
        self._batches = length_batches(heldout, batch)
        n_real = int(heldout["attention_mask"].sum())
        self.cached = True  # decided at the first batch, which gives the vocabulary size
        self._logp: list[torch.Tensor] = []  # per batch (real positions, vocab) float32, when cached
        self._top1: list[torch.Tensor] = []  # per batch (real positions,) int64
        nll, self.n_targets = 0.0, 0
        for ids, mask in self._batches:
            logp = self._dense_logp(ids, mask)
            if not self._top1:
                self.cached = 4.0 * n_real * logp.shape[-1] <= cache_mb * 2**20
            b_nll, b_n = self._nll(logp, ids, mask)
            nll, self.n_targets = nll + b_nll, self.n_targets + b_n
            real = logp[mask.bool()]
            self._top1.append(real.argmax(-1))
            if self.cached:
                self._logp.append(real)
            del logp
        self.n_positions = n_real
        self.dense_perplexity = _perplexity(nll, self.n_targets)

    @classmethod
    def from_calib(cls, adapter: Family, calib: CalibData, **kw: float | int | None) -> DecoderScorer:
        return cls(adapter, calib.heldout, **kw)  # type: ignore[arg-type]  # kw are the options above

    def _dense_logp(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Dense log-probs of one batch: (batch, len, vocab) float32."""
        with torch.inference_mode(), num_threads(self.threads):
            return next_token_logprobs(self.adapter.dense(), ids, mask)

    @staticmethod
    def _nll(logp: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> tuple[float, int]:
        """Summed negative log-likelihood of every real next token, and how many there are."""
        tgt = mask[:, 1:].bool() & mask[:, :-1].bool()  # position t predicts token t + 1
        picked = logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)[tgt]
        return -float(picked.double().sum()), int(tgt.sum())

    def score(self, model: nn.Module) -> dict[str, float]:
        """``{"distance", "kl", "top1_agreement", "perplexity", "dense_perplexity"}`` of ``model``."""
        kl, agree, nll = 0.0, 0, 0.0
        for i, (ids, mask) in enumerate(self._batches):
            ref = self._logp[i] if self.cached else self._dense_logp(ids, mask)[mask.bool()]
            with torch.inference_mode(), num_threads(self.threads):
                logq = next_token_logprobs(model, ids, mask)
                b_nll, _ = self._nll(logq, ids, mask)
                q = logq[mask.bool()]
                del logq
                kl += _kl_sum(ref, q)
            agree += int((q.argmax(-1) == self._top1[i]).sum())
            nll += b_nll
        n = max(self.n_positions, 1)
        ppl = _perplexity(nll, self.n_targets)
        return {
            "distance": kl / n,
            "kl": kl / n,
            "top1_agreement": agree / n,
            "perplexity": ppl,
            "dense_perplexity": self.dense_perplexity,
        }
