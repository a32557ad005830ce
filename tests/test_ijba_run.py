"""IJB-A inside a face run (``task.ijba``, the SSKD paper's Table 7 protocol): face boxes read
from the metadata, crops, the union of the splits' faces, and a run whose recorded metrics are
the mean and std over the splits of the templates scored on its own network's features."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from dcmkd.cli import main
from dcmkd.data.ijba import ijba_image_root, load_face, square_box
from dcmkd.metrics.face import (evaluate_ijba, ijba_sightings, mean_std, read_ijba_metadata)

HEADER = ("TEMPLATE_ID,SUBJECT_ID,FILE,MEDIA_ID,SIGHTING_ID,FRAME,FACE_X,FACE_Y,FACE_WIDTH,"
          "FACE_HEIGHT")
SUBJECTS, SHOTS, SIZE = 4, 4, 48   # 4 subjects × 4 photos of 48 px, one face box each


def _write(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def make_ijba_release(root: Path, splits: int = 2) -> Path:
    """A tiny IJB-A release: ``images/img/s<S>_<J>.png`` photos, each a subject's fixed random
    face pattern (plus noise) pasted at a known box on a grey background, and per split the
    11 and 1N protocol files: two templates per subject (photos 0-1 and 2-3; split 2 swaps the
    gallery and probe sides), every template pair compared."""
    from PIL import Image

    rng = np.random.default_rng(1)
    face = 20
    rows = {}
    for s in range(SUBJECTS):
        base = rng.integers(0, 256, (face, face, 3))
        for j in range(SHOTS):
            canvas = np.full((SIZE, SIZE, 3), 128, dtype=np.uint8)
            x, y = 4 + 6 * j, 2 + 5 * j
            canvas[y:y + face, x:x + face] = np.clip(base + rng.normal(0, 15, base.shape), 0, 255)
            name = f"img/s{s}_{j}.png"
            (root / "images" / "img").mkdir(parents=True, exist_ok=True)
            Image.fromarray(canvas).save(root / "images" / name)
            rows[(s, j)] = (name, 100 * s + j, x, y)
    for k in range(1, splits + 1):
        meta, gallery, probe = [HEADER], [HEADER], [HEADER]
        for s in range(SUBJECTS):
            for j in range(SHOTS):
                name, sid, x, y = rows[(s, j)]
                t = 10 * s + j // 2 + 1   # templates 10s+1 (photos 0, 1) and 10s+2 (2, 3)
                line = f"{t},{s},{name},{sid},{sid},,{x},{y},{face},{face}"
                meta.append(line)
                side = (j // 2 == 0) == (k == 1)
                (gallery if side else probe).append(line)
        templates = [10 * s + h for s in range(SUBJECTS) for h in (1, 2)]
        pairs = [f"{a},{b}" for i, a in enumerate(templates) for b in templates[i + 1:]]
        _write(root / "IJB-A_11_sets" / f"split{k}" / f"verify_metadata_{k}.csv", meta)
        _write(root / "IJB-A_11_sets" / f"split{k}" / f"verify_comparisons_{k}.csv", pairs)
        _write(root / "IJB-A_1N_sets" / f"split{k}" / f"search_gallery_{k}.csv", gallery)
        _write(root / "IJB-A_1N_sets" / f"split{k}" / f"search_probe_{k}.csv", probe)
    return root


def test_square_box_and_crop(tmp_path):
    from PIL import Image

    assert square_box((10, 5, 10, 10)) == (10, 5, 20, 15)
    assert square_box((10, 5, 10, 4)) == (10, 2, 20, 12)   # width wins, centred vertically
    img = np.zeros((30, 40, 3), dtype=np.uint8)
    img[5:15, 10:20] = (200, 30, 40)
    Image.fromarray(img).save(tmp_path / "a.png")
    crop = load_face(tmp_path / "a.png", (10, 5, 10, 10), 10)
    assert crop.shape == (3, 10, 10)
    assert (crop[:, :, :] == np.array([200, 30, 40])[:, None, None]).all()
    edge = load_face(tmp_path / "a.png", (-5, 0, 10, 10), 10)   # half outside: black
    assert (edge[:, :, :5] == 0).all()
    whole = load_face(tmp_path / "a.png", None, 8)   # no box: the file is the face crop
    assert whole.shape == (3, 8, 8)
    with pytest.raises(FileNotFoundError, match="IJB-A image .*missing.png does not exist"):
        load_face(tmp_path / "missing.png", None, 8)
    assert ijba_image_root(tmp_path) == tmp_path
    (tmp_path / "images").mkdir()
    assert ijba_image_root(tmp_path) == tmp_path / "images"


def test_metadata_boxes_and_union_of_splits(tmp_path):
    root = make_ijba_release(tmp_path)
    rows = read_ijba_metadata(root / "IJB-A_11_sets" / "split1" / "verify_metadata_1.csv")
    assert rows.boxes is not None and rows.boxes[5].tolist() == [10.0, 7.0, 20.0, 20.0]
    key, faces = ijba_sightings(root, (1, 2))
    assert key == "sighting" and len(faces) == SUBJECTS * SHOTS
    assert faces["301"] == ("img/s3_1.png", (10.0, 7.0, 20.0, 20.0))
    bad = root / "bad.csv"
    bad.write_text(HEADER + "\n1,0,a.png,1,1,,,,,\n")   # no box at all: the image uncropped
    assert np.isnan(read_ijba_metadata(bad).boxes).all()
    bad.write_text(HEADER + "\n1,0,a.png,1,1,,0,0,0,5\n")
    with pytest.raises(ValueError, match="line 2: expected a face box .*got 0,0,0,5"):
        read_ijba_metadata(bad)
    meta = root / "IJB-A_11_sets" / "split2" / "verify_metadata_2.csv"
    original = meta.read_text()
    for name in ("verify_metadata_1.csv", "verify_metadata_2.csv"):   # sighting 301 unboxed
        f = meta.parent.parent / f"split{name[-5]}" / name
        f.write_text(f.read_text().replace("img/s3_1.png,301,301,,10,7,20,20",
                                           "img/s3_1.png,301,301,,,,,"))
    for f in root.glob("IJB-A_1N_sets/*/*.csv"):
        f.write_text(f.read_text().replace("img/s3_1.png,301,301,,10,7,20,20",
                                           "img/s3_1.png,301,301,,,,,"))
    with pytest.warns(UserWarning, match="1 of the 16 IJB-A faces have no box"):
        assert ijba_sightings(root, (1, 2))[1]["301"] == ("img/s3_1.png", None)
    meta.write_text(original.replace("img/s3_1.png,301,301,,10,7", "img/s3_1.png,301,301,,11,7"))
    with pytest.raises(ValueError, match="SIGHTING_ID '301' is .* in one protocol file and"):
        ijba_sightings(root, (1, 2))


def _features_by_sighting(network: torch.nn.Module, root: Path, size: int) -> dict[str, np.ndarray]:
    """The expected evaluation, computed independently of the task: each sighting's crop
    normalised as the face task does, then the network's output feature."""
    from dcmkd.tasks.build import FACE_MEAN, FACE_STD
    from dcmkd.tasks.face import embed

    _, faces = ijba_sightings(root, (1, 2))
    out = {}
    network.eval()
    for name, (file, box) in faces.items():
        x = torch.tensor(load_face(root / "images" / file, box, size)).float()[None] / 255
        x = (x - torch.tensor(FACE_MEAN)[:, None, None]) / torch.tensor(FACE_STD)[:, None, None]
        with torch.no_grad():
            out[name] = embed(network, x)[0].double().numpy()
    return out


def test_face_run_scores_ijba_templates_over_splits(tmp_path, capsys):
    from tests.test_tasks import _identity_folder

    faces = _identity_folder(tmp_path / "casia", identities=4, per=4, size=16)
    ijba = make_ijba_release(tmp_path / "ijba")
    run = tmp_path / "run"
    code = main(["train", "-m", "ind", "-n", "resnet18", "-d", "faces", "--data-dir", str(faces),
                 "-e", "1", "-o", str(run), "-q", "device=cpu", "data.image_size=16",
                 "data.batch_size=8", "schedule.name=constant", "optim.lr=0.01",
                 f"task.ijba={ijba}", "task.ijba_splits=2"])
    assert code == 0, capsys.readouterr()
    import json

    summary = json.loads((run / "summary.json").read_text())
    data = json.loads((run / "data.json").read_text())
    assert data["train_identities"] == 4   # every identity trains (no test side)
    assert data["ijba"]["faces"] == 16 and data["ijba"]["splits"] == 2
    from dcmkd import load_run

    net = load_run(run, device="cpu").method.networks[0]
    feats = _features_by_sighting(net, ijba, 16)
    per_split = [evaluate_ijba(feats, ijba, k, key="sighting") for k in (1, 2)]
    expected = mean_std(per_split)
    got, std = summary["test_face"][0], summary["test_face_std"][0]
    for metric in ("rank1", "rank5"):
        assert got[metric] == pytest.approx(expected[metric][0], abs=1e-4)
        assert std[metric] == pytest.approx(expected[metric][1], abs=1e-4)
    # 8 templates: 28 pairs, 24 impostor ones: a TAR at FAR 1% is not measurable (no key)
    assert got["tar@far=0.01"] is None
    assert per_split[0] != per_split[1] or math.isclose(expected["rank1"][1], 0.0)
    # the report shows mean±(std over the splits), as the paper's Table 7
    capsys.readouterr()
    assert main(["report", str(run)]) == 0
    text = capsys.readouterr().out
    assert f"{got['rank1']:.2f}±{std['rank1']:.2f}" in text and "IJB-A's splits" in text, text


def test_ijba_bad_inputs_are_one_line(tmp_path, capsys):
    from tests.test_tasks import _identity_folder

    faces = _identity_folder(tmp_path / "casia", identities=4, per=2, size=16)
    ijba = make_ijba_release(tmp_path / "ijba", splits=1)
    common = ["train", "-m", "ind", "-n", "resnet18", "-d", "faces", "--data-dir", str(faces),
              "-e", "1", "-q", "device=cpu", "data.image_size=16", "data.batch_size=8",
              "schedule.name=constant", "task.ijba_splits=1"]
    cases = [(["task.ijba_splits=2"], "IJB-A split 2: verify_metadata_2.csv not found"),
             ([f"task.ijba={tmp_path / 'nowhere'}"], "IJB-A protocol folder .*nowhere does not"),
             (["task.ijba_splits=11"], "task.ijba_splits"),
             (["task.ijba_images=" + str(tmp_path / "noimg")], "IJB-A image folder .*noimg")]
    for k, (extra, message) in enumerate(cases):
        args = [*common, "-o", str(tmp_path / f"run{k}")]
        if not any(e.startswith("task.ijba=") for e in extra):
            args.append(f"task.ijba={ijba}")
        code = main(args + extra)
        out = capsys.readouterr()
        text = (out.out + out.err).strip()
        assert code == 2 and len(text.splitlines()) == 1, text
        import re

        assert re.search(message, text), text
    (ijba / "images" / "img" / "s2_3.png").unlink()
    code = main([*common, "-o", str(tmp_path / "runmissing"), f"task.ijba={ijba}"])
    out = capsys.readouterr()
    assert code == 2 and "s2_3.png does not exist" in out.err and \
        len(out.err.strip().splitlines()) == 1
