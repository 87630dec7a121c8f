"""ECAN's contrastive losses (trainers/losses/supcon.py): SupCon (eq. 4), ESC (eq. 5), ENSC (eq. 6) against
the equations written out by hand with plain Python floats on a tiny two-view batch and memory bank."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from trainers.losses.supcon import supcon_loss

T = 0.5


def _data():
    g = torch.Generator().manual_seed(3)
    z = F.normalize(torch.randn(6, 4, generator=g, dtype=torch.float64), dim=1)
    y = torch.tensor([0, 0, 1, 1, 2, 0])      # 3 images x 2 views would pair up; here also a third class-0 item
    bank = F.normalize(torch.randn(5, 4, generator=g, dtype=torch.float64), dim=1)
    by = torch.tensor([0, 1, 2, 1, -1])       # the last slot is empty
    return z, y, bank, by


def _by_hand(z, y, bank, by, mode, reduction="mean"):
    zl, yl = z.tolist(), y.tolist()
    dot = lambda a, b: sum(p * q for p, q in zip(a, b))  # noqa: E731
    losses = []
    for i in range(len(zl)):
        pos = [p for p in range(len(zl)) if p != i and yl[p] == yl[i]]
        if not pos:
            continue
        den = sum(math.exp(dot(zl[i], zl[a]) / T) for a in range(len(zl)) if a != i)
        for m, lab in zip(bank.tolist(), by.tolist()):
            if lab < 0:
                continue
            if mode == "esc" or (mode == "ensc" and lab != yl[i]):
                den += math.exp(dot(zl[i], m) / T)
        losses.append(-sum(math.log(math.exp(dot(zl[i], zl[p]) / T) / den) for p in pos) / len(pos))
    return sum(losses) / len(losses) if reduction == "mean" else sum(losses)


@pytest.mark.parametrize("mode", ["supcon", "esc", "ensc"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_equals_the_equation_by_hand(mode, reduction):
    z, y, bank, by = _data()
    got = supcon_loss(z, y, temperature=T, mode=mode, bank=bank, bank_labels=by, reduction=reduction)
    # item 4 (class 2) has no positive in the batch: left out
    assert float(got) == pytest.approx(_by_hand(z, y, bank, by, mode, reduction), rel=1e-6)


def test_extra_negatives_order_the_losses_and_ensc_drops_same_class_bank_features():
    z, y, bank, by = _data()
    kw = dict(temperature=T, bank=bank, bank_labels=by)
    sup, esc, ensc = (float(supcon_loss(z, y, mode=m, **kw)) for m in ("supcon", "esc", "ensc"))
    assert sup < ensc < esc  # more terms in the denominator: a larger loss; ENSC keeps fewer than ESC
    # a bank holding only the anchors' own class adds no negative to ENSC (it is SupCon), but does to ESC
    a, ya = z[[0, 1, 5]], y[[0, 1, 5]]  # three class-0 items
    only0 = dict(temperature=T, bank=bank[[0]], bank_labels=by[[0]])
    plain = float(supcon_loss(a, ya, mode="supcon", temperature=T))
    assert float(supcon_loss(a, ya, mode="ensc", **only0)) == pytest.approx(plain, rel=1e-6)
    assert float(supcon_loss(a, ya, mode="esc", **only0)) > plain


def test_gradient_reaches_the_batch_not_the_bank_and_unlabelled_items_are_ignored():
    z, y, bank, by = _data()
    z = z.clone().requires_grad_(True)
    bank = bank.clone().requires_grad_(True)
    supcon_loss(z, y, mode="ensc", temperature=T, bank=bank, bank_labels=by).backward()
    assert z.grad is not None and float(z.grad.abs().sum()) > 0
    assert bank.grad is None, "the memory bank is a constant"
    y2 = y.clone()
    y2[5] = -1
    a = supcon_loss(z.detach(), y2, mode="supcon", temperature=T)
    b = supcon_loss(z.detach()[:5], y[:5], mode="supcon", temperature=T)
    assert float(a) == pytest.approx(float(b), rel=1e-6)


def test_bad_arguments():
    z, y, bank, by = _data()
    with pytest.raises(ValueError, match="memory bank"):
        supcon_loss(z, y, temperature=T, mode="ensc")
    with pytest.raises(ValueError, match="temperature"):
        supcon_loss(z, y, temperature=0.0, mode="supcon")
    with pytest.raises(ValueError, match="mode"):
        supcon_loss(z, y, temperature=T, mode="simclr")
