"""Bad input, as a demanding user or an attacker gives it: every case exits non-zero with one
line naming the key, file or value, no traceback, and no run folder changed; runs that would
return a wrong result with exit status 0 are refused or stopped."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dcmkd.cli import main
from dcmkd.models import create_model
from dcmkd.run_folder import RunFolder
from dcmkd.weights import atomic_save, load_file

TINY = ["-d", "synthetic", "-q", "data.image_size=8", "data.train_subset=32",
        "data.batch_size=16", "data.test_batch_size=32", "device=cpu", "schedule.name=constant",
        "optim.lr=0.05"]
ROOT = Path(__file__).resolve().parents[1]


def cli(capsys, *args) -> tuple[int, str]:
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:   # argparse's own usage errors
        code = e.code
    out = capsys.readouterr()
    return code, out.out + out.err


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with a hash of its content."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished one-epoch DML run that the bad commands must leave untouched."""
    out = tmp_path_factory.mktemp("runs") / "done"
    assert main(["train", "-m", "dml", "-n", "resnet20,resnet20", *TINY, "-e", "1",
                 "-o", str(out)]) == 0
    return out


def bad_files(tmp: Path, finished: Path) -> dict[str, Path]:
    tmp.mkdir(exist_ok=True)
    (tmp / "syntax.yaml").write_text("optim: {lr: 0.1\nepochs: 3\n")
    (tmp / "tag.yaml").write_text("method: !!python/object/apply:os.system ['echo pwned']\n")
    (tmp / "list.yaml").write_text("- 1\n- 2\n")
    (tmp / "a_file").write_text("not a folder")
    (tmp / "text.pt").write_text("not a weights file\n")
    (tmp / "empty.yaml").write_text("")
    (tmp / "twice.yaml").write_text("epochs: 3\noptim: {lr: 0.1}\nepochs: 5\n")
    (tmp / "images" / "train" / "cat").mkdir(parents=True)
    (tmp / "unfinished").mkdir()
    (tmp / "unfinished" / "config.yaml").write_text("method: dml\nnets: [resnet20, resnet20]\n")
    (tmp / "corrupt").mkdir()
    (tmp / "corrupt" / "config.yaml").write_text("method: dcm\nnets: [resnet20\n")
    torch.manual_seed(0)
    atomic_save(create_model("resnet20", 100).state_dict(), tmp / "net0_resnet20.pt")
    atomic_save(create_model("resnet32", 10).state_dict(), tmp / "net0_resnet32.pt")
    whole = (tmp / "net0_resnet20.pt").read_bytes()
    (tmp / "cut.pt").write_bytes(whole[:len(whole) // 2])      # an interrupted copy
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp / "pwned"),))

    (tmp / "evil.pt").write_bytes(pickle.dumps(Evil()))
    # issue 28: a checkpoint of another structure (6), a dcmkd.fit folder (7), a summary that
    # disagrees with the metrics (2), a summary naming files outside its folder (10)
    for name in ("wrongckpt", "fitrun", "edited", "crafted"):
        (tmp / name).mkdir()
        (tmp / name / "config.yaml").write_text("method: dml\nnets: [resnet20, resnet20]\n")
    torch.save({"epoch": 1}, tmp / "wrongckpt" / "checkpoint.pt")
    (tmp / "fitrun" / "config.yaml").write_text("method: {name: dml}\nnetworks: [{}, {}]\n")
    (tmp / "edited" / "metrics.jsonl").write_text('{"epoch": 1, "test/net0/C1/top1": 40.0}\n')
    (tmp / "edited" / "summary.json").write_text('{"epochs": 1, "test_top1": [4.0]}')
    (tmp / "crafted" / "summary.json").write_text('{"exported": ["../net0_resnet20.pt"]}')
    # item 6 again: the finished resnet20 pair's real checkpoint in a resnet32 pair's folder
    # (with the config it records, and without: then its weights are compared), and
    # checkpoints whose 'method' entry is empty or a list
    ckpt = load_file(finished / "checkpoint.pt")
    config = (finished / "config.yaml").read_text()
    for name, state in (("otherrun", ckpt), ("otherweights", {**ckpt, "config": None}),
                        ("emptymethod", {**ckpt, "method": {}}),
                        ("listmethod", {**ckpt, "method": [1, 2]})):
        (tmp / name).mkdir()
        (tmp / name / "config.yaml").write_text(
            config.replace("- resnet20\n- resnet20", "- resnet32\n- resnet32")
            if name.startswith("other") else config)
        torch.save(state, tmp / name / "checkpoint.pt")
    return {p.name: p for p in tmp.iterdir()}


CASES = [  # (arguments, text the one-line message must contain)
    (["train", "optim.lr=abc"], "optim.lr: expected a number, got 'abc'"),
    (["train", "-e", "0"], "epochs: expected a value ≥ 1, got 0"),
    (["train", "-e", "-1"], "epochs: expected a value ≥ 1, got -1"),
    (["train", "nets="], "nets: expected one or more model names"),
    (["train", "num_classes=abc"], "num_classes: expected an integer or null"),
    (["train", "data.label_noise=1.5"], "data.label_noise: expected a value in [0, 0.95]"),
    (["train", "epochs=true"], "epochs: expected an integer, got True"),
    (["train", "optim=0.1"], "optim: expected a mapping of keys"),
    (["train", "optim.lrr=0.1"], "did you mean optim.lr"),
    (["train", "optim.lr=[0.1"], "override 'optim.lr=[0.1'"),
    (["train", "{tmp}/syntax.yaml"], "syntax.yaml line 2"),
    (["train", "{tmp}/tag.yaml"], "Python tags are refused"),
    (["train", "{tmp}/list.yaml"], "holds a mapping of keys"),
    (["train", "{tmp}/missing.yaml"], "missing.yaml"),
    (["train", "-m", "kd", "-n", "resnet20,resnet20", *TINY], "needs teacher_weights"),
    (["train", "-m", "kd", "-n", "resnet20,resnet20", *TINY,
      "teacher_weights={tmp}/net0_resnet20.pt"], "fc.weight is [100, 64] in the file but [10, 64]"),
    (["train", "-m", "kd", "-n", "resnet20,resnet20", *TINY,
      "teacher_weights={tmp}/net0_resnet32.pt"], "weights the model does not"),
    (["train", "-m", "kd", "-n", "resnet20,resnet20", *TINY, "teacher_weights={tmp}/evil.pt"],
     "will not load"),
    (["train", "-m", "kd", "-n", "resnet20,resnet20", *TINY, "teacher_weights={tmp}/nope.pt"],
     "no weights file or run folder at"),
    (["train", "-m", "kd", "-n", "resnet20,resnet20", *TINY, "teacher_weights={tmp}/net0_resnet20.pt",
      "loss.update=alternating"], "loss.update does not apply"),
    (["train", "-m", "ind", "-n", "resnet20", *TINY, "data.batch_size=64"],
     "holds no full batch of 64"),
    (["train", "-m", "ind", "-n", "resnet20", *TINY, "-o", "{tmp}/a_file"], "is a file"),
    (["train", "-m", "ind", "-n", "resnet20", "-d", "cifar10", "--data-dir", "{tmp}/empty", "-q"],
     "data.download=true"),
    (["train", "-m", "ind", "-n", "resnet20", "-d", "cifar10", "--data-dir", "{tmp}/images",
      "-q"], "images holds an image folder (train/<class>/...), not the CIFAR-10 python"),
    (["train", "-m", "ind", "-n", "resnet20", "-d", "folder", "--data-dir", "{tmp}/nowhere",
      "-q"], "does not exist"),
    (["train", "-m", "dcm", "-n", "resnet20,nosuchnet", *TINY], "nosuchnet"),
    (["train", "-m", "dxm", *TINY], "did you mean"),
    (["train", "-m", "ind", "-n", "resnet20", *TINY, "precision=fp8"], "fp8"),
    (["train", "-m", "ind", "-n", "resnet20", *TINY, "num_classes=5"],
     "num_classes: 5 is fewer than the 10 classes of the data"),
    (["train", "-m", "ind", "-n", "resnet20", "-d", "digits", "-q", "data.train_subset=100000"],
     "data.train_subset: 100000 is more than the 1437 training images of digits"),
    (["train", "schedule.milestones=[a,b]"], "schedule.milestones: expected numbers ≥ 0 in"),
    (["train", "schedule.milestones=[5,3]"], "schedule.milestones: expected numbers ≥ 0 in"),
    (["train", "loss.beta=-1"], "loss.beta: expected a value ≥ 0, got -1"),
    (["train", "model_options=[1,2]"], "model_options: expected a mapping, or a list"),
    (["train", "-m", "dml", "-n", "wrn16_2,wrn16_2", *TINY, "model_options.dropout=abc"],
     "option 'dropout' of model 'wrn16_2': expected a number, got 'abc'"),
    (["train", "-m", "ind", "-n", "resnet20", *TINY, "model_options.foo=1"],
     "model 'resnet20' takes no options"),
    (["train", "{tmp}/empty.yaml"], "empty.yaml is empty"),
    (["train", "{tmp}/twice.yaml"],
     "twice.yaml line 3, column 1: not valid YAML (the key 'epochs' is given twice)"),
    (["train", "cifar_resnett"], "did you mean cifar_resnet"),
    (["train", "-m", "ind", "-n", "resnet20", *TINY, "--data-dir", "{tmp}"],
     "the dataset 'synthetic' is bundled and reads no folder"),
    (["train", "-m", "kd", "-n", "resnet20,resnet20", *TINY, "teacher_weights={tmp}/text.pt"],
     "text.pt is not a weights file"),
    (["train", "-m", "dml", "-n", "resnet20,resnet20", *TINY, "classifiers=C9"],
     "unknown classifier 'C9'"),
    (["train", "-m", "dml", "-n", "resnet20,resnet20", *TINY, "classifiers=C2,C3,C4"],
     "classifiers='C2,C3,C4': method 'dml' trains no auxiliary classifier (the methods with "
     "them: ds,"),
    (["train", "-m", "ind", "-n", "resnet20", *TINY, "aux_kind=apfc"],
     "kind='apfc': method 'ind' trains no auxiliary classifier"),
    (["demo", "--nets", "resnet20", "--epochs", "1", "--out", "{tmp}/demo"],
     "--nets resnet20: the demo's dml and dcm train networks together"),
    (["eval", "{tmp}/cut.pt", "--model", "resnet20", *TINY[:2]],
     "cut.pt is a damaged weights file (a cut zip archive"),
    (["eval", "{tmp}/nowhere"], "no run folder or weights file at"),
    (["eval", "{tmp}/net0_resnet32.pt"], "pass -d/--dataset"),
    (["report", "{tmp}/unfinished"], "none of the 1 run folder(s) is finished"),
    (["export", "{tmp}/unfinished"], "unfinished is not finished (not started)"),
    (["eval", "{tmp}/unfinished"], "holds no checkpoint.pt, so no weights of its method: train"),
    (["export", "{finished}", "--to", "{tmp}/a_file"], "is a file: give a folder"),
    (["tsne", "{finished}", "--classes", "50"], "--classes 50: the run's data has 10 classes"),
    (["eval", "{tmp}/corrupt"], "corrupt/config.yaml line 3"),
    (["eval", "{tmp}/evil.pt", "--model", "resnet20", *TINY[:1], "synthetic"], "will not load"),
    (["export", "{tmp}"], "is not a run folder"),
    (["reproduce", "no-such-table"], "experiment"),
    (["reproduce", "dcm-table7", "--scale", "quick", "--standins", "--dry-run"],
     "--standins is for --scale smoke only, not quick"),
    (["tsne", "{tmp}"], "is not a run folder"),
    # issue 28, one row per item (status 2, one line, the finished run unchanged)
    (["export", "{tmp}/wrongckpt"], "wrongckpt/checkpoint.pt is not a run's checkpoint: it "
     "holds only epoch, without batch, method, optimizer, history"),                       # 6
    (["eval", "{tmp}/fitrun"], "cannot evaluate {tmp}/fitrun: dcmkd.fit trained it from your "
     "own objects"),                                                                         # 7
    (["tsne", "{tmp}/fitrun"], "cannot draw the t-SNE of {tmp}/fitrun: dcmkd.fit trained"),  # 7
    (["report", "{tmp}/edited"], "edited/summary.json disagrees with {tmp}/edited/metrics.jsonl "
     "(test_top1[0] 4.0 in the summary, 40.0 in metrics.jsonl)"),                            # 2
    (["tsne", "{tmp}/crafted"], "names the file '../net0_resnet20.pt', which is not a file of "
     "the run folder"),                                                                      # 10
    (["train", "-m", "dml", "-n", "resnet20,resnet20", *TINY, "-e", "2", "-o", "{finished}"],
     "choose another -o/--out (the finished run stays there)"),                              # 8
    (["train", "loss.rampup=soon"], "loss.rampup: expected a number ≥ 0 or auto, "
     "got 'soon'"),                                                                          # 15
    ([], "dcmkd: error: a command is required: models, describe, config, train"),                   # 16
    (["train", "--nope"], "unrecognized arguments: --nope (see dcmkd --help)"),             # 16
    (["reproduce", "{tmp}/missing.yaml"], "no such file: {tmp}/missing.yaml"),              # 16
    (["eval", "{finished}", "--data-dir", "{tmp}/nowhere"],
     "--data-dir {tmp}/nowhere does not exist"),                                            # 1
    (["eval", "{finished}", "--data-dir", "{tmp}/a_file"],
     "--data-dir {tmp}/a_file is a file, not a folder"),                                    # 1
    (["eval", "{finished}", "--data-dir", "{tmp}/images"], "the dataset 'synthetic' is "
     "bundled and reads no folder; name the dataset of that folder with -d"),                # 1
    (["eval", "{tmp}/net0_resnet20.pt", "-d", "digits", "--data-dir", "{tmp}/nowhere"],
     "--data-dir {tmp}/nowhere does not exist"),                                            # 1
    (["eval", "{finished}", "-d", "nosuch"], "unknown dataset 'nosuch'"),                   # 1
    (["eval", "{tmp}/otherrun"], "otherrun/checkpoint.pt is the checkpoint of another run "
     "(its config → this run's config.yaml: nets: ('resnet20', 'resnet20') → ('resnet32', "
     "'resnet32')); put the run's own checkpoint.pt back"),                                  # 6
    (["export", "{tmp}/otherrun", "--unfinished"], "otherrun/checkpoint.pt is the checkpoint "
     "of another run"),                                                                      # 6
    (["eval", "{tmp}/otherweights"], "otherweights/checkpoint.pt holds the weights of another "
     "network (missing keys networks.0.backbone.stages.conv2_x.3.conv1.weight"),            # 6
    (["export", "{tmp}/otherweights", "--unfinished"], "otherweights/checkpoint.pt holds the "
     "weights of another network"),                                                          # 6
    (["eval", "{tmp}/emptymethod"], "emptymethod/checkpoint.pt is not a run's checkpoint: its "
     "'method' entry is empty, not the method's state_dict"),                               # 6
    (["export", "{tmp}/emptymethod", "--unfinished"], "its 'method' entry is empty"),       # 6
    (["eval", "{tmp}/listmethod"], "listmethod/checkpoint.pt is not a run's checkpoint: its "
     "'method' entry is a list, not the method's state_dict"),                              # 6
    (["eval", "{finished}", "--pairs", "{tmp}/pairs.txt", "--data-dir", "{tmp}"],
     "is a classification run (data.name=synthetic): --pairs scores the embeddings of a face "
     "run (data.name=faces)"),                                                    # issue 27
]
if not torch.cuda.is_available():
    CASES.append((["train", "-m", "ind", "-n", "resnet20", *TINY[:-3], "--device", "cuda"],
                  "CUDA is not available"))
    CASES.append((["reproduce", "quick-cifar10", "--scale", "smoke", "--out", "{tmp}/r",
                   "--devices", "cuda:0"], "device 'cuda:0': CUDA is not available"))


def test_a_damaged_summary_or_metrics_file_is_refused_naming_it(finished, tmp_path, capsys):
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(finished, copy)
    summary = json.loads((copy / "summary.json").read_text())
    (copy / "summary.json").write_text(json.dumps({**summary, "test_top1": [float("nan"), 5.0]}))
    again = ["train", "-m", "dml", "-n", "resnet20,resnet20", *TINY, "-e", "1", "-o", copy]
    for args in (again, ["report", copy, "--out", tmp_path / "rep"]):
        code, out = cli(capsys, *args)
        assert code == 2 and "Traceback" not in out, out
        assert f"{copy / 'summary.json'} is not valid JSON (it holds NaN" in out, out
    (copy / "summary.json").write_text(json.dumps(summary))
    lines = (copy / "metrics.jsonl").read_text().splitlines()
    (copy / "metrics.jsonl").write_text(lines[0][:40] + "\n")   # cut mid-record
    code, out = cli(capsys, "report", copy, "--out", tmp_path / "rep")
    assert code == 2 and f"{copy / 'metrics.jsonl'} line 1 is not valid JSON" in out, out


def test_a_negative_class_count_is_a_usage_error(capsys):
    code, out = cli(capsys, "describe", "resnet20", "--num-classes", "-3")
    assert code == 2 and "Traceback" not in out
    assert "argument --num-classes: expected an integer ≥ 1, got -3" in out
    code, out = cli(capsys, "reproduce", "dcm-table7", "-j", "0")
    assert code == 2 and "argument -j/--jobs: expected an integer ≥ 1, got 0" in out


@pytest.mark.parametrize("args,expected", CASES, ids=[" ".join(c[0])[:60] for c in CASES])
def test_bad_input_gets_one_line_and_changes_nothing(args, expected, tmp_path, capsys,
                                                     finished, monkeypatch):
    files = bad_files(tmp_path, finished)
    monkeypatch.chdir(tmp_path)        # default run folders (runs/...) land here
    before = snapshot(finished)
    code, out = cli(capsys, *[a.replace("{tmp}", str(tmp_path)).replace("{finished}",
                                                                        str(finished))
                              for a in args])
    assert code not in (0, None), out
    assert "Traceback" not in out
    assert expected.replace("{tmp}", str(tmp_path)) in out, out
    assert len([line for line in out.splitlines() if line.strip()]) == 1, out
    assert snapshot(finished) == before
    assert not (tmp_path / "pwned").exists()
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.pt"))
    assert set(p.name for p in tmp_path.iterdir()) == set(files)   # no run folder left behind


def test_a_run_among_other_files_trains_beside_them_with_a_warning(tmp_path, capsys):
    (tmp_path / "train.log").write_text("")          # `dcmkd train -o DIR > DIR/train.log`
    (tmp_path / ".DS_Store").write_text("")
    code, out = cli(capsys, "train", "-m", "ind", "-n", "resnet20", *TINY, "-e", "1",
                    "-o", tmp_path)
    assert code == 0
    assert "dcmkd: warning: " in out
    assert out.count("holds files that are not a run's (train.log)") == 1     # said once
    assert RunFolder(tmp_path).finished and (tmp_path / "train.log").read_text() == ""
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "notes.txt").write_text("someone else's folder")
    code, out = cli(capsys, "train", "-m", "ind", "-n", "resnet20", "-d", "folder",
                    "--data-dir", tmp_path / "nowhere", "-q", "-o", notes)
    assert code == 2 and "does not exist" in out
    assert [p.name for p in notes.iterdir()] == ["notes.txt"]     # a failed start: no .lock


# -- wrong results with exit status 0 ------------------------------------------------------------
def test_a_finished_run_is_never_returned_for_other_settings(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = ["train", "-m", "ind", "-n", "resnet20", *TINY, "-e", "1"]
    assert cli(capsys, *base, "optim.lr=0.1")[0] == 0
    assert cli(capsys, *base, "optim.lr=0.01")[0] == 0
    folders = sorted((tmp_path / "runs").iterdir())
    assert len(folders) == 2              # the default folder names carry the config's hash
    lrs = {RunFolder(f).read_config()["optim"]["lr"] for f in folders}
    assert lrs == {0.1, 0.01}
    out = tmp_path / "x"
    assert cli(capsys, *base, "-o", out)[0] == 0
    code, msg = cli(capsys, *base[:-2], "-e", "2", "-o", out)
    assert code == 2 and "holds a finished run with another config (epochs: 1 → 2)" in msg


def test_a_run_that_blows_up_stops_and_keeps_no_non_finite_tensor(tmp_path, capsys):
    for lr in ("1e6", "20"):
        out = tmp_path / f"lr{lr}"
        code, msg = cli(capsys, "train", "-m", "dml", "-n", "resnet20,resnet20", *TINY, "-e", "4",
                        "-o", out, f"optim.lr={lr}", "data.train_subset=64", "log_every=1")
        assert code == 3 and ("non-finite" in msg or "exploded" in msg), msg
        assert "Traceback" not in msg
        run = RunFolder(out)
        assert not run.finished and not list(out.glob("net*.pt"))
        if run.has_checkpoint:
            for k, v in load_file(out / "checkpoint.pt")["method"].items():
                if v.is_floating_point():
                    assert torch.isfinite(v).all(), k


def test_a_deleted_config_is_rebuilt_from_the_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "-m", "ind", "-n", "resnet20", *TINY, "-o", out]
    assert cli(capsys, *args, "-e", "1")[0] == 0
    (out / "summary.json").unlink()           # as if interrupted after epoch 1
    (out / "config.yaml").unlink()
    code, msg = cli(capsys, *args, "-e", "1", "optim.lr=0.5")
    assert code == 2 and "optim.lr: 0.05 → 0.5" in msg
    assert cli(capsys, *args, "-e", "1")[0] == 0
    assert RunFolder(out).read_config()["optim"]["lr"] == 0.05


def test_one_writer_per_run_folder(tmp_path, capsys):
    out = tmp_path / "run"
    with RunFolder(out).lock():       # another process would hold it the same way
        code, msg = cli(capsys, "train", "-m", "ind", "-n", "resnet20", *TINY, "-e", "1",
                        "-o", out)
    assert code == 3 and "is in use by another dcmkd process" in msg
    assert not RunFolder(out).has_checkpoint
    assert cli(capsys, "train", "-m", "ind", "-n", "resnet20", *TINY, "-e", "1", "-o", out)[0] == 0


def test_a_lock_held_by_a_killed_process_is_not_stuck(tmp_path):
    out = tmp_path / "run"
    code = ("import sys, os; from dcmkd.run_folder import RunFolder\n"
            f"with RunFolder({str(out)!r}).lock(): os.kill(os.getpid(), 9)")
    child = subprocess.run([sys.executable, "-c", code], cwd=ROOT)
    assert child.returncode == -signal.SIGKILL   # killed while it held the lock
    assert (out / RunFolder.LOCK).exists()       # which it left behind
    with RunFolder(out).lock():                  # the lock file alone does not hold the folder
        pass


@pytest.mark.parametrize("sig, status, said", [(signal.SIGINT, 130, "interrupted"),
                                               (signal.SIGTERM, 143, "terminated (SIGTERM)")])
def test_ctrl_c_or_sigterm_stops_cleanly_and_the_run_resumes(tmp_path, sig, status, said):
    """Ctrl-C, or SIGTERM (a scheduler's pre-emption, torchrun stopping its ranks), ends the
    command with one line, no traceback, and the same command resumes."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "dcmkd.cli", "train", "-m", "dml", "-n", "resnet20,resnet20",
           *TINY, "-e", "4", "-o", str(out), "data.train_subset=1024"]  # 64 steps an epoch:
    # epochs 2-4 outlast the signal even on a loaded machine. A shell's background job
    # ignores SIGINT, and Python keeps an ignored SIGINT ignored: give the child the default
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 600   # a starved machine (niced, loaded) takes minutes to start
    while not (out / "checkpoint.pt").exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.2)
    assert p.poll() is None, f"the run ended before its signal: {p.communicate()[1][-2000:]}"
    assert (out / "checkpoint.pt").exists(), "no checkpoint to interrupt within 600 s"
    p.send_signal(sig)
    stdout, stderr = p.communicate(timeout=600)
    assert p.returncode == status and "Traceback" not in stderr, stderr[-2000:]
    assert f"dcmkd: {said}; every file of the run is intact: rerun the same command to resume" \
        in stderr
    epoch = load_file(out / "checkpoint.pt")["epoch"]
    assert 1 <= epoch < 4
    if sig == signal.SIGINT:   # resuming is the same after either (the SIGTERM case saves time)
        assert main(cmd[3:]) == 0                  # the same command resumes and finishes
        assert RunFolder(out).read_summary()["epochs"] == 4


def test_a_truncated_image_is_named_and_can_be_skipped(tmp_path, capsys, monkeypatch):
    pytest.importorskip("PIL")
    from PIL import Image

    monkeypatch.setenv("DCMKD_CACHE", str(tmp_path / "cache"))
    for split in ("train", "test"):
        for c in ("a", "b"):
            d = tmp_path / "data" / split / c
            d.mkdir(parents=True)
            for i in range(8):
                Image.new("RGB", (8, 8), (40 * i, 10, 200 if c == "a" else 0)).save(d / f"{i}.png")
    bad = tmp_path / "data" / "train" / "a" / "3.png"
    bad.write_bytes(bad.read_bytes()[:20])
    args = ["train", "-m", "ind", "-n", "resnet20", "-d", "folder", "--data-dir",
            tmp_path / "data", "-q", "-e", "1", "data.batch_size=4", "device=cpu"]
    code, msg = cli(capsys, *args, "-o", tmp_path / "r1")
    assert code == 2 and f"{bad}: cannot decode this image" in msg and "skip_bad_images" in msg
    code, msg = cli(capsys, *args, "-o", tmp_path / "r2", "data.skip_bad_images=true")
    assert code == 0 and "dcmkd: warning: " in msg and "left out 1 undecodable" in msg


def test_a_link_loop_in_an_image_folder_adds_no_image_twice(tmp_path):
    pytest.importorskip("PIL")
    from PIL import Image

    from dcmkd.data.folder import scan_folder

    for c in ("airplane", "cat"):
        d = tmp_path / "train" / c
        d.mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(d / "0.png")
    (tmp_path / "train" / "cat" / "loop").symlink_to(tmp_path / "train" / "cat")
    paths, labels, _ = scan_folder(tmp_path, "train")
    assert len(paths) == 2 and labels == [0, 1]
    (tmp_path / "train" / "cat" / "planes").symlink_to(tmp_path / "train" / "airplane")
    with pytest.raises(ValueError, match="in both class 'airplane' and class 'cat'"):
        scan_folder(tmp_path, "train")


# -- files ----------------------------------------------------------------------------------------
def test_files_respect_the_umask_and_orphan_temporary_files_are_cleaned(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".checkpoint.pt.abc123.tmp").write_bytes(b"left by a killed process")
    old = os.umask(0o022)
    try:
        assert cli(capsys, "train", "-m", "ind", "-n", "resnet20", *TINY, "-e", "1",
                   "-o", out)[0] == 0
    finally:
        os.umask(old)
    for name in ("checkpoint.pt", "net0_resnet20.pt", "config.yaml", "summary.json",
                 "metrics.jsonl"):
        assert (out / name).stat().st_mode & 0o777 == 0o644, name
    assert not list(out.glob("*.tmp"))


def test_a_full_disk_says_so_and_keeps_the_previous_checkpoint(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    real_save, calls = torch.save, {"n": 0}

    def filling(obj, f, *a, **k):   # the disk is full from the second checkpoint on
        calls["n"] += 1
        if calls["n"] >= 2:
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", filling)
    code, msg = cli(capsys, "train", "-m", "ind", "-n", "resnet20", *TINY, "-e", "2", "-o", out)
    assert code == 1 and "Traceback" not in msg
    assert f"no space left on device writing {out / 'checkpoint.pt'}" in msg
    monkeypatch.setattr(torch, "save", real_save)
    assert load_file(out / "checkpoint.pt")["epoch"] == 1       # the previous one, intact
    assert not list(out.glob(".*.tmp"))


def test_progress_goes_to_a_log_as_one_line_per_interval(tmp_path):
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "dcmkd.cli", "train", "-m", "ind", "-n",
                        "resnet20", *[a for a in TINY if a != "-q"], "-e", "1", "-o", str(out),
                        "data.batch_size=4", "log_every=2"], capture_output=True, text=True,
                       cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert p.returncode == 0, p.stderr
    lines = [line for line in (p.stdout + p.stderr).splitlines() if line.startswith("epoch 1 [")]
    assert [line.split("]")[0] for line in lines] == [f"epoch 1 [{k}/8" for k in (2, 4, 6, 8)]
    assert "\r" not in p.stdout + p.stderr
