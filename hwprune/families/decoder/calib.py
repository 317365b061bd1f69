"""Decoder calibration data: texts from :mod:`hwprune.proxies.calib`, one right-padded row per text.

Each text becomes one row of exactly ``seq`` token ids (truncated, or right-padded with mask 0), so
a short text is fine: only its real tokens count, in the statistics (:mod:`.collect`) and in the
scorer (:mod:`.scorer`). Calibration, selection and report texts are disjoint (``split_corpus``). There
must be at least one sequence's worth of real tokens in each part; otherwise a one-line error says to add
text or lower ``--seq``. The tokenizer is the adapter's (``adapter.tokenize``); random-weight models
have none, so their tests build :class:`CalibData` from random token ids instead.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

import torch

from hwprune.errors import HwpruneError
from hwprune.proxies._base import CalibData
from hwprune.proxies.calib import load_texts

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
    n_report: int = 0,
    seq: int = 128,
    seed: int = 0,
) -> CalibData:
    """Tokenised calibration, selection (``heldout``) and report inputs (disjoint texts), each (n, seq) int64,
    right-padded.

    ``source``: a ``.txt`` / ``.jsonl`` file (``--calib``), or None for the built-in corpus.
    """
    if n_calib < 1 or n_heldout < 1 or n_report < 0 or seq < 2:
        raise HwpruneError(
            f"n_calib={n_calib}, n_heldout={n_heldout}, n_report={n_report}, seq={seq}: need n_calib >= 1, "
            "n_heldout >= 1, n_report >= 0 and seq >= 2"
        )
    sp = load_texts(source, n_calib=n_calib, n_selection=n_heldout, n_report=n_report, seed=seed)
    where = "built-in corpus" if source is None else str(source)
    parts = {"calibration": sp.calibration, "selection": sp.selection, "report": sp.report}
    tok = {k: adapter.tokenize(v, seq=seq) for k, v in parts.items() if v}
    for part, data in tok.items():
        check_right_padded(data, f"{where}: {part} tokens")
        real = int(data["attention_mask"].sum())
        if real < seq:
            raise HwpruneError(
                f"{where}: the {part} texts hold {real} tokens, less than one sequence (--seq {seq}); "
                "add text (--calib FILE), raise --n-calib / --n-heldout / --n-report or lower --seq"
            )
    corpus = sp.info["corpus"]
    return CalibData(
        calib=tok["calibration"],
        heldout=tok["selection"],
        report=tok.get("report", {}),
        source=f"{corpus['name']} [{corpus['digest']}] seed={seed} seq={seq}",
        splits={**sp.info, "seq": seq},
    )
