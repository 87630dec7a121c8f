"""afew-va reader: per-clip JSON with frame-level VA in [-10, 10], landmark crops, subject folds."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from trainers.data import DatasetError, dataset_splits, load_dataset
from trainers.data.afew_va import assign_folds

ACTORS = {"001": "Alice", "002": "Bob", "003": "Alice", "004": "Carol", "005": "Dan", "006": "Eve"}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FER_DESKTOP_CACHE", str(tmp_path / "cache"))


def write_clip(root: Path, clip: str, actor: str, n_frames: int = 3) -> None:
    d = root / clip
    d.mkdir(parents=True)
    frames = {}
    for f in range(n_frames):
        fid = f"{f:05d}"
        img = np.zeros((120, 160, 3), np.uint8)
        img[40:80, 60:100] = 255  # the face: the landmarks' extent
        cv2.imwrite(str(d / f"{fid}.png"), img)
        lm = [[60.0 + 40 * (i % 9) / 8, 40.0 + 40 * (i // 9) / 7] for i in range(68)]
        frames[fid] = {"valence": (f * 3 - 3) % 11, "arousal": -f * 2 - 1, "landmarks": lm}
    doc = {"actor": actor, "frames": frames, "video_id": clip}
    (d / f"{clip}.json").write_text(json.dumps(doc))


def write_afew(root: Path) -> Path:
    base = root / "AFEW-VA"
    for clip, actor in ACTORS.items():
        write_clip(base, clip, actor)
    return base


def test_afew_va_folds_by_actor(tmp_path):
    write_afew(tmp_path)
    assert dataset_splits("afew-va") == ("train", "test", "all")
    allv = load_dataset("afew-va", tmp_path, "all")
    assert len(allv) == 18 and allv.label_names == () and (allv.labels == -1).all()
    va = allv.va.numpy()
    assert va.min() >= -1 and va.max() <= 1
    np.testing.assert_allclose(va[:3], [[0.8, -0.1], [0.0, -0.3], [0.3, -0.5]], rtol=1e-6)  # /10
    item = allv[0]
    assert set(item) == {"image", "label", "va", "index"} and tuple(item["image"].shape) == (112, 112, 3)
    img = item["image"].float().numpy()
    assert img[56, 56].mean() > 240 and img[2, 2].mean() < 20  # landmark box centred, with margin

    seen = {}
    for fold in range(3):
        tr = load_dataset("afew-va", tmp_path, "train", fold=fold, folds=3)
        te = load_dataset("afew-va", tmp_path, "test", fold=fold, folds=3)
        assert len(tr) + len(te) == 18
        assert not set(tr.meta["actor"]) & set(te.meta["actor"])  # subject-independent
        for c in set(te.meta["clip"]):
            seen[c] = fold
    assert sorted(seen) == sorted(ACTORS) and seen["001"] == seen["003"]  # Alice's clips stay together
    # deterministic
    a = load_dataset("afew-va", tmp_path, "test", fold=1, folds=3)
    b = load_dataset("afew-va", tmp_path, "test", fold=1, folds=3)
    assert a.meta["clip"].tolist() == b.meta["clip"].tolist()
    by_clip = load_dataset("afew-va", tmp_path, "test", fold=0, folds=6, split_by="clip")
    assert len(set(by_clip.meta["clip"])) == 1


def test_assign_folds_balanced():
    folds = assign_folds({"a": 10, "b": 7, "c": 5, "d": 3, "e": 2}, 2)
    loads = [sum(n for g, n in {"a": 10, "b": 7, "c": 5, "d": 3, "e": 2}.items() if folds[g] == k) for k in (0, 1)]
    assert abs(loads[0] - loads[1]) <= 3


def test_afew_va_missing_frames_and_options(tmp_path, caplog):
    base = write_afew(tmp_path)
    (base / "002" / "00001.png").unlink()
    with caplog.at_level("WARNING", logger="trainers.data"):
        ds = load_dataset("afew-va", tmp_path, "all", margin=-1)
    assert len(ds) == 17 and "1 annotated frames have no image" in caplog.text
    assert ds.boxes is None  # margin=-1: whole frames
    with pytest.raises(DatasetError, match="fold < folds"):
        load_dataset("afew-va", tmp_path, "train", fold=5, folds=5)


def test_afew_va_errors(tmp_path):
    with pytest.raises(DatasetError) as e:
        load_dataset("afew-va", tmp_path, "train")
    assert "001/" in str(e.value) and "iBUG" in str(e.value)
    base = write_afew(tmp_path)
    (base / "004" / "004.json").write_text('{"actor": "Carol",\n "frames": {"00000": }}')
    with pytest.raises(DatasetError, match=r"004.json line 2: not valid JSON"):
        load_dataset("afew-va", tmp_path, "train")
    (base / "004" / "004.json").write_text(json.dumps({"frames": {"00000": {"valence": 12, "arousal": 0}}}))
    with pytest.raises(DatasetError, match=r"004.json: frame '00000': expected valence/arousal in \[-10, 10\]"):
        load_dataset("afew-va", tmp_path, "train")
