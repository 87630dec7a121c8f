"""ferplus reader: fer2013.csv + fer2013new.csv, FERPlus-generated folders, vote rules, errors, real data."""
from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np
import pytest

from trainers.data import DatasetError, dataset_splits, load_dataset
from trainers.data import cache as data_cache
from trainers.data.ferplus import majority_labels

REAL = Path(__file__).resolve().parents[2] / "shared" / "data"
REAL_CACHE = data_cache.cache_dir(None)  # the user's cache, resolved before the fixture redirects it
HEADER = "Usage,Image name,neutral,happiness,surprise,sadness,anger,disgust,fear,contempt,unknown,NF"
NAMES8 = ("neutral", "happy", "surprise", "sad", "angry", "disgust", "fear", "contempt")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FER_DESKTOP_CACHE", str(tmp_path / "cache"))


# (usage, image name, 10 votes, expected majority label or -1)
ROWS = [
    ("Training", "fer0000000.png", [4, 0, 0, 1, 3, 2, 0, 0, 0, 0], -1),   # 4/10 after dropping the 1 -> 4/9: no
    ("Training", "fer0000001.png", [6, 0, 1, 1, 0, 0, 0, 0, 2, 0], 0),    # single votes removed: 6/8 neutral
    ("Training", "", [0, 0, 0, 0, 0, 0, 0, 0, 0, 10], -1),                # dropped by FER+ (no name)
    ("Training", "fer0000002.png", [0, 9, 0, 0, 0, 0, 0, 0, 1, 0], 1),    # happy
    ("Training", "fer0000003.png", [0, 0, 0, 0, 0, 0, 0, 0, 7, 3], -1),   # unknown majority
    ("Training", "fer0000004.png", [0, 0, 0, 0, 0, 0, 0, 6, 2, 2], 7),    # contempt 6/10
    ("PublicTest", "fer0000005.png", [0, 0, 5, 0, 0, 0, 5, 0, 0, 0], -1), # tie 5/5: no strict majority
    ("PublicTest", "fer0000006.png", [0, 0, 0, 8, 2, 0, 0, 0, 0, 0], 3),  # sad
    ("PrivateTest", "fer0000007.png", [1, 0, 0, 0, 0, 0, 9, 0, 0, 0], 6), # fear
]


def write_pair(root: Path, rows=ROWS, rng=None) -> list[np.ndarray]:
    rng = rng or np.random.default_rng(0)
    images = [rng.integers(0, 256, (48, 48), dtype=np.uint8) for _ in rows]
    (root / "fer2013").mkdir(parents=True, exist_ok=True)
    (root / "ferplus").mkdir(parents=True, exist_ok=True)
    lines = ["emotion,pixels,Usage"] + [
        f"{i % 7},{' '.join(map(str, im.ravel()))},{r[0]}" for i, (r, im) in enumerate(zip(rows, images))
    ]
    (root / "fer2013" / "fer2013.csv").write_text("\n".join(lines) + "\n")
    new = [HEADER] + [f"{u},{n},{','.join(map(str, v))}" for u, n, v, _ in rows]
    (root / "ferplus" / "fer2013new.csv").write_text("\n".join(new) + "\n")
    return images


def test_majority_mode_follows_ferplus_rule(tmp_path):
    images = write_pair(tmp_path)
    assert dataset_splits("ferplus") == ("train", "valid", "test")
    tr = load_dataset("ferplus", tmp_path, "Training")
    assert tr.label_names == NAMES8 and tr.split == "train"
    assert tr.labels.tolist() == [0, 1, 7]
    assert tr.meta["fer2013_row"].tolist() == [1, 3, 5]  # row-aligned with fer2013.csv
    for k, row in enumerate(tr.meta["fer2013_row"]):
        np.testing.assert_array_equal(tr.images[k].numpy(), images[row])
    assert tr.soft_labels is None and tr.info["dropped_no_name"] == 1
    va = load_dataset("ferplus", tmp_path, "PublicTest")
    assert va.split == "valid" and va.labels.tolist() == [3]
    te = load_dataset("ferplus", tmp_path, "privatetest")
    assert te.labels.tolist() == [6]
    expected = [r[3] for r in ROWS]
    assert majority_labels(np.array([r[2] for r in ROWS])).tolist() == expected


def test_majority_options(tmp_path):
    write_pair(tmp_path)
    # keep single votes: row 1 becomes 6/10 neutral still; row 0 4/10 still no majority
    tr = load_dataset("ferplus", tmp_path, "train", min_votes=0)
    assert tr.labels.tolist() == [0, 1, 7]
    # a lower threshold (>= 40 %) admits row 0 (neutral 4 of 9 after outlier removal)
    tr = load_dataset("ferplus", tmp_path, "train", majority=0.4)
    assert tr.labels.tolist() == [0, 0, 1, 7]


def test_distribution_mode(tmp_path):
    write_pair(tmp_path)
    tr = load_dataset("ferplus", tmp_path, "train", mode="distribution")
    # kept: rows whose top vote over 10 columns is an emotion -> 0, 1, 3, 5 (row 4: unknown top)
    assert tr.meta["fer2013_row"].tolist() == [0, 1, 3, 5]
    soft = tr.soft_labels.numpy()
    assert soft.shape == (4, 8) and soft.dtype == np.float32
    np.testing.assert_allclose(soft.sum(1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(soft[0], np.array([4, 0, 0, 1, 3, 2, 0, 0]) / 10, rtol=1e-6)
    np.testing.assert_allclose(soft[1], np.array([6, 0, 1, 1, 0, 0, 0, 0]) / 8, rtol=1e-6)
    assert tr.labels.tolist() == [0, 0, 1, 7]
    item = tr[0]
    assert set(item) == {"image", "label", "soft", "index"}
    with pytest.raises(DatasetError, match="unknown mode"):
        load_dataset("ferplus", tmp_path, "train", mode="probability")


def test_row_count_and_usage_mismatch(tmp_path):
    write_pair(tmp_path)
    new = tmp_path / "ferplus" / "fer2013new.csv"
    lines = new.read_text().splitlines()
    new.write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(DatasetError, match="has 8 data rows but fer2013.csv has 9"):
        load_dataset("ferplus", tmp_path, "train")
    lines[4] = lines[4].replace("Training", "PublicTest", 1)
    new.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=r"row mismatch: fer2013new.csv line 5 says PublicTest but "
                                           r"fer2013.csv line 5 says Training"):
        load_dataset("ferplus", tmp_path, "train")


@pytest.mark.parametrize(
    "line, message",
    [
        ("Training,fer0000009.png,1,2,3", "fer2013new.csv line 4: expected 12 comma-separated fields"),
        ("Training,fer0000009.png,1,x,0,0,0,0,0,0,0,0", "fer2013new.csv line 4: expected 10 integer vote counts"),
        ("Train,fer0000009.png,1,0,0,0,0,0,0,0,0,0", "fer2013new.csv line 4: expected Usage"),
    ],
)
def test_malformed_new_csv(tmp_path, line, message):
    write_pair(tmp_path)
    new = tmp_path / "ferplus" / "fer2013new.csv"
    lines = new.read_text().splitlines()
    lines[3] = line
    new.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=message):
        load_dataset("ferplus", tmp_path, "train")


def test_header_checked(tmp_path):
    write_pair(tmp_path)
    new = tmp_path / "ferplus" / "fer2013new.csv"
    new.write_text(new.read_text().replace("contempt", "scorn"))
    with pytest.raises(DatasetError, match="fer2013new.csv line 1: expected the header"):
        load_dataset("ferplus", tmp_path, "train")


def write_folders(root: Path, with_box: bool, rng) -> dict:
    made = {}
    for folder, rows in (("FER2013Train", ROWS[:6]), ("FER2013Valid", ROWS[6:8]), ("FER2013Test", ROWS[8:])):
        d = root / folder
        d.mkdir(parents=True)
        with open(d / "label.csv", "w", newline="") as f:
            w = csv.writer(f)
            for _, name, votes, _ in rows:
                if not name:
                    continue
                img = rng.integers(0, 256, (48, 48), dtype=np.uint8)
                cv2.imwrite(str(d / name), img)
                made[name] = img
                w.writerow([name, "(0, 0, 48, 48)", *votes] if with_box else [name, *votes])
    return made


@pytest.mark.parametrize("with_box", [True, False])
def test_ferplus_generated_folders(tmp_path, with_box):
    made = write_folders(tmp_path / "FERPlus" / "data", with_box, np.random.default_rng(1))
    first = (tmp_path / "FERPlus" / "data" / "FER2013Train" / "label.csv").read_text().splitlines()[0]
    assert first.startswith('fer0000000.png,"(0, 0, 48, 48)",4,') == with_box  # FERPlus's exact format
    tr = load_dataset("ferplus", tmp_path, "train")
    assert tr.labels.tolist() == [0, 1, 7] and tr.info["layout"] == "ferplus-folders"
    assert tr.meta["image_name"].tolist() == ["fer0000001.png", "fer0000002.png", "fer0000004.png"]
    np.testing.assert_array_equal(tr.images[1].numpy(), made["fer0000002.png"])
    assert load_dataset("ferplus", tmp_path, "valid").labels.tolist() == [3]
    assert load_dataset("ferplus", tmp_path, "test").labels.tolist() == [6]
    dist = load_dataset("ferplus", tmp_path, "train", mode="distribution")
    assert len(dist) == 4 and dist.soft_labels.shape == (4, 8)


def test_folder_label_csv_errors(tmp_path):
    write_folders(tmp_path, True, np.random.default_rng(2))
    lab = tmp_path / "FER2013Valid" / "label.csv"
    lab.write_text(lab.read_text() + "fer0000099.png,1,2\n")
    with pytest.raises(DatasetError, match=r"label.csv line 3: expected 'ferNNNNNNN.png"):
        load_dataset("ferplus", tmp_path, "valid")
    lab.write_text('fer0000005.png,"(0, 0, 48, 48)",0,0,5,0,0,0,x,0,0,0\n')
    with pytest.raises(DatasetError, match=r"label.csv line 1: expected a vote count"):
        load_dataset("ferplus", tmp_path, "valid")
    (tmp_path / "FER2013Test" / "label.csv").unlink()
    with pytest.raises(DatasetError, match=r"expected .*FER2013Test.label.csv"):
        load_dataset("ferplus", tmp_path, "test")


def test_missing_dataset_and_missing_images(tmp_path):
    with pytest.raises(DatasetError) as e:
        load_dataset("ferplus", tmp_path, "train")
    assert "fer2013new.csv" in str(e.value) and "FERPlus" in str(e.value) and str(tmp_path) in str(e.value)
    (tmp_path / "fer2013new.csv").write_text(HEADER + "\n")
    with pytest.raises(DatasetError, match=r"expected fer2013.csv or fer2013.csv.gz \(the images for"):
        load_dataset("ferplus", tmp_path, "train")


def test_real_ferplus_alignment():
    """Real fer2013.csv.gz + fer2013new.csv (skipped when absent): row-aligned, FER+ counts."""
    if not (REAL / "fer2013" / "fer2013.csv.gz").is_file() or not (REAL / "ferplus" / "fer2013new.csv").is_file():
        pytest.skip("real FER2013 / FER+ files not available")
    fer = load_dataset("fer2013", REAL, "train", cache_dir=REAL_CACHE)
    fp = load_dataset("ferplus", REAL, "train", cache_dir=REAL_CACHE)
    rows = fp.meta["fer2013_row"]
    assert fp.info["faces_with_labels"] == 28709 - fp.info["dropped_no_name"]
    assert fp.info["dropped_no_name"] == 148
    assert len(fp) == 25060 and fp.num_classes == 8
    # same pixels as the fer2013 rows they claim (train rows come first in both files)
    np.testing.assert_array_equal(fp.images[:500].numpy(), fer.images[rows[:500]].numpy())
    # FER+ relabels, but mostly agrees with FER2013 on happy (fer7 index 3 <-> ferplus8 index 1)
    happy = fp.labels.numpy() == 1
    assert (fer.labels.numpy()[rows[happy]] == 3).mean() > 0.8
    fv = load_dataset("ferplus", REAL, "valid", cache_dir=REAL_CACHE)
    assert len(fv) == 3199 and fv.info["dropped_no_name"] == 10
    with pytest.raises(DatasetError, match="no PrivateTest rows"):
        load_dataset("ferplus", REAL, "test", cache_dir=REAL_CACHE)
