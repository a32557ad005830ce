"""torchvision ResNet-FPN detectors for SSKD on detection (dcmkd.models.detection)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("torchvision")
from torchvision.models import resnet18, resnet34  # noqa: E402
from torchvision.models.detection import FasterRCNN  # noqa: E402
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor  # noqa: E402
from torchvision.ops.misc import FrozenBatchNorm2d  # noqa: E402

from dcmkd.models.detection import (  # noqa: E402
    RESNET_FPN_PARAMS, PyramidState, ResNetFPNPlan, build_detector, check_compatible,
    freeze_backbone, head_modules, model_size, preprocess, pyramid_levels)

K = 4  # object classes; num_classes = K + 1 (background counted) for both kinds
SIZE = 64


#: fewer proposals and sampled RoIs than torchvision's defaults (2000/512), to keep tests quick
FAST_RCNN = dict(rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100,
                 rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50,
                 box_batch_size_per_image=32)


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


def tiny(kind: str, backbone: str = "resnet18", **kw) -> nn.Module:
    torch.manual_seed(0)
    opts = FAST_RCNN if kind == "fasterrcnn" else {}
    return build_detector(kind, backbone, K + 1, min_size=SIZE, max_size=SIZE, **opts, **kw)


def batch() -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, SIZE, SIZE, generator=g) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0], [30.0, 2.0, 60.0, 20.0]]),
                "labels": torch.tensor([1, K])},
               {"boxes": torch.tensor([[10.0, 10.0, 33.0, 61.0]]), "labels": torch.tensor([2])}]
    return images, targets


LOSS_KEYS = {"fasterrcnn": {"loss_classifier", "loss_box_reg", "loss_objectness",
                            "loss_rpn_box_reg"},
             "retinanet": {"classification", "bbox_regression"}}
LEVELS = {"fasterrcnn": ["0", "1", "2", "3", "pool"], "retinanet": ["0", "1", "2", "p6", "p7"]}


@pytest.mark.parametrize("kind", ["fasterrcnn", "retinanet"])
def test_train_losses_and_eval_outputs(kind):
    keep_all = {"box_score_thresh": 0.0} if kind == "fasterrcnn" else {"score_thresh": 0.0}
    det = tiny(kind, **keep_all)  # keep every detection, so the format check sees some
    assert det.dcmkd_spec["kind"] == kind and det.dcmkd_spec["num_classes"] == K + 1
    assert (det.dcmkd_spec["min_size"], det.dcmkd_spec["max_size"]) == (SIZE, SIZE)
    images, targets = batch()
    det.train()
    losses = det(images, targets)
    assert set(losses) == LOSS_KEYS[kind]
    assert all(torch.isfinite(v) and v.dim() == 0 for v in losses.values())
    det.eval()
    with torch.no_grad():
        out = det(images)
    assert len(out) == 2
    for o in out:
        assert set(o) == {"boxes", "labels", "scores"}
        n = o["boxes"].shape[0]
        assert 0 < n <= (100 if kind == "fasterrcnn" else 300)  # torchvision's per-image caps
        assert o["boxes"].shape == (n, 4) and o["labels"].shape == (n,) == o["scores"].shape
        assert o["labels"].dtype == torch.int64
        assert bool((o["boxes"] >= 0).all() and (o["boxes"] <= SIZE).all())
        if kind == "fasterrcnn":  # the background column is never a detection
            assert bool(((o["labels"] >= 1) & (o["labels"] <= K)).all())


@pytest.mark.parametrize("kind,backbone", [("fasterrcnn", "resnet18"), ("retinanet", "resnet18"),
                                           ("retinanet", "resnet50")])
def test_plan_reproduces_backbone_exactly(kind, backbone):
    det = tiny(kind, backbone).eval()
    images, _ = batch()
    x, _ = preprocess(det, images)
    plan = ResNetFPNPlan(det)
    assert plan.names == ["conv1+layer1", "layer2", "layer3", "layer4", "fpn"]
    wide = 4 if backbone == "resnet50" else 1
    assert plan.channels == [64 * wide, 128 * wide, 256 * wide, 512 * wide, 256]
    assert plan.level_names == LEVELS[kind] == pyramid_levels(det)
    with torch.no_grad():
        ref = det.backbone(x.tensors)
        outs = plan.run(x)  # an ImageList is accepted at stage 0
        resumed = plan.run(outs[1], start=2)
    pyramid = plan.feature(4, outs[-1])
    assert list(pyramid) == list(ref) == LEVELS[kind]
    for name in ref:
        assert torch.equal(pyramid[name], ref[name]), name
        assert torch.equal(plan.feature(4, resumed[-1])[name], ref[name]), name
    # the ResNet stages: maps at strides 4, 8, 16, 32 and the C-levels the FPN will need
    for i, stride in enumerate([4, 8, 16, 32]):
        fmap = plan.feature(i, outs[i])
        assert fmap.shape == (2, plan.channels[i], SIZE // stride, SIZE // stride)
    collected = {"fasterrcnn": [[], ["0"], ["0", "1"], ["0", "1", "2"], ["0", "1", "2", "3"]],
                 "retinanet": [[], [], ["0"], ["0", "1"], ["0", "1", "2"]]}[kind]
    assert [list(o.levels) for o in outs[:4]] == collected[1:]
    assert torch.equal(list(outs[3].levels.values())[-1], outs[3].x)  # C5 is the layer4 map


def test_plan_modules_are_the_detectors_own():
    det = tiny("fasterrcnn")
    plan = ResNetFPNPlan(det)
    body = det.backbone.body
    assert plan.modules(0) == [body.conv1, body.bn1, body.relu, body.maxpool, body.layer1]
    assert plan.modules(3) == [body.layer4] and plan.modules(4) == [det.backbone.fpn]
    n_backbone = sum(p.numel() for p in det.backbone.parameters())
    assert sum(p.numel() for i in range(len(plan)) for p in plan.parameters(i)) == n_backbone
    with pytest.raises(TypeError, match="PyramidState"):
        plan.run_stage(2, torch.zeros(1, 128, 8, 8))
    with pytest.raises(IndexError, match="0..4"):
        plan.modules(5)


@pytest.mark.parametrize("kind", ["fasterrcnn", "retinanet"])
def test_head_modules(kind):
    det = tiny(kind)
    expected = ([det.rpn, det.roi_heads] if kind == "fasterrcnn"
                else [det.anchor_generator, det.head])  # RetinaNet's anchors: no parameters
    assert head_modules(det) == expected


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("kind", ["fasterrcnn", "retinanet"])
def test_freeze_backbone_one_sgd_step_changes_head_only(kind):
    det = tiny(kind)  # trainable BatchNorm: the running statistics would move in train mode
    images, targets = batch()
    opt = torch.optim.SGD(det.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    backbone0, head0 = _snapshot(det.backbone), _snapshot(nn.ModuleList(head_modules(det)))
    with freeze_backbone(det):
        det.train()  # cannot switch the frozen backbone's BN back to batch statistics
        losses = det(images, targets)
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
        assert not det.backbone.training and not det.backbone.body.layer1[0].bn1.training
        assert all(not p.requires_grad for p in det.backbone.parameters())
    after = _snapshot(det.backbone)
    assert all(torch.equal(backbone0[k], after[k]) for k in backbone0)
    head1 = _snapshot(nn.ModuleList(head_modules(det)))
    changed = [k for k in head0 if not torch.equal(head0[k], head1[k])]
    assert len(changed) >= 4
    # restored: requires_grad and the train flags as they were when freezing began
    assert all(p.requires_grad for p in det.backbone.parameters())
    assert det.backbone.training
    # the same step without freezing moves backbone BN statistics (the test above can fail)
    det(images, targets)
    moved = _snapshot(det.backbone)
    assert not torch.equal(after["body.bn1.running_mean"], moved["body.bn1.running_mean"])


def test_freeze_backbone_keeps_trainable_layers_flags():
    det = tiny("fasterrcnn", trainable_layers=2)
    flags = [p.requires_grad for p in det.backbone.parameters()]
    assert not det.backbone.body.layer2[0].conv1.weight.requires_grad
    handle = freeze_backbone(det)
    assert not any(p.requires_grad for p in det.backbone.parameters())
    handle.restore()
    assert [p.requires_grad for p in det.backbone.parameters()] == flags


def test_check_compatible():
    with torch.device("meta"):
        t = build_detector("fasterrcnn", "resnet101", K + 1, min_size=SIZE, max_size=SIZE)
        s = build_detector("fasterrcnn", "resnet18", K + 1, min_size=SIZE, max_size=SIZE)
        r = build_detector("retinanet", "resnet18", K + 1, min_size=SIZE, max_size=SIZE)
        s96 = build_detector("fasterrcnn", "resnet18", K + 1, min_size=96, max_size=SIZE)
        p3_p6 = FasterRCNN(_resnet_fpn_extractor(resnet18(), 5, returned_layers=[2, 3, 4]),
                           num_classes=K + 1, min_size=SIZE, max_size=SIZE)
    check_compatible(t, s)
    with pytest.raises(ValueError, match="^teacher kind 'fasterrcnn' vs student 'retinanet'$"):
        check_compatible(t, r)
    with pytest.raises(ValueError,
                       match=r"^teacher transform min_size \(64,\) vs student \(96,\)$"):
        check_compatible(t, s96)
    msg = "teacher pyramid levels ['0', '1', '2', '3', 'pool'] vs student ['0', '1', '2', 'pool']"
    with pytest.raises(ValueError) as e:
        check_compatible(t, p3_p6)
    assert str(e.value) == msg
    s.transform.image_std = [0.5, 0.5, 0.5]
    with pytest.raises(ValueError, match="image_std"):
        check_compatible(t, s)


def test_preprocess_resizes_normalises_and_pads():
    det = build_detector("fasterrcnn", "resnet18", K + 1, min_size=SIZE, max_size=SIZE)
    det.eval()
    image = torch.full((3, 50, 60), 0.5)
    target = {"boxes": torch.tensor([[6.0, 10.0, 30.0, 40.0]]), "labels": torch.tensor([1])}
    x, targets = preprocess(det, [image], [target])
    # scale min(64/50, 64/60) = 16/15: 50x60 -> 53x64, padded to a multiple of 32 -> 64x64
    assert x.image_sizes == [(53, 64)] and x.tensors.shape == (1, 3, 64, 64)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(x.tensors[0, :, 20, 30], (0.5 - mean) / std)
    assert bool((x.tensors[0, :, 53:, :] == 0).all())
    torch.testing.assert_close(targets[0]["boxes"],
                               torch.tensor([[6.4, 10.6, 32.0, 42.4]]))
    assert target["boxes"].tolist() == [[6.0, 10.0, 30.0, 40.0]]  # the caller's is untouched
    x2, none = preprocess(det, torch.stack([image, image]))
    assert none is None and x2.tensors.shape == (2, 3, 64, 64)
    with pytest.raises(ValueError,
                       match=r"image 0: expected a \[3, H, W\] tensor, got \(1, 8, 8\)"):
        preprocess(det, [torch.zeros(1, 8, 8)])


def test_model_size_hand_counts_and_torchvision_figures():
    det = tiny("fasterrcnn")
    size = model_size(det)
    # resnet18 11,689,512 (torchvision docs) minus fc 512*1000+1000
    assert size["body"] == 11_689_512 - 513_000
    # laterals (64+128+256+512)*256+4*256, outputs 4*(256*256*9+256)
    assert size["fpn"] == 246_784 + 2_360_320
    # RPN 590,080+771+3,084; fc6 12544*1024+1024; fc7 1024*1024+1024; predictor 1024*5+5, 1024*20+20
    assert size["head"] == 593_935 + 12_846_080 + 1_049_600 + 5_125 + 20_500
    assert size["total"] == size["backbone"] + size["head"]
    assert size["backbone"] == size["body"] + size["fpn"]
    with torch.device("meta"):
        frcnn = build_detector("fasterrcnn", "resnet50", 91, norm="frozen_bn")
        retina_p5 = build_detector("retinanet", "resnet50", 91, norm="frozen_bn", p6_from="p5")
        retina_c5 = build_detector("retinanet", "resnet50", 91, norm="frozen_bn")
    assert model_size(frcnn)["total"] == RESNET_FPN_PARAMS[("fasterrcnn", "resnet50", None)]
    assert model_size(retina_p5)["total"] == RESNET_FPN_PARAMS[("retinanet", "resnet50", "p5")]
    # P6 from C5 (paper): its 3x3 conv reads 2048 instead of 256 channels
    assert model_size(retina_c5)["total"] - model_size(retina_p5)["total"] == (2048 - 256) * 256 * 9
    assert retina_c5.backbone.fpn.extra_blocks.use_P5 is False
    assert retina_p5.backbone.fpn.extra_blocks.use_P5 is True


def test_backbone_weights_from_local_files(tmp_path):
    torch.manual_seed(3)
    ref = resnet18()
    sd = ref.state_dict()
    pt = tmp_path / "r18.pt"
    torch.save(sd, pt)
    det = build_detector("retinanet", "resnet18", K + 1, backbone_weights=pt)
    body = det.backbone.body
    assert isinstance(body.bn1, FrozenBatchNorm2d)  # defaults with weights: frozen BN, 3 layers
    assert det.dcmkd_spec["norm"] == "frozen_bn" and det.dcmkd_spec["trainable_layers"] == 3
    assert torch.equal(body.conv1.weight, sd["conv1.weight"])
    assert torch.equal(body.layer3[1].bn2.running_var, sd["layer3.1.bn2.running_var"])
    assert not body.conv1.weight.requires_grad and not body.layer1[0].conv1.weight.requires_grad
    assert body.layer2[0].conv1.weight.requires_grad
    scratch = build_detector("retinanet", "resnet18", K + 1)
    assert isinstance(scratch.backbone.body.bn1, nn.BatchNorm2d)
    assert scratch.dcmkd_spec["trainable_layers"] == 5
    pytest.importorskip("safetensors")
    from safetensors.torch import save_file
    st = tmp_path / "r18.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items() if not k.startswith("fc.")}, str(st))
    det2 = build_detector("fasterrcnn", "resnet18", K + 1, backbone_weights=st, norm="bn")
    assert torch.equal(det2.backbone.body.layer4[1].conv2.weight, sd["layer4.1.conv2.weight"])


def test_backbone_weights_errors(tmp_path):
    wrong = tmp_path / "r34.pt"
    torch.save(resnet34().state_dict(), wrong)
    with pytest.raises(ValueError) as e:
        build_detector("fasterrcnn", "resnet18", K + 1, backbone_weights=wrong)
    msg = str(e.value)
    assert "\n" not in msg and str(wrong) in msg
    assert ("unexpected keys ['layer1.2.conv1.weight', 'layer1.2.bn1.weight', "
            "'layer1.2.bn1.bias'] (+" in msg)
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        build_detector("fasterrcnn", "resnet18", K + 1, backbone_weights=missing)
    junk = tmp_path / "junk.pt"
    torch.save([1, 2, 3], junk)
    with pytest.raises(ValueError, match="junk.pt holds no state dict"):
        build_detector("fasterrcnn", "resnet18", K + 1, backbone_weights=junk)


@pytest.mark.parametrize("args,kw,match", [
    (("ssd", "resnet18", 5), {}, "detector kind must be one of"),
    (("fasterrcnn", "resnet20", 5), {}, "detector backbone must be one of"),
    (("fasterrcnn", "resnet18", 1), {}, "num_classes counts the background"),
    (("fasterrcnn", "resnet18", 5), {"norm": "gn"}, "norm must be one of"),
    (("fasterrcnn", "resnet18", 5), {"trainable_layers": 6}, "trainable_layers must be"),
    (("fasterrcnn", "resnet18", 5), {"p6_from": "c5"}, "p6_from applies to retinanet only"),
    (("retinanet", "resnet18", 5), {"p6_from": "c6"}, "p6_from must be one of"),
])
def test_build_errors(args, kw, match):
    with torch.device("meta"), pytest.raises(ValueError, match=match):
        build_detector(*args, **kw)


@pytest.mark.parametrize("norm", ["bn", "frozen_bn"])
def test_backbone_weights_from_a_zoo_resnet(norm):
    from dcmkd.models.resnet_imagenet import resnet18 as zoo_resnet18
    torch.manual_seed(4)
    zoo = zoo_resnet18(num_classes=10)
    for m in zoo.modules():  # non-trivial BN statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    zoo.eval()
    det = build_detector("fasterrcnn", "resnet18", K + 1, backbone_weights=zoo.state_dict(),
                         norm=norm).eval()
    assert det.dcmkd_spec["backbone_weights"] == "<state_dict>"
    body = det.backbone.body
    assert torch.equal(body.layer2[0].downsample[0].weight,
                       zoo.stages.conv3_x[0].shortcut[0].weight)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():  # same computation: layer4's map equals the zoo's last stage output
        c5 = body(x)["3"]
        ref = zoo.forward_features(x)
    torch.testing.assert_close(c5, ref, rtol=1e-5, atol=1e-5)
    # resnet18: 20 convs + 20 BNs x 4 tensors; resnet34: 36 convs + 36 x 4
    with pytest.raises(ValueError,
                       match="zoo ResNet with 100 backbone tensors, but ResNet here has 180"):
        build_detector("fasterrcnn", "resnet34", K + 1, backbone_weights=zoo.state_dict())
