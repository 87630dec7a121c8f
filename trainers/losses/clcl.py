"""Losses of cross-layer contrastive learning (papers/cross_layer_contrastive.md, eqs. 1-7; METHODS.md section 3).

Both contrastive modules align a shallow block with the deepest one the same way (:func:`cross_layer_alignment`):

1. K-means (eq. 2) over a set of deep points gives K deep centroids phi_k;
2. every shallow point joins the centroid it is most cosine-similar to (eqs. 3-4);
3. the shallow centres are the per-cluster means of the shallow points (eq. 5; an empty cluster's centre is 0);
4. the alignment is cos(vec(shallow centres), vec(deep centroids)) (eq. 6), and the loss is minus the weighted
   sum over the shallow blocks.

CLFM (eq. 6) does this per face over channels: a point is one channel's code of ``fd_fm`` numbers
(:func:`hash_codes`). CLBS (eq. 7) does it once per batch over faces: a point is one face's ``fd_bs``-d vector.

The hash coding of eq. 1 ("the coordinates of the maximum response area of each feature map") is the part the
official code gets wrong: there it is each channel's top-k positions, integers with no gradient, so the CLFM
term never reaches the network. :func:`hash_codes` is a soft-argmax instead: the map is cut into a grid of
``fd_fm / 2`` regions, and in each one the softmax of the responses / ``temperature`` weighs the positions,
giving the expected (y, x) of the peak relative to the region's centre, in [-1, 1]. It is the argmax's
coordinates as the temperature goes to 0, and differentiable w.r.t. every response for any temperature > 0.
"""
from __future__ import annotations

import math
from typing import Mapping

import torch
import torch.nn.functional as F

from ..modules.kmeans import kmeans

__all__ = ["hash_grid", "hash_codes", "assign_by_cosine", "cluster_means", "centre_alignment",
           "cross_layer_alignment", "clfm_loss", "clbs_loss"]


def _full(x: torch.Tensor) -> torch.Tensor:
    """float32 for half/bfloat16 (autocast) input; float32/float64 as they are."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def hash_grid(fd: int) -> tuple[int, int]:
    """(rows, cols) of the ``fd / 2`` regions: as square as possible, rows >= cols (faces are taller in
    structure: eyes, nose, mouth). 16 -> (4, 2), 8 -> (2, 2), 2 -> (1, 1)."""
    if fd < 2 or fd % 2:
        raise ValueError(f"the hash code size fd_fm must be an even number >= 2 (a (y, x) pair per region), got {fd}")
    r = fd // 2
    cols = max(c for c in range(1, int(math.isqrt(r)) + 1) if r % c == 0)
    return r // cols, cols


def _bins(n: int, parts: int) -> list[tuple[int, int]]:
    """Adaptive-pooling bins of ``n`` positions into ``parts`` (they overlap when n is not a multiple)."""
    return [(math.floor(i * n / parts), math.ceil((i + 1) * n / parts)) for i in range(parts)]


def _coords(start: int, end: int, like: torch.Tensor) -> torch.Tensor:
    """Positions start..end-1 mapped to [-1, 1] around the region's centre (a 1-pixel region: 0)."""
    n = end - start
    if n == 1:
        return torch.zeros(1, dtype=like.dtype, device=like.device)
    return torch.linspace(-1.0, 1.0, n, dtype=like.dtype, device=like.device)


def hash_codes(x: torch.Tensor, fd: int = 16, temperature: float = 0.5) -> torch.Tensor:
    """Soft-argmax hash coding of eq. 1: ``(N, C, H, W)`` responses -> ``(N, C, fd)`` codes
    ``[y_1, x_1, y_2, x_2, ...]``, region by region in row-major order (see the module doc)."""
    if temperature <= 0:
        raise ValueError(f"the hash coding temperature must be > 0, got {temperature}")
    rows, cols = hash_grid(fd)
    n, c, h, w = x.shape
    x = _full(x)
    out = []
    for r0, r1 in _bins(h, rows):
        for c0, c1 in _bins(w, cols):
            region = x[:, :, r0:r1, c0:c1]
            p = torch.softmax(region.reshape(n, c, -1) / temperature, 2).view(n, c, r1 - r0, c1 - c0)
            ys, xs = _coords(r0, r1, x), _coords(c0, c1, x)
            out.append((p.sum(3) * ys).sum(2))
            out.append((p.sum(2) * xs).sum(2))
    return torch.stack(out, 2)


def assign_by_cosine(points: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Eqs. 3-4: ``points`` (B, P, D), ``centroids`` (B, K, D) -> the most cosine-similar centroid (B, P)."""
    with torch.no_grad():
        sim = F.normalize(_full(points), dim=2) @ F.normalize(_full(centroids), dim=2).transpose(1, 2)
        return sim.argmax(2)


def cluster_means(points: torch.Tensor, assign: torch.Tensor, k: int) -> torch.Tensor:
    """Eq. 5: per-cluster means (B, K, D) of ``points`` (B, P, D) under ``assign`` (B, P); empty -> 0."""
    onehot = F.one_hot(assign, k).to(points.dtype)                                   # (B, P, K)
    return (onehot.transpose(1, 2) @ points) / onehot.sum(1).clamp_min(1).unsqueeze(2)


def centre_alignment(shallow_centres: torch.Tensor, deep_centroids: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Eq. 6's L^(i,j,L): cos(vec(shallow centres), vec(deep centroids)) per set, (B, K, D) x2 -> (B,)."""
    a = _full(shallow_centres.flatten(1))
    b = _full(deep_centroids.flatten(1))
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(eps)


def cross_layer_alignment(shallow: torch.Tensor, deep: torch.Tensor, k: int, iters: int = 10,
                          deep_grad: bool = True) -> torch.Tensor:
    """Steps 1-4 of the module doc on B sets at once: ``shallow`` (B, P_s, D), ``deep`` (B, P_d, D) -> the
    alignment cosine per set (B,). ``deep_grad=False`` treats the deep centroids as fixed targets."""
    deep = _full(deep)
    if not deep_grad:
        deep = deep.detach()
    centroids, _ = kmeans(deep, min(int(k), deep.shape[1]), iters)
    assign = assign_by_cosine(shallow, centroids)
    centres = cluster_means(_full(shallow), assign, centroids.shape[1])
    return centre_alignment(centres, centroids)


def clfm_loss(shallow_codes: Mapping[int, torch.Tensor], deep_codes: torch.Tensor, alpha: Mapping[int, float],
              k: int = 4, iters: int = 10, deep_grad: bool = True) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Eq. 6 averaged over the batch: ``-sum_j alpha_j mean_i cos_ij``. ``shallow_codes[j]`` (N, C_j, fd) and
    ``deep_codes`` (N, C_L, fd) are :func:`hash_codes`; per face, K-means runs over its C_L deep channels.
    Returns (loss, {j: mean cosine})."""
    total = _full(deep_codes).new_zeros(())
    cos: dict[int, torch.Tensor] = {}
    for j, codes in shallow_codes.items():
        c = cross_layer_alignment(codes, deep_codes, k, iters, deep_grad).mean()
        cos[j] = c.detach()
        total = total - float(alpha[j]) * c
    return total, cos


def clbs_loss(shallow_vecs: Mapping[int, torch.Tensor], deep_vecs: torch.Tensor, beta: Mapping[int, float],
              k: int, iters: int = 10, deep_grad: bool = True) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Eq. 7: ``-sum_j beta_j cos_j``, one K-means over the batch's N deep vectors (N, fd_bs) with K = ``k``
    (the number of classes; fewer when the batch has fewer faces). Returns (loss, {j: cosine})."""
    total = _full(deep_vecs).new_zeros(())
    cos: dict[int, torch.Tensor] = {}
    for j, vecs in shallow_vecs.items():
        c = cross_layer_alignment(vecs.unsqueeze(0), deep_vecs.unsqueeze(0), k, iters, deep_grad)[0]
        cos[j] = c.detach()
        total = total - float(beta[j]) * c
    return total, cos
