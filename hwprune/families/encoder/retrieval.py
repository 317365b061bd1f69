"""Paragraph retrieval with sentence embeddings: does a pruned encoder still find the right paragraph?

Each text is cut in two at its middle word: the first half is a *query*, the second half a *document*.
Every query is embedded (mean pooling over real tokens, L2-normalised: :func:`.scorer.sentence_embeddings`)
and matched to the document of highest cosine among all the texts' second halves; top-1 accuracy is the
fraction of queries whose own second half wins. The dense model's accuracy is the reference: a pruned
model is judged by its accuracy over the dense one's on the same texts.
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

__all__ = ["halves", "embed", "retrieval_top1", "Retrieval"]


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


def retrieval_top1(query_emb: torch.Tensor, doc_emb: torch.Tensor) -> float:
    """Fraction of queries whose nearest document (cosine) is their own (row i <-> row i)."""
    best = (query_emb @ doc_emb.T).argmax(dim=1)
    return float((best == torch.arange(query_emb.shape[0])).double().mean())


class Retrieval:
    """Tokenises the halves of ``texts`` once; ``top1(model)`` is that model's top-1 accuracy."""

    def __init__(self, adapter: "EncoderAdapter", texts: Sequence[str], *, seq: int = 128) -> None:
        queries, docs = halves(texts)
        self.n = len(queries)
        self._q = adapter.tokenize(queries, seq=seq)
        self._d = adapter.tokenize(docs, seq=seq)
        self.dense_top1 = self.top1(adapter.dense())

    def top1(self, model: nn.Module) -> float:
        return retrieval_top1(embed(model, self._q), embed(model, self._d))
