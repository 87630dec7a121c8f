"""affectnet reader: the official training/validation csv lists, face-box crops, classes, VA, errors."""
from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from trainers.data import DatasetError, dataset_splits, load_dataset


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FER_DESKTOP_CACHE", str(tmp_path / "cache"))


HEADER = "subDirectory_filePath,face_x,face_y,face_width,face_height,facial_landmarks,expression,valence,arousal"
# (file, expression, valence, arousal)
ROWS = [
    ("689/737db2483489148d783ef278f43f486c0a97e140fc4b6b61b84363ca.jpg", 1, 0.785714, -0.055556),
    ("392/c4db2f9b7e4b422d14b6e038f0cdc3ecee239b55326e9181ee4520f9.jpg", 0, -0.017253, 0.004313),
    ("468/21772b68dc8c2a11678c8739eca33adb6ccc658600e4da2224080603.jpg", 7, -0.3, 0.2),
    ("944/06e9ae8d3b240eb68fa60534783eacafce2def60a86042f9b7d59544.jpg", 8, 0.1, 0.6),
    ("993/02e06ee5521958b4042dd73abb444220609d96f57b1689abbe87c024.jpg", 9, -2, -2),
    ("979/f675c6a88cdef70a2b96d1b6dd4ba4d9b67a1a5a3a9fbe8c5b1b7e2f.jpg", 10, -2, -2),
    ("120/a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5.jpg", 6, -0.6, 0.7),
]
BOX = (60, 40, 80, 80)  # face_x, face_y, face_width, face_height


def landmarks() -> str:
    pts = [(60 + 80 * (i % 17) / 16, 40 + 80 * (i // 17) / 4) for i in range(68)]
    return ";".join(f"{x:.2f};{y:.2f}" for x, y in pts)


def write_affectnet(root: Path, header_in_val: bool = False, image_shape=(200, 240)) -> Path:
    base = root / "AffectNet"
    lists = base / "Manually_Annotated_file_lists"
    lists.mkdir(parents=True)
    for f, *_ in ROWS:
        p = base / "Manually_Annotated_Images" / f
        p.parent.mkdir(parents=True, exist_ok=True)
        img = np.zeros((*image_shape, 3), np.uint8)
        x, y, w, h = BOX
        img[y : y + h, x : x + w] = 255  # the "face" is the white box
        cv2.imwrite(str(p), img)
    rows = [f"{f},{BOX[0]},{BOX[1]},{BOX[2]},{BOX[3]},{landmarks()},{e},{v},{a}" for f, e, v, a in ROWS]
    (lists / "training.csv").write_text("\n".join([HEADER] + rows) + "\n")
    (lists / "validation.csv").write_text("\n".join(([HEADER] if header_in_val else []) + rows[:3]) + "\n")
    return base


def test_expression_task_8_and_7_classes(tmp_path):
    write_affectnet(tmp_path)
    assert dataset_splits("affectnet") == ("train", "val")
    ds = load_dataset("affectnet", tmp_path, "Training")
    assert ds.label_names == ("neutral", "happy", "sad", "surprise", "fear", "disgust", "angry", "contempt")
    assert ds.labels.tolist() == [1, 0, 7, 6]  # none / uncertain / no-face dropped
    va = ds.va.numpy()
    np.testing.assert_allclose(va[0], [0.785714, -0.055556], rtol=1e-5)
    assert ds.info["dropped"] == {"contempt": 0, "none": 1, "uncertain": 1, "no-face": 1}
    item = ds[0]
    assert set(item) == {"image", "label", "va", "index"} and tuple(item["image"].shape) == (112, 112, 3)
    assert item["image"].float().mean() > 240  # cropped to the white face box

    seven = load_dataset("affectnet", tmp_path, "train", classes=7)
    assert seven.num_classes == 7 and seven.labels.tolist() == [1, 0, 6]


def test_va_task_keeps_none_and_drops_unannotated(tmp_path):
    write_affectnet(tmp_path)
    ds = load_dataset("affectnet", tmp_path, "train", task="va")
    assert ds.labels.tolist() == [1, 0, 7, -1, 6]  # "none" kept for VA, with no class label
    assert np.isfinite(ds.va.numpy()).all()
    both = load_dataset("affectnet", tmp_path, "train", task="both", classes=7)
    assert both.labels.tolist() == [1, 0, 6]
    with pytest.raises(DatasetError, match="task must be"):
        load_dataset("affectnet", tmp_path, "train", task="arousal")


def test_validation_without_header_and_crop_modes(tmp_path):
    write_affectnet(tmp_path, header_in_val=False)
    val = load_dataset("affectnet", tmp_path, "validation")
    assert val.split == "val" and val.labels.tolist() == [1, 0, 7]
    whole = load_dataset("affectnet", tmp_path, "val", crop="none")
    assert whole[0]["image"].float().mean() < 200  # whole picture: mostly black around the box
    margin = load_dataset("affectnet", tmp_path, "val", margin=0.5, image_size=60, channels=1)
    img = margin[0]["image"].numpy()
    assert img.shape == (60, 60) and img[30, 30] > 240 and img[2, 2] < 20  # face centred, border around


def test_precropped_images_are_not_cropped_again(tmp_path):
    write_affectnet(tmp_path, image_shape=(64, 64))  # the box (60..140) lies outside a 64x64 image
    ds = load_dataset("affectnet", tmp_path, "train", image_size=64)
    np.testing.assert_array_equal(ds[0]["image"].numpy()[..., 0],
                                  cv2.imread(ds.files[0], cv2.IMREAD_COLOR)[..., 2])


@pytest.mark.parametrize(
    "row, message",
    [
        ("x/y.jpg,1,2,3,4,0;0,11,0.1,0.1", r"training.csv line 3: expected expression in 0..10, found 11"),
        ("x/y.jpg,1,2,3,4,0;0,1,1.5,0.1", r"training.csv line 3: expected valence in \[-1, 1\] or -2"),
        ("x/y.jpg,1,2,3,4", r"training.csv line 3: expected 9 fields"),
        ("x/y.jpg,a,2,3,4,0;0,1,0.1,0.1", r"training.csv line 3: expected face_x \(a number\), found 'a'"),
    ],
)
def test_malformed_rows(tmp_path, row, message):
    base = write_affectnet(tmp_path)
    p = base / "Manually_Annotated_file_lists" / "training.csv"
    lines = p.read_text().splitlines()
    lines.insert(2, row)
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=message):
        load_dataset("affectnet", tmp_path, "train")


def test_missing_dataset_and_images(tmp_path):
    with pytest.raises(DatasetError) as e:
        load_dataset("affectnet", tmp_path, "train")
    assert "training.csv" in str(e.value) and "request form" in str(e.value)
    base = write_affectnet(tmp_path)
    for p in sorted((base / "Manually_Annotated_Images").rglob("*.jpg"))[:7]:
        p.unlink()
    with pytest.raises(DatasetError, match="image listed in training.csv not found"):
        load_dataset("affectnet", tmp_path, "train")


def test_dataloader_with_workers(tmp_path):
    write_affectnet(tmp_path)
    ds = load_dataset("affectnet", tmp_path, "train", image_size=32)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2)
    batches = list(loader)
    assert sum(len(b["label"]) for b in batches) == 4
    assert batches[0]["image"].shape == (2, 32, 32, 3) and batches[0]["va"].shape == (2, 2)
    assert not math.isnan(float(batches[0]["va"].sum()))
