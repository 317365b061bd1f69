"""Text generation with an exported candidate in ONNX Runtime: ``hwprune generate RUN/candidates/KEY``.

Family-agnostic: the candidate's manifest lists a ``decode`` graph (``graphs.decode``, written by the
family's ``extra_graphs`` hook) and how to drive it. Its convention: inputs ``input_ids`` (batch, seq),
``attention_mask`` (batch, past + seq) and cache inputs ``past_key_values.*``; outputs ``logits``
(batch, seq, vocab) and ``present.*``, each present feeding the past input of the same name on the
next call. An empty past (every dynamic axis but the batch at 0) is the prompt, so one graph runs
prefill and decode. Shapes of the cache come from the graph itself, so layers may differ (or lack a
cache) freely::

    gen = Generator.open("runs/smollm2/candidates/KEY")
    for token_id in gen.token_ids(gen.encode("The capital of France is"), max_new_tokens=16):
        ...
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hwprune.errors import HwpruneError

__all__ = ["GenerateRequest", "GenerateStats", "Generator", "run_generate"]

PAST, PRESENT = "past_key_values.", "present."


@dataclass(frozen=True)
class GenerateRequest:
    """``hwprune generate``: which candidate, the prompt, and how to pick each next token."""

    folder: str
    prompt: str
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy (argmax)
    top_k: int | None = None  # sample among the k most likely tokens (with temperature > 0)
    seed: int = 0
    threads: int = 1
    stop_at_eos: bool = True

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise HwpruneError(f"--max-new-tokens must be >= 1 (got {self.max_new_tokens})")
        if not self.temperature >= 0:
            raise HwpruneError(f"--temperature must be >= 0 (0 is greedy; got {self.temperature})")
        if self.top_k is not None and self.top_k < 1:
            raise HwpruneError(f"--top-k must be >= 1 (got {self.top_k})")
        if self.threads < 1:
            raise HwpruneError(f"--threads must be >= 1 (got {self.threads})")


@dataclass
class GenerateStats:
    """What one generation took: time to the first new token (prompt included) and the rest, wall clock."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    ttft_ms: float = 0.0
    total_ms: float = 0.0
    step_ms: list[float] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        """New tokens after the first per second of decoding (the decode rate, prefill excluded)."""
        decode_s = (self.total_ms - self.ttft_ms) / 1e3
        return (self.new_tokens - 1) / decode_s if self.new_tokens > 1 and decode_s > 0 else float("nan")


class Generator:
    """One ONNX Runtime session of a decode graph, plus the candidate's tokenizer when it has one."""

    def __init__(
        self, onnx: str | Path | bytes, info: Mapping[str, Any], *, tokenizer: Any = None, threads: int = 1
    ) -> None:
        from hwprune.latency import get_backend

        backend = get_backend("ort-cpu", threads=threads)
        data = onnx if isinstance(onnx, bytes) else Path(onnx).read_bytes()
        self.session = backend.session(data)  # type: ignore[attr-defined]  # OrtCpuBackend.session
        self.info, self.tokenizer = dict(info), tokenizer
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.outputs = [o.name for o in self.session.get_outputs()]
        if "input_ids" not in self.inputs or self.outputs[0] != "logits":
            raise HwpruneError("the decode graph lacks input_ids or its first output is not logits; re-export")
        self.cache = [n for n in self.inputs if n.startswith(PAST)]
        missing = [n for n in self.cache if PRESENT + n[len(PAST) :] not in self.outputs]
        if missing:
            raise HwpruneError(f"the decode graph has cache input {missing[0]} but no matching present output")
        self.max_positions = int(self.info.get("max_positions") or 0)
        self.eos = {int(e) for e in self.info.get("eos_token_id") or []}

    @classmethod
    def open(cls, folder: str | Path, *, threads: int = 1, need_tokenizer: bool = True) -> Generator:
        """The generator of an exported candidate folder (manifest.json + its decode graph + tokenizer.json)."""
        from hwprune.export.manifest import read_manifest

        folder = Path(folder)
        if not folder.is_dir():
            raise HwpruneError(f"{folder} is not a folder; give an exported candidate, e.g. RUN/candidates/KEY")
        m = read_manifest(folder)
        g = m.get("graphs", {}).get("decode")
        if not isinstance(g, dict) or not (folder / str(g.get("file"))).is_file():
            raise HwpruneError(
                f"{folder} has no decode graph (manifest graphs.decode and its file); only language models "
                "generate text: export a decoder candidate with this hwprune (hwprune export RUN)"
            )
        tok = None
        tok_file = folder / str(m.get("files", {}).get("tokenizer", "tokenizer.json"))
        if tok_file.is_file():
            from tokenizers import Tokenizer

            try:
                tok = Tokenizer.from_file(str(tok_file))
            except Exception as e:  # tokenizers raises a bare Exception on bad JSON
                raise HwpruneError(f"{tok_file}: cannot read the tokenizer ({str(e).splitlines()[0][:200]})") from None
        elif need_tokenizer:
            raise HwpruneError(
                f"{folder} has no tokenizer.json, so text cannot be turned into tokens; models with random "
                "weights have none: export a model that ships one (smollm2, or a folder with tokenizer.json)"
            )
        return cls(folder / str(g["file"]), g, tokenizer=tok, threads=threads)

    # ---- text <-> ids -------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise HwpruneError("this candidate has no tokenizer.json")
        ids = list(self.tokenizer.encode(text).ids)
        if not ids:
            raise HwpruneError("the prompt is empty after tokenization; give some text")
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        assert self.tokenizer is not None
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=False))

    def check_length(self, prompt_len: int, max_new_tokens: int) -> None:
        """Refuse a prompt that, with the new tokens, needs more positions than the model has."""
        if self.max_positions and prompt_len + max_new_tokens > self.max_positions:
            raise HwpruneError(
                f"the prompt has {prompt_len} tokens; with --max-new-tokens {max_new_tokens} that needs "
                f"{prompt_len + max_new_tokens} positions, more than the model's {self.max_positions}: "
                "shorten the prompt or ask for fewer tokens"
            )

    # ---- the token loop -----------------------------------------------------------------------
    def _empty_cache(self, batch: int) -> dict[str, np.ndarray]:
        """Every cache input with zero past positions: its static dims as declared, the batch as given."""
        out = {}
        for n in self.cache:
            dims = [d if isinstance(d, int) else (batch if k == 0 else 0) for k, d in enumerate(self.inputs[n].shape)]
            out[n] = np.zeros(dims, dtype=np.float32)
        return out

    def token_ids(
        self,
        prompt: Sequence[int],
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        seed: int = 0,
        stop_at_eos: bool = True,
        stats: GenerateStats | None = None,
    ) -> Iterator[int]:
        """Yield up to ``max_new_tokens`` new token ids, one per graph call after the prompt's."""
        self.check_length(len(prompt), max_new_tokens)
        rng = np.random.default_rng(seed)
        stats = stats if stats is not None else GenerateStats()
        stats.prompt_tokens = len(prompt)
        ids = np.asarray([list(prompt)], dtype=np.int64)
        past = self._empty_cache(1)
        total = len(prompt)
        t0 = time.perf_counter()
        for step in range(max_new_tokens):
            feed: dict[str, np.ndarray] = {"input_ids": ids, **past}
            if "attention_mask" in self.inputs:  # dropped by the exporter when no layer attends
                feed["attention_mask"] = np.ones((1, total), dtype=np.int64)
            t1 = time.perf_counter()
            out = self.session.run(None, feed)
            stats.step_ms.append(1e3 * (time.perf_counter() - t1))
            nxt = _pick(out[0][0, -1], temperature=temperature, top_k=top_k, rng=rng)
            if step == 0:
                stats.ttft_ms = 1e3 * (time.perf_counter() - t0)
            stats.new_tokens = step + 1
            stats.total_ms = 1e3 * (time.perf_counter() - t0)
            yield nxt
            if stop_at_eos and nxt in self.eos:
                return
            past = {PAST + n[len(PRESENT) :]: v for n, v in zip(self.outputs, out) if n.startswith(PRESENT)}
            ids = np.asarray([[nxt]], dtype=np.int64)
            total += 1


def _pick(logits: np.ndarray, *, temperature: float, top_k: int | None, rng: np.random.Generator) -> int:
    """Greedy (temperature 0) or a sample from softmax(logits / temperature) over the top k."""
    if temperature == 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    if top_k is not None and top_k < z.size:
        cut = np.partition(z, -top_k)[-top_k]
        z = np.where(z >= cut, z, -np.inf)
    p = np.exp(z - z.max())
    p /= p.sum()
    return int(rng.choice(z.size, p=p))


def run_generate(req: GenerateRequest, *, on_text: Any = None) -> tuple[str, GenerateStats]:
    """Generate from ``req.prompt``; ``on_text(piece)`` gets the new text as it comes (streaming)."""
    gen = Generator.open(req.folder, threads=req.threads)
    prompt = gen.encode(req.prompt)
    stats = GenerateStats()
    new: list[int] = []
    shown = ""
    for t in gen.token_ids(
        prompt,
        max_new_tokens=req.max_new_tokens,
        temperature=req.temperature,
        top_k=req.top_k,
        seed=req.seed,
        stop_at_eos=req.stop_at_eos,
        stats=stats,
    ):
        new.append(t)
        text = gen.decode(new)
        if on_text is not None and text.startswith(shown) and not text.endswith("\ufffd"):
            on_text(text[len(shown) :])  # whole characters only: a byte-level token may end mid-character
            shown = text
    text = gen.decode(new)
    if on_text is not None and text.startswith(shown) and len(text) > len(shown):
        on_text(text[len(shown) :])
    return text, stats
