"""affwild2 reader (VA track): per-video annotation txt + cropped_aligned frames."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from trainers.data import DatasetError, dataset_splits, load_dataset


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FER_DESKTOP_CACHE", str(tmp_path / "cache"))


def write_affwild2(root: Path) -> Path:
    base = root / "Aff-Wild2"
    ann = base / "6th_ABAW_Annotations" / "VA_Estimation_Challenge"
    videos = {
        "Train_Set": {"1-30-1280x720": ["0.1,0.2", "-5,-5", "0.3,-0.4", "0.5,0.6"],
                      "video10_left": ["-0.25,0.75", "0.0,0.0"]},
        "Validation_Set": {"118-30-640x480": ["0.9,-0.9", "-0.5,0.5", "-5,0.2"]},
    }
    for split, vids in videos.items():
        (ann / split).mkdir(parents=True)
        for v, lines in vids.items():
            (ann / split / f"{v}.txt").write_text("valence,arousal\n" + "\n".join(lines) + "\n")
            d = base / "cropped_aligned" / v
            d.mkdir(parents=True)
            for k in range(len(lines)):
                if (v, k) == ("1-30-1280x720", 3):
                    continue  # no face found in frame 4: no image
                cv2.imwrite(str(d / f"{k + 1:05d}.jpg"), np.full((112, 112, 3), 40 * k, np.uint8))
    return ann


def test_affwild2_train_val(tmp_path, caplog):
    write_affwild2(tmp_path)
    assert dataset_splits("affwild2") == ("train", "val")
    with caplog.at_level("INFO", logger="trainers.data"):
        tr = load_dataset("affwild2", tmp_path, "Train")
    assert len(tr) == 4 and (tr.labels == -1).all()
    assert tr.meta["video"].tolist() == ["1-30-1280x720", "1-30-1280x720", "video10_left", "video10_left"]
    assert tr.meta["frame"].tolist() == [1, 3, 1, 2]  # 1-based; frame 2 invalid (-5), frame 4 no image
    np.testing.assert_allclose(tr.va.numpy(), [[0.1, 0.2], [0.3, -0.4], [-0.25, 0.75], [0, 0]], rtol=1e-6)
    assert tr.info["dropped_invalid"] == 1 and tr.info["dropped_no_image"] == 1
    assert "1 invalid -5 frames, 1 without an image" in caplog.text
    item = tr[1]
    assert tuple(item["image"].shape) == (112, 112, 3) and abs(int(item["image"][5, 5, 0]) - 80) <= 2
    val = load_dataset("affwild2", tmp_path, "validation", image_size=56, channels=1)
    assert len(val) == 2 and tuple(val[0]["image"].shape) == (56, 56)


@pytest.mark.parametrize(
    "content, message",
    [
        ("valence,arousal\n0.1,0.2\n0.1;0.2\n", r"1-30-1280x720.txt line 3: expected 'valence,arousal' \(two numbers\)"),
        ("valence,arousal\n0.1,0.2\n1.5,0.2\n", r"1-30-1280x720.txt line 3: expected valence and arousal in \[-1, 1\] or -5"),
        ("0.1,0.2\n", r"1-30-1280x720.txt line 1: expected the header 'valence,arousal'"),
    ],
)
def test_affwild2_malformed(tmp_path, content, message):
    ann = write_affwild2(tmp_path)
    (ann / "Train_Set" / "1-30-1280x720.txt").write_text(content)
    with pytest.raises(DatasetError, match=message):
        load_dataset("affwild2", tmp_path, "train")


def test_affwild2_missing(tmp_path):
    with pytest.raises(DatasetError) as e:
        load_dataset("affwild2", tmp_path, "train")
    assert "VA_Estimation_Challenge/Train_Set" in str(e.value) and "ABAW" in str(e.value)
    write_affwild2(tmp_path)
    import shutil

    shutil.rmtree(tmp_path / "Aff-Wild2" / "cropped_aligned")
    with pytest.raises(DatasetError, match="cropped_aligned"):
        load_dataset("affwild2", tmp_path, "train")
