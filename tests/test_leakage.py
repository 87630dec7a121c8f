"""Exact copies of training images in evaluation splits: found (pixels in memory, file bytes on disk), reported
by every evaluator as the whole split and the part with no copy (`fer eval`, the training run, --eval-only),
and removable from the training data (--drop-copies-of)."""
from __future__ import annotations

import csv
import json
import shutil

import cv2
import numpy as np
import pytest

from conftest import write_fer2013
from trainers.data import load_dataset
from trainers.data.leakage import copies_in, find_copies
from trainers.methods import run

TINY = ["--arch-kwargs", '{"width": 0.25}', "--batch-size", "32", "--no-tensorboard", "--bench-batches", "0"]
COPIES = 9  # the first 9 PublicTest rows copy Training rows; 3 of them with another label


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("leak")
    write_fer2013(d / "fer2013", n_train=192, n_val=48, copies=COPIES)
    return d


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FER_DESKTOP_CACHE", str(tmp_path / "cache"))


def test_copies_in_memory(data):
    tr, pt = load_dataset("fer2013", data, "train"), load_dataset("fer2013", data, "publictest")
    c = find_copies(pt, tr)
    assert c.count == COPIES and c.mask[:COPIES].all() and not c.mask[COPIES:].any()
    assert c.same_label == 6
    assert "9 of 48 publictest items (18.8 %)" in c.describe("publictest")


def test_copies_on_disk(tmp_path):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for i in range(4):
            d = tmp_path / "faces" / split / "happy"
            d.mkdir(parents=True, exist_ok=True)
            # BMP: every file has the same byte size, so the size pre-check passes them all and the bytes decide
            cv2.imwrite(str(d / f"{split}{i}.bmp"), rng.integers(0, 256, (32, 32), np.uint8))
    shutil.copy(tmp_path / "faces/train/happy/train2.bmp", tmp_path / "faces/test/happy/test1.bmp")
    tr = load_dataset("folder", tmp_path / "faces", "train")
    te = load_dataset("folder", tmp_path / "faces", "test")
    hit = copies_in(te, tr)
    assert hit.sum() == 1 and [str(f).endswith("test1.bmp") for f in np.asarray(te.files)[hit]] == [True]
    assert len({(tmp_path / "faces" / s / "happy" / f"{s}{i}.bmp").stat().st_size for s in ("train", "test")
                for i in range(4)}) == 1


def test_fer_eval_reports_whole_split_and_no_copy_part(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert run("baseline", ["--data", "fer2013", "--data-dir", str(data), "--epochs", "2", "--out", str(out), *TINY]) == 0
    with open(out / "metrics.csv", newline="") as fh:
        row = list(csv.DictReader(fh))[-1]
    assert int(row["val_n"]) == 48 and int(row["val_no_copy_n"]) == 48 - COPIES
    from ferengine.cli import main as fer

    js = tmp_path / "e.json"
    capsys.readouterr()
    assert fer(["eval", "-c", str(out / "best.safetensors"), "--data", "fer2013", "--data-dir", str(data),
                "--split", "publictest", "--backend", "torch", "--json", str(js), "-q"]) == 0
    printed = capsys.readouterr()
    res = json.loads(js.read_text())
    assert res["copies_in_train"] == {"train_split": "train", "copies": COPIES, "same_label": 6, "items": 48}
    assert res["no_copy_n"] == 48 - COPIES and res["n"] == 48
    assert res["role"].startswith("validation (selection)")
    assert "no copy in train" in printed.out and "whole split" in printed.out
    # the no-copy numbers are the metrics of exactly the other items
    from sklearn.metrics import accuracy_score

    import torch
    from ferengine import checkpoint as ck
    from ferengine.preprocess import to_model_input

    pt = load_dataset("fer2013", data, "publictest")
    loaded = ck.load(out / "best.safetensors")
    with torch.no_grad():
        pred = loaded.model(torch.from_numpy(to_model_input(pt.images.numpy(), loaded.spec)))["logits"].argmax(1)
    y = pt.labels.numpy()
    assert res["no_copy_accuracy"] == pytest.approx(100 * accuracy_score(y[COPIES:], pred.numpy()[COPIES:]))
    assert res["accuracy"] == pytest.approx(100 * accuracy_score(y, pred.numpy()))
    # the training run's own evaluation of its best epoch says the same
    best = max(csv.DictReader(open(out / "metrics.csv")), key=lambda r: float(r["val_accuracy"]))
    assert res["no_copy_accuracy"] == pytest.approx(float(best["val_no_copy_accuracy"]))


def test_drop_copies_of_removes_them_from_training(data, tmp_path):
    out = tmp_path / "run"
    assert run("baseline", ["--data", "fer2013", "--data-dir", str(data), "--epochs", "1", "--out", str(out),
                            "--drop-copies-of", "publictest", *TINY]) == 0
    args = json.loads((out / "args.json").read_text())
    assert args["resolved"]["train_size"] == 192 - COPIES
    with open(out / "metrics.csv", newline="") as fh:
        row = next(csv.DictReader(fh))
    assert int(row["val_no_copy_n"]) == 48, "no validation item has a copy left in the training data"
    from ferengine import checkpoint as ck

    t = ck.read_info(out / "best.safetensors").training
    assert t["dropped_copies_of"] == {"splits": ["publictest"], "items": COPIES}
    assert t["copies_in_train"]["publictest"]["copies"] == 0


def test_role_knows_ferplus_relabels_fer2013_faces():
    """FER+ valid is FER2013 PublicTest under other labels: a model selected on one was selected on the other."""
    from types import SimpleNamespace

    from trainers.evaluate import _role

    info = SimpleNamespace(training={"data": {"name": "fer2013", "train_split": "Training", "val_split": "PublicTest"}})
    assert _role(info, "ferplus", "valid").startswith("validation (selection): the model's epoch was chosen on "
                                                       "fer2013/PublicTest")
    assert _role(info, "fer2013", "publictest") == "validation (selection): this split chose the model's epoch"
    assert _role(info, "ferplus", "train") == "training data"
    assert _role(info, "ferplus", "test").startswith("held out")
    assert _role(info, "rafdb", "test").startswith("held out")
