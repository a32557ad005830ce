"""Feature-map distillation losses: FitNets hints, attention transfer (AT) and NST, and the
detection-distillation mimic variants SSKD offers on detectors (PKD's Pearson imitation, the
fine-grained imitation mask of Wang et al. 2019).

These are the feature-based baselines of the SSKD paper (sskd-paper.md, "Settings for
Competitors"; SPEC §4): ``L = CE + λ · L_feat`` with λ = 100 (FitNets), 50 (AT), 1000 (NST) on
CIFAR-100 and 10 / 10 / 100 on ImageNet. Feature maps are ``(N, C, H, W)`` tensors.

Conventions shared by every loss here:

- the teacher feature is the target and is detached inside the loss;
- losses are computed in float32 (bf16/fp16 inputs are upcast) and returned as float32 scalars;
- where a loss compares maps of different spatial size (AT, NST), the larger map is reduced to
  the smaller one with adaptive average pooling, per spatial dimension, *before* the
  attention/selectivity statistics are computed (**reading**, the convention of the public
  re-implementations, e.g. RepDistiller; neither paper specifies it). In SSKD's setting student
  and teacher stage outputs have equal resolution, so this path is only a fallback.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "HintRegressor",
    "hint_loss",
    "pearson_normalize",
    "pearson_loss",
    "imitation_mask",
    "masked_hint_loss",
    "attention_map",
    "attention_transfer_loss",
    "nst_loss",
    "nst_loss_multi",
]

_EPS = 1e-12


def _check_4d(name: str, x: Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"{name} must be a (N, C, H, W) feature map, got shape {tuple(x.shape)}")


def _match_spatial(student_feat: Tensor, teacher_feat: Tensor) -> tuple[Tensor, Tensor]:
    """Adaptive-average-pool whichever map is larger (per dimension) to the common smaller size."""
    _check_4d("student_feat", student_feat)
    _check_4d("teacher_feat", teacher_feat)
    if student_feat.shape[0] != teacher_feat.shape[0]:
        raise ValueError(
            f"batch sizes differ: {student_feat.shape[0]} vs {teacher_feat.shape[0]}"
        )
    size = (
        min(student_feat.shape[2], teacher_feat.shape[2]),
        min(student_feat.shape[3], teacher_feat.shape[3]),
    )
    if tuple(student_feat.shape[2:]) != size:
        student_feat = F.adaptive_avg_pool2d(student_feat, size)
    if tuple(teacher_feat.shape[2:]) != size:
        teacher_feat = F.adaptive_avg_pool2d(teacher_feat, size)
    return student_feat, teacher_feat


def _reduce(losses: list[Tensor], reduction: str) -> Tensor:
    if not losses:
        raise ValueError("need at least one (student, teacher) feature pair")
    total = torch.stack(losses)
    if reduction == "mean":
        return total.mean()
    if reduction == "sum":
        return total.sum()
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


def _pairs(student_feats: Sequence[Tensor] | Tensor, teacher_feats: Sequence[Tensor] | Tensor):
    if isinstance(student_feats, Tensor):
        student_feats = [student_feats]
    if isinstance(teacher_feats, Tensor):
        teacher_feats = [teacher_feats]
    if len(student_feats) != len(teacher_feats):
        raise ValueError(
            f"{len(student_feats)} student features vs {len(teacher_feats)} teacher features"
        )
    return list(zip(student_feats, teacher_feats))


# --------------------------------------------------------------------------------------------
# FitNets (Romero et al. 2015)
# --------------------------------------------------------------------------------------------
class HintRegressor(nn.Module):
    """FitNets regressor ``r(·; W_r)`` mapping the student's guided layer to the teacher's hint.

    **Reading**: a 1×1 convolution (no bias) from ``student_channels`` to ``teacher_channels``
    followed by BatchNorm, as in the common CIFAR re-implementations; FitNets (Romero et al.
    2015, §2.2) uses a convolutional regressor, and SPEC §4 asks for a 1×1 conv on the student
    side (training only: the regressor is discarded after training). With
    ``always_project=False`` and equal channel counts the regressor is the identity (only the
    resize is applied), the "conv only when channels differ" rule of SPEC §4 for SSKD.

    Spatial mismatch (**reading**): when ``size`` (the teacher's ``(H, W)``) is given and differs
    from the student map, the student map is resized *before* the projection: adaptive average
    pooling when it is at least as large in both dimensions, bilinear interpolation
    (``align_corners=False``) otherwise. Both commute with a 1×1 convolution, so the order only
    saves compute.
    """

    def __init__(self, student_channels: int, teacher_channels: int, always_project: bool = True) -> None:
        super().__init__()
        if student_channels < 1 or teacher_channels < 1:
            raise ValueError("channel counts must be positive")
        self.student_channels = student_channels
        self.teacher_channels = teacher_channels
        self.proj: nn.Module
        if always_project or student_channels != teacher_channels:
            self.proj = nn.Sequential(
                nn.Conv2d(student_channels, teacher_channels, kernel_size=1, bias=False),
                nn.BatchNorm2d(teacher_channels),
            )
        else:
            self.proj = nn.Identity()

    def forward(self, student_feat: Tensor, size: Sequence[int] | None = None) -> Tensor:
        """Project ``student_feat`` (N, C_s, H, W) to (N, C_t, *size) (``size`` default: unchanged)."""
        _check_4d("student_feat", student_feat)
        if student_feat.shape[1] != self.student_channels:
            raise ValueError(
                f"expected {self.student_channels} student channels, got {student_feat.shape[1]}"
            )
        if size is not None:
            size = (int(size[0]), int(size[1]))
            h, w = student_feat.shape[2], student_feat.shape[3]
            if (h, w) != size:
                if h >= size[0] and w >= size[1]:
                    student_feat = F.adaptive_avg_pool2d(student_feat, size)
                else:
                    student_feat = F.interpolate(
                        student_feat, size=size, mode="bilinear", align_corners=False
                    )
        return self.proj(student_feat)


def hint_loss(student_feat: Tensor, teacher_feat: Tensor) -> Tensor:
    """FitNets hint loss (Romero et al. 2015, Eq. 3: ``½‖u_h(x) − r(v_g(x))‖²``).

    ``student_feat`` is the regressed student map ``r(v_g(x))`` (see :class:`HintRegressor`) and
    must have the teacher's shape. **Reading** of the normalisation: mean squared error over all
    ``N·C·H·W`` elements (no ½), as in RepDistiller's FitNets; the SSKD weights (λ = 100 on
    CIFAR-100, 10 on ImageNet) are of the order that suits this per-element mean. The same
    distance serves SSKD's per-stage ``ψ(f^T, f^S) = ‖f^T − f^S‖²`` (SPEC §4).
    """
    if student_feat.shape != teacher_feat.shape:
        raise ValueError(
            f"hint_loss needs equal shapes (regress/resize the student first): "
            f"{tuple(student_feat.shape)} vs {tuple(teacher_feat.shape)}"
        )
    diff = student_feat.float() - teacher_feat.detach().float()
    return diff.pow(2).mean()


# --------------------------------------------------------------------------------------------
# PKD (Cao et al. 2022) and fine-grained feature imitation (Wang et al. 2019)
# --------------------------------------------------------------------------------------------
def pearson_normalize(feat: Tensor, eps: float = 1e-6) -> Tensor:
    """A feature map normalised to zero mean and unit variance per channel, PKD's normalisation
    (Cao et al., "PKD: General Distillation Framework for Object Detectors via Pearson
    Correlation Coefficient", NeurIPS 2022): "we first normalize the feature maps to have zero
    mean and unit variances".

    **Reading** of the axes and the estimator (the paper's text gives neither): those of the
    authors' public implementation (OpenMMLab MMRazor, ``PKDLoss.norm``): each channel over all
    ``N·H·W`` values of the batch, the unbiased standard deviation (divisor ``n − 1``), ``eps``
    added to it. A channel of a single value (``n = 1``) has variance 0 here (normalised to 0)
    instead of the undefined unbiased estimate. Returns float32 ``(C, N·H·W)``.
    """
    _check_4d("feat", feat)
    f = feat.float().transpose(0, 1).flatten(1)
    centred = f - f.mean(dim=1, keepdim=True)
    var = centred.pow(2).sum(dim=1, keepdim=True) / max(f.shape[1] - 1, 1)
    return centred / (var.sqrt() + eps)


def pearson_loss(student_feat: Tensor, teacher_feat: Tensor) -> Tensor:
    """PKD's feature imitation loss (Cao et al. 2022): the MSE of the normalised maps
    (:func:`pearson_normalize`) halved, ``L = 1/(2n) Σ_i (ŝ_i − t̂_i)²`` over the ``n =
    N·C·H·W`` values, which is ``1 − r`` (r: Pearson's correlation of the two maps, averaged
    over channels) up to the factor ``(m − 1)/m`` of the unbiased estimate (``m = N·H·W``) and
    ``eps``. It ignores each channel's scale and shift, so the student's magnitudes are free.

    ``student_feat`` is the adapted student map (the teacher's shape), the teacher detached.
    """
    if student_feat.shape != teacher_feat.shape:
        raise ValueError(
            f"pearson_loss needs equal shapes (adapt/resize the student first): "
            f"{tuple(student_feat.shape)} vs {tuple(teacher_feat.shape)}"
        )
    diff = pearson_normalize(student_feat) - pearson_normalize(teacher_feat.detach())
    return diff.pow(2).mean() / 2


def imitation_mask(anchors: Tensor, boxes: Sequence[Tensor], psi: float = 0.5) -> Tensor:
    """The fine-grained imitation mask of Wang et al., "Distilling Object Detectors with
    Fine-grained Feature Imitation" (CVPR 2019, §3, imitation region estimation): for each
    ground-truth box, the IoU of every anchor at every location (the ``W×H×K`` IoU map ``m``),
    the threshold ``F = ψ·max(m)``, the locations with an anchor of IoU above ``F``; the mask
    ``I`` is their union over the image's boxes. ψ = 0.5 is the paper's default.

    ``anchors``: ``(H, W, K, 4)`` boxes ``(x1, y1, x2, y2)`` of one feature map (the same for
    every image of a batch); ``boxes``: per image, an ``(M, 4)`` tensor in the same coordinates
    (an image without boxes gives an empty mask). **Reading**: "larger than F" is strict, as in
    the authors' code (so a box whose best IoU is 0 marks nothing). Returns a float32
    ``(N, 1, H, W)`` mask of 0/1.
    """
    from torchvision.ops import box_iou

    if anchors.dim() != 4 or anchors.shape[-1] != 4:
        raise ValueError(f"anchors must be (H, W, K, 4), got shape {tuple(anchors.shape)}")
    h, w, k, _ = anchors.shape
    flat = anchors.reshape(-1, 4).float()
    masks = []
    for b in boxes:
        if len(b) == 0:
            masks.append(flat.new_zeros(h, w, dtype=torch.bool))
            continue
        iou = box_iou(b.reshape(-1, 4).float().to(flat.device), flat)    # (M, H·W·K)
        above = iou > psi * iou.max(dim=1, keepdim=True).values
        masks.append(above.any(dim=0).view(h, w, k).any(dim=2))
    return torch.stack(masks).unsqueeze(1).float()


def masked_hint_loss(student_feat: Tensor, teacher_feat: Tensor, mask: Tensor) -> Tensor:
    """Wang et al. 2019's imitation loss (§3, fine-grained feature imitation):
    ``L = 1/(2·N_p) Σ_{i,j,c} I_ij (s_ijc − t_ijc)²``, ``N_p = Σ I_ij``, with the student map
    after its adapter. ``mask``: ``(N, 1, H, W)`` (:func:`imitation_mask`). **Readings**: over
    a batch both sums run over its images, as in the authors' code (``N_p``: the batch's
    masked locations, not multiplied by the channels); a batch with no masked location gives 0
    (the code would divide by zero), still a function of the student so the step runs.
    """
    if student_feat.shape != teacher_feat.shape:
        raise ValueError(
            f"masked_hint_loss needs equal shapes (adapt/resize the student first): "
            f"{tuple(student_feat.shape)} vs {tuple(teacher_feat.shape)}"
        )
    n, _, h, w = student_feat.shape
    if tuple(mask.shape) != (n, 1, h, w):
        raise ValueError(f"mask must be {(n, 1, h, w)}, got {tuple(mask.shape)}")
    m = mask.float()
    diff = student_feat.float() - teacher_feat.detach().float()
    return (diff.pow(2) * m).sum() / (2 * m.sum().clamp_min(1.0))


# --------------------------------------------------------------------------------------------
# Attention transfer (Zagoruyko & Komodakis 2017)
# --------------------------------------------------------------------------------------------
def attention_map(feat: Tensor, p: float = 2) -> Tensor:
    """Activation-based spatial attention ``Q = vec(F(A)) / ‖vec(F(A))‖₂`` (AT paper §3.1).

    ``F(A) = (1/C) Σ_c |A_c|^p`` (the paper's ``F^p_sum`` divided by C, as in the official code;
    the constant disappears in the L2 normalisation). Returns a float32 ``(N, H·W)`` tensor whose
    rows have unit L2 norm (rows of an all-zero map stay zero).
    """
    _check_4d("feat", feat)
    q = feat.float().abs().pow(p).mean(dim=1).flatten(1)
    return q / q.norm(p=2, dim=1, keepdim=True).clamp_min(_EPS)


def attention_transfer_loss(
    student_feats: Sequence[Tensor],
    teacher_feats: Sequence[Tensor],
    p: float = 2,
    reduction: str = "sum",
) -> Tensor:
    """Attention-transfer loss (Zagoruyko & Komodakis 2017, §3.1).

    The paper's term is ``β/2 Σ_j ‖Q_S^j − Q_T^j‖`` over layer pairs ``j`` with normalised
    attention maps ``Q`` (:func:`attention_map`), "β = 10³ divided by the number of elements in
    the attention map and batch size". Per pair this returns ``mean((Q_S − Q_T)²)`` (squared
    difference averaged over ``N·H·W``: the division of β), summed over pairs (``"mean"``
    averages them); the caller multiplies by β/2 (:class:`dcmkd.methods.feature_kd.FeatureKD`:
    β = the SSKD loss weight λ). Maps of different spatial size are pooled to the smaller one
    before the attention is computed (module note).
    """
    losses = []
    for s, t in _pairs(student_feats, teacher_feats):
        s, t = _match_spatial(s, t.detach())
        losses.append((attention_map(s, p) - attention_map(t, p)).pow(2).mean())
    return _reduce(losses, reduction)


# --------------------------------------------------------------------------------------------
# Neuron selectivity transfer (Huang & Wang 2017)
# --------------------------------------------------------------------------------------------
def _channel_vectors(feat: Tensor) -> Tensor:
    """(N, C, H, W) → float32 (N, C, H·W), each channel's spatial response L2-normalised."""
    f = feat.float().flatten(2)
    return f / f.norm(p=2, dim=2, keepdim=True).clamp_min(_EPS)


def _mean_poly_kernel(a: Tensor, b: Tensor, degree: int, c: float) -> Tensor:
    """Per-sample mean of ``k(a_i, b_j) = (a_iᵀ b_j + c)^d`` over all channel pairs → (N,)."""
    return (torch.bmm(a, b.transpose(1, 2)) + c).pow(degree).mean(dim=(1, 2))


def nst_loss(student_feat: Tensor, teacher_feat: Tensor, degree: int = 2, c: float = 0.0) -> Tensor:
    """Neuron-selectivity-transfer loss: squared MMD between channel responses (Huang & Wang 2017).

    Each channel ``k`` of a map gives one sample ``f^{k·} / ‖f^{k·}‖₂ ∈ R^{HW}`` (its spatial
    response, L2-normalised); the paper's ``L_MMD²`` (NST §3) between the teacher's ``C_T`` and
    the student's ``C_S`` samples is

        1/C_T² Σ_{i,i'} k(f_T^i, f_T^i') + 1/C_S² Σ_{j,j'} k(f_S^j, f_S^j') − 2/(C_T C_S) Σ_{i,j} k(f_S^j, f_T^i)

    with the polynomial kernel ``k(x, y) = (xᵀy + c)^d``, ``d = 2``, ``c = 0`` (the paper's
    "NST (poly)" setting used by the SSKD baseline). **Readings**: MMD² is computed per sample and
    averaged over the batch; the teacher-only term is kept (it is constant for the student, so
    the value reads 0 on a perfect match). The paper's ``λ/2`` factor is applied by the caller
    (:class:`dcmkd.methods.feature_kd.FeatureKD`).
    Channel counts may differ; spatial sizes are matched by pooling (module note).
    """
    s, t = _match_spatial(student_feat, teacher_feat.detach())
    s, t = _channel_vectors(s), _channel_vectors(t)
    mmd2 = (
        _mean_poly_kernel(t, t, degree, c)
        + _mean_poly_kernel(s, s, degree, c)
        - 2.0 * _mean_poly_kernel(s, t, degree, c)
    )
    return mmd2.mean()


def nst_loss_multi(
    student_feats: Sequence[Tensor],
    teacher_feats: Sequence[Tensor],
    degree: int = 2,
    c: float = 0.0,
    reduction: str = "sum",
) -> Tensor:
    """:func:`nst_loss` over several (student, teacher) stage pairs (SSKD: the 4 stage outputs),
    summed (the multi-layer NST loss; ``reduction="mean"`` averages them)."""
    losses = [nst_loss(s, t, degree=degree, c=c) for s, t in _pairs(student_feats, teacher_feats)]
    return _reduce(losses, reduction)
