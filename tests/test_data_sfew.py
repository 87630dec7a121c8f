"""sfew reader: Train/Val emotion folders, unlabelled Test, spellings, errors."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from trainers.data import DatasetError, dataset_splits, load_dataset


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FER_DESKTOP_CACHE", str(tmp_path / "cache"))


def write_sfew(root: Path, lower: bool = False) -> None:
    rng = np.random.default_rng(0)
    split_names = ("train", "val", "test") if lower else ("Train", "Val", "Test")
    for split, classes in zip(split_names[:2], (("Angry", "Happy", "Surprise"), ("Neutral", "Sad"))):
        for c in classes:
            d = root / split / (c.lower() if lower else c)
            d.mkdir(parents=True)
            for k in range(2):
                # SFEW aligned faces are 143x181 (w x h): not square
                cv2.imwrite(str(d / f"{c}_{k:03d}.png"), rng.integers(0, 256, (181, 143, 3), dtype=np.uint8))
    t = root / split_names[2]
    t.mkdir(parents=True)
    for k in range(3):
        cv2.imwrite(str(t / f"test_{k}.png"), rng.integers(0, 256, (181, 143, 3), dtype=np.uint8))


@pytest.mark.parametrize("lower", [False, True])
def test_sfew_splits(tmp_path, lower):
    write_sfew(tmp_path / "SFEW_2.0", lower)
    assert dataset_splits("sfew") == ("train", "val", "test")
    tr = load_dataset("sfew", tmp_path, "Train")
    assert tr.label_names == ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
    assert tr.labels.tolist() == [0, 0, 3, 3, 5, 5]
    assert tuple(tr[0]["image"].shape) == (112, 112, 3)
    va = load_dataset("sfew", tmp_path, "validation", in_memory=True, image_size=48, channels=1)
    assert va.labels.tolist() == [6, 6, 4, 4] and tuple(va.images.shape) == (4, 48, 48)
    te = load_dataset("sfew", tmp_path, "test")
    assert te.labels.tolist() == [-1, -1, -1] and te.info["labelled"] is False


def test_sfew_aligned_faces_nesting(tmp_path):
    d = tmp_path / "Train" / "Train_Aligned_Faces" / "Fear"
    d.mkdir(parents=True)
    cv2.imwrite(str(d / "a.png"), np.zeros((181, 143, 3), np.uint8))
    assert load_dataset("sfew", tmp_path, "train").labels.tolist() == [2]


def test_sfew_errors(tmp_path):
    with pytest.raises(DatasetError) as e:
        load_dataset("sfew", tmp_path, "train")
    assert "Train/" in str(e.value) and "EmotiW" in str(e.value)
    write_sfew(tmp_path)
    (tmp_path / "Train" / "Bored").mkdir()
    with pytest.raises(DatasetError, match="unexpected folder .*Bored"):
        load_dataset("sfew", tmp_path, "train")
