"""Model zoo: published parameter counts, declared stages, forward/backward of every model."""
from __future__ import annotations

import pytest
import torch

from dcmkd.models import MODELS, count_parameters, create_model, list_models
from dcmkd.registry import UnknownNameError

# (model, num_classes, published parameters) — He et al., WRN, DenseNet, torchvision/MobileNetV2
PUBLISHED = [
    ("resnet20", 10, 0.27e6), ("resnet56", 10, 0.85e6), ("resnet110", 10, 1.7e6),
    ("resnet164", 10, 1.7e6), ("resnet164", 100, 1.7e6),
    ("wrn28_10", 10, 36.5e6), ("wrn28_10", 100, 36.5e6),
    ("densenet40_12", 10, 1.0e6), ("densenet100_12", 10, 7.0e6),
    ("resnet18", 1000, 11.69e6), ("resnet34", 1000, 21.80e6), ("resnet50", 1000, 25.56e6),
    ("mobilenetv2", 1000, 3.50e6),
]


@pytest.mark.parametrize("name,num_classes,published", PUBLISHED)
def test_parameter_count_matches_publication(name, num_classes, published):
    with torch.device("meta"):
        model = create_model(name, num_classes)
    assert abs(count_parameters(model) - published) / published < 0.02


def test_required_models_are_registered():
    required = {"resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet164",
                "wrn28_10", "wrn28_4", "wrn16_2", "wrn40_2", "densenet40_12",
                "densenet121_cifar", "mobilenet", "vgg16_bn",
                "resnet18", "resnet34", "resnet50", "mobilenetv2"}
    assert required <= set(list_models())
    assert set(list_models("imagenet")) == {"resnet18", "resnet34", "resnet50", "mobilenetv2"}


def tiny_input(model, batch=2):
    size = 16 if model.input_size == 32 else 64
    return torch.randn(batch, 3, size, size)


@pytest.mark.parametrize("name", list_models())
def test_declared_stages_match_forward(name):
    """stage_info (channels, cumulative stride) is what the forward pass really produces."""
    model = create_model(name, num_classes=7).eval()
    x = tiny_input(model)
    logits, feats = model.forward_intermediates(x)
    assert logits.shape == (2, 7)
    assert list(feats) == model.stage_names
    for info in model.stage_info:
        f = feats[info.name]
        assert f.shape[1] == info.channels, info
        assert x.shape[-1] // f.shape[-1] == info.stride, info
    assert torch.allclose(model(x), logits)


def test_forward_intermediates_rejects_unknown_stage():
    model = create_model("resnet20", 10)
    with pytest.raises(UnknownNameError, match="conv3_x"):
        model.forward_intermediates(torch.randn(1, 3, 16, 16), taps=["conv9_x"])


def test_unknown_model_and_option_errors_list_choices():
    with pytest.raises(UnknownNameError, match="did you mean resnet110"):
        create_model("resnet11O")
    with pytest.raises(UnknownNameError, match="dropout"):
        create_model("wrn28_10", droput=0.3)


def test_wrn_dropout_is_between_the_two_convolutions_of_every_block():
    """WRN's placement: dropout acts on relu(bn2(conv1(.))), the input of conv2."""
    model = create_model("wrn16_2", 10, dropout=0.3)
    drops = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert len(drops) == 6 and all(d.p == 0.3 for d in drops)
    seen: dict[str, torch.Tensor] = {}
    block = model.stages["conv2_x"][0]
    block.dropout.register_forward_hook(lambda m, i, o: seen.update(drop_in=i[0], drop_out=o))
    block.conv2.register_forward_hook(lambda m, i, o: seen.update(conv2_in=i[0]))
    block.bn2.register_forward_hook(lambda m, i, o: seen.update(bn2_out=o))
    model.train()
    model(torch.randn(4, 3, 32, 32))
    assert torch.equal(seen["drop_in"], torch.relu(seen["bn2_out"]))   # after BN-ReLU
    assert seen["conv2_in"] is seen["drop_out"]                         # right before conv2
    dropped = (seen["drop_out"] == 0) & (seen["drop_in"] > 0)
    assert 0.2 < dropped.sum() / (seen["drop_in"] > 0).sum() < 0.4      # p = 0.3 in training
    assert not any(isinstance(m, torch.nn.Dropout) for m in create_model("wrn16_2").modules())


def test_default_head_sizes_follow_dataset():
    for name in list_models():
        assert MODELS.get(name).num_classes == (1000 if MODELS.get(name).dataset == "imagenet"
                                                else 100)
