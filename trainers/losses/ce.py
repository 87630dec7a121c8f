"""Cross-entropy and valence/arousal regression losses shared by the methods and the evaluator.

Items without a target are left out everywhere: class label ``-1``, an all-zero soft-label row, a NaN
valence/arousal value.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["classification_loss", "masked_cross_entropy", "va_loss"]


def masked_cross_entropy(logits: torch.Tensor, label: torch.Tensor, label_smoothing: float = 0.0,
                         reduction: str = "mean") -> torch.Tensor:
    """``F.cross_entropy`` (in fp32) over the items with a label (>= 0); ``reduction`` mean or sum."""
    valid = label >= 0
    return F.cross_entropy(logits.float()[valid], label[valid], label_smoothing=label_smoothing, reduction=reduction)


def classification_loss(logits: torch.Tensor, label: torch.Tensor, soft: torch.Tensor | None = None,
                        label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy against hard labels, or against the (normalised) soft-label distribution when given;
    averaged over the items that have a target; 0 when none has."""
    logits = logits.float()
    if soft is not None:
        mass = soft.sum(1)
        valid = mass > 0
        target = soft / mass.clamp_min(1e-12).unsqueeze(1)
        if label_smoothing > 0:
            target = target * (1 - label_smoothing) + label_smoothing / logits.shape[1]
        per = -(target * F.log_softmax(logits, 1)).sum(1)
    else:
        valid = label >= 0
        per = F.cross_entropy(logits, label.clamp_min(0), reduction="none", label_smoothing=label_smoothing)
    w = valid.float()
    return (per * w).sum() / w.sum().clamp_min(1.0)


def va_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the finite valence/arousal targets."""
    ok = torch.isfinite(target)
    diff = torch.where(ok, pred.float() - torch.nan_to_num(target), torch.zeros_like(pred, dtype=torch.float32))
    return (diff ** 2).sum() / ok.sum().clamp_min(1)
