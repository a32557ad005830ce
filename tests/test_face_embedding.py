"""The face output feature as an embedding layer (``task.embedding``): BN-FC-BN after the
pooling, the feature the evaluation scores, trained by SSKD's head phase (never left random)."""
from __future__ import annotations

import pytest
import torch

from dcmkd.cli import main
from dcmkd.engine.loop import fit
from dcmkd.tasks.face import FaceHead, embed
from tests.test_tasks import _face_settings, _identity_folder


def test_embedding_head_is_bn_fc_bn_and_is_the_output_feature():
    head = FaceHead(16, 5, embedding=8)
    assert [type(m).__name__ for m in head.embedding] == ["BatchNorm1d", "Linear", "BatchNorm1d"]
    assert head.fc.embedding_dim == 8 and head.fc.fc.weight.shape == (5, 8)
    head.eval()
    x = torch.randn(3, 16, 2, 2)
    pooled = x.mean((2, 3))
    bn0, fc, bn1 = head.embedding
    expect = bn1(fc(bn0(pooled)))
    torch.testing.assert_close(head.embed(x), expect)
    assert head(x).shape == (3, 5)
    plain = FaceHead(16, 5)
    assert plain.embedding is None
    torch.testing.assert_close(plain.embed(x), pooled)   # default: the pooled last stage


def test_sskd_trains_the_embedding_in_its_head_phase_and_refuses_without_one(tmp_path):
    from dcmkd.tasks.build import face_data, face_method

    data = face_data(_identity_folder(tmp_path / "faces"), size=24, batch_size=8,
                     test_batch_size=16)
    torch.manual_seed(0)
    teacher = face_method("ind", ["resnet18"], data.num_classes, embedding=8)
    summary = fit(teacher, data, tmp_path / "teacher", _face_settings(1))
    assert "rank1" in summary["test_face"][0]
    with torch.no_grad():
        teacher.networks[0].eval()
        assert embed(teacher.networks[0], torch.randn(2, 3, 24, 24)).shape == (2, 8)
    with pytest.raises(ValueError, match="task.embedding=8 .* give sskd.head_epochs > 0"):
        face_method("sskd", ["resnet18", "resnet18"], data.num_classes, embedding=8,
                    teacher_weights=tmp_path / "teacher",
                    sskd={"schedule": "epochs", "stage_epochs": 1})
    method = face_method("sskd", ["resnet18", "resnet18"], data.num_classes, embedding=8,
                         teacher_weights=tmp_path / "teacher",
                         sskd={"schedule": "epochs", "stage_epochs": 1, "head_epochs": 1})
    student = method.networks[1].backbone
    before = {k: v.clone() for k, v in student.head.embedding.state_dict().items()}
    summary = fit(method, data, tmp_path / "sskd", _face_settings(1))
    assert summary["epochs"] == 5   # 4 stages, then the head phase
    changed = [k for k, v in student.head.embedding.state_dict().items()
               if not torch.equal(v, before[k])]
    assert "1.weight" in changed and "2.running_mean" in changed   # FC and its BN learnt


def test_cli_embedding_option_and_its_one_line_refusal(tmp_path, capsys):
    faces = _identity_folder(tmp_path / "faces")
    common = ["-d", "faces", "--data-dir", str(faces), "-e", "1", "-q", "device=cpu",
              "data.image_size=24", "data.batch_size=8", "schedule.name=constant"]
    assert main(["train", "-m", "ind", "-n", "resnet18", "-o", str(tmp_path / "t"), *common,
                 "task.embedding=8"]) == 0
    capsys.readouterr()
    code = main(["train", "-m", "sskd", "-n", "resnet18,resnet18", "-o", str(tmp_path / "s"),
                 *common, "task.embedding=8", f"teacher_weights={tmp_path / 't'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "sskd.head_epochs > 0" in err, err
    code = main(["train", "-m", "ind", "-n", "resnet18", "-o", str(tmp_path / "z"), *common,
                 "task.embedding=0"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "task.embedding" in err, err


def test_eval_pairs_rebuilds_the_embedding_head_of_the_run(tmp_path, capsys):
    """``dcmkd eval --pairs`` scores an embedding run by its embedding (8 wide), not the pool."""
    import json

    from tests.test_pairs_eval import PAIRS, _lfw_folder

    run = tmp_path / "run"
    assert main(["train", "-m", "ind", "-n", "resnet18", "-d", "faces", "--data-dir",
                 str(_identity_folder(tmp_path / "faces")), "-e", "1", "-o", str(run), "-q",
                 "device=cpu", "data.image_size=24", "data.batch_size=8",
                 "schedule.name=constant", "task.embedding=8"]) == 0
    (tmp_path / "pairs.txt").write_text(PAIRS)
    capsys.readouterr()
    assert main(["eval", str(run), "--pairs", str(tmp_path / "pairs.txt"), "--data-dir",
                 str(_lfw_folder(tmp_path / "lfw"))]) == 0
    [net] = json.loads((run / "pairs_pairs.json").read_text())["networks"]
    assert net["folds"] == 2
    # the same figure from the run's own network and its 8-wide embedding, without the CLI
    import warnings

    import numpy as np

    from dcmkd import load_run
    from dcmkd.data.augment import normalize
    from dcmkd.data.faces import decode_face, read_pairs_file
    from dcmkd.metrics.pairs import evaluate_pairs
    from dcmkd.tasks.build import FACE_MEAN, FACE_STD

    network = load_run(run, device="cpu").method.networks[0].eval()
    pairs = read_pairs_file(tmp_path / "pairs.txt")
    files = list(dict.fromkeys(k for p in pairs for k in ((p.name1, p.index1),
                                                           (p.name2, p.index2))))
    x = torch.stack([torch.from_numpy(decode_face(
        tmp_path / "lfw" / n / f"{n}_{i:04d}.jpg", 24).copy()) for n, i in files])
    with torch.no_grad():
        f = embed(network, normalize(x, FACE_MEAN, FACE_STD)).double().numpy()
    assert f.shape[1] == 8
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    row = {k: i for i, k in enumerate(files)}
    scores = [f[row[(p.name1, p.index1)]] @ f[row[(p.name2, p.index2)]] for p in pairs]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # too few impostor pairs for a TAR: not measured
        want = evaluate_pairs(scores, [p.same for p in pairs], [p.fold for p in pairs])
    assert net["accuracy"] == pytest.approx(want["accuracy"])
    assert net["auc"] == pytest.approx(want["auc"], rel=1e-6)


def test_eval_of_an_exported_face_file_rebuilds_its_runs_head(tmp_path, capsys):
    """``dcmkd eval RUN/net0_*.pt`` (no --pairs) builds the network from its run folder's whole
    task section (its embedding layer), as ``dcmkd eval RUN`` does: same figures."""
    import json

    run = tmp_path / "run"
    assert main(["train", "-m", "ind", "-n", "resnet18", "-d", "faces", "--data-dir",
                 str(_identity_folder(tmp_path / "faces")), "-e", "1", "-o", str(run), "-q",
                 "device=cpu", "data.image_size=24", "data.batch_size=8",
                 "schedule.name=constant", "task.embedding=8"]) == 0
    capsys.readouterr()
    assert main(["eval", str(run), "--json", "-q"]) == 0
    whole = json.loads(capsys.readouterr().out)
    assert main(["eval", str(run / "net0_resnet18.pt"), "--json", "-q"]) == 0
    alone = json.loads(capsys.readouterr().out)
    assert alone == whole and "test/net0/face/rank1" in alone
