"""Beyond the paper for small budgets (issue 13): the ramp-up of the distillation weights, the
per-source mean, and the official code's protocol (reflective padding, CIFAR-10 statistics, its
init, rate drops one epoch earlier with a fresh optimiser); WRN branches by Table 3's pattern."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dcmkd.data.augment import random_crop_flip, pad
from dcmkd.engine.build import build
from dcmkd.engine.config import resolve
from dcmkd.heads import build_multi_exit
from dcmkd.heads.tables import AUX_TABLES, derived_branches
from dcmkd.methods import Schedule, SGDSettings, create_method
from dcmkd.methods.optimization import rampup_factor
from dcmkd.models import create_model
from dcmkd.models.base import official_init

CLASSES = 10


def batch(n=8, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, CLASSES, (n,), generator=g)


# -- the ramp-up ------------------------------------------------------------------------------
def test_rampup_factor_shapes():
    assert rampup_factor(0.0, 15, "linear") == 0.0
    assert rampup_factor(7.5, 15, "linear") == 0.5
    assert rampup_factor(0.0, 15, "sigmoid") == pytest.approx(math.exp(-5))
    assert rampup_factor(7.5, 15, "sigmoid") == pytest.approx(math.exp(-5 * 0.25))
    for shape in ("linear", "sigmoid"):
        assert rampup_factor(15, 15, shape) == 1.0 and rampup_factor(40, 15, shape) == 1.0
    assert rampup_factor(0.0, 0, "sigmoid") == 1.0     # no ramp: the paper's constant weights


@pytest.mark.parametrize("shape", ["linear", "sigmoid"])
def test_a_ramp_scales_every_distillation_term_and_nothing_else(shape):
    torch.manual_seed(0)
    plain = create_method("dcm", ["resnet20", "resnet20"], CLASSES)
    torch.manual_seed(0)
    ramped = create_method("dcm", ["resnet20", "resnet20"], CLASSES, rampup=10,
                           rampup_shape=shape)
    for m in (plain, ramped):
        m.configure_optimization(SGDSettings(), Schedule("constant", lr=0.1, epochs=20))
    x, y = batch()
    for epoch in (0.0, 5.0, 10.0, 12.5):
        plain.begin_step(epoch), ramped.begin_step(epoch)
        a, b = plain(x, y).losses, ramped(x, y).losses
        w = rampup_factor(epoch, 10, shape)
        for k in a:
            expected = a[k] * (w if k.split("/")[1] in ("dcm1", "dcm2") else 1.0)
            assert torch.allclose(b[k], expected, rtol=1e-5, atol=1e-7), (epoch, k)
    ramped.begin_step(0.0)
    if shape == "linear":
        assert float(ramped(x, y).losses["net0/dcm2"].detach()) == 0.0


def test_dml_weight_ramps_too():
    torch.manual_seed(0)
    m = create_method("dml", ["resnet20", "resnet20"], CLASSES, rampup=4, rampup_shape="linear")
    m.configure_optimization(SGDSettings(), Schedule("constant", lr=0.1, epochs=8))
    x, y = batch()
    m.begin_step(0.0)
    assert float(m(x, y).losses["net0/dml"]) == 0.0
    m.begin_step(4.0)
    assert float(m(x, y).losses["net0/dml"]) > 0.0


def _after_one_step(name, epochs=40, **options):
    torch.manual_seed(0)
    m = create_method(name, ["resnet20", "resnet20"], CLASSES, **options)
    m.configure_optimization(SGDSettings(), Schedule("constant", lr=0.1, epochs=epochs))
    m(*batch())
    return m


def test_a_dcm_start_near_the_uniform_prediction_advises_the_ramp():
    # epoch 2 of the paper loss's run in benchmarks/results/dcm-remedies/dcm.metrics.jsonl
    record = {"train/net0/ce": 2.252, "train/net0/dcm1": 0.043, "train/net0/C1/acc": 0.152,
              "train/net1/ce": 2.288, "train/net1/dcm1": 0.044, "train/net1/C1/acc": 0.114}
    dcm = _after_one_step("dcm")
    hint = dcm.advice(1, record)
    assert "still 2.25–2.29" in hint and "ln 10 = 2.30" in hint
    assert "loss.rampup=10 (25% of the epochs)" in hint
    assert dcm.advice(0, record) is None and dcm.advice(2, record) is None   # once, epoch 2
    # the same run's ramped DCM at epoch 2 (ce 2.16, 0.94 of ln 10) would not be told
    assert dcm.advice(1, {**record, "train/net1/ce": 2.16}) is None
    assert _after_one_step("dcm", rampup=10).advice(1, record) is None
    assert _after_one_step("dcm", beta=0.0, gamma=0.0).advice(1, record) is None
    assert _after_one_step("dcm", epochs=2).advice(1, record) is None
    assert "loss.rampup=10" in _after_one_step("dml").advice(1, record)


def test_the_mean_reduction_divides_each_classifiers_terms_by_its_sources():
    """Two networks × three classifiers: every classifier has 3 sources (the other network's
    C1, C2, C3), so the mean is a third of the paper's sum, term by term."""
    torch.manual_seed(0)
    summed = create_method("dcm", ["resnet20", "resnet20"], CLASSES)
    torch.manual_seed(0)
    mean = create_method("dcm", ["resnet20", "resnet20"], CLASSES, reduction="mean")
    x, y = batch()
    a, b = summed(x, y).losses, mean(x, y).losses
    for k in a:
        factor = 1 / 3 if k.split("/")[1] in ("dcm1", "dcm2") else 1.0
        assert torch.allclose(b[k], a[k] * factor, rtol=1e-5), k
    torch.manual_seed(0)
    dml, dml_mean = (create_method("dml", ["resnet20", "resnet20"], CLASSES, reduction=r)
                     for r in ("sum", "mean"))
    dml_mean.load_state_dict(dml.state_dict())
    assert torch.equal(dml(x, y).losses["net0/dml"], dml_mean(x, y).losses["net0/dml"])


# -- WRN branches by supplementary Table 3's pattern -------------------------------------------
def blocks(spec):
    return tuple(s.blocks for s in spec.stages)


@pytest.mark.parametrize("name,n", [("wrn16_2", 2), ("wrn16_4", 2), ("wrn16_8", 2),
                                    ("wrn22_8", 3), ("wrn40_2", 6), ("wrn40_4", 6)])
def test_wrn_branches_copy_the_first_later_stage_whole_and_halve_the_next(name, n):
    table = derived_branches(create_model(name, CLASSES))
    assert blocks(table["C2"]) == (n,)
    assert blocks(table["C3"]) == (n, max(1, n // 2))
    assert blocks(table["C4"]) == (n, max(1, n // 2), max(1, n // 2))
    net = build_multi_exit(name, CLASSES, classifiers="C2,C3,C4")
    counts = [sum(1 for m in net.branches[c].stages.modules() if type(m).__name__ == "WideBasic")
              for c in ("C2", "C3", "C4")]
    assert counts == [n, n + max(1, n // 2), n + 2 * max(1, n // 2)]


@pytest.mark.parametrize("name", ["wrn28_10", "wrn28_4"])
def test_the_wrn_rule_reproduces_the_published_tables(name):
    derived = derived_branches(create_model(name, CLASSES))
    for c, spec in AUX_TABLES[name].items():
        assert derived[c].tap == spec.tap and derived[c].stages == spec.stages, c


def test_the_resnet_rule_is_unchanged():
    for name in ("resnet110", "resnet164"):
        derived = derived_branches(create_model(name, CLASSES))
        for c, spec in AUX_TABLES[name].items():
            assert derived[c].stages == spec.stages, (name, c)


# -- the official code's protocol ---------------------------------------------------------------
def test_reflective_padding():
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.uint8).reshape(2, 3, 6, 6)
    ref = F.pad(x.float(), (4, 4, 4, 4), mode="reflect").to(torch.uint8)
    assert torch.equal(pad(x, 4, "reflect"), ref)
    assert torch.equal(pad(x, 4, "zeros"), F.pad(x, (4, 4, 4, 4)))
    g = torch.Generator().manual_seed(0)
    crops = random_crop_flip(x, 4, g, flip=False, pad_mode="reflect")
    assert crops.shape == x.shape and (crops > 0).float().mean() > 0.95   # no zero border


def test_the_official_schedule_drops_one_epoch_earlier_with_a_fresh_optimiser():
    s = Schedule("multistep", lr=0.1, epochs=200, milestones=(60, 120, 160), gamma=0.2,
                 one_based=True, reset_momentum=True)
    assert [round(s(e), 6) for e in (58.99, 59.0, 118.5, 119.0, 159.0)] == \
        [0.1, 0.02, 0.02, 0.004, 0.0008]
    paper = Schedule("multistep", lr=0.1, epochs=200, milestones=(60, 120, 160), gamma=0.2)
    assert paper(59.5) == 0.1 and paper(60.0) == pytest.approx(0.02)
    torch.manual_seed(0)
    method = create_method("ind", ["resnet20"], CLASSES)
    method.configure_optimization(SGDSettings(), s)
    x, y = batch()

    def step(epoch):
        method.begin_step(epoch)
        out = method(x, y)
        method.optimizer.zero_grad()
        out.total().backward()
        method.optimizer.step()

    step(58.5)
    assert len(method.optimizer.state) > 0
    method.begin_step(58.9)
    assert len(method.optimizer.state) > 0              # no drop yet: momentum kept
    method.begin_step(59.0)
    assert len(method.optimizer.state) == 0             # the drop: a fresh optimiser
    step(59.0)
    method.begin_step(59.5)
    assert len(method.optimizer.state) > 0


def test_the_official_init():
    torch.manual_seed(0)
    net = create_model("wrn16_2", CLASSES)
    official_init(net)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    for c in convs:
        fan_in = c.weight[0].numel()
        assert c.weight.std().item() == pytest.approx(math.sqrt(2 / fan_in), rel=0.25)
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(0 <= float(b.weight.detach().min()) and float(b.weight.detach().max()) < 1
               for b in bns)
    assert all(float(b.bias.abs().max()) == 0 for b in bns)


def test_protocol_official_sets_every_detail_and_the_paper_protocol_none():
    official = resolve(None, ["nets=wrn28_10,wrn28_10", "protocol=official"])
    paper = resolve(None, ["nets=wrn28_10,wrn28_10"])
    assert official["data"]["pad_mode"] == "reflect" and paper["data"]["pad_mode"] == "zeros"
    assert official["data"]["normalize"] == "official" and paper["data"]["normalize"] == "dataset"
    assert official["init"] == "official" and paper["init"] == "zoo"
    assert official["schedule"]["one_based"] and official["schedule"]["reset_momentum"]
    assert not paper["schedule"]["one_based"] and not paper["schedule"]["reset_momentum"]
    own = resolve(None, ["nets=wrn28_10,wrn28_10", "protocol=official", "data.pad_mode=zeros"])
    assert own["data"]["pad_mode"] == "zeros"           # an explicit key wins over the protocol


def test_build_of_the_official_protocol_normalises_pads_and_initialises_as_the_official_code(
        tmp_path):
    """Through :func:`build`, as a run gets them: CIFAR-10's statistics for CIFAR-100, the
    training loader's reflective padding, the official init of the networks."""
    from test_data_cifar import write_cifar100   # the official file format, written small

    write_cifar100(tmp_path)
    args = ["method=ind", "nets=resnet20", "data.name=cifar100", f"data.root={tmp_path}",
            "device=cpu", "seed=0"]
    official, paper = (build(resolve(None, [*args, *p])) for p in (["protocol=official"], []))
    assert official.data.mean == pytest.approx((125.3 / 255, 123.0 / 255, 113.9 / 255))
    assert official.data.std == pytest.approx((63.0 / 255, 62.1 / 255, 66.7 / 255))
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)

    def crops(built, pad_mode: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The loader's augmentation of x, and random_crop_flip's with the same generator."""
        ours = built.data.train.augment(x, torch.Generator().manual_seed(3))
        return ours, random_crop_flip(x, 4, torch.Generator().manual_seed(3), pad_mode=pad_mode)

    assert torch.equal(*crops(official, "reflect")) and torch.equal(*crops(paper, "zeros"))
    assert not torch.equal(crops(official, "reflect")[0], crops(paper, "zeros")[0])
    for name in ("synthetic", "digits"):   # every padded dataset takes the key
        other = build(resolve(None, ["method=ind", "nets=resnet20", f"data.name={name}",
                                     "data.train_subset=20", "device=cpu", "protocol=official"]))
        assert "pad_mode=reflect" in other.data.train.augment.__qualname__

    def bn_weights(built) -> torch.Tensor:
        return torch.cat([m.weight.detach() for m in built.method.networks[0].modules()
                          if isinstance(m, nn.BatchNorm2d)])

    gammas = bn_weights(official)                         # U(0, 1)
    assert float(gammas.min()) >= 0 and float(gammas.max()) < 1 and float(gammas.std()) > 0.2
    assert bool((bn_weights(paper) == 1).all())           # PyTorch's 1
