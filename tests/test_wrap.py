"""Bring your own model (issue #7): wrap_model on classifiers that are not in the zoo — tap
discovery, equal down-sampling counts, branch construction, training with create_method,
export round-trip, clear errors — and the README example."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dcmkd import WrappedNetwork, build_multi_exit, create_model, wrap_model
from dcmkd.heads import APFCHead, MultiExitNetwork
from dcmkd.methods import create_method
from dcmkd.registry import UnknownNameError

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("module_one_thread")   # tiny tensors: one thread


# -- models written here, unknown to dcmkd -----------------------------------------------------
class Block(nn.Module):
    """torchvision's BasicBlock, reduced: ``downsample`` projection where the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class TVResNet(nn.Module):
    """torchvision-style ResNet: conv1/bn1/relu/maxpool, layer1..4, avgpool, flatten, fc."""

    def __init__(self, num_classes: int = 10, widths=(4, 8, 8, 16), blocks=(1, 1, 2, 2)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks)):
            layer = [Block(cin, w, 1 if i == 0 else 2)] + [Block(w, w) for _ in range(n - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*layer))
            cin = w
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def seq_cnn(num_classes: int = 10) -> nn.Sequential:
    """A plain sequential CNN: down-samples at "3" (max-pool) and "7" (strided conv)."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, 1, 1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, 1, 1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))


class TutorialNet(nn.Module):
    """The PyTorch tutorial's CNN: functional ReLUs and a shared pooling module."""

    def __init__(self):
        super().__init__()
        self.conv1, self.pool = nn.Conv2d(3, 6, 5), nn.MaxPool2d(2)
        self.conv2, self.fc = nn.Conv2d(6, 8, 5), nn.Linear(8 * 5 * 5, 10)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        return self.fc(torch.flatten(x, 1))


def x32(n: int = 4) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


# -- tap discovery and the paper's rule ---------------------------------------------------------
def test_resnet_taps_are_the_stages_before_each_downsampling():
    net = wrap_model(TVResNet(), classifiers="C2,C3,C4")
    assert isinstance(net, WrappedNetwork) and isinstance(net, MultiExitNetwork)
    assert net.taps == {"C2": "layer3", "C3": "layer2", "C4": "layer1"}
    assert net.classifier_names == ["C1", "C2", "C3", "C4"]
    # every path to a classifier has the same number of down-samplings, at any input size
    assert net.downsamplings() == {"C1": 5, "C2": 5, "C3": 5, "C4": 5}
    assert net.downsamplings(64) == {"C1": 5, "C2": 5, "C3": 5, "C4": 5}
    # C3 is a re-initialised copy of layer3 and layer4
    stages = net.branches["C3"].stages
    assert [tuple(p.shape) for p in stages.parameters()] == \
        [tuple(p.shape) for m in (net.backbone.layer3, net.backbone.layer4) for p in m.parameters()]
    assert not torch.equal(stages[0][0].conv1.weight, net.backbone.layer3[0].conv1.weight)


def test_sequential_cnn_taps_and_functional_downsampling():
    net = wrap_model(seq_cnn())
    assert net.taps == {"C2": "6", "C3": "2"}
    assert set(net.downsamplings().values()) == {2}
    assert set(net.downsamplings(16).values()) == {2}

    class FunctionalPool(nn.Module):  # down-samples between modules, with F.max_pool2d
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 4, 3, 1, 1), nn.Conv2d(4, 4, 3, 1, 1), \
                nn.Conv2d(4, 4, 3, 1, 1)
            self.fc = nn.Linear(4, 10)

        def forward(self, x):
            x = F.max_pool2d(self.a(x), 2)
            x = self.c(F.max_pool2d(self.b(x), 2))
            return self.fc(x.mean((2, 3)))

    assert wrap_model(FunctionalPool(), kind="apfc").taps == {"C2": "b", "C3": "a"}


def test_forward_contract_and_c1_is_the_models_own_forward():
    model = TVResNet().eval()
    net = wrap_model(model)
    assert net.backbone is model and net.training is False  # wrapped in place, modes kept
    x = x32()
    logits = net(x)
    assert [z.shape for z in logits] == [(4, 10)] * 3
    assert torch.equal(logits[0], model(x))
    assert all(not m._forward_hooks for m in model.modules())  # hooks live only in a forward
    # branches follow the model's dtype (and device)
    double = wrap_model(seq_cnn().double(), sample_input=torch.randn(2, 3, 16, 16).double())
    assert all(p.dtype == torch.float64 for p in double.parameters())
    assert double(torch.randn(2, 3, 16, 16).double())[2].dtype == torch.float64


def test_blocks_width_and_block_factory():
    net = wrap_model(TVResNet(), blocks="half")
    assert len(net.branches["C2"].stages[0]) == 1 and len(net.branches["C3"].stages[1]) == 1
    wide = wrap_model(TVResNet(), width={"C2": 2}, block_factory=Block)
    last = wide.branches["C2"].stages[0]
    assert [b.conv2.out_channels for b in last] == [32, 32]  # layer4 at twice its width
    assert wide.branches["C3"].stages[1][0].conv2.out_channels == 16  # C3 unchanged
    assert set(wide.downsamplings().values()) == {5}
    with pytest.raises(ValueError, match="block_factory"):
        wrap_model(TVResNet(), width=2.0)
    # primitive layers are rebuilt without a factory: the paper's "narrow" kind
    narrow = wrap_model(seq_cnn(), kind="narrow")
    assert narrow.branches["C3"].head.fc.in_features == 8
    assert set(narrow.downsamplings().values()) == {2}
    with pytest.raises(ValueError, match="no nn.Sequential of blocks"):
        wrap_model(seq_cnn(), blocks=1)


def test_zoo_blocks_rebuild_like_the_derived_table():
    """On a zoo ResNet-20, the paper's derived rule (C2 twice as wide, C3 half the blocks) is
    reproduced by wrap_model's options: same taps, same parameter counts per classifier."""
    torch.manual_seed(0)
    ref = build_multi_exit("resnet20", 10)
    net = wrap_model(create_model("resnet20", 10), width={"C2": 2}, blocks={"C3": "half"})
    assert net.taps == {"C2": "stages.conv3_x", "C3": "stages.conv2_x"}
    for name in ("C2", "C3"):
        count = sum(p.numel() for p in net.branches[name].parameters())
        assert count == sum(p.numel() for p in ref.branches[name].parameters()), name


def test_user_taps_apfc_and_nested_taps():
    net = wrap_model(TVResNet(), taps=["layer2", "layer3"])
    assert net.taps == {"C2": "layer3", "C3": "layer2"}
    nested = wrap_model(TVResNet(), taps={"C2": "layer3.0"})
    assert nested.classifier_names == ["C1", "C2"]
    assert len(nested.branches["C2"].stages) == 2  # layer3.1, then layer4
    assert set(nested.downsamplings().values()) == {5}
    apfc = wrap_model(TVResNet(), kind="apfc")
    assert isinstance(apfc.branches["C2"].head, APFCHead) and len(apfc.branches["C2"].stages) == 0
    assert [z.shape for z in apfc(x32(2))] == [(2, 10)] * 3
    assert wrap_model(TVResNet(), classifiers="C1").classifier_names == ["C1"]


# -- errors --------------------------------------------------------------------------------------
def test_unknown_tap_lists_close_names():
    with pytest.raises(UnknownNameError, match=r"did you mean .*layer4") as e:
        wrap_model(TVResNet(), taps=["layer5"])
    assert "layer1" in str(e.value)
    with pytest.raises(UnknownNameError, match=r"layer2\.0\.conv1"):
        wrap_model(TVResNet(), taps=["layer2.0.conv"])


def test_untraceable_models_give_clear_errors():
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10))
    with pytest.raises(ValueError, match="sample_input="):
        wrap_model(mlp)
    flat = nn.Sequential(nn.Conv2d(3, 4, 3, 1, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 10))
    with pytest.raises(ValueError, match=r"found 0 down-sampling point.*taps="):
        wrap_model(flat)
    # functional ops between modules cannot be copied; the apfc heads need no copy
    with pytest.raises(ValueError, match="not a module"):
        wrap_model(TutorialNet())
    assert wrap_model(TutorialNet(), kind="apfc").taps == {"C2": "conv2", "C3": "conv1"}
    with pytest.raises(ValueError, match="runs 2 times"):
        wrap_model(TutorialNet(), taps=["pool"], kind="apfc")
    with pytest.raises(ValueError, match="in place"):
        wrap_model(TVResNet(), taps=["bn1"])  # relu(inplace=True) overwrites it
    with pytest.raises(ValueError, match="outputs 10 classes, not 100"):
        wrap_model(seq_cnn(), 100)


# -- training and export ------------------------------------------------------------------------
def test_dcm_training_reduces_the_loss_and_export_round_trips(tmp_path):
    torch.manual_seed(0)
    nets = [wrap_model(TVResNet()), wrap_model(seq_cnn())]  # two different architectures
    method = create_method("dcm", nets)
    x, y = x32(16), torch.arange(16) % 10
    opt = torch.optim.SGD(method.parameters(), lr=0.05, momentum=0.9)
    first = None
    for _ in range(6):
        out = method(x, y)
        assert set(out.losses) >= {"net0/dcm1", "net0/dcm2", "net1/ds"}
        first = float(out.total().detach()) if first is None else first
        opt.zero_grad()
        out.total().backward()
        opt.step()
    with torch.no_grad():
        assert float(method(x, y).total()) < 0.8 * first

    method.eval()
    for wrapped, fresh in zip(method.networks, (TVResNet(), seq_cnn())):
        exported = wrapped.export()
        assert type(exported) is type(fresh)
        assert list(exported.state_dict()) == list(fresh.state_dict())
        torch.save(exported.state_dict(), tmp_path / "w.pt")
        fresh.load_state_dict(torch.load(tmp_path / "w.pt", weights_only=True), strict=True)
        with torch.no_grad():
            assert torch.equal(fresh.eval()(x), wrapped(x)[0])


def test_create_method_wraps_plain_modules():
    method = create_method("dml", [seq_cnn(), seq_cnn()], 10,
                           model_options={"sample_input": (2, 3, 16, 16)})
    assert all(isinstance(n, WrappedNetwork) and n.classifier_names == ["C1"]
               for n in method.networks)
    ds = create_method("ds", [seq_cnn()])
    assert ds.networks[0].taps == {"C2": "6", "C3": "2"}


def test_the_loop_trains_and_exports_wrapped_networks_from_a_plain_dataloader(tmp_path):
    """dcmkd.fit with the user's networks (wrap_model) and a torch DataLoader: training lowers
    the loss, and the run folder holds the user's own class, its own state_dict keys."""
    from torch.utils.data import DataLoader, TensorDataset

    import dcmkd

    torch.manual_seed(0)
    x, y = x32(64)[:, :, :8, :8], torch.arange(64) % 10
    train = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
    nets = [wrap_model(seq_cnn(), sample_input=(2, 3, 8, 8)) for _ in range(2)]
    method = create_method("dcm", nets)
    settings = dcmkd.TrainSettings(schedule=dcmkd.Schedule("constant", lr=0.05, epochs=3),
                                   device="cpu", quiet=True)
    summary = dcmkd.fit(method, train, tmp_path / "run", settings, test=train)
    assert summary["exported"] == ["net0_sequential.pt", "net1_sequential.pt"]
    lines = dcmkd.RunFolder(tmp_path / "run").read_metrics()
    assert lines[-1]["train/net0/ce"] < lines[0]["train/net0/ce"]
    model = seq_cnn()
    model.load_state_dict(torch.load(tmp_path / "run" / "net0_sequential.pt", weights_only=True))
    with torch.no_grad():
        assert torch.equal(model.eval()(x), method.networks[0].eval()(x)[0])


# -- the README example --------------------------------------------------------------------------
def test_readme_example_runs(tmp_path):
    spec = importlib.util.spec_from_file_location("byo_model", ROOT / "examples" / "byo_model.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    accuracy = example.main(epochs=2, out=str(tmp_path / "byo"))
    assert accuracy > 0.6   # 10 classes: chance is 0.1 (about 0.9 after 2 epochs, seed 0)
    assert (tmp_path / "byo" / "net0_smallcnn.pt").is_file()
