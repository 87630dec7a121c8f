"""fer2013 reader: Kaggle csv (plain and gzip), Kaggle image folders, cache, quirks and error messages."""
from __future__ import annotations

import gzip
import os
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from trainers.data import DatasetError, dataset_splits, load_dataset
from trainers.data import cache as data_cache
from trainers.data import fer2013 as fer_mod

REAL = Path(__file__).resolve().parents[2] / "shared" / "data"
# The real-data tests use the user's dataset cache (resolved before the fixture below redirects the cache
# to tmp_path), so the 3-second first parse happens once per machine, not once per test run.
REAL_CACHE = data_cache.cache_dir(None)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FER_DESKTOP_CACHE", str(tmp_path / "cache"))


def write_fer_csv(path: Path, rows, header="emotion,pixels,Usage", gz=False, crlf=False) -> None:
    """rows: (emotion, pixels (48,48) uint8 or a raw pixel string, usage)."""
    nl = "\r\n" if crlf else "\n"
    lines = [header]
    for emo, pix, usage in rows:
        text = pix if isinstance(pix, str) else " ".join(str(int(v)) for v in np.asarray(pix).ravel())
        lines.append(f"{emo},{text},{usage}")
    data = (nl.join(lines) + nl).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def make_rows(rng, usages=("Training",) * 3 + ("PublicTest",) * 2 + ("PrivateTest",)):
    rows = []
    for i, u in enumerate(usages):
        img = rng.integers(0, 256, (48, 48), dtype=np.uint8)
        rows.append((i % 7, img, u))
    return rows


def test_splits_spellings_and_contents(tmp_path):
    rng = np.random.default_rng(0)
    rows = make_rows(rng)
    rows[1] = (3, np.full((48, 48), 7, np.uint8), "Training")  # a blank image
    write_fer_csv(tmp_path / "fer2013.csv", rows, crlf=True)
    assert dataset_splits("fer2013") == ("train", "publictest", "privatetest")

    tr = load_dataset("fer2013", tmp_path, "Training")
    assert tr.split == "train" and len(tr) == 3
    assert tr.images.dtype.is_floating_point is False and tuple(tr.images.shape) == (3, 48, 48)
    assert tr.label_names == ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
    assert tr.labels.tolist() == [0, 3, 2]
    np.testing.assert_array_equal(tr.images[0].numpy(), rows[0][1])
    assert tr.info["blank"] == [1]
    item = tr[2]
    assert set(item) == {"image", "label", "index"} and item["label"] == 2 and item["index"] == 2
    assert tuple(item["image"].shape) == (48, 48)

    pt = load_dataset("fer2013", tmp_path, "PublicTest")
    assert len(pt) == 2 and pt.labels.tolist() == [3, 4]
    assert len(load_dataset("fer2013", tmp_path, "val")) == 2
    pv = load_dataset("fer2013", tmp_path, "PRIVATETEST")
    assert len(pv) == 1 and pv.split == "privatetest"
    np.testing.assert_array_equal(pv.images[0].numpy(), rows[5][1])
    with pytest.raises(DatasetError, match="unknown split 'dev'"):
        load_dataset("fer2013", tmp_path, "dev")


def test_gzip_subfolder_env_and_header_variants(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    rows = make_rows(rng)
    write_fer_csv(tmp_path / "fer2013" / "fer2013.csv.gz", rows, gz=True)
    monkeypatch.setenv("FER_DATA_DIR", str(tmp_path))
    ds = load_dataset("fer2013", None, "train")  # data_dir None -> $FER_DATA_DIR
    assert len(ds) == 3 and ds.info["source"].endswith("fer2013.csv.gz")
    np.testing.assert_array_equal(ds.images[2].numpy(), rows[2][1])

    # icml_face_data.csv-style header: other column order, spaces after commas
    other = tmp_path / "other"
    lines = ["emotion, Usage, pixels"] + [
        f"{e}, {u}, {' '.join(map(str, p.ravel()))}" for e, p, u in rows
    ]
    other.mkdir()
    (other / "fer2013.csv").write_text("\n".join(lines) + "\n")
    ds2 = load_dataset("fer2013", other, "publictest")
    np.testing.assert_array_equal(ds2.images.numpy(), np.stack([rows[3][1], rows[4][1]]))


def test_cache_is_used_and_invalidated(tmp_path, monkeypatch):
    rng = np.random.default_rng(2)
    data = tmp_path / "data"
    write_fer_csv(data / "fer2013.csv", make_rows(rng))
    load_dataset("fer2013", data, "train")
    entries = list((tmp_path / "cache").glob("fer2013csv-*.npz"))
    assert len(entries) == 1
    assert not any(p.suffix == ".npz" for p in data.rglob("*"))  # nothing written next to the data

    calls = []
    real_parse = fer_mod.parse_csv
    monkeypatch.setattr(fer_mod, "parse_csv", lambda p: calls.append(p) or real_parse(p))
    assert len(load_dataset("fer2013", data, "train")) == 3
    assert calls == []  # served from the cache

    # a changed file (new mtime/size) is parsed again
    write_fer_csv(data / "fer2013.csv", make_rows(rng, ("Training",) * 4))
    st = (data / "fer2013.csv").stat()
    os.utime(data / "fer2013.csv", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert len(load_dataset("fer2013", data, "train")) == 4
    assert len(calls) == 1
    # ... and the entry of its previous version is gone (it could never be hit again)
    (entry,) = (tmp_path / "cache").glob("fer2013csv-*.npz")
    assert entry != entries[0] and not entries[0].exists()

    # explicit cache_dir option
    load_dataset("fer2013", data, "train", cache_dir=tmp_path / "c2")
    assert list((tmp_path / "c2").glob("fer2013csv-*.npz"))


def test_corrupt_cache_entry_is_rebuilt(tmp_path):
    rng = np.random.default_rng(3)
    write_fer_csv(tmp_path / "fer2013.csv", make_rows(rng))
    load_dataset("fer2013", tmp_path, "train")
    (entry,) = (tmp_path / "cache").glob("fer2013csv-*.npz")
    entry.write_bytes(b"garbage")
    assert len(load_dataset("fer2013", tmp_path, "train")) == 3


def test_duplicates_are_measured(tmp_path, caplog):
    rng = np.random.default_rng(4)
    rows = make_rows(rng)
    rows[3] = (5, rows[0][1], "PublicTest")  # same image as row 0, other split, other label
    write_fer_csv(tmp_path / "fer2013.csv", rows)
    with caplog.at_level("INFO", logger="trainers.data"):
        ds = load_dataset("fer2013", tmp_path, "train")
    assert ds.info["duplicates"] == {"groups": 1, "images": 2, "groups_across_splits": 1,
                                     "groups_with_conflicting_labels": 1}
    assert "blank images" in caplog.text and "bit-identical" in caplog.text


def test_missing_privatetest_is_a_clear_error(tmp_path):
    write_fer_csv(tmp_path / "fer2013.csv", make_rows(np.random.default_rng(5), ("Training", "PublicTest")))
    with pytest.raises(DatasetError, match=r"no PrivateTest rows.*Training \(1\), PublicTest \(1\)"):
        load_dataset("fer2013", tmp_path, "privatetest")


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ("3," + " ".join(["1"] * 2301) + ",Training", "fer2013.csv line 4: expected 2304 pixel values, found 2301"),
        ("9," + " ".join(["1"] * 2304) + ",Training", "fer2013.csv line 4: expected emotion 0..6, found '9'"),
        ("3," + " ".join(["1"] * 2304) + ",Train", "fer2013.csv line 4: expected Usage Training, PublicTest"),
        ("3," + " ".join(["1"] * 2303) + " 1a,Training", "fer2013.csv line 4: expected pixel values as integers"),
        ("3," + " ".join(["1"] * 2303) + " 300,Training", "fer2013.csv line 4: expected pixel values 0..255"),
        ("3," + " ".join(["1"] * 2304), "fer2013.csv line 4: expected 3 comma-separated fields"),
    ],
)
def test_malformed_rows_name_file_and_line(tmp_path, bad_line, message):
    rows = make_rows(np.random.default_rng(6))
    write_fer_csv(tmp_path / "fer2013.csv", rows)
    lines = (tmp_path / "fer2013.csv").read_text().splitlines()
    lines.insert(3, bad_line)  # becomes line 4
    (tmp_path / "fer2013.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=message):
        load_dataset("fer2013", tmp_path, "train")


def test_bad_header(tmp_path):
    (tmp_path / "fer2013.csv").write_text("a,b,c\n1,2,3\n")
    with pytest.raises(DatasetError, match="fer2013.csv line 1: expected a header"):
        load_dataset("fer2013", tmp_path, "train")


def test_missing_dataset_says_what_and_where(tmp_path):
    with pytest.raises(DatasetError) as e:
        load_dataset("fer2013", tmp_path, "train")
    msg = str(e.value)
    assert "fer2013.csv" in msg and str(tmp_path) in msg and "Kaggle" in msg and "train/" in msg


def write_kaggle_folders(root: Path, rng) -> dict:
    made = {}
    for split, classes in (("train", ("angry", "happy", "neutral")), ("test", ("sad", "Happy"))):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for k in range(2):
                img = rng.integers(0, 256, (48, 48), dtype=np.uint8)
                cv2.imwrite(str(d / f"im{k}.png"), img)
                made[(split, c.lower(), k)] = img
    return made


def test_kaggle_image_folders(tmp_path):
    made = write_kaggle_folders(tmp_path / "fer2013", np.random.default_rng(7))
    tr = load_dataset("fer2013", tmp_path, "train")
    assert len(tr) == 6 and tr.in_memory and tr.info["layout"] == "kaggle-folders"
    assert sorted(tr.labels.tolist()) == [0, 0, 3, 3, 6, 6]
    i = next(k for k, f in enumerate(tr.files) if f.endswith(os.path.join("happy", "im1.png")))
    np.testing.assert_array_equal(tr.images[i].numpy(), made[("train", "happy", 1)])
    pt = load_dataset("fer2013", tmp_path, "publictest")  # test/ is read as publictest
    assert sorted(pt.labels.tolist()) == [3, 3, 4, 4] and "publictest" in pt.info["note"]
    with pytest.raises(DatasetError, match="no separate PrivateTest"):
        load_dataset("fer2013", tmp_path, "privatetest")
    # the second load comes from the cache
    assert list((tmp_path / "cache").glob("fer2013-tree-*.npz"))


def test_kaggle_folders_unknown_class(tmp_path):
    write_kaggle_folders(tmp_path, np.random.default_rng(8))
    (tmp_path / "train" / "bored").mkdir()
    with pytest.raises(DatasetError, match="unexpected class folder .*bored"):
        load_dataset("fer2013", tmp_path, "train")


def test_real_fer2013_split_sizes():
    """The real file in ../shared/data (skipped when absent). The first run parses it once (a few
    seconds) into the user's dataset cache; later runs load that cache in well under a second."""
    src = REAL / "fer2013" / "fer2013.csv.gz"
    if not src.is_file():
        pytest.skip("real FER2013 not available")
    cache_dir = REAL_CACHE
    tr = load_dataset("fer2013", REAL, "train", cache_dir=cache_dir)
    t0 = time.perf_counter()
    pt = load_dataset("fer2013", REAL, "publictest", cache_dir=cache_dir)
    assert time.perf_counter() - t0 < 2.0  # cached
    assert len(tr) == 28709 and len(pt) == 3589
    assert tr.class_counts().tolist() == [3995, 436, 4097, 7215, 4830, 3171, 4965]
    assert pt.class_counts().tolist() == [467, 56, 496, 895, 653, 415, 607]
    assert len(tr.info["blank"]) + len(pt.info["blank"]) == 12
    with pytest.raises(DatasetError, match="no PrivateTest rows"):
        load_dataset("fer2013", REAL, "privatetest", cache_dir=cache_dir)


def test_cache_keeps_entries_of_other_files_and_params(tmp_path):
    """Eviction is per slot (kind, source paths, params): two datasets, or one file read at two sizes,
    keep their own entries; only a changed file's older version is removed."""
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"1")
    b.write_bytes(b"2")
    d = tmp_path / "c"
    arr = {"x": np.zeros(2)}
    keys = [data_cache.cache_key("k", [a]), data_cache.cache_key("k", [b]), data_cache.cache_key("k", [a], size=96)]
    for k in keys:
        data_cache.save(k, arr, d)
    assert sorted(p.stem for p in d.glob("*.npz")) == sorted(keys)
    st = a.stat()
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert data_cache.cache_key("k", [a]) == keys[0], "touching a file must not invalidate its entry"
    # a corrected file with the old size and mtime (cp -p, rsync -a) is a new version: keyed on the content
    st = a.stat()
    a.write_bytes(b"3")
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns))
    new = data_cache.cache_key("k", [a])
    assert new != keys[0] and new.rsplit("-", 1)[0] == keys[0].rsplit("-", 1)[0]  # same slot, new version
    data_cache.save(new, arr, d)
    assert sorted(p.stem for p in d.glob("*.npz")) == sorted([new, keys[1], keys[2]])
    data_cache.save("hand-made", arr, d)  # a key not of the KIND-SLOT-VERSION form evicts nothing
    assert len(list(d.glob("*.npz"))) == 4
