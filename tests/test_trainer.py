"""The trainer: run folders, resume equals uninterrupted, finished runs reused, NaN stop,
atomic checkpoints, recipes and schedules, CLI train/eval/export."""
from __future__ import annotations

import json

import pytest
import torch

from dcmkd.cli import main
from dcmkd.engine.config import resolve
from dcmkd.engine import trainer as trainer_mod
from dcmkd.engine.settings import TrainSettings
from dcmkd.engine.trainer import Trainer, TrainingDiverged
from dcmkd.methods.mutual import MutualMethod
from dcmkd.models import create_model
from dcmkd.registry import UnknownNameError
from dcmkd.weights import atomic_save, load_file
from test_loop import interrupted_in_epoch_2

TINY = ["data.name=synthetic", "data.image_size=8", "data.train_subset=48",
        "data.batch_size=16", "data.test_batch_size=32", "epochs=2", "quiet=true",
        "deterministic=true", "device=cpu", "schedule.name=cosine", "optim.lr=0.05"]


def lr_at(cfg, epoch):
    return TrainSettings.from_config(cfg).schedule(epoch)


def tiny(tmp_path, *extra, method="dcm", name="run"):
    return resolve(None, [f"method={method}", "nets=resnet20,resnet20", *TINY,
                          f"out={tmp_path / name}", *extra])


def test_run_folder_contents(tmp_path):
    cfg = tiny(tmp_path)
    summary = Trainer(cfg).fit()
    run = tmp_path / "run"
    for f in ("config.yaml", "data.json", "environment.json", "metrics.jsonl", "checkpoint.pt",
              "summary.json", "test_error.png", "net0_resnet20.pt", "net1_resnet20.pt"):
        assert (run / f).is_file(), f
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]
    for key in ("lr", "seconds", "images_per_s", "train/net0/ce", "train/net0/ds",
                "train/net1/dcm1", "train/net1/dcm2", "train/net0/C3/acc",
                "test/net1/C2/top1", "test/net0/C1/top5"):
        assert key in lines[0], key
    assert summary["test_top1"] == [lines[-1]["test/net0/C1/top1"],
                                    lines[-1]["test/net1/C1/top1"]]
    exported = load_file(run / "net0_resnet20.pt")
    assert set(exported) == set(create_model("resnet20", 10).state_dict())
    env = json.loads((run / "environment.json").read_text())
    assert env["torch"] == torch.__version__ and "git_commit" in env


def test_finished_run_is_not_redone(tmp_path, monkeypatch):
    cfg = tiny(tmp_path, "epochs=1")
    first = Trainer(cfg).fit()
    monkeypatch.setattr(trainer_mod, "build", lambda cfg: pytest.fail("rebuilt a finished run"))
    assert Trainer(cfg).fit() == first


def test_a_plain_dict_config_is_resolved_and_checked(tmp_path):
    """``Trainer`` takes a config of any completeness, as ``dcmkd train`` does (a plain dict
    used to fail with KeyError 'parallel')."""
    plain = {"method": "ind", "nets": ["resnet20"], "epochs": 1, "quiet": True, "device": "cpu",
             "data": {"name": "synthetic", "image_size": 8, "train_subset": 16, "batch_size": 8},
             "out": str(tmp_path / "plain")}
    summary = Trainer(plain).fit()
    assert summary["epochs"] == 1 and Trainer(plain).run_dir == tmp_path / "plain"
    with pytest.raises(UnknownNameError, match="epochs"):
        Trainer({**plain, "epochz": 1})


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("every", [0, 2])
def test_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch, every):
    """Kill mid-epoch (epoch 2, batch 2 of 3); rerunning the same command resumes from the
    last checkpoint (epoch end, or every 2 steps) and ends with identical weights."""
    ref = Trainer(tiny(tmp_path, "data.label_noise=0.25", name="ref")).fit()
    cfg = tiny(tmp_path, "data.label_noise=0.25", f"checkpoint_every_steps={every}", name="cut")
    original = MutualMethod.begin_step

    def dying(self, epoch):
        if abs(epoch - (1 + 2 / 3)) < 1e-9:   # epoch 2, batch 2 of 3
            raise Interrupt
        return original(self, epoch)

    monkeypatch.setattr(MutualMethod, "begin_step", dying)
    with pytest.raises(Interrupt):
        Trainer(cfg).fit()
    ckpt = load_file(tmp_path / "cut" / "checkpoint.pt")
    assert (ckpt["epoch"], ckpt["batch"]) == ((1, 2) if every else (1, 0))
    monkeypatch.setattr(MutualMethod, "begin_step", original)
    resumed = Trainer(cfg).fit()
    assert resumed["test_top1"] == ref["test_top1"]
    for n in range(2):
        a = load_file(tmp_path / "ref" / f"net{n}_resnet20.pt")
        b = load_file(tmp_path / "cut" / f"net{n}_resnet20.pt")
        for k in a:
            assert torch.equal(a[k], b[k]), k
    assert (tmp_path / "cut" / "noisy_labels.pt").is_file()


def test_an_interrupted_run_is_exported_only_when_asked_and_evaluated_with_a_warning(
        tmp_path, monkeypatch, capsys):
    cfg = tiny(tmp_path)
    with interrupted_in_epoch_2(monkeypatch):
        Trainer(cfg).fit()
    run = tmp_path / "run"
    capsys.readouterr()
    assert main(["export", str(run), "--to", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "is not finished (stopped after epoch 1 of 2)" in err and "--unfinished" in err
    assert not (tmp_path / "x").exists()
    assert main(["export", str(run), "--to", str(tmp_path / "x"), "--unfinished"]) == 0
    capsys.readouterr()
    exported = load_file(tmp_path / "x" / "net0_resnet20.pt")
    saved = load_file(run / "checkpoint.pt")["method"]
    for k, v in exported.items():            # the weights after epoch 1, as the run left them
        assert torch.equal(v, saved[f"networks.0.backbone.{k}"]), k
    assert main(["eval", str(run), "--json"]) == 0
    captured = capsys.readouterr()
    assert "warning: " in captured.err and "stopped after epoch 1 of 2" in captured.err
    assert "test/net0/C1/top1" in json.loads(captured.out)


@pytest.mark.parametrize("step,said", [
    (5, "epoch 2, batch 1 in net1/dcm2; the last good checkpoint is kept"),
    (1, "epoch 1, batch 0 in net1/dcm2; no checkpoint had been written yet, so the run leaves "
        "nothing")])
def test_nan_stops_the_run_naming_step_and_term(tmp_path, monkeypatch, step, said):
    cfg = tiny(tmp_path)
    forward = MutualMethod.forward
    calls = {"n": 0}

    def poisoned(self, x, y):
        out = forward(self, x, y)
        calls["n"] += 1
        if calls["n"] == step:  # 5: epoch 2, batch 1 (4 batches per epoch)
            out.losses["net1/dcm2"] = out.losses["net1/dcm2"] * float("nan")
        return out

    monkeypatch.setattr(MutualMethod, "forward", poisoned)
    with pytest.raises(TrainingDiverged, match=said):
        Trainer(cfg).fit()
    if step == 5:
        assert load_file(tmp_path / "run" / "checkpoint.pt")["epoch"] == 1
    else:
        assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    atomic_save({"a": torch.ones(2)}, path)

    def broken(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError):
        atomic_save({"a": torch.zeros(2)}, path)
    assert torch.equal(load_file(path)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]


def test_loading_refuses_code_in_a_file(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(ValueError, match="holds objects other than tensors.*will not load"):
        load_file(tmp_path / "evil.pt")


def test_wrong_config_key_names_the_closest_valid_ones():
    with pytest.raises(UnknownNameError, match=r"optim\.lrr.*did you mean optim\.lr"):
        resolve(None, ["optim.lrr=0.1"])
    with pytest.raises(UnknownNameError, match="did you mean epochs"):
        resolve(None, ["epoch=3"])


@pytest.mark.parametrize("nets,recipe,lr,wd,batch,epochs", [
    ("resnet110,resnet110", "cifar_resnet", 0.1, 1e-4, 64, 200),
    ("densenet40_12,densenet40_12", "cifar_densenet", 0.1, 1e-4, 64, 300),
    ("wrn28_10,wrn28_10", "cifar_wrn", 0.1, 5e-4, 128, 200),
    ("wrn28_10,resnet110", "cifar_wrn", 0.1, 5e-4, 128, 200),
    ("resnet50,resnet18", "imagenet_resnet", 0.1, 1e-4, 256, 100),
    ("mobilenetv2,mobilenetv2", "imagenet_mobilenetv2", 0.05, 4e-5, 256, 150),
])
def test_recipes_follow_the_supplementary(nets, recipe, lr, wd, batch, epochs):
    cfg = resolve(None, [f"nets={nets}"])
    assert cfg["recipe"] == recipe
    assert (cfg["optim"]["lr"], cfg["optim"]["weight_decay"], cfg["data"]["batch_size"],
            cfg["epochs"]) == (lr, wd, batch, epochs)
    assert cfg["optim"]["nesterov"] == (recipe == "cifar_densenet")
    assert resolve(None, [f"nets={nets}", "optim.lr=0.02"])["optim"]["lr"] == 0.02


def test_schedules():
    wrn = resolve("cifar_wrn")
    assert [round(lr_at(wrn, e), 6) for e in (0, 59.9, 60, 120, 160, 199)] == \
        [0.1, 0.1, 0.02, 0.004, 0.0008, 0.0008]
    dense = resolve("cifar_densenet")
    assert [round(lr_at(dense, e), 6) for e in (149, 150, 225)] == [0.1, 0.01, 0.001]
    res = resolve("cifar_resnet")
    assert [round(lr_at(res, e), 6) for e in (59, 60, 120, 180)] == [0.1, 0.01, 0.001, 0.0001]
    mb = resolve("imagenet_mobilenetv2")
    assert lr_at(mb, 0) == 0.05 and abs(lr_at(mb, 75) - 0.025) < 1e-9 and lr_at(mb, 150) < 1e-12


def test_cli_train_eval_export(tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["train", "-m", "dml", "-n", "resnet20,resnet20", "-d", "synthetic", "-e", "1",
            "-o", str(out), "-q", "data.image_size=8", "data.train_subset=32",
            "data.batch_size=16", "device=cpu"]
    assert main(args) == 0
    assert "dml test top-1 error" in capsys.readouterr().out
    assert main(["eval", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    summary = json.loads((out / "summary.json").read_text())
    assert result["test/net0/C1/top1"] == pytest.approx(summary["test_top1"][0])
    assert main(["export", str(out), "--to", str(tmp_path / "exp")]) == 0
    assert (tmp_path / "exp" / "net1_resnet20.pt").is_file()
    assert str(tmp_path / "exp" / "net1_resnet20.pt") in capsys.readouterr().out
    # an exported network: the data of its run folder, or flags when the file stands alone
    assert main(["eval", str(out / "net1_resnet20.pt"), "--json"]) == 0
    single = json.loads(capsys.readouterr().out)
    assert single == {"test/net1/C1/top1": pytest.approx(summary["test_top1"][1]),   # net1's
                      "test/net1/C1/top5": pytest.approx(summary["test_top5"][1])}
    assert main(["eval", str(tmp_path / "exp" / "net1_resnet20.pt"), "--json", "-d", "synthetic",
                 "data.image_size=8", "data.train_subset=32", "device=cpu"]) == 0
    assert json.loads(capsys.readouterr().out) == single
    assert main(["eval", str(tmp_path / "exp" / "nope.pt")]) == 2
    assert "no run folder or weights file" in capsys.readouterr().err
    assert main(["train", "optim.lrr=1", "-o", str(tmp_path / "x")]) == 2
    assert "optim.lr" in capsys.readouterr().err


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_and_channels_last_train_on_cpu(tmp_path, precision):
    """The training step's convolutions run in the chosen dtype on channels_last activations
    (recorded by hooks on every convolution of both networks), and the run stays finite."""
    from dcmkd.engine.build import build
    from dcmkd.engine.loop import fit

    cfg = tiny(tmp_path, f"precision={precision}", "channels_last=true", "epochs=1",
               "deterministic=false")
    built = build(cfg)
    seen: list[tuple[torch.dtype, bool]] = []

    def record(module, inputs, output):
        if module.training:
            seen.append((output.dtype, output.is_contiguous(memory_format=torch.channels_last)
                         and not output.is_contiguous()))

    convs = [m for m in built.method.modules() if isinstance(m, torch.nn.Conv2d)]
    for m in convs:
        m.register_forward_hook(record)
    summary = fit(built.method, built.data, tmp_path / "run", built.settings, config=cfg)
    want = torch.bfloat16 if precision == "bf16" else torch.float16
    assert len(seen) >= 2 * len(convs)   # every convolution, in every training step
    assert {dtype for dtype, _ in seen} == {want}
    assert all(channels_last for _, channels_last in seen)
    assert all(0 <= e <= 100 for e in summary["test_top1"])
    line = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert all(v == v for k, v in line.items() if k.startswith("train/"))  # no NaN


def test_unknown_precision_is_rejected(tmp_path):
    with pytest.raises(UnknownNameError, match="bf16, fp16, fp32"):
        Trainer(tiny(tmp_path, "precision=fp8")).fit()
