"""Text cleaning for the built-in corpus: prose paragraphs out of docstrings, license files and READMEs.

``paragraphs`` splits a text at blank lines, drops doctests, headings, indented code and field lists,
collapses whitespace and cuts long paragraphs at sentence ends; ``is_prose`` keeps 60-600 characters of
mostly words; ``pack`` joins consecutive short paragraphs of one document up to 600 characters.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterable, Iterator
from typing import Any

__all__ = ["STDLIB_MODULES", "docstrings", "paragraphs", "is_prose", "pack"]

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


def docstrings(mod: Any) -> Iterator[str]:
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
                # own methods only: a library may patch one in (transformers adds Logger.warning_advice)
                own = getattr(f, "__module__", None) == name
                if (not m.startswith("_") or m == "__init__") and inspect.isfunction(f) and own and f.__doc__:
                    yield f.__doc__


def paragraphs(doc: str) -> Iterator[str]:
    """Prose paragraphs of one docstring, each cut at sentence ends to at most ``_MAX_CHARS``."""
    for block in re.split(r"\n\s*\n", inspect.cleandoc(doc)):
        lines = block.splitlines()
        if not lines or any(_CODE_LINE.match(ln) for ln in lines) or lines[0].startswith((" ", "\t")):
            continue  # doctests, headings, indented code or field lists
        text = " ".join(ln.strip() for ln in lines)
        text = re.sub(r"\s+", " ", text).strip()
        if not text[:1].isupper():
            continue
        yield from pack(_SENTENCE_END.split(text))  # sentences joined up to _MAX_CHARS


def is_prose(text: str) -> bool:
    if not _MIN_CHARS <= len(text) <= _MAX_CHARS or len(text.split()) < _MIN_WORDS:
        return False
    plain = sum(c.isalpha() or c in " ,.;:'-()" for c in text)
    return plain / len(text) >= 0.9  # mostly words, not signatures or tables


def pack(paras: Iterable[str]) -> Iterator[str]:
    """Join consecutive pieces (paragraphs of one docstring, sentences of one paragraph) up to
    ``_MAX_CHARS``: longer texts, more tokens."""
    chunk = ""
    for p in paras:
        if chunk and len(chunk) + 1 + len(p) > _MAX_CHARS:
            yield chunk
            chunk = ""
        chunk = f"{chunk} {p}".strip()
    if chunk:
        yield chunk
