"""rafdb reader: the official 'basic' layout (aligned jpgs + list_patition_label.txt), lazy and in memory."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from trainers.data import DatasetError, dataset_splits, load_dataset


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FER_DESKTOP_CACHE", str(tmp_path / "cache"))


LINES = ["train_00001.jpg 5", "train_00002.jpg 1", "test_0001.jpg 4", "train_00003.jpg 7", "test_0002.jpg 3"]


def write_rafdb(root: Path, lines=LINES, suffix="_aligned") -> Path:
    basic = root / "basic"
    (basic / "EmoLabel").mkdir(parents=True)
    (basic / "Image" / "aligned").mkdir(parents=True)
    (basic / "EmoLabel" / "list_patition_label.txt").write_text("\n".join(lines) + "\n")
    for k, line in enumerate(lines):
        name = line.split()[0]
        img = np.zeros((100, 100, 3), np.uint8)
        img[:, :50] = (0, 0, 255)  # BGR red on the left
        img[:, 50:] = (k * 40, 255, 0)
        cv2.imwrite(str(basic / "Image" / "aligned" / name.replace(".jpg", f"{suffix}.jpg")), img)
    return basic


def test_rafdb_basic_layout_lazy(tmp_path):
    write_rafdb(tmp_path)
    assert dataset_splits("rafdb") == ("train", "test")
    tr = load_dataset("rafdb", tmp_path, "train")
    assert tr.label_names == ("surprise", "fear", "disgust", "happy", "sad", "angry", "neutral")
    assert tr.labels.tolist() == [4, 0, 6] and tr.images is None and len(tr) == 3
    assert tr.files[0].endswith("train_00001_aligned.jpg")
    item = tr[0]
    img = item["image"]
    assert img.dtype == torch.uint8 and tuple(img.shape) == (112, 112, 3)
    assert img[56, 10, 0] > 200 and img[56, 10, 2] < 60  # RGB order: red on the left
    te = load_dataset("rafdb", tmp_path, "TEST")
    assert te.labels.tolist() == [3, 2]
    grey = load_dataset("rafdb", tmp_path, "train", image_size=64, channels=1)
    assert tuple(grey[1]["image"].shape) == (64, 64)


def test_rafdb_in_memory_is_cached(tmp_path):
    write_rafdb(tmp_path)
    ds = load_dataset("rafdb", tmp_path, "train", in_memory=True, image_size=48)
    assert ds.images is not None and tuple(ds.images.shape) == (3, 48, 48, 3)
    lazy = load_dataset("rafdb", tmp_path, "train", image_size=48)
    np.testing.assert_array_equal(ds.images[2].numpy(), lazy[2]["image"].numpy())
    assert len(list((tmp_path / "cache").glob("rafdb-train-faces-*.npz"))) == 1
    again = load_dataset("rafdb", tmp_path, "train", in_memory=True, image_size=48)
    assert torch.equal(again.images, ds.images)


def test_rafdb_files_without_aligned_suffix_and_other_roots(tmp_path):
    write_rafdb(tmp_path / "RAF-DB", suffix="")
    ds = load_dataset("rafdb", tmp_path, "train")
    assert ds.files[0].endswith("train_00001.jpg")


@pytest.mark.parametrize(
    "bad, message",
    [
        ("train_00004.jpg 8", r"list_patition_label.txt line 3: expected a label in 1..7, found 8"),
        ("train_00004.jpg", r"list_patition_label.txt line 3: expected '<image name> <label 1..7>'"),
        ("train_00004.jpg x", r"list_patition_label.txt line 3: expected a label \(an integer\), found 'x'"),
    ],
)
def test_rafdb_malformed_label_lines(tmp_path, bad, message):
    basic = write_rafdb(tmp_path)
    lab = basic / "EmoLabel" / "list_patition_label.txt"
    lines = lab.read_text().splitlines()
    lines.insert(2, bad)
    lab.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=message):
        load_dataset("rafdb", tmp_path, "train")


def test_rafdb_missing_image_and_dataset(tmp_path):
    basic = write_rafdb(tmp_path)
    (basic / "Image" / "aligned" / "train_00002_aligned.jpg").unlink()
    with pytest.raises(DatasetError, match=r"1 images listed in .* are not in .*aligned \(first: train_00002_aligned.jpg\)"):
        load_dataset("rafdb", tmp_path, "train")
    with pytest.raises(DatasetError) as e:
        load_dataset("rafdb", tmp_path / "nothing", "train")
    msg = str(e.value)
    assert "list_patition_label.txt" in msg and "Image/aligned" in msg and "request" in msg
    # a file that vanished after loading: a clear error from __getitem__
    ds = load_dataset("rafdb", tmp_path, "test")
    Path(ds.files[0]).unlink()
    with pytest.raises(DatasetError, match="image file not found"):
        ds[0]


def test_rafdb_unknown_option(tmp_path):
    write_rafdb(tmp_path)
    with pytest.raises(DatasetError, match="unknown option.*imagesize"):
        load_dataset("rafdb", tmp_path, "train", imagesize=64)
