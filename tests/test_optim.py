"""AdamW for users' own models: decoupled weight decay on weights with ≥ 2 dimensions only,
selected by the config's ``optim.name``; SGD stays the default (the papers' recipes)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dcmkd.engine.config import resolve
from dcmkd.engine.settings import TrainSettings
from dcmkd.methods.optimization import AdamWSettings, SGDSettings, optimizer_settings
from dcmkd.registry import UnknownNameError


def test_norm_and_bias_parameters_are_not_decayed():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    net(torch.zeros(1, 3, 5, 5))
    opt = AdamWSettings(weight_decay=0.05).build(net.parameters(), lr=0.1)
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.05 and plain["weight_decay"] == 0.0
    assert [tuple(p.shape) for p in decayed["params"]] == [(4, 3, 3, 3), (2, 36)]
    # conv bias, BN weight and bias, linear bias
    assert [tuple(p.shape) for p in plain["params"]] == [(4,), (4,), (4,), (2,)]
    assert opt.defaults["betas"] == (0.9, 0.999) and opt.defaults["eps"] == 1e-8


def test_one_step_is_decoupled_weight_decay_by_hand():
    """Loshchilov & Hutter (2019), Alg. 2, first step from zero moments: θ ← θ − lr·λ·θ −
    lr·m̂/(√v̂ + ε) with m̂ = g and v̂ = g², i.e. θ(1 − lr·λ) − lr·sign(g) (up to ε)."""
    w = nn.Parameter(torch.tensor([[2.0, -1.0]]))
    b = nn.Parameter(torch.tensor([3.0]))
    opt = AdamWSettings(weight_decay=0.5, eps=1e-12).build([w, b], lr=0.1)
    (w.sum() * 2 - b.sum() * 4).backward()       # g_w = [2, 2], g_b = [-4]
    opt.step()
    # w: [2·(1 − 0.05) − 0.1, −1·(1 − 0.05) − 0.1] = [1.8, −1.05]; b undecayed: 3 + 0.1
    assert torch.allclose(w.detach(), torch.tensor([[1.8, -1.05]]))
    assert torch.allclose(b.detach(), torch.tensor([3.1]))


def test_the_config_picks_the_optimiser_and_sgd_stays_the_default():
    assert isinstance(TrainSettings.from_config(resolve(None, [])).optim, SGDSettings)
    cfg = resolve(None, ["optim.name=adamw", "optim.weight_decay=0.02"])
    assert TrainSettings.from_config(cfg).optim == AdamWSettings(weight_decay=0.02)
    adamw = optimizer_settings({"name": "adamw", "weight_decay": 0.01, "momentum": 0.9})
    assert adamw == AdamWSettings(weight_decay=0.01)
    with pytest.raises(UnknownNameError, match="unknown optimizer 'adam'"):
        optimizer_settings({"name": "adam"})
    with pytest.raises(ValueError, match="optim.betas: expected two numbers in"):
        AdamWSettings(betas=(0.9, 1.5))
