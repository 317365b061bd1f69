"""Calibration, selection and report text for text families: the built-in corpus or the user's ``--calib FILE``.

Three disjoint, named splits (each text family tokenises them its own way, ``families/<name>/calib.py``):

- ``calibration``: what the proxies' statistics are computed on (``--n-calib``);
- ``selection``: what the search's end-to-end score is computed on, so what chooses the pick
  (``--n-heldout``; ``CalibData.heldout``);
- ``report``: what a pick's quality is reported on (``--n-report``): the search never sees it.

With the built-in corpus (:mod:`hwprune.proxies.corpus`) the report split comes from the report domain
(``legal``), which calibration and selection never draw from: held out by domain, not only by text.
Calibration and selection draw from the other domains in turn (each domain shuffled with ``seed``,
then one text of each domain in name order, round after round), so every domain is represented.
Selection comes first, so the selection texts do not move when ``n_calib`` changes. A user file has
one domain: its texts are deduplicated, shuffled with ``seed`` and split report first, then selection,
then calibration (held out by text only; the run's ``data`` says so).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hwprune.errors import HwpruneError
from hwprune.proxies.corpus import Corpus, default_corpus

__all__ = ["TextSplits", "load_texts", "read_texts", "split_corpus", "file_corpus"]

SPLITS = ("calibration", "selection", "report")


@dataclass(frozen=True)
class TextSplits:
    """Three disjoint lists of texts and a JSON description of where they came from."""

    calibration: list[str]
    selection: list[str]
    report: list[str]
    info: dict[str, Any]


def read_texts(file: str | Path) -> list[str]:
    """Texts of a ``.txt`` (one per non-empty line) or ``.jsonl`` (field ``"text"``) file, in file order."""
    path = Path(file)
    if not path.is_file():
        raise HwpruneError(f"calibration file {path} does not exist; pass a .txt or .jsonl file to --calib")
    ext = path.suffix.lower()
    if ext not in (".txt", ".jsonl"):
        raise HwpruneError(
            f"{path}: unknown calibration format {ext or '(no extension)'!r}; "
            'use .txt (one text per line) or .jsonl (one {"text": ...} object per line)'
        )
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        bad_line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise HwpruneError(f"{path}:{bad_line}: not valid UTF-8; save the file as UTF-8") from None
    texts: list[str] = []
    for lineno, text in enumerate(raw.splitlines(), start=1):
        line = text
        if not line.strip():
            continue
        if ext == ".txt":
            texts.append(line.strip())
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise HwpruneError(
                f'{path}:{lineno}: not valid JSON ({e.msg}); each line must be one object like {{"text": "..."}}'
            ) from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise HwpruneError(
                f'{path}:{lineno}: expected an object with a string field "text", '
                f"got {type(obj).__name__}{' without it' if isinstance(obj, dict) else ''}"
            )
        if obj["text"].strip():
            texts.append(obj["text"].strip())
    if not texts:
        raise HwpruneError(
            f'{path}: no texts found; put one text per line (.txt) or one {{"text": ...}} object per line (.jsonl)'
        )
    return texts


def file_corpus(file: str | Path) -> Corpus:
    """A user's ``--calib`` file as a one-domain corpus (texts deduplicated, file order)."""
    texts = tuple(dict.fromkeys(read_texts(file)))
    digest = hashlib.sha256(Path(file).read_bytes()).hexdigest()[:12]
    return Corpus(
        name=str(file),
        texts=texts,
        domains=("file",) * len(texts),
        sources={"file": f"{file} (sha256 {digest})"},
    )


def _interleave(groups: dict[str, list[str]], seed: int) -> list[str]:
    """Each group shuffled with its own seeded generator, then one text of each group in turn."""
    shuffled = []
    for name in sorted(groups):
        g = list(groups[name])
        random.Random(f"{seed}:{name}").shuffle(g)
        shuffled.append(g)
    out: list[str] = []
    for i in range(max((len(g) for g in shuffled), default=0)):
        out += [g[i] for g in shuffled if i < len(g)]
    return out


def _counts(texts: Sequence[str], domain_of: dict[str, str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in texts:
        out[domain_of[t]] = out.get(domain_of[t], 0) + 1
    return dict(sorted(out.items()))


def split_corpus(
    corpus: Corpus, *, n_calib: int, n_selection: int, n_report: int = 0, seed: int = 0, where: str | None = None
) -> TextSplits:
    """Disjoint calibration / selection / report texts of ``corpus`` (see the module docstring)."""
    where = where or corpus.name
    if n_calib < 1 or n_selection < 1 or n_report < 0:
        raise HwpruneError(
            f"n_calib={n_calib}, n_heldout={n_selection}, n_report={n_report}: "
            "need n_calib >= 1, n_heldout >= 1 and n_report >= 0"
        )
    groups = corpus.by_domain()
    domain_of = {t: d for d, t in zip(corpus.domains, corpus.texts)}
    rd = corpus.report_domain
    if rd is not None:
        if rd not in groups:
            raise HwpruneError(f"{where}: report domain {rd!r} has no texts")
        report_pool = list(groups.pop(rd))
        random.Random(f"{seed}:report:{rd}").shuffle(report_pool)
        if len(report_pool) < n_report:
            raise HwpruneError(
                f"{where}: the report domain {rd!r} has {len(report_pool)} texts, but n_report={n_report}; "
                "lower --n-report"
            )
        report, pool = report_pool[:n_report], _interleave(groups, seed)
    else:
        pool = _interleave(groups, seed)
        report, pool = pool[:n_report], pool[n_report:]
    need = n_calib + n_selection
    if len(pool) < need:
        extra = f" (+ n_report={n_report} held back)" if rd is None and n_report else ""
        raise HwpruneError(
            f"{where}: {len(pool)} distinct texts for calibration and selection{extra}, but n_calib={n_calib} "
            f"+ n_heldout={n_selection} = {need} are needed; add texts or lower --n-calib / --n-heldout / --n-report"
        )
    selection, calibration = pool[:n_selection], pool[n_selection:need]
    info: dict[str, Any] = {
        "corpus": corpus.describe(),
        "seed": seed,
        "held_out_by": "domain" if rd is not None else "text",
        "report_domain": rd,
        "splits": {
            name: {"n": len(ts), "domains": _counts(ts, domain_of)}
            for name, ts in zip(SPLITS, (calibration, selection, report))
        },
    }
    return TextSplits(calibration=calibration, selection=selection, report=report, info=info)


def load_texts(
    file: str | Path | None, *, n_calib: int, n_selection: int, n_report: int = 0, seed: int = 0
) -> TextSplits:
    """The three splits of ``file`` (``--calib``) or, when None, of the built-in corpus."""
    corpus = default_corpus() if file is None else file_corpus(file)
    where = f"built-in corpus {corpus.name}" if file is None else str(file)
    return split_corpus(corpus, n_calib=n_calib, n_selection=n_selection, n_report=n_report, seed=seed, where=where)
