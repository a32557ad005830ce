"""timm and torchvision networks by name (``timm:…``, ``tv:…``): stages derived from the
libraries' metadata, every method on one network of each library, exports that load into the
plain library model, pretrained weights from local files and the one-line download hints."""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

from dcmkd.engine.config import resolve  # noqa: E402
from dcmkd.engine.trainer import Trainer  # noqa: E402
from dcmkd.heads import build_multi_exit  # noqa: E402
from dcmkd.methods import create_method  # noqa: E402
from dcmkd.methods.optimization import Schedule, SGDSettings  # noqa: E402
from dcmkd.methods.stages import partition_stages  # noqa: E402
from dcmkd.models import create_model  # noqa: E402
from dcmkd.models.ecosystem import LibraryBackbone, load_library_weights, unwrap  # noqa: E402
from dcmkd.weights import atomic_save, load_file  # noqa: E402

CLASSES, SIZE = 2, 32
TIMM, TV = "timm:resnet10t", "tv:resnet18"
TV_SMALL = "tv:shufflenet_v2_x0_5"   # 1.4 M parameters: the per-method sweep stays quick


pytestmark = pytest.mark.usefixtures("module_one_thread")   # tiny tensors: one thread


def images(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 3, SIZE, SIZE, generator=g),
            torch.randint(0, CLASSES, (n,), generator=g))


def plain(name: str, classes: int = CLASSES) -> torch.nn.Module:
    scheme, arch = name.split(":")
    if scheme == "timm":
        return timm.create_model(arch, num_classes=classes)
    return getattr(torchvision.models, arch)(num_classes=classes)


def assert_loads_into_plain(net: torch.nn.Module, name: str) -> None:
    """The exported network's state_dict loads strictly into the library's own model, which
    then computes the same logits as the trained network's C1."""
    exported = unwrap(net)
    assert type(exported).__module__.split(".")[0] == name.split(":")[0].replace("tv",
                                                                                 "torchvision")
    fresh = plain(name)
    fresh.load_state_dict(exported.state_dict())   # strict
    x, _ = images(2, seed=3)
    fresh.eval(), net.eval()
    with torch.no_grad():
        c1 = net(x)[0] if isinstance(net(x), list) else net(x)
        assert torch.allclose(fresh(x), c1, atol=1e-5)


# -- structure -------------------------------------------------------------------------------
def test_timm_stages_come_from_feature_info_and_tv_from_the_family_structure():
    t = create_model(TIMM, CLASSES)
    assert isinstance(t, LibraryBackbone) and t.model_name == TIMM
    # timm's feature_info of resnet10t: act1 (64, /2), layer1..4 (64..512, /4../32)
    assert [(s.name, s.channels, s.stride) for s in t.stage_info] == [
        ("act1", 64, 2), ("layer1", 64, 4), ("layer2", 128, 8), ("layer3", 256, 16),
        ("layer4", 512, 32)]
    v = create_model(TV, CLASSES)
    assert [(s.name, s.channels, s.stride) for s in v.stage_info] == [
        ("maxpool", 64, 4), ("layer1", 64, 4), ("layer2", 128, 8), ("layer3", 256, 16),
        ("layer4", 512, 32)]
    assert {k: s.blocks for k, s in v.stage_specs.items()} == {f"layer{i}": 2 for i in (1, 2, 3, 4)}
    # the parameters keep the library's names: state_dicts are interchangeable
    assert list(v.state_dict()) == list(plain(TV).state_dict())
    # SSKD's 4-stage partition: the stride-4 stem joins layer1 (tv), act1+layer1 merge (timm)
    assert partition_stages(v).names == ["maxpool+layer1", "layer2", "layer3", "layer4"]
    assert partition_stages(t).names == ["act1+layer1", "layer2", "layer3", "layer4"]


@pytest.mark.parametrize("name,expected", [
    ("tv:mobilenet_v2", [("features_1", 16, 2), ("features_3", 24, 4), ("features_6", 32, 8),
                         ("features_13", 96, 16), ("features_18", 1280, 32)]),
    ("timm:convnext_atto", [("stages_0", 40, 4), ("stages_1", 80, 8), ("stages_2", 160, 16),
                            ("stages_3", 320, 32)]),
])
def test_other_families_and_same_output_as_the_library(name, expected):
    net = create_model(name, 3)
    assert [(s.name, s.channels, s.stride) for s in net.stage_info] == expected
    x, _ = images(1)
    net.eval()
    with torch.no_grad():
        assert torch.equal(net(x), net.library(x))


def test_bad_names_and_underivable_structures_say_what_to_do():
    with pytest.raises(ValueError, match=r"unknown timm model 'resnet10x' \(did you mean"):
        create_model("timm:resnet10x", 2)
    with pytest.raises(ValueError, match="unknown torchvision model 'resnet17'"):
        create_model("tv:resnet17", 2)
    with pytest.raises(ValueError, match="model options of tv:resnet18: .*bogus"):
        create_model("tv:resnet18", 2, bogus=1)
    with pytest.raises(ValueError, match="torchvision's .* families, not SqueezeNet; wrap it "
                                         "with dcmkd.wrap_model"):
        create_model("tv:squeezenet1_1", 2)
    with pytest.raises(ValueError, match=r"timm:deit_tiny_patch16_224: its forward_features does "
                                         r"not run on a 64×64 probe \(Input height \(64\) doesn't "
                                         r"match model \(224\).*wrap it with dcmkd.wrap_model"):
        create_model("timm:deit_tiny_patch16_224", 2)     # a fixed input size: one line
    with pytest.raises(ValueError, match="takes weights: IMAGENET1K_V1"):
        create_model("tv:resnet18", 2, pretrained=True)


def test_constructor_options_reach_the_library():
    net = create_model(TIMM, CLASSES, drop_rate=0.25)
    assert net.library.drop_rate == 0.25
    small = create_model("tv:mobilenet_v2", CLASSES, width_mult=0.5)
    assert small.stage_info[1].channels == 16      # 24 × 0.5 rounded to a multiple of 8


# -- every method on one network of each library --------------------------------------------
def run_method(name, nets, steps=2, **kw):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)   # "the teacher is untrained"
        method = create_method(name, nets, CLASSES, **kw)
    method.configure_optimization(SGDSettings(), Schedule("constant", lr=0.01, epochs=1))
    method.train()
    x, y = images()
    before = [p.detach().clone() for p in method.networks[-1].parameters()]

    def step(loss, terms=None):
        method.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        method.optimizer.step()

    outs = [method.training_step(x, y, step) for _ in range(steps)]
    assert all(torch.isfinite(o.total()).all() for o in outs)
    changed = any(not torch.equal(a, b) for a, b in
                  zip(before, method.networks[-1].parameters()))
    assert changed, f"{name} did not train its last network"
    return method


LOGIT_METHODS = ["ind", "ds", "kd", "dml", "dml_ds", "dcm", "dcm1", "dcm2"]


#: where C2 and C3 tap (the units before the last two down-sampling stages)
TAPS = {TIMM: {"C2": "layer3", "C3": "layer2"}, TV_SMALL: {"C2": "stage3", "C3": "stage2"}}


@pytest.mark.parametrize("method", LOGIT_METHODS)
@pytest.mark.parametrize("lib", [TIMM, TV_SMALL])
def test_logit_methods_train_and_export_the_plain_library_model(method, lib):
    nets = [lib] if method in ("ind", "ds") else [lib, lib]
    m = run_method(method, nets, steps=1)
    aux = method in ("ds", "dml_ds", "dcm", "dcm1", "dcm2")
    net = m.networks[-1]
    assert net.classifier_names == (["C1", "C2", "C3"] if aux else ["C1"])
    if aux:   # every classifier meets the same 5 down-samplings (DCM's rule)
        assert {n: b.tap for n, b in net.branches.items()} == TAPS[lib]
        assert net.eval().downsamplings(SIZE) == {"C1": 5, "C2": 5, "C3": 5}
    assert_loads_into_plain(net, lib)


@pytest.mark.parametrize("method,lib", [(m, TIMM) for m in ("fitnets", "at", "nst", "sskd")]
                         + [("fitnets", TV_SMALL), ("at", TV_SMALL), ("nst", TV_SMALL),
                            ("sskd", TV)])
def test_stage_methods_run_on_library_networks(method, lib, tmp_path):
    teacher = create_model(lib, CLASSES)
    atomic_save(teacher.state_dict(), tmp_path / "teacher.pt")   # library keys
    opts = {"sskd": {"schedule": "epochs", "stage_epochs": 1, "head_epochs": 1}} \
        if method == "sskd" else {}
    m = run_method(method, [lib, lib], teacher_weights=str(tmp_path / "teacher.pt"), **opts)
    t = m.networks[0].backbone
    assert all(torch.equal(a, b) for a, b in zip(t.state_dict().values(),
                                                 teacher.state_dict().values()))
    assert_loads_into_plain(m.networks[1], lib)


def test_auxiliary_branches_are_fresh_copies_and_narrow_is_refused():
    net = build_multi_exit(TV, CLASSES)
    c3 = net.branches["C3"]
    # layer3 and layer4 at half their 2 blocks: one BasicBlock each, then pooling and a linear
    assert [len(s) for s in c3.stages] == [1, 1]
    assert type(c3.stages[0][0]).__name__ == "BasicBlock"
    own = net.backbone.stages["layer3"][0].conv1.weight
    assert not torch.equal(c3.stages[0][0].conv1.weight, own)
    with pytest.raises(ValueError, match="aux_kind 'narrow'"):
        build_multi_exit(TV, CLASSES, kind="narrow")
    apfc = build_multi_exit(TIMM, CLASSES, kind="apfc")
    assert apfc(images(2)[0])[2].shape == (2, CLASSES)


# -- weights ---------------------------------------------------------------------------------
def test_weights_from_a_state_dict_a_safetensors_file_and_a_run_folder(tmp_path):
    from safetensors.torch import save_file
    source = plain(TIMM, 1000)
    atomic_save(source.state_dict(), tmp_path / "w.pth")
    save_file({k: v.contiguous() for k, v in source.state_dict().items()},
              str(tmp_path / "w.safetensors"))
    for f in ("w.pth", "w.safetensors"):
        net = create_model(TIMM, 1000, weights=str(tmp_path / f))
        assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(),
                                                     source.state_dict().values()))
    # another class count: all but the classifier, with a warning
    with pytest.warns(UserWarning, match=r"classifier for another class count \(fc.weight, "
                                         r"fc.bias\)"):
        net = create_model(TIMM, CLASSES, weights=str(tmp_path / "w.pth"))
    assert torch.equal(net.library.layer4[0].conv1.weight, source.layer4[0].conv1.weight)
    assert net.library.fc.weight.shape == (CLASSES, 512)
    # a wrong architecture names the tensor
    with pytest.raises(ValueError, match="does not fit timm:resnet18: .*layer"):
        create_model("timm:resnet18", 1000, weights=str(tmp_path / "w.pth"))
    with pytest.raises(FileNotFoundError, match="neither a weights file or run folder"):
        create_model(TIMM, CLASSES, weights=str(tmp_path / "missing.pt"))


def test_torchvision_weights_names_use_the_hub_cache_and_say_what_to_fetch(tmp_path,
                                                                         monkeypatch):
    import urllib.error
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(*a, **k):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    cache = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    with pytest.raises(FileNotFoundError, match=(
            "cannot download ResNet18_Weights.IMAGENET1K_V1 for tv:resnet18 .*: fetch "
            "https://download.pytorch.org/models/resnet18-f37072fd.pth and put it at "
            + str(cache))):
        create_model(TV, CLASSES, weights="IMAGENET1K_V1")
    source = plain(TV, 1000)
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(source.state_dict(), cache)      # what the user fetched
    with pytest.warns(UserWarning, match="keeps its fresh init for 2 classes"):
        net = create_model(TV, CLASSES, weights="IMAGENET1K_V1")
    assert torch.equal(net.library.conv1.weight, source.conv1.weight)
    with pytest.raises(FileNotFoundError, match=r"IMAGENET1K_V1, DEFAULT\) nor a weights file"):
        create_model(TV, CLASSES, weights="IMAGENET_V9")


def test_timm_pretrained_download_failure_says_what_to_fetch(monkeypatch):
    import timm.models._builder as builder

    def offline(*a, **k):
        raise OSError("no network")
    monkeypatch.setattr(builder, "load_pretrained", offline)
    with pytest.raises(FileNotFoundError, match=(
            r"cannot load timm's pretrained weights for resnet10t \(no network\): fetch "
            r"https://huggingface.co/timm/resnet10t.c3_in1k \(model.safetensors\).* weights: "
            r"PATH")):
        create_model(TIMM, CLASSES, pretrained=True)


def test_a_run_trains_exports_and_its_folder_is_a_teacher(tmp_path):
    """The config path end to end: a tv teacher run, then SSKD into a timm-free tv student
    with the teacher's run folder; the exported files load into torchvision's models."""
    tiny = ["data.name=synthetic", "data.image_size=64", "data.train_subset=8",
            "data.batch_size=4", "data.test_batch_size=8", "epochs=1", "quiet=true",
            "device=cpu", "loss.rampup=0"]
    Trainer(resolve(None, ["method=ind", f"nets={TV}", *tiny, f"out={tmp_path / 't'}"])).fit()
    exported = tmp_path / "t" / "net0_tv-resnet18.pt"   # file-safe: no colon
    classes = load_file(exported)["fc.weight"].shape[0]
    from dcmkd.cli import main

    assert main(["eval", str(exported), "-q", "--json"]) == 0   # the model read from the name
    old_style = tmp_path / "t" / "net0_tv:resnet18.pt"   # folders of earlier versions
    old_style.write_bytes(exported.read_bytes())
    assert main(["eval", str(old_style), "-q", "--json"]) == 0
    getattr(torchvision.models, "resnet18")(num_classes=classes).load_state_dict(
        load_file(exported))
    Trainer(resolve(None, ["method=sskd", f"nets={TV},{TV}", *tiny,
                           f"teacher_weights={tmp_path / 't'}", "sskd.schedule=epochs",
                           "sskd.stage_epochs=1", "sskd.head_epochs=1", "sskd.stages=2",
                           f"out={tmp_path / 's'}"])).fit()
    torchvision.models.resnet18(num_classes=classes).load_state_dict(
        load_file(tmp_path / "s" / "net1_tv-resnet18.pt"))
    assert Path(tmp_path / "s" / "summary.json").is_file()
