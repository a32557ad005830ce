"""The face and detection tasks through the run config and the CLI: `dcmkd train -d faces` /
`-d coco`, then `eval`, `export` and `report` on their run folders; task options are refused for
classification data, whose configs keep no task section (their run identity is unchanged)."""
from __future__ import annotations

import json

import pytest
import torch

from dcmkd.cli import main
from dcmkd.engine.config import ConfigError, resolve

from test_tasks import _identity_folder


def _train(args: list[str]) -> int:
    return main(["train", *args, "device=cpu", "quiet=true"])


def test_a_face_run_through_the_cli_trains_evaluates_exports(tmp_path, capsys):
    root = _identity_folder(tmp_path / "faces")
    out = tmp_path / "run"
    torch.manual_seed(0)
    assert _train(["-m", "ind", "-n", "resnet18", "-d", "faces", "--data-dir", str(root),
                   "-e", "1", "-o", str(out), "data.image_size=24", "data.batch_size=8",
                   "task.head=cosface"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "face"
    assert last == f"{out}: ind test rank1 resnet18 {summary['test_rank1'][0]:.2f}"
    cfg = (out / "config.yaml").read_text()
    assert "head: cosface" in cfg and "m: null" in cfg
    assert main(["eval", str(out)]) == 0
    lines = {line.split()[0]: line.split()[1] for line in
             capsys.readouterr().out.strip().splitlines() if line.startswith("test/")}
    assert lines["test/net0/face/rank1"] == f"{summary['test_face'][0]['rank1']:.2f}%"
    assert main(["export", str(out), "--to", str(tmp_path / "exp")]) == 0
    state = torch.load(tmp_path / "exp" / "net0_resnet18.pt", weights_only=True)
    assert "head.fc.weight" in state   # the cosine classifier's class weights


def test_report_tables_a_task_run_with_its_metrics(tmp_path, capsys):
    root = _identity_folder(tmp_path / "faces")
    out = tmp_path / "run"
    assert _train(["-m", "ind", "-n", "resnet18", "-d", "faces", "--data-dir", str(root),
                   "-e", "1", "-o", str(out), "data.image_size=24", "data.batch_size=8"]) == 0
    capsys.readouterr()
    assert main(["report", str(out), "--out", str(tmp_path / "rep")]) == 0
    printed = capsys.readouterr().out
    written = "".join(p.read_text() for p in (tmp_path / "rep").rglob("*.md"))
    assert "Rank-1" in printed + written


def test_task_options_belong_to_task_data_and_leave_classification_configs_alone():
    cfg = resolve(None, ["data.name=digits"])
    assert "task" not in cfg   # a classification run's identity is what it was
    with pytest.raises(ConfigError, match="task.detector is an option of the face and "
                                          "detection tasks"):
        resolve(None, ["data.name=digits", "task.detector=retinanet"])
    cfg = resolve(None, ["data.name=coco", "data.root=x", "task.detector=retinanet"])
    assert cfg["task"]["detector"] == "retinanet" and cfg["task"]["min_size"] == 800
    with pytest.raises(ConfigError, match="task.min_size"):
        resolve(None, ["data.name=coco", "task.min_size=4"])


def test_a_detection_run_through_the_cli(tmp_path, capsys):
    pytest.importorskip("torchvision")
    pytest.importorskip("pycocotools")
    from test_detection_task import _coco_folder

    root = _coco_folder(tmp_path / "coco")
    out = tmp_path / "run"
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert _train(["-m", "ind", "-n", "resnet18", "-d", "coco", "--data-dir", str(root),
                       "-e", "1", "-o", str(out), "data.batch_size=2", "optim.lr=0.01",
                       "task.detector=retinanet", "task.min_size=64",
                       "task.max_size=64"]) == 0
    finally:
        torch.set_num_threads(threads)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "detection" and summary["nets"] == ["retinanet_resnet18"]
    assert capsys.readouterr().out.strip().splitlines()[-1] == \
        f"{out}: ind test AP retinanet_resnet18 {summary['test_AP'][0]:.2f}"
    assert (out / "detections_net0.json").is_file()
