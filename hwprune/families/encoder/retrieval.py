"""Paragraph retrieval with sentence embeddings: does a pruned encoder still find the right paragraph?

Each text is cut in two at its middle word: the first half is a *query*, the second half a *document*.
Every query is embedded (mean pooling over real tokens, L2-normalised: :func:`.scorer.sentence_embeddings`)
and matched to the document of highest cosine among all the texts' second halves; top-1 accuracy is the
fraction of queries whose own second half wins. The dense model's accuracy is the reference: a pruned
model is judged by its accuracy over the dense one's on the same texts.

That ratio is a count over a count: with MiniLM's dense top-1 near 0.3 on 100 paragraphs (every built-in
domain tried: 0.25-0.46), one query more or less moves it by ~3.5 %. :meth:`Retrieval.score`
therefore also gives its paired bootstrap interval (the same queries resampled for both models), so a figure
is read with the precision its split allows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from hwprune.errors import HwpruneError
from hwprune.families.encoder.scorer import sentence_embeddings

if TYPE_CHECKING:
    from hwprune.families.encoder.adapter import EncoderAdapter

__all__ = ["halves", "embed", "retrieval_hits", "retrieval_top1", "ratio_interval", "Retrieval"]


def halves(texts: Sequence[str], *, min_words: int = 8) -> tuple[list[str], list[str]]:
    """(queries, documents): each text with at least ``min_words`` words cut at its middle word."""
    queries, docs = [], []
    for t in texts:
        words = t.split()
        if len(words) < min_words:
            continue
        mid = len(words) // 2
        queries.append(" ".join(words[:mid]))
        docs.append(" ".join(words[mid:]))
    if len(queries) < 2:
        raise HwpruneError(f"retrieval needs at least 2 texts of {min_words}+ words, got {len(queries)}")
    return queries, docs


@torch.inference_mode()
def embed(model: nn.Module, inputs: dict[str, torch.Tensor], *, batch: int = 32) -> torch.Tensor:
    """Sentence embeddings (n, d), L2-normalised, of tokenised ``inputs``."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    out = []
    for i in range(0, ids.shape[0], batch):
        m = mask[i : i + batch]
        n = int(m.sum(1).max())  # right padding: cut to the longest row, exact
        hidden = model(ids[i : i + batch, :n], m[:, :n]).float()
        out.append(sentence_embeddings(hidden, m[:, :n]))
    return torch.cat(out)


def retrieval_hits(query_emb: torch.Tensor, doc_emb: torch.Tensor) -> torch.Tensor:
    """Per query: is its nearest document (cosine) its own (row i <-> row i)? A bool vector."""
    best = (query_emb @ doc_emb.T).argmax(dim=1)
    return best == torch.arange(query_emb.shape[0])


def retrieval_top1(query_emb: torch.Tensor, doc_emb: torch.Tensor) -> float:
    """Fraction of queries whose nearest document (cosine) is their own (row i <-> row i)."""
    return float(retrieval_hits(query_emb, doc_emb).double().mean())


def ratio_interval(
    hits: torch.Tensor, ref_hits: torch.Tensor, *, level: float = 0.95, draws: int = 4000, seed: int = 0
) -> tuple[float, float] | None:
    """Paired bootstrap interval of ``hits.sum() / ref_hits.sum()``: queries are resampled with replacement,
    the same draw for both models; the ``level`` percentile interval of the ratios. None when the reference
    finds nothing (no ratio to speak of)."""
    if hits.shape != ref_hits.shape:
        raise ValueError(f"{tuple(hits.shape)} hits against {tuple(ref_hits.shape)}")
    if not bool(ref_hits.any()):
        return None
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, hits.shape[0], (draws, hits.shape[0]), generator=g)
    num = hits.double()[idx].sum(1)
    den = ref_hits.double()[idx].sum(1)
    ratios = (num[den > 0] / den[den > 0]).sort().values
    lo = ratios[int((1 - level) / 2 * (len(ratios) - 1))]
    hi = ratios[int((1 + level) / 2 * (len(ratios) - 1))]
    return float(lo), float(hi)


class Retrieval:
    """Tokenises the halves of ``texts`` once; ``top1(model)`` is that model's top-1 accuracy."""

    def __init__(self, adapter: "EncoderAdapter", texts: Sequence[str], *, seq: int = 128) -> None:
        queries, docs = halves(texts)
        self.n = len(queries)
        self._q = adapter.tokenize(queries, seq=seq)
        self._d = adapter.tokenize(docs, seq=seq)
        self.dense_hits = self.hits(adapter.dense())
        self.dense_top1 = float(self.dense_hits.double().mean())

    def hits(self, model: nn.Module) -> torch.Tensor:
        """Per query: did ``model`` find its own second half?"""
        return retrieval_hits(embed(model, self._q), embed(model, self._d))

    def top1(self, model: nn.Module) -> float:
        return float(self.hits(model).double().mean())

    def score(self, model: nn.Module) -> tuple[float, tuple[float, float] | None]:
        """``model``'s top-1 and the paired bootstrap interval of its ratio to the dense model's
        (:func:`ratio_interval`), from one embedding pass."""
        hits = self.hits(model)
        return float(hits.double().mean()), ratio_interval(hits, self.dense_hits)
