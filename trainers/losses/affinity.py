"""ECAN's multi-view affinity (MVA) loss (papers/ecan.md, section 3.3, eqs. 8-10; METHODS.md section 2),
built on DAN's affinity loss (Wen et al., "Distract your attention", eq. 8 here).

- eq. 8, affinity: ``L_af = sum_i ||x_i - c_{y_i}||^2 / sigma_c^2`` with ``sigma_c^2`` the variance between
  the class centres: per feature dimension over the K centres, summed over the dimensions (DAN's code:
  ``centers.var(dim=0).sum()``, torch's unbiased variance). The centres are a learnable parameter (trained
  by the optimiser through this loss, as in DAN); dividing by their spread keeps the loss from being
  lowered by shrinking all centres together.
- eq. 9: ``alpha = 1 + (1/V) sum_v (L_af_v - mean_v L_af_v)^2`` over V feature groups: the current batch's
  features and V - 1 past groups from the memory bank, each measured against the current centres.
- eq. 10: ``L_mva = alpha * L_af`` of the current batch. The past groups "cannot directly optimize the
  network weights ... we treat them as an adjustment coefficient": ``alpha`` carries no gradient, and the
  gradient is the current group's affinity loss scaled by ``alpha``.

Also eq. 7, Wen et al.'s centre loss ``1/(2m) sum_i ||x_i - c_{y_i}||^2`` (Table 3's "Center" row), on the same
squared distances.

The paper sums over the m items (eq. 8); DAN's code divides by the batch size. ``reduction`` chooses
(``"mean"``: DAN's); the method states which it uses. Items labelled < 0 are left out.
"""
from __future__ import annotations

from typing import Literal, Sequence

import torch

__all__ = ["affinity_loss", "centre_loss", "centre_spread", "mva_loss"]

Reduction = Literal["mean", "sum"]


def centre_spread(centres: torch.Tensor) -> torch.Tensor:
    """``sigma_c^2`` of eq. 8: the (unbiased) variance of the centres over classes, summed over dimensions."""
    return centres.float().var(dim=0).sum()


def _sq_distances(x: torch.Tensor, labels: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """``||x_i - c_{y_i}||^2`` of the labelled items (labels >= 0), float32."""
    keep = labels >= 0
    return (x[keep].float() - centres.float()[labels[keep].long()]).pow(2).sum(1)


def centre_loss(x: torch.Tensor, labels: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Eq. 7: ``1/(2m) sum_i ||x_i - c_{y_i}||^2`` over the labelled items (0 with gradient when none)."""
    d2 = _sq_distances(x, labels, centres)
    return 0.5 * d2.mean() if d2.numel() else centres.float().sum() * 0.0


def affinity_loss(x: torch.Tensor, labels: torch.Tensor, centres: torch.Tensor,
                  reduction: Reduction = "mean") -> torch.Tensor:
    """Eq. 8 for one feature group ``x`` ``(m, d)`` against ``centres`` ``(K, d)``."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if centres.shape[0] < 2:
        raise ValueError("the affinity loss needs at least 2 class centres (their variance divides it)")
    d2 = _sq_distances(x, labels, centres)
    if d2.numel() == 0:
        return centres.float().sum() * 0.0
    total = d2.sum() if reduction == "sum" else d2.mean()
    return total / centre_spread(centres)


def mva_loss(x: torch.Tensor, labels: torch.Tensor, centres: torch.Tensor,
             past: Sequence[tuple[torch.Tensor, torch.Tensor]] = (),
             reduction: Reduction = "mean") -> tuple[torch.Tensor, torch.Tensor]:
    """Eqs. 9-10: ``(L_mva, alpha)`` for the current group ``x``/``labels`` and the ``past`` groups (each
    ``(features, labels)`` from the memory bank, V - 1 of them; none: ``alpha = 1``, the affinity loss)."""
    current = affinity_loss(x, labels, centres, reduction)
    with torch.no_grad():
        values = [current.detach()] + [affinity_loss(f.detach(), lab, centres.detach(), reduction) for f, lab in past]
        v = torch.stack(values)
        alpha = 1.0 + ((v - v.mean()) ** 2).mean()  # eq. 9: divided by V
    return alpha * current, alpha
