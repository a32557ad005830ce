"""The face and detection tasks data-parallel under torchrun (CPU, gloo, 2 processes): each rank
trains on its rows of every global batch, the weights equal one process's with the same global
batch, and the evaluation (whole batches per rank, gathered to rank 0, scored once) equals a
single-process evaluation of the same weights exactly, the COCO results JSON included.

This file is also the worker that torchrun starts:
    torchrun --standalone --nproc-per-node 2 tests/test_task_distributed.py OUT FACES COCO
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
#: the face run: 16 training images (2 global batches of 8, 4 rows per rank), 50 test images in
#: batches of 16 (16, 16, 16, 2: rank 0 embeds batches 0 and 2, rank 1 batches 1 and 3)
#: lr 0.005: the weights move by up to 3e-2 in the 2 steps, and the two runs agree to ~1e-6;
#: at lr 0.05 the 7e-7 of round-off after step 1 grows to 3e-3 after step 2 (a ResNet-18 on
#: 24-px images normalises its 1x1 last stage over 8 values per channel: ill-conditioned)
FACE = ["method=ind", "nets=resnet18", "data.name=faces", "data.image_size=24",
        "data.batch_size=8", "data.test_batch_size=16", "epochs=1", "device=cpu",
        "deterministic=true", "sync_bn=true", "schedule.name=constant", "optim.lr=0.005"]
#: the detection run: a RetinaNet (its losses are per-image means, so a global batch averaged
#: over the ranks is the single-process loss; Faster R-CNN's RPN and RoI losses are normalised
#: by the anchors and proposals each rank samples from its own random stream, so its
#: data-parallel run is another draw, not the single-process run step for step), 4 training
#: images (2 steps of 2), 3 test images in batches of 2 (2 on rank 0, 1 on rank 1);
#: score_thresh 0 so that the barely trained detector writes detections to compare
DETECTOR = dict(min_size=64, max_size=64, score_thresh=0.0)
#: float32 sums in another order (a gradient averaged over 2 ranks, BatchNorm statistics from
#: moments summed over the ranks in float64), 2 SGD steps: weights agree to this
#: (tests/test_distributed.py's tolerance for classification), training losses to a tenth of it
TOL = 1e-4


# -- the worker (every rank) -------------------------------------------------------------------
def _detection_settings(**extra):
    from dcmkd.engine.settings import TrainSettings
    from dcmkd.methods.optimization import Schedule, SGDSettings

    return TrainSettings(optim=SGDSettings(0.9, False, 1e-4),
                         schedule=Schedule("constant", lr=0.01, epochs=1), device="cpu",
                         quiet=True, clip_grad_norm=10.0, sync_bn=True, deterministic=True,
                         **extra)


def _detection_run(coco: Path, out: Path, rank: int = 0, world: int = 1) -> dict:
    from dcmkd.engine.loop import fit
    from dcmkd.tasks.build import detection_data, detection_method

    data = detection_data(coco, batch_size=2, test_batch_size=2, rank=rank, world_size=world)
    torch.manual_seed(0)
    method = detection_method("ind", "retinanet", ["resnet18"], data.num_classes,
                              detector_options=DETECTOR)
    return fit(method, data, out, _detection_settings())


def _worker(out: str, faces: str, coco: str) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from dist_worker import forbid_writes_off_rank_0

    import dcmkd.metrics.coco
    from dcmkd.engine import distributed
    from dcmkd.engine.config import resolve
    from dcmkd.engine.trainer import Trainer

    forbid_writes_off_rank_0()
    if int(os.environ["RANK"]):
        def refuse(*args, **kwargs):
            raise AssertionError(f"rank {os.environ['RANK']} wrote a results JSON")

        dcmkd.metrics.coco.write_results_json = refuse
    Trainer(resolve(None, [*FACE, f"data.root={faces}", f"out={out}/face",
                           "quiet=true"])).fit()
    ctx = distributed.context("data", 1, "cpu")
    _detection_run(Path(coco), Path(out) / "detection", ctx.replica, ctx.replicas)
    distributed.shutdown()


# -- in one process ----------------------------------------------------------------------------
def test_whole_batch_shards_gathered_are_one_process_batches_in_order(tmp_path):
    from dcmkd.data.loader import DeviceLoader
    from dcmkd.tasks.base import BatchShard, gather_batches

    x = torch.arange(5 * 3 * 2 * 2, dtype=torch.uint8).reshape(5, 3, 2, 2)
    one = DeviceLoader(x, torch.arange(5), 2, train=False)   # batches of 2, 2, 1
    single = [y.tolist() for _, y in one.epoch(0)]
    for world in (2, 3, 4):
        shards = [BatchShard(one, r, world) for r in range(world)]
        assert [len(s) for s in shards] == [len(range(r, 3, world)) for r in range(world)]
        parts = [[y.tolist() for _, y in s.epoch(0)] for s in shards]
        dist = SimpleNamespace(world=world, networks=1, replica=0, replicas=world,
                               gather_to_main=lambda results: parts)
        assert gather_batches(parts[0], shards[0], dist) == single == [[0, 1], [2, 3], [4]]
        rank1 = SimpleNamespace(world=world, networks=1, replica=1, replicas=world,
                                gather_to_main=lambda results: None)
        assert gather_batches(parts[1], shards[1], rank1) is None
    assert [y.tolist() for _, y in BatchShard(one, 1, 2).epoch(0, start_batch=0)] == [[2, 3]]
    dist = SimpleNamespace(world=2, networks=1, replica=0, replicas=2)
    with pytest.raises(ValueError, match=r"BatchShard\(batches, rank=0, world_size=2\)"):
        gather_batches([], one, dist)   # rows, not whole batches: the order would be lost


def test_detection_training_rows_split_every_global_batch_over_the_ranks(tmp_path):
    from dcmkd.data.synthetic_tasks import write_coco_folder
    from dcmkd.tasks.base import BatchShard
    from dcmkd.tasks.build import detection_data

    coco = write_coco_folder(tmp_path / "coco", train_images=6, val_images=3, size=64)
    one = detection_data(coco, batch_size=4, test_batch_size=2)
    ranks = [detection_data(coco, batch_size=4, test_batch_size=2, rank=r, world_size=2)
             for r in range(2)]
    ids = [[[int(t["image_id"]) for t in ts] for _, ts in d.train.epoch(1)] for d in ranks]
    single = [[int(t["image_id"]) for t in ts] for _, ts in one.train.epoch(1)]
    # 6 images, global batch 4: one step per rank, the 2 images left over dropped as in one
    # process; the ranks' rows interleave into the single-process batch
    assert len(ranks[0].train) == len(ranks[1].train) == len(one.train) == 1
    assert [[a[0], b[0], a[1], b[1]] for a, b in zip(*ids)] == single
    assert all(isinstance(d.test, BatchShard) for d in ranks) and len(ranks[1].test) == 1
    with pytest.raises(ValueError, match="does not split over 2 processes"):
        detection_data(coco, batch_size=3, rank=0, world_size=2)


def test_parallel_networks_is_refused_for_the_tasks_in_one_line():
    from dcmkd.engine.config import resolve
    from dcmkd.tasks.build import build_task

    cfg = resolve(None, ["data.name=faces", "data.root=/nonexistent"])
    ctx = SimpleNamespace(mode="networks", networks=2, world=2, replica=0, replicas=1)
    with pytest.raises(ValueError, match="the face task trains data-parallel"):
        build_task(cfg, torch.device("cpu"), ctx)


# -- under torchrun ----------------------------------------------------------------------------
def _identity_folder(root: Path, size: int = 24) -> Path:
    """4 training identities of 4 images, 10 test identities of 5; each image its identity's
    random pattern under heavy noise, so that the test metrics are not all 100%."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = ["identity_dir,split"]
    for k in range(14):
        folder = root / f"id{k:02d}"
        folder.mkdir(parents=True)
        base = rng.integers(0, 256, (size, size, 3))
        for j in range(4 if k < 4 else 5):
            noisy = base + rng.normal(0, 90, base.shape)
            Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(folder / f"{j}.png")
        rows.append(f"id{k:02d},{'train' if k < 4 else 'test'}")
    (root / "SPLIT_SUGGESTED.csv").write_text("\n".join(rows) + "\n")
    return root


def _final_test_metrics(run: Path) -> dict[str, float]:
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    return {k: v for k, v in last.items() if k.startswith("test/")}


def _assert_same_metrics(a: dict[str, float], b: dict[str, float]) -> None:
    """Equal, not close (NaN: a COCO AP over no object of that size, equal to NaN)."""
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])), (k, a[k], b[k])


def _assert_close_weights(a: Path, b: Path, name: str) -> None:
    wa, wb = torch.load(a / name, weights_only=True), torch.load(b / name, weights_only=True)
    assert wa.keys() == wb.keys()
    for k in wa:
        if wa[k].is_floating_point():
            assert torch.allclose(wa[k], wb[k], rtol=TOL * 10, atol=TOL), (name, k)
        else:
            assert torch.equal(wa[k], wb[k]), (name, k)


def _assert_close_losses(a: Path, b: Path) -> None:
    ra = json.loads((a / "metrics.jsonl").read_text().splitlines()[-1])
    rb = json.loads((b / "metrics.jsonl").read_text().splitlines()[-1])
    losses = [k for k in ra if k.startswith("train/") and not k.endswith("/acc")]
    assert losses
    for k in losses:
        assert rb[k] == pytest.approx(ra[k], rel=TOL / 10, abs=TOL / 10), k


def test_face_and_detection_train_data_parallel_like_one_process(tmp_path, one_thread):
    from dcmkd.data.synthetic_tasks import write_coco_folder
    from dcmkd.engine.build import load_run
    from dcmkd.engine.config import resolve
    from dcmkd.engine.device import Precision
    from dcmkd.engine.loop import evaluate
    from dcmkd.engine.trainer import Trainer
    from dcmkd.tasks.build import detection_data, detection_method

    faces = _identity_folder(tmp_path / "faces")
    coco = write_coco_folder(tmp_path / "coco", train_images=4, val_images=3, size=64)
    dp = tmp_path / "dp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           __file__, str(dp), str(faces), str(coco)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]

    # face: the same weights as one process (same global batch), and the data-parallel
    # evaluation of them equals one process's evaluation exactly
    one = tmp_path / "one-face"
    Trainer(resolve(None, [*FACE, f"data.root={faces}", f"out={one}", "quiet=true"])).fit()
    _assert_close_losses(one, dp / "face")
    _assert_close_weights(one, dp / "face", "net0_resnet18.pt")
    built = load_run(dp / "face")
    cpu = torch.device("cpu")
    face_metrics = evaluate(built.method, built.data.test, cpu, Precision("fp32", cpu),
                            built.settings)
    assert set(face_metrics) == {f"test/net0/face/{m}" for m in
                                 ("tar@far=0.01", "tar@far=0.001", "rank1", "rank5")}
    _assert_same_metrics(_final_test_metrics(dp / "face"), face_metrics)
    assert 0 < face_metrics["test/net0/face/rank1"] < 100   # (not a saturated comparison)

    # detection: likewise, and the COCO results JSON (written once, by rank 0) is the one a
    # single-process evaluation of the same weights writes, byte for byte
    _detection_run(coco, tmp_path / "one-det")
    _assert_close_losses(tmp_path / "one-det", dp / "detection")
    exported = "net0_retinanet_resnet18.pt"
    _assert_close_weights(tmp_path / "one-det", dp / "detection", exported)
    data = detection_data(coco, batch_size=2, test_batch_size=2)
    method = detection_method("ind", "retinanet", ["resnet18"], data.num_classes,
                              detector_options=DETECTOR)
    method.networks[0].detector.load_state_dict(
        torch.load(dp / "detection" / exported, weights_only=True))
    again = tmp_path / "again"
    det_metrics = evaluate(method, data.test, cpu, Precision("fp32", cpu),
                           _detection_settings(), out_dir=again)
    _assert_same_metrics(_final_test_metrics(dp / "detection"), det_metrics)
    written = json.loads((dp / "detection" / "detections_net0.json").read_text())
    assert len(written) > 0 and {r["image_id"] for r in written} == {1, 2, 3}
    assert (dp / "detection" / "detections_net0.json").read_bytes() == \
        (again / "detections_net0.json").read_bytes()


if __name__ == "__main__":
    torch.set_num_threads(1)
    _worker(*sys.argv[1:4])
