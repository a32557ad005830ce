"""The task seam (issue 26, item 4): a task owns batches, training counts and evaluation; the
loop stays one loop. Proved with a regression task defined here, trained end to end, and with
the face task (SSKD Table 7) on a tiny identity folder written by the test."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from dcmkd.engine.loop import fit
from dcmkd.engine.settings import TrainSettings
from dcmkd.methods.base import StepOutput
from dcmkd.methods.optimization import Schedule, SGDSettings
from dcmkd.methods.supervised import Supervised
from dcmkd.run_folder import RunFolder
from dcmkd.tasks import CLASSIFICATION, task_of
from dcmkd.tasks.base import Task, stacked_read
from dcmkd.tasks.classification import topk_key


# -- a task of the test's own: least-squares regression ------------------------------------------
class Regression(Task):
    """Targets are real numbers; evaluation is the mean squared error of every network."""

    name = "regression"
    headline = "test_mse"

    def evaluate(self, method, batches, ctx):
        method.eval()
        sums = {}
        count = 0
        for x, y in batches.epoch(0):
            x, y = self.to_device(x, y, ctx.device)
            for n, net in enumerate(method.networks):
                err = ((net(x) - y) ** 2).sum()
                sums[f"test/net{n}/mse"] = sums.get(f"test/net{n}/mse", 0) + err
            count += len(y)
        return {k: v / count for k, v in stacked_read(sums).items()}

    def network_metric(self, record, n):
        return record.get(f"test/net{n}/mse")


class Linear(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 1)

    def forward(self, x, y=None):
        pred = self.fc(x).squeeze(1)
        return pred if y is None else {"mse": ((pred - y) ** 2).mean()}

    def losses(self, x, y):
        return self(x, y)

    def export(self):
        return self


def _regression_data(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5]) + 0.3
    return [(x[i:i + 8], y[i:i + 8]) for i in range(0, n, 8)]


def test_a_regression_task_trains_end_to_end_through_the_one_loop(tmp_path):
    torch.manual_seed(0)
    method = Supervised([Linear()], Regression())
    settings = TrainSettings(optim=SGDSettings(0.0, False, 0.0),
                             schedule=Schedule("constant", lr=0.2, epochs=6), device="cpu",
                             quiet=True)
    summary = fit(method, _regression_data(64, 0), tmp_path / "run", settings,
                  test=_regression_data(32, 1))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    first, last = records[0]["test/net0/mse"], records[-1]["test/net0/mse"]
    # y = x·w + b exactly: the error falls by orders of magnitude from the start (≈ 5.5)
    assert first > 100 * last and last < 0.01
    assert summary["task"] == "regression" and summary["test_mse"] == [pytest.approx(last)]
    assert summary["best_mse"] == [pytest.approx(min(r["test/net0/mse"] for r in records))]
    assert "train/net0/mse" in records[-1]   # the method's loss, averaged by the loop
    # a finished run is not redone; the exported network loads back
    assert fit(Supervised([Linear()], Regression()), _regression_data(64, 0), tmp_path / "run",
               settings, test=_regression_data(32, 1)) == summary
    state = torch.load(tmp_path / "run" / summary["exported"][0], weights_only=True)
    torch.testing.assert_close(state["fc.weight"], method.networks[0].fc.weight.detach())


def test_classification_is_the_default_task_with_its_keys():
    assert task_of(object()) is CLASSIFICATION
    assert topk_key(2, "C3", 5) == "test/net2/C3/top5"
    record = {topk_key(0): 12.5, topk_key(1): 10.0, topk_key(0, k=5): 1.0,
              topk_key(1, k=5): 2.0}
    out = CLASSIFICATION.summary([{topk_key(0): 20.0, topk_key(1): 9.0}, record], 2)
    assert out == {"test_top1": [12.5, 10.0], "best_top1": [12.5, 9.0], "test_top5": [1.0, 2.0]}
    assert CLASSIFICATION.epoch_text(record, 2) == "test top-1 error net0 12.50% net1 10.00%"
    counts = CLASSIFICATION.train_counts([[torch.tensor([[2.0, 1.0], [0.0, 3.0]])]],
                                         torch.tensor([0, 0]), [["C1"]])
    assert counts["train/net0/C1/acc"].item() == 1


# -- face (SSKD Table 7) -----------------------------------------------------------------------
def _identity_folder(root: Path, identities: int = 6, per: int = 4, size: int = 24) -> Path:
    """Faces of identity k are a fixed random pattern k plus noise (learnable, open-set)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = ["identity_dir,celeba_identity,n_images,split"]
    for k in range(identities):
        base = rng.integers(0, 256, (size, size, 3))
        folder = root / f"id{k:02d}"
        folder.mkdir(parents=True)
        for j in range(per):
            img = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(folder / f"{j}.png")
        rows.append(f"id{k:02d},{k},{per},{'train' if k < identities - 2 else 'test'}")
    (root / "SPLIT_SUGGESTED.csv").write_text("\n".join(rows) + "\n")
    return root


def _face_settings(epochs: int = 1) -> TrainSettings:
    return TrainSettings(schedule=Schedule("constant", lr=0.02, epochs=epochs), device="cpu",
                         quiet=True, optim=SGDSettings(0.9, False, 0.0))


def test_face_task_trains_a_teacher_then_sskd_stages_only_and_kd(tmp_path):
    from dcmkd.tasks.build import face_data, face_method

    root = _identity_folder(tmp_path / "faces")
    data = face_data(root, size=24, batch_size=8, test_batch_size=16)
    assert data.num_classes == 4 and data.identity["test_identities"] == 2
    torch.manual_seed(0)
    teacher = fit(face_method("ind", ["resnet18"], data.num_classes), data,
                  tmp_path / "teacher", _face_settings(2))
    assert teacher["task"] == "face"
    face = teacher["test_face"][0]
    assert set(face) == {"tar@far=0.01", "tar@far=0.001", "rank1", "rank5"}
    # 2 test identities with 4 images: 12 genuine, 16 impostor pairs: FAR 1% needs 100, so
    # neither TAR is measured (null, never NaN in a run's files)
    assert face["tar@far=0.01"] is None and face["tar@far=0.001"] is None
    assert face["rank5"] == 100.0   # 2 gallery identities: rank 5 always hits
    assert teacher["test_rank1"] == [face["rank1"]]
    method = face_method("sskd", ["resnet18", "resnet18"], data.num_classes,
                         teacher_weights=tmp_path / "teacher",
                         sskd={"schedule": "epochs", "stage_epochs": 1})
    head_before = {k: v.clone() for k, v in method.networks[1].backbone.head.state_dict().items()}
    summary = fit(method, data, tmp_path / "sskd", _face_settings())
    assert summary["epochs"] == 4   # 4 stages, no head phase: the output feature is the pool
    for k, v in method.networks[1].backbone.head.state_dict().items():
        assert torch.equal(v, head_before[k]), k   # the task head is not tuned
    # the teacher's figures are those of its own run (loaded, frozen)
    assert summary["test_face"][0]["rank1"] == pytest.approx(face["rank1"])
    kd = fit(face_method("kd", ["resnet18", "resnet18"], data.num_classes,
                         teacher_weights=tmp_path / "teacher", temperature=4.0),
             data, tmp_path / "kd", _face_settings())
    records = [json.loads(x) for x in (tmp_path / "kd" / "metrics.jsonl").open()]
    assert {"train/net1/ce", "train/net1/kd"} <= set(records[0])
    assert kd["test_face"][0] == teacher["test_face"][0]   # the frozen teacher, as trained


def test_face_margin_criterion_is_cosface_and_arcface_on_the_target_logit():
    from dcmkd.tasks.face import Face

    cos = torch.tensor([[0.5, 0.2], [0.1, 0.9]])
    y = torch.tensor([0, 1])
    s, m = 64.0, 0.35
    cosface = Face("cosface").criterion(s * cos, y)
    expect = torch.nn.functional.cross_entropy(s * (cos - m * torch.eye(2)), y)
    torch.testing.assert_close(cosface, expect)
    arc = Face("arcface").criterion(s * cos, y)
    target = torch.cos(torch.acos(torch.tensor([0.5, 0.9])) + 0.5)
    logits = s * cos.clone()
    logits[0, 0], logits[1, 1] = s * target[0], s * target[1]
    torch.testing.assert_close(arc, torch.nn.functional.cross_entropy(logits, y))
    with pytest.raises(ValueError, match="face head 'sphere'"):
        Face("sphere")


def test_face_data_refuses_a_test_set_without_a_genuine_pair(tmp_path):
    from dcmkd.tasks.build import face_data

    root = _identity_folder(tmp_path / "faces", identities=4, per=1)
    with pytest.raises(ValueError, match="one image per identity"):
        face_data(root, size=24)


def test_the_loop_counts_a_task_batch_by_its_own_size():
    class Pairs(Task):
        def batch_size(self, inputs, targets):
            return len(inputs[0])

    from dcmkd.engine.loop import Meter

    meter = Meter(torch.device("cpu"), [[]], 0, task=Pairs())
    meter.add(StepOutput({"net0/l": torch.tensor(2.0)}, [[]]), [0], size=4)
    meter.add(StepOutput({"net0/l": torch.tensor(1.0)}, [[]]), [0], size=2)
    assert meter.read(0)["train/net0/l"] == pytest.approx((2 * 4 + 1 * 2) / 6)


def test_a_finished_task_run_folder_is_a_run_folder(tmp_path):
    method = Supervised([Linear()], Regression())
    settings = TrainSettings(schedule=Schedule("constant", lr=0.05, epochs=1), device="cpu",
                             quiet=True)
    fit(method, _regression_data(16, 0), tmp_path / "r", settings, test=_regression_data(8, 1))
    assert RunFolder(tmp_path / "r").finished


def test_library_warnings_point_at_the_callers_line(tmp_path):
    """A Python API user sees their own file in a dcmkd warning, not a quoted library line."""
    import warnings as w

    from dcmkd.engine.settings import TrainSettings as TS

    with w.catch_warnings(record=True) as caught:
        w.simplefilter("always")
        TS(schedule=Schedule("step", lr=0.1, epochs=2, step_size=60))
    assert caught and all(c.filename == __file__ for c in caught), [(c.filename, str(c.message)[:60]) for c in caught]
