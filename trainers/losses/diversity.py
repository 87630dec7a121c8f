"""Feature diversity of L learners (papers/diversified_features.md, eqs. 1-3), for diversified ESR and MA-Net.

- :func:`pool`: a learner's ``(N, C, H, W)`` map pooled over its channels (``"spatial"``: ``1 x H x W``, N x HW)
  or over space (``"channel"``: ``C x 1 x 1``, N x C), by the mean. Attention maps that already have one of these
  shapes (CBAM's ``(N, 1, H, W)`` spatial and ``(N, C, 1, 1)`` channel attention) pool to themselves.
- :func:`similarity_matrix`: eq. 1, ``S_lk = (1/N) sum_i exp(-gamma ||phi_l(x_i) - phi_k(x_i)||^2)``.
- :func:`diversity`: eq. 2, ``D = det(S)``.
- :func:`diversity_loss`: the term eq. 3 subtracts, ``-(D_ch + D_sp)`` (and MA-Net's ``D_b`` when asked).

**The diagonal.** Eq. 1 gives ``S_ll = exp(0) = 1``: every learner is fully similar to itself, S is a Gram matrix
of the RBF kernel (positive semi-definite, entries in (0, 1]), and ``det(S)`` lies in [0, 1]: 1 when the
learners' features are far apart (S = identity), 0 when two coincide. That is the diagonal used here, computed
from eq. 1 itself rather than set. The diversified fork builds S with zeros on its diagonal; ``det`` of such a
matrix is not a diversity: for two learners it is ``-S_12^2`` (subtracting it still pushes them apart), but for
three it is ``2 S_12 S_13 S_23``, which grows as the learners become *more* alike, so subtracting it from the
loss pulls them together -- tests/test_diversity.py shows both and checks ours.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch

__all__ = ["pool", "similarity_matrix", "diversity", "diversity_loss", "POOLS"]

POOLS = ("channel", "spatial")


def pool(f: torch.Tensor, over: str) -> torch.Tensor:
    """``(N, C, H, W)`` -> ``(N, C)`` (``over="channel"``: the channel descriptor, pooled over space) or
    ``(N, H*W)`` (``"spatial"``: the spatial map, pooled over channels)."""
    if f.dim() != 4:
        raise ValueError(f"pool expects (N, C, H, W) maps, got shape {tuple(f.shape)}")
    if over == "channel":
        return f.mean((2, 3))
    if over == "spatial":
        return f.mean(1).flatten(1)
    raise ValueError(f"over must be one of {POOLS}, got {over!r}")


def similarity_matrix(phis: Sequence[torch.Tensor], gamma: float) -> torch.Tensor:
    """Eq. 1 for L pooled maps ``(N, D)`` (the same N samples, the same D): ``(L, L)``, diagonal exactly 1."""
    if len(phis) < 2:
        raise ValueError(f"diversity needs at least 2 learners, got {len(phis)}")
    x = torch.stack([p.float() if p.dtype in (torch.float16, torch.bfloat16) else p for p in phis])   # (L, N, D)
    d2 = ((x.unsqueeze(1) - x.unsqueeze(0)) ** 2).sum(-1)                                             # (L, L, N)
    return torch.exp(-float(gamma) * d2).mean(-1)


def diversity(phis: Sequence[torch.Tensor], gamma: float) -> torch.Tensor:
    """Eq. 2: ``det(S)`` of the pooled maps, differentiable."""
    return torch.linalg.det(similarity_matrix(phis, gamma))


def diversity_loss(maps: Iterable[torch.Tensor], gamma: float, kinds: Sequence[str] = POOLS,
                   extra: Sequence[Sequence[torch.Tensor]] = ()) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``-(sum of D over kinds)`` for the learners' ``(N, C, H, W)`` maps, each pooled by every kind of
    ``kinds``; ``extra``: further groups of already pooled ``(N, D)`` features whose diversity is subtracted too
    (MA-Net's D_b over its branches' outputs). Returns (loss, {"d_channel", "d_spatial", "d_extra0", ...})."""
    maps = list(maps)
    parts: dict[str, torch.Tensor] = {}
    total = None
    for k in kinds:
        d = diversity([pool(m, k) for m in maps], gamma)
        parts[f"d_{k}"] = d.detach()
        total = d if total is None else total + d
    for i, group in enumerate(extra):
        d = diversity(list(group), gamma)
        parts[f"d_extra{i}"] = d.detach()
        total = d if total is None else total + d
    if total is None:
        raise ValueError("diversity_loss needs at least one kind or extra group")
    return -total, parts
