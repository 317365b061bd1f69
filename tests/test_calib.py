"""Calibration text: the built-in corpus, user files, the three named splits and the errors users see."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hwprune.errors import HwpruneError
from hwprune.families.encoder.adapter import EncoderAdapter
from hwprune.families.encoder.calib import load_calib
from hwprune.proxies.calib import file_corpus, load_texts, read_texts, split_corpus
from hwprune.proxies.corpus import MIN_PER_DOMAIN, REPORT_DOMAIN, Corpus, default_corpus


@pytest.fixture(scope="module")
def tiny() -> EncoderAdapter:
    return EncoderAdapter.tiny()


def test_default_corpus_is_clean_deterministic_diverse_and_large() -> None:
    corpus = default_corpus()
    texts = list(corpus.texts)
    assert corpus.digest == Corpus(corpus.name, corpus.texts, corpus.domains, corpus.sources).digest
    counts = corpus.describe()["texts_by_domain"]
    assert set(counts) == {"python-docstrings", "python-reference", "mathematics", "package-descriptions", "legal"}
    assert all(n >= MIN_PER_DOMAIN for n in counts.values()), counts
    assert len(texts) >= 2000 and len(set(texts)) == len(texts)
    assert all(60 <= len(t) <= 600 for t in texts)
    assert not any(">>>" in t or "\n" in t or "  " in t for t in texts)
    assert sum(len(t) for t in texts) / len(texts) > 120  # paragraphs, not fragments
    assert corpus.report_domain == REPORT_DOMAIN == "legal"


def test_default_corpus_is_the_same_in_a_fresh_process() -> None:
    import subprocess
    import sys

    code = "from hwprune.proxies.corpus import default_corpus as d; c = d(); print(c.digest, len(c.texts))"
    out = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True) for _ in range(2)]
    here = default_corpus()
    assert out[0].stdout.split() == out[1].stdout.split() == [here.digest, str(len(here.texts))]


def _toy(domains: dict[str, int], report: str | None) -> Corpus:
    texts = tuple(f"{d} text {i}" for d, n in domains.items() for i in range(n))
    return Corpus("toy", texts, tuple(t.split()[0] for t in texts), {d: "made here" for d in domains}, report)


def test_default_splits_are_disjoint_and_report_is_held_out_by_domain() -> None:
    sp = load_texts(None, n_calib=128, n_selection=64, n_report=64, seed=0)
    cal, sel, rep = set(sp.calibration), set(sp.selection), set(sp.report)
    assert (len(cal), len(sel), len(rep)) == (128, 64, 64)
    assert not cal & sel and not cal & rep and not sel & rep
    domain_of = dict(zip(default_corpus().texts, default_corpus().domains))
    assert {domain_of[t] for t in rep} == {"legal"}
    assert "legal" not in {domain_of[t] for t in cal | sel}  # the search never sees the report domain
    info = sp.info
    assert info["held_out_by"] == "domain" and info["report_domain"] == "legal"
    assert info["splits"]["calibration"]["domains"] == {  # every search domain, in equal shares
        "mathematics": 32,
        "package-descriptions": 32,
        "python-docstrings": 32,
        "python-reference": 32,
    }
    assert info["corpus"]["digest"] == default_corpus().digest


def test_split_is_disjoint_stable_and_seeded() -> None:
    toy = _toy({"a": 40, "b": 40, "c": 30}, report="c")
    sp = split_corpus(toy, n_calib=20, n_selection=10, n_report=8, seed=1)
    assert len(sp.calibration) == 20 and len(sp.selection) == 10 and len(sp.report) == 8
    assert not set(sp.calibration) & set(sp.selection)
    assert all(t.startswith("c ") for t in sp.report)
    assert not any(t.startswith("c ") for t in sp.calibration + sp.selection)
    more = split_corpus(toy, n_calib=30, n_selection=10, n_report=12, seed=1)
    assert more.selection == sp.selection and more.calibration[:20] == sp.calibration  # nothing moves
    assert more.report[:8] == sp.report
    assert split_corpus(toy, n_calib=20, n_selection=10, n_report=8, seed=2).selection != sp.selection
    # one-domain corpus (a user's file): report by text, first, disjoint from the rest
    flat = _toy({"f": 50}, report=None)
    sf = split_corpus(flat, n_calib=20, n_selection=10, n_report=10, seed=0)
    assert sf.info["held_out_by"] == "text" and sf.info["report_domain"] is None
    assert len(set(sf.calibration) | set(sf.selection) | set(sf.report)) == 40


def test_load_calib_default_shapes_and_disjoint_rows(tiny: EncoderAdapter) -> None:
    data = load_calib(tiny, n_calib=24, n_heldout=8, n_report=8, seq=32, seed=0)
    assert data.n_calib == 24 and data.source.startswith("hwprune-builtin-v2")
    assert data.calib["input_ids"].shape == (24, 32) and data.heldout["attention_mask"].shape == (8, 32)
    assert data.report["input_ids"].shape == (8, 32) and data.n_report == 8
    assert data.calib["input_ids"].dtype == torch.int64
    rows = {
        name: {tuple(r.tolist()) for r in part["input_ids"]}
        for name, part in (("calib", data.calib), ("sel", data.heldout), ("rep", data.report))
    }
    assert not rows["calib"] & rows["sel"] and not rows["calib"] & rows["rep"] and not rows["sel"] & rows["rep"]
    assert data.splits["splits"]["report"]["domains"] == {"legal": 8} and data.splits["seq"] == 32
    assert torch.equal(data.for_report().heldout["input_ids"], data.report["input_ids"])
    again = load_calib(tiny, n_calib=24, n_heldout=8, n_report=8, seq=32, seed=0)
    assert torch.equal(again.calib["input_ids"], data.calib["input_ids"])
    with pytest.raises(HwpruneError, match="no report split"):
        load_calib(tiny, n_calib=4, n_heldout=2, seq=16).for_report()


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
    with pytest.raises(HwpruneError, match=r"small.txt: 3 distinct texts .*, but n_calib=4 \+ n_heldout=2"):
        load_calib(tiny, small, n_calib=4, n_heldout=2)
    with pytest.raises(HwpruneError, match=r"small.txt: 1 distinct texts .*n_report=2 held back"):
        load_calib(tiny, small, n_calib=1, n_heldout=1, n_report=2)
    with pytest.raises(HwpruneError, match="does not exist"):
        load_calib(tiny, tmp_path / "missing.txt")
    with pytest.raises(HwpruneError, match="n_calib >= 1"):
        load_calib(tiny, small, n_calib=0)


def test_file_corpus_names_its_content(tmp_path: Path) -> None:
    f = tmp_path / "c.txt"
    f.write_text("alpha text\nbeta text\nalpha text\n")
    c = file_corpus(f)
    assert c.texts == ("alpha text", "beta text") and set(c.domains) == {"file"}
    assert c.report_domain is None and "sha256" in c.sources["file"]


def test_retrieval_halves_and_top1(tiny: EncoderAdapter) -> None:
    from hwprune.families.encoder.retrieval import Retrieval, halves, retrieval_top1

    q, d = halves(["one two three four five six seven eight", "too short", "a b c d e f g h i j"])
    assert q == ["one two three four", "a b c d e"] and d == ["five six seven eight", "f g h i j"]
    eye = torch.eye(4)
    assert retrieval_top1(eye, eye) == 1.0 and retrieval_top1(eye, eye[[1, 0, 2, 3]]) == 0.5
    texts = load_texts(None, n_calib=1, n_selection=1, n_report=12).report
    r = Retrieval(tiny, texts, seq=32)
    assert r.n == 12 and 0.0 <= r.dense_top1 <= 1.0 and r.top1(tiny.dense()) == r.dense_top1
    with pytest.raises(HwpruneError, match="at least 2 texts"):
        halves(["short one"])


def test_retrieval_ratio_interval_is_paired_and_honest() -> None:
    from hwprune.families.encoder.retrieval import ratio_interval

    ref = torch.tensor([True] * 30 + [False] * 70)
    assert ratio_interval(ref, ref) == (1.0, 1.0)  # the same hits: no spread, whatever the draws
    fewer = ref.clone()
    fewer[:3] = False  # 27 of the dense model's 30
    lo, hi = ratio_interval(fewer, ref)
    assert lo < 0.9 < hi <= 1.0  # 0.9 inside, and never above 1: every draw loses as many or more
    swapped = torch.roll(ref, 50)  # as many hits on other queries: the ratio centres on 1 but spreads wide
    lo, hi = ratio_interval(swapped, ref)
    assert lo < 0.75 and hi > 1.3
    assert ratio_interval(ref, torch.zeros(100, dtype=torch.bool)) is None
    with pytest.raises(ValueError, match="hits against"):
        ratio_interval(ref[:10], ref)


def test_study_key_changes_with_the_report_split(tiny: EncoderAdapter) -> None:
    from hwprune.search.study import study_key

    space = tiny.space()
    req = {"proxy": "obs", "calib": None, "n_calib": 8, "n_heldout": 4, "n_report": 4, "search": {"seed": 0}}
    run = {"request": req, "adapter": tiny.spec(), "fingerprint": {}, "calib_source": "x"}
    other = {**run, "request": {**req, "n_report": 8}}  # a file's other splits move with it
    assert study_key(run, space) != study_key(other, space)
