"""Batched K-means (Lloyd) for training-time clustering (cross-layer contrastive learning, eq. 2).

``kmeans(points, k)`` clusters each of B independent sets of points at once (``points`` (B, P, D)): one set per
face for CLFM (its deepest block's channel codes), one set for the whole batch for CLBS. It is deterministic
(no random state, so an exact resume needs nothing saved): farthest-point seeding from the point farthest
from the set's mean, then ``iters`` Lloyd steps. Assignments are discrete; the centroids it returns are the
means of their members, differentiable w.r.t. ``points`` (a caller detaches them for a stop-gradient). A
cluster that ends empty keeps its last centroid (detached; it has no members to differentiate through).
"""
from __future__ import annotations

import torch

__all__ = ["kmeans", "farthest_point_seeds"]


@torch.no_grad()
def farthest_point_seeds(points: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (B, k): the point farthest from the set's mean, then repeatedly the point farthest from
    every seed chosen so far (ties: the lowest index)."""
    b, p, _ = points.shape
    first = (points - points.mean(1, keepdim=True)).pow(2).sum(2).argmax(1)           # (B,)
    idx = [first]
    d = (points - points[torch.arange(b), first].unsqueeze(1)).pow(2).sum(2)          # (B, P)
    for _ in range(1, k):
        nxt = d.argmax(1)
        idx.append(nxt)
        d = torch.minimum(d, (points - points[torch.arange(b), nxt].unsqueeze(1)).pow(2).sum(2))
    return torch.stack(idx, 1)


def _means(points: torch.Tensor, assign: torch.Tensor, k: int, previous: torch.Tensor) -> torch.Tensor:
    onehot = torch.nn.functional.one_hot(assign, k).to(points.dtype)                  # (B, P, k)
    count = onehot.sum(1)                                                             # (B, k)
    sums = onehot.transpose(1, 2) @ points                                            # (B, k, D)
    means = sums / count.clamp_min(1).unsqueeze(2)
    return torch.where((count > 0).unsqueeze(2), means, previous.detach())


def kmeans(points: torch.Tensor, k: int, iters: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's K-means with squared Euclidean distance (eq. 2) on each of the B sets of ``points`` (B, P, D).

    Returns ``(centroids (B, k, D), assignment (B, P) int64)``. ``k`` must not exceed P."""
    if points.ndim != 3:
        raise ValueError(f"kmeans expects (B, P, D) points, got shape {tuple(points.shape)}")
    b, p, _ = points.shape
    if not 1 <= k <= p:
        raise ValueError(f"kmeans: k = {k} clusters need at least k points; a set has {p}")
    x = points.detach()
    x = x if x.dtype in (torch.float32, torch.float64) else x.float()
    cent = x[torch.arange(b).unsqueeze(1), farthest_point_seeds(x, k)]               # (B, k, D)
    assign = torch.cdist(x, cent).argmin(2)
    with torch.no_grad():
        for _ in range(max(0, int(iters))):
            cent = _means(x, assign, k, cent)
            new = torch.cdist(x, cent).argmin(2)
            if torch.equal(new, assign):
                break
            assign = new
    return _means(points, assign, k, cent.to(points.dtype)), assign
