"""Our encoder against Hugging Face / sentence-transformers, and physical surgery semantics."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

import hwprune
from hwprune.errors import HwpruneError
from hwprune.families import resolve_model
from hwprune.families.encoder.model import from_hf_config

TEXTS = ["A man is playing a guitar.", "The quick brown fox jumps over the lazy dog near the river bank."]
#: embeddings made once by sentence-transformers (scripts/make_st_reference.py), so parity runs without it
REFERENCE = Path(__file__).parent / "data" / "minilm_st_reference.json"


def _embed(minilm, texts, *, seq: int = 64) -> torch.Tensor:
    """Our MiniLM as sentence-transformers pools it: mean over the mask, L2-normalised."""
    x = minilm.tokenize(texts, seq=seq)
    assert int(x["attention_mask"].sum(1).max()) < seq  # nothing truncated: ST would not truncate here
    with torch.inference_mode():
        h = minilm.dense()(**x)
    m = x["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)


def test_minilm_matches_sentence_transformers_reference(minilm):
    ref = json.loads(REFERENCE.read_text())
    digest = hashlib.sha256((minilm.path / "model.safetensors").read_bytes()).hexdigest()
    assert digest == ref["weights_sha256"], "MiniLM weights changed: python scripts/make_st_reference.py"
    want = torch.tensor(ref["embeddings"])
    assert want.shape == (len(ref["texts"]), 384)
    assert torch.allclose(_embed(minilm, ref["texts"]), want, atol=1e-5)


def test_minilm_matches_sentence_transformers(minilm):
    """Live, where sentence-transformers is installed (not a test dependency; the reference test above
    is what CI runs)."""
    st = pytest.importorskip("sentence_transformers")
    ref = st.SentenceTransformer(str(minilm.path), device="cpu").encode(TEXTS, convert_to_tensor=True)
    assert torch.allclose(_embed(minilm, TEXTS, seq=32), ref, atol=1e-5)


def test_zero_weight_units_removed_leave_output_unchanged(tiny):
    model = tiny.dense()
    with torch.no_grad():  # zero the output-projection columns of head 1 (layer 0) and neurons 0..9 (layer 1)
        model.layers[0].attention.dense.weight[:, 8:16] = 0
        model.layers[1].ffn.output.weight[:, :10] = 0
    plan = tiny.plan({"layer.0.heads": [0, 2, 3], "layer.1.ffn": list(range(10, 32))})
    pruned = tiny.prune(model, plan)
    x = tiny.example_inputs(batch=2, seq=12)
    with torch.no_grad():
        assert torch.allclose(pruned(**x), model(**x), atol=1e-5)
    assert pruned.layers[0].attention.num_heads == 3 and pruned.layers[0].attention.query.out_features == 24
    assert pruned.layers[1].ffn.output.in_features == 22
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())


def test_fully_pruned_sublayer_keeps_bias_semantics(tiny):
    model = tiny.dense()
    with torch.no_grad():
        model.layers[0].attention.dense.weight.zero_()
        model.layers[0].ffn.output.weight.zero_()
    pruned = tiny.prune(model, tiny.plan({"layer.0.heads": [], "layer.0.ffn": []}))
    x = tiny.example_inputs(batch=1, seq=8)
    with torch.no_grad():
        assert torch.allclose(pruned(**x), model(**x), atol=1e-5)
    assert pruned.layers[0].attention.query is None and pruned.layers[0].ffn.intermediate is None


def test_save_load_roundtrip_no_pickle(tiny, tmp_path):
    plan = tiny.plan({"layer.0.heads": [1, 3], "layer.1.ffn": [0, 5, 7], "layer.1.heads": []})
    pruned = tiny.prune(tiny.dense(), plan)
    hwprune.save(pruned, plan, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "plan.json"]
    again = hwprune.load(tmp_path)
    x = tiny.example_inputs(batch=1, seq=8)
    with torch.no_grad():
        assert torch.equal(again(**x), pruned(**x))


def test_load_rejects_mismatched_weights(tiny, tmp_path):
    plan = tiny.plan({"layer.0.heads": [1, 3]})
    hwprune.save(tiny.prune(tiny.dense(), plan), plan, tmp_path)
    tiny.plan({"layer.0.heads": [1]}).save(tmp_path / "plan.json")
    with pytest.raises(HwpruneError, match="weights do not match plan.json"):
        hwprune.load(tmp_path)


def test_plan_validation(tiny):
    with pytest.raises(HwpruneError, match="lacks"):
        tiny.plan({"layer.7.heads": [0]})
    with pytest.raises(HwpruneError, match=r"in \[0, 4\)"):
        tiny.plan({"layer.0.heads": [0, 4]})


def test_unknown_model_and_bad_configs(tmp_path):
    with pytest.raises(HwpruneError, match="unknown model 'gpt-7'; supported: .*bert-base.*minilm"):
        resolve_model("gpt-7")
    with pytest.raises(HwpruneError, match="not a BERT-family encoder"):
        from_hf_config({"model_type": "llama"})
    (tmp_path / "config.json").write_text('{"model_type": "bert", "hidden_size": 8}')
    with pytest.raises(HwpruneError, match="missing key"):
        resolve_model(str(tmp_path)).dense()


def test_local_folder_roberta_positions(tmp_path, minilm):
    """A RoBERTa-style folder loads (position offset pad+1) and runs."""
    import json

    from safetensors.torch import save_file

    from hwprune.families.encoder.adapter import EncoderAdapter
    from hwprune.families.encoder.model import Encoder, from_hf_config

    cfg = {
        "model_type": "roberta",
        "vocab_size": 30522,
        "hidden_size": 16,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 32,
        "max_position_embeddings": 40,
        "type_vocab_size": 1,
        "pad_token_id": 1,
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    enc = Encoder(from_hf_config(cfg))
    hf = {}
    from hwprune.families.encoder.model import _hf_key

    for k, v in enc.state_dict().items():
        hf["roberta." + _hf_key(k)] = v
    save_file(hf, str(tmp_path / "model.safetensors"))
    a = EncoderAdapter.from_folder(tmp_path)
    assert a.config.position_offset == 2
    with torch.no_grad():
        out = a.dense()(**a.example_inputs(batch=1, seq=16))
    assert out.shape == (1, 16, 16)
