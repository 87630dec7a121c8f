"""trainers.data registry and FaceDataset contract (shared by every reader)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from trainers.data import DATASETS, DatasetError, FaceDataset, canonical_split, dataset_splits, load_dataset
from trainers.data.base import crop_square, resize_square, square_box


def test_registry_names_and_splits():
    assert set(DATASETS) == {"fer2013", "ferplus", "rafdb", "affectnet", "sfew", "afew-va", "affwild2", "folder"}
    for name in DATASETS:
        assert dataset_splits(name)
    assert dataset_splits("AFEW_VA") == ("train", "test", "all")
    assert dataset_splits("RAF-DB") == ("train", "test")
    assert canonical_split("fer2013", "PublicTest") == "publictest"
    assert canonical_split("ferplus", "PrivateTest") == "test"
    with pytest.raises(DatasetError, match="unknown dataset 'mnist'"):
        load_dataset("mnist", None, "train")
    assert issubclass(DatasetError, ValueError)


def test_default_data_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("FER_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetError, match=r"under data \("):
        load_dataset("fer2013", None, "train")


def make(n=6, in_memory=True):
    rng = np.random.default_rng(0)
    return FaceDataset(
        "x", "train", ("a", "b", "c"), np.arange(n) % 3,
        images=rng.integers(0, 256, (n, 8, 8), dtype=np.uint8) if in_memory else None,
        soft_labels=np.full((n, 3), 1 / 3, np.float32), va=rng.uniform(-1, 1, (n, 2)).astype(np.float32),
        files=[f"f{i}.png" for i in range(n)], meta={"video": np.array([f"v{i // 2}" for i in range(n)])},
    )


def test_face_dataset_contract_and_subset():
    ds = make()
    assert len(ds) == 6 and ds.labels.dtype == torch.int64 and ds.images.dtype == torch.uint8
    assert ds.soft_labels.dtype == torch.float32 and ds.va.dtype == torch.float32
    item = ds[4]
    assert set(item) == {"image", "label", "soft", "va", "index"} and item["label"] == 1 and item["index"] == 4
    assert ds[-1]["index"] == 5
    sub = ds.subset([5, 0, 2])
    assert isinstance(sub, FaceDataset) and len(sub) == 3 and sub.label_names == ds.label_names
    assert sub.labels.tolist() == [2, 0, 2]
    assert torch.equal(sub.images[0], ds.images[5]) and torch.equal(sub.va[1], ds.va[0])
    assert sub.files.tolist() == ["f5.png", "f0.png", "f2.png"] and sub.meta["video"].tolist() == ["v2", "v0", "v1"]
    assert sub.subset(torch.tensor([1])).labels.tolist() == [0]
    assert ds.class_counts().tolist() == [2, 2, 2]
    with pytest.raises(ValueError, match="va has 2 rows for 6 labels"):
        FaceDataset("x", "train", ("a",), np.zeros(6), images=np.zeros((6, 4, 4), np.uint8), va=np.zeros((2, 2)))


def test_default_collate_batches_items():
    loader = torch.utils.data.DataLoader(make(), batch_size=4)
    b = next(iter(loader))
    assert b["image"].shape == (4, 8, 8) and b["image"].dtype == torch.uint8
    assert b["label"].tolist() == [0, 1, 2, 0] and b["soft"].shape == (4, 3) and b["va"].shape == (4, 2)


def test_crop_helpers():
    img = np.zeros((100, 200), np.uint8)
    img[20:60, 50:90] = 255
    crop = crop_square(img, (50, 20, 40, 40))
    assert crop.shape == (40, 40) and crop.min() == 255
    # a box leaving the image is padded by replicating the border
    assert crop_square(img, (-10, -10, 30, 30)).shape == (30, 30)
    assert crop_square(img, (150, 80, 20, 20), "inside").shape == (20, 20)
    assert crop_square(img, (150, 80, 100, 100), "inside").shape == img.shape  # does not fit: no crop
    assert crop_square(img, (np.nan,) * 4).shape == img.shape
    assert resize_square(img, 50).shape == (50, 50)
    x, y, w, h = square_box(0, 0, 10, 20, 0.5)
    assert (w, h) == (30, 30) and (x, y) == (-10, -5)
