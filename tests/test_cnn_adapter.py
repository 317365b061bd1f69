"""CNN adapter: coupled channel groups, spaces, surgery replayed from a plan, save/load, bad input.

``tiny_net`` below is also a ``--model test_cnn_adapter:tiny_net`` factory: pytest puts tests/ on the path.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import hwprune
import hwprune.families.cnn.adapter
from hwprune.errors import HwpruneError
from hwprune.families import resolve_model
from hwprune.families.cnn.adapter import CnnAdapter, parse_input_shape
from hwprune.surgery.plan import Plan

SHAPE = "1,3,32,32"


def cbr(ci: int, co: int, k: int = 3, s: int = 1, g: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(ci, co, k, s, k // 2, groups=g, bias=False), nn.BatchNorm2d(co), nn.ReLU())


class Tiny(nn.Module):
    """Stem + residual block + inverted residual (depthwise) + two-branch concat + linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = cbr(3, 16, s=2)
        self.res1 = cbr(16, 32)
        self.res2 = nn.Sequential(nn.Conv2d(32, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16))
        self.expand = cbr(16, 48, k=1)
        self.dw = cbr(48, 48, g=48, s=2)
        self.project = nn.Sequential(nn.Conv2d(48, 24, 1, bias=False), nn.BatchNorm2d(24))
        self.left = cbr(24, 8)
        self.right = cbr(24, 8, k=1)
        self.mix = cbr(16, 32)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.res2(self.res1(x)))
        x = self.project(self.dw(self.expand(x)))
        x = self.mix(torch.cat([self.left(x), self.right(x)], 1))
        return self.head(x.mean((2, 3)))


def tiny_net() -> nn.Module:
    return Tiny()


def not_a_module() -> int:
    return 3


class WithLayerNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.norm = nn.LayerNorm(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x).mean((2, 3)))


def with_layer_norm() -> nn.Module:
    return WithLayerNorm()


@pytest.fixture(scope="module")
def tiny() -> CnnAdapter:
    return CnnAdapter("test_cnn_adapter:tiny_net", input_shape=SHAPE)


def test_groups_keep_couplings(tiny: CnnAdapter) -> None:
    units = {n: (k, f) for n, k, f, *_ in tiny.raw_units()}
    assert units == {
        "group.stem.0": ("residual", 16),
        "group.res1.0": ("conv", 32),
        "group.expand.0": ("dw", 48),
        "group.project.0": ("conv", 24),
        "group.mix.0": ("conv", 32),
    }
    g = tiny.graph.group("group.stem.0")
    assert g.producers == ("stem.0", "res2.0") and g.consumers == ("res1.0", "expand.0")
    assert tiny.graph.group("group.expand.0").depthwise == ("dw.0",)
    assert g.norms == ("stem.1", "res2.1")
    right = tiny.graph.group("group.right.0")  # second half of the concatenation read by mix.0
    assert right.columns("mix.0")[:, 0].tolist() == list(range(8, 16)) and right.columns("right.0").shape == (8, 1)
    # ... kept whole: mix.0's input width would depend on two units, one table axis cannot say it
    assert not right.prunable and not tiny.graph.group("group.left.0").prunable
    assert not tiny.graph.group("group.head").prunable  # the logits stay whole
    layers = {l.name: l for l in tiny.graph.layers}
    assert layers["stem.0"].in_group is None and layers["stem.0"].in_hw == (32, 32)  # the input stays whole
    assert (layers["dw.0"].in_group, layers["dw.0"].out_group) == ("group.expand.0", "group.expand.0")
    assert (layers["head"].in_group, layers["head"].out_group) == ("group.mix.0", None)
    assert (layers["mix.0"].in_group, layers["mix.0"].c_in) == (None, 16)


def test_every_layer_input_width_follows_its_unit() -> None:
    """densenet121: a dense layer reads the stem's and every earlier layer's output (a concatenation);
    its input width must be the unit's kept size or fixed, else the profile looks for ORT nodes of
    shapes no network has (the bug: "matched no ONNX Runtime node to layer ...denselayer2.conv1")."""
    a = resolve_model("torchvision.models:densenet121").configure(input_shape=(1, 3, 64, 64))
    g = a.graph
    full = {u.name: u.full for u in g.units()}
    for l in g.layers:
        assert l.in_group is None or l.c_in == full[l.in_group] * l.in_mult, l.name
    assert len(g.units()) == 58  # each dense layer's bottleneck (conv1 -> conv2)


def test_layers_that_never_run_are_left_out() -> None:
    """googlenet's auxiliary classifiers run only in training: no ORT node, no time, not a layer."""
    g = resolve_model("torchvision.models:googlenet").configure(input_shape=(1, 3, 64, 64)).graph
    names = {l.name for l in g.layers}
    assert "conv1.conv" in names and "fc" in names and not any(n.startswith("aux") for n in names)


def test_pruning_dead_channels_leaves_output_unchanged(tiny: CnnAdapter) -> None:
    model = Tiny().eval()
    with torch.no_grad():  # channels 1 and 5 of the residual stream: zero after both BNs of the add
        for bn in (model.stem[1], model.res2[1]):
            bn.weight[[1, 5]] = 0.0
            bn.bias[[1, 5]] = 0.0
        model.dw[1].weight[[0, 7, 40]] = 0.0  # depthwise group: dead after the dw conv's BN + ReLU
        model.dw[1].bias[[0, 7, 40]] = -1.0
    keep = lambda n, drop: [i for i in range(n) if i not in drop]  # noqa: E731
    plan = tiny.plan({"group.stem.0": keep(16, {1, 5}), "group.expand.0": keep(48, {0, 7, 40})})
    pruned = tiny.prune(model, plan)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(pruned(x), model(x), atol=1e-5)
    assert pruned.stem[0].out_channels == 14 and pruned.res1[0].in_channels == 14
    assert pruned.dw[0].groups == 45 == pruned.dw[0].in_channels and pruned.mix[0].in_channels == 16
    assert model.stem[0].out_channels == 16  # the dense model is untouched


def test_save_load_round_trip(tiny: CnnAdapter, tmp_path: Path) -> None:
    plan = tiny.plan({"group.res1.0": range(0, 32, 3), "group.mix.0": [0, 31], "group.project.0": range(12)})
    m = tiny.prune(tiny.dense(), plan)
    hwprune.save(m, plan, tmp_path)
    assert Plan.load(tmp_path / "plan.json").arch == {
        "model": "test_cnn_adapter:tiny_net",
        "input_shape": [1, 3, 32, 32],
    }
    loaded = hwprune.load(tmp_path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), m(x))
    assert loaded.mix[0].out_channels == 2 and loaded.head.in_features == 2 and not loaded.training


def test_resnet18_plan_replays_on_a_fresh_model(tmp_path: Path) -> None:
    a = resolve_model("resnet18").configure(input_shape=(1, 3, 64, 64))
    space = a.space()
    assert len(space.units) == 12 and space.unit("group.conv1").sizes == (32, 48, 64)
    g = torch.Generator().manual_seed(0)
    kept = {u.name: torch.randperm(u.full, generator=g)[: u.sizes[len(u.sizes) // 2]].tolist() for u in space.units}
    plan = a.plan(kept)
    m = a.prune(a.dense(), plan)
    assert m.layer1[0].conv1.in_channels == 48 and m.fc.in_features == space.unit("group.layer4.0.conv2").sizes[7]
    hwprune.save(m, plan, tmp_path)
    x = a.example_inputs(batch=2)["input"]
    with torch.no_grad():
        assert torch.equal(hwprune.load(tmp_path)(x), m(x))


@pytest.mark.parametrize("name,units", [("resnet50", 37), ("mobilenet_v2", 25), ("vgg16_bn", 15)])
def test_shipped_spaces_load(name: str, units: int) -> None:
    a = resolve_model(name).configure(input_shape=(1, 3, 64, 64))
    space = a.space()
    assert space.source.endswith(f"{name}.yaml") and len(space.units) == units
    assert all(0 not in u.sizes and u.sizes[-1] == u.full for u in space.units)


def test_default_space_for_a_factory(tiny: CnnAdapter) -> None:
    s = tiny.space()
    assert s.unit("group.res1.0").sizes == (16, 24, 32)  # multiples of 8, >= 16: ORT's kernels stay on their fast path
    assert s.unit("group.expand.0").sizes == (16, 24, 32, 40, 48)


def test_input_shape_parsing() -> None:
    assert parse_input_shape("2,3,64,48") == (2, 3, 64, 48) and parse_input_shape(None) == (1, 3, 224, 224)
    with pytest.raises(HwpruneError, match="rank 3; CNN models take a rank-4"):
        parse_input_shape("3,224,224")
    with pytest.raises(HwpruneError, match="not a list of integers"):
        parse_input_shape("1,3,a,b")


@pytest.mark.parametrize(
    "model,match",
    [
        ("no_such_pkg.models:net", "cannot import 'no_such_pkg.models'"),
        ("test_cnn_adapter:missing", "has no attribute 'missing'"),
    ],
)
def test_factory_that_does_not_import(model: str, match: str) -> None:
    with pytest.raises(HwpruneError, match=match):
        resolve_model(model)


def test_factory_not_returning_a_module() -> None:
    with pytest.raises(HwpruneError, match="returned a int, not a torch nn.Module"):
        CnnAdapter("test_cnn_adapter:not_a_module").dense()


def test_unsupported_layer_is_named() -> None:
    with pytest.raises(HwpruneError, match=r"module 'norm' \(LayerNorm\) is not supported"):
        CnnAdapter("test_cnn_adapter:with_layer_norm", input_shape=SHAPE).raw_units()


def test_wrong_channels_in_input_shape() -> None:
    with pytest.raises(HwpruneError, match="has 1 channels but the model's first conv takes 3"):
        CnnAdapter("resnet18", input_shape="1,1,64,64").dense()


def test_weights_are_checked_and_loaded(tmp_path: Path) -> None:
    ref = Tiny()
    good = tmp_path / "good.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(good))
    a = CnnAdapter("test_cnn_adapter:tiny_net", input_shape=SHAPE, weights=good)
    assert torch.equal(a.dense().head.weight, ref.head.weight)
    bad = tmp_path / "bad.safetensors"
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    sd["head.weight"] = torch.zeros(10, 33)
    save_file(sd, str(bad))
    with pytest.raises(HwpruneError, match=r"'head.weight' has shape \(10, 33\), the model needs \(10, 32\)"):
        CnnAdapter("test_cnn_adapter:tiny_net", input_shape=SHAPE, weights=bad).dense()
    pt = tmp_path / "w.pt"
    pt.write_bytes(b"not read")
    with pytest.raises(HwpruneError, match="only .safetensors files are read"):
        CnnAdapter("test_cnn_adapter:tiny_net", input_shape=SHAPE, weights=pt).dense()


def test_space_yaml_naming_a_missing_layer(tiny: CnnAdapter, tmp_path: Path) -> None:
    y = tmp_path / "s.yaml"
    y.write_text("overrides:\n  - {match: 'group.layer9.conv1', min: 8}\n")
    with pytest.raises(HwpruneError, match="names no unit of this model; units look like 'group.stem.0'"):
        tiny.space(y)
    y.write_text("defaults:\n  conv: {step: 4, allow_remove: true}\n")
    with pytest.raises(HwpruneError, match="allows 0 channels"):
        tiny.space(y)


def test_plan_with_bad_indices(tiny: CnnAdapter) -> None:
    with pytest.raises(HwpruneError, match=r"kept indices must be non-empty, unique and in \[0, 24\)"):
        tiny.plan({"group.project.0": [24]})
    with pytest.raises(HwpruneError, match="lacks; units look like"):
        tiny.plan({"group.nope": [0]})


def test_flops_match_torch_counter() -> None:
    from torch.utils.flop_counter import FlopCounterMode

    from hwprune.families.cnn.stats import cnn_stats

    a = resolve_model("resnet18").configure(input_shape=(1, 3, 64, 64))
    m = a.prune(a.dense(), a.plan({"group.layer1.0.conv1": range(16), "group.conv1": range(32)}))
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        m(torch.zeros(1, 3, 64, 64))
    st = cnn_stats(m, (1, 3, 64, 64))
    assert st.flops == fc.get_total_flops() and st.params == sum(p.numel() for p in m.parameters())


def test_configure_and_shape_tag(tmp_path: Path) -> None:
    a = resolve_model("test_cnn_adapter:tiny_net")  # what --model package.module:factory resolves to
    assert isinstance(a, CnnAdapter) and a.input_shape == (1, 3, 224, 224) and a.name == "tiny_net"
    b = a.configure(input_shape=(2, 3, 32, 32))
    assert b.input_shape == (2, 3, 32, 32) and b.shape_tag() == "3x32x32" and b.model == a.model
    assert b.shape_key().startswith("tiny_net-3x32x32-b2-") and b.spec()["weights"] is None


def test_load_restores_a_model_that_checks_its_state_dict_version(tmp_path: Path) -> None:
    """torchvision's MNASNet refuses a state dict without version metadata (safetensors has none)."""
    from safetensors.torch import save_file as save

    a = CnnAdapter("torchvision.models:mnasnet0_5", input_shape="1,3,64,64")
    space = a.space()
    plan = a.plan({u.name: range(s) for u, s in zip(space.units, space.uniform(0.5).sizes)})
    model = a.prune(a.dense(), plan)
    plan.save(tmp_path / "plan.json")
    save({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(hwprune.load(tmp_path)(x), model.eval()(x))


def test_distill_default_loss_fits_outputs(tiny: CnnAdapter) -> None:
    """The family default distillation loss (relative squared error of the output) trains a cut CNN
    towards the dense one; shapes stay as cut."""
    from hwprune.export.distill import DistillConfig, distill

    space = tiny.space()
    calib = tiny.load_calib(None, n_calib=32, n_heldout=8)
    model = tiny.fit_proxy("magnitude", space, calib).build(space.uniform(0.5))
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    dense = tiny.dense().eval()
    x = calib.heldout["input"]

    def rel() -> float:
        with torch.no_grad():
            ref = dense(x)
            return float((model(x) - ref).square().sum() / ref.square().sum())

    before = rel()
    doc = distill(tiny, model, calib.calib, DistillConfig(steps=40, lr=3e-3, batch=8))
    assert doc["loss_last"] < doc["loss_first"] and rel() < before
    assert {k: v.shape for k, v in model.state_dict().items()} == shapes
