"""LFW-style pair verification: the 10-fold metric by hand (dcmkd.metrics.pairs), the pair images
(dcmkd.data.faces.pair_images) and `dcmkd eval RUN --pairs FILE --data-dir LFW` end to end,
its JSON checked against the metric computed straight from `embed`, and its bad inputs."""
from __future__ import annotations

import hashlib
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from dcmkd.cli import main
from dcmkd.data.faces import center_crop_face, decode_face, pair_images, read_pairs_file
from dcmkd.metrics.pairs import (Threshold, accuracy_at, best_threshold, evaluate_pairs,
                                 fold_accuracies, pair_scores, roc_auc)

from test_tasks import _identity_folder

# two folds of 2 genuine + 2 impostor pairs. Alone, fold 0 is cut best at 0.6 (0.7 | 0.5) and
# fold 1 at 0.4 (0.45 | 0.35). Fold 0 at fold 1's 0.4: 0.9 0.7 in, 0.5 wrongly in, 0.3 out: 3/4.
# Fold 1 at fold 0's 0.6: 0.45 0.55 wrongly out, 0.35 0.1 out: 2/4.
SCORES = np.array([0.9, 0.7, 0.5, 0.3, 0.45, 0.55, 0.35, 0.1])
SAME = np.array([True, True, False, False, True, True, False, False])
FOLDS = np.array([0, 0, 0, 0, 1, 1, 1, 1])


def test_best_threshold_is_the_midpoint_of_the_best_cut_lowest_on_ties():
    # u = 0.2 0.4 0.6 0.9; accepting >= 0.4 and >= 0.9 both decide 3 of 4 right: the lower wins
    assert best_threshold([0.9, 0.6, 0.4, 0.2], [True, False, True, False]) == \
        Threshold(pytest.approx(0.3), 0.75)
    assert best_threshold(SCORES[:4], SAME[:4]) == Threshold(pytest.approx(0.6), 1.0)
    # every score tied: accept all (-inf) and reject all (+inf) decide half right: accept all
    assert best_threshold([0.5, 0.5], [True, False]) == Threshold(-math.inf, 0.5)
    assert best_threshold([0.1, 0.2], [False, False]) == Threshold(math.inf, 1.0)
    assert accuracy_at(SCORES, SAME, 0.5) == 6 / 8   # 0.45 out, 0.5 in: the rest right
    with pytest.raises(ValueError, match="3 scores for 2 pair labels"):
        best_threshold([0.1, 0.2, 0.3], [True, False])
    with pytest.raises(ValueError, match="NaN or infinite"):
        best_threshold([0.1, np.nan], [True, False])


def test_each_fold_is_scored_at_the_threshold_of_the_other_folds():
    got = fold_accuracies(SCORES, SAME, FOLDS)
    assert [(r.fold, r.accuracy) for r in got] == [(0, 0.75), (1, 0.5)]
    assert [r.threshold for r in got] == pytest.approx([0.4, 0.6])
    with pytest.raises(ValueError, match="7 fold labels for 8 pairs"):
        fold_accuracies(SCORES, SAME, FOLDS[:7])


def test_evaluate_pairs_by_hand():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = evaluate_pairs(SCORES, SAME, FOLDS)
    assert [str(w.message).split(":")[0] for w in caught] == \
        ["TAR at FAR=0.01 is NaN", "TAR at FAR=0.001 is NaN"]
    assert out["accuracy"] == 62.5
    # 75 and 50: sample std (ddof=1) sqrt(2 * 12.5^2 / 1); standard error std / sqrt(2) = 12.5
    assert out["accuracy_std"] == pytest.approx(12.5 * math.sqrt(2))
    assert out["accuracy_se"] == pytest.approx(12.5)
    assert out["fold_accuracy"] == [75.0, 50.0] and out["folds"] == 2
    assert out["thresholds"] == pytest.approx([0.4, 0.6]) and out["optimistic"] is False
    # 4 impostor pairs: FAR 1% and 0.1% are not measured (None, never NaN)
    assert out["tar@far=0.01"] is None and out["tar@far=0.001"] is None
    # genuine 0.9 0.7 0.45 0.55 vs impostor 0.5 0.3 0.35 0.1: 15 of 16 orderings right
    assert out["auc"] == pytest.approx(100 * 15 / 16)
    assert roc_auc(SCORES, SAME) == pytest.approx(15 / 16)
    # FAR <= 1/4 admits one false accept (0.5): accepting >= 0.45 takes all four genuine (no
    # false accept at all would take three: 0.9 0.7 0.55)
    assert evaluate_pairs(SCORES, SAME, FOLDS, fars=(0.25,))["tar@far=0.25"] == 100.0


def test_one_fold_is_scored_at_its_own_best_threshold_flagged_optimistic():
    with pytest.warns(UserWarning, match="accuracy is optimistic"):
        out = evaluate_pairs(SCORES[:4], SAME[:4], [0, 0, 0, 0], fars=(0.5,))
    assert out["accuracy"] == 100.0 and out["optimistic"] is True
    assert out["accuracy_std"] is None and out["accuracy_se"] is None
    assert out["thresholds"] == pytest.approx([0.6])


def test_pair_scores_are_cosines_of_the_indexed_rows():
    f = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
    assert pair_scores(f, np.array([[0, 1], [0, 2], [2, 1]])).tolist() == \
        pytest.approx([0.0, 0.6, 0.8])
    with pytest.raises(ValueError, match="names row 3 of 3 features"):
        pair_scores(f, np.array([[0, 3]]))


def test_center_crop_keeps_the_central_fraction(tmp_path):
    from PIL import Image

    img = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3)
    Image.fromarray(img).save(tmp_path / "x.png")
    # size 2 at fraction 0.5: decoded at 4 (the file's own size: no resampling), centre 2x2
    got = center_crop_face(tmp_path / "x.png", 2, 0.5)
    assert got.tolist() == img[1:3, 1:3].transpose(2, 0, 1).tolist()
    assert center_crop_face(tmp_path / "x.png", 4).tolist() == img.transpose(2, 0, 1).tolist()
    with pytest.raises(ValueError, match=r"centre-crop fraction must lie in \(0, 1\], got 0"):
        center_crop_face(tmp_path / "x.png", 2, 0)


# -- end to end ---------------------------------------------------------------------------------
NAMES = ("Ann_Lee", "Bob", "Cy")
#: 2 folds x (2 matched + 2 mismatched); every image is used by several pairs
PAIRS = """2\t2
Ann_Lee\t1\t2
Bob\t1\t2
Ann_Lee\t1\tBob\t1
Cy\t2\tAnn_Lee\t2
Cy\t1\t2
Bob\t2\t1
Bob\t1\tCy\t1
Ann_Lee\t2\tCy\t2
"""


def _lfw_folder(root: Path) -> Path:
    """LFW's layout: root/<name>/<name>_<index:04d>.jpg, two noisy views of a pattern each."""
    from PIL import Image

    rng = np.random.default_rng(1)
    for name in NAMES:
        (root / name).mkdir(parents=True)
        base = rng.integers(0, 256, (40, 40, 3))
        for i in (1, 2):
            img = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / name / f"{name}_{i:04d}.jpg")
    return root


@pytest.fixture(scope="module")
def face_run(tmp_path_factory) -> dict[str, Path]:
    """A finished one-epoch face run (cosface head, 24-pixel crops), an LFW-layout folder and a
    2-fold pairs file."""
    tmp = tmp_path_factory.mktemp("pairs")
    run = tmp / "run"
    torch.manual_seed(0)
    assert main(["train", "-m", "ind", "-n", "resnet18", "-d", "faces", "--data-dir",
                 str(_identity_folder(tmp / "faces")), "-e", "1", "-o", str(run),
                 "data.image_size=24", "data.batch_size=8", "task.head=cosface", "device=cpu",
                 "optim.lr=0.01", "quiet=true"]) == 0
    (tmp / "pairs.txt").write_text(PAIRS)
    return {"run": run, "lfw": _lfw_folder(tmp / "lfw"), "pairs": tmp / "pairs.txt", "tmp": tmp}


def _expected(face_run: dict[str, Path], crop: float = 1.0) -> dict:
    """The metric computed straight from `embed` of the exported network on the decoded,
    normalised images, without the CLI."""
    from dcmkd.data.augment import normalize
    from dcmkd.models import create_model
    from dcmkd.tasks.build import FACE_MEAN, FACE_STD
    from dcmkd.tasks.face import embed, make_face_network

    state = torch.load(face_run["run"] / "net0_resnet18.pt", weights_only=True)
    net = make_face_network(create_model("resnet18", 4), 4, "cosface")   # 4 training identities
    net.load_state_dict(state)
    net.eval()
    pairs = read_pairs_file(face_run["pairs"])
    # in order of first use, as the CLI batches them (the same batches keep the float32
    # features bit-identical: the cosines of this barely trained network differ from 1 by 1e-3)
    files = list(dict.fromkeys(k for p in pairs for k in ((p.name1, p.index1),
                                                           (p.name2, p.index2))))
    full = round(24 / crop)
    top = (full - 24) // 2
    x = torch.stack([torch.from_numpy(decode_face(
        face_run["lfw"] / n / f"{n}_{i:04d}.jpg", full)[:, top:top + 24, top:top + 24].copy())
        for n, i in files])
    with torch.no_grad():
        f = embed(net, normalize(x, FACE_MEAN, FACE_STD)).numpy().astype(np.float64)
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    row = {k: i for i, k in enumerate(files)}
    scores = np.array([f[row[(p.name1, p.index1)]] @ f[row[(p.name2, p.index2)]] for p in pairs])
    with pytest.warns(UserWarning):
        return evaluate_pairs(scores, [p.same for p in pairs], [p.fold for p in pairs])


def _close(value):
    """``value`` to compare with: floats (and lists of them) to 1e-9 relative (the thresholds
    lie near 0.998: another image size, crop or normalisation moves them by more), the rest
    exactly."""
    return pytest.approx(value, rel=1e-9, abs=1e-12) if isinstance(value, (float, list)) \
        else value


def test_eval_pairs_of_a_face_run_writes_the_metric_of_its_embeddings(face_run, capsys):
    run, lfw, pairs = face_run["run"], face_run["lfw"], face_run["pairs"]
    capsys.readouterr()
    assert main(["eval", str(run), "--pairs", str(pairs), "--data-dir", str(lfw)]) == 0
    printed = capsys.readouterr().out.splitlines()
    written = json.loads((run / "pairs_pairs.json").read_text())
    assert written["pairs"] == 8 and written["images"] == 6 and written["image_size"] == 24
    assert written["pairs_file"] == str(pairs.resolve()) and written["center_crop"] == 1.0
    [net] = written["networks"]
    assert (net["network"], net["model"], net["file"]) == (0, "resnet18", "net0_resnet18.pt")
    want = _expected(face_run)
    assert set(net) == {"network", "model", "file", *want}
    for k, v in want.items():
        assert net[k] == _close(v), k
    assert net["folds"] == 2 and net["optimistic"] is False
    row = next(line for line in printed if line.startswith("net0 resnet18"))
    assert f"{net['accuracy']:.2f} ± {net['accuracy_std']:.2f}" in row and "n/a" in row
    assert "mean ± std over 2 folds, ddof=1" in printed[0]
    assert not list(run.glob(".*tmp*"))   # written atomically: no temporary file left


def test_eval_pairs_of_an_exported_file_with_a_centre_crop_prints_json(face_run, capsys):
    run, lfw, pairs = face_run["run"], face_run["lfw"], face_run["pairs"]
    before = {p.name for p in run.iterdir()}
    capsys.readouterr()
    assert main(["eval", str(run / "net0_resnet18.pt"), "--pairs", str(pairs), "--data-dir",
                 str(lfw), "--center-crop", "0.5", "--json", "-q"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["center_crop"] == 0.5
    want = _expected(face_run, crop=0.5)
    for k, v in want.items():
        assert got["networks"][0][k] == _close(v), k
    assert {p.name for p in run.iterdir()} == before   # a file's result is printed only


def test_pair_images_decodes_each_image_once(face_run):
    pairs = read_pairs_file(face_run["pairs"])
    loaded = pair_images(face_run["lfw"], pairs, 24)
    assert loaded.images.shape == (6, 3, 24, 24) and loaded.images.dtype == torch.uint8
    assert loaded.index.tolist()[:3] == [[0, 1], [2, 3], [0, 2]]   # order of first use
    assert [p.name for p in loaded.paths[:2]] == ["Ann_Lee_0001.jpg", "Ann_Lee_0002.jpg"]
    assert torch.equal(loaded.images[0], torch.from_numpy(decode_face(loaded.paths[0], 24).copy()))


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


BAD = [  # (arguments after `eval`, text of the one-line message)
    (["{run}", "--pairs", "{tmp}/nope.txt", "--data-dir", "{lfw}"],
     "pairs file {tmp}/nope.txt does not exist"),
    (["{run}", "--pairs", "{tmp}/bad.txt", "--data-dir", "{lfw}"],
     "bad.txt line 3: expected a mismatched 'name1 idx1 name2 idx2' pair"),
    (["{run}", "--pairs", "{tmp}/gone.txt", "--data-dir", "{lfw}"],
     "pair 1 (Ann_Lee 1 / Ann_Lee 3): image {lfw}/Ann_Lee/Ann_Lee_0003.jpg does not exist"),
    (["{run}", "--pairs", "{pairs}"], "--pairs needs --data-dir"),
    (["{run}", "--pairs", "{pairs}", "--data-dir", "{tmp}/nowhere"],
     "--data-dir {tmp}/nowhere does not exist"),
    (["{run}", "--pairs", "{pairs}", "--data-dir", "{lfw}", "-d", "faces"],
     "-d/--dataset faces does not apply with --pairs"),
    (["{run}", "--pairs", "{pairs}", "--data-dir", "{lfw}", "--center-crop", "1.5"],
     "centre-crop fraction must lie in (0, 1], got 1.5"),
    (["{run}", "--center-crop", "0.5"], "--center-crop applies to the images of --pairs only"),
    (["{tmp}/cls", "--pairs", "{pairs}", "--data-dir", "{lfw}"],
     "{tmp}/cls is a classification run (data.name=digits): --pairs scores the embeddings "
     "of a face run"),
    (["{tmp}/new", "--pairs", "{pairs}", "--data-dir", "{lfw}"],
     "new is not finished (not started): --pairs scores the networks a run exports when it "
     "finishes; dcmkd export {tmp}/new --unfinished"),
    (["{tmp}/plain/net0_resnet20.pt", "--pairs", "{pairs}", "--data-dir", "{lfw}"],
     "net0_resnet20.pt is not a resnet20 face network with a softmax head (lacks 2 weights"),
    (["{tmp}/plain/net0_resnet32.pt", "--pairs", "{pairs}", "--data-dir", "{lfw}"],
     "net0_resnet32.pt holds no face network"),
]


@pytest.mark.parametrize("args,expected", BAD, ids=[" ".join(b[0][2:])[:50] for b in BAD])
def test_bad_pairs_input_is_one_line_exit_2_and_writes_nothing(face_run, args, expected,
                                                               tmp_path, capsys):
    from dcmkd.models import create_model

    (tmp_path / "bad.txt").write_text("1 1\nAnn_Lee 1 2\nBob 1\n")
    (tmp_path / "gone.txt").write_text("1\nAnn_Lee 1 3\nAnn_Lee 1 Bob 1\n")
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "config.yaml").write_text("method: ind\nnets: [resnet20]\n")
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "config.yaml").write_text("method: ind\nnets: [resnet18]\n"
                                                  "data: {name: faces}\n")
    (tmp_path / "plain").mkdir()
    torch.save(create_model("resnet20", 10).state_dict(), tmp_path / "plain" / "net0_resnet20.pt")
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "plain" / "net0_resnet32.pt")
    fill = {"{run}": str(face_run["run"]), "{lfw}": str(face_run["lfw"]),
            "{pairs}": str(face_run["pairs"]), "{tmp}": str(tmp_path)}

    def filled(text: str) -> str:
        for k, v in fill.items():
            text = text.replace(k, v)
        return text

    before = _snapshot(face_run["run"]), _snapshot(tmp_path)
    try:
        code = main(["eval", *[filled(a) for a in args]])
    except SystemExit as e:   # argparse's own usage errors
        code = e.code
    out = capsys.readouterr()
    text = out.out + out.err
    assert code == 2, text
    assert filled(expected) in text and "Traceback" not in text
    assert len([line for line in text.splitlines() if line.strip()]) == 1, text
    assert (_snapshot(face_run["run"]), _snapshot(tmp_path)) == before
