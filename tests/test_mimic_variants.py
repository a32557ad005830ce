"""SSKD's mimic-loss options (issue 27): ``sskd.pyramid_reduce`` (mean / sum over a detector's
pyramid levels), ``sskd.mimic`` (the paper's l2, PKD's Pearson imitation, the fine-grained
imitation mask of Wang et al. 2019) and ``sskd.imitation_psi``; the defaults are today's loss
bit for bit."""
from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("torchvision")

from dcmkd.cli import main  # noqa: E402
from dcmkd.engine.config import resolve  # noqa: E402
from dcmkd.losses.features import (hint_loss, imitation_mask, masked_hint_loss,  # noqa: E402
                                   pearson_loss)
from dcmkd.methods import create_method  # noqa: E402
from dcmkd.methods.sskd import SSKD, prepare  # noqa: E402
from dcmkd.models.detection import build_detector, level_anchors  # noqa: E402
from dcmkd.registry import UnknownNameError  # noqa: E402
from dcmkd.tasks.detection import DetectorNetwork  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py

SIZE, K = 64, 3
FAST_RCNN = dict(rpn_pre_nms_top_n_train=50, rpn_post_nms_top_n_train=20,
                 box_batch_size_per_image=16)


def detector(kind: str = "fasterrcnn") -> DetectorNetwork:
    opts = FAST_RCNN if kind == "fasterrcnn" else {}
    return DetectorNetwork(build_detector(kind, "resnet18", K + 1, min_size=SIZE, max_size=SIZE,
                                          **opts))


def method(kind: str = "fasterrcnn", **options) -> SSKD:
    torch.manual_seed(0)
    teacher, student = detector(kind), detector(kind)
    return SSKD(teacher, student, schedule="epochs", stage_epochs=1, **options)


def batch(second_has_boxes: bool = True) -> tuple[list[torch.Tensor], list[dict]]:
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, SIZE, SIZE, generator=g) for _ in range(2)]
    second = torch.tensor([[10.0, 10.0, 33.0, 61.0]]) if second_has_boxes else \
        torch.zeros(0, 4)
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0]]), "labels": torch.tensor([1])},
               {"boxes": second, "labels": torch.ones(len(second), dtype=torch.int64)}]
    return images, targets


def features(m: SSKD, stage: int) -> tuple:
    """(student, teacher) features of ``stage`` on :func:`batch`, computed by hand."""
    images, _ = batch()
    x0 = prepare(m.student, images)
    with torch.no_grad():
        t = m.t_part.run(x0)[stage]
    s = m.s_part.run(x0)[stage]
    return m.s_part.feature(stage, s), m.t_part.feature(stage, t)


def to_stage(m: SSKD, stage: int) -> None:
    m._index = stage
    m._enter()
    m.train()


# -- defaults and pyramid_reduce ---------------------------------------------------------------
def test_default_options_give_todays_loss_exactly():
    m = method()
    assert (m.mimic, m.pyramid_reduce) == ("l2", "mean")
    to_stage(m, 4)   # the FPN stage
    images, targets = batch()
    loss = m(images, targets).losses["net1/stage5"]
    s, t = features(m, 4)
    assert list(t) == ["0", "1", "2", "3", "pool"]
    assert torch.equal(loss, torch.stack([hint_loss(s[k], v) for k, v in t.items()]).mean())
    to_stage(m, 1)   # a map stage: the plain hint loss
    loss = m(images, targets).losses["net1/stage2"]
    s, t = features(m, 1)
    assert torch.equal(loss, hint_loss(s, t))


def test_sum_is_levels_times_mean():
    g = torch.Generator().manual_seed(2)
    s0, t0 = torch.randn(2, 256, 4, 4, generator=g), torch.randn(2, 256, 4, 4, generator=g)
    equal_levels_s = {k: s0 for k in "abcde"}
    equal_levels_t = {k: t0 for k in "abcde"}
    one = hint_loss(s0, t0)
    mean, total = method(), method(pyramid_reduce="sum")
    assert torch.equal(mean._distance(4, equal_levels_s, equal_levels_t), one)
    assert torch.allclose(total._distance(4, equal_levels_s, equal_levels_t), 5 * one,
                          rtol=1e-6)
    s, t = features(mean, 4)   # a real pyramid: sum = 5 × mean
    assert torch.allclose(total._distance(4, s, t), 5 * mean._distance(4, s, t), rtol=1e-6)


# -- pearson -----------------------------------------------------------------------------------
def test_pearson_on_a_hand_computed_map_and_invariant_to_a_channels_scale_and_shift():
    # channel 0: student 1 2 3 4, teacher 1 3 2 4 (r = 0.8); channel 1: 0 0 1 1 vs 2 2 0 0
    # (r = −1). Normalised with the unbiased std (divisor 3): squared differences 2/(5/3) = 1.2
    # and 12, so ½·(13.2 / 8) = 0.825 = (1 − mean r)·(m − 1)/m = 1.1·3/4.
    s = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [1.0, 1.0]]]])
    t = torch.tensor([[[[1.0, 3.0], [2.0, 4.0]], [[2.0, 2.0], [0.0, 0.0]]]])
    assert pearson_loss(s, t).item() == pytest.approx(0.825, rel=1e-5)
    affine = s.clone()
    affine[:, 0] = 3.7 * affine[:, 0] - 5.0
    affine[:, 1] = 0.2 * affine[:, 1] + 9.0
    assert pearson_loss(affine, t).item() == pytest.approx(0.825, rel=1e-5)
    assert pearson_loss(t, t).item() == pytest.approx(0.0, abs=1e-10)
    assert hint_loss(affine, t).item() != pytest.approx(hint_loss(s, t).item())


def test_pearson_on_a_classifiers_stage_is_pkd_of_the_adapted_maps():
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="untrained"):
        m = create_method("sskd", ["resnet20", "resnet20"], 5,
                          sskd={"mimic": "pearson", "schedule": "epochs", "stage_epochs": 1})
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    m.train()
    loss = m(x, torch.zeros(4, dtype=torch.int64)).losses["net1/stage1"]
    s, t = m.s_part.run(x, stop=1)[0], m.t_part.run(x, stop=1)[0]
    assert torch.equal(loss, pearson_loss(m.s_part.feature(0, s), m.t_part.feature(0, t)))


# -- fine_grained ------------------------------------------------------------------------------
def hand_anchors() -> torch.Tensor:
    """One 10×10 anchor at each location of a 2×3 map of stride 10 (centres x 0/10/20,
    y 0/10): (H, W, K, 4) = (2, 3, 1, 4)."""
    ys, xs = torch.meshgrid(torch.tensor([0.0, 10.0]), torch.tensor([0.0, 10.0, 20.0]),
                            indexing="ij")
    return torch.stack([xs - 5, ys - 5, xs + 5, ys + 5], dim=-1).unsqueeze(2)


def test_imitation_mask_and_loss_on_a_hand_made_case():
    # box (2, 2, 12, 12): IoU with the anchors centred at (x, y) = (0, 0): 9/191;
    # (10, 0) and (0, 10): 21/179; (10, 10): 49/151 = 0.3245 (the best); x = 20: 0
    box = [torch.tensor([[2.0, 2.0, 12.0, 12.0]])]
    mask = imitation_mask(hand_anchors(), box, psi=0.5)      # F = 0.162: the best one only
    assert mask.shape == (1, 1, 2, 3)
    assert mask[0, 0].tolist() == [[0, 0, 0], [0, 1, 0]]
    mask3 = imitation_mask(hand_anchors(), box, psi=0.3)     # F = 0.097: also 21/179 = 0.117
    assert mask3[0, 0].tolist() == [[0, 1, 0], [1, 1, 0]]
    far = imitation_mask(hand_anchors(), [torch.tensor([[100.0, 100.0, 110.0, 110.0]])])
    assert far.sum() == 0   # best IoU 0: "larger than" 0 marks nothing
    s = torch.zeros(1, 2, 2, 3)
    t = torch.full((1, 2, 2, 3), 100.0)   # far off everywhere outside the masks
    t[0, :, 1, 1] = torch.tensor([1.0, 2.0])
    t[0, :, 0, 1] = torch.tensor([1.0, 1.0])
    t[0, :, 1, 0] = torch.tensor([0.0, 2.0])
    assert masked_hint_loss(s, t, mask).item() == pytest.approx(5 / 2)          # (1+4)/(2·1)
    assert masked_hint_loss(s, t, mask3).item() == pytest.approx((5 + 2 + 4) / 6)


def test_images_without_boxes_mask_nothing():
    box = torch.tensor([[2.0, 2.0, 12.0, 12.0]])
    mask = imitation_mask(hand_anchors(), [box, torch.zeros(0, 4)])
    assert mask[1].sum() == 0 and mask[0, 0].tolist() == [[0, 0, 0], [0, 1, 0]]
    s = torch.zeros(2, 2, 2, 3, requires_grad=True)
    t = torch.full((2, 2, 2, 3), 7.0)
    t[0, :, 1, 1] = torch.tensor([1.0, 2.0])
    assert masked_hint_loss(s, t, mask).item() == pytest.approx(2.5)   # image 2 adds nothing
    none = imitation_mask(hand_anchors(), [torch.zeros(0, 4), torch.zeros(0, 4)])
    zero = masked_hint_loss(s, t, none)
    zero.backward()
    assert zero.item() == 0.0 and torch.equal(s.grad, torch.zeros_like(s))


def test_level_anchors_are_the_detectors_own():
    det = detector("fasterrcnn").detector
    x = torch.zeros(2, 3, SIZE, SIZE)
    pyramid = {"0": torch.zeros(2, 256, 16, 16), "1": torch.zeros(2, 256, 8, 8),
               "2": torch.zeros(2, 256, 4, 4), "3": torch.zeros(2, 256, 2, 2),
               "pool": torch.zeros(2, 256, 1, 1)}
    anchors = level_anchors(det, x, pyramid)
    assert {k: tuple(v.shape) for k, v in anchors.items()} == {
        "0": (16, 16, 3, 4), "1": (8, 8, 3, 4), "2": (4, 4, 3, 4), "3": (2, 2, 3, 4),
        "pool": (1, 1, 3, 4)}
    # level '0': stride 64/16 = 4, size 32; aspect ratio 1 is the 2nd anchor: location (y 1,
    # x 2) is centred at (8, 4)
    assert anchors["0"][1, 2, 1].tolist() == [8 - 16, 4 - 16, 8 + 16, 4 + 16]
    # 'pool': stride 64, size 512
    assert anchors["pool"][0, 0, 1].tolist() == [-256, -256, 256, 256]
    retina = level_anchors(detector("retinanet").detector, x, pyramid)
    assert retina["0"].shape == (16, 16, 9, 4)   # RetinaNet: 3 scales × 3 ratios


def test_fine_grained_stage_loss_is_the_masked_loss_with_the_detectors_anchors():
    m = method(mimic="fine_grained")
    to_stage(m, 4)
    images, targets = batch()
    loss = m(images, targets).losses["net1/stage5"]
    s, t = features(m, 4)
    x0 = prepare(m.student, images)   # 64×64 images: boxes unchanged by the transform
    anchors = level_anchors(m.student.detector, x0, t)
    boxes = [tg["boxes"] for tg in targets]
    masks = {k: imitation_mask(a, boxes) for k, a in anchors.items()}
    assert all(mk.sum() > 0 for mk in masks.values())
    assert all(mk.sum() < mk.numel() for k, mk in masks.items() if k in ("0", "1"))
    expected = torch.stack([masked_hint_loss(s[k], v, masks[k]) for k, v in t.items()]).mean()
    assert torch.allclose(loss, expected, rtol=1e-6)
    to_stage(m, 0)   # a ResNet stage (no anchors): the plain l2
    loss = m(images, targets).losses["net1/stage1"]
    s, t = features(m, 0)
    assert torch.equal(loss, hint_loss(s, t))


# -- options and errors ------------------------------------------------------------------------
def test_the_options_are_config_keys_and_wrong_values_are_refused_in_one_line(capsys, tmp_path,
                                                                              monkeypatch):
    assert main(["config", "sskd"]) == 0
    out = capsys.readouterr().out
    for line in ('sskd.pyramid_reduce = "mean"  (a string; mean | sum)',
                 'sskd.mimic = "l2"  (a string; l2 | pearson | fine_grained)',
                 "sskd.imitation_psi = 0.5  (a number; ≥ 0)"):
        assert line in out
    with pytest.raises(UnknownNameError, match="unknown sskd.mimic 'cosine'; valid choices: "
                                               "fine_grained, l2, pearson"):
        resolve("demo", ["sskd.mimic=cosine"])
    monkeypatch.chdir(tmp_path)
    for wrong, message in (("sskd.pyramid_reduce=max", "unknown sskd.pyramid_reduce 'max'"),
                           ("sskd.imitation_psi=1", "sskd.imitation_psi: expected a value below 1"),
                           ("sskd.mimic=cosine", "unknown sskd.mimic 'cosine'")):
        assert main(["train", "demo", wrong]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    assert list(tmp_path.iterdir()) == []


def test_fine_grained_needs_a_detector_and_psi_needs_fine_grained():
    with pytest.warns(UserWarning, match="untrained"), \
            pytest.raises(ValueError, match=r"^sskd.mimic=fine_grained applies to detectors only"):
        create_method("sskd", ["resnet20", "resnet20"], 5, sskd={"mimic": "fine_grained"})
    with pytest.raises(ValueError, match=r"^sskd.imitation_psi=0.3 applies to "
                                         r"sskd.mimic=fine_grained only"):
        method(imitation_psi=0.3)
    with pytest.raises(UnknownNameError, match="unknown sskd mimic 'mse'"):
        method(mimic="mse")
    with pytest.warns(UserWarning, match="untrained"), \
            pytest.raises(ValueError, match=r"^sskd.pyramid_reduce=sum applies to detectors "
                                            r"only .*has no pyramid"):   # not silently ignored
        create_method("sskd", ["resnet20", "resnet20"], 5, sskd={"pyramid_reduce": "sum"})


# -- a detection stage step with each variant --------------------------------------------------
@pytest.mark.parametrize("kind,mimic,reduce", [
    ("fasterrcnn", "l2", "sum"), ("fasterrcnn", "pearson", "mean"),
    ("fasterrcnn", "fine_grained", "mean"), ("retinanet", "fine_grained", "sum"),
    ("retinanet", "pearson", "sum")])
def test_a_detection_stage_step_runs_with_each_variant(kind, mimic, reduce):
    m = method(kind, mimic=mimic, pyramid_reduce=reduce)
    to_stage(m, 4)
    images, targets = batch(second_has_boxes=False)
    loss = m(images, targets).losses["net1/stage5"]
    assert math.isfinite(loss.item()) and loss.item() > 0
    loss.backward()
    grads = [p.grad for p in m.student.detector.backbone.fpn.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in m.student.detector.backbone.body.parameters())


def test_multi_loss_with_pearson_covers_every_stage():
    m = method(mimic="pearson", multi_loss=True)
    m.train()
    images, targets = batch()
    out = m(images, targets)
    assert sorted(out.losses) == [f"net1/stage{i}" for i in range(1, 6)]
    total = out.total()
    assert math.isfinite(total.item())
    total.backward()
    assert m.student.detector.backbone.body.layer1[0].conv1.weight.grad.abs().sum() > 0
