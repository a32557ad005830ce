"""Distillation losses: soft targets (KD, DML, DCM) and feature baselines (FitNets, AT, NST)."""
from __future__ import annotations

from dcmkd.losses.features import (
    HintRegressor,
    attention_map,
    attention_transfer_loss,
    hint_loss,
    nst_loss,
    nst_loss_multi,
)
from dcmkd.losses.functional import dcm_loss, dml_loss
from dcmkd.losses.mutual import LINK_PATTERNS, LinkMatrix, MutualLoss, mutual_distillation_loss
from dcmkd.losses.soft_targets import hinton_kd_loss, kl_divergence, soft_cross_entropy

__all__ = [
    "LINK_PATTERNS",
    "LinkMatrix",
    "MutualLoss",
    "mutual_distillation_loss",
    "dcm_loss",
    "dml_loss",
    "soft_cross_entropy",
    "kl_divergence",
    "hinton_kd_loss",
    "HintRegressor",
    "hint_loss",
    "attention_map",
    "attention_transfer_loss",
    "nst_loss",
    "nst_loss_multi",
]
