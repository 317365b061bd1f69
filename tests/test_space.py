from __future__ import annotations

import pytest

from hwprune.errors import HwpruneError
from hwprune.space import Candidate, build_space, load_space

RAW = [
    ("layer.0.heads", "heads", 4, 0, 8),
    ("layer.0.ffn", "ffn", 64, 0, 1),
    ("layer.1.heads", "heads", 4, 1, 8),
    ("layer.1.ffn", "ffn", 64, 1, 1),
]


def test_grid_from_step_min_and_remove():
    sp = build_space(
        RAW, {"defaults": {"heads": {"step": 1, "min": 2, "allow_remove": True}, "ffn": {"step": 16, "min": 16}}}
    )
    assert sp.unit("layer.0.heads").sizes == (0, 2, 3, 4)
    assert sp.unit("layer.0.ffn").sizes == (16, 32, 48, 64)
    assert sp.size() == 4 * 4 * 4 * 4
    assert sp.dense().sizes == (4, 64, 4, 64)
    assert sp.smallest().sizes == (0, 16, 0, 16)


def test_overrides_ignore_and_grid():
    sp = build_space(
        RAW,
        {
            "defaults": {"ffn": {"grid": [8, 24, 100]}},
            "overrides": [{"match": "layer.1.*", "min": 3}],
            "ignore": ["layer.0.heads"],
        },
    )
    assert sp.unit("layer.0.heads").sizes == (4,)
    assert sp.unit("layer.0.ffn").sizes == (8, 24, 64)  # 100 > full is dropped, full always allowed
    assert sp.unit("layer.1.ffn").sizes == (8, 24, 64)  # the override's min 3 keeps the inherited grid
    assert sp.unit("layer.1.heads").sizes == (3, 4)


def test_candidate_json_and_key_roundtrip():
    sp = build_space(RAW, {"defaults": {"ffn": {"step": 16, "min": 16}}})
    c = Candidate((2, 16, 4, 64))
    assert Candidate.from_json(c.to_json(sp), sp) == c
    assert c.key() == Candidate((2, 16, 4, 64)).key() != Candidate((3, 16, 4, 64)).key()
    with pytest.raises(HwpruneError, match="not allowed"):
        sp.validate(Candidate((2, 17, 4, 64)))


@pytest.mark.parametrize(
    "spec, msg",
    [
        ({"defaults": {"ffn": {"step": -3}}}, "defaults.ffn.step must be a positive integer"),
        ({"defaults": {"ffn": {"stride": 2}}}, "defaults.ffn.stride is not a known key"),
        ({"defaults": {"conv": {"step": 2}}}, "defaults.conv is not a unit kind"),
        ({"overrides": [{"match": "layer.9.*", "min": 1}]}, r"overrides\[0\].match 'layer.9.\*' names no unit"),
        ({"ignore": ["nope"]}, "ignore entry 'nope' names no unit"),
        ({"defualts": {}}, "unknown top-level key 'defualts'"),
        ({"defaults": {"heads": {"allow_remove": "yes"}}}, "allow_remove must be true or false"),
    ],
)
def test_bad_specs_name_the_key(spec, msg):
    with pytest.raises(HwpruneError, match=msg):
        build_space(RAW, spec, source="x.yaml")


def test_malformed_yaml_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("defaults:\n  heads: {step: 1\n  ffn: [\n")
    with pytest.raises(HwpruneError, match=r"bad.yaml: malformed YAML at line \d+"):
        load_space(p, RAW)
    with pytest.raises(HwpruneError, match="does not exist"):
        load_space(tmp_path / "missing.yaml", RAW)


def test_shipped_spaces_load(minilm):
    sp = minilm.space()
    assert sp.source.endswith("minilm.yaml")
    assert sp.unit("layer.0.heads").sizes == tuple(range(13))
    assert sp.unit("layer.5.ffn").sizes == tuple(range(0, 1537, 64))
