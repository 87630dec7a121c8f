"""Triplet-centre (TC) loss as DAF-CNN writes it (papers/daf_cnn.md, section 3.3, eqs. 6-12; after He et al.,
"Triplet-center loss for multi-view 3D object retrieval", CVPR 2018).

For embedding ``e_i`` with label ``p``, class centres ``c_1..c_K``:

- eqs. 6-7: ``D(e, c) = 1/2 ||e - c||^2``;
- the nearest negative centre ``q_i = argmin_{j != p} D(e_i, c_j)``;
- eq. 10: ``L_i = max(D(e_i, c_p) + m - D(e_i, c_q), 0)``;
- eq. 9: ``L_tc = sum_i L_i`` over the batch (``reduction="sum"``, this function's default, the letter of
  the paper); ``"mean"`` divides by the batch size M, as Wen et al.'s own centre-loss layer does
  (ydwen/caffe-face, ``center_loss_layer.cpp``: ``loss = dot / M / 2``, feature gradient scaled by 1/M).
  What the two mean next to the batch-mean cross-entropy of eq. 13, with lambda = 0.007, m = 11, M = 128:
  in *value*, the sum starts at lambda * M * ~m ~ 10, about 5x CE's ~1.9, the mean at ~0.08; in *per-item
  gradient weight*, CE gives each item 1/M = 0.0078, the sum lambda = 0.007 (about 1:1) and the mean
  lambda / M = 5.5e-5 (143x weaker than CE). Which reading ``trainers.daf`` uses, and what each did in
  measured runs: ``trainers/methods/daf.py`` and docs/daf-reproduction.md;
- eq. 11: ``dL/de_i = (c_q - c_p) * [L_i > 0]`` -- exactly what autograd gives with the centres held
  constant (they are a buffer, not a parameter), see :func:`feature_gradient`;
- eq. 12, the centre rule, applied outside the optimiser::

      Delta_j = sum_i (e_i - c_j)[L_i>0][p_i=j] / (1 + sum_i [L_i>0][p_i=j])
              - sum_i (e_i - c_j)[L_i>0][q_i=j] / (1 + sum_i [L_i>0][q_i=j])

  The paper prints this as ``dL/dc_j``, but it is the *negative* of that gradient (``dD(e,c_p)/dc_p =
  -(e - c_p)``; the TC paper [20] has the opposite sign). Read as printed and applied as a gradient step
  it would push every centre away from its own class; so we read it as the descent direction, as in
  centre loss [19] ("similar to the practice in centre loss"): ``c_j <- c_j + alpha * Delta_j``, which
  moves a centre towards its active samples and away from the active samples it is the nearest
  negative of. ``alpha`` (``centre_lr``) is not given by the paper: 0.5, centre loss's value.
  Only active samples (``L_i > 0``) move centres, for the positive term too, as eq. 12 writes.
- Centres start as N(0, 0.01^2) ("mean and standard deviation are (0, 0.01)", 4.2).

Items with label < 0 (no label) are ignored. Distances are computed in float32.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TCResult", "TripletCentreLoss", "centre_delta", "class_separation", "feature_gradient", "half_sq_distances",
           "triplet_centre_loss"]


@dataclass
class TCResult:
    """One evaluation of the TC loss on a batch (tensors over the batch's labelled items)."""

    loss: torch.Tensor             # eq. 9 (sum, or mean with reduction="mean")
    per_sample: torch.Tensor       # L_i, eq. 10, (M,)
    d_pos: torch.Tensor            # D(e_i, c_p), (M,)
    d_neg: torch.Tensor            # D(e_i, c_q), (M,)
    nearest_negative: torch.Tensor  # q_i, (M,) int64
    active: torch.Tensor           # L_i > 0, (M,) bool
    labels: torch.Tensor           # p_i, (M,) int64
    embeddings: torch.Tensor       # e_i (detached, float32), (M, d): what the centre update uses

    @property
    def active_fraction(self) -> torch.Tensor:
        return self.active.float().mean() if self.active.numel() else self.active.new_zeros((), dtype=torch.float32)


def half_sq_distances(emb: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """``D(e_i, c_j) = 1/2 ||e_i - c_j||^2`` for every item and centre, ``(M, K)`` (exact differences, no
    expansion of the square, so small distances keep their precision)."""
    diff = emb.float().unsqueeze(1) - centres.float().unsqueeze(0)
    return 0.5 * diff.pow(2).sum(-1)


def triplet_centre_loss(emb: torch.Tensor, labels: torch.Tensor, centres: torch.Tensor, margin: float,
                        reduction: str = "sum") -> TCResult:
    """Eqs. 6-10 on a batch. ``emb`` ``(B, d)`` (gradient flows to it), ``labels`` ``(B,)``, ``centres``
    ``(K, d)`` (treated as constants)."""
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    k = centres.shape[0]
    if k < 2:
        raise ValueError("the triplet-centre loss needs at least 2 classes (a negative centre)")
    keep = labels >= 0
    if not bool(keep.all()):
        emb, labels = emb[keep], labels[keep]
    labels = labels.long()
    c = centres.detach().float()
    d = half_sq_distances(emb, c)                                   # (M, K)
    d_pos = d.gather(1, labels[:, None]).squeeze(1)
    own = F.one_hot(labels, k).bool()
    d_other = d.masked_fill(own, float("inf"))
    d_neg, q = d_other.min(1)                                       # nearest negative centre
    per = F.relu(d_pos + float(margin) - d_neg)                     # eq. 10 (relu: gradient only where > 0)
    if per.numel() == 0:
        loss = emb.float().sum() * 0.0
    else:
        loss = per.sum() if reduction == "sum" else per.mean()
    return TCResult(loss=loss, per_sample=per, d_pos=d_pos, d_neg=d_neg, nearest_negative=q,
                    active=per.detach() > 0, labels=labels, embeddings=emb.detach().float())


def feature_gradient(centres: torch.Tensor, labels: torch.Tensor, nearest_negative: torch.Tensor,
                     active: torch.Tensor) -> torch.Tensor:
    """Eq. 11: ``dL_tc/de_i = (c_q - c_p) * [L_i > 0]`` (for ``reduction="sum"``; divide by M for "mean"),
    ``(M, d)``."""
    c = centres.float()
    return (c[nearest_negative] - c[labels]) * active.float().unsqueeze(1)


def centre_delta(result: TCResult, centres: torch.Tensor,
                 reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Eq. 12 as printed, ``Delta_j`` for every centre, ``(K, d)``; the update is ``c += alpha * Delta``.
    ``reduce``: sums the per-class sums over the processes of a torchrun launch (in place), so that every
    process applies the update of the whole global batch."""
    c = centres.float()
    e, p, q = result.embeddings, result.labels, result.nearest_negative
    a = result.active.float()
    k = c.shape[0]
    w_pos = F.one_hot(p, k).float() * a[:, None]                  # [L_i>0][p_i=j], (M, K)
    w_neg = F.one_hot(q, k).float() * a[:, None]                  # [L_i>0][q_i=j]
    n_pos, n_neg = w_pos.sum(0), w_neg.sum(0)                      # (K,)
    s_pos, s_neg = w_pos.t() @ e, w_neg.t() @ e                    # (K, d)
    if reduce is not None:
        packed = reduce(torch.cat([s_pos, s_neg, n_pos[:, None], n_neg[:, None]], 1))
        d = e.shape[1]
        s_pos, s_neg, n_pos, n_neg = packed[:, :d], packed[:, d:2 * d], packed[:, 2 * d], packed[:, 2 * d + 1]
    # sum_i w_ij (e_i - c_j) = (W^T E)_j - n_j c_j
    pos = (s_pos - n_pos[:, None] * c) / (1.0 + n_pos)[:, None]
    neg = (s_neg - n_neg[:, None] * c) / (1.0 + n_neg)[:, None]
    return pos - neg


class TripletCentreLoss(nn.Module):
    """The TC loss with its class centres as a buffer, updated by eq. 12 outside any optimiser.

    ``forward(emb, labels)`` returns a :class:`TCResult` and remembers what the centre update needs;
    ``update_centres()`` (call it after the optimiser step) applies ``c <- c + centre_lr * Delta`` with
    the centres and embeddings of that forward pass. ``state_dict()`` holds the centres.
    """

    def __init__(self, num_classes: int, dim: int, margin: float, centre_lr: float = 0.5,
                 reduction: str = "sum", init_std: float = 0.01, generator: torch.Generator | None = None):
        super().__init__()
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
        self.margin, self.centre_lr, self.reduction = float(margin), float(centre_lr), reduction
        self.register_buffer("centres", torch.randn(num_classes, dim, generator=generator) * float(init_std))
        self._pending: TCResult | None = None

    def extra_repr(self) -> str:
        k, d = self.centres.shape
        return f"classes={k}, dim={d}, margin={self.margin}, centre_lr={self.centre_lr}, reduction={self.reduction}"

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> TCResult:
        res = triplet_centre_loss(emb, labels, self.centres, self.margin, self.reduction)
        if self.training:
            self._pending = res
        return res

    @torch.no_grad()
    def update_centres(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor | None:
        """Apply eq. 12 for the last training forward; returns the applied ``Delta`` (or None). ``reduce``:
        see :func:`centre_delta` (every process must call this, also with an empty batch share)."""
        res, self._pending = self._pending, None
        if res is None or (res.labels.numel() == 0 and reduce is None):
            return None
        delta = centre_delta(res, self.centres, reduce)
        self.centres.add_(delta.to(self.centres.dtype), alpha=self.centre_lr)
        return delta

    def _load_from_state_dict(self, *args, **kwargs):  # a reload forgets the pending update
        self._pending = None
        return super()._load_from_state_dict(*args, **kwargs)


def class_separation(emb: torch.Tensor, labels: torch.Tensor, centres: torch.Tensor | None = None,
                     margin: float | None = None) -> dict[str, float]:
    """How tight the classes of an embedding are, in the loss's own distance ``D = 1/2 ||e - c||^2``.

    With ``centres=None`` the class means of ``emb`` itself serve as centres (so a model trained without TC
    is measured the same way). Returns ``intra`` (mean D to the own class's centre), ``inter`` (mean D to the
    nearest other centre), ``ratio`` = intra / inter (scale-free: lower = tighter, better separated classes)
    and, with ``margin``, ``hinge_met``: the fraction of items with D_own + m <= D_nearest_other (eq. 10's
    loss is 0 for them). Classes with no item are left out.
    """
    keep = labels >= 0
    e, y = emb[keep].float(), labels[keep].long()
    if centres is None:
        k = int(y.max()) + 1 if len(y) else 0
        sums = torch.zeros(k, e.shape[1]).index_add_(0, y, e)
        counts = torch.bincount(y, minlength=k).float()
        present = counts > 0
        c = sums / counts.clamp_min(1)[:, None]
    else:
        c = centres.float()
        present = torch.bincount(y, minlength=len(c)) > 0
    d = half_sq_distances(e, c)
    d_own = d.gather(1, y[:, None]).squeeze(1)
    others = d.masked_fill(F.one_hot(y, len(c)).bool() | ~present[None, :], float("inf"))
    d_other = others.min(1).values
    ok = torch.isfinite(d_other)
    intra, inter = float(d_own[ok].mean()), float(d_other[ok].mean())
    out = {"intra": intra, "inter": inter, "ratio": intra / inter if inter > 0 else float("nan")}
    if margin is not None:
        out["hinge_met"] = float((d_own[ok] + margin <= d_other[ok]).float().mean())
    return out
