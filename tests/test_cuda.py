"""CUDA paths (skipped without a GPU; benchmarks/device_check.sh runs them on a lent one):
on-device data, the loop in bf16 + channels_last against fp32 on the CPU, compile, resume."""
from __future__ import annotations

import math

import pytest
import torch

import dcmkd
from dcmkd.data import DeviceLoader
from dcmkd.data.augment import cifar_train
from dcmkd.engine.config import resolve
from dcmkd.engine.trainer import Trainer
from dcmkd.run_folder import RunFolder

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

TINY = ["data.name=synthetic", "data.image_size=32", "data.train_subset=64",
        "data.batch_size=16", "data.test_batch_size=32", "epochs=2", "quiet=true",
        "schedule.name=cosine", "optim.lr=0.05"]


def test_device_loader_keeps_data_and_augmentation_on_the_gpu():
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    y = torch.arange(64) % 10
    loader = DeviceLoader(x, y, 16, train=True, device="cuda", augment=cifar_train)
    a = [b for b in loader.epoch(1)]
    b = [b for b in loader.epoch(1)]
    assert all(xa.is_cuda and ya.is_cuda for xa, ya in a)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(a, b))   # a pure function of the epoch


def test_dcm_on_cuda_in_bf16_channels_last_tracks_fp32_on_the_cpu(tmp_path):
    def run(*extra, name):
        cfg = resolve(None, ["method=dcm", "nets=resnet20,resnet20", *TINY, *extra,
                             f"out={tmp_path / name}"])
        Trainer(cfg).fit()
        return RunFolder(tmp_path / name).read_metrics()

    gpu = run("device=cuda", "precision=bf16", "channels_last=true", name="gpu")
    cpu = run("device=cpu", name="cpu")
    for k in ("train/net0/ce", "train/net1/dcm2"):
        assert math.isclose(gpu[0][k], cpu[0][k], rel_tol=0.1), k


def test_compile_on_cuda_gives_the_eager_losses(tmp_path):
    def run(compiled, name):
        cfg = resolve(None, ["method=dcm", "nets=resnet20,resnet20", *TINY, "device=cuda",
                             "deterministic=true", f"compile={str(compiled).lower()}",
                             f"out={tmp_path / name}"])
        Trainer(cfg).fit()
        return RunFolder(tmp_path / name).read_metrics()

    eager, compiled = run(False, "eager"), run(True, "compiled")
    for k in eager[0]:
        if k.startswith("train/") and not k.endswith("/acc"):
            assert math.isclose(eager[0][k], compiled[0][k], rel_tol=1e-3, abs_tol=1e-5), k


def test_fp16_loss_scaling_trains_and_checkpoints_its_scaler(tmp_path):
    cfg = resolve(None, ["method=dml", "nets=resnet20,resnet20", *TINY, "device=cuda",
                         "precision=fp16", f"out={tmp_path / 'r'}"])
    summary = Trainer(cfg).fit()
    assert all(math.isfinite(e) for e in summary["test_top1"])
    state = RunFolder(tmp_path / "r").load_checkpoint()["scaler"]
    assert state and state["scale"] > 0


def test_fit_moves_a_dataloader_batch_to_the_gpu(tmp_path):
    from torch.utils.data import DataLoader, TensorDataset

    x, y = torch.randn(32, 3, 16, 16), torch.arange(32) % 10
    nets = [dcmkd.wrap_model(torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, 2, 1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, 2, 1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(), torch.nn.Linear(8, 10)), sample_input=(2, 3, 16, 16))
        for _ in range(2)]
    settings = dcmkd.TrainSettings(schedule=dcmkd.Schedule("constant", lr=0.05, epochs=1),
                                   device="cuda", quiet=True)
    summary = dcmkd.fit(dcmkd.create_method("dcm", nets),
                        DataLoader(TensorDataset(x, y), batch_size=8), tmp_path / "r", settings,
                        test=DataLoader(TensorDataset(x, y), batch_size=16))
    assert summary["epochs"] == 1 and len(summary["test_top1"]) == 2
