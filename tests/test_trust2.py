"""Issue 28 ("results you can trust, round 2"): a run folder written by ``dcmkd.fit`` works
with every reading command or is refused in one line, a summary that disagrees with the metrics
is named, a checkpoint of the wrong structure is named, 16-bit images are scaled, not clipped,
``eval`` evaluates on the data it is told, and the defaults let a short DCM run learn."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import dcmkd
from dcmkd.cli import main
from dcmkd.run_folder import RunFolder

TINY = ["-d", "synthetic", "-q", "data.image_size=8", "data.train_subset=32",
        "data.batch_size=16", "data.test_batch_size=32", "device=cpu", "schedule.name=constant",
        "optim.lr=0.05"]


def cli(capsys, *args) -> tuple[int, str]:
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out + out.err


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def _batches(n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 3, (4,), generator=g))
            for _ in range(n)]


@pytest.fixture(scope="module")
def fit_run(tmp_path_factory) -> Path:
    """A finished run written by ``dcmkd.fit`` from plain modules and lists of batches."""
    out = tmp_path_factory.mktemp("fit") / "byo"
    torch.manual_seed(0)
    method = dcmkd.create_method("dml", [Small(), Small()])
    settings = dcmkd.TrainSettings(schedule=dcmkd.Schedule("constant", lr=0.01, epochs=1),
                                   device="cpu", quiet=True)
    dcmkd.fit(method, _batches(2, 0), out, settings, test=_batches(1, 1))
    assert RunFolder(out).finished
    return out


# -- item 7 / issue 26: a dcmkd.fit folder with every command ---------------------------------
def test_report_tables_a_fit_written_run(fit_run, tmp_path, capsys):
    code, out = cli(capsys, "report", fit_run, "--out", tmp_path / "rep")
    assert code == 0, out
    table = (tmp_path / "rep" / "table.md").read_text()
    assert "dml" in table and "small + small" in table, table


@pytest.mark.parametrize("command", [["eval"], ["tsne"]])
def test_commands_that_rebuild_say_why_they_cannot(fit_run, command, capsys):
    code, out = cli(capsys, *command, fit_run)
    assert code == 2 and "Traceback" not in out and len(out.strip().splitlines()) == 1, out
    assert f"{fit_run}: dcmkd.fit trained it from your own objects" in out
    assert "net0_small.pt, net1_small.pt" in out


def test_export_of_a_fit_run_copies_its_exported_networks(fit_run, tmp_path, capsys):
    code, out = cli(capsys, "export", fit_run, "--to", tmp_path)
    assert code == 0, out
    assert out.split() == [str(tmp_path / "net0_small.pt"), str(tmp_path / "net1_small.pt")]
    assert (tmp_path / "net1_small.pt").read_bytes() and \
        torch.equal(torch.load(tmp_path / "net1_small.pt")["fc.weight"],
                    torch.load(fit_run / "net1_small.pt")["fc.weight"])


def test_load_run_of_a_fit_run_is_one_line(fit_run):
    with pytest.raises(ValueError, match="cannot rebuild .*dcmkd.fit trained it from your own"):
        dcmkd.load_run(fit_run)


# -- item 2: a summary edited by hand -----------------------------------------------------------
@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "done"
    assert main(["train", "-m", "dml", "-n", "resnet20,resnet20", *TINY, "-e", "1",
                 "-o", str(out)]) == 0
    return out


def test_an_edited_summary_is_named_by_train_and_report(finished, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(finished, copy)
    summary = json.loads((copy / "summary.json").read_text())
    real = summary["test_top1"][0]
    (copy / "summary.json").write_text(json.dumps({**summary, "test_top1": [1.5,
                                                                            *summary["test_top1"][1:]]}))
    before = (copy / "summary.json").read_bytes()
    again = ["train", "-m", "dml", "-n", "resnet20,resnet20", *TINY, "-e", "1", "-o", copy]
    for args in (again, ["report", copy, "--out", tmp_path / "rep"]):
        code, out = cli(capsys, *args)
        assert code == 2 and "Traceback" not in out and len(out.strip().splitlines()) == 1, out
        assert f"{copy / 'summary.json'} disagrees with {copy / 'metrics.jsonl'} (test_top1[0] " \
               f"1.5 in the summary, {real!r} in metrics.jsonl)" in out, out
    assert (copy / "summary.json").read_bytes() == before
    (copy / "summary.json").unlink()            # the advice works as written
    code, out = cli(capsys, *again)
    assert code == 0 and json.loads((copy / "summary.json").read_text())["test_top1"] == \
        summary["test_top1"]


# -- item 6: a checkpoint of the wrong structure ------------------------------------------------
def test_a_checkpoint_of_another_structure_is_named(finished, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(finished, copy)
    (copy / "summary.json").unlink()             # interrupted: train resumes, eval loads it
    torch.save({"epoch": 1}, copy / "checkpoint.pt")
    before = (copy / "checkpoint.pt").read_bytes()
    for args in (["train", "-m", "dml", "-n", "resnet20,resnet20", *TINY, "-e", "1", "-o", copy],
                 ["eval", copy], ["export", copy]):
        code, out = cli(capsys, *args)
        assert code == 2 and "Traceback" not in out, out
        assert f"{copy / 'checkpoint.pt'} is not a run's checkpoint: it holds only epoch, " \
               "without batch, method, optimizer, history" in out, out
    assert (copy / "checkpoint.pt").read_bytes() == before


# -- item 12: where an interrupted run stopped --------------------------------------------------
def test_an_unfinished_export_says_the_epoch_count_apart_from_the_batch(finished, tmp_path,
                                                                      capsys):
    copy = tmp_path / "copy"
    shutil.copytree(finished, copy)
    (copy / "summary.json").unlink()
    ckpt = torch.load(copy / "checkpoint.pt", weights_only=False)
    torch.save({**ckpt, "epoch": 0, "batch": 1}, copy / "checkpoint.pt")
    code, out = cli(capsys, "export", copy)
    assert code == 2 and "is not finished (stopped in epoch 1 of 1, after batch 1)" in out, out


# -- item 1: eval on the data the user names ----------------------------------------------------
def test_eval_evaluates_on_the_data_it_is_given(finished, capsys):
    code, own = cli(capsys, "eval", finished, "--json")
    assert code == 0
    code, out = cli(capsys, "eval", finished, "-d", "digits", "--json", "data.image_size=8")
    assert code == 0, out
    assert "was trained on other data than the digits data at hand" in out, out
    result = json.loads(out[:out.index("}") + 1])
    assert result != json.loads(own)                       # digits, not the run's synthetic


# -- item 3: 16-bit images ---------------------------------------------------------------------
def test_a_16_bit_png_is_scaled_to_8_bits(tmp_path):
    from PIL import Image

    from dcmkd.data.folder import decode_image

    values = np.array([[0, 257, 32896], [65535, 1000, 40000]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "a.png")   # mode I;16
    assert Image.open(tmp_path / "a.png").mode in ("I;16", "I")
    rgb = decode_image(str(tmp_path / "a.png"))
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 3, 3)
    assert rgb[..., 0].tolist() == [[0, 1, 128], [255, 4, 156]]    # round(v × 255 / 65535)
    assert (rgb[..., 0] == rgb[..., 2]).all()


# -- item 0: the default ramps the distillation weights; paper tables keep them constant ------
def test_the_config_default_ramps_and_every_reproduced_table_keeps_the_papers_weights(
        monkeypatch):
    from dcmkd.engine import config as config_module
    from dcmkd.engine.config import resolve
    from dcmkd.methods.mutual import AUTO_RAMPUP
    from dcmkd.recipes import cell_config, list_experiments, load_experiment
    from dcmkd.run_folder import config_hash

    assert resolve({"method": "dcm"})["loss"]["rampup"] == "auto" and AUTO_RAMPUP == 0.25
    new = {}
    for name in list_experiments():
        exp = load_experiment(name)
        for cell in exp.cells:
            for scale in ("full", "quick"):
                new[(name, cell.key, scale)] = config_hash(cell_config(exp, cell, 0, scale))
    old_defaults = {**config_module.DEFAULTS,
                    "loss": {**config_module.DEFAULTS["loss"], "rampup": 0.0}}
    monkeypatch.setattr(config_module, "DEFAULTS", old_defaults)   # before the ramp default
    for (name, key, scale), h in new.items():
        exp = load_experiment(name)
        assert config_hash(cell_config(exp, exp.cell(key), 0, scale)) == h, (name, key, scale)


def test_auto_ramp_is_a_quarter_of_the_schedule():
    from dcmkd.methods import Schedule, SGDSettings, create_method

    m = create_method("dcm", ["resnet20", "resnet20"], 10, rampup="auto")
    m.configure_optimization(SGDSettings(), Schedule("constant", lr=0.1, epochs=12))
    assert m.rampup_epochs == 3.0
    with pytest.warns(UserWarning, match="loss.rampup=20 epochs is longer than the run's 12 "
                                         "epochs: the distillation weights end at 0.45"):  # exp(-5·0.4²)
        create_method("dml", ["resnet20", "resnet20"], 10, rampup=20).configure_optimization(
            SGDSettings(), Schedule("constant", lr=0.1, epochs=12))


def test_a_short_default_dcm_run_learns(tmp_path, capsys):
    """``dcmkd train -m dcm`` with no loss option, 4 short epochs on 640 digits: both networks
    far below chance (90%); the same run with the paper's constant weights stays at chance
    (measured: 54%/39% against 90%/90%; ~25 s alone, minutes on a loaded machine)."""
    code, out = cli(capsys, "train", "-m", "dcm", "-n", "resnet20,resnet20", "-d", "digits",
                    "-e", "4", "-q", "-o", tmp_path / "r", "device=cpu", "data.image_size=8",
                    "data.train_subset=640", "data.batch_size=32")
    assert code == 0, out
    errors = json.loads((tmp_path / "r" / "summary.json").read_text())["test_top1"]
    assert max(errors) < 75, errors


# -- items 8, 10, 11, 12-16: messages and folders ----------------------------------------------
def test_a_teacher_is_told_by_its_content_not_its_spelling(tmp_path, monkeypatch):
    from dcmkd.run_folder import differences

    (tmp_path / "t").mkdir()
    torch.save({"w": torch.ones(2)}, tmp_path / "t" / "net0_resnet20.pt")
    monkeypatch.chdir(tmp_path)
    a = {"method": "kd", "teacher_weights": "t/net0_resnet20.pt"}
    assert differences(a, {**a, "teacher_weights": str(tmp_path / "t" / "net0_resnet20.pt")}) == []
    assert differences(a, {**a, "teacher_weights": "t"}) == []      # the run folder: network 0
    torch.save({"w": torch.zeros(2)}, tmp_path / "other.pt")
    assert differences(a, {**a, "teacher_weights": "other.pt"}) == \
        ["teacher_weights: 't/net0_resnet20.pt' → 'other.pt'"]


def test_a_finished_run_of_another_config_is_never_advised_deleted(finished, capsys):
    code, out = cli(capsys, "train", "-m", "dml", "-n", "resnet20,resnet20", *TINY, "-e", "2",
                    "-o", finished)
    assert code == 2 and "choose another -o/--out (the finished run stays there)" in out
    assert "delete" not in out


def test_summary_paths_outside_the_run_are_refused(finished, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(finished, copy)
    torch.save({}, tmp_path / "outside.pt")
    s = json.loads((copy / "summary.json").read_text())
    for bad in ("../outside.pt", str(tmp_path / "outside.pt")):
        (copy / "summary.json").write_text(json.dumps({**s, "exported": [bad, bad]}))
        code, out = cli(capsys, "tsne", copy)
        assert code == 2 and f"names the file {bad!r}, which is not a file of the run" in out


def test_a_finished_run_on_a_read_only_disk_is_returned(finished, capsys, monkeypatch):
    import errno
    import os

    real = os.open

    def read_only(path, *a, **k):
        if str(path).endswith(".lock"):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real(path, *a, **k)

    monkeypatch.setattr(os, "open", read_only)
    code, out = cli(capsys, "train", "-m", "dml", "-n", "resnet20,resnet20", *TINY, "-e", "1",
                    "-o", finished)
    assert code == 0 and f"{finished}: dml test top-1 error" in out, out


def test_the_collapse_advice_says_what_was_measured():
    from dcmkd.methods import Schedule, SGDSettings, create_method

    torch.manual_seed(0)
    m = create_method("dcm", ["resnet20", "resnet20"], 10)
    m.configure_optimization(SGDSettings(), Schedule("constant", lr=0.1, epochs=40))
    m(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))
    hint = m.advice(1, {"train/net0/ce": 2.94, "train/net1/ce": 3.21})
    assert "still 2.94–3.21, not below 95% of a uniform prediction's ln 10 = 2.30 " \
           "(measured: 128%–139% of it)" in hint
    assert "within 5%" not in hint


def test_schedule_keys_beyond_the_run_are_warned():
    from dcmkd.engine.settings import schedule_beyond_run
    from dcmkd.methods import Schedule

    assert schedule_beyond_run(Schedule("step", epochs=3, step_size=60)) == [
        "schedule.step_size=60 is not shorter than the run's 3 epochs: the rate never drops "
        "(shorten it, or use schedule.name=cosine)"]
    notes = schedule_beyond_run(Schedule("multistep", epochs=10, milestones=(0.5, 5, 12),
                                         warmup_epochs=10))
    assert notes[0].startswith("schedule.milestones 12 lie at or beyond the run's 10 epochs")
    assert notes[1].startswith("schedule.warmup_epochs=10 is not shorter than the run's 10")
    assert schedule_beyond_run(Schedule("cosine", epochs=3)) == []


@pytest.mark.parametrize("args,expected", [
    ([], "dcmkd: error: a command is required: models, describe, config, train"),
    (["train", "--nope"], "dcmkd: error: unrecognized arguments: --nope (see dcmkd --help)"),
    (["describe"], "dcmkd: error: the following arguments are required: model (see dcmkd "
                   "describe --help)"),
    (["reproduce", "missing.yaml"], "dcmkd: error: no such file: missing.yaml"),
    (["reproduce", "sub/missing"], "dcmkd: error: no such file: sub/missing"),
])
def test_usage_errors_are_one_line(args, expected, capsys):
    code, out = cli(capsys, *args)
    assert code == 2 and out.strip() == out.strip().splitlines()[0], out
    assert expected in out, out


def test_help_texts(capsys):
    from dcmkd.cli import build_parser

    p = build_parser()
    tsne = p._subparsers._group_actions[0].choices["tsne"]
    assert tsne.description.startswith("A PNG of the t-SNE embedding")
    assert "JSON" in p._subparsers._group_actions[0].choices["eval"].format_help()


def test_a_relative_data_root_is_stored_absolute(tmp_path, monkeypatch):
    from dcmkd.engine.trainer import Trainer

    monkeypatch.chdir(tmp_path)
    t = Trainer({"method": "ind", "nets": ["resnet20"], "data": {"name": "folder",
                                                                  "root": "../data/base"}})
    assert t.cfg["data"]["root"] == str(tmp_path.parent / "data" / "base")


def _fake_finished(run, top1: list[float]) -> None:
    from dcmkd.engine.config import dump

    d = run.run_dir
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.yaml").write_text(dump(run.config))
    (d / "metrics.jsonl").write_text(json.dumps({"epoch": 1, **{f"test/net{n}/C1/top1": t
                                                 for n, t in enumerate(top1)}}) + "\n")
    (d / "summary.json").write_text(json.dumps({"test_top1": top1}))


def test_report_of_an_sskd_table_puts_the_student_beside_its_baseline(tmp_path):
    from dcmkd.recipes import load_experiment, plan
    from dcmkd.report import report_runs

    exp = load_experiment("sskd-table3")
    runs = plan(exp, rows=["Student (ResNet-20)", "4 stages"], seeds=1, out=tmp_path)
    runs = [r for r in runs if r.cell.row != "Teacher (ResNet-56)"]
    for r in runs:
        _fake_finished(r, [30.0] if r.config["method"] == "ind" else [50.0, 28.0])
    md = report_runs([r.run_dir for r in runs], tmp_path / "rep")["table_md"].read_text()
    body = [line for line in md.splitlines() if line.startswith("| resnet20")]
    assert body == ["| resnet20 | resnet20 | 30.00 | 28.00 |"], md      # one row, the student
    assert "Source: ." not in md


def test_a_table_without_a_source_prints_no_empty_source():
    from dcmkd.experiment import Experiment
    from dcmkd.report.table import markdown

    exp = Experiment("mine", "Mine", "", ("Net1",), ("A",), ("r",), (), seeds=0)
    assert "Source" not in markdown(exp, [], scale="full")


@pytest.mark.parametrize("str_keys", [False, True])
def test_cifar_files_re_pickled_with_protocol_2_load(tmp_path, str_keys):
    import pickle

    from dcmkd.data.cifar import load_cifar, read_pickle

    from tests.test_data_cifar import write_cifar10

    expected = write_cifar10(tmp_path, modern=True)
    folder = tmp_path / "cifar-10-batches-py"
    for f in folder.iterdir():          # load (as torchvision does) and save again, protocol 2
        d = pickle.loads(f.read_bytes(), encoding="latin1" if str_keys else "bytes")
        f.write_bytes(pickle.dumps(d, protocol=2))
    x, y, classes = load_cifar("cifar10", tmp_path, train=True)
    assert torch.equal(x, torch.from_numpy(expected["train"][0])) and classes[0] == "airplane"
    evil = tmp_path / "evil"
    evil.write_bytes(b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x05\x00\x00\x00rot13"
                     b"\x86R}.")
    with pytest.raises(ValueError, match="refusing _codecs.encode with 'rot13'"):
        read_pickle(evil)


def test_data_json_says_how_many_training_images_the_run_used(finished):
    from dcmkd.data import build_data

    ident = build_data({"name": "digits", "train_subset": 100, "image_size": 8}).identity
    assert ident["train_images"] == 1437 and ident["train_images_used"] == 100
    assert "train_images_used" not in build_data({"name": "digits", "image_size": 8}).identity
    run = RunFolder(finished)      # compared without it: a run of before it is not other data
    data = json.loads((finished / "data.json").read_text())
    assert run.data_differences({**data, "train_images_used": 5}) == ""
    assert run.data_differences({**data, "train_images": 5}) == "train_images: 32 → 5"


def test_create_method_without_num_classes_says_the_head_it_builds():
    from dcmkd.methods import create_method

    with pytest.warns(UserWarning, match=r"create_method\('dcm', 'resnet20', …\) without "
                                         r"num_classes: the zoo networks get their default "
                                         r"head \(100 classes\)"):
        m = create_method("dcm", ["resnet20", "resnet20"])
    assert m.networks[0](torch.randn(1, 3, 32, 32))[0].shape == (1, 100)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        create_method("dcm", ["resnet20", "resnet20"], 10)


def test_export_reads_no_data(finished, tmp_path, capsys, monkeypatch):
    """A run whose data is not where its config says (a relative root from another directory)
    exports all the same: the networks come from the checkpoint, the class count from data.json."""
    import yaml

    copy = tmp_path / "copy"
    shutil.copytree(finished, copy)
    cfg = yaml.safe_load((copy / "config.yaml").read_text())
    cfg["data"].update(name="folder", root="../data/base")
    (copy / "config.yaml").write_text(yaml.safe_dump(cfg))
    ckpt = torch.load(copy / "checkpoint.pt", weights_only=False)   # which records the config
    torch.save({**ckpt, "config": json.dumps(cfg)}, copy / "checkpoint.pt")
    monkeypatch.chdir(tmp_path)
    code, out = cli(capsys, "export", copy, "--to", tmp_path / "out")
    assert code == 0, out
    a = torch.load(tmp_path / "out" / "net1_resnet20.pt")
    b = torch.load(finished / "net1_resnet20.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- audit of issue 28 (items 1, 6, 8-9, 18) ----------------------------------------------------
def _tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_eval_data_dir_evaluates_on_that_folder(tmp_path, capsys, monkeypatch):
    """A run trained on image folder A, evaluated with ``--data-dir B``: B holds A's test
    images with the two classes' labels swapped, so the top-1 error on B is exactly 100 minus
    the error on A (7 test images: never 50%), and the warning says the data differ."""
    from PIL import Image

    monkeypatch.setenv("DCMKD_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    for split, counts in (("train", {"x": 8, "y": 8}), ("test", {"x": 4, "y": 3})):
        for c, n in counts.items():
            for folder, label in (("a", c), ("b", c if split == "train" else
                                                 {"x": "y", "y": "x"}[c])):
                d = tmp_path / folder / split / label
                d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                image = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
                image.save(tmp_path / "a" / split / c / f"{i}.png")
                swapped = c if split == "train" else {"x": "y", "y": "x"}[c]
                image.save(tmp_path / "b" / split / swapped / f"{c}{i}.png")
    run = tmp_path / "run"
    code, out = cli(capsys, "train", "-m", "ind", "-n", "resnet20", "-d", "folder", "--data-dir",
                    tmp_path / "a", "-q", "-e", "1", "-o", run, "data.batch_size=4",
                    "device=cpu", "schedule.name=constant")
    assert code == 0, out
    code, out = cli(capsys, "eval", run, "--json", "-q")
    assert code == 0 and "warning" not in out, out
    own = json.loads(out)["test/net0/C1/top1"]
    code, out = cli(capsys, "eval", run, "--json", "-q", "--data-dir", tmp_path / "b")
    assert code == 0, out
    assert f"{run} was trained on other data than the folder data at hand" in out, out
    other = json.loads(out[:out.index("}") + 1])["test/net0/C1/top1"]
    assert other == pytest.approx(100 - own) and other != own


def test_eval_data_dir_that_cannot_be_read_is_one_line(finished, tmp_path, capsys):
    import os

    if os.geteuid() == 0:
        pytest.skip("root reads a folder without read permission")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o000)
    try:
        code, out = cli(capsys, "eval", finished, "-d", "folder", "--data-dir", locked)
    finally:
        locked.chmod(0o755)
    assert code == 2 and f"--data-dir {locked} cannot be read (permission denied)" in out, out


def test_a_checkpoint_of_another_run_or_network_is_named_and_kept(finished, tmp_path, capsys):
    """A real checkpoint of another run (an ``ind`` resnet20's in the folder of a ``dml``
    resnet20 pair), with the config it records and without it (then its weights are compared
    with the method's), on ``train`` (resume) and ``eval``: one line naming the file and what
    differs, exit 2, the file unchanged."""
    other = tmp_path / "ind"
    assert cli(capsys, "train", "-m", "ind", "-n", "resnet20", *TINY, "-e", "1",
               "-o", other)[0] == 0
    copy = tmp_path / "copy"
    shutil.copytree(finished, copy)
    (copy / "summary.json").unlink()             # interrupted: train resumes, eval loads it
    ckpt = torch.load(other / "checkpoint.pt", weights_only=False)
    cases = [(ckpt, "is the checkpoint of another run (its config → this run's config.yaml: "
                    "method: 'ind' → 'dml'; nets: ('resnet20',) → ('resnet20', 'resnet20'))"),
             ({**ckpt, "config": None}, "holds the weights of another network (missing keys "
              "networks.1.backbone.stem.0.weight, networks.1.backbone.stem.1.weight, "
              "networks.1.backbone.stem.1.bias, … (116 in all))")]
    for state, said in cases:
        torch.save(state, copy / "checkpoint.pt")
        before = (copy / "checkpoint.pt").read_bytes()
        for args in (["train", "-m", "dml", "-n", "resnet20,resnet20", *TINY, "-e", "1",
                      "-o", copy], ["eval", copy]):
            code, out = cli(capsys, *args)
            assert code == 2 and "Traceback" not in out, out
            assert len(out.strip().splitlines()) == 1, out
            assert f"{copy / 'checkpoint.pt'} {said}" in out, out
            assert "put the run's own checkpoint.pt back" in out
        assert (copy / "checkpoint.pt").read_bytes() == before
        assert not (copy / "summary.json").exists()


def test_a_kd_run_travels_and_its_teacher_is_told_by_content(tmp_path, capsys, monkeypatch):
    """A KD run created from ``work`` with a relative teacher path: from another directory,
    ``eval`` and ``export`` work, and the same ``train`` with the teacher spelled otherwise
    (absolute, the run folder, a copy elsewhere after the original moved) returns the finished
    run untouched; another teacher is another config."""
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(work)
    assert cli(capsys, "train", "-m", "ind", "-n", "resnet20", *TINY, "-e", "1",
               "-o", "r1")[0] == 0
    kd = ["train", "-m", "kd", "-n", "resnet20,resnet20", *TINY, "-e", "1"]
    assert cli(capsys, *kd, "-o", "kd1", "teacher_weights=r1/net0_resnet20.pt")[0] == 0
    code, out = cli(capsys, "eval", "kd1", "--json", "-q")
    assert code == 0, out
    here = json.loads(out)
    assert RunFolder(work / "kd1").read_config()["teacher_weights"] == \
        str(work / "r1" / "net0_resnet20.pt")
    before = _tree(work / "kd1")

    monkeypatch.chdir(elsewhere)        # (b) eval and export from another directory
    code, out = cli(capsys, "eval", "../work/kd1", "--json", "-q")
    assert code == 0 and json.loads(out) == here, out
    code, out = cli(capsys, "export", "../work/kd1", "--to", "exported")
    assert code == 0, out
    a = torch.load(elsewhere / "exported" / "net1_resnet20.pt")
    b = torch.load(work / "kd1" / "net1_resnet20.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    for teacher in (work / "r1" / "net0_resnet20.pt", "../work/r1"):   # (a) other spellings
        code, out = cli(capsys, *kd, "-o", "../work/kd1", f"teacher_weights={teacher}")
        assert code == 0 and "kd1: kd test top-1 error" in out, out
    shutil.copy(work / "r1" / "net0_resnet20.pt", elsewhere / "copy.pt")
    shutil.move(work / "r1", tmp_path / "moved")     # the recorded digest tells the copy
    code, out = cli(capsys, *kd, "-o", "../work/kd1", "teacher_weights=copy.pt")
    assert code == 0 and "kd1: kd test top-1 error" in out, out
    weights = torch.load(elsewhere / "copy.pt")
    weights["head.fc.bias"] = weights["head.fc.bias"] + 1
    torch.save(weights, elsewhere / "another.pt")
    code, out = cli(capsys, *kd, "-o", "../work/kd1", "teacher_weights=another.pt")
    assert code == 2 and "holds a finished run with another config (teacher_weights: " \
        f"'{work / 'r1' / 'net0_resnet20.pt'}' → '{elsewhere / 'another.pt'}')" in out, out
    assert _tree(work / "kd1") == before


def test_a_run_from_before_weights_json_compares_the_files(tmp_path, monkeypatch):
    """Without ``weights.json`` (a run folder from before it) the teacher files are read and
    compared, as before; with it, the digest it records decides."""
    from dcmkd.run_folder import differences, weights_digest

    monkeypatch.chdir(tmp_path)
    torch.save({"w": torch.ones(2)}, tmp_path / "t.pt")
    shutil.copy(tmp_path / "t.pt", tmp_path / "same.pt")     # a copy: the same bytes
    a = {"method": "kd", "teacher_weights": "gone.pt"}
    assert differences(a, {**a, "teacher_weights": "same.pt"}) == \
        ["teacher_weights: 'gone.pt' → 'same.pt'"]
    recorded = {"teacher_weights": weights_digest("t.pt")}
    assert differences(a, {**a, "teacher_weights": "same.pt"}, recorded) == []
    b = {"method": "sskd", "task": {"backbone_weights": ["t.pt", None]}}
    assert differences(b, {**b, "task": {"backbone_weights": [str(tmp_path / "same.pt"),
                                                                None]}}) == []
    assert differences(b, {**b, "task": {"backbone_weights": [None, "t.pt"]}}) != []


def test_eval_shows_its_progress_off_a_terminal(finished, capsys, monkeypatch):
    """``dcmkd eval`` on 4 test batches, each taking 31 s by the progress clock: one line per
    batch on standard error (not a terminal); none with -q."""
    import types

    import dcmkd.progress

    clock = {"t": 0.0}

    def perf_counter() -> float:
        clock["t"] += 31.0
        return clock["t"]

    monkeypatch.setattr(dcmkd.progress, "time", types.SimpleNamespace(perf_counter=perf_counter))
    code, out = cli(capsys, "eval", finished, "data.test_batch_size=8")
    assert code == 0, out
    lines = [line.split(" batch ")[0] for line in out.splitlines()
             if line.startswith("evaluating: ")]
    assert lines == [f"evaluating: {k}/4" for k in (1, 2, 3, 4)], out
    assert "\r" not in out
    code, out = cli(capsys, "eval", finished, "data.test_batch_size=8", "-q")
    assert code == 0 and "evaluating" not in out, out


def test_eval_does_not_repeat_the_runs_schedule_warnings(tmp_path, capsys):
    """A schedule note (here a warm-up as long as the run) is said when training, once; eval
    and export of the finished run build its settings again without saying it again."""
    from dcmkd.cli import main

    tiny = ["-d", "synthetic", "-q", "data.image_size=8", "data.train_subset=32",
            "data.batch_size=16", "data.test_batch_size=32", "device=cpu", "optim.lr=0.05",
            "schedule.name=cosine", "schedule.warmup_epochs=1"]
    assert main(["train", "-m", "ind", "-n", "resnet20", *tiny, "-e", "1",
                 "-o", str(tmp_path / "run")]) == 0
    assert capsys.readouterr().err.count("schedule.warmup_epochs=1 is not shorter") == 1
    assert main(["eval", str(tmp_path / "run"), "-q"]) == 0
    assert "schedule.warmup_epochs" not in capsys.readouterr().err


def test_the_explosion_advice_works_as_written(tmp_path, capsys):
    """Issue 28 item 14: the exploded-loss error's advice, followed literally. A lower optim.lr
    into the same folder is refused (that folder keeps the diverged run), into another -o it
    trains; divergence_factor=0 disables the rule (resumable: same folder), and the run then
    stops at the non-finite weights it produces instead."""
    from dcmkd.cli import main

    def train(out, *extra):
        code = main(["train", "-m", "dml", "-n", "resnet20,resnet20", "-d", "synthetic", "-q",
                     "data.image_size=8", "data.train_subset=64", "data.batch_size=16",
                     "data.test_batch_size=32", "device=cpu", "schedule.name=constant",
                     "-e", "4", "-o", str(tmp_path / out), "log_every=1", *extra])
        return code, capsys.readouterr().err.strip()

    code, err = train("a", "optim.lr=20")
    assert code == 3 and "the loss exploded" in err, err
    assert "rerun with a lower optim.lr, into another -o/--out if you gave one: this folder " \
        "keeps the diverged run; or set divergence_factor=0 to disable this rule" in err
    code, err = train("a", "optim.lr=0.05")
    assert code == 2 and "holds an interrupted run with another config (optim.lr: 20 → 0.05)" \
        in err, err
    assert train("b", "optim.lr=0.05")[0] == 0
    code, err = train("a", "optim.lr=20", "divergence_factor=0")
    assert code == 3 and "the loss exploded" not in err and "non-finite" in err, err
