"""End-to-end distance of a pruned decoder to the dense one on held-out text: next-token distributions.

``distance = kl`` is the mean over real (non-pad) positions of ``KL(p_dense || p_pruned)`` of the
next-token distributions, in nats: 0 for the dense model, the search objective. ``top1_agreement`` is
the fraction of those positions whose arg-max token matches the dense model's. ``perplexity`` is the
pruned model's on the held-out tokens (positions whose next token is real), ``dense_perplexity``
the dense model's on the same tokens.

Memory: the dense log-probabilities of every real position take ``4 * tokens * vocab`` bytes (16 rows
of 256 tokens at SmolLM2's 49152 words: up to 0.8 GB; at LLaMA-3.2-1B's 128256 words 2.1 GB). They
stay in memory when that is at most ``cache_mb`` (default: 10 % of the dense weights, at most 1 GiB),
else they go to an unlinked temporary file, float32, read back one chunk at a time at every
:meth:`DecoderScorer.score` (from the page cache, which a process's resident size does not count;
exact either way). Logits are computed for real positions only, ``rows`` positions at a time (about
32 MB of float32 per tensor), never as ``(batch, len, vocab)``. Models run layer-major, so a
:class:`PrunedView` costs one pruned block at a time.

Batches are length-sorted and cut to their longest row (``length_batches``): with right padding and
causal attention, trailing pads change no real token's output, so this is exact and cheaper.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Mapping

import torch
from torch import nn

from hwprune._mem import release
from hwprune.families._base import Family
from hwprune.proxies._base import CalibData
from hwprune.proxies.stats import length_batches, num_threads

from .calib import check_right_padded
from .model import Decoder
from .stream import PrunedView, run_layer_major

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


def _targets(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per real position (mask order), the id of the next token, or -1 where there is none (int64)."""
    nxt = torch.full_like(ids, -1)
    ok = mask[:, 1:].bool() & mask[:, :-1].bool()  # position t predicts token t + 1
    nxt[:, :-1] = torch.where(ok, ids[:, 1:], torch.full_like(ids[:, 1:], -1))
    return nxt[mask.bool()]


def _stream_model(model: nn.Module) -> Decoder | PrunedView:
    if not isinstance(model, (Decoder, PrunedView)):
        raise TypeError(f"the decoder scorer needs a Decoder or a PrunedView, got {type(model).__name__}")
    return model


class DecoderScorer:
    """Caches the dense model's next-token figures on ``heldout``; ``score(model)`` compares against them.

    Models run layer-major (:func:`.stream.run_layer_major`): a :class:`PrunedView` (what the search
    scores) costs one pruned block at a time. Logits are computed for real positions only, ``rows`` at a
    time, so no ``(batch, seq, vocab)`` tensor is ever built.
    """

    def __init__(
        self,
        adapter: Family,
        heldout: Mapping[str, torch.Tensor],
        *,
        batch: int = 8,
        threads: int | None = None,
        cache_mb: float | None = None,
        rows: int | None = None,
    ) -> None:
        check_right_padded(heldout, "held-out inputs")
        self.adapter, self.threads = adapter, threads
        dense = adapter.dense()
        assert isinstance(dense, Decoder)
        self._batches = length_batches(heldout, batch)
        self._targets = [_targets(ids, mask) for ids, mask in self._batches]
        vocab = self.vocab = dense.config.vocab_size
        self.rows = rows or max(16, int(4e6 // vocab))  # logits rows per step: ~16 MB of float32 per tensor
        self.n_positions = int(heldout["attention_mask"].sum())
        if cache_mb is None:
            weights = sum(p.numel() * p.element_size() for p in dense.parameters())
            cache_mb = min(1024.0, 0.1 * weights / 2**20)
        self.cached = 4.0 * self.n_positions * vocab <= cache_mb * 2**20
        self._file = None if self.cached else tempfile.TemporaryFile(prefix="hwprune-dense-logp-")  # noqa: SIM115  # unlinked; closed with the scorer
        self._offsets: list[int] = []  # per batch, its first byte in the file
        with torch.inference_mode(), num_threads(threads):
            self._dense_rows = self._real_rows(dense)  # per batch (real positions, hidden): small
        self._logp: list[torch.Tensor] = []  # per batch (real positions, vocab) float32, when cached
        self._top1: list[torch.Tensor] = []  # per batch (real positions,) int64
        nll, self.n_targets = 0.0, 0
        with torch.inference_mode(), num_threads(threads):
            for hs, tgt in zip(self._dense_rows, self._targets):
                if not self.cached:
                    assert self._file is not None
                    self._offsets.append(self._file.tell())
                kept, top = [], []
                for r, t in zip(hs.split(self.rows), tgt.split(self.rows)):  # one chunk of logits at a time
                    c = torch.log_softmax(dense.head(r).float(), -1)
                    nll += _nll(c, t)
                    top.append(c.argmax(-1))
                    if self.cached:
                        kept.append(c)
                    else:
                        assert self._file is not None
                        self._file.write(c.contiguous().numpy().tobytes())
                    del c
                self._top1.append(torch.cat(top))
                if self.cached:
                    self._logp.append(torch.cat(kept))
                del kept
        if self._file is not None:
            self._file.flush()
        release()
        self.n_targets = int(sum(int((t >= 0).sum()) for t in self._targets))
        self.dense_perplexity = _perplexity(nll, self.n_targets)

    @classmethod
    def from_calib(cls, adapter: Family, calib: CalibData, **kw: float | int | None) -> DecoderScorer:
        return cls(adapter, calib.heldout, **kw)  # type: ignore[arg-type]  # kw are the options above

    def _real_rows(self, model: Decoder | PrunedView) -> list[torch.Tensor]:
        """Final residual streams (before the final norm) at real positions, one (positions, hidden) per batch."""
        outs = run_layer_major(model, self._batches)  # type: ignore[arg-type]  # duck-typed: Decoder or view
        return [x[mask.bool()] for x, (_, mask) in zip(outs, self._batches)]

    def _dense_logp(self, i: int, j: int) -> torch.Tensor:
        """Dense log-probs of rows chunk ``j`` of batch ``i``: (rows, vocab) float32."""
        if self.cached:
            return self._logp[i][j * self.rows : (j + 1) * self.rows]
        assert self._file is not None
        n = min(self.rows, self._dense_rows[i].shape[0] - j * self.rows)
        row_bytes = 4 * self.vocab
        buf = bytearray(n * row_bytes)
        start, got = self._offsets[i] + j * self.rows * row_bytes, 0
        view = memoryview(buf)
        while got < len(buf):  # pread may return fewer bytes than asked
            k = os.preadv(self._file.fileno(), [view[got:]], start + got)
            if k <= 0:
                raise OSError(f"the scorer's temporary file ended early ({got} of {len(buf)} bytes)")
            got += k
        return torch.frombuffer(buf, dtype=torch.float32).view(n, self.vocab)

    def score(self, model: nn.Module) -> dict[str, float]:
        """``{"distance", "kl", "top1_agreement", "perplexity", "dense_perplexity"}`` of ``model``."""
        m = _stream_model(model)
        kl, agree, nll = 0.0, 0, 0.0
        with torch.inference_mode(), num_threads(self.threads):
            rows = self._real_rows(m)
            for i, (r, tgt) in enumerate(zip(rows, self._targets)):
                for j, (rc, tc) in enumerate(zip(r.split(self.rows), tgt.split(self.rows))):
                    logq = torch.log_softmax(m.head(rc).float(), -1)
                    kl += _kl_sum(self._dense_logp(i, j), logq)
                    nll += _nll(logq, tc)
                    top = self._top1[i][j * self.rows : (j + 1) * self.rows]
                    agree += int((logq.argmax(-1) == top).sum())
                    del logq
            del rows
        release()
        n = max(self.n_positions, 1)
        return {
            "distance": kl / n,
            "kl": kl / n,
            "top1_agreement": agree / n,
            "perplexity": _perplexity(nll, self.n_targets),
            "dense_perplexity": self.dense_perplexity,
        }


def _nll(logp: torch.Tensor, targets: torch.Tensor) -> float:
    """Summed negative log-likelihood of the rows with a next token (target >= 0)."""
    ok = targets >= 0
    return -float(logp[ok].gather(-1, targets[ok, None]).double().sum())
