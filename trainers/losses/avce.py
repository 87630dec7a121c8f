"""AVCE's losses (Kim & Song, ECCV 2022), each a module with the paper's equation and its settings:

- :class:`Similarity`: ``f`` of eq. 4, ``f(x, y) = (1 - theta(x, y)/pi) + mu (1 - | ||x|| - ||y|| |)`` with
  mu = 0.75, and the alternatives of section 3.4: ``f1 = ||x|| ||y|| cos theta`` (= x . y) and eq. 5's
  ``f2 = f + 1_pol`` (-0.5 when the two valences differ in sign, else 0). Clipped to (0, 1] (section 4.2:
  ``clip="f"``, the default: the whole similarity; ``clip="angle"``: the angular term only, as the official
  code does; ``clip="none"``).
- :class:`AVCELoss`: eq. 2 as a loss to minimise, ``-(E_pos f - alpha E_neg f - beta/2 E_pos f^2 -
  gamma/2 E_neg f^2)`` with alpha = 0.5, beta = 0.005, gamma = 0.5, over the batch's pairs: positive
  ``(x_i, y_a,i)``, negative ``(x_i, y_n,i)``. Eq. 2 is a supremum over f: the network maximises the
  objective, so the loss is its negative (the paper's "L_main = L_AV + L_AVCE" with that sign).
- :class:`AVLoss`: ``L_AV = RMSE + (L_PCC + L_CCC) / 2`` with ``L_xCC = 1 - (xCC_v + xCC_a)/2`` (section 4.2);
  RMSE is the mean of the two dimensions' RMSEs. Rows whose target has a NaN (AffectNet's unannotated faces) are
  left out.
- :class:`DiscriminativeLoss`: eq. 8, ``[delta1 - ||v_a - v_n||^2]_+ + hold(||v_a_bar||) + hold(||v_n_bar||)``
  with ``v_bar_* = v_*/||v_*|| - v/||v||``, delta1 = 1, delta2 = 0.8, averaged over the batch (the paper's sum
  over the batch, divided by N so that SGD's lr 1e-2 does not depend on the batch size). ``hold="abs"`` (the
  default) is ``| ||v_bar|| - delta2 |``: the unit-vector difference is *held at* delta2, which is what the
  paper calls the terms; eq. 8 printed literally (``hold="linear"``, ``||v_bar|| - delta2``) has a gradient that
  does not depend on delta2 at all and only shrinks the difference to 0.
"""
from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["Similarity", "AVCELoss", "AVLoss", "DiscriminativeLoss", "angular_similarity", "pcc", "ccc",
           "CLIP_EPS"]

CLIP_EPS = 1e-6  # the open end of (0, 1]
_COS_EPS = 1e-6  # keeps acos' derivative finite at cos = +-1


def _norm(x: torch.Tensor) -> torch.Tensor:
    return torch.sqrt((x * x).sum(-1) + 1e-12)


def angular_similarity(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``1 - theta(x, y) / pi`` per row, in [0, 1] (1: same direction)."""
    cos = (x * y).sum(-1) / (_norm(x) * _norm(y))
    return 1.0 - torch.acos(cos.clamp(-1 + _COS_EPS, 1 - _COS_EPS)) / math.pi


class Similarity(nn.Module):
    """``f``, ``f1`` or ``f2`` of ``(N, 2)`` AV vectors, per row."""

    KINDS = ("f", "f1", "f2")
    CLIPS = ("f", "angle", "none")

    def __init__(self, kind: str = "f", mu: float = 0.75, clip: str = "f", polarity_penalty: float = -0.5):
        super().__init__()
        if kind not in self.KINDS:
            raise ValueError(f"similarity must be one of {self.KINDS}, got {kind!r}")
        if clip not in self.CLIPS:
            raise ValueError(f"clip must be one of {self.CLIPS}, got {clip!r}")
        self.kind, self.mu, self.clip, self.penalty = kind, float(mu), clip, float(polarity_penalty)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x, y = x.float(), y.float()
        if self.kind == "f1":
            f = (x * y).sum(-1)
        else:
            ang = angular_similarity(x, y)
            if self.clip == "angle":
                ang = ang.clamp(CLIP_EPS, 1.0)
            f = ang + self.mu * (1.0 - (_norm(x) - _norm(y)).abs())
            if self.kind == "f2":  # 1_pol: a penalty when the valences (column 0) differ in sign
                f = f + self.penalty * (torch.sign(x[:, 0]) != torch.sign(y[:, 0])).to(f.dtype)
        if self.clip == "f":
            f = f.clamp(CLIP_EPS, 1.0)
        return f


class AVCELoss(nn.Module):
    """Eq. 2 (negated): ``forward(x, y_a, y_n) -> (loss, f_pos, f_neg)``."""

    def __init__(self, similarity: Similarity | None = None, alpha: float = 0.5, beta: float = 0.005,
                 gamma: float = 0.5):
        super().__init__()
        self.f = similarity or Similarity()
        self.alpha, self.beta, self.gamma = float(alpha), float(beta), float(gamma)

    def forward(self, x: torch.Tensor, y_a: torch.Tensor, y_n: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        fp, fn = self.f(x, y_a), self.f(x, y_n)
        objective = (fp.mean() - self.alpha * fn.mean() - 0.5 * self.beta * (fp * fp).mean()
                     - 0.5 * self.gamma * (fn * fn).mean())
        return -objective, fp, fn


def pcc(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Pearson's r of each column of ``(N, D)`` predictions and targets (0 where a side is constant)."""
    pc, tc = p - p.mean(0), t - t.mean(0)
    den = torch.sqrt((pc * pc).sum(0) * (tc * tc).sum(0))
    return torch.where(den > 0, (pc * tc).sum(0) / den.clamp_min(1e-12), torch.zeros_like(den))


def ccc(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Lin's concordance correlation of each column (population moments, as ``trainers.metrics``)."""
    mp, mt = p.mean(0), t.mean(0)
    cov = ((p - mp) * (t - mt)).mean(0)
    den = p.var(0, unbiased=False) + t.var(0, unbiased=False) + (mp - mt) ** 2
    return torch.where(den > 0, 2 * cov / den.clamp_min(1e-12), torch.zeros_like(den))


class AVLoss(nn.Module):
    """``L_AV``: ``forward(pred, target) -> (loss, parts)`` with parts ``rmse``, ``pcc``, ``ccc`` (means of V and A)."""

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        pred, target = pred.float(), target.float()
        ok = torch.isfinite(target).all(1)
        p, t = pred[ok], target[ok]
        if p.shape[0] < 2:  # no correlation in fewer than two faces; the RMSE alone
            rmse = torch.sqrt(((p - t) ** 2).mean(0) + 1e-12).mean() if p.shape[0] else pred.sum() * 0
            zero = torch.zeros((), device=pred.device)
            return rmse, {"rmse": rmse.detach(), "pcc": zero, "ccc": zero}
        rmse = torch.sqrt(((p - t) ** 2).mean(0) + 1e-12).mean()
        r, c = pcc(p, t), ccc(p, t)
        loss = rmse + ((1 - r.mean()) + (1 - c.mean())) / 2
        return loss, {"rmse": rmse.detach(), "pcc": r.mean().detach(), "ccc": c.mean().detach()}


class DiscriminativeLoss(nn.Module):
    """Eq. 8: ``forward(v, v_a, v_n) -> (loss, parts)`` with parts ``push``, ``hold``."""

    HOLDS = ("abs", "linear")

    def __init__(self, delta1: float = 1.0, delta2: float = 0.8, hold: str = "abs"):
        super().__init__()
        if hold not in self.HOLDS:
            raise ValueError(f"hold must be one of {self.HOLDS}, got {hold!r}")
        self.delta1, self.delta2, self.hold = float(delta1), float(delta2), hold

    def forward(self, v: torch.Tensor, v_a: torch.Tensor, v_n: torch.Tensor
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        v, v_a, v_n = v.float(), v_a.float(), v_n.float()
        push = torch.relu(self.delta1 - ((v_a - v_n) ** 2).sum(-1))
        u = v / _norm(v).unsqueeze(-1)
        terms = []
        for w in (v_a, v_n):
            d = _norm(w / _norm(w).unsqueeze(-1) - u) - self.delta2
            terms.append(d.abs() if self.hold == "abs" else d)
        hold = terms[0] + terms[1]
        return (push + hold).mean(), {"push": push.mean().detach(), "hold": hold.mean().detach()}
