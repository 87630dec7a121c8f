"""Label sets and the valence/arousal anchors."""
from __future__ import annotations

import numpy as np
import pytest

from ferengine.labels import AV_ANCHORS, LABEL_SETS, anchor_matrix, canonical, estimate_va


def test_every_class_of_every_label_set_has_an_anchor_in_range():
    for name, labels in LABEL_SETS.items():
        _, mask = anchor_matrix(labels)
        assert mask.all(), f"{name}: {[c for c, m in zip(labels, mask) if not m]} lack an anchor"
    assert set(AV_ANCHORS) == {"angry", "disgust", "fear", "happy", "sad", "surprise", "neutral", "contempt"}
    for v, a in AV_ANCHORS.values():
        assert -1.0 <= v <= 1.0 and -1.0 <= a <= 1.0


def test_anchor_values_are_the_documented_ones():
    # Russell & Mehrabian (1977) pleasure/arousal ratings (see ferengine/labels.py); contempt is ours
    assert AV_ANCHORS == {
        "angry": (-0.51, 0.59), "disgust": (-0.60, 0.35), "fear": (-0.64, 0.60), "happy": (0.81, 0.51),
        "sad": (-0.63, -0.27), "surprise": (0.40, 0.67), "neutral": (0.0, 0.0), "contempt": (-0.55, 0.20),
    }


def test_anchor_geometry_is_plausible():
    # the circumplex facts any published placement satisfies
    assert AV_ANCHORS["neutral"] == (0.0, 0.0)
    assert AV_ANCHORS["happy"][0] > 0.5
    for neg in ("angry", "disgust", "fear", "sad", "contempt"):
        assert AV_ANCHORS[neg][0] < 0
    assert AV_ANCHORS["sad"][1] < 0 < AV_ANCHORS["fear"][1]
    assert AV_ANCHORS["surprise"][1] > AV_ANCHORS["sad"][1]


@pytest.mark.parametrize("set_name", sorted(LABEL_SETS))
def test_one_hot_gives_the_anchor(set_name):
    labels = LABEL_SETS[set_name]
    for k, cls in enumerate(labels):
        p = np.zeros(len(labels))
        p[k] = 1.0
        assert estimate_va(p, labels) == pytest.approx(AV_ANCHORS[cls], abs=1e-12)


def test_one_hot_happy_equals_happy_anchor():
    labels = LABEL_SETS["fer7"]
    p = [0.0] * 7
    p[labels.index("happy")] = 1.0
    assert estimate_va(p, labels) == AV_ANCHORS["happy"]


def test_weighted_mean_and_range():
    labels = ("happy", "sad")
    v, a = estimate_va([0.25, 0.75], labels)
    assert v == pytest.approx(0.25 * AV_ANCHORS["happy"][0] + 0.75 * AV_ANCHORS["sad"][0])
    assert a == pytest.approx(0.25 * AV_ANCHORS["happy"][1] + 0.75 * AV_ANCHORS["sad"][1])
    rng = np.random.default_rng(0)
    labels = LABEL_SETS["ferplus8"]
    for p in rng.dirichlet(np.full(8, 0.3), size=200):
        v, a = estimate_va(p, labels)
        assert -1.0 <= v <= 1.0 and -1.0 <= a <= 1.0
    # unnormalised input is renormalised
    assert estimate_va([2.0, 6.0], ("happy", "sad")) == pytest.approx(estimate_va([0.25, 0.75], ("happy", "sad")))


def test_classes_without_anchor_are_left_out_and_renormalised():
    labels = ("happy", "other", "sad")
    assert estimate_va([0.5, 0.5, 0.0], labels) == pytest.approx(AV_ANCHORS["happy"])
    assert estimate_va([0.0, 1.0, 0.0], labels) == (0.0, 0.0)  # no anchored mass: neutral point
    assert estimate_va([0.0, 0.0], ("happy", "sad")) == (0.0, 0.0)


def test_aliases_resolve_and_bad_lengths_raise():
    assert canonical(" Happiness ") == "happy"
    assert estimate_va([1.0], ["Happiness"]) == pytest.approx(AV_ANCHORS["happy"])
    with pytest.raises(ValueError, match="3 probabilities for 2 labels"):
        estimate_va([0.2, 0.3, 0.5], ("happy", "sad"))
