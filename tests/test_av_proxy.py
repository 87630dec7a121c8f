"""The proxy valence/arousal task on FER+ (``--data-opt va=anchors``)."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from ferengine.labels import AV_ANCHORS, LABEL_SETS, estimate_va
from trainers.data import DatasetError, load_dataset
from trainers.data.ferplus import PROXY_WARNING
from trainers.data.splits import load_data

HEADER = "Usage,Image name,neutral,happiness,surprise,sadness,anger,disgust,fear,contempt,unknown,NF"
PROXY_TEXT = ("valence/arousal targets are a PROXY: the vote-weighted mean of category anchors "
              "(ferengine.labels.AV_ANCHORS), not human valence/arousal ratings")
H, N, S, SAD, ANG, C = AV_ANCHORS["happy"], AV_ANCHORS["neutral"], AV_ANCHORS["surprise"], AV_ANCHORS["sad"], \
    AV_ANCHORS["angry"], AV_ANCHORS["contempt"]

# (usage, image name, votes: neutral happy surprise sad angry disgust fear contempt unknown NF,
#  hand-computed proxy target, majority label or -1)
ROWS = [
    ("Training", "fer0000000.png", [4, 6, 0, 0, 0, 0, 0, 0, 0, 0], (0.6 * 0.81, 0.6 * 0.51), 1),
    # single votes are dropped by the majority rule, but the target uses the RAW votes (6 of 8 emotion votes)
    ("Training", "fer0000001.png", [6, 0, 1, 1, 0, 0, 0, 0, 2, 0],
     ((1 * S[0] + 1 * SAD[0]) / 8, (1 * S[1] + 1 * SAD[1]) / 8), 0),
    ("Training", "", [0, 0, 0, 0, 0, 0, 0, 0, 0, 10], None, -1),  # not a face (FER+ dropped it)
    ("Training", "fer0000002.png", [0, 7, 0, 0, 0, 0, 0, 0, 3, 0], H, 1),  # unknown votes left out
    ("Training", "fer0000003.png", [0, 0, 0, 0, 0, 0, 0, 6, 2, 2], C, 7),  # contempt (our placement)
    ("Training", "fer0000004.png", [4, 0, 0, 3, 3, 0, 0, 0, 0, 0],  # no majority (4/10): dropped in majority mode
     ((3 * SAD[0] + 3 * ANG[0]) / 10, (3 * SAD[1] + 3 * ANG[1]) / 10), -1),
    ("PublicTest", "fer0000005.png", [0, 0, 8, 0, 2, 0, 0, 0, 0, 0],
     (0.8 * S[0] + 0.2 * ANG[0], 0.8 * S[1] + 0.2 * ANG[1]), 2),
    ("PublicTest", "fer0000006.png", [10, 0, 0, 0, 0, 0, 0, 0, 0, 0], N, 0),
]


def write_pair(root: Path, rows, images) -> None:
    """fer2013/fer2013.csv (Kaggle's emotion,pixels,Usage) + ferplus/fer2013new.csv (FER+'s 10 vote columns)."""
    (root / "fer2013").mkdir(parents=True, exist_ok=True)
    (root / "ferplus").mkdir(parents=True, exist_ok=True)
    lines = ["emotion,pixels,Usage"] + [f"{i % 7},{' '.join(map(str, im.ravel()))},{r[0]}"
                                        for i, (r, im) in enumerate(zip(rows, images))]
    (root / "fer2013" / "fer2013.csv").write_text("\n".join(lines) + "\n")
    new = [HEADER] + [f"{r[0]},{r[1]},{','.join(map(str, r[2]))}" for r in rows]
    (root / "ferplus" / "fer2013new.csv").write_text("\n".join(new) + "\n")


@pytest.fixture
def small(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("FER_DESKTOP_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    write_pair(tmp_path / "data", ROWS, [rng.integers(0, 256, (48, 48), dtype=np.uint8) for _ in ROWS])
    return tmp_path / "data"


def _expected(usage: str, majority: bool) -> np.ndarray:
    return np.array([r[3] for r in ROWS if r[0] == usage and r[1] and (r[4] >= 0 or not majority)])


# ----------------------------------------------------------------------------------------- the reader


@pytest.mark.parametrize("mode", ["majority", "distribution"])
def test_proxy_targets_are_vote_weighted_anchor_means(small, mode):
    tr = load_dataset("ferplus", small, "train", mode=mode, va="anchors")
    assert tr.va is not None and tr.va.dtype == torch.float32 and tr.va.shape == (len(tr), 2)
    np.testing.assert_allclose(tr.va.numpy(), _expected("Training", mode == "majority"), atol=1e-6)
    if mode == "majority":
        assert tr.labels.tolist() == [1, 0, 1, 7]
        assert tr.va[0].tolist() == pytest.approx([0.486, 0.306], abs=1e-6)  # 6 happy + 4 neutral
    else:
        assert len(tr) == 5
    # exactly ferengine.labels.estimate_va of the raw emotion-vote distribution
    for k, i in enumerate(tr.meta["fer2013_row"]):
        votes = np.array(ROWS[i][2][:8], float)
        assert tr.va[k].tolist() == pytest.approx(estimate_va(votes / votes.sum(), LABEL_SETS["ferplus8"]), abs=1e-6)
    va = load_dataset("ferplus", small, "valid", mode=mode, va="anchors")
    np.testing.assert_allclose(va.va.numpy(), _expected("PublicTest", mode == "majority"), atol=1e-6)
    assert "proxy" in va.info["va"] and "not human ratings" in va.info["va"]
    assert float(va.va.abs().max()) <= 1.0


def test_no_targets_without_the_option_and_bad_values(small):
    assert load_dataset("ferplus", small, "train").va is None
    assert load_dataset("ferplus", small, "train", va="none").va is None
    with pytest.raises(DatasetError, match=r"ferplus: unknown va 'human'; expected 'anchors'"):
        load_dataset("ferplus", small, "train", va="human")


def test_proxy_warning_once_per_load(small, caplog):
    with caplog.at_level(logging.WARNING, logger="trainers.data"):
        load_dataset("ferplus", small, "train")
    assert not [r for r in caplog.records if "PROXY" in r.getMessage()]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="trainers.data"):
        load_dataset("ferplus", small, "train", va="anchors")
        load_dataset("ferplus", small, "valid", va="anchors", mode="distribution")
    warned = [r for r in caplog.records if PROXY_TEXT in r.getMessage()]
    assert len(warned) == 2 and all(r.levelno == logging.WARNING for r in warned)
    assert PROXY_WARNING == PROXY_TEXT


def test_cache_does_not_mix_va_and_no_va_loads(small, tmp_path):
    cache = tmp_path / "cache"
    first = load_dataset("ferplus", small, "train")
    entries = sorted(p.name for p in cache.glob("*.npz"))
    assert entries and first.va is None
    with_va = load_dataset("ferplus", small, "train", va="anchors")
    np.testing.assert_allclose(with_va.va.numpy(), _expected("Training", True), atol=1e-6)
    np.testing.assert_array_equal(with_va.images.numpy(), first.images.numpy())
    assert sorted(p.name for p in cache.glob("*.npz")) == entries  # the cached images served both loads
    assert load_dataset("ferplus", small, "train").va is None  # and a va load left no targets behind


def test_training_engine_sees_has_va(small):
    _, _, info = load_data("ferplus", str(small), opts={"va": "anchors"})
    assert info.has_va and info.val_split == "valid"
    _, _, info = load_data("ferplus", str(small), opts={})
    assert not info.has_va
    # a subset (--limit-train, --drop-copies-of) keeps the targets
    ds = load_dataset("ferplus", small, "train", va="anchors")
    np.testing.assert_array_equal(ds.subset([2, 0]).va.numpy(), ds.va.numpy()[[2, 0]])
