"""Auxiliary classifiers: every row of supplementary Tables 1–6 (SPEC.md §2), the three kinds,
classifier selection, equal down-sampling counts, export without auxiliary weights."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dcmkd.heads import (AUX_TABLES, AUX_KINDS, available_classifiers, build_multi_exit,
                         derived_branches, parse_classifiers)
from dcmkd.models import create_model, list_models
from dcmkd.registry import UnknownNameError

# Transcribed from SPEC.md §2: classifier -> (tapped stage, [(blocks, [per-block output width])]).
# For DenseNet the width is the growth rate; for MobileNetV2 (blocks, width) per (t,c,n,s) row.
EXPECTED = {
    "resnet110": {"C3": ("conv2_x", [(9, 32), (9, 64)]), "C2": ("conv3_x", [(18, 128)])},
    "resnet164": {"C3": ("conv2_x", [(9, 128), (9, 256)]), "C2": ("conv3_x", [(18, 512)])},
    "wrn28_10": {"C3": ("conv2_x", [(4, 320), (2, 640)]), "C2": ("conv3_x", [(4, 1280)]),
                 "C4": ("conv1", [(4, 160), (2, 320), (2, 640)])},
    "wrn28_4": {"C3": ("conv2_x", [(4, 128), (2, 256)]), "C2": ("conv3_x", [(4, 512)])},
    "densenet40_12": {"C3": ("dense1", [(12, 12), (6, 12)]), "C2": ("dense2", [(12, 36)])},
    "mobilenet": {"C3": ("conv1_5", [(6, 512), (2, 1024)]), "C2": ("conv6_11", [(2, 2048)])},
    "resnet18": {"C3": ("conv3_x", [(1, 256), (2, 512)]), "C2": ("conv4_x", [(2, 1024)])},
    "resnet50": {"C3": ("conv3_x", [(3, 1024), (2, 2048)]), "C2": ("conv4_x", [(3, 4096)])},
    "mobilenetv2": {"C3": ("block11_13", [(3, 160), (1, 320)]),
                    "C2": ("block14_16", [(1, 480)])},
}
HEAD_WIDTH = {("mobilenetv2", "C3"): 1280, ("mobilenetv2", "C2"): 1920}
BLOCK_CLASS = {"resnet110": "BasicBlock", "resnet164": "PreActBottleneck", "wrn28_10": "WideBasic",
               "wrn28_4": "WideBasic", "densenet40_12": "DenseLayer",
               "mobilenet": "DepthwiseSeparable", "resnet18": "BasicBlock",
               "resnet50": "Bottleneck", "mobilenetv2": "InvertedResidual"}
ROWS = [(m, c) for m, rows in EXPECTED.items() for c in rows]


def measured_blocks(net, cname):
    """[(blocks, [per-block output channels])] of each built stage, read off a meta forward."""
    branch = net.branches[cname]
    block_cls = BLOCK_CLASS[net.backbone.model_name]
    widths: dict[nn.Module, int] = {}
    hooks = [m.register_forward_hook(lambda mod, i, o: widths.__setitem__(mod, (i[0].shape[1],
                                                                                o.shape[1])))
             for m in branch.modules() if type(m).__name__ == block_cls]
    size = net.backbone.input_size
    with torch.no_grad():
        net(torch.empty(1, 3, size, size, device="meta"))
    for h in hooks:
        h.remove()
    out = []
    for stage in branch.stages:
        blocks = [m for m in stage.modules() if type(m).__name__ == block_cls]
        per_block = [widths[b][1] - widths[b][0] if block_cls == "DenseLayer" else widths[b][1]
                     for b in blocks]
        out.append((len(blocks), per_block))
    return out


@pytest.mark.parametrize("model,cname", ROWS)
def test_table_row(model, cname):
    """Each row: the tapped stage, block type, counts and widths, and the down-sampling count."""
    with torch.device("meta"):
        net = build_multi_exit(model, classifiers=list(EXPECTED[model]))
    tap, stages = EXPECTED[model][cname]
    assert net.branches[cname].tap == tap
    got = measured_blocks(net, cname)
    assert [(n, set(w)) for n, w in got] == [(n, {w}) for n, w in stages]
    if (model, cname) in HEAD_WIDTH:
        assert net.branches[cname].head.fc.in_features == HEAD_WIDTH[(model, cname)]
    downs = net.downsamplings()
    assert downs[cname] == downs["C1"]


def test_mobilenetv2_c3_expansions_follow_table6():
    spec = AUX_TABLES["mobilenetv2"]["C3"]
    assert [(s.expansion, s.width, s.blocks, s.stride) for s in spec.stages] == \
        [(6, 160, 3, 2), (3, 320, 1, 1)]


def test_derived_rule_reproduces_resnet_tables():
    """The rule used for backbones without a table gives exactly Tables 1's ResNet rows."""
    for name in ("resnet110", "resnet164"):
        derived = derived_branches(create_model(name, 10))
        assert {k: derived[k] for k in ("C2", "C3")} == AUX_TABLES[name]


@pytest.mark.parametrize("name", list_models())
def test_every_path_has_the_same_number_of_downsamplings(name):
    for kind in ("default", "narrow"):
        with torch.device("meta"):
            net = build_multi_exit(name, 10, kind=kind)
        downs = net.downsamplings()
        assert len(set(downs.values())) == 1, (kind, downs)


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("kind", AUX_KINDS)
def test_forward_backward_every_model_and_kind(name, kind):
    torch.manual_seed(0)
    net = build_multi_exit(name, 5, kind=kind)
    size = 16 if net.backbone.input_size == 32 else 64
    x = torch.randn(2, 3, size, size)
    outs = net(x)
    assert len(outs) == net.num_classifiers == 3
    assert all(o.shape == (2, 5) and torch.isfinite(o).all() for o in outs)
    sum(o.square().mean() for o in outs).backward()
    for cname, branch in net.branches.items():
        assert all(p.grad is not None for p in branch.parameters()), cname
    assert net.backbone.stem.parameters().__next__().grad is not None


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("kind", AUX_KINDS)
def test_every_available_classifier_runs(name, kind):
    """Every classifier a model offers (C4 included) builds and runs in every kind: the
    ``narrow`` C4 of a CIFAR ResNet taps the 16-channel stem with 8-channel blocks, which the
    parameter-free shortcut cannot do (it once failed at the first forward pass)."""
    with torch.device("meta"):
        probe = build_multi_exit(name, 5)
        offered = available_classifiers(probe.backbone, name)
        net = build_multi_exit(name, 5, classifiers=offered, kind=kind)
        size = net.backbone.input_size
        outs = net(torch.empty(2, 3, size, size))
    assert net.classifier_names == ["C1", *offered]
    assert all(o.shape == (2, 5) for o in outs)


def test_narrow_halves_widths_and_growth():
    for model in ("wrn28_10", "densenet40_12"):
        with torch.device("meta"):
            net = build_multi_exit(model, 100, kind="narrow")
        for cname in ("C2", "C3"):
            full = AUX_TABLES[model][cname].stages
            got = net.branches[cname].spec.stages
            assert [s.width for s in got] == [s.width // 2 for s in full]
            assert [s.blocks for s in got] == [s.blocks for s in full]


def test_apfc_is_pool4_and_one_linear_at_same_taps():
    with torch.device("meta"):
        net = build_multi_exit("wrn28_10", 100, kind="apfc")
    for cname in ("C2", "C3"):
        branch = net.branches[cname]
        assert branch.tap == AUX_TABLES["wrn28_10"][cname].tap
        linears = [m for m in branch.modules() if isinstance(m, nn.Linear)]
        convs = [m for m in branch.modules() if isinstance(m, nn.Conv2d)]
        channels = net.backbone.stage(branch.tap).channels
        assert not convs and len(linears) == 1
        assert linears[0].in_features == channels * 16 and linears[0].out_features == 100


@pytest.mark.parametrize("selection,expected", [
    (None, ["C1", "C2", "C3"]), ("C1+C4", ["C1", "C4"]), ("C1+C3", ["C1", "C3"]),
    ("C1+C2", ["C1", "C2"]), ("C1+C2C3", ["C1", "C2", "C3"]),
    ("C1+C2C3C4", ["C1", "C2", "C3", "C4"]), ("C3,C2", ["C1", "C2", "C3"]), ("C1", ["C1"]),
])
def test_classifier_selection_paper_table3(selection, expected):
    with torch.device("meta"):
        net = build_multi_exit("wrn28_10", 100, classifiers=selection)
    assert net.classifier_names == expected


def test_bad_selection_lists_valid_choices():
    with pytest.raises(UnknownNameError, match="valid choices: C2, C3"):
        build_multi_exit("resnet110", classifiers="C4")
    with pytest.raises(UnknownNameError, match="apfc, default, narrow"):
        build_multi_exit("resnet20", kind="wide")
    with pytest.raises(UnknownNameError):
        parse_classifiers("C1+C7")


def test_output_order_and_export_without_auxiliary_weights():
    torch.manual_seed(0)
    net = build_multi_exit("resnet20", 10).eval()
    x = torch.randn(3, 3, 32, 32)
    outs = net(x)
    plain = net.export()
    assert torch.allclose(plain(x), outs[0])  # C1 first
    assert torch.allclose(net.branches["C2"](net.backbone.forward_intermediates(x)[1]["conv3_x"]),
                          outs[1])
    assert set(plain.state_dict()) == set(create_model("resnet20", 10).state_dict())
    fresh = create_model("resnet20", 10)
    fresh.load_state_dict(plain.state_dict())
    assert torch.allclose(fresh.eval()(x), outs[0])


@pytest.mark.parametrize("name,kind", [("resnet20", "default"), ("resnet110", "default"),
                                       ("wrn16_2", "narrow"), ("resnet110", "apfc")])
def test_branches_start_like_the_backbone(name, kind):
    """Branches get the backbone's own init (He fan-out convs, N(0, 0.01) linear, zero biases,
    unit BN), not PyTorch's defaults (whose conv std here is about half of He's)."""
    torch.manual_seed(0)
    net = build_multi_exit(name, num_classes=100, kind=kind)
    for branch in net.branches.values():
        convs = [m for m in branch.modules() if isinstance(m, nn.Conv2d)]
        for conv in convs:
            fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1] // conv.groups
            if conv.weight.numel() >= 4096:  # enough samples for a 10% tolerance
                assert conv.weight.std().item() == pytest.approx((2 / fan_out) ** 0.5, rel=0.1)
        for bn in (m for m in branch.modules() if isinstance(m, nn.BatchNorm2d)):
            assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)
        fc = [m for m in branch.modules() if isinstance(m, nn.Linear)][-1]
        assert fc.weight.std().item() == pytest.approx(0.01, rel=0.1)
        assert torch.all(fc.bias == 0)
        assert convs or kind == "apfc"
