"""``tensorboard=true`` writes every numeric metric of every epoch as a TensorBoard scalar."""
from __future__ import annotations

import json

import pytest

from dcmkd.engine.config import resolve
from dcmkd.engine.trainer import Trainer

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def test_scalars_equal_metrics_jsonl(tmp_path):
    cfg = resolve(None, ["method=dml", "nets=resnet20,resnet20", "data.name=synthetic",
                         "data.image_size=8", "data.train_subset=32", "data.batch_size=16",
                         "epochs=2", "quiet=true", "device=cpu", "tensorboard=true",
                         f"out={tmp_path / 'run'}"])
    Trainer(cfg).fit()
    history = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    acc = event_accumulator.EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"lr", "train/net0/ce", "train/net1/dml", "test/net1/C1/top1"} <= tags
    for key in ("train/net0/ce", "test/net1/C1/top1", "lr"):
        events = acc.Scalars(key)
        assert [e.step for e in events] == [1, 2]
        assert [e.value for e in events] == pytest.approx([r[key] for r in history], rel=1e-6)
