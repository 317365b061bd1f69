"""Calibration, selection and held-out text for text families: a default corpus every machine has, or
the user's ``--calib FILE``. Each text family tokenises these its own way (``families/<name>/calib.py``).

The default corpus is the docstrings of a fixed list of Python standard-library modules: English
prose about software, present without any download. It depends on the Python version (docstrings
change between releases), so ``CalibData.source`` names the version. Texts are cleaned (doctests
and code-like lines dropped, whitespace collapsed), split into paragraphs of reasonable length,
deduplicated, shuffled with ``seed`` and split: the first ``n_heldout`` texts are held out (so the
held-out set does not move when ``n_calib`` changes), the next ``n_calib`` calibrate.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import random
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from hwprune.errors import HwpruneError

__all__ = ["default_corpus", "read_texts", "split_texts", "STDLIB_MODULES"]

# Pure-Python modules with long prose docstrings; a missing one (minimal builds) is skipped.
STDLIB_MODULES: tuple[str, ...] = (
    "argparse",
    "ast",
    "asyncio.events",
    "asyncio.streams",
    "base64",
    "bdb",
    "bisect",
    "calendar",
    "cmd",
    "codecs",
    "collections",
    "concurrent.futures",
    "configparser",
    "contextlib",
    "copy",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "dis",
    "doctest",
    "email.message",
    "email.utils",
    "enum",
    "filecmp",
    "fnmatch",
    "fractions",
    "ftplib",
    "functools",
    "getopt",
    "gettext",
    "glob",
    "gzip",
    "heapq",
    "hmac",
    "html.parser",
    "http.client",
    "http.cookiejar",
    "http.server",
    "imaplib",
    "inspect",
    "ipaddress",
    "json",
    "logging",
    "logging.handlers",
    "mailbox",
    "mimetypes",
    "numbers",
    "operator",
    "optparse",
    "os",
    "pathlib",
    "pdb",
    "pickle",
    "pickletools",
    "platform",
    "poplib",
    "pprint",
    "pydoc",
    "queue",
    "quopri",
    "random",
    "re",
    "sched",
    "selectors",
    "shelve",
    "shlex",
    "shutil",
    "smtplib",
    "socket",
    "socketserver",
    "statistics",
    "string",
    "subprocess",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "timeit",
    "tokenize",
    "trace",
    "traceback",
    "typing",
    "unittest.case",
    "unittest.mock",
    "urllib.parse",
    "urllib.request",
    "uuid",
    "warnings",
    "weakref",
    "xml.dom.minidom",
    "xml.etree.ElementTree",
    "zipfile",
)

_MIN_CHARS, _MAX_CHARS, _MIN_WORDS = 60, 600, 10
_CODE_LINE = re.compile(r"^\s*(>>>|\.\.\.|\$ |#|[-=~*]{3,}|:param|:return|:raises)")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def _docstrings(mod: Any) -> Iterator[str]:
    """Docstrings of a module, its public classes, functions and methods, in name order."""
    name = mod.__name__
    if mod.__doc__:
        yield mod.__doc__
    for attr, obj in sorted(vars(mod).items()):
        if attr.startswith("_") or getattr(obj, "__module__", None) != name:
            continue
        if (inspect.isclass(obj) or inspect.isfunction(obj)) and obj.__doc__:
            yield obj.__doc__  # own __doc__ only: getdoc would repeat the base class's text
        if inspect.isclass(obj):
            for m, f in sorted(vars(obj).items()):
                if (not m.startswith("_") or m == "__init__") and inspect.isfunction(f) and f.__doc__:
                    yield f.__doc__


def _paragraphs(doc: str) -> Iterator[str]:
    """Prose paragraphs of one docstring, each cut at sentence ends to at most ``_MAX_CHARS``."""
    for block in re.split(r"\n\s*\n", inspect.cleandoc(doc)):
        lines = block.splitlines()
        if not lines or any(_CODE_LINE.match(ln) for ln in lines) or lines[0].startswith((" ", "\t")):
            continue  # doctests, headings, indented code or field lists
        text = " ".join(ln.strip() for ln in lines)
        text = re.sub(r"\s+", " ", text).strip()
        if not text[:1].isupper():
            continue
        chunk = ""
        for sent in _SENTENCE_END.split(text):
            if chunk and len(chunk) + 1 + len(sent) > _MAX_CHARS:
                yield chunk
                chunk = ""
            chunk = f"{chunk} {sent}".strip()
        if chunk:
            yield chunk


def _is_prose(text: str) -> bool:
    if not _MIN_CHARS <= len(text) <= _MAX_CHARS or len(text.split()) < _MIN_WORDS:
        return False
    plain = sum(c.isalpha() or c in " ,.;:'-()" for c in text)
    return plain / len(text) >= 0.9  # mostly words, not signatures or tables


@functools.lru_cache(maxsize=1)
def _default_corpus() -> tuple[str, ...]:
    seen: set[str] = set()
    out: list[str] = []
    for name in STDLIB_MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:  # pragma: no cover - trimmed Python builds
            continue
        for doc in _docstrings(mod):
            for text in _pack(t for t in _paragraphs(doc) if _is_prose(t)):
                if text not in seen:
                    seen.add(text)
                    out.append(text)
    return tuple(out)


def default_corpus() -> list[str]:
    """Cleaned, deduplicated stdlib docstring paragraphs in a fixed order (per Python version)."""
    return list(_default_corpus())


def _pack(paras: Iterable[str]) -> Iterator[str]:
    """Join consecutive paragraphs of one docstring up to ``_MAX_CHARS``: longer texts, more tokens."""
    chunk = ""
    for p in paras:
        if chunk and len(chunk) + 1 + len(p) > _MAX_CHARS:
            yield chunk
            chunk = ""
        chunk = f"{chunk} {p}".strip()
    if chunk:
        yield chunk


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


def split_texts(
    texts: Sequence[str], *, n_calib: int, n_heldout: int, seed: int = 0, where: str = "texts"
) -> tuple[list[str], list[str]]:
    """(calibration, held-out): disjoint, deduplicated, shuffled by ``seed``; held-out comes first."""
    uniq = list(dict.fromkeys(texts))  # dedupe, keep first occurrence: held-out never repeats a calib text
    need = n_calib + n_heldout
    if len(uniq) < need:
        raise HwpruneError(
            f"{where}: {len(uniq)} distinct texts, but n_calib={n_calib} + n_heldout={n_heldout} "
            f"= {need} are needed; add texts or lower --n-calib / --n-heldout"
        )
    random.Random(seed).shuffle(uniq)
    return uniq[n_heldout:need], uniq[:n_heldout]
