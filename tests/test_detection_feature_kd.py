"""FitNets, AT and NST on torchvision detectors (Faster R-CNN + FPN, RetinaNet): the transfer
term equals the formula on the features of SSKD's stage plan (C2..C5 for AT/NST, C3 or the FPN
levels for FitNets), the detector's own losses are the task term, the teacher stays frozen and
runs only as far as needed, the transfer term reaches the student's backbone, the FitNets
regressor is never exported, `dcmkd train -d coco -m at` runs end to end, and a mismatched
teacher is refused in one line."""
from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("torchvision")
pytest.importorskip("pycocotools")

from dcmkd.methods.feature_kd import FeatureKD  # noqa: E402
from dcmkd.models.detection import build_detector  # noqa: E402
from dcmkd.tasks.build import detection_method  # noqa: E402
from dcmkd.tasks.detection import DetectorNetwork  # noqa: E402

SIZE = 64
OPTS = dict(min_size=SIZE, max_size=SIZE, norm="bn")
DETECTION_LOSSES = {"fasterrcnn": {"loss_classifier", "loss_box_reg", "loss_objectness",
                                   "loss_rpn_box_reg"},
                    "retinanet": {"classification", "bbox_regression"}}

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


def _method(name: str, kind: str = "fasterrcnn", teacher: str = "resnet18", beta: float = 10.0,
            **feature) -> FeatureKD:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "'.*' without teacher_weights")
        return detection_method(name, kind, [teacher, "resnet18"], 2, detector_options=OPTS,
                                beta=beta, feature=feature or None)


def _batch() -> tuple[list[torch.Tensor], list[dict]]:
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, SIZE, SIZE, generator=g) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0], [30.0, 30.0, 60.0, 50.0]]),
                "labels": torch.tensor([1, 2])},
               {"boxes": torch.tensor([[10.0, 10.0, 50.0, 34.0]]), "labels": torch.tensor([2])}]
    return images, targets


def _attention(f: torch.Tensor) -> torch.Tensor:
    """AT §3.1: Q = vec(mean_c A_c²) / ‖·‖₂."""
    q = f.pow(2).mean(1).flatten(1)
    return q / q.norm(dim=1, keepdim=True)


def _mmd2(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """NST: MMD² with k(x, y) = (xᵀy)² between the L2-normalised channel responses."""
    s, t = F.normalize(s.flatten(2), dim=2), F.normalize(t.flatten(2), dim=2)
    k = lambda a, b: (a @ b.transpose(1, 2)).pow(2).mean((1, 2))  # noqa: E731
    return (k(t, t) + k(s, s) - 2 * k(s, t)).mean()


@pytest.mark.parametrize("name,kind,teacher,hint", [
    ("at", "fasterrcnn", "resnet34", "auto"), ("nst", "retinanet", "resnet18", "auto"),
    ("fitnets", "fasterrcnn", "resnet18", "auto"), ("fitnets", "retinanet", "resnet18", "fpn")])
def test_the_transfer_term_is_the_formula_on_the_plan_features(name, kind, teacher, hint):
    method = _method(name, kind, teacher, beta=10.0, hint=hint)
    method.train()
    student = method.networks[1]
    for m in student.modules():   # running statistics: the features do not depend on the batch
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    teacher_fpn_calls = []
    method.networks[0].detector.backbone.fpn.register_forward_hook(
        lambda *a: teacher_fpn_calls.append(1))
    images, targets = _batch()
    out = method(images, targets)
    assert set(out.losses) == {f"net1/{k}" for k in DETECTION_LOSSES[kind]} | {f"net1/{name}"}
    # the teacher ran only as far as the compared stages: its FPN only for the pyramid hint
    assert len(teacher_fpn_calls) == (1 if hint == "fpn" else 0)
    with torch.no_grad():
        x0 = student.prepare(images)   # the student's own resized, normalised batch
        s, t = method.s_part.run(x0), method.t_part.run(x0)
        if name == "at":   # λ/2 · Σ over C2..C5 of mean((Q_S − Q_T)²)
            assert [o.x.shape[-1] for o in s[:4]] == [16, 8, 4, 2]
            hand = 5.0 * sum((_attention(a.x) - _attention(b.x)).pow(2).mean()
                             for a, b in zip(s[:4], t[:4]))
        elif name == "nst":   # λ/2 · Σ over C2..C5 of MMD²
            hand = 5.0 * sum(_mmd2(a.x, b.x) for a, b in zip(s[:4], t[:4]))
        elif hint == "auto":   # λ · MSE(r(C3_S), C3_T): the stage ending at layer2
            assert method.s_part.names[method.hint] == "layer2"
            hand = 10.0 * (method.regressor(s[1].x) - t[1].x).pow(2).mean()
        else:   # λ · mean over the pyramid levels of MSE(r(P_S), P_T)
            assert list(s[4]) == ["0", "1", "2", "p6", "p7"]
            hand = 10.0 * torch.stack([(method.regressor(s[4][k]) - v).pow(2).mean()
                                       for k, v in t[4].items()]).mean()
    assert torch.allclose(out.losses[f"net1/{name}"], hand, rtol=1e-5, atol=1e-9)
    assert float(hand) > 0


def test_teacher_frozen_transfer_term_reaches_the_student_regressor_not_exported():
    method = _method("fitnets", "fasterrcnn", "resnet50")   # C3 128 → 512 channels
    assert (method.regressor.student_channels, method.regressor.teacher_channels) == (128, 512)
    teacher0 = copy.deepcopy(method.networks[0].state_dict())
    assert any(k.endswith("running_mean") for k in teacher0)   # BN buffers are watched too
    method.train()
    images, targets = _batch()
    out = method(images, targets)
    out.losses["net1/fitnets"].backward()   # the transfer term alone
    student = method.networks[1].detector
    body = student.backbone.body
    for layer in ("conv1", "layer1", "layer2"):   # up to the hint: a gradient
        grads = [p.grad for p in getattr(body, layer).parameters()]
        assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    for m in (body.layer3, body.layer4, student.backbone.fpn, student.rpn, student.roi_heads):
        assert all(p.grad is None for p in m.parameters())
    assert all(p.grad is None for p in method.networks[0].parameters())
    regressor0 = copy.deepcopy(method.regressor.state_dict())
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.01)
    for _ in range(2):
        opt.zero_grad()
        method(images, targets).total().backward()
        opt.step()
    for k, v in method.networks[0].state_dict().items():
        assert torch.equal(v, teacher0[k]), k
    assert not torch.equal(method.regressor.state_dict()["proj.0.weight"],
                           regressor0["proj.0.weight"])
    exported = method.export()[1]
    plain = build_detector("fasterrcnn", "resnet18", 3, **OPTS)
    assert list(exported.state_dict()) == list(plain.state_dict())
    assert any(k.startswith("regressor.") for k in method.state_dict())


def test_the_loss_weight_and_feature_options_reach_the_method_and_bad_pairs_fail_in_one_line(
        tmp_path):
    method = _method("at", "retinanet", beta=7.0, p=4.0, reduction="mean")
    assert method.weight == 7.0 and method.loss_options == {"p": 4.0}
    assert method.reduction == "mean" and method.compared == [0, 1, 2, 3]

    def one_line(fn, match):
        with pytest.raises(ValueError, match=match) as err:
            fn()
        assert "\n" not in str(err.value)

    retina = DetectorNetwork(build_detector("retinanet", "resnet18", 3, **OPTS))
    frcnn = DetectorNetwork(build_detector("fasterrcnn", "resnet18", 3, **OPTS))
    one_line(lambda: FeatureKD(retina, frcnn, "at", 1.0),
             "teacher kind 'retinanet' vs student 'fasterrcnn'")
    torch.save(frcnn.detector.state_dict(), tmp_path / "frcnn.pt")
    one_line(lambda: detection_method("nst", "retinanet", ["resnet18", "resnet18"], 2,
                                      teacher_weights=tmp_path / "frcnn.pt",
                                      detector_options=OPTS),
             "frcnn.pt does not fit the model")
    one_line(lambda: _method("at", stages=3), "feature.stages=3")
    one_line(lambda: detection_method("fitnets", "fasterrcnn", ["resnet18", "resnet18"], 2,
                                      detector_options=OPTS, label_smoothing=0.1),
             "loss.label_smoothing does not apply")
    one_line(lambda: detection_method("kd", "fasterrcnn", ["resnet18", "resnet18"], 2),
             r"ind, sskd, fitnets, at, nst\); KD does not apply")


def test_at_on_a_retinanet_through_the_cli_with_a_teacher_file(tmp_path, capsys):
    from dcmkd.cli import main
    from dcmkd.data.synthetic_tasks import write_coco_folder

    root = write_coco_folder(tmp_path / "coco", train_images=2, val_images=2, size=SIZE)
    torch.manual_seed(0)
    teacher = build_detector("retinanet", "resnet18", 3, min_size=SIZE, max_size=SIZE)
    torch.save(teacher.state_dict(), tmp_path / "teacher.pt")
    out = tmp_path / "run"
    args = ["train", "-m", "at", "-n", "resnet18,resnet18", "-d", "coco", "--data-dir",
            str(root), "-e", "1", "data.batch_size=2", "optim.lr=0.01",
            "task.detector=retinanet", f"task.min_size={SIZE}", f"task.max_size={SIZE}",
            "loss.beta=50", "device=cpu", "quiet=true"]
    assert main([*args, "-o", str(out), f"teacher_weights={tmp_path / 'teacher.pt'}"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "at" and summary["task"] == "detection"
    assert len(summary["test_coco"]) == 2
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"train/net1/at", "train/net1/classification"} <= set(record)
    results = json.loads((out / "detections_net1.json").read_text())
    assert all(r["category_id"] in (3, 7) for r in results)
    exported = torch.load(out / summary["exported"][0], weights_only=True)
    for k, v in teacher.state_dict().items():   # the teacher is the file's, unchanged
        assert torch.equal(exported[k], v), k
    capsys.readouterr()
    torch.save(build_detector("fasterrcnn", "resnet18", 3).state_dict(), tmp_path / "f.pt")
    assert main([*args, "-o", str(tmp_path / "bad"),
                 f"teacher_weights={tmp_path / 'f.pt'}"]) != 0
    err = [x for x in capsys.readouterr().err.strip().splitlines() if "warning:" not in x]
    assert len(err) == 1 and "f.pt does not fit the model" in err[0], err
