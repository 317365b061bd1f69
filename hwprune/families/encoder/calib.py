"""Encoder calibration data: tokenised texts from :mod:`hwprune.proxies.calib`, padded to ``seq``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

from hwprune.errors import HwpruneError
from hwprune.proxies._base import CalibData
from hwprune.proxies.calib import default_corpus, read_texts, split_texts

if TYPE_CHECKING:
    from hwprune.families.encoder.adapter import EncoderAdapter

__all__ = ["load_calib"]


def load_calib(
    adapter: "EncoderAdapter",
    file: str | Path | None = None,
    *,
    n_calib: int = 128,
    n_heldout: int = 64,
    seq: int = 128,
    seed: int = 0,
) -> CalibData:
    """Tokenised calibration and held-out inputs (disjoint) for ``adapter`` ."""
    if n_calib < 1 or n_heldout < 1 or seq < 8:
        raise HwpruneError(
            f"n_calib={n_calib}, n_heldout={n_heldout}, seq={seq}: need n_calib >= 1, n_heldout >= 1 and seq >= 8"
        )
    if file is None:
        ver = f"{sys.version_info.major}.{sys.version_info.minor}"
        texts, where = default_corpus(), f"default corpus (Python {ver} stdlib docstrings)"
        source = f"stdlib-docstrings-py{ver}"
    else:
        texts, where = read_texts(file), str(file)
        source = str(file)
    calib, heldout = split_texts(texts, n_calib=n_calib, n_heldout=n_heldout, seed=seed, where=where)
    return CalibData(
        calib=adapter.tokenize(calib, seq=seq),
        heldout=adapter.tokenize(heldout, seq=seq),
        source=f"{source} seed={seed}",
    )
