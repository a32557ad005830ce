"""torch.distributed, launched by torchrun, on CPU (gloo, processes on loopback): data-parallel
and network-parallel training equal one process, the data are sharded exactly, only rank 0
writes, a dead rank ends the job and the rerun resumes to the uninterrupted weights."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dcmkd.data import DeviceLoader
from dcmkd.data.augment import cifar_train
from dcmkd.engine.config import resolve
from dcmkd.engine.trainer import Trainer
from dcmkd.run_folder import RunFolder
from dcmkd.weights import load_file

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "dist_worker.py"
TINY = ["nets=resnet20,resnet20", "data.name=synthetic", "data.image_size=8",
        "data.train_subset=48", "data.batch_size=16", "data.test_batch_size=16", "epochs=1",
        "device=cpu", "deterministic=true", "schedule.name=constant", "optim.lr=0.05"]
#: float32 sums in another order (a gradient averaged over ranks, BatchNorm statistics from
#: summed moments): weights after 3 SGD steps agree to this, losses to a tenth of it
TOL = 1e-4


def torchrun(n: int, *args: str, env: dict | None = None, timeout: float = 240,
             restarts: int = 0) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={n}", f"--max-restarts={restarts}", str(WORKER), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def single(tmp_path: Path, name: str, *args: str) -> Path:
    out = tmp_path / name
    Trainer(resolve(None, [*args, f"out={out}", "quiet=true"])).fit()
    return out


def assert_same_run(a: Path, b: Path, tol: float = TOL) -> None:
    ma, mb = RunFolder(a).read_metrics(), RunFolder(b).read_metrics()
    for ra, rb in zip(ma, mb):
        for k, v in ra.items():
            if k.startswith(("train/", "test/")) and not k.endswith("/acc"):
                assert rb[k] == pytest.approx(v, rel=tol / 10, abs=tol / 10), k
    for name in RunFolder(a).read_summary()["exported"]:
        wa, wb = load_file(a / name), load_file(b / name)
        for k in wa:
            if wa[k].is_floating_point():
                assert torch.allclose(wa[k], wb[k], rtol=tol * 10, atol=tol), (name, k)


# -- sharding (in one process) -------------------------------------------------------------
def test_ranks_together_see_the_single_process_batches_augmented_alike():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (40, 3, 8, 8), generator=g, dtype=torch.uint8)
    y = torch.arange(40)
    one = DeviceLoader(x, y, 8, train=True, seed=3, augment=cifar_train)
    for world in (2, 4):
        ranks = [DeviceLoader(x, y, 8, train=True, seed=3, augment=cifar_train, rank=r,
                              world_size=world) for r in range(world)]
        assert all(len(r) == len(one) == 5 for r in ranks)
        for epoch in (0, 3):
            single_batches = list(one.epoch(epoch))
            per_rank = [list(r.epoch(epoch)) for r in ranks]
            seen = torch.cat([yb for batches in per_rank for _, yb in batches])
            assert sorted(seen.tolist()) == list(range(40))            # each sample once
            for b, (xs, ys) in enumerate(single_batches):
                xr = torch.stack([per_rank[r][b][0] for r in range(world)], 1).flatten(0, 1)
                yr = torch.stack([per_rank[r][b][1] for r in range(world)], 1).flatten()
                assert torch.equal(yr, ys) and torch.equal(xr, xs)     # the same crops
            resumed = list(ranks[1].epoch(epoch, start_batch=3))
            assert all(torch.equal(a[0], b[0]) for a, b in zip(resumed, per_rank[1][3:]))
    with pytest.raises(ValueError, match="does not split over 3 processes"):
        DeviceLoader(x, y, 8, train=True, rank=0, world_size=3)


# -- data-parallel ---------------------------------------------------------------------------
def test_data_parallel_with_sync_bn_equals_one_process_and_only_rank_0_writes(tmp_path):
    for method, nets in (("ind", "nets=resnet20"), ("dml", TINY[0]), ("dcm", TINY[0])):
        args = [f"method={method}", *TINY[1:], nets, "sync_bn=true"]
        p = torchrun(2, "train", str(tmp_path / f"ddp-{method}"), *args)
        assert p.returncode == 0, p.stderr[-3000:]
        ref = single(tmp_path, f"one-{method}", *args)
        assert_same_run(ref, tmp_path / f"ddp-{method}")
    assert sorted(p.name for p in (tmp_path / "ddp-dcm").iterdir()) == sorted(
        p.name for p in (tmp_path / "one-dcm").iterdir())


def test_stage_wise_methods_data_parallel_equal_one_process(tmp_path):
    """SSKD (plateau decisions on every replica's feature distance; the task head
    re-initialised on rank 0's stream and given to every replica) and FitNets (its regressor's
    BatchNorm synchronised too), through the loop's own gradient averaging."""
    teacher = single(tmp_path, "teacher", "method=ind", "nets=resnet20", *TINY[1:])
    weights = f"teacher_weights={teacher / 'net0_resnet20.pt'}"
    # SSKD: 10 epochs (4 stages of 2, the head) of 3 steps, so float32 round-off of the
    # synchronised BN moments grows to ~1e-4 by the deepest stage; a replica with its own head
    # or its own plateau decisions is off by percents
    # FitNets: weights 2.0e-4 apart after its 2 epochs (measured with the float64
    # synchronised moments; 6e-7 with float32 ones, which in turn put the DCM sync_bn tests
    # over their 1e-5): float32 round-off amplified by training, as README says
    for method, tol in (("sskd", 1e-3), ("fitnets", 1e-3)):
        args = [f"method={method}", *TINY, weights, "sync_bn=true", "epochs=2"]
        p = torchrun(2, "train", str(tmp_path / f"ddp-{method}"), *args)
        assert p.returncode == 0, p.stderr[-3000:]
        assert_same_run(single(tmp_path, f"one-{method}", *args), tmp_path / f"ddp-{method}",
                        tol)


# -- network-parallel ------------------------------------------------------------------------
def assert_network_parallel_equals_one_process(tmp_path: Path, n: int, args: list[str]) -> None:
    p = torchrun(n, "train", str(tmp_path / "np"), *args, "parallel=networks")
    assert p.returncode == 0, p.stderr[-3000:]
    assert_same_run(single(tmp_path, "one", *args), tmp_path / "np")


def test_network_parallel_dcm_of_two_networks_equals_one_process(tmp_path):
    # the clipping binds (DCM's gradient norm starts near 5): its norm is both networks'
    args = ["method=dcm", *TINY, "optim.clip_grad_norm=0.5"]
    assert_network_parallel_equals_one_process(tmp_path, 2, args)


def test_network_parallel_dml_of_three_networks_gives_each_its_own_gradient(tmp_path):
    p = torchrun(3, "gradients", str(tmp_path / "g"))
    assert p.returncode == 0, p.stderr[-3000:]
    results = [json.loads((tmp_path / f"g.rank{r}.json").read_text()) for r in range(3)]
    assert [r["network"] for r in results] == [0, 1, 2]
    for r in results:
        assert r["max_abs_error"] < 1e-6 and r["peers_untouched"]
        assert r["sharded_loss"] == pytest.approx(r["loss"], rel=1e-6)


def test_both_at_once_two_networks_times_two_replicas_equal_one_process(tmp_path):
    assert_network_parallel_equals_one_process(tmp_path, 4, ["method=dcm", *TINY, "sync_bn=true"])


# -- faults ------------------------------------------------------------------------------------
def test_a_dead_rank_ends_the_job_and_the_rerun_resumes_to_the_same_weights(tmp_path):
    args = ["method=dml", *TINY, "epochs=2", "checkpoint_every_steps=1"]
    ref = tmp_path / "ref"
    assert torchrun(2, "train", str(ref), *args).returncode == 0
    kill = {"DCMKD_TEST_KILL_RANK": "1", "DCMKD_TEST_KILL_AT": "1.5"}
    t0 = time.time()
    p = torchrun(2, "train", str(tmp_path / "cut"), *args, env=kill)
    assert p.returncode != 0 and time.time() - t0 < 120
    assert load_file(tmp_path / "cut" / "checkpoint.pt")["epoch"] == 1
    p = torchrun(2, "train", str(tmp_path / "cut"), *args)          # the same command again
    assert p.returncode == 0, p.stderr[-3000:]
    assert_same_run(ref, tmp_path / "cut", tol=1e-6)
    p = torchrun(2, "train", str(tmp_path / "auto"), *args, env=kill, restarts=1)
    assert p.returncode == 0, p.stderr[-3000:]                      # torchrun restarted it
    assert_same_run(ref, tmp_path / "auto", tol=1e-6)


def test_reproduce_trains_each_run_under_torchrun(tmp_path):
    from dcmkd.recipes import load_experiment, reproduce
    from dcmkd.recipes.runner import plan

    exp = load_experiment("quick-cifar10")
    same = [{"device": "cpu", "sync_bn": True, "deterministic": True}]
    paths = reproduce(exp, scale="smoke", out=tmp_path / "r", nproc_per_run=2, overrides=same,
                      log=lambda s: None)
    reproduce(exp, scale="smoke", out=tmp_path / "one", overrides=same, log=lambda s: None)
    assert paths["table_md"].is_file()
    # every planned run is compared (issue 26: this loop once passed over zero runs)
    runs = [r.run_dir.relative_to(tmp_path / "r")
            for r in plan(exp, scale="smoke", out=tmp_path / "r", overrides=same)]
    assert len(runs) == 13
    for run in runs:
        assert (tmp_path / "r" / run / "summary.json").is_file(), run
        assert_same_run(tmp_path / "one" / run, tmp_path / "r" / run)


# -- in one process: the checks that guard a distributed run ------------------------------------
class _FakeContext:
    """A data replica 1 of 2 whose peer (replica 0) carried the checkpoint's sums."""
    rank, replica, replicas, networks, network = 1, 1, 2, 1, None

    def __init__(self, peer: dict[str, float], peer_samples: int):
        self.peer, self.peer_samples = peer, peer_samples

    def reduce_sums(self, sums, count, firsts=None):
        total = {k: v + self.peer.get(k, 0.0) for k, v in sums.items()}
        return total, count + self.peer_samples, dict(firsts or {})


def test_after_a_mid_epoch_resume_every_replica_reads_the_same_interval_loss():
    from dcmkd.engine.loop import Meter
    from dcmkd.methods.base import StepOutput

    partial = {"sums": {"train/net0/ce": 10.0}, "samples": 10, "seconds": 1.0}   # mean 1
    share = {"sums": {}, "samples": 0, "seconds": 1.0}          # replica 1 carries nothing
    meter = Meter(torch.device("cpu"), [["C1"]], 5, partial, share)
    y = torch.tensor([0, 1])
    meter.add(StepOutput({"net0/ce": torch.tensor(1.0)}, [[torch.eye(2)]]), y)
    peer = {"train/net0/ce": 10.0 + 2 * 3.0, "train/net0/C1/acc": 0.0}   # replica 0: loss 3
    means = meter.read(0, _FakeContext(peer, 10 + 2))
    assert means["train/net0/ce"] == pytest.approx(18.0 / 14)
    assert meter.interval_loss == pytest.approx((18.0 - 10.0) / 4)   # the 4 new samples only


def test_an_unsharded_training_dataloader_is_refused_under_torchrun():
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    from dcmkd.data.batches import as_batches
    from dcmkd.engine.loop import _check_shard

    ds = TensorDataset(torch.zeros(8, 3, 4, 4), torch.zeros(8, dtype=torch.long))
    ctx = _FakeContext({}, 0)
    with pytest.raises(ValueError, match="DistributedSampler"):
        _check_shard(as_batches(DataLoader(ds, batch_size=2), 0), ctx, print, True)
    _check_shard(as_batches(DataLoader(ds, batch_size=2), 0), ctx, print, False)  # test set
    wrong = DataLoader(ds, batch_size=2, sampler=DistributedSampler(ds, 2, rank=0))
    with pytest.raises(ValueError, match="rank 0 of 2 but this process is data replica 1"):
        _check_shard(as_batches(wrong, 0), ctx, print, True)
    right = DataLoader(ds, batch_size=2, sampler=DistributedSampler(ds, 2, rank=1))
    _check_shard(as_batches(right, 0), ctx, print, True)
    x, y = torch.zeros(10, 3, 4, 4, dtype=torch.uint8), torch.zeros(10, dtype=torch.long)
    with pytest.raises(ValueError, match="drop_last=False over 2 processes"):
        DeviceLoader(x, y, 4, train=True, drop_last=False, rank=0, world_size=2)


def test_devices_of_a_run_under_torchrun_index_the_inherited_gpus():
    from dcmkd.recipes.runner import visible_devices

    assert visible_devices([0, 1], None) == "0,1"
    assert visible_devices([1, 2], "4,5,6,7") == "5,6"        # a SLURM allocation
    with pytest.raises(ValueError, match="cuda:4 is not among the 4 GPU"):
        visible_devices([4], "4,5,6,7")


def test_group_batchnorm_statistics_hold_for_a_large_mean_beside_a_small_spread(monkeypatch):
    """Issue 28 item 17: the synchronised statistics are formed in float64 (as torch's CPU
    BatchNorm accumulates). Two ranks holding the same batch (the all-reduce doubles the sums)
    must give one process's BatchNorm on that batch; a channel of mean 300 and spread 0.05 left
    nothing of the variance in float32's E[x²] − mean² (its output was off by 100%)."""
    from dcmkd.engine import distributed

    class TwoEqualRanks:
        @staticmethod
        def apply(x, group):
            return 2 * x

    monkeypatch.setattr(distributed.dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(distributed, "_AllReduceSum", TwoEqualRanks)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 5, 5, generator=g) * torch.tensor([1.0, 0.05, 2.0])[:, None, None] \
        + torch.tensor([0.0, 300.0, -5.0])[:, None, None]
    x.requires_grad_(True)
    plain = torch.nn.BatchNorm2d(3)
    synced = distributed.convert_sync_batchnorm(torch.nn.BatchNorm2d(3), None, cuda=False)
    assert isinstance(synced, distributed.GroupBatchNorm2d)
    y_plain, y_synced = plain(x), synced(x)
    assert torch.allclose(y_synced, y_plain, atol=2e-3)             # float32 of 300 ± 0.05
    assert y_synced[:, 1].std().item() == pytest.approx(1.0, abs=0.01)
    # the running variance is of the doubled batch (400 values, unbiased), from 0.9 + 0.1·var
    assert torch.allclose(synced.running_mean, plain.running_mean, rtol=1e-6)
    var = x[:, 1].detach().double().var(unbiased=False).item()
    assert synced.running_var[1].item() == pytest.approx(0.9 + 0.1 * var * 400 / 399, rel=1e-3)
    grad_plain, = torch.autograd.grad(y_plain[:, 0].pow(3).sum(), x)
    grad_synced, = torch.autograd.grad(y_synced[:, 0].pow(3).sum(), x)
    assert torch.allclose(grad_synced, grad_plain, atol=1e-4)
