"""trainers.metrics against scikit-learn and numpy references on random data."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from trainers import metrics as M


@pytest.mark.parametrize("seed", range(5))
def test_classification_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    k = 7
    t = rng.integers(0, k, 300)
    p = np.where(rng.random(300) < 0.6, t, rng.integers(0, k, 300))
    if seed % 2:
        p[p == 1] = 2  # class 1 never predicted
    if seed == 2:
        t[t == 5] = 6  # class 5 absent from the truth (still predicted)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert M.accuracy(t, p) == pytest.approx(skm.accuracy_score(t, p))
        assert M.mean_class_accuracy(t, p, k) == pytest.approx(skm.balanced_accuracy_score(t, p))
        assert M.macro_f1(t, p, k) == pytest.approx(skm.f1_score(t, p, average="macro"))
        assert M.macro_f1(t, p, labels=range(k)) == pytest.approx(
            skm.f1_score(t, p, labels=list(range(k)), average="macro", zero_division=0))
    np.testing.assert_array_equal(M.confusion_matrix(t, p, k), skm.confusion_matrix(t, p, labels=range(k)))
    # torch tensors work the same
    assert M.accuracy(torch.from_numpy(t), torch.from_numpy(p)) == pytest.approx(skm.accuracy_score(t, p))


def test_unlabelled_items_are_ignored_and_report():
    t = np.array([0, 1, 2, -1, 2, 1])
    p = np.array([0, 2, 2, 1, 2, 1])
    names = ["a", "b", "c", "d"]  # class d never occurs
    r = M.classification_report(t, p, names)
    assert r["n"] == 5 and r["accuracy"] == pytest.approx(4 / 5)
    assert r["confusion_matrix"] == [[1, 0, 0, 0], [0, 1, 1, 0], [0, 0, 2, 0], [0, 0, 0, 0]]
    assert r["mean_class_accuracy"] == pytest.approx((1 + 0.5 + 1) / 3)
    f1_b, f1_c = 2 / 3, 0.8
    assert r["macro_f1"] == pytest.approx((1 + f1_b + f1_c) / 3)
    assert r["per_class"]["c"] == {"precision": pytest.approx(2 / 3), "recall": 1.0, "f1": pytest.approx(0.8),
                                   "support": 2}
    json.dumps(r)  # plain types only
    text = M.format_classification_report(r)
    assert "accuracy" in text and "80.00 %" in text and "true \\ predicted" in text
    with pytest.raises(ValueError, match="differ in length"):
        M.accuracy([1, 2], [1])


def test_confusion_png(tmp_path):
    cm = M.confusion_matrix([0, 1, 2, 2], [0, 2, 2, 1], 3)
    out = M.save_confusion_png(cm, ["angry", "happy", "neutral"], tmp_path / "sub" / "cm.png", title="test")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    M.save_confusion_png(cm, ["a", "b", "c"], tmp_path / "raw.png", normalize=False)
    assert (tmp_path / "raw.png").stat().st_size > 1000


def ccc_ref(t, p):
    return 2 * np.cov(t, p, bias=True)[0, 1] / (t.var() + p.var() + (t.mean() - p.mean()) ** 2)


@pytest.mark.parametrize("seed", range(4))
def test_regression_matches_numpy(seed):
    rng = np.random.default_rng(seed)
    t = rng.uniform(-1, 1, (200, 2))
    p = np.clip(0.7 * t + rng.normal(0, 0.3, (200, 2)) + 0.1, -1, 1)
    np.testing.assert_allclose(M.rmse(t, p), np.sqrt(((t - p) ** 2).mean(0)))
    np.testing.assert_allclose(M.sagr(t, p), (np.sign(t) == np.sign(p)).mean(0))
    np.testing.assert_allclose(M.pcc(t, p), [np.corrcoef(t[:, j], p[:, j])[0, 1] for j in range(2)])
    np.testing.assert_allclose(M.ccc(t, p), [ccc_ref(t[:, j], p[:, j]) for j in range(2)])
    assert M.ccc(t[:, 0], p[:, 0]) == pytest.approx(ccc_ref(t[:, 0], p[:, 0]))
    r = M.regression_report(torch.from_numpy(t), torch.from_numpy(p))
    assert r["n"] == 200
    assert r["arousal"]["ccc"] == pytest.approx(ccc_ref(t[:, 1], p[:, 1]))
    assert r["valence"]["pcc"] == pytest.approx(np.corrcoef(t[:, 0], p[:, 0])[0, 1])
    assert r["mean_ccc"] == pytest.approx((r["valence"]["ccc"] + r["arousal"]["ccc"]) / 2)
    json.dumps(r)
    assert "CCC" in M.format_regression_report(r)


def test_regression_edge_cases():
    t = np.array([[0.5, 0.1], [np.nan, 0.2], [-0.5, 0.3], [0.2, -0.1]])
    p = np.array([[0.4, 0.1], [0.1, 0.2], [-0.1, 0.3], [0.0, 0.0]])
    r = M.regression_report(t, p)
    assert r["n"] == 3  # the NaN row is left out
    assert M.ccc([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]) == pytest.approx(1.0)
    assert M.ccc([1.0, 2.0, 3.0], [2.0, 3.0, 4.0]) < 1.0  # a bias lowers CCC but not PCC
    assert M.pcc([1.0, 2.0, 3.0], [2.0, 3.0, 4.0]) == pytest.approx(1.0)
    assert M.pcc([1.0, 2.0, 3.0], [0.5, 0.5, 0.5]) == 0.0  # constant prediction
    assert M.ccc([1.0, 2.0, 3.0], [0.5, 0.5, 0.5]) == 0.0
    assert M.sagr([0.5, -0.5, 0.0], [0.1, 0.2, 0.0]) == pytest.approx(2 / 3)
