"""Supervised contrastive losses of ECAN (papers/ecan.md, section 3.2; METHODS.md section 2): SupCon
(eq. 4, Khosla et al.), ESC (eq. 5) and ENSC (eq. 6), one function.

On a two-view batch ``z`` (2N L2-normalised features, labels ``y``), for anchor ``i``:

- ``A(i)``: every other item of the batch; ``P(i)``: those of ``A(i)`` with the anchor's label (its other
  view at least);
- ``L_i = -1/|P(i)| * sum_{p in P(i)} log( exp(z_i.z_p/T) / (sum_{a in A(i)} exp(z_i.z_a/T)
  + sum_{m in M(i)} exp(z_i.z_m/T)) )``

where the extra negatives ``M(i)`` come from the memory bank (features of past batches, no gradient):
none for SupCon (eq. 4); the whole bank for ESC (eq. 5, "z_a + z_m": the bank joins the denominator);
for ENSC (eq. 6) only the bank features whose label differs from the anchor's ("z_mn in z_m|y_m != y_i":
no false negatives). Bank features never enter a numerator (the positives stay those of the batch, "z_p
is not reduced").

The paper writes every loss as a *sum* over the 2N anchors; next to a batch-mean cross-entropy in eq. 11
that sum weighs 2N times more per anchor than the mean Khosla et al.'s reference code takes, so the
reduction is an argument (``"mean"`` or ``"sum"``) and the method states which it uses. Anchors with no
positive or no label (< 0) are left out, and so are bank
entries labelled < 0 (empty slots). Computed in float32 with a max-shifted log-sum-exp.
"""
from __future__ import annotations

from typing import Literal

import torch

__all__ = ["supcon_loss"]

Mode = Literal["supcon", "esc", "ensc"]


def supcon_loss(z: torch.Tensor, labels: torch.Tensor, *, temperature: float, mode: Mode = "ensc",
                bank: torch.Tensor | None = None, bank_labels: torch.Tensor | None = None,
                reduction: Literal["mean", "sum"] = "mean") -> torch.Tensor:
    """Eq. 4 / 5 / 6 (module doc). ``z`` ``(B, d)`` with gradient, ``labels`` ``(B,)``; ``bank`` ``(K, d)``
    and ``bank_labels`` ``(K,)`` (detached here) for ``esc``/``ensc``."""
    if mode not in ("supcon", "esc", "ensc"):
        raise ValueError(f"mode must be 'supcon', 'esc' or 'ensc', got {mode!r}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if mode != "supcon" and (bank is None or bank_labels is None):
        raise ValueError(f"mode {mode!r} needs the memory bank (bank and bank_labels)")
    keep = labels >= 0
    z, y = z[keep].float(), labels[keep].long()
    b = z.shape[0]
    sim = z @ z.t() / temperature                                        # (B, B)
    self_mask = torch.eye(b, dtype=torch.bool, device=z.device)
    sim_a = sim.masked_fill(self_mask, float("-inf"))                    # A(i): all but i
    parts = [sim_a]
    if mode != "supcon":
        bz, by = bank.detach().float().to(z.device), bank_labels.long().to(z.device)
        filled = by >= 0                                                 # label < 0: an empty bank slot
        bz, by = bz[filled], by[filled]
        sim_m = z @ bz.t() / temperature                                 # (K, d) -> (B, K)
        if mode == "ensc":  # only the bank features of another class than the anchor
            sim_m = sim_m.masked_fill(y[:, None] == by[None, :], float("-inf"))
        parts.append(sim_m)
    log_den = torch.logsumexp(torch.cat(parts, 1), dim=1)                # log of the denominator, (B,)
    pos = (y[:, None] == y[None, :]) & ~self_mask                        # P(i)
    n_pos = pos.sum(1)
    has = n_pos > 0
    log_prob = sim - log_den[:, None]
    per = -(log_prob * pos).sum(1)[has] / n_pos[has]                     # L_i
    if per.numel() == 0:
        return z.sum() * 0.0
    return per.mean() if reduction == "mean" else per.sum()
