"""Classification heads for face embeddings: softmax, ArcFace and CosFace.

The training loss is the ordinary cross-entropy of the returned logits; the margin heads change
the target logit only while training (when ``labels`` are given). At test time a face model uses
the embedding alone (the SSKD paper, Table 7: "only the output feature will be used for
testing"), so the head matters only through what it teaches the embedding.

References
- ArcFace: J. Deng, J. Guo, N. Xue, S. Zafeiriou, "ArcFace: Additive Angular Margin Loss for
  Deep Face Recognition", CVPR 2019, Eq. 3; s = 64, m = 0.5 (their Sec. 3 settings).
- CosFace: H. Wang et al., "CosFace: Large Margin Cosine Loss for Deep Face Recognition",
  CVPR 2018, Eq. 4; s = 64, m = 0.35 (the setting of their main experiments).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

#: head kinds understood by :class:`MarginHead`
HEAD_KINDS = ("softmax", "arcface", "cosface")
#: the papers' defaults: (s, m)
ARCFACE_DEFAULTS = (64.0, 0.5)
COSFACE_DEFAULTS = (64.0, 0.35)


def _check(cos: torch.Tensor, labels: torch.Tensor, s: float, m: float) -> None:
    if cos.dim() != 2:
        raise ValueError(f"cosines must be [batch, classes], got shape {tuple(cos.shape)}")
    if labels.shape != (cos.shape[0],):
        raise ValueError(f"labels must be [batch] = [{cos.shape[0]}], got {tuple(labels.shape)}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= cos.shape[1]):
        raise ValueError(f"labels must lie in 0..{cos.shape[1] - 1}, got "
                         f"{int(labels.min())}..{int(labels.max())}")
    if not s > 0:
        raise ValueError(f"scale s must be > 0, got {s}")
    if not m >= 0:
        raise ValueError(f"margin m must be >= 0, got {m}")


def arcface_logits(cos: torch.Tensor, labels: torch.Tensor, s: float = 64.0, m: float = 0.5,
                   easy_margin: bool = False) -> torch.Tensor:
    """ArcFace logits (Deng et al., CVPR 2019, Eq. 3): ``s * cos(theta_y + m)`` for the target
    class, ``s * cos(theta_j)`` for the others, ``cos`` being cosines in [-1, 1].

    ``theta + m > pi``: the paper's Eq. 3 is silent; cos(theta + m) is no longer decreasing in
    theta there, which would reward moving away from the class centre. We follow the authors'
    reference code (insightface, ``recognition/arcface_torch/losses.py``, ``easy_margin`` off):
    where ``cos theta <= cos(pi - m)`` the target logit is ``cos theta - m sin(pi - m)``
    (= ``cos theta - m sin m``), a monotone fall-back. ``easy_margin=True`` is the code's other
    option: the margin only where ``cos theta > 0``, plain ``cos theta`` elsewhere.
    """
    _check(cos, labels, s, m)
    if not m < math.pi:
        raise ValueError(f"ArcFace margin m must be below pi, got {m}")
    cos = cos.clamp(-1.0, 1.0)
    target = cos.gather(1, labels[:, None])
    # sin(theta) >= 0 for theta in [0, pi]; the floor keeps the gradient finite at |cos| = 1
    sin = (1.0 - target * target).clamp_min(1e-12).sqrt()
    with_margin = target * math.cos(m) - sin * math.sin(m)  # cos(theta + m)
    if easy_margin:
        new_target = torch.where(target > 0, with_margin, target)
    else:
        new_target = torch.where(target > math.cos(math.pi - m), with_margin,
                                 target - m * math.sin(math.pi - m))
    return s * cos.scatter(1, labels[:, None], new_target)


def cosface_logits(cos: torch.Tensor, labels: torch.Tensor, s: float = 64.0,
                   m: float = 0.35) -> torch.Tensor:
    """CosFace / large-margin cosine logits (Wang et al., CVPR 2018, Eq. 4):
    ``s * (cos theta_y - m)`` for the target class, ``s * cos theta_j`` for the others."""
    _check(cos, labels, s, m)
    cos = cos.clamp(-1.0, 1.0)
    target = cos.gather(1, labels[:, None]) - m
    return s * cos.scatter(1, labels[:, None], target)


class MarginHead(nn.Module):
    """The classifier of a face-embedding network, trained with cross-entropy on its logits.

    - ``"softmax"``: a plain ``nn.Linear(embedding_dim, num_classes)`` with bias.
    - ``"arcface"`` / ``"cosface"``: cosines between the L2-normalised embedding and the
      L2-normalised class weights (no bias, Deng et al. Sec. 2.1 / Wang et al. Sec. 3.2),
      scaled by ``s``; with ``labels`` the target logit gets the margin (:func:`arcface_logits`,
      :func:`cosface_logits`), without labels (evaluation) it is ``s * cos`` for every class.

    ``s`` and ``m`` default to the papers' values (ArcFace 64, 0.5; CosFace 64, 0.35); the class
    weights start from N(0, 0.01^2) as in insightface's ``arcface_torch`` (our choice: the papers
    do not say).
    """

    def __init__(self, embedding_dim: int, num_classes: int, kind: str = "arcface",
                 s: float | None = None, m: float | None = None,
                 easy_margin: bool = False) -> None:
        super().__init__()
        if kind not in HEAD_KINDS:
            raise ValueError(f"unknown face head {kind!r}; expected one of {', '.join(HEAD_KINDS)}")
        for name, v in (("embedding_dim", embedding_dim), ("num_classes", num_classes)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        self.kind = kind
        self.embedding_dim, self.num_classes = embedding_dim, num_classes
        self.easy_margin = easy_margin
        if kind == "softmax":
            if m not in (None, 0, 0.0):
                raise ValueError(f"the softmax head has no margin, got m={m}")
            self.s, self.m = 1.0, 0.0
            self.fc = nn.Linear(embedding_dim, num_classes, bias=True)
            return
        s0, m0 = ARCFACE_DEFAULTS if kind == "arcface" else COSFACE_DEFAULTS
        self.s = float(s0 if s is None else s)
        self.m = float(m0 if m is None else m)
        if not self.s > 0:
            raise ValueError(f"scale s must be > 0, got {self.s}")
        if not 0 <= self.m < (math.pi if kind == "arcface" else 2.0):
            raise ValueError(f"{kind} margin m out of range, got {self.m}")
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_dim).normal_(0.0, 0.01))

    def cosines(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Cosine of the angle between each embedding and each class weight, ``[B, classes]``."""
        return F.linear(F.normalize(embeddings, dim=1), F.normalize(self.weight, dim=1))

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_dim:
            raise ValueError(f"{self.kind} head expects embeddings [batch, {self.embedding_dim}], "
                             f"got {tuple(embeddings.shape)}")
        if self.kind == "softmax":
            return self.fc(embeddings)
        cos = self.cosines(embeddings)
        if labels is None:
            return self.s * cos
        if self.kind == "arcface":
            return arcface_logits(cos, labels, self.s, self.m, self.easy_margin)
        return cosface_logits(cos, labels, self.s, self.m)

    def extra_repr(self) -> str:
        if self.kind == "softmax":
            return f"kind=softmax, {self.embedding_dim} -> {self.num_classes}"
        return (f"kind={self.kind}, {self.embedding_dim} -> {self.num_classes}, s={self.s}, "
                f"m={self.m}" + (", easy_margin" if self.easy_margin else ""))
