"""Face recognition (SSKD paper Table 7): networks are trained as classifiers of the training
identities and evaluated open-set, on the embeddings of identities never seen in training.

- **Batch**: ``(images [B,3,H,W], identity labels [B])``, as classification.
- **Network**: a zoo backbone whose head is :class:`FaceHead`: global average pooling (the
  *output feature*), then the identity classifier (:class:`~dcmkd.losses.margin.MarginHead`:
  ``softmax``, ``cosface`` or ``arcface``). **Reading** (the paper: "only the output feature is
  used at test time, so the task-head is not tuned"): the output feature is the pooled last
  stage, so SSKD's stages alone determine it, and the classifier is a training-only task head.
- **Training loss** (:meth:`Face.criterion`): cross-entropy of the classifier's logits; for the
  margin heads the logits are ``s·cos θ`` and the margin is applied to the target's logit here,
  CosFace (Wang et al., CVPR 2018, Eq. 4) or ArcFace (Deng et al., CVPR 2019, Eq. 3). Every
  method (ind, kd, sskd, …) therefore trains a face network unchanged; KD (the paper's KD row)
  distils the teacher's identity posteriors ``softmax(z / T)`` of the margin-free logits
  (Hinton et al. 2015) into the student's, beside the student's own supervised loss.
- **Evaluation** (:meth:`Face.evaluate`): each network's L2-normalised output features of the
  test images; verification TAR at FAR = 1% and 0.1% over every pair, identification Rank-1 and
  Rank-5 with each identity's first image as its gallery entry
  (:func:`~dcmkd.metrics.face.evaluate_face`). Keys ``test/net{n}/face/{metric}`` (percent); a
  TAR at a FAR smaller than one over the test set's impostor pairs is not measured (no key;
  ``null`` in the summary). The headline of a run is Rank-1.
- **IJB-A** (``task.ijba``, the paper's Table 7 protocol): the test batches are IJB-A's faces
  (:func:`~dcmkd.tasks.build.ijba_test_data`) and carry an :class:`IjbaEvaluation`; each
  network's features are pooled into templates and scored on every split
  (:func:`~dcmkd.metrics.face.evaluate_ijba_splits`): ``test/net{n}/face/{metric}`` is the mean
  over the splits and ``test/net{n}/face/{metric}_std`` their standard deviation (the paper's
  "mean ± std over IJB-A's 10 splits").
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

from dcmkd.losses.margin import MarginHead, arcface_logits, cosface_logits
from dcmkd.tasks.base import (Evaluation, Task, batches_of, computed_once,
                              gather_batches)
from dcmkd.tasks.classification import Classification

HEADS = ("softmax", "cosface", "arcface")
#: the metrics of :func:`dcmkd.metrics.face.evaluate_face`, in table order (SSKD Table 7)
FACE_METRICS = ("tar@far=0.01", "tar@far=0.001", "rank1", "rank5")


def face_key(net: int, metric: str, prefix: str = "test") -> str:
    return f"{prefix}/net{net}/face/{metric}"


@dataclass(frozen=True)
class IjbaEvaluation:
    """How IJB-A test batches are scored: the protocol folder, the splits, the metadata's key
    kind (``"sighting"`` or ``"file"``) and the key of each test image, in order (its label)."""

    root: str
    splits: tuple[int, ...]
    key: str
    keys: tuple[str, ...]


class IjbaBatches:
    """Test batches (a :class:`~dcmkd.data.loader.DeviceLoader` of IJB-A faces, labels their
    positions) with the :class:`IjbaEvaluation` that scores them (``.ijba``)."""

    def __init__(self, batches: Any, ijba: IjbaEvaluation):
        self.batches, self.ijba = batches, ijba

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Any]:
        return self.batches.epoch(epoch, start_batch)

    def __iter__(self) -> Iterator[Any]:
        return self.epoch(0)

    def __len__(self) -> int:
        return len(self.batches)

    def __getattr__(self, name: str) -> Any:
        if name == "batches":   # not set yet (copy, unpickling)
            raise AttributeError(name)
        return getattr(self.batches, name)


class FaceHead(nn.Module):
    """Global average pooling, then the identity classifier. A zoo backbone's head is replaced
    by it (:func:`make_face_network`).

    The output feature (:meth:`embed`) is the pooled last stage (the default, the module note's
    reading of the paper), or with ``embedding=D`` a D-dimensional **embedding layer** after the
    pooling: BatchNorm, fully connected, BatchNorm (``task.embedding``). A **choice** after the
    order of ArcFace's output "E" (BN-Dropout-FC-BN, Deng et al., CVPR 2019, §4.2), which
    differs: E flattens the last 7×7 convolution map instead of pooling it (so it fixes the
    input size), has a dropout, and its last BN a fixed scale; pooling first works at any input
    size. The embedding layer belongs to the head, so SSKD trains it in its head phase; the
    run's ``embedding`` builds every network of it, a teacher included (a teacher trained
    without one cannot teach a run with one)."""

    def __init__(self, in_features: int, num_identities: int, kind: str = "softmax",
                 s: float | None = None, m: float | None = None, embedding: int | None = None):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.embedding = None if embedding is None else nn.Sequential(
            nn.BatchNorm1d(in_features), nn.Linear(in_features, embedding),
            nn.BatchNorm1d(embedding))
        width = in_features if embedding is None else embedding
        self.fc = MarginHead(width, num_identities, kind=kind, s=s, m=m)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.pool(x).flatten(1)
        return pooled if self.embedding is None else self.embedding(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.embed(x))   # margin-free logits; the margin is in Face.criterion


def make_face_network(backbone: nn.Module, num_identities: int, kind: str = "softmax",
                      s: float | None = None, m: float | None = None,
                      embedding: int | None = None) -> nn.Module:
    """``backbone`` (a zoo :class:`~dcmkd.models.base.Backbone`) with a :class:`FaceHead` over
    its last stage's channels (``embedding``: the width of an embedding layer, None: none)."""
    if kind not in HEADS:
        raise ValueError(f"face head '{kind}' is not one of {', '.join(HEADS)}")
    backbone.head = FaceHead(backbone.num_features, num_identities, kind, s, m, embedding)
    return backbone


class Face(Classification):
    """See the module note. ``head``/``s``/``m``: the identity classifier's kind and margin
    (defaults: the papers' s = 64 with m = 0.35 (CosFace) or 0.5 (ArcFace))."""

    name = "face"
    headline = "test_rank1"   # defined on any test set (a TAR at a FAR needs enough pairs)
    headline_label = "Rank-1"
    lower_is_better = False

    def __init__(self, head: str = "softmax", s: float | None = None, m: float | None = None):
        if head not in HEADS:
            raise ValueError(f"face head '{head}' is not one of {', '.join(HEADS)}")
        self.head = head
        probe = MarginHead(1, 1, kind=head, s=s, m=m)   # the head's own defaults
        self.s, self.m = getattr(probe, "s", None), getattr(probe, "m", None)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "head": self.head, "s": self.s, "m": self.m}

    def criterion(self, logits: torch.Tensor, targets: torch.Tensor,
                  label_smoothing: float = 0.0) -> torch.Tensor:
        """Cross-entropy with the head's margin on the target logit (module note)."""
        if self.head == "cosface":
            logits = cosface_logits(logits / self.s, targets, self.s, self.m)
        elif self.head == "arcface":
            logits = arcface_logits((logits / self.s).clamp(-1, 1), targets, self.s, self.m)
        return super().criterion(logits, targets, label_smoothing)

    @torch.no_grad()
    def evaluate(self, method: Any, batches: Any, ctx: Evaluation,
                 prefix: str = "test") -> dict[str, float]:
        """Open-set TAR@FAR and Rank-k of every network (module note).

        Under torchrun each rank embeds its own whole test batches (a
        :class:`~dcmkd.tasks.base.BatchShard`), the embeddings and labels are gathered to rank
        0 in the single-process order, and rank 0 computes the metrics once and gives them to
        every rank. **Choice** (over rank 0 embedding everything while the others wait): the
        ranks share the forward passes, which are the cost, while the pairs and the ranking,
        which span the whole test set, are scored once. The batches are the single-process
        ones and the order is restored (the gallery is each identity's *first* image), so the
        metrics are those of one process on the same weights."""
        from dcmkd.metrics.face import evaluate_face, evaluate_ijba_splits

        ijba: IjbaEvaluation | None = getattr(batches, "ijba", None)
        method.eval()
        mine: list[tuple[list[torch.Tensor], torch.Tensor]] = []
        for x, y in batches_of(batches, ctx):
            x, y = self.to_device(x, y, ctx.device, ctx.channels_last)
            with ctx.autocast():
                feats = [embed(net, x).float().cpu() for net in method.networks]
            mine.append((feats, y.cpu()))
        parts = gather_batches(mine, batches, ctx.dist)

        def metrics() -> dict[str, float]:
            assert parts is not None   # rank 0
            y_all = torch.cat([y for _, y in parts])
            out: dict[str, float] = {}
            for n in range(len(method.networks)):
                f = torch.cat([feats[n] for feats, _ in parts])
                if ijba is None:
                    scores = {k: (v, None) for k, v in evaluate_face(f, y_all).items()}
                else:   # label = the face's position in ijba.keys
                    by_key = {ijba.keys[i]: row for i, row in zip(y_all.tolist(), f.numpy())}
                    scores = evaluate_ijba_splits(by_key, ijba.root, ijba.splits, ijba.key)
                for k, (v, std) in scores.items():
                    if math.isfinite(v):   # a FAR beyond the impostor pairs: not measured
                        out[face_key(n, k, prefix)] = float(v)
                        if std is not None and math.isfinite(std):
                            out[face_key(n, f"{k}_std", prefix)] = float(std)
            return out

        return computed_once(ctx.dist, metrics)

    def network_metric(self, record: dict[str, Any], n: int,
                       prefix: str = "test") -> float | None:
        return record.get(face_key(n, "rank1", prefix))

    result_text = Task.result_text   # Rank-1 (%), not classification's top-1 error

    def summary(self, evaluated: list[dict[str, Any]], networks: int) -> dict[str, Any]:
        out = Task.summary(self, evaluated, networks)
        if out:
            last = evaluated[-1]
            out["test_face"] = [{k: last.get(face_key(n, k)) for k in FACE_METRICS}
                                for n in range(networks)]
            if any(face_key(0, f"{k}_std") in last for k in FACE_METRICS):   # IJB-A splits
                out["test_face_std"] = [{k: last.get(face_key(n, f"{k}_std"))
                                         for k in FACE_METRICS} for n in range(networks)]
        return out

    def epoch_text(self, record: dict[str, Any], networks: int) -> str | None:
        shown = []
        for n in range(networks):
            if face_key(n, "rank1") in record:
                tar = record.get(face_key(n, "tar@far=0.01"))
                shown.append(f"net{n} TAR@1% {'n/a' if tar is None else f'{tar:.1f}'} "
                             f"rank-1 {record[face_key(n, 'rank1')]:.1f}")
        return "test " + ", ".join(shown) if shown else None


def embed(network: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A network's output feature (:class:`FaceHead.embed` of its last stage)."""
    backbone = getattr(network, "backbone", network)
    head = backbone.head
    if not isinstance(head, FaceHead):
        raise ValueError(f"{type(backbone).__name__} has no face head: build it with "
                         "make_face_network (task: face)")
    return head.embed(backbone.forward_features(x))


__all__ = ["Face", "FaceHead", "make_face_network", "embed", "face_key", "FACE_METRICS",
           "HEADS", "IjbaBatches", "IjbaEvaluation"]
