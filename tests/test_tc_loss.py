"""DAF-CNN's triplet-centre loss (trainers/losses/tc.py) on a hand-made 2-D example: the loss (eqs. 6-10),
the feature gradient (eq. 11) and the centre update (eq. 12), each against values worked out by hand."""
from __future__ import annotations

import pytest
import torch

from trainers.losses.tc import (
    TripletCentreLoss, centre_delta, feature_gradient, half_sq_distances, triplet_centre_loss,
)

# three centres in the plane, margin 2
CENTRES = torch.tensor([[0.0, 0.0], [4.0, 0.0], [0.0, 3.0]])
MARGIN = 2.0
# five labelled embeddings + one without a label (ignored)
EMB = torch.tensor([[1.0, 0.0], [2.0, 1.0], [1.0, 2.0], [0.0, 2.0], [3.0, 3.0], [9.0, 9.0]])
LABELS = torch.tensor([0, 0, 1, 2, 0, -1])

# By hand, D = 1/2 |e - c|^2 to c0, c1, c2; q = nearest centre of another class; L = max(D_p + m - D_q, 0):
#   e0 (1,0) y0: 0.5, 4.5, 5.0 -> q=1, L = 0.5 + 2 - 4.5 = -2  -> 0   (inactive)
#   e1 (2,1) y0: 2.5, 2.5, 4.0 -> q=1, L = 2.5 + 2 - 2.5       = 2
#   e2 (1,2) y1: 2.5, 6.5, 1.0 -> q=2, L = 6.5 + 2 - 1.0       = 7.5
#   e3 (0,2) y2: 2.0, 10., 0.5 -> q=0, L = 0.5 + 2 - 2.0       = 0.5
#   e4 (3,3) y0: 9.0, 5.0, 4.5 -> q=2, L = 9.0 + 2 - 4.5       = 6.5
HAND_PER_SAMPLE = [0.0, 2.0, 7.5, 0.5, 6.5]
HAND_Q = [1, 1, 2, 0, 2]
HAND_LOSS = 16.5  # eq. 9: the sum
# eq. 11, (c_q - c_p) [L > 0]:
HAND_GRAD = [[0.0, 0.0], [4.0, 0.0], [-4.0, 3.0], [0.0, -3.0], [0.0, 3.0]]
# eq. 12, Delta_j = sum_{active, p=j} (e - c_j) / (1 + n_pos_j) - sum_{active, q=j} (e - c_j) / (1 + n_neg_j):
#   c0: positives e1, e4 -> ((2,1) + (3,3)) / 3 = (5/3, 4/3); negatives e3 -> (0,2) / 2 = (0, 1)  -> (5/3, 1/3)
#   c1: positives e2 -> (-3,2) / 2 = (-1.5, 1); negatives e1 -> (-2,1) / 2 = (-1, .5)            -> (-1/2, 1/2)
#   c2: positives e3 -> (0,-1) / 2 = (0, -.5); negatives e2, e4 -> ((1,-1) + (3,0)) / 3 = (4/3, -1/3)
#                                                                                                 -> (-4/3, -1/6)
HAND_DELTA = [[5 / 3, 1 / 3], [-0.5, 0.5], [-4 / 3, -1 / 6]]


def test_distances_are_half_squared_euclidean():
    d = half_sq_distances(EMB[:2], CENTRES)
    torch.testing.assert_close(d, torch.tensor([[0.5, 4.5, 5.0], [2.5, 2.5, 4.0]]))


def test_loss_equals_hand_computation():
    r = triplet_centre_loss(EMB, LABELS, CENTRES, MARGIN)
    assert r.loss.item() == pytest.approx(HAND_LOSS)
    torch.testing.assert_close(r.per_sample, torch.tensor(HAND_PER_SAMPLE))
    assert r.nearest_negative.tolist() == HAND_Q
    assert r.active.tolist() == [False, True, True, True, True]
    assert r.labels.tolist() == [0, 0, 1, 2, 0], "the unlabelled item is dropped"
    mean = triplet_centre_loss(EMB, LABELS, CENTRES, MARGIN, reduction="mean")
    assert mean.loss.item() == pytest.approx(HAND_LOSS / 5)


def test_autograd_feature_gradient_is_eq_11():
    e = EMB.clone().requires_grad_(True)
    r = triplet_centre_loss(e, LABELS, CENTRES, MARGIN)
    r.loss.backward()
    hand = torch.tensor(HAND_GRAD + [[0.0, 0.0]])  # the unlabelled item gets no gradient
    torch.testing.assert_close(e.grad, hand)
    torch.testing.assert_close(feature_gradient(CENTRES, r.labels, r.nearest_negative, r.active),
                               torch.tensor(HAND_GRAD))


def test_feature_gradient_eq_11_on_random_batch():
    g = torch.Generator().manual_seed(0)
    c = torch.randn(7, 16, generator=g)
    e = torch.randn(64, 16, generator=g).requires_grad_(True)
    y = torch.randint(0, 7, (64,), generator=g)
    r = triplet_centre_loss(e, y, c, margin=1.0)
    assert 0 < int(r.active.sum()) < 64, "the example should have active and inactive items"
    r.loss.backward()
    torch.testing.assert_close(e.grad, feature_gradient(c, r.labels, r.nearest_negative, r.active))
    assert c.grad is None


def test_centre_update_is_eq_12():
    r = triplet_centre_loss(EMB, LABELS, CENTRES, MARGIN)
    torch.testing.assert_close(centre_delta(r, CENTRES), torch.tensor(HAND_DELTA))

    tc = TripletCentreLoss(3, 2, margin=MARGIN, centre_lr=0.5)
    tc.centres.copy_(CENTRES)
    res = tc(EMB.clone().requires_grad_(True), LABELS)
    assert res.loss.item() == pytest.approx(HAND_LOSS)
    tc.update_centres()
    torch.testing.assert_close(tc.centres, CENTRES + 0.5 * torch.tensor(HAND_DELTA))
    assert tc.update_centres() is None, "one update per forward"
    # the update moves each centre towards its active samples: the loss on the same batch goes down
    assert triplet_centre_loss(EMB, LABELS, tc.centres, MARGIN).loss.item() < HAND_LOSS


def test_centres_init_and_state():
    g = torch.Generator().manual_seed(0)
    tc = TripletCentreLoss(7, 4096, margin=11.0, generator=g)
    assert tc.centres.shape == (7, 4096) and not tc.centres.requires_grad
    assert list(tc.parameters()) == [], "centres are a buffer, not an optimiser parameter"
    assert abs(tc.centres.mean().item()) < 1e-3 and tc.centres.std().item() == pytest.approx(0.01, rel=0.02)
    other = TripletCentreLoss(7, 4096, margin=11.0)
    other.load_state_dict(tc.state_dict())
    assert torch.equal(other.centres, tc.centres)
    with pytest.raises(ValueError):
        TripletCentreLoss(3, 2, margin=1.0, reduction="max")
    with pytest.raises(ValueError):
        triplet_centre_loss(EMB, torch.zeros(6, dtype=torch.long), CENTRES[:1], MARGIN)


def test_class_separation_by_hand():
    from trainers.losses.tc import class_separation

    # two classes on a line: class 0 at x = 0 and 2 (mean 1), class 1 at x = 10 and 12 (mean 11)
    emb = torch.tensor([[0.0, 0.0], [2.0, 0.0], [10.0, 0.0], [12.0, 0.0]])
    lab = torch.tensor([0, 0, 1, 1])
    s = class_separation(emb, lab)
    # D = 1/2 d^2: own centre 1/2 * 1 = 0.5 for every item; nearest other: 1/2 * 11^2, 1/2 * 9^2, 1/2 * 9^2, 1/2 * 11^2
    assert s["intra"] == pytest.approx(0.5)
    assert s["inter"] == pytest.approx((60.5 + 40.5 + 40.5 + 60.5) / 4)
    assert s["ratio"] == pytest.approx(0.5 / 50.5)
    # against given centres, with the hinge: D_own + m <= D_other
    c = torch.tensor([[1.0, 0.0], [11.0, 0.0], [100.0, 0.0]])  # an unused third class is left out
    s = class_separation(emb, lab, c, margin=45.0)
    assert s["hinge_met"] == pytest.approx(0.5)  # 0.5 + 45 <= 60.5 for two items, not <= 40.5 for the others
    # unlabelled items are ignored
    s2 = class_separation(torch.cat([emb, torch.zeros(1, 2)]), torch.cat([lab, torch.tensor([-1])]))
    assert s2["ratio"] == pytest.approx(0.5 / 50.5)
