"""Calibration text: the default stdlib corpus, user files, splits and the errors users see."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hwprune.errors import HwpruneError
from hwprune.families.encoder.adapter import EncoderAdapter
from hwprune.families.encoder.calib import load_calib
from hwprune.proxies.calib import default_corpus, read_texts, split_texts


@pytest.fixture(scope="module")
def tiny() -> EncoderAdapter:
    return EncoderAdapter.tiny()


def test_default_corpus_is_clean_deterministic_and_large() -> None:
    texts = default_corpus()
    assert texts == default_corpus()
    assert len(texts) >= 500 and len(set(texts)) == len(texts)
    assert all(60 <= len(t) <= 600 for t in texts)
    assert not any(">>>" in t or "\n" in t or "  " in t for t in texts)
    assert sum(len(t) for t in texts) / len(texts) > 120  # paragraphs, not fragments


def test_split_is_disjoint_and_heldout_stable() -> None:
    texts = [f"text number {i}" for i in range(50)] + ["text number 3"] * 5  # duplicates are dropped
    cal, held = split_texts(texts, n_calib=20, n_heldout=10, seed=1)
    assert len(cal) == 20 and len(held) == 10 and not set(cal) & set(held)
    cal2, held2 = split_texts(texts, n_calib=30, n_heldout=10, seed=1)
    assert held2 == held and cal2[:20] == cal  # more calibration text never moves the held-out set
    assert split_texts(texts, n_calib=20, n_heldout=10, seed=2)[1] != held


def test_load_calib_default_shapes_and_disjoint_rows(tiny: EncoderAdapter) -> None:
    data = load_calib(tiny, n_calib=24, n_heldout=8, seq=32, seed=0)
    assert data.n_calib == 24 and data.source.startswith("stdlib-docstrings-py")
    assert data.calib["input_ids"].shape == (24, 32) and data.heldout["attention_mask"].shape == (8, 32)
    assert data.calib["input_ids"].dtype == torch.int64
    rows = {tuple(r.tolist()) for r in data.calib["input_ids"]}
    assert not rows & {tuple(r.tolist()) for r in data.heldout["input_ids"]}
    again = load_calib(tiny, n_calib=24, n_heldout=8, seq=32, seed=0)
    assert torch.equal(again.calib["input_ids"], data.calib["input_ids"])


def test_txt_and_jsonl_files(tmp_path: Path, tiny: EncoderAdapter) -> None:
    txt = tmp_path / "c.txt"
    txt.write_text("first text\n\n  second text  \nthird text\n")
    assert read_texts(txt) == ["first text", "second text", "third text"]
    jl = tmp_path / "c.jsonl"
    jl.write_text("\n".join(json.dumps({"text": f"sample {i}", "id": i}) for i in range(12)) + "\n")
    assert read_texts(jl)[:2] == ["sample 0", "sample 1"]
    data = load_calib(tiny, jl, n_calib=8, n_heldout=4, seq=16)
    assert data.calib["input_ids"].shape == (8, 16) and data.source.startswith(str(jl))


@pytest.mark.parametrize(
    ("name", "content", "needle"),
    [
        ("empty.txt", "\n  \n", "no texts found"),
        ("bad.jsonl", '{"text": "a"}\n{"text": "b"}\n{"text": oops}\n', "bad.jsonl:3: not valid JSON"),
        ("nofield.jsonl", '{"text": "a"}\n{"body": "b"}\n', "nofield.jsonl:2: expected an object"),
        ("notobj.jsonl", '["a"]\n', "notobj.jsonl:1: expected an object"),
        ("data.csv", "text\nhello\n", "unknown calibration format '.csv'"),
    ],
)
def test_bad_files_raise_one_line(tmp_path: Path, name: str, content: str, needle: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(HwpruneError) as e:
        read_texts(path)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_too_small_file_and_missing_file(tmp_path: Path, tiny: EncoderAdapter) -> None:
    small = tmp_path / "small.txt"
    small.write_text("one\ntwo\ntwo\nthree\n")
    with pytest.raises(HwpruneError, match=r"small.txt: 3 distinct texts, but n_calib=4 \+ n_heldout=2"):
        load_calib(tiny, small, n_calib=4, n_heldout=2)
    with pytest.raises(HwpruneError, match="does not exist"):
        load_calib(tiny, tmp_path / "missing.txt")
    with pytest.raises(HwpruneError, match="n_calib >= 1"):
        load_calib(tiny, small, n_calib=0)
