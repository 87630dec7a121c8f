"""The one evaluator (trainers.evaluate): the by-name label policy, logits and a model's own probabilities,
the numbers against sklearn, and the merge of several processes' shares."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trainers.data.batches import Batch
from trainers.evaluate import EvalError, evaluate, match_labels


def _batches(y, chunks=3):
    y = torch.as_tensor(y)
    return [Batch([torch.zeros(len(part), 1, 2, 2)], part, torch.arange(len(part))) for part in y.chunk(chunks)]


def _stepper(outputs):
    it = iter(outputs)
    return lambda batch: next(it)


def test_label_policy_by_name():
    m = match_labels(["Happiness", "anger", "contempt"], ["angry", "happy", "sad"])
    assert m.names == ["angry", "happy"] and m.cols == [1, 0] and m.data_index == [0, 1]
    assert any("contempt" in n for n in m.notes)
    assert m.to_shared(torch.tensor([0, 1, 2, -1])).tolist() == [0, 1, -1, -1]
    assert match_labels(["a", "b"], ["a", "b"]).identity
    with pytest.raises(EvalError, match="no class in common"):
        match_labels(["cat"], ["dog"])


def test_logits_and_probs_give_the_same_metrics_and_loss():
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 30)
    logits = torch.from_numpy(rng.normal(size=(30, 4))).float() + 2 * F.one_hot(torch.as_tensor(y), 4)
    parts = logits.chunk(3)
    a = evaluate(_stepper([{"logits": p} for p in parts]), _batches(y), list("abcd"))
    b = evaluate(_stepper([{"probs": torch.softmax(p, 1)} for p in parts]), _batches(y), list("abcd"))
    pred = logits.argmax(1).numpy()
    assert a["accuracy"] == pytest.approx(100 * accuracy_score(y, pred))
    assert a["mean_class_accuracy"] == pytest.approx(100 * balanced_accuracy_score(y, pred))
    assert a["macro_f1"] == pytest.approx(100 * f1_score(y, pred, average="macro"))
    assert a["loss"] == pytest.approx(F.cross_entropy(logits, torch.as_tensor(y)).item(), rel=1e-6)
    for k in ("accuracy", "mean_class_accuracy", "macro_f1", "confusion_matrix", "n"):
        assert a[k] == b[k], k
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)


def test_shared_classes_and_gathered_shares():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 24)  # dataset classes angry, happy, sad; the model knows happy, angry, contempt
    logits = torch.from_numpy(rng.normal(size=(24, 3))).float()
    m = match_labels(["happy", "angry", "contempt"], ["angry", "happy", "sad"])
    res = evaluate(_stepper([{"logits": p} for p in logits.chunk(3)]), _batches(y), ["angry", "happy", "sad"],
                   match=m)
    keep = y != 2
    pred = logits[:, [1, 0]].argmax(1).numpy()
    assert res["n"] == int(keep.sum())
    assert res["accuracy"] == pytest.approx(100 * (pred[keep] == y[keep]).mean())
    # two "processes", each with half the batches: the merged numbers are the whole split's
    whole = evaluate(_stepper([{"logits": p} for p in logits.chunk(4)]), _batches(y, 4), list("abc"))
    shares = []
    gather = lambda obj: shares.append(obj) or shares  # noqa: E731
    first = evaluate(_stepper([{"logits": p} for p in logits.chunk(4)[:2]]), _batches(y, 4)[:2], list("abc"),
                     gather=lambda o: [o])
    assert first["n"] == 12
    evaluate(_stepper([{"logits": p} for p in logits.chunk(4)[:2]]), _batches(y, 4)[:2], list("abc"), gather=gather)
    merged = evaluate(_stepper([{"logits": p} for p in logits.chunk(4)[2:]]), _batches(y, 4)[2:], list("abc"),
                      gather=gather)
    for k in ("accuracy", "macro_f1", "confusion_matrix", "n"):
        assert merged[k] == whole[k], k
    assert merged["loss"] == pytest.approx(whole["loss"], rel=1e-9)
