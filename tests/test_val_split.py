"""``data.val_split``: a validation split carved from the training set, evaluated each evaluated
epoch (``val/…``), and each network's weights at its best validation epoch kept as
``best_net{n}_{model}.pt``; the test set selects nothing, paper configs are unchanged."""
from __future__ import annotations

import json

import pytest
import torch

from dcmkd.data.build import DataConfig, _carve_validation, build_data
from dcmkd.engine.config import ConfigError, resolve
from dcmkd.engine.trainer import Trainer
from dcmkd.methods import MutualMethod
from dcmkd.run_folder import config_hash
from dcmkd.weights import load_file


def test_the_carve_is_stratified_by_largest_remainder_and_disjoint():
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    # 2 of 10: class 0 gets 0.8 → 0 + the larger remainder, class 1 gets 1.2 → 1
    train, val, train_labels = _carve_validation(labels, None, DataConfig(val_split=0.2))
    assert sorted(labels[val].tolist()) == [0, 1]
    assert sorted(train.tolist() + val.tolist()) == list(range(10))
    assert train_labels.tolist() == labels[train].tolist()
    keep = torch.tensor([1, 3, 5, 7, 9, 11, 13, 15, 17, 19])   # after a train_subset
    train2, val2, _ = _carve_validation(labels, keep, DataConfig(val_split=0.2))
    assert val2.tolist() == keep[val].tolist() and train2.tolist() == keep[train].tolist()
    with pytest.raises(ValueError, match=r"data.val_split=0.5 of 1 training image\(s\) leaves "
                                         "none to train on"):
        _carve_validation(torch.tensor([3]), None, DataConfig(val_split=0.5))


def _rows(images: torch.Tensor) -> set[bytes]:
    return {bytes(x.flatten().tolist()) for x in images}


def test_the_split_is_the_same_for_every_run_seed_and_recorded_in_data_json():
    cfg = {"name": "synthetic", "image_size": 8, "train_subset": 40, "val_split": 0.2,
           "batch_size": 8}
    a, b = build_data(cfg, seed=0), build_data(cfg, seed=7)
    assert len(a.val.images) == 8 and len(a.train.images) == 32
    assert torch.equal(a.val.images, b.val.images) and torch.equal(a.val.labels, b.val.labels)
    plain = build_data({**cfg, "val_split": 0.0})
    assert plain.val is None and "val_images" not in plain.identity
    assert _rows(a.val.images) | _rows(a.train.images) == _rows(plain.train.images)
    assert not _rows(a.val.images) & _rows(a.train.images)
    assert (a.identity["val_images"], a.identity["train_images_used"]) == (8, 32)
    assert {k: v for k, v in a.identity.items() if k not in ("val_images", "train_images_used")
            } == {k: v for k, v in plain.identity.items() if k != "train_images_used"}


def test_configs_without_a_split_are_unchanged():
    from dcmkd.recipes import cell_config, list_experiments, load_experiment

    for name in list_experiments():   # every paper table, full scale: no key, same hash
        exp = load_experiment(name)
        for cell in exp.cells:
            cfg = cell_config(exp, cell, 0, "full")
            assert "val_split" not in cfg["data"], (name, cell.key)
    base = resolve("cifar_resnet")
    assert "val_split" not in base["data"]
    assert config_hash(resolve("cifar_resnet", ["data.val_split=0"])) == config_hash(base)
    assert config_hash(resolve("cifar_resnet", ["data.val_split=0.1"])) != config_hash(base)
    with pytest.raises(ConfigError, match=r"data.val_split: expected a value in \[0, 0.5\], "
                                          "got 0.6"):
        resolve(None, ["data.val_split=0.6"])
    with pytest.raises(ConfigError, match="data.val_split is for classification data; "
                                          "data.name=faces"):
        resolve(None, ["data.name=faces", "data.val_split=0.1"])


def tiny(tmp_path, *extra: str, name: str = "run", epochs: int = 3) -> dict:
    return resolve(None, ["method=dml", "nets=resnet20,resnet20", "data.name=synthetic",
                          "data.image_size=8", "data.train_subset=40", "data.batch_size=16",
                          "data.val_split=0.2", f"epochs={epochs}", "schedule.name=constant",
                          "loss.rampup=0", "quiet=true", "device=cpu",
                          f"out={tmp_path / name}", *extra])


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_best_validation_epoch_is_kept_and_summarised(tmp_path):
    summary = Trainer(tiny(tmp_path)).fit()
    run = tmp_path / "run"
    history = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    val = [[r[f"val/net{n}/C1/top1"] for r in history] for n in range(2)]
    assert all(f"test/net{n}/C1/top1" in history[-1] for n in range(2))
    best = [min(range(3), key=lambda e: (v[e], e)) + 1 for v in val]   # earliest of the best
    assert summary["best_epoch"] == best
    assert summary["best_val_top1"] == [min(v) for v in val]
    assert summary["val_top1"] == [v[-1] for v in val]
    assert summary["test_top1_at_best_epoch"] == [
        history[e - 1][f"test/net{n}/C1/top1"] for n, e in enumerate(best)]
    assert summary["test_top1"] == [history[-1][f"test/net{n}/C1/top1"] for n in range(2)]
    assert summary["best_exported"] == ["best_net0_resnet20.pt", "best_net1_resnet20.pt"]
    # the kept weights are the network's at that epoch: a run stopped there ends with them
    for n, e in enumerate(best):
        short = Trainer(tiny(tmp_path, name=f"short{e}", epochs=e)).fit() if e < 3 else None
        final = (tmp_path / f"short{e}") if short else run
        assert _equal(load_file(run / f"best_net{n}_resnet20.pt"),
                      load_file(final / f"net{n}_resnet20.pt")), (n, e)


class Interrupt(Exception):
    pass


def test_resume_selects_as_the_uninterrupted_run(tmp_path, monkeypatch):
    ref = Trainer(tiny(tmp_path, name="ref")).fit()
    assert min(ref["best_epoch"]) < 3   # else a resume that forgot the best would agree too
    original = MutualMethod.begin_step

    def dying(self, epoch):
        if epoch == 2:   # epoch 3 starts: the checkpoint of epoch 2 holds the best so far
            raise Interrupt
        return original(self, epoch)

    monkeypatch.setattr(MutualMethod, "begin_step", dying)
    with pytest.raises(Interrupt):
        Trainer(tiny(tmp_path, name="cut")).fit()
    monkeypatch.setattr(MutualMethod, "begin_step", original)
    resumed = Trainer(tiny(tmp_path, name="cut")).fit()
    keys = ("best_epoch", "best_val_top1", "val_top1", "test_top1_at_best_epoch", "test_top1")
    assert {k: resumed[k] for k in keys} == {k: ref[k] for k in keys}
    for n in range(2):
        assert _equal(load_file(tmp_path / "ref" / f"best_net{n}_resnet20.pt"),
                      load_file(tmp_path / "cut" / f"best_net{n}_resnet20.pt"))


def test_the_epoch_line_names_the_validation_metric_and_its_unit():
    """``val top-1 error net0 12.50%`` (was ``val top1 net0 12.50``: a bare number that read as
    an accuracy), in the words and unit of the test line beside it."""
    from dcmkd.engine.loop import epoch_line
    from dcmkd.methods import create_method

    from dcmkd.methods.optimization import Schedule, SGDSettings

    method = create_method("ind", ["resnet20", "resnet20"], 10)
    method.configure_optimization(SGDSettings(), Schedule("constant", lr=0.1, epochs=3))
    record = {"epoch": 2, "lr": 0.1, "seconds": 1.0, "images_per_s": 100.0,
              "val/net0/C1/top1": 12.5, "val/net1/C1/top1": 25.0,
              "test/net0/C1/top1": 30.0, "test/net1/C1/top1": 40.0}
    line = epoch_line(record, method)
    assert "val top-1 error net0 12.50% net1 25.00% (1.0s" in line, line
    assert "test top-1 error net0 30.00% net1 40.00%" in line, line
