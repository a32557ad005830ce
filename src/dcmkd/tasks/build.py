"""Data and methods of the face and detection tasks, from names and folders (the Python API of
SSKD Tables 7–9; the classification path is :func:`dcmkd.engine.build.build`).

- :func:`face_data` / :func:`face_method`: an identity-folder dataset (one folder per identity,
  an identity-disjoint train/test split) and a method over zoo backbones with face heads.
- :func:`detection_data` / :func:`detection_method`: a COCO-layout dataset and a method over
  torchvision detectors (``fasterrcnn`` / ``retinanet`` with a ResNet-FPN backbone).

Both return what :func:`dcmkd.engine.fit` takes: ``fit(method, data, run, settings)``.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from dcmkd.methods.base import Method
from dcmkd.options import check_fields, option
from dcmkd.tasks.face import HEADS


#: the detection datasets (``data.name``): what ``data.root`` holds and the default (training,
#: evaluation) splits, the one place they are declared (``task.train_split``/``test_split``
#: null: these; :func:`resolve_task_section` writes them into a resolved config)
DETECTION_DATASETS: dict[str, tuple[str, tuple[str, str]]] = {
    "coco": ("COCO folder (annotations/instances_<split>.json + images)",
             ("train2017", "val2017")),
    "voc": ("Pascal VOC folder such as VOCdevkit/VOC2007 (Annotations/*.xml, JPEGImages/, "
            "ImageSets/Main/<split>.txt)", ("trainval", "test")),
}

#: the datasets of the tasks other than classification (``data.name``): the task follows the data
TASK_DATASETS = {"faces": "face", **{name: "detection" for name in DETECTION_DATASETS}}


def _backbone_weights_rule(value: Any) -> str | None:
    if isinstance(value, list) and not all(v is None or isinstance(v, str) for v in value):
        return "expected a path, or a list of one path (or null) per network"
    if isinstance(value, dict) and not (value and all(
            isinstance(k, str) and (v is None or isinstance(v, str)) for k, v in value.items())):
        return ("expected a mapping of backbone names to paths (or null), e.g. "
                "{resnet18: R18.pt, resnet50: R50.pt}")
    return None


#: detector keywords the task section owns as keys of its own (num_classes: the data's)
_OWN_DETECTOR_KEYS = ("min_size", "max_size", "backbone_weights", "num_classes")


def _detector_options_rule(value: Any) -> str | None:
    if not all(isinstance(k, str) for k in value):
        return "expected a mapping of torchvision detector keywords to values"
    own = [k for k in value if k in _OWN_DETECTOR_KEYS]
    if own:
        where = "the data's class count" if own[0] == "num_classes" else f"task.{own[0]}"
        return f"{own[0]} is {where}, not a detector option"
    return None


@dataclass
class TaskConfig:
    """The ``task`` section of a run config: options of the face and detection tasks (the task
    itself follows ``data.name``: :data:`TASK_DATASETS`, else classification).

    ``backbone_weights`` (detection) starts detector backbones from ImageNet ResNet weights: a
    file or a finished run folder of a zoo or ``tv:`` ResNet classifier (its exported network
    0). One path initialises every network under ``ind`` and **only the student** under the
    teacher-student methods (``sskd``, ``fitnets``, ``at``, ``nst``: the teacher, network 0,
    comes whole from ``teacher_weights``); a list gives one path per network in ``nets``
    order, null entries from scratch; a mapping of backbone names to paths gives each of those
    networks its own backbone's entry (one override serves every row of a table, e.g. a
    reproduction; :func:`backbone_weights_per_network`). ``detector_options``: further
    keywords of :func:`~dcmkd.models.detection.build_detector` and torchvision's detector
    (``trainable_layers``, ``norm``; Faster R-CNN's ``box_batch_size_per_image``,
    ``rpn_post_nms_top_n_test``, ``box_score_thresh`` …; RetinaNet's ``score_thresh`` …), given
    to every network of the run."""

    head: str = option("softmax", "face: identity classifier of training: softmax, cosface "
                       "(Wang et al. 2018) or arcface (Deng et al. 2019)",
                       choices=HEADS)
    s: float | None = option(None, "face margin heads' scale (null: the papers' 64)",
                             types=(float, None), low=0, above=True)
    m: float | None = option(None, "face margin (null: CosFace 0.35, ArcFace 0.5)",
                             types=(float, None), low=0)
    embedding: int | None = option(None, "face: width of an embedding layer (BN-FC-BN after "
                                   "the pooling) as the output feature (null: the pooled last "
                                   "stage, the paper's reading); trained in SSKD's head phase",
                                   types=(int, None), low=1, added=True)
    split: str | None = option(None, "face: identity split CSV (null: root/SPLIT_SUGGESTED.csv, "
                               "else a seeded quarter of the identities as test)",
                               types=(str, None))
    ijba: str | None = option(None, "face: IJB-A folder (IJB-A_11_sets/, IJB-A_1N_sets/, "
                              "images/): evaluate on its templates, mean over task.ijba_splits "
                              "(the paper's Table 7), training on every identity of data.root "
                              "(null: unseen identities of data.root)", types=(str, None),
                              added=True, location=True)
    ijba_images: str | None = option(None, "face: the folder IJB-A's FILE paths are relative "
                                     "to (null: task.ijba/images, else task.ijba)",
                                     types=(str, None), added=True, location=True)
    ijba_splits: int = option(10, "face: IJB-A splits scored, 1..N (IJB-A has 10)", low=1,
                              high=10, added=True)
    detector: str = option("fasterrcnn", "detection: fasterrcnn (FPN) or retinanet",
                           choices=("fasterrcnn", "retinanet"))   # models.detection.KINDS (torchvision)
    min_size: int = option(800, "detection: shorter image side after resizing (Detectron's "
                           "800)", low=16)
    max_size: int = option(1333, "detection: longer side at most (Detectron's 1333)", low=16)
    train_split: str | None = option(None, "detection: split of training (null: the "
                                     "dataset's: coco train2017, voc trainval)",
                                     types=(str, None))
    test_split: str | None = option(None, "detection: split of evaluation (null: the "
                                    "dataset's: coco val2017, voc test)", types=(str, None))
    backbone_weights: str | list | dict | None = option(
        None, "detection: ImageNet ResNet weights (a file or a classifier's run folder) for "
        "every network (ind) or the student (sskd, fitnets, at, nst), a list, one per "
        "network, or a mapping {backbone: path} (null: from scratch)",
        types=(str, list, dict, None), rule=_backbone_weights_rule)
    detector_options: dict = option(
        factory=dict, doc="detection: further keywords of the detectors (build_detector's and "
        "torchvision's: trainable_layers, norm; Faster R-CNN box_batch_size_per_image, "
        "rpn_post_nms_top_n_test, box_score_thresh, …; RetinaNet score_thresh, …)",
        types=(dict,),
        rule=_detector_options_rule, added=True)

    def __post_init__(self) -> None:
        check_fields(self, "task.")


def task_name(cfg: dict[str, Any]) -> str:
    """The task of a resolved run config: from its ``data.name``."""
    return TASK_DATASETS.get(cfg["data"]["name"], "classification")


def resolve_task_section(cfg: dict[str, Any]) -> dict[str, Any]:
    """``cfg``'s ``task`` section with the detection splits left null set to the dataset's
    (:data:`DETECTION_DATASETS`), so a resolved config says which splits it uses, and a
    ``backbone_weights`` mapping replaced by what this run takes of it
    (:func:`weights_of_run`)."""
    task = dict(cfg["task"])
    if isinstance(task.get("backbone_weights"), dict):
        task["backbone_weights"] = weights_of_run(task["backbone_weights"], cfg["method"],
                                                  cfg["nets"])
    layout = DETECTION_DATASETS.get(cfg["data"]["name"])
    if layout is not None:
        for key, default in zip(("train_split", "test_split"), layout[1]):
            if task.get(key) is None:
                task[key] = default
    return task


def build_task(cfg: dict[str, Any], device: torch.device, ctx: Any = None
               ) -> tuple[Method, TaskData]:
    """The method and data of a resolved run config of the face or detection task. Under
    torchrun (``ctx``) the data are sharded over the data replicas: training, rows of every
    global batch; evaluation, whole batches gathered to rank 0 (:func:`face_data`,
    :func:`detection_data`)."""
    if ctx is not None and ctx.mode == "networks":
        raise ValueError(f"parallel=networks is for the mutual methods of classifiers; the "
                         f"{task_name(cfg)} task trains data-parallel (parallel=data)")
    shard = {"rank": ctx.replica, "world_size": ctx.replicas} if ctx is not None else {}
    task, data_cfg = TaskConfig(**cfg["task"]), cfg["data"]
    if not data_cfg["root"]:
        raise ValueError(f"data.name={data_cfg['name']} needs data.root: the "
                          + ("identity folder (one folder per identity)"
                             if task_name(cfg) == "face" else
                             DETECTION_DATASETS[data_cfg["name"]][0]))
    batch, test_batch = data_cfg["batch_size"], data_cfg["test_batch_size"] or 64
    torch.manual_seed(cfg["seed"])
    options = {"teacher_weights": cfg["teacher_weights"]}
    if task_name(cfg) == "face":
        data = face_data(data_cfg["root"], split=task.split, size=data_cfg["image_size"] or 64,
                         batch_size=batch, test_batch_size=test_batch, device=device,
                         seed=cfg["seed"], ijba=task.ijba, ijba_images=task.ijba_images,
                         ijba_splits=task.ijba_splits, **shard)
        method = face_method(cfg["method"], cfg["nets"], data.num_classes, head=task.head,
                             s=task.s, m=task.m, embedding=task.embedding, sskd=cfg["sskd"] if cfg["method"] == "sskd"
                             else None, **options, **_changed_loss(cfg))
        return method, data
    data = detection_data(data_cfg["root"], name=data_cfg["name"],
                          train_split=task.train_split, test_split=task.test_split,
                          batch_size=batch, test_batch_size=test_batch, seed=cfg["seed"],
                          **shard)
    method = detection_method(
        cfg["method"], task.detector, cfg["nets"], data.num_classes,
        backbone_weights=task.backbone_weights,
        detector_options={**task.detector_options, "min_size": task.min_size,
                          "max_size": task.max_size},
        sskd=cfg["sskd"], feature=cfg.get("feature"), **options, **_changed_loss(cfg))
    return method, data


def weight_takers(method: str, count: int) -> list[int]:
    """The networks that one backbone-weights path starts: every one under a method without a
    teacher, only the student (the last) under a teacher-student method."""
    from dcmkd.methods import needs_teacher

    return [count - 1] if needs_teacher(method) else list(range(count))


def backbone_weights_per_network(weights: Any, method: str, nets: Sequence[str]
                                 ) -> list[Any]:
    """One backbone-weights entry per network (None: from scratch) from ``weights``: None (all
    from scratch); one path, run folder or state_dict, which initialises every network under a
    method without a teacher (``ind``) and only the student (the last network) under a
    teacher-student method (``sskd``, ``fitnets``, ``at``, ``nst``: the teacher comes whole
    from ``teacher_weights``); or a list of one entry per network. **Choice**: a single path
    never touches a teacher, whose pretrained backbone would be overwritten anyway. A mapping
    of backbone names to paths (values str or None, e.g. ``{resnet18: R18.pt, resnet34:
    R34.pt}``) gives each network that takes weights (as a single path would) its backbone's
    entry; a backbone it does not name is an error (``null`` entries train from scratch)."""
    if weights is None:
        return [None] * len(nets)
    out: list[Any] = [None] * len(nets)
    if isinstance(weights, Mapping) and weights and all(
            v is None or isinstance(v, (str, os.PathLike)) for v in weights.values()):
        for i in weight_takers(method, len(nets)):
            if nets[i] not in weights:
                raise ValueError(f"backbone_weights names weights for {', '.join(weights)}, "
                                 f"not for {nets[i]} (network {i}): add '{nets[i]}: null' to "
                                 "train it from scratch")
            out[i] = weights[nets[i]]
        return out
    if isinstance(weights, (str, os.PathLike, dict)):
        for i in weight_takers(method, len(nets)):
            out[i] = weights
        return out
    weights = list(weights)
    if len(weights) != len(nets):
        raise ValueError(f"backbone_weights lists {len(weights)} entries for the "
                         f"{len(nets)} networks {', '.join(nets)}: give one path (or null) per "
                         "network, or a single path")
    return weights


def weights_of_run(mapping: Mapping[str, Any], method: str, nets: Sequence[str]) -> Any:
    """What a run takes of a ``{backbone: path}`` mapping, in the form that says it alone
    (:func:`backbone_weights_per_network`): the one path (or null) every network taking weights
    gets — a single path means exactly that — else the list per network. A run's identity then
    holds only its own backbones' files: the ResNet-18 row of a table run with the mapping is
    the run made with ``backbone_weights=R18.pt``, and adding another backbone's entry later
    changes no other row."""
    per = backbone_weights_per_network(mapping, method, nets)
    values = {per[i] for i in weight_takers(method, len(nets))}
    return values.pop() if len(values) == 1 else per


def _trained_norm(weights: str | os.PathLike) -> str:
    """The normalisation a trained detector's weights (a file or run folder) were saved with:
    ``"bn"`` when they hold BatchNorm counters (``num_batches_tracked``), else ``"frozen_bn"``
    (FrozenBatchNorm2d keeps none: a detector trained from pretrained backbone weights). A
    teacher built with it computes as in its own run (BatchNorm in eval mode would load the same
    tensors but round differently) and holds exactly the file's keys."""
    from dcmkd.models.ecosystem import read_state_dict

    state = read_state_dict(weights)
    return "bn" if any(k.endswith("num_batches_tracked") for k in state) else "frozen_bn"


def _changed_loss(cfg: dict[str, Any]) -> dict[str, Any]:
    """The loss options a config changes from their defaults (the face methods take them)."""
    from dataclasses import asdict

    from dcmkd.methods.mutual import LossOptions

    defaults = asdict(LossOptions())
    return {k: v for k, v in cfg["loss"].items() if k in defaults and v != defaults[k]}


@dataclass
class TaskData:
    """Training and test batches of a task, with what defines them (``identity``, a run
    folder's ``data.json``)."""

    train: Any
    test: Any
    num_classes: int
    identity: dict[str, Any] = field(default_factory=dict)
    classes: list[str] = field(default_factory=list)


def _evaluation_shard(batches: Any, rank: int, world_size: int) -> Any:
    """``batches`` (one process's test batches) as this rank's whole batches under torchrun
    (:class:`~dcmkd.tasks.base.BatchShard`); unchanged in one process."""
    from dcmkd.tasks.base import BatchShard

    return batches if world_size == 1 else BatchShard(batches, rank, world_size)


def _digest(items: Sequence[Any]) -> str:
    h = hashlib.sha256()
    for item in items:
        h.update(str(item).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


# -- face ------------------------------------------------------------------------------------
#: the face crops' normalisation: per-channel mean/std on the 0..1 scale (**choice**: the
#: ImageNet statistics, as the zoo's ImageNet ResNets use; faces differ little in colour)
FACE_MEAN, FACE_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def face_data(root: str | os.PathLike, *, split: str | os.PathLike | None = None,
              size: int = 64, batch_size: int = 64, test_batch_size: int = 256,
              test_fraction: float = 0.25, device: torch.device | str = "cpu", seed: int = 0,
              max_identities: int | None = None, rank: int = 0,
              world_size: int = 1, ijba: str | os.PathLike | None = None,
              ijba_images: str | os.PathLike | None = None, ijba_splits: int = 10) -> TaskData:
    """An identity folder split into training and unseen test identities, or (``ijba``) an
    identity folder to train on and IJB-A to test on.

    ``split``: a CSV of ``identity_dir,…,split`` rows (``train``/``test``; e.g. the face crops'
    ``SPLIT_SUGGESTED.csv``), default ``root/SPLIT_SUGGESTED.csv`` when it exists, else a seeded
    split of ``test_fraction`` of the identities. Training images get a random crop (padding
    ``size/8``) and a horizontal flip; ``max_identities`` keeps the first identities of each
    side (tests and smoke runs).

    ``rank``/``world_size`` (data-parallel training over ``world_size`` replicas):
    ``batch_size`` is the global batch, a multiple of ``world_size``; every rank walks the same
    seeded global batches and trains on rows ``rank::world_size`` of each (disjoint, together
    the single-process batch, augmented alike: :class:`~dcmkd.data.loader.DeviceLoader`), so
    every rank takes the same number of steps; the remainder of an epoch that makes no full
    global batch is dropped, as in one process. The test batches are the single-process ones,
    every ``world_size``-th whole batch per rank (:class:`~dcmkd.tasks.base.BatchShard`).

    ``ijba`` (the SSKD paper's Table 7 protocol: train on CASIA-WebFace, test on IJB-A): the test
    set is every face of IJB-A splits 1..``ijba_splits`` (:func:`ijba_test_data`), scored on the
    splits' templates; training takes every identity of ``root`` (the train side of ``split``
    when one is given; a ``SPLIT_SUGGESTED.csv`` is not used).
    """
    from dcmkd.data import augment as aug
    from dcmkd.data.faces import (IdentityFolder, check_verifiable, identity_folders,
                                  read_split_csv, split_identities)
    from dcmkd.data.loader import DeviceLoader

    root = Path(root).expanduser()
    csv = Path(split) if split is not None else root / "SPLIT_SUGGESTED.csv"
    if split is not None or (csv.is_file() and ijba is None):
        sides = read_split_csv(csv)
    elif ijba is not None:
        sides = {"train": identity_folders(root), "test": []}
    else:
        sides = split_identities(identity_folders(root), test_fraction, seed=0)
    if max_identities is not None:
        sides = {k: v[:max_identities] for k, v in sides.items()}
    train = IdentityFolder(root, sides["train"], size=size)
    transform = aug.pad_crop_flip(max(1, size // 8))
    common = dict(device=device, seed=seed, mean=FACE_MEAN, std=FACE_STD)
    identity = {"name": "faces", "root": str(root.resolve()), "size": size,
                "train_identities": len(train.identities), "train_images": len(train)}
    if ijba is None:
        test = IdentityFolder(root, sides["test"], size=size)
        check_verifiable(test.labels)
        identity.update({"test_identities": len(test.identities), "test_images": len(test),
                         "files": _digest([*(p.relative_to(root) for p in train.paths), "|",
                                           *(p.relative_to(root) for p in test.paths)])})
        test_batches: Any = DeviceLoader(test.images, test.labels, test_batch_size,
                                         train=False, **common)
    else:
        test_batches, ijba_identity = ijba_test_data(ijba, ijba_images, ijba_splits, size,
                                                     test_batch_size, **common)
        identity.update({"files": _digest([p.relative_to(root) for p in train.paths]),
                         "ijba": ijba_identity})
    return TaskData(
        train=DeviceLoader(train.images, train.labels, batch_size, train=True,
                           augment=transform, rank=rank, world_size=world_size, **common),
        test=_evaluation_shard(test_batches, rank, world_size),
        num_classes=train.num_identities, identity=identity, classes=list(train.identities))


def ijba_test_data(protocol_root: str | os.PathLike, images: str | os.PathLike | None,
                   splits: int, size: int, batch_size: int, **loader: Any
                   ) -> tuple[Any, dict[str, Any]]:
    """The test batches of the IJB-A protocol and what defines them: every face the metadata
    of splits 1..``splits`` names, once, cropped by its box (:mod:`dcmkd.data.ijba`), labelled
    by its position; the batches carry the protocol
    (:class:`~dcmkd.tasks.face.IjbaEvaluation`) that :meth:`~dcmkd.tasks.face.Face.evaluate`
    scores them by."""
    from dcmkd.data.ijba import ijba_image_root, load_faces
    from dcmkd.data.loader import DeviceLoader
    from dcmkd.metrics.face import ijba_split_files, ijba_sightings
    from dcmkd.tasks.face import IjbaBatches, IjbaEvaluation

    root = Path(protocol_root).expanduser().resolve()
    chosen = tuple(range(1, int(splits) + 1))
    key, faces = ijba_sightings(root, chosen)
    image_root = ijba_image_root(root, images)
    names = sorted(faces)
    pixels = load_faces(image_root, [faces[n] for n in names], size)
    protocol = IjbaEvaluation(str(root), chosen, key, tuple(names))
    metadata = [p for k in chosen for p in ijba_split_files(root, k).values()]
    identity = {"root": str(root), "images": str(image_root.resolve()), "splits": len(chosen),
                "faces": len(names),
                "protocol": _digest([p.read_bytes() for p in metadata]),
                "crops": _digest([(n, faces[n]) for n in names])}
    batches = DeviceLoader(pixels, torch.arange(len(names)), batch_size, train=False, **loader)
    return IjbaBatches(batches, protocol), identity


def face_method(name: str, nets: Sequence[str], num_identities: int, *, head: str = "softmax",
                s: float | None = None, m: float | None = None,
                embedding: int | None = None,
                teacher_weights: str | os.PathLike | None = None,
                model_options: dict[str, Any] | None = None, **options: Any) -> Method:
    """``name`` (``ind``, ``kd``, ``sskd``, ``fitnets``, …) over zoo backbones ``nets`` with
    face heads (:func:`~dcmkd.tasks.face.make_face_network`; ``embedding``: the width of an
    embedding layer), trained on the face task.
    ``options``: :func:`~dcmkd.methods.create_method`'s (``sskd={...}``, ``temperature``, …).
    SSKD on a face model trains its stages only (``head_epochs`` 0 unless set): the output
    feature is the pooled last stage, so the task head is not tuned (SSKD Table 7). With an
    embedding layer the output feature is in the head, so SSKD needs a head phase
    (``sskd.head_epochs`` > 0: the embedding is trained on the labels with the stages frozen);
    without one it is an error rather than a run whose output feature stays random."""
    from dcmkd.methods import create_method
    from dcmkd.models import create_model
    from dcmkd.tasks.face import Face, make_face_network

    task = Face(head, s, m)
    backbones = [make_face_network(create_model(n, num_identities, **(model_options or {})),
                                   num_identities, head, task.s if head != "softmax" else None,
                                   task.m if head != "softmax" else None, embedding)
                 for n in nets]
    if name == "sskd":
        given = dict(options.get("sskd") or {})
        if given.get("head_epochs") is None:
            given["head_epochs"] = 0
        if embedding is not None and not given["head_epochs"]:
            raise ValueError(f"task.embedding={embedding} puts the face output feature in the "
                             "head, which SSKD's stages do not train: give sskd.head_epochs > 0 "
                             "(its head phase trains the embedding on the labels)")
        options["sskd"] = given
    method = create_method(name, backbones, num_identities, teacher_weights=teacher_weights,
                           **options)
    method.task = task
    return method


# -- detection --------------------------------------------------------------------------------
def detection_data(root: str | os.PathLike, *, name: str = "coco",
                   train_split: str | None = None, test_split: str | None = None,
                   batch_size: int = 4, test_batch_size: int = 4, seed: int = 0,
                   flip: bool = True, min_size: int | None = None, max_size: int | None = None,
                   rank: int = 0, world_size: int = 1) -> TaskData:
    """A detection dataset as training and test batches
    (:class:`~dcmkd.data.detection.DetectionBatches`): ``name="coco"``, a COCO-layout folder
    (``annotations/instances_<split>.json`` + images), or ``"voc"``, a Pascal VOC folder
    (``Annotations/``, ``JPEGImages/``, ``ImageSets/Main/<split>.txt``, e.g.
    ``VOCdevkit/VOC2007``); the splits default to the dataset's (:data:`DETECTION_DATASETS`:
    COCO train2017/val2017, VOC trainval/test). Both are scored by the same COCO evaluation
    (a VOC split's ground truth is converted in memory, ``difficult`` objects ignored:
    :mod:`dcmkd.data.detection`). ``min_size``/``max_size`` resize the images once when
    loading (the detectors resize again to their own sizes).

    ``rank``/``world_size`` (data-parallel training): ``batch_size`` is the global batch, a
    multiple of ``world_size``; every rank walks the same seeded global batches (and flips)
    and trains on rows ``rank::world_size`` of each, so the ranks' images are disjoint, cover
    the epoch and take the same number of steps; the images that make no full global batch
    are dropped, as in one process. The test batches are the single-process ones, every
    ``world_size``-th whole batch per rank (:class:`~dcmkd.tasks.base.BatchShard`)."""
    from dcmkd.data.detection import CocoDetection, DetectionBatches, VocDetection

    readers = {"coco": CocoDetection, "voc": VocDetection}
    if name not in DETECTION_DATASETS:
        raise ValueError(f"detection dataset '{name}' is not one of "
                         f"{', '.join(DETECTION_DATASETS)}")
    defaults = DETECTION_DATASETS[name][1]
    train_split, test_split = train_split or defaults[0], test_split or defaults[1]
    train, test = (readers[name](root, split, min_size=min_size, max_size=max_size, cache=True)
                   for split in (train_split, test_split))
    if [c[1] for c in train.categories] != [c[1] for c in test.categories]:
        raise ValueError(f"{root}: the {train_split} and {test_split} annotations list "
                         "different categories")
    identity = {"name": name, "root": str(Path(root).expanduser().resolve()),
                "train_split": train_split, "test_split": test_split,
                "train_images": len(train), "test_images": len(test),
                "min_size": min_size, "max_size": max_size,
                "categories": _digest([c[1] for c in train.categories])}
    return TaskData(
        train=DetectionBatches(train, batch_size, seed=seed, flip=flip, rank=rank,
                               world_size=world_size),
        test=_evaluation_shard(DetectionBatches(test, test_batch_size, seed=seed,
                                                shuffle=False, drop_last=False),
                               rank, world_size),
        num_classes=train.num_classes, identity=identity,
        classes=[c[2] for c in train.categories])


def detection_method(name: str, kind: str, backbones: Sequence[str], num_classes: int, *,
                     teacher_weights: str | os.PathLike | None = None,
                     backbone_weights: Any = None,
                     detector_options: dict[str, Any] | None = None,
                     sskd: dict[str, Any] | None = None,
                     feature: dict[str, Any] | None = None,
                     **loss_options: Any) -> Method:
    """``name`` over torchvision detectors ``kind`` (``fasterrcnn`` / ``retinanet``) with
    ResNet-FPN ``backbones``; ``num_classes`` object classes (background added). ``ind``: each
    detector alone; ``sskd``: the first, a trained teacher, into the second stage by stage;
    ``fitnets`` / ``at`` / ``nst``: the second trained on its own losses + λ·transfer term from
    the first (:class:`~dcmkd.methods.feature_kd.FeatureKD`; λ = ``loss_options["beta"]``,
    ``feature`` the run config's ``feature`` section). ``teacher_weights``: the teacher
    detector's weights (an exported network or a run folder; the teacher is built with the
    normalisation they hold, :func:`_trained_norm`, unless ``detector_options`` names one);
    ``backbone_weights``: ImageNet ResNet weights, one for every network or the student, or
    one per network (:func:`backbone_weights_per_network`)."""
    from dcmkd.methods.builders import FeatureOptions, SSKDOptions, _used_loss_options
    from dcmkd.options import build
    from dcmkd.methods.feature_kd import FEATURE_METHODS, FeatureKD
    from dcmkd.methods.sskd import SSKD
    from dcmkd.methods.supervised import Supervised
    from dcmkd.methods.teacher import load_pretrained
    from dcmkd.models.detection import build_detector
    from dcmkd.tasks.detection import Detection, DetectorNetwork

    methods = ("ind", "sskd", *FEATURE_METHODS)
    if name not in methods:
        raise ValueError(f"method '{name}' is not built for detectors ({', '.join(methods)}); "
                         "KD does not apply to detection (SSKD paper, Tables 8–9)")
    loss = _used_loss_options(name, loss_options) if name in FEATURE_METHODS else {}
    given = sorted(k for k, v in loss_options.items() if (k, v) != ("rampup", "auto"))
    if name not in FEATURE_METHODS and given:   # (rampup: auto, the config's, ramps nothing)
        raise ValueError(f"loss.{given[0]} does not apply to '{name}' on detectors (they "
                         "train on their own losses)")
    if loss.get("label_smoothing"):
        raise ValueError(f"loss.label_smoothing does not apply to '{name}' on detectors "
                         "(they train on their own losses)")
    weights = backbone_weights_per_network(backbone_weights, name, backbones)
    options = [dict(detector_options or {}) for _ in backbones]
    if name != "ind" and teacher_weights is not None and "norm" not in options[0]:
        options[0]["norm"] = _trained_norm(teacher_weights)
    nets = []
    for i, (backbone, w) in enumerate(zip(backbones, weights)):
        try:
            nets.append(DetectorNetwork(build_detector(kind, backbone, num_classes + 1,
                                                       backbone_weights=w, **options[i])))
        except TypeError as e:   # torchvision's detector refuses a keyword
            raise ValueError(f"task.detector_options: {e}") from None
        except (ValueError, FileNotFoundError) as e:
            if w is None:
                raise
            raise type(e)(f"backbone_weights of network {i} ({kind} {backbone}): {e}") from None
    task = Detection()
    if name == "ind":
        method = Supervised(nets, task)
        method.name = "ind"
        return method
    if len(nets) != 2:
        raise ValueError(f"{name} needs 2 detectors (teacher, student), got {len(nets)}")
    if teacher_weights is not None:
        load_pretrained(nets[0].detector, teacher_weights)
    else:
        warnings.warn(f"'{name}' without teacher_weights: the teacher is untrained",
                      stacklevel=2)
    if name == "sskd":
        method = SSKD(nets[0], nets[1], **asdict(build(SSKDOptions, sskd, "sskd")))
    else:
        method = FeatureKD(nets[0], nets[1], name, loss["beta"],
                           **asdict(build(FeatureOptions, feature, "feature")))
    method.name, method.task = name, task
    return method


__all__ = ["TaskData", "face_data", "face_method", "detection_data", "detection_method",
           "backbone_weights_per_network", "resolve_task_section", "DETECTION_DATASETS",
           "FACE_MEAN", "FACE_STD"]
