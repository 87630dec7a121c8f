"""ECAN's MVA loss (trainers/losses/affinity.py, eqs. 8-10) against the equations written out by hand."""
from __future__ import annotations

import pytest
import torch

from trainers.losses.affinity import affinity_loss, centre_loss, centre_spread, mva_loss

C = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0]])
X = torch.tensor([[1.0, 0.0], [2.0, 1.0], [0.0, 2.0], [-1.0, -1.0]])
Y = torch.tensor([0, 1, 2, 0])


def test_affinity_by_hand():
    # sigma_c^2: per dimension, unbiased variance of (0, 2, 0) = 4/3 and of (0, 0, 4) = 16/3 -> 20/3
    assert float(centre_spread(C)) == pytest.approx(20 / 3)
    d2 = [1.0, 1.0, 4.0, 2.0]  # ||x_i - c_{y_i}||^2
    assert float(affinity_loss(X, Y, C, "sum")) == pytest.approx(sum(d2) / (20 / 3))
    assert float(affinity_loss(X, Y, C, "mean")) == pytest.approx(sum(d2) / 4 / (20 / 3))
    # unlabelled items are left out
    y = Y.clone()
    y[3] = -1
    assert float(affinity_loss(X, y, C, "sum")) == pytest.approx(6.0 / (20 / 3))


def test_centre_loss_by_hand():
    # eq. 7: 1/(2m) sum ||x_i - c_{y_i}||^2 = (1 + 1 + 4 + 2) / 8
    assert float(centre_loss(X, Y, C)) == pytest.approx(8.0 / 8)
    y = Y.clone()
    y[2] = -1  # left out: (1 + 1 + 2) / 6
    assert float(centre_loss(X, y, C)) == pytest.approx(4.0 / 6)
    c = C.clone().requires_grad_(True)
    centre_loss(X, torch.full_like(Y, -1), c).backward()  # no labelled item: zero, still differentiable
    assert c.grad is not None and float(c.grad.abs().sum()) == 0.0


def test_mva_weights_the_current_group_by_the_spread_of_the_groups():
    cur = affinity_loss(X, Y, C, "sum")
    past = [(X + 1.0, Y), (X * 2.0, Y)]
    vals = [float(cur)] + [float(affinity_loss(f, lab, C, "sum")) for f, lab in past]
    mean = sum(vals) / 3
    alpha = 1 + sum((v - mean) ** 2 for v in vals) / 3
    loss, a = mva_loss(X, Y, C, past, "sum")
    assert float(a) == pytest.approx(alpha) and float(loss) == pytest.approx(alpha * float(cur))
    # no past group, or identical groups: alpha = 1, the affinity loss itself
    assert float(mva_loss(X, Y, C, (), "sum")[1]) == 1.0
    assert float(mva_loss(X, Y, C, [(X, Y), (X, Y)], "sum")[0]) == pytest.approx(float(cur))


def test_gradient_flows_through_the_current_group_only():
    x = X.clone().requires_grad_(True)
    c = C.clone().requires_grad_(True)
    p = (X + 1.0).requires_grad_(True)
    loss, alpha = mva_loss(x, Y, c, [(p, Y)], "sum")
    loss.backward()
    assert x.grad is not None and c.grad is not None and float(c.grad.abs().sum()) > 0
    assert p.grad is None, "a past group is a coefficient, not a path for gradients"
    # the gradient w.r.t. x is alpha times that of the affinity loss
    x2 = X.clone().requires_grad_(True)
    affinity_loss(x2, Y, C, "sum").backward()
    assert torch.allclose(x.grad, float(alpha) * x2.grad)


def test_needs_two_centres():
    with pytest.raises(ValueError, match="2 class centres"):
        affinity_loss(X, torch.zeros(4, dtype=torch.long), C[:1])
