"""Detector backbones from pretrained ResNets (issue 27): a classifier's run folder as backbone
weights, one entry per network, and the teacher-student rule (one path starts the student only;
the teacher comes whole from teacher_weights, with the normalisation its weights hold)."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("torchvision")

from torchvision.models import resnet18, resnet34  # noqa: E402
from torchvision.ops.misc import FrozenBatchNorm2d  # noqa: E402

from dcmkd.cli import main  # noqa: E402
from dcmkd.engine.config import resolve  # noqa: E402
from dcmkd.models.detection import build_detector  # noqa: E402
from dcmkd.tasks.build import (backbone_weights_per_network, build_task,  # noqa: E402
                               detection_method)

SIZE = 64
OPTS = dict(min_size=SIZE, max_size=SIZE)
CPU = torch.device("cpu")

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """torchvision ResNet-18/34 ImageNet-format state_dict files with non-trivial BN
    statistics, and a dcmkd run folder of a zoo ResNet-18 classifier (1 epoch, 16 synthetic
    32-px images)."""
    root = tmp_path_factory.mktemp("weights")
    out = {}
    for seed, (name, make) in enumerate((("r18", resnet18), ("r34", resnet34))):
        torch.manual_seed(seed)
        net = make()
        for k, v in net.state_dict().items():
            if k.endswith("running_mean") or k.endswith("running_var"):
                v.uniform_(0.5, 1.5)
        out[name] = root / f"{name}.pt"
        torch.save(net.state_dict(), out[name])
    run = root / "zoo_r18"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", "-m", "ind", "-n", "resnet18", "-d", "synthetic", "-e", "1",
                     "-o", str(run), "device=cpu", "quiet=true", "data.train_subset=16",
                     "data.image_size=32", "data.batch_size=8", "schedule.name=constant"]) == 0
    finally:
        torch.set_num_threads(before)
    out["run"] = run
    return out


def _body(detector) -> dict[str, torch.Tensor]:
    return detector.backbone.body.state_dict()


def _assert_body_is(detector, path) -> None:
    """The detector's ResNet body holds exactly the torchvision-format file's tensors."""
    sd = torch.load(path, weights_only=True)
    body = _body(detector)
    assert len(body) == sum(1 for k in sd if not k.startswith("fc.")
                            and not k.endswith("num_batches_tracked"))
    for k, v in body.items():
        assert torch.equal(v, sd[k]), k


def _assert_from_scratch(detector) -> None:
    assert detector.dcmkd_spec["backbone_weights"] is None
    assert isinstance(detector.backbone.body.bn1, torch.nn.BatchNorm2d)


def test_a_classifier_run_folder_starts_a_detector_backbone(files):
    run = files["run"]
    exported = json.loads((run / "summary.json").read_text())["exported"][0]
    zoo = torch.load(run / exported, weights_only=True)   # the run's own exported network
    det = build_detector("retinanet", "resnet18", 3, backbone_weights=run, **OPTS)
    body = det.backbone.body
    assert det.dcmkd_spec["backbone_weights"] == str(run)
    assert isinstance(body.bn1, FrozenBatchNorm2d)
    # zoo keys paired with torchvision's: the stem, a projection shortcut, layer4's last BN
    assert torch.equal(body.conv1.weight, zoo["stem.0.weight"])
    assert torch.equal(body.layer2[0].downsample[0].weight,
                       zoo["stages.conv3_x.0.shortcut.0.weight"])
    assert torch.equal(body.layer4[1].bn2.running_var,
                       zoo["stages.conv5_x.1.bn2.running_var"])
    # the same through the task's builder and the run config (task.backbone_weights=<folder>)
    method = detection_method("ind", "retinanet", ["resnet18"], 2, backbone_weights=str(run),
                              detector_options=OPTS)
    assert all(torch.equal(v, _body(det)[k]) for k, v in
               _body(method.networks[0].detector).items())


def test_per_network_lists_and_one_path_for_every_ind_network(files):
    r18, r34 = str(files["r18"]), str(files["r34"])
    both = detection_method("ind", "retinanet", ["resnet34", "resnet18"], 2,
                            backbone_weights=[r34, r18], detector_options=OPTS)
    _assert_body_is(both.networks[0].detector, r34)
    _assert_body_is(both.networks[1].detector, r18)
    second = detection_method("ind", "retinanet", ["resnet34", "resnet18"], 2,
                              backbone_weights=[None, r18], detector_options=OPTS)
    _assert_from_scratch(second.networks[0].detector)
    _assert_body_is(second.networks[1].detector, r18)
    every = detection_method("ind", "retinanet", ["resnet18", "resnet18"], 2,
                             backbone_weights=r18, detector_options=OPTS)
    for net in every.networks:
        _assert_body_is(net.detector, r18)


def test_the_rule_per_method_without_building():
    nets = ["resnet34", "resnet18"]
    assert backbone_weights_per_network("a.pt", "ind", nets) == ["a.pt", "a.pt"]
    for m in ("sskd", "fitnets", "at", "nst"):
        assert backbone_weights_per_network("a.pt", m, nets) == [None, "a.pt"]
    assert backbone_weights_per_network(["a.pt", None], "sskd", nets) == ["a.pt", None]
    assert backbone_weights_per_network(None, "ind", nets) == [None, None]


def test_sskd_starts_only_the_student_and_takes_the_teacher_from_teacher_weights(files,
                                                                                tmp_path):
    # a teacher trained from a pretrained backbone: FrozenBatchNorm2d, no BN counters saved
    torch.manual_seed(1)
    teacher = build_detector("retinanet", "resnet34", 3, backbone_weights=files["r34"], **OPTS)
    for p in teacher.parameters():
        p.data.add_(0.01)   # "trained": differs from both the file and any fresh init
    teacher_file = tmp_path / "teacher.pt"
    torch.save(teacher.state_dict(), teacher_file)
    assert not any(k.endswith("num_batches_tracked") for k in teacher.state_dict())
    method = detection_method("sskd", "retinanet", ["resnet34", "resnet18"], 2,
                              teacher_weights=str(teacher_file),
                              backbone_weights=str(files["r18"]), detector_options=OPTS)
    t, s = method.networks[0].detector, method.networks[1].detector
    _assert_body_is(s, files["r18"])
    assert isinstance(t.backbone.body.bn1, FrozenBatchNorm2d)   # as its weights were saved
    saved = torch.load(teacher_file, weights_only=True)
    assert t.state_dict().keys() == saved.keys()
    for k, v in t.state_dict().items():
        assert torch.equal(v, saved[k]), k


def test_the_run_config_one_path_is_the_students_and_a_list_is_per_network(files, tmp_path):
    from test_detection_task import _coco_folder

    root = _coco_folder(tmp_path / "coco")
    torch.manual_seed(0)
    teacher = build_detector("retinanet", "resnet34", 3, **OPTS)   # from scratch: BatchNorm
    teacher_file = tmp_path / "teacher.pt"
    torch.save(teacher.state_dict(), teacher_file)
    base = ["method=sskd", "nets=resnet34,resnet18", "data.name=coco", f"data.root={root}",
            "data.batch_size=2", "task.detector=retinanet", f"task.min_size={SIZE}",
            f"task.max_size={SIZE}", f"teacher_weights={teacher_file}"]
    # the command that used to exit 2 (the ResNet-18 file given to the ResNet-34 teacher too)
    method, _ = build_task(resolve(None, [*base, f"task.backbone_weights={files['r18']}"]),
                           CPU)
    _assert_body_is(method.networks[1].detector, files["r18"])
    for k, v in method.networks[0].detector.state_dict().items():
        assert torch.equal(v, teacher.state_dict()[k]), k
    cfg = resolve(None, [*base, f"task.backbone_weights=[null, {files['r18']}]"])
    assert cfg["task"]["backbone_weights"] == [None, str(files["r18"])]
    _assert_body_is(build_task(cfg, CPU)[0].networks[1].detector, files["r18"])


def test_a_wrong_count_or_architecture_is_one_line(files, capsys):
    r18 = str(files["r18"])
    with pytest.raises(ValueError) as e:
        detection_method("ind", "retinanet", ["resnet34", "resnet18"], 2,
                         backbone_weights=[r18, r18, None], detector_options=OPTS)
    assert str(e.value) == ("backbone_weights lists 3 entries for the 2 networks resnet34, "
                            "resnet18: give one path (or null) per network, or a single path")
    with pytest.raises(ValueError) as e:   # one path for every ind network: the R-34 refuses it
        detection_method("ind", "retinanet", ["resnet34", "resnet18"], 2, backbone_weights=r18,
                         detector_options=OPTS)
    msg = str(e.value)
    assert msg.startswith(f"backbone_weights of network 0 (retinanet resnet34): {r18}: not a "
                          "ResNet state_dict for this backbone: unexpected keys") or \
        msg.startswith(f"backbone_weights of network 0 (retinanet resnet34): {r18}: not a "
                       "ResNet state_dict for this backbone: missing keys")
    assert "\n" not in msg
    with pytest.raises(FileNotFoundError, match=r"backbone_weights of network 1 \(retinanet "
                                                r"resnet18\): no weights file or run folder"):
        detection_method("ind", "retinanet", ["resnet18", "resnet18"], 2,
                         backbone_weights=[None, str(files["r18"].parent / "nope.pt")],
                         detector_options=OPTS)
    assert main(["train", "-m", "ind", "-n", "resnet18", "-d", "coco", "--data-dir", "x",
                 "task.backbone_weights=[1, 2]"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "task.backbone_weights: expected a path" in err


def test_a_mapping_gives_each_network_its_backbones_weights(files, tmp_path):
    """``{backbone: path}``: one override for every row of a table (a reproduction whose rows
    have different backbones); the teacher of sskd takes none; a backbone the mapping does not
    name is an error, ``null`` from scratch."""
    nets = ["resnet34", "resnet18"]
    both = {"resnet18": "a18.pt", "resnet34": "a34.pt"}
    assert backbone_weights_per_network(both, "ind", nets) == ["a34.pt", "a18.pt"]
    assert backbone_weights_per_network(both, "sskd", nets) == [None, "a18.pt"]
    assert backbone_weights_per_network({"resnet18": "a18.pt"}, "sskd", nets) == [None, "a18.pt"]
    assert backbone_weights_per_network({"resnet34": None, "resnet18": "a"}, "ind", nets) == \
        [None, "a"]
    with pytest.raises(ValueError, match="names weights for resnet18, not for resnet34 "
                                         r"\(network 0\): add 'resnet34: null'"):
        backbone_weights_per_network({"resnet18": "a18.pt"}, "ind", nets)
    method = detection_method("ind", "retinanet", nets, 2, detector_options=OPTS,
                              backbone_weights={"resnet18": str(files["r18"]),
                                                "resnet34": str(files["r34"])})
    _assert_body_is(method.networks[0].detector, files["r34"])
    _assert_body_is(method.networks[1].detector, files["r18"])
    # in a run config the mapping becomes what the run takes of it, so a run's identity holds
    # only its own backbones' files: the ResNet-18 row is the run made with one R18 path, an
    # entry added for another backbone changes nothing
    from dcmkd.run_folder import config_hash, differences

    def cfg(method, nets, weights):
        return resolve(None, [f"method={method}", f"nets={nets}", "data.name=coco",
                              "data.root=x", f"task.backbone_weights={weights}"])

    r18, r34 = files["r18"], files["r34"]
    both = f"{{resnet18: {r18}, resnet34: {r34}}}"
    assert cfg("ind", "resnet18", both)["task"]["backbone_weights"] == str(r18)
    assert differences(cfg("ind", "resnet18", str(r18)), cfg("ind", "resnet18", both)) == []
    assert config_hash(cfg("ind", "resnet18", f"{{resnet18: {r18}}}")) == \
        config_hash(cfg("ind", "resnet18", both))
    assert cfg("ind", "resnet34,resnet18", both)["task"]["backbone_weights"] == [str(r34),
                                                                                 str(r18)]
    assert cfg("sskd", "resnet34,resnet18", both)["task"]["backbone_weights"] == str(r18)


def test_detector_options_reach_the_detector_and_bad_ones_are_one_line(capsys):
    cfg = resolve(None, ["method=ind", "nets=resnet18", "data.name=coco", "data.root=x",
                         "task.detector_options={box_batch_size_per_image: 64, "
                         "rpn_post_nms_top_n_test: 300, trainable_layers: 2}"])
    opts = {**cfg["task"]["detector_options"], **OPTS}
    net = detection_method("ind", "fasterrcnn", ["resnet18"], 2,
                           detector_options=opts).networks[0].detector
    assert net.roi_heads.fg_bg_sampler.batch_size_per_image == 64
    assert net.rpn._post_nms_top_n["testing"] == 300
    assert net.dcmkd_spec["trainable_layers"] == 2
    with pytest.raises(ValueError, match="unknown retinanet option 'no_such_option' "
                                         r"\(torchvision's keywords: .*fg_iou_thresh"):
        detection_method("ind", "retinanet", ["resnet18"], 2,
                         detector_options={**OPTS, "no_such_option": 1})
    for bad, says in (("{min_size: 64}", "min_size is task.min_size, not a detector option"),
                      ("{num_classes: 3}", "num_classes is the data's class count"),
                      ("[1]", "task.detector_options")):
        assert main(["train", "-m", "ind", "-n", "resnet18", "-d", "coco", "--data-dir", "x",
                     f"task.detector_options={bad}"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and says in err, err
