"""``dcmkd tsne``: a stage's features of a finished run's student, embedded with scikit-learn's
t-SNE, written as a PNG (SSKD paper Fig. 4)."""
from __future__ import annotations

import json

import pytest
import torch

from dcmkd.cli import main
from dcmkd.engine.config import dump, resolve
from dcmkd.models import create_model
from dcmkd.report.tsne import stage_features, tsne_plot
from dcmkd.weights import atomic_save

pytest.importorskip("sklearn")


@pytest.fixture
def run(tmp_path):
    """A finished two-network run folder (teacher, student) on synthetic 8×8 images."""
    d = tmp_path / "run"
    cfg = resolve(None, ["method=sskd", "nets=resnet32,resnet20", "data.name=synthetic",
                         "data.image_size=8", "data.train_subset=64", "device=cpu"])
    d.mkdir()
    (d / "config.yaml").write_text(dump(cfg))
    torch.manual_seed(0)
    names = ["net0_resnet32.pt", "net1_resnet20.pt"]
    for name, model in zip(names, ("resnet32", "resnet20")):
        atomic_save(create_model(model, 10).state_dict(), d / name)
    (d / "summary.json").write_text(json.dumps({"exported": names, "test_top1": [90, 90]}))
    return d


def test_stage_features_of_the_student(run):
    d = stage_features(run, stage="stage3", classes=3, samples=4)
    assert d["model"] == "resnet20" and d["net"] == 1 and d["stage"] == "stage3 (conv3_x)"
    assert len(d["classes"]) == 3 and set(d["labels"].tolist()) <= set(d["classes"])
    assert d["features"].shape[1] == 32 * 4 * 4               # conv3_x of 8×8 input, flattened
    counts = torch.bincount(d["labels"], minlength=10)[d["classes"]]
    assert (counts <= 4).all() and counts.sum() == len(d["labels"])
    pooled = stage_features(run, stage="conv4_x", classes=3, samples=4, pool=True, net=0)
    assert pooled["features"].shape[1] == 64 and pooled["model"] == "resnet32"
    with pytest.raises(ValueError, match="stages 1..4"):
        stage_features(run, stage="stage9")


def test_tsne_writes_a_png(run, tmp_path, capsys):
    path = tsne_plot(run, classes=3, samples=5)
    assert path == run / "tsne_stage4.png" and path.read_bytes()[:4] == b"\x89PNG"
    out = tmp_path / "fig" / "t.png"
    assert main(["tsne", str(run), "--stage", "conv3_x", "--classes", "3", "--samples", "5",
                 "--out", str(out)]) == 0
    assert out.is_file() and str(out) in capsys.readouterr().out
    assert main(["tsne", str(tmp_path)]) == 2
    assert "not a run folder" in capsys.readouterr().err
