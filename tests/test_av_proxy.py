"""The proxy valence/arousal task on FER+ (``--data-opt va=anchors``) and the estimated-AV evaluation of
categorical models (``fer eval`` of a checkpoint without an AV head on data with AV targets)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import patterns
from ferengine import checkpoint as ck
from ferengine.cli import main
from ferengine.labels import AV_ANCHORS, LABEL_SETS, estimate_va
from ferengine.preprocess import to_model_input
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


# ------------------------------------------------------------------------------ fer eval, estimated AV


N_TRAIN, N_VALID, COPIES = 48, 40, 6


@pytest.fixture(scope="module")
def av_data(tmp_path_factory) -> tuple[Path, np.ndarray, np.ndarray]:
    """FER2013 csv + fer2013new.csv whose images are the conftest patterns (the trained fixtures' classes), random
    vote distributions; the first COPIES PublicTest images are bit-identical copies of Training images."""
    rng = np.random.default_rng(5)
    train = patterns(N_TRAIN, 11).images.numpy()
    valid = patterns(N_VALID, 12).images.numpy()
    valid[:COPIES] = train[:COPIES]
    rows = []
    for usage, n in (("Training", N_TRAIN), ("PublicTest", N_VALID)):
        for i in range(n):
            votes = np.zeros(10, int)
            votes[:8] = rng.multinomial(10, rng.dirichlet(np.full(8, 0.7)))
            rows.append((usage, f"fer{len(rows):07d}.png", votes.tolist()))
    d = tmp_path_factory.mktemp("avdata")
    write_pair(d, rows, list(train) + list(valid))
    votes = np.array([r[2] for r in rows[N_TRAIN:]], float)[:, :8]
    target = np.array([estimate_va(v / v.sum(), LABEL_SETS["ferplus8"]) for v in votes])
    return d, valid, target


def _reg(t: np.ndarray, p: np.ndarray) -> dict[str, float]:
    """RMSE, SAGR, PCC, CCC of one dimension, by hand."""
    mt, mp = t.mean(), p.mean()
    cov = ((t - mt) * (p - mp)).mean()
    return {"rmse": float(np.sqrt(((t - p) ** 2).mean())), "sagr": float((np.sign(t) == np.sign(p)).mean()),
            "pcc": float(cov / (t.std() * p.std())), "ccc": float(2 * cov / (t.var() + p.var() + (mt - mp) ** 2))}


def _check_va(res: dict, prefix: str, t: np.ndarray, p: np.ndarray) -> None:
    assert res[f"{prefix}va_n"] == len(t)
    cccs = []
    for j, dim in enumerate(("valence", "arousal")):
        ref = _reg(t[:, j], p[:, j])
        for k, v in ref.items():
            assert res[f"{prefix}{dim}_{k}"] == pytest.approx(v, abs=1e-5), f"{prefix}{dim}_{k}"
        cccs.append(ref["ccc"])
    assert res[f"{prefix}mean_ccc"] == pytest.approx(np.mean(cccs), abs=1e-5)


def _fer_eval(ckpt: Path, data: Path, tmp_path: Path, capsys) -> tuple[dict, str]:
    out = tmp_path / "eval.json"
    rc = main(["eval", "-c", str(ckpt), "--data", "ferplus", "--data-dir", str(data), "--split", "valid",
               "--data-opt", "va=anchors", "--data-opt", "mode=distribution", "--backend", "torch", "-q",
               "--json", str(out)])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    return json.loads(out.read_text()), cap.out


def _outputs(ckpt: Path, images: np.ndarray) -> dict[str, np.ndarray]:
    loaded = ck.load(ckpt)
    with torch.no_grad():
        out = loaded.model.eval()(torch.from_numpy(to_model_input(images, loaded.spec)))
    res = {"probs": out["logits"].softmax(1).numpy(), "labels": list(loaded.info.labels)}
    if "va" in out:
        res["va"] = out["va"].numpy()
    return res


def test_fer_eval_scores_the_estimated_va_of_a_categorical_model(av_data, fastcnn_checkpoint, tmp_path, capsys,
                                                                 monkeypatch):
    monkeypatch.setenv("FER_DESKTOP_CACHE", str(tmp_path / "cache"))
    data, images, target = av_data
    assert "valence_arousal" not in ck.load(fastcnn_checkpoint).info.heads
    res, printed = _fer_eval(fastcnn_checkpoint, data, tmp_path, capsys)
    out = _outputs(fastcnn_checkpoint, images)
    # the app's estimate: estimate_va of each face's probabilities over the model's own 7 classes
    est = np.array([estimate_va(p, out["labels"]) for p in out["probs"]])
    assert est.std(0).min() > 0.05, "the fixture model's estimates must depend on its input"
    assert res["va_source"] == "estimated" and res["copies_in_train"]["copies"] == COPIES
    _check_va(res, "estimated_", target, est)
    _check_va(res, "no_copy_estimated_", target[COPIES:], est[COPIES:])
    assert "mean_ccc" not in res and "valence_rmse" not in res  # never reported as a head's values
    assert "valence/arousal (estimated from class probabilities via category anchors)" in printed
    assert f"{res['estimated_mean_ccc']:7.4f}" in printed and f"{res['no_copy_estimated_mean_ccc']:7.4f}" in printed


def test_fer_eval_of_an_av_head_reports_the_head(av_data, fastcnn_av_checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FER_DESKTOP_CACHE", str(tmp_path / "cache"))
    data, images, target = av_data
    res, printed = _fer_eval(fastcnn_av_checkpoint, data, tmp_path, capsys)
    out = _outputs(fastcnn_av_checkpoint, images)
    assert out["va"].std(0).min() > 0.05, "the fixture's AV head must depend on its input"
    assert res["va_source"] == "head"
    _check_va(res, "", target, out["va"])
    _check_va(res, "no_copy_", target[COPIES:], out["va"][COPIES:])
    assert not [k for k in res if "estimated" in k]
    assert "estimated from class probabilities" not in printed and "valence/arousal, n = 40" in printed
