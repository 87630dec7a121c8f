"""folder reader: generic class-folder trees and path,label / path,valence,arousal csv lists."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from trainers.data import DatasetError, load_dataset


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FER_DESKTOP_CACHE", str(tmp_path / "cache"))


def img(path: Path, value: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((30, 40, 3), value, np.uint8))


def test_class_tree_label_order_is_shared_by_splits(tmp_path):
    for c in ("Happiness", "Anger", "neutral"):
        img(tmp_path / "train" / c / "a.png")
    img(tmp_path / "Validation" / "happy" / "b.jpg")
    img(tmp_path / "train" / "Happiness" / "c.jpg")
    tr = load_dataset("folder", tmp_path, "train")
    assert tr.label_names == ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")  # fer7
    assert sorted(tr.labels.tolist()) == [0, 3, 3, 6]
    va = load_dataset("folder", tmp_path, "val")
    assert va.label_names == tr.label_names and va.labels.tolist() == [3]
    assert tuple(va[0]["image"].shape) == (112, 112, 3)
    own = load_dataset("folder", tmp_path, "train", label_set="rafdb7")
    assert own.label_names[0] == "surprise" and sorted(own.labels.tolist()) == [3, 3, 5, 6]


def test_unknown_class_names_sorted(tmp_path):
    img(tmp_path / "train" / "cat" / "a.png")
    img(tmp_path / "test" / "dog" / "b.png")
    ds = load_dataset("folder", tmp_path, "test")
    assert ds.label_names == ("cat", "dog") and ds.labels.tolist() == [1]


def test_csv_labels_and_va(tmp_path):
    img(tmp_path / "imgs" / "a.png", 10)
    img(tmp_path / "imgs" / "b.png", 200)
    (tmp_path / "train.csv").write_text("path,label,valence,arousal\nimgs/a.png,Happy,0.5,-0.5\nimgs/b.png,,,\n")
    ds = load_dataset("folder", tmp_path, "train", image_size=20, channels=1)
    assert ds.labels.tolist() == [3, -1]
    va = ds.va.numpy()
    np.testing.assert_allclose(va[0], [0.5, -0.5]) and np.isnan(va[1]).all()
    assert tuple(ds[1]["image"].shape) == (20, 20) and int(ds[1]["image"][10, 10]) == 200
    (tmp_path / "test.csv").write_text("path,label\nimgs/a.png,2\n")
    t = load_dataset("folder", tmp_path, "test", label_set="fer7")
    assert t.labels.tolist() == [2]
    (tmp_path / "val.csv").write_text("path,valence,arousal\nimgs/a.png,0.1,0.2\n")
    v = load_dataset("folder", tmp_path, "val")
    assert (v.labels == -1).all() and v.va.shape == (1, 2)


@pytest.mark.parametrize(
    "content, message",
    [
        ("file,label\na.png,happy\n", r"train.csv line 1: expected a header 'path,label'"),
        ("path,label\nimgs/a.png,happy\nimgs/a.png,bored\n", r"train.csv line 3: expected a class among"),
        ("path,label\nimgs/a.png\n", r"train.csv line 2: expected 2 fields"),
        ("path,valence,arousal\nimgs/a.png,2,0\n", r"train.csv line 2: expected valence in \[-1, 1\]"),
        ("path,valence,arousal\nimgs/a.png,x,0\n", r"train.csv line 2: expected valence \(a number\)"),
        ("path,label\nimgs/zz.png,happy\n", r"image listed in train.csv not found: .*zz.png"),
    ],
)
def test_csv_errors(tmp_path, content, message):
    img(tmp_path / "imgs" / "a.png")
    (tmp_path / "train.csv").write_text(content)
    with pytest.raises(DatasetError, match=message):
        load_dataset("folder", tmp_path, "train", label_set="fer7" if "bored" in content else None)


def test_missing(tmp_path):
    with pytest.raises(DatasetError, match="expected .*train/<class>/"):
        load_dataset("folder", tmp_path, "train")
