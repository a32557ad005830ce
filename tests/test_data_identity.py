"""A run's data.json: the same config on other data is refused (``data.root`` may move, the data
may not change), by ``dcmkd train``, ``dcmkd.fit`` with your own loaders and ``reproduce``."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from PIL import Image
from test_data_folder import make_folder
from test_loop import interrupted_in_epoch_2, loaders, wrapped_pair

import dcmkd
from dcmkd.cli import main
from dcmkd.data import build_data, dataset_identity
from dcmkd.data.identity import identity
from dcmkd.recipes import load_experiment, plan, reproduce
from dcmkd.run_folder import RunConflict, RunFolder

TRAIN = ["train", "-m", "ind", "-n", "resnet20", "-d", "folder", "-e", "1", "-q", "device=cpu",
         "data.batch_size=3", "schedule.name=constant"]


def test_identity_names_the_data_and_changes_with_it():
    a = identity("folder", ["ant", "bee"], [0, 0, 1], [0, 1], [("train/ant/0.png", 10)])
    assert {k: a[k] for k in ("dataset", "classes", "train_images", "test_images")} == \
        {"dataset": "folder", "classes": 2, "train_images": 3, "test_images": 2}
    assert a == identity("folder", ["ant", "bee"], torch.tensor([0, 0, 1]), [0, 1],
                         [("train/ant/0.png", 10)])
    for other in (identity("folder", ["ant", "bee"], [0, 1, 1], [0, 1], [("train/ant/0.png", 10)]),
                  identity("folder", ["ant", "cow"], [0, 0, 1], [0, 1], [("train/ant/0.png", 10)]),
                  identity("folder", ["ant", "bee"], [0, 0, 1], [0, 1], [("train/ant/0.png", 11)]),
                  identity("folder", ["ant", "bee"], [0, 0, 1], [0, 1], [("train/ant/1.png", 10)])):
        assert other["digest"] != a["digest"]


def test_a_folder_moved_keeps_its_identity_a_changed_file_does_not(tmp_path):
    make_folder(tmp_path / "a", n=2)
    shutil.copytree(tmp_path / "a", tmp_path / "moved")
    cfg = {"name": "folder", "cache_dir": str(tmp_path / "cache")}
    first = dataset_identity({**cfg, "root": str(tmp_path / "a")})
    assert first["train_images"] == 6 and first["test_images"] == 6 and first["classes"] == 3
    assert build_data({**cfg, "root": str(tmp_path / "a")}, "cpu").identity == first
    assert dataset_identity({**cfg, "root": str(tmp_path / "moved")}) == first
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "moved" / "train" / "ant" / "img0.png")
    assert dataset_identity({**cfg, "root": str(tmp_path / "moved")})["digest"] != \
        first["digest"]
    for name in ("synthetic", "digits"):
        assert build_data({"name": name}, "cpu").identity == dataset_identity({"name": name})


def test_a_streamed_folder_has_the_identity_of_its_scan_and_reads_no_pixel(tmp_path,
                                                                          monkeypatch):
    make_folder(tmp_path / "big", n=2, size=70)        # > 64 px: streamed like ImageNet
    cfg = {"name": "folder", "root": str(tmp_path / "big"), "workers": 0}
    built = build_data(cfg, "cpu")
    assert type(built.train).__name__ == "StreamLoader"
    from dcmkd.data import folder as folder_mod
    monkeypatch.setattr(folder_mod, "decode_image", lambda *a, **k: pytest.fail("decoded"))
    assert dataset_identity(cfg) == built.identity and built.identity["train_images"] == 6


def test_an_undecodable_file_left_out_still_counts(tmp_path):
    """With ``skip_bad_images`` the identity is the scan's, whatever this machine's decoder
    makes of the file (another Pillow may decode it)."""
    make_folder(tmp_path / "a", n=2)
    bad = tmp_path / "a" / "train" / "bee" / "img1.png"
    bad.write_bytes(bad.read_bytes()[:20])
    cfg = {"name": "folder", "root": str(tmp_path / "a"), "skip_bad_images": True,
           "cache_dir": str(tmp_path / "cache")}
    with pytest.warns(UserWarning, match="left out 1 undecodable"):
        built = build_data(cfg, "cpu")
    assert len(built.train.labels) == 5 and built.identity["train_images"] == 6
    assert built.identity == dataset_identity(cfg)


def test_train_returns_a_finished_run_on_moved_data_and_refuses_other_data(tmp_path, capsys):
    make_folder(tmp_path / "a", n=2)
    shutil.copytree(tmp_path / "a", tmp_path / "moved")
    make_folder(tmp_path / "other", classes=("ant", "bee"), n=3)
    out = ["-o", str(tmp_path / "run"), f"data.cache_dir={tmp_path / 'cache'}"]
    assert main([*TRAIN, "--data-dir", str(tmp_path / "a"), *out]) == 0
    saved = json.loads((tmp_path / "run" / "data.json").read_text())
    assert saved["train_images"] == 6 and saved["classes"] == 3
    result = capsys.readouterr().out
    mtime = (tmp_path / "run" / "summary.json").stat().st_mtime_ns
    assert main([*TRAIN, "--data-dir", str(tmp_path / "moved"), *out]) == 0
    assert capsys.readouterr().out == result                       # the same run, not redone
    assert (tmp_path / "run" / "summary.json").stat().st_mtime_ns == mtime
    assert main([*TRAIN, "--data-dir", str(tmp_path / "other"), *out]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "on other data" in err and "classes: 3 → 2" in err
    shutil.rmtree(tmp_path / "a")       # a run whose data is not there cannot be compared
    shutil.rmtree(tmp_path / "moved")
    assert main([*TRAIN, "--data-dir", str(tmp_path / "a"), *out]) == 0
    assert "not compared" in capsys.readouterr().out


def test_fit_refuses_a_finished_or_interrupted_run_on_other_batches(tmp_path, monkeypatch):
    train, test = loaders(batch=8)
    settings = dcmkd.TrainSettings(schedule=dcmkd.Schedule("constant", lr=0.05, epochs=2),
                                   device="cpu", quiet=True)
    first = dcmkd.fit(wrapped_pair(), train, tmp_path / "run", settings, test=test)
    assert dcmkd.fit(wrapped_pair(), train, tmp_path / "run", settings, test=test) == first
    other, _ = loaders(batch=16)
    with pytest.raises(RunConflict, match=r"a finished run of the same config on other data "
                                          r"\(batch_size: 8 → 16\)"):
        dcmkd.fit(wrapped_pair(), other, tmp_path / "run", settings, test=test)
    with interrupted_in_epoch_2(monkeypatch):
        dcmkd.fit(wrapped_pair(), train, tmp_path / "cut", settings, test=test)
    with pytest.raises(RunConflict, match="an interrupted run of the same config on other data"):
        dcmkd.fit(wrapped_pair(), other, tmp_path / "cut", settings, test=test)
    (tmp_path / "cut" / "data.json").unlink()   # a run from before data.json: not compared
    assert dcmkd.fit(wrapped_pair(), train, tmp_path / "cut", settings, test=test)["epochs"] == 2
    assert json.loads((tmp_path / "cut" / "data.json").read_text()) == \
        {"samples": 32, "batch_size": 8}


def test_eval_of_a_run_whose_data_changed_warns(tmp_path, capsys):
    make_folder(tmp_path / "a", n=2)
    out = ["-o", str(tmp_path / "run"), f"data.cache_dir={tmp_path / 'cache'}"]
    assert main([*TRAIN, "--data-dir", str(tmp_path / "a"), *out]) == 0
    capsys.readouterr()
    shutil.rmtree(tmp_path / "a")
    make_folder(tmp_path / "a", n=3)                 # the run's data.root, now other data
    assert main(["eval", str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    assert "dcmkd: warning:" in err and "was trained on other data" in err
    assert "train_images: 6 → 9" in err


def test_reproduce_refuses_finished_runs_of_other_data(tmp_path):
    for name, n in (("a", 2), ("b", 3)):
        make_folder(tmp_path / name, classes=tuple("abcdefghij"), n=n)
    exp = load_experiment("quick-cifar10")
    common = dict(rows=["ResNet-20 ×2"], columns=["Ind"], seeds=1, scale="quick",
                  out=tmp_path / "r", log=lambda s: None)
    same = [f"data.cache_dir={tmp_path / 'cache'}", "device=cpu", "epochs=1",
            "data.train_subset=10", "data.batch_size=5"]
    reproduce(exp, overrides=[f"data.root={tmp_path / 'a'}", *same], **common)
    for table_only in (True, False):
        with pytest.raises(RunConflict, match="on other data"):
            reproduce(exp, overrides=[f"data.root={tmp_path / 'b'}", *same],
                      table_only=table_only, **common)
    run = plan(exp, rows=["ResNet-20 ×2"], columns=["Ind"], out=tmp_path / "r", scale="quick")[0]
    assert RunFolder(run.run_dir).finished


def test_a_damaged_summary_is_an_error_naming_the_file(tmp_path):
    folder = RunFolder(tmp_path)
    (tmp_path / "summary.json").write_text('{"test_top1": [1.0')
    with pytest.raises(ValueError, match=r"summary.json is not valid JSON"):
        folder.read_summary()
