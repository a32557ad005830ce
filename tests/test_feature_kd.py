"""The SSKD paper's baselines as methods: FitNets, AT and NST terms equal hand-computed values on
the networks' own stage outputs, KD with T = 4 is the ``kd`` preset, the teacher stays frozen,
the FitNets regressor is trained and never exported, the hint layer is the paper's 28×28 one."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

from dcmkd.losses.soft_targets import hinton_kd_loss
from dcmkd.methods import create_method
from dcmkd.methods.feature_kd import FeatureKD
from dcmkd.models import create_model

torch.set_num_threads(2)
SIZE, CLASSES = 8, 5
STAGES = ["conv1", "conv2_x", "conv3_x", "conv4_x"]   # the SSKD 4 stages of CIFAR ResNets


def batch(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, SIZE, SIZE, generator=g), torch.randint(0, CLASSES, (n,), generator=g)


def make(name, nets=("resnet32", "resnet20"), **loss):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "'.*' without teacher_weights")
        return create_method(name, list(nets), CLASSES, **loss)


def stage_features(method, x):
    """Teacher and student outputs of the 4 stages, from the backbones' own forward."""
    out = []
    for net in method.networks:
        with torch.no_grad():
            _, feats = net.backbone.forward_intermediates(x, STAGES)
        out.append([feats[s] for s in STAGES])
    return out


def attention(f):
    q = f.pow(2).mean(1).flatten(1)
    return q / q.norm(dim=1, keepdim=True)


def mmd2(s, t):
    """NST Eq. (MMD² with k(x, y) = (xᵀy)²) between the normalised channel responses."""
    s = F.normalize(s.flatten(2), dim=2)
    t = F.normalize(t.flatten(2), dim=2)
    k = lambda a, b: (a @ b.transpose(1, 2)).pow(2).mean((1, 2))  # noqa: E731
    return (k(t, t) + k(s, s) - 2 * k(s, t)).mean()


def test_attention_transfer_term_is_beta_half_times_the_sum_over_the_four_stages():
    """AT's β/2 · Σ_j mean((Q_S − Q_T)²) with β = the SSKD loss weight."""
    method = make("at", beta=50.0)
    x, y = batch()
    method.eval()
    out = method(x, y)
    t, s = stage_features(method, x)
    hand = sum((attention(a) - attention(b)).pow(2).mean() for a, b in zip(s, t))
    assert torch.allclose(out.losses["net1/at"], 50.0 / 2 * hand, rtol=1e-5)
    z = method.networks[1](x)[0]
    assert torch.allclose(out.losses["net1/ce"], F.cross_entropy(z, y), rtol=1e-5)


def test_nst_term_is_lambda_half_times_the_sum_of_mmd_over_the_four_stages():
    """NST's λ/2 · L_MMD², summed over the 4 stage pairs; ``reduction=mean`` averages them."""
    method = make("nst", beta=1000.0)
    x, y = batch()
    method.eval()
    t, s = stage_features(method, x)
    hand = sum(mmd2(a, b) for a, b in zip(s, t))
    assert torch.allclose(method(x, y).losses["net1/nst"], 1000.0 / 2 * hand, rtol=1e-4)
    method.reduction = "mean"
    assert torch.allclose(method(x, y).losses["net1/nst"], 1000.0 / 2 * hand / 4, rtol=1e-4)


def test_fitnets_term_uses_the_regressed_middle_residual_group():
    """The hint is conv3_x (the middle residual group, as the 28×28 hint is on ImageNet)."""
    method = make("fitnets", nets=("wrn16_2", "resnet20"), beta=100.0)   # 64 vs 32 channels
    x, y = batch()
    method.eval()
    with torch.no_grad():
        _, ft = method.networks[0].backbone.forward_intermediates(x, ["conv3_x"])
        _, fs = method.networks[1].backbone.forward_intermediates(x, ["conv3_x"])
        hand = (method.regressor(fs["conv3_x"]) - ft["conv3_x"]).pow(2).mean()
        assert torch.allclose(method(x, y).losses["net1/fitnets"], 100.0 * hand, rtol=1e-5)
    assert method.regressor.teacher_channels == 64 and method.regressor.student_channels == 32
    other = FeatureKD(*method.networks, "fitnets", 1.0, hint="conv2_x")
    assert other.hint == 1 and other.regressor.teacher_channels == 32


def test_fitnets_hint_on_imagenet_resnets_is_the_28x28_stage():
    method = FeatureKD(*create_method("ind", ["resnet34", "resnet18"], CLASSES).networks,
                       "fitnets", 10.0)
    for part in (method.t_part, method.s_part):
        seg = part.segments[method.hint]
        assert seg.name == "conv3_x" and 224 // seg.stride == 28


def test_kd_baseline_is_the_kd_preset_with_t4_and_t2_scaling():
    method = make("kd", temperature=4.0, beta=10.0, t2_scaling=True)
    x, y = batch()
    method.eval()
    out = method(x, y).losses
    with torch.no_grad():
        zt = method.networks[0](x)[0]
    zs = method.networks[1](x)[0]
    ref = hinton_kd_loss(zs, zt, y, weight=10.0, temperature=4.0)
    assert torch.allclose(out["net1/kd"], ref["kd"], rtol=1e-3)  # KL as CE − H: float32
    assert torch.allclose(out["net1/ce"], ref["ce"], rtol=1e-5)


@pytest.mark.parametrize("name", ["fitnets", "at", "nst"])
def test_teacher_frozen_student_and_regressor_trained_export_plain(name):
    method = make(name, nets=("wrn16_2", "resnet20"), beta=10.0)
    t0 = copy.deepcopy(method.networks[0].state_dict())
    s0 = copy.deepcopy(method.networks[1].state_dict())
    r0 = copy.deepcopy(method.state_dict())
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.05,
                          momentum=0.9)
    method.train()
    x, y = batch()
    for _ in range(2):
        out = method(x, y)
        opt.zero_grad()
        out.total().backward()
        opt.step()
    assert set(out.losses) == {"net1/ce", f"net1/{name}"}
    assert all(torch.equal(v, t0[k]) for k, v in method.networks[0].state_dict().items())
    assert any(not torch.equal(v, s0[k]) for k, v in method.networks[1].state_dict().items())
    regressor = {k for k in r0 if k.startswith("regressor.")}
    assert bool(regressor) == (name == "fitnets")
    assert all(not torch.equal(method.state_dict()[k], r0[k]) for k in regressor
               if k.endswith("weight"))
    teacher, student = method.export()
    assert set(student.state_dict()) == set(create_model("resnet20", CLASSES).state_dict())


def test_options_that_do_not_apply_are_refused():
    with pytest.raises(ValueError, match="loss.temperature does not apply to 'fitnets'"):
        create_method("fitnets", ["resnet20", "resnet20"], CLASSES, temperature=4.0)
    with pytest.raises(ValueError, match="loss.beta does not apply to 'sskd'"):
        create_method("sskd", ["resnet20", "resnet20"], CLASSES, beta=10.0)
    with pytest.raises(ValueError, match="hint stage must be 1..4"):
        make("fitnets", feature={"hint": 5})
