"""Issue 9, decode export and generation: ``decoder.onnx`` (one step with a per-layer KV cache) equals the
torch module token for token over 64 greedy tokens, on a non-uniform LLaMA-type subnet with a removed
attention sublayer and on a GPT-2-type model; bad input of ``hwprune generate`` is one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from hwprune.export.candidate import export_candidate
from hwprune.families.decoder.adapter import DecoderAdapter
from hwprune.families.decoder.model import Decoder
from hwprune.generate import Generator
from hwprune.latency import get_backend

FAST = {"rounds": 1, "repeats": 2, "warmup": 1}


def torch_greedy(model: Decoder, prompt: list[int], n: int, *, cache: bool = True) -> list[int]:
    """Greedy tokens of our torch module: with its KV cache, or recomputing the whole sequence each step."""
    ids = torch.tensor([prompt])
    out: list[int] = []
    past = None
    with torch.no_grad():
        for _ in range(n):
            if cache:
                seen = len(prompt) + len(out)
                mask = torch.ones(1, seen, dtype=torch.int64)
                logits, past = model(ids, mask, past_key_values=past, use_cache=True)
            else:
                full = torch.tensor([prompt + out])
                logits = model(full, torch.ones_like(full))
            out.append(int(logits[0, -1].argmax()))
            ids = torch.tensor([[out[-1]]])
    return out


def _export(adapter: DecoderAdapter, kept: dict, folder: Path) -> tuple[Decoder, dict]:
    plan = adapter.plan(kept)
    model = adapter.prune(adapter.dense(), plan)
    m = export_candidate(adapter, model, plan, folder, backend=get_backend("ort-cpu"), seq=16, timing=FAST)
    return model, m


CASES = {
    # 4 layers, GQA 8 query heads / 4 KV groups: kept groups 3, removed attention, 1 group, dense;
    # FFN widths all different, one FFN removed
    "llama-nonuniform": (
        dict(arch="llama", layers=4, heads=8, kv_heads=4, head_dim=8, ffn=48, vocab=300),
        {
            "layer.0.attn": [0, 2, 3],
            "layer.1.attn": [],
            "layer.2.attn": [1],
            "layer.0.ffn": range(0, 48, 2),
            "layer.1.ffn": range(40),
            "layer.3.ffn": [],
        },
    ),
    "gpt2": (
        dict(arch="gpt2", layers=3, heads=4, head_dim=8, ffn=64, vocab=300),
        {"layer.0.attn": [0, 3], "layer.1.ffn": range(0, 64, 4), "layer.2.attn": []},
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_onnx_greedy_generation_equals_torch(case: str, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    shape, kept = CASES[case]
    adapter = DecoderAdapter.tiny(seed=3, **shape)
    # larger weights than the default N(0, 0.02) so the logits are far apart and argmax is not a near tie
    with torch.no_grad():
        for name, p in adapter.dense().named_parameters():
            if not name.endswith("bias") and "norm" not in name and "ln" not in name:
                p.mul_(10)
    model, manifest = _export(adapter, kept, tmp_path / "cand")
    cfg = model.config
    assert manifest["files"]["decode"] == "decoder.onnx" and (tmp_path / "cand" / "decoder.onnx").is_file()
    g = manifest["graphs"]["decode"]
    assert g["parity_max_abs_diff"] < 1e-4
    assert g["cache_layers"] == [i for i in range(cfg.num_layers) if cfg.kv_groups[i]]

    # the graph's cache: one key/value pair per layer that keeps attention, with that layer's KV groups
    graph = onnx.load(str(tmp_path / "cand" / "decoder.onnx"))
    dims = {
        i.name: [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim]
        for i in [*graph.graph.input, *graph.graph.output]
    }
    attn = [i for i in range(cfg.num_layers) if cfg.kv_groups[i] > 0]
    assert len(attn) < cfg.num_layers  # a removed attention sublayer ...
    past = sorted(n for n in dims if n.startswith("past_key_values."))
    assert past == sorted(f"past_key_values.{i}.{p}" for i in attn for p in ("key", "value"))  # ... has no cache
    for i in attn:
        assert dims[f"past_key_values.{i}.key"] == ["batch", cfg.kv_groups[i], "past_len", cfg.head_dim]
        assert dims[f"present.{i}.value"] == ["batch", cfg.kv_groups[i], "total_len", cfg.head_dim]
    assert dims["input_ids"] == ["batch", "seq"] and dims["attention_mask"] == ["batch", "total_len"]

    prompt = [int(t) for t in np.random.default_rng(0).integers(3, cfg.vocab_size, 8)]
    ours = torch_greedy(model, prompt, 64)
    assert ours == torch_greedy(model, prompt, 64, cache=False)  # the torch cache itself is right
    assert len(set(ours)) > 4  # a real sequence, not one token repeated
    gen = Generator.open(tmp_path / "cand", need_tokenizer=False)
    onnx_ids = list(gen.token_ids(prompt, max_new_tokens=64, stop_at_eos=False))
    assert onnx_ids == ours


def test_manifest_lists_the_decode_graph_convention(tmp_path: Path) -> None:
    adapter = DecoderAdapter.tiny(layers=2)
    _export(adapter, {"layer.1.attn": []}, tmp_path / "c")
    g = json.loads((tmp_path / "c" / "manifest.json").read_text())["graphs"]["decode"]
    assert g["file"] == "decoder.onnx" and g["cache_layers"] == [0] and g["kv_groups"] == [2]
    assert g["max_positions"] == 256 and "past_key_values" in g["cache"]


# ---- hwprune generate -----------------------------------------------------------------------------

TEXT = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Structured pruning removes whole heads and neurons, so the smaller model runs faster.",
    "A language model predicts the next token from the tokens before it.",
] * 4


def _tokenizer(vocab: int) -> object:
    """A real byte-level BPE tokenizer trained here on a few sentences (nothing downloaded)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(TEXT, trainer)
    return tok


@pytest.fixture(scope="module")
def candidate(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A uniform-shape LLaMA-type subnet (1 of 2 KV groups, 24 of 48 neurons, block 2 removed) exported with
    its tokenizer from a Hugging Face folder."""
    from hwprune.families.decoder.config import DecoderConfig
    from hwprune.families.decoder.hf import save_hf_folder
    from hwprune.families.decoder.model import random_decoder

    torch.set_num_threads(1)
    cfg = DecoderConfig(
        arch="llama",
        vocab_size=320,
        hidden_size=32,
        num_layers=3,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        intermediate_size=48,
        max_position=96,
    )
    root = tmp_path_factory.mktemp("gen")
    save_hf_folder(random_decoder(cfg, seed=1), root / "tiny", tokenizer=_tokenizer(320))
    adapter = DecoderAdapter.from_folder(root / "tiny")
    with torch.no_grad():  # spread the logits so greedy argmax has no near ties
        for name, p in adapter.dense().named_parameters():
            if "norm" not in name:
                p.mul_(10)
    kept = {"layer.0.attn": [1], "layer.1.attn": [0], "layer.0.ffn": range(24), "layer.1.ffn": range(24, 48)}
    kept.update({"layer.2.attn": [], "layer.2.ffn": []})
    _export(adapter, kept, root / "cand")
    return root / "cand"


def _cli(*args: object):
    from typer.testing import CliRunner

    from hwprune.cli import app

    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_generate_cli_streams_the_greedy_continuation(candidate: Path) -> None:
    import hwprune

    res = _cli("generate", candidate, "--prompt", "The capital of France", "--max-new-tokens", 16)
    assert res.exit_code == 0, res.output
    gen = Generator.open(candidate)
    prompt = gen.encode("The capital of France")
    ours = torch_greedy(hwprune.load(candidate), prompt, 16)
    assert res.stdout == gen.decode(ours) + "\n"  # the streamed pieces add up to the continuation
    assert "16 new tokens" in res.stderr and "tokens/s" in res.stderr


def test_uniform_subnet_generates_the_same_in_transformers(candidate: Path) -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(candidate)).eval()
    gen = Generator.open(candidate)
    prompt = gen.encode("Structured pruning removes")
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, min_new_tokens=16, do_sample=False
        )
    theirs = out[0, len(prompt) :].tolist()
    assert len(theirs) == 16
    assert list(gen.token_ids(prompt, max_new_tokens=16, stop_at_eos=False)) == theirs


def test_sampling_is_seeded(candidate: Path) -> None:
    gen = Generator.open(candidate)
    prompt = gen.encode("A language model")
    a = list(gen.token_ids(prompt, max_new_tokens=12, temperature=1.0, top_k=20, seed=5, stop_at_eos=False))
    b = list(gen.token_ids(prompt, max_new_tokens=12, temperature=1.0, top_k=20, seed=5, stop_at_eos=False))
    assert a == b and len(a) == 12


def _one_line(res, pattern: str) -> str:
    """The error text of a CLI call that must fail in one line with exit 2 (asserted here)."""
    assert res.exit_code == 2, res.output
    text = " ".join(res.output.split())
    assert text.startswith("error:") and pattern in text and "Traceback" not in res.output, res.output
    return text


def test_generate_bad_input_is_one_line(candidate: Path, tmp_path: Path) -> None:
    assert "nope" in _one_line(_cli("generate", tmp_path / "nope", "--prompt", "hi"), "is not a folder")
    long = " ".join(["capital"] * 90)
    _one_line(_cli("generate", candidate, "--prompt", long, "-n", 8), "more than the model's 96")
    _one_line(_cli("generate", candidate, "--prompt", "hi", "--top-k", 0), "--top-k must be >= 1")
    _export(DecoderAdapter.tiny(layers=2), {"layer.1.attn": []}, tmp_path / "random")  # no tokenizer
    _one_line(_cli("generate", tmp_path / "random", "--prompt", "hi"), "has no tokenizer.json")
    (tmp_path / "plain").mkdir()
    assert "plain" in _one_line(_cli("generate", tmp_path / "plain", "--prompt", "hi"), "manifest.json")
    no_graph = tmp_path / "no-graph"  # e.g. an encoder candidate, or one exported before issue 9
    no_graph.mkdir()
    m = json.loads((candidate / "manifest.json").read_text())
    (no_graph / "manifest.json").write_text(json.dumps({**m, "graphs": {}}))
    msg = _one_line(_cli("generate", no_graph, "--prompt", "hi"), "has no decode graph")
    assert "no-graph" in msg and not (no_graph / "decoder.onnx").exists()


def test_generation_stops_at_end_of_text(candidate: Path) -> None:
    gen = Generator.open(candidate)
    prompt = gen.encode("The capital")
    free = list(gen.token_ids(prompt, max_new_tokens=12, stop_at_eos=False))
    gen.eos = {free[3]}  # pretend the 4th greedy token ends the text
    assert list(gen.token_ids(prompt, max_new_tokens=12)) == free[: free.index(free[3]) + 1]
