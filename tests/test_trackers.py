"""``trackers``: every epoch record's numbers logged to Weights & Biases / MLflow / TensorBoard;
the packages are faked here (a module in ``sys.modules`` that records its calls)."""
from __future__ import annotations

import json
import sys
import types

import pytest

from dcmkd.engine.config import resolve
from dcmkd.engine.trackers import MLflow, Trackers, tracker_names
from dcmkd.engine.trainer import Trainer
from dcmkd.run_folder import config_hash


def fake_wandb(calls: list) -> types.ModuleType:
    m = types.ModuleType("wandb")
    m.init = lambda **kw: calls.append(("init", kw)) or object()
    m.log = lambda numbers, step=None: calls.append(("log", dict(numbers), step))
    m.finish = lambda: calls.append(("finish",))
    return m


def fake_mlflow(calls: list) -> types.ModuleType:
    m = types.ModuleType("mlflow")
    m.start_run = lambda **kw: calls.append(("start_run", kw))
    m.log_metrics = lambda metrics, step=None: calls.append(("log_metrics", dict(metrics), step))
    m.end_run = lambda: calls.append(("end_run",))
    return m


def tiny(tmp_path, *extra: str) -> dict:
    return resolve(None, ["method=dml", "nets=resnet20,resnet20", "data.name=synthetic",
                          "data.image_size=8", "data.train_subset=32", "data.batch_size=16",
                          "epochs=2", "schedule.name=constant", "quiet=true", "device=cpu",
                          f"out={tmp_path / 'run'}",
                          *extra])


def test_wandb_and_mlflow_log_every_epoch_record(tmp_path, monkeypatch):
    wandb_calls, mlflow_calls = [], []
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb(wandb_calls))
    monkeypatch.setitem(sys.modules, "mlflow", fake_mlflow(mlflow_calls))
    cfg = tiny(tmp_path, "trackers=[wandb, mlflow]")
    Trainer(cfg).fit()
    history = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text()
               .splitlines()]
    numbers = [{k: float(v) for k, v in r.items() if isinstance(v, (int, float))}
               for r in history]
    assert len(history) == 2 and "test/net1/C1/top1" in numbers[1]

    assert [c[0] for c in wandb_calls] == ["init", "log", "log", "finish"]
    init = wandb_calls[0][1]
    assert init["name"] == "run" and init["project"] == "dcmkd"
    assert init["config"]["method"] == "dml" and init["config"]["epochs"] == 2
    assert [(c[1], c[2]) for c in wandb_calls[1:3]] == [(numbers[0], 1), (numbers[1], 2)]

    assert mlflow_calls[0] == ("start_run", {"run_name": "run"})
    assert [(c[1], c[2]) for c in mlflow_calls[1:3]] == [(numbers[0], 1), (numbers[1], 2)]
    assert mlflow_calls[3:] == [("end_run",)]


def test_a_tracker_not_installed_is_one_line_before_training(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)   # `import wandb` fails
    with pytest.raises(ValueError, match=r"^trackers=wandb needs the wandb package "
                                         r"\(pip install wandb\)$"):
        Trainer(tiny(tmp_path, "trackers=wandb")).fit()
    assert not (tmp_path / "run").exists()   # nothing was trained or left behind


def test_an_unknown_tracker_is_named():
    with pytest.raises(ValueError, match=r"^trackers: unknown tracker 'neptune'; choose among "
                                         r"tensorboard, wandb, mlflow$"):
        tracker_names(["wandb", "neptune"])
    assert tracker_names("mlflow, wandb", tensorboard=True) == ("mlflow", "wandb",
                                                                "tensorboard")
    assert tracker_names(["tensorboard"], tensorboard=True) == ("tensorboard",)


def test_trackers_do_not_define_the_run(tmp_path, monkeypatch):
    assert config_hash(resolve(None)) == config_hash(resolve(None, ["trackers=[wandb]"]))
    first = Trainer(tiny(tmp_path)).fit()
    calls: list = []
    monkeypatch.setitem(sys.modules, "mlflow", fake_mlflow(calls))
    again = Trainer(tiny(tmp_path, "trackers=[mlflow]")).fit()   # the finished run, returned
    assert again == first and calls == []


def test_trackers_close_when_training_stops_with_an_error():
    closed = []

    class Probe:
        def log(self, numbers, step):
            pass

        def close(self):
            closed.append(True)

    with pytest.raises(RuntimeError):
        with Trackers([Probe(), Probe()]):
            raise RuntimeError("diverged")
    assert closed == [True, True]


def test_mlflow_metric_names_keep_to_its_characters(monkeypatch):
    calls: list = []
    monkeypatch.setitem(sys.modules, "mlflow", fake_mlflow(calls))
    t = MLflow("r")
    t.log({"test/net0/face/tar@far=0.01": 12.5, "lr": 0.1}, step=3)
    assert calls[1] == ("log_metrics", {"test/net0/face/tar_far_0.01": 12.5, "lr": 0.1}, 3)
