"""The built-in text corpus: prose that ships with Python and with hwprune's own dependencies, by domain.

Nothing is downloaded. Each domain reads text already on the machine, in a fixed order, so the corpus
is deterministic given the Python version and the installed package versions (``Corpus.digest``
changes when either does):

- ``python-docstrings``: docstrings of a fixed list of standard-library modules (software API prose);
- ``python-reference``: the Python language reference as the standard library ships it for ``help()``
  (``pydoc_data.topics``);
- ``mathematics``: docstrings of SymPy's and mpmath's function, number-theory, statistics and geometry
  modules (installed with torch), read from source with :mod:`ast`, never imported;
- ``package-descriptions``: the long descriptions (README text) in the metadata of a fixed list of
  installed distributions (hwprune's dependencies and theirs);
- ``legal``: the license and notice files in those distributions' metadata.

``legal`` is the *report* domain: :func:`hwprune.proxies.calib.split_corpus` keeps it out of
calibration and selection, so a pick is reported on a domain the search never saw. Every text is
cleaned (doctests and code-like lines dropped, whitespace collapsed), cut into paragraphs of 60-600
characters, and deduplicated: a text is dropped when half of its 5-word shingles (case and punctuation
ignored) already appeared in texts kept before it, so near-copies (the same license clause with
another name and year) count once; paragraph retrieval on the report domain needs distinct texts.
A domain with fewer than :data:`MIN_PER_DOMAIN` texts fails with one line naming what is missing.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib
import importlib.metadata as md
import importlib.util
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hwprune.errors import HwpruneError
from hwprune.proxies.textclean import STDLIB_MODULES, docstrings, is_prose, pack, paragraphs

__all__ = ["Corpus", "default_corpus", "DOMAINS", "REPORT_DOMAIN", "MIN_PER_DOMAIN"]

REPORT_DOMAIN = "legal"
MIN_PER_DOMAIN = 64
_SHINGLE, _NEAR_COPY = 5, 0.5  # a text half of whose 5-word shingles appeared before is a near-copy
CORPUS_NAME = "hwprune-builtin-v2"

# hwprune's dependencies and theirs, in a fixed order; a missing one is skipped (and named in the corpus)
DISTRIBUTIONS: tuple[str, ...] = (
    "torch",
    "torchvision",
    "numpy",
    "onnx",
    "onnxruntime",
    "optuna",
    "pandas",
    "pyarrow",
    "matplotlib",
    "typer",
    "rich",
    "pyyaml",
    "safetensors",
    "tokenizers",
    "gguf",
    "torch-pruning",
    "py-cpuinfo",
    "sympy",
    "mpmath",
    "networkx",
    "jinja2",
    "markupsafe",
    "filelock",
    "fsspec",
    "pillow",
    "protobuf",
    "sqlalchemy",
    "alembic",
    "mako",
    "colorlog",
    "click",
    "pygments",
    "markdown-it-py",
    "mdurl",
    "shellingham",
    "packaging",
    "tqdm",
    "contourpy",
    "cycler",
    "fonttools",
    "kiwisolver",
    "pyparsing",
    "python-dateutil",
    "tzdata",
    "typing-extensions",
    "flatbuffers",
    "coloredlogs",
    "humanfriendly",
    "greenlet",
    "huggingface-hub",
)

# SymPy / mpmath source folders and files with prose docstrings (relative to the package root)
MATH_SOURCES: tuple[tuple[str, str], ...] = (
    ("mpmath", "function_docs.py"),
    ("mpmath", "calculus"),
    ("mpmath", "functions"),
    ("sympy", "functions"),
    ("sympy", "ntheory"),
    ("sympy", "stats"),
    ("sympy", "geometry"),
    ("sympy", "combinatorics"),
    ("sympy", "integrals"),
    ("sympy", "series"),
    ("sympy", "sets"),
    ("sympy", "logic"),
    ("sympy", "physics"),
)


@dataclass(frozen=True)
class Corpus:
    """Texts with their domain (parallel tuples), a name and where each domain's text came from."""

    name: str
    texts: tuple[str, ...]
    domains: tuple[str, ...]
    sources: dict[str, str]
    report_domain: str | None = None

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.domains):
            raise ValueError(f"{len(self.texts)} texts but {len(self.domains)} domains")

    @property
    def digest(self) -> str:
        """First 12 hex digits of the SHA-256 of every (domain, text): changes with any text."""
        h = hashlib.sha256()
        for d, t in zip(self.domains, self.texts):
            h.update(f"{d}\t{t}\n".encode())
        return h.hexdigest()[:12]

    def by_domain(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for d, t in zip(self.domains, self.texts):
            out.setdefault(d, []).append(t)
        return out

    def describe(self) -> dict[str, Any]:
        counts = {d: len(ts) for d, ts in sorted(self.by_domain().items())}
        return {"name": self.name, "digest": self.digest, "texts_by_domain": counts, "sources": dict(self.sources)}


# ---- domains ---------------------------------------------------------------------------------------

Extractor = Callable[[], tuple[Iterator[str], str]]
DOMAINS: dict[str, Extractor] = {}


def _domain(name: str) -> Callable[[Extractor], Extractor]:
    def deco(fn: Extractor) -> Extractor:
        DOMAINS[name] = fn
        return fn

    return deco


def _prose(raw: Iterable[str]) -> Iterator[str]:
    for doc in raw:
        yield from pack(t for t in paragraphs(doc) if is_prose(t))


def _pyver() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


@_domain("python-docstrings")
def _python_docstrings() -> tuple[Iterator[str], str]:
    def gen() -> Iterator[str]:
        for name in STDLIB_MODULES:
            try:
                mod = importlib.import_module(name)
            except ImportError:  # pragma: no cover - trimmed Python builds
                continue
            yield from _prose(docstrings(mod))

    return gen(), f"docstrings of {len(STDLIB_MODULES)} standard-library modules (Python {_pyver()})"


@_domain("python-reference")
def _python_reference() -> tuple[Iterator[str], str]:
    try:
        from pydoc_data.topics import topics
    except ImportError:
        return iter(()), "pydoc_data.topics (missing: this Python ships without it)"
    return _prose(topics[k] for k in sorted(topics)), f"pydoc_data.topics, the language reference (Python {_pyver()})"


def _source_strings(path: Path) -> Iterator[str]:
    """Docstrings, and long module-level string assignments (mpmath's function_docs), in file order."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, OSError):  # pragma: no cover - a broken install
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                yield doc
        elif (
            isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
            and len(node.value.value) > 200
        ):
            yield node.value.value


@_domain("mathematics")
def _mathematics() -> tuple[Iterator[str], str]:
    found: list[str] = []
    files: list[Path] = []
    for pkg, rel in MATH_SOURCES:
        spec = importlib.util.find_spec(pkg)
        if spec is None or spec.origin is None:
            continue
        root = Path(spec.origin).parent
        found.append(pkg)
        target = root / rel
        if target.is_file():
            files.append(target)
        elif target.is_dir():
            files += sorted(p for p in target.rglob("*.py") if "tests" not in p.relative_to(root).parts)
    vers = ", ".join(f"{p} {md.version(p)}" for p in sorted(set(found)))
    gen = (s for f in files for s in _source_strings(f))
    return _prose(gen), f"docstrings of {len(files)} SymPy / mpmath source files ({vers or 'neither installed'})"


def _dists() -> list[md.Distribution]:
    out = []
    for name in DISTRIBUTIONS:
        try:
            out.append(md.distribution(name))
        except md.PackageNotFoundError:
            continue
    return out


def _versions(dists: list[md.Distribution]) -> str:
    return f"{len(dists)} distributions: " + ", ".join(f"{d.metadata['Name']} {d.version}" for d in dists)


@_domain("package-descriptions")
def _package_descriptions() -> tuple[Iterator[str], str]:
    dists = _dists()

    def gen() -> Iterator[str]:
        for d in dists:
            meta = d.read_text("METADATA") or ""
            yield meta.split("\n\n", 1)[1] if "\n\n" in meta else ""  # the body after the headers

    return _prose(gen()), f"README text in the metadata of {_versions(dists)}"


_LICENSE_FILE = re.compile(r"^(LICEN[CS]E|COPYING|NOTICE|AUTHORS|COPYRIGHT)", re.IGNORECASE)


@_domain("legal")
def _legal() -> tuple[Iterator[str], str]:
    dists = _dists()

    def gen() -> Iterator[str]:
        for d in dists:
            for f in sorted(d.files or (), key=str):
                if ".dist-info" not in str(f) or not _LICENSE_FILE.match(f.name):
                    continue
                try:
                    yield Path(str(f.locate())).read_bytes().decode("utf-8", "replace")
                except OSError:  # pragma: no cover - a RECORD entry without its file
                    continue

    return _prose(gen()), f"license and notice files in the metadata of {_versions(dists)}"


# ---- the corpus -------------------------------------------------------------------------------------


def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


def _shingles(key: str) -> set[tuple[str, ...]]:
    w = key.split()
    return {tuple(w[i : i + _SHINGLE]) for i in range(max(1, len(w) - _SHINGLE + 1))}


@functools.lru_cache(maxsize=1)
def _build() -> Corpus:
    texts: list[str] = []
    domains: list[str] = []
    sources: dict[str, str] = {}
    seen: set[tuple[str, ...]] = set()  # shingles of every text kept, across domains (first domain wins)
    for name, extract in DOMAINS.items():
        gen, where = extract()
        before = len(texts)
        for t in gen:
            sh = _shingles(_norm(t))
            if len(sh & seen) >= _NEAR_COPY * len(sh):
                continue  # a copy or near-copy (license clauses repeat with other names and years)
            seen |= sh
            texts.append(t)
            domains.append(name)
        n = len(texts) - before
        if n < MIN_PER_DOMAIN:
            raise HwpruneError(
                f"built-in corpus: domain {name!r} has {n} texts (< {MIN_PER_DOMAIN}) from {where}; "
                "reinstall hwprune's dependencies (pip install -e .) or pass your own text with --calib FILE"
            )
        sources[name] = where
    return Corpus(
        name=f"{CORPUS_NAME} (Python {_pyver()})",
        texts=tuple(texts),
        domains=tuple(domains),
        sources=sources,
        report_domain=REPORT_DOMAIN,
    )


def default_corpus() -> Corpus:
    """The built-in corpus (cached per process): see the module docstring for its domains."""
    return _build()
