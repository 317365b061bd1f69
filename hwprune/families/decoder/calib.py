"""Decoder calibration data: texts from :mod:`hwprune.proxies.calib`, one right-padded row per text.

Each text becomes one row of exactly ``seq`` token ids (truncated, or right-padded with mask 0), so
a short text is fine: only its real tokens count, in the statistics (:mod:`.collect`) and in the
scorer (:mod:`.scorer`). Calibration and held-out texts are disjoint (``split_texts``). There must be
at least one sequence's worth of real tokens in each part; otherwise a one-line error says to add
text or lower ``--seq``. The tokenizer is the adapter's (``adapter.tokenize``); random-weight models
have none, so their tests build :class:`CalibData` from random token ids instead.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

import torch

from hwprune.errors import HwpruneError
from hwprune.proxies._base import CalibData
from hwprune.proxies.calib import default_corpus, read_texts, split_texts

__all__ = ["load_calib", "check_right_padded"]


class _Tokenizes(Protocol):
    def tokenize(self, texts: Sequence[str], *, seq: int) -> dict[str, torch.Tensor]: ...


def check_right_padded(inputs: Mapping[str, torch.Tensor], where: str = "inputs") -> None:
    """Raise unless every row of ``attention_mask`` is ones then zeros (what the batching here relies on)."""
    mask = inputs["attention_mask"]
    if mask.ndim != 2 or inputs["input_ids"].shape != mask.shape:
        raise HwpruneError(
            f"{where}: input_ids {tuple(inputs['input_ids'].shape)} and attention_mask {tuple(mask.shape)} "
            "must both be (batch, seq)"
        )
    if bool((mask[:, 1:] > mask[:, :-1]).any()):
        raise HwpruneError(f"{where}: attention_mask must be right-padded (real tokens first, then padding)")


def load_calib(
    adapter: _Tokenizes,
    source: str | Path | None = None,
    *,
    n_calib: int = 128,
    n_heldout: int = 64,
    seq: int = 128,
    seed: int = 0,
) -> CalibData:
    """Tokenised calibration and held-out inputs (disjoint texts), each (n, seq) int64, right-padded.

    ``source``: a ``.txt`` / ``.jsonl`` file (``--calib``), or None for the default corpus.
    """
    if n_calib < 1 or n_heldout < 1 or seq < 2:
        raise HwpruneError(
            f"n_calib={n_calib}, n_heldout={n_heldout}, seq={seq}: need n_calib >= 1, n_heldout >= 1 and seq >= 2"
        )
    if source is None:
        ver = f"{sys.version_info.major}.{sys.version_info.minor}"
        texts, where, name = (
            default_corpus(),
            f"default corpus (Python {ver} stdlib docstrings)",
            f"stdlib-docstrings-py{ver}",
        )
    else:
        texts, where, name = read_texts(source), str(source), str(source)
    calib_texts, held_texts = split_texts(texts, n_calib=n_calib, n_heldout=n_heldout, seed=seed, where=where)
    calib = adapter.tokenize(calib_texts, seq=seq)
    heldout = adapter.tokenize(held_texts, seq=seq)
    for part, data in (("calibration", calib), ("held-out", heldout)):
        check_right_padded(data, f"{where}: {part} tokens")
        real = int(data["attention_mask"].sum())
        if real < seq:
            raise HwpruneError(
                f"{where}: the {part} texts hold {real} tokens, less than one sequence (--seq {seq}); "
                "add text (--calib FILE), raise --n-calib / --n-heldout or lower --seq"
            )
    return CalibData(calib=calib, heldout=heldout, source=f"{name} seed={seed} seq={seq}")
