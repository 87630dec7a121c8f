"""The diversity of L learners (eqs. 1-2 of papers/diversified_features.md): hand-computed 2- and 3-learner
examples, the determinant's gradient against finite differences, pooling, and why the fork's zero diagonal is
not a diversity."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trainers.losses.diversity import diversity, diversity_loss, pool, similarity_matrix


def test_two_learners_by_hand():
    # N = 2 samples, D = 2: squared distances 1 and 4 between the learners
    a = torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, 0.0], [1.0, 3.0]], dtype=torch.float64)
    g = 0.5
    s12 = (math.exp(-g * 1) + math.exp(-g * 4)) / 2
    S = similarity_matrix([a, b], g)
    assert torch.allclose(S, torch.tensor([[1, s12], [s12, 1]], dtype=torch.float64))
    assert float(diversity([a, b], g)) == pytest.approx(1 - s12 ** 2)
    assert float(diversity([a, a.clone()], g)) == pytest.approx(0.0, abs=1e-12)     # identical: no diversity
    far = diversity([a, a + 100], g)
    assert float(far) == pytest.approx(1.0)                                         # far apart: S = I


def test_three_learners_by_hand_and_gradient():
    rng = np.random.default_rng(0)
    phis = [torch.tensor(rng.normal(0, 0.5, (4, 3)), requires_grad=True) for _ in range(3)]
    g = 0.8
    x = [p.detach().numpy() for p in phis]
    s = np.ones((3, 3))
    for l in range(3):
        for k in range(3):
            s[l, k] = np.mean(np.exp(-g * ((x[l] - x[k]) ** 2).sum(1)))
    # rule of Sarrus
    det = (s[0, 0] * s[1, 1] * s[2, 2] + s[0, 1] * s[1, 2] * s[2, 0] + s[0, 2] * s[1, 0] * s[2, 1]
           - s[0, 2] * s[1, 1] * s[2, 0] - s[0, 0] * s[1, 2] * s[2, 1] - s[0, 1] * s[1, 0] * s[2, 2])
    d = diversity(phis, g)
    assert float(d.detach()) == pytest.approx(det, rel=1e-10) and 0 < det < 1
    d.backward()
    eps = 1e-6
    for j in range(3):
        fd = np.zeros_like(x[j])
        for idx in np.ndindex(*x[j].shape):
            up = [p.detach().clone() for p in phis]
            dn = [p.detach().clone() for p in phis]
            up[j][idx] += eps
            dn[j][idx] -= eps
            fd[idx] = (float(diversity(up, g)) - float(diversity(dn, g))) / (2 * eps)
        assert np.abs(fd - phis[j].grad.numpy()).max() < 1e-7
    assert torch.autograd.gradcheck(lambda *p: diversity(list(p), g), tuple(p.detach().requires_grad_(True)
                                                                             for p in phis))


def test_pooling_and_the_loss():
    torch.manual_seed(0)
    maps = [torch.rand(5, 4, 3, 3, dtype=torch.float64) for _ in range(3)]
    assert pool(maps[0], "channel").shape == (5, 4) and pool(maps[0], "spatial").shape == (5, 9)
    assert torch.allclose(pool(maps[0], "channel"), maps[0].mean((2, 3)))
    att = torch.rand(5, 1, 3, 3)                       # CBAM's spatial attention pools to itself
    assert torch.equal(pool(att, "spatial"), att.flatten(1))
    loss, parts = diversity_loss(maps, 2.0)
    want = diversity([pool(m, "channel") for m in maps], 2.0) + diversity([pool(m, "spatial") for m in maps], 2.0)
    assert float(loss) == pytest.approx(-float(want))
    assert set(parts) == {"d_channel", "d_spatial"}
    extra = [torch.rand(5, 8, dtype=torch.float64) for _ in range(2)]
    loss_b, parts = diversity_loss(maps, 2.0, extra=[extra])
    assert float(loss_b) == pytest.approx(float(loss) - float(diversity(extra, 2.0)))
    # minimising the loss moves the learners apart
    ps = [m.clone().requires_grad_(True) for m in maps]
    diversity_loss(ps, 2.0)[0].backward()
    with torch.no_grad():
        after = diversity_loss([p - 0.5 * p.grad for p in ps], 2.0)[0]
    assert float(after) < float(loss)
    with pytest.raises(ValueError, match="at least 2 learners"):
        diversity([maps[0].flatten(1)], 1.0)
    with pytest.raises(ValueError, match="over must be"):
        pool(maps[0], "depth")


def test_the_forks_zero_diagonal_is_not_a_diversity():
    """With S's diagonal at 0 (the fork): two learners give -S_12^2, three give 2 S_12 S_13 S_23, which RISES as
    the learners become alike (subtracting it pulls them together). Eq. 1's diagonal of 1 falls instead."""
    a = torch.zeros(3, 2, dtype=torch.float64)

    def fork(phis):
        return torch.linalg.det(similarity_matrix(phis, 1.0).fill_diagonal_(0))

    S = similarity_matrix([a, a + 0.5], 1.0)
    assert float(fork([a, a + 0.5])) == pytest.approx(-float(S[0, 1]) ** 2)
    for spread in (0.1, 0.5, 2.0):
        three = [a, a + spread, a - spread]
        S = similarity_matrix(three, 1.0)
        assert float(fork(three)) == pytest.approx(2 * float(S[0, 1] * S[0, 2] * S[1, 2]))
    alike, apart = [a, a + 0.1, a - 0.1], [a, a + 2.0, a - 2.0]
    assert fork(alike) > fork(apart)                      # the fork's "diversity" is highest for alike learners
    assert diversity(alike, 1.0) < diversity(apart, 1.0)  # eq. 1-2's is highest for learners far apart
