"""Encoder calibration data: the three text splits of :mod:`hwprune.proxies.calib`, tokenised and padded to ``seq``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from hwprune.errors import HwpruneError
from hwprune.proxies._base import CalibData
from hwprune.proxies.calib import load_texts

if TYPE_CHECKING:
    from hwprune.families.encoder.adapter import EncoderAdapter

__all__ = ["load_calib"]


def load_calib(
    adapter: "EncoderAdapter",
    file: str | Path | None = None,
    *,
    n_calib: int = 128,
    n_heldout: int = 64,
    n_report: int = 0,
    seq: int = 128,
    seed: int = 0,
) -> CalibData:
    """Tokenised calibration, selection (``heldout``) and report inputs (disjoint texts) for ``adapter``."""
    if n_calib < 1 or n_heldout < 1 or n_report < 0 or seq < 8:
        raise HwpruneError(
            f"n_calib={n_calib}, n_heldout={n_heldout}, n_report={n_report}, seq={seq}: need n_calib >= 1, "
            "n_heldout >= 1, n_report >= 0 and seq >= 8"
        )
    sp = load_texts(file, n_calib=n_calib, n_selection=n_heldout, n_report=n_report, seed=seed)
    corpus = sp.info["corpus"]
    return CalibData(
        calib=adapter.tokenize(sp.calibration, seq=seq),
        heldout=adapter.tokenize(sp.selection, seq=seq),
        report=adapter.tokenize(sp.report, seq=seq) if sp.report else {},
        source=f"{corpus['name']} [{corpus['digest']}] seed={seed}",
        splits={**sp.info, "seq": seq},
    )
