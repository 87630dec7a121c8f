"""`python -m trainers.release`: the shipped file, its evaluation and its model card."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from conftest import make_checkpoint
from ferengine import checkpoint as ck
from trainers.release import main


@pytest.fixture()
def fer_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FER_DESKTOP_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    rows = ["emotion,pixels,Usage"]
    for usage, n in (("Training", 14), ("PublicTest", 21)):
        for i in range(n):
            pix = " ".join(map(str, rng.integers(0, 256, 48 * 48)))
            rows.append(f"{i % 7},{pix},{usage}")
    d = tmp_path / "data" / "fer2013"
    d.mkdir(parents=True)
    (d / "fer2013.csv").write_text("\n".join(rows) + "\n")
    return d.parent


def test_release_writes_model_card_and_calibrated_half_checkpoint(tmp_path, fer_dir, capsys):
    src = make_checkpoint(tmp_path / "best.safetensors", width=0.25)
    cal = tmp_path / "calibration.json"
    cal.write_text(json.dumps({"recommended": {"crop_margin": 0.15, "crop_offset_y": -0.1},
                               "command": "python -m trainers.calibrate"}))
    out = tmp_path / "assets" / "default.safetensors"
    out.parent.mkdir()
    # a checkpoint from the engine records its hardware; the card shows it, and --notes
    loaded = ck.load(src)
    hw = {"device": "cuda:0", "name": "NVIDIA H100 80GB HBM3", "cpus": 16, "torch": "2.11.0+cu130", "amp": "bfloat16"}
    ck.save(src, loaded.model, dataclasses.replace(
        loaded.info, training=dict(loaded.info.training) | {"hardware": hw, "notes": ["trained from scratch"]}))
    notes = tmp_path / "notes.md"
    notes.write_text("Trained with `--time-budget 380`.\n")
    assert main([str(src), "--out", str(out), "--name", "tiny test model", "--calibration", str(cal),
                 "--data-dir", str(fer_dir), "--repeat", "3", "--notes", str(notes)]) == 0
    shipped, original = ck.load(out), ck.load(src)
    assert shipped.info.name == "tiny test model"
    assert shipped.spec.crop_margin == 0.15 and shipped.spec.crop_offset_y == -0.1
    assert shipped.spec.size == original.spec.size
    # fp16 storage: the same predictions within fp16 rounding
    x = torch.randn(4, 1, 48, 48)
    with torch.no_grad():
        diff = (shipped.model(x)["logits"].softmax(1) - original.model(x)["logits"].softmax(1)).abs().max()
    assert diff < 1e-2
    ev = json.loads((out.parent / "default.eval.json").read_text())
    assert ev["n"] == 21 and ev["split"] == "publictest"
    assert shipped.info.metrics["fer2013_publictest_accuracy"] == ev["accuracy"]
    card = (out.parent / "default.md").read_text()
    assert card.startswith("# tiny test model")
    assert f"**{ev['accuracy']:.2f} %**" in card
    assert "pytest fixture" in card  # the training command recorded in the checkpoint
    assert "Trained on: NVIDIA H100 80GB HBM3 (`cuda:0`, 16 CPUs), PyTorch 2.11.0+cu130, mixed precision bfloat16" in card
    assert "## Notes\n\n- trained from scratch\n\nTrained with `--time-budget 380`." in card  # the run's, then --notes
    assert shipped.info.training["release_notes"] == "Trained with `--time-budget 380`."
    assert (out.parent / "default.confusion.png").stat().st_size > 1000


def test_release_bad_checkpoint_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"nope")
    assert main([str(bad), "--out", str(tmp_path / "o.safetensors"), "--name", "x"]) == 2
    assert capsys.readouterr().err.startswith("release: error:")


def test_card_sentences_come_from_the_checkpoint_and_the_run(tmp_path, fer_dir, capsys):
    """fp32 storage, an AV head, the selection recorded by the engine, copies in the split: the card says what
    this file and this evaluation are, and none of the old fixed sentences."""
    import csv

    csv_path = fer_dir / "fer2013" / "fer2013.csv"
    rows = list(csv.reader(csv_path.open()))
    rows[15][1] = rows[1][1]  # PublicTest item 0 = Training item 0 (the same label: both i % 7 == 0)
    rows[16][1] = rows[3][1]  # PublicTest item 1 (label 1) = Training item 2 (label 2)
    with csv_path.open("w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    src = make_checkpoint(tmp_path / "best.safetensors", width=0.25, av_head=True)
    loaded = ck.load(src)
    training = dict(loaded.info.training) | {
        "data": {"name": "fer2013", "train_split": "train", "val_split": "publictest"},
        "split_sizes": {"train": 14}, "selection": {"split": "publictest", "metric": "macro_f1"},
        "epoch": 3, "epochs": 5}
    ck.save(src, loaded.model, dataclasses.replace(loaded.info, training=training))
    out = tmp_path / "m.safetensors"
    assert main([str(src), "--out", str(out), "--name", "fp32 av", "--no-half", "--data-dir", str(fer_dir),
                 "--repeat", "2"]) == 0
    card = (tmp_path / "m.md").read_text()
    assert "weights stored as float32" in card and "float16" not in card
    assert "valence/arousal from the model's own head" in card and "estimates them" not in card
    assert "epoch selected on `publictest` by macro_f1 (epoch 3 of 5)" in card
    assert "validation (selection)" in card and "validation numbers" in card
    assert "2 of the 21 publictest images are bit-identical to a `train` image (1 with the same label)" in card
    ev = json.loads((tmp_path / "m.eval.json").read_text())
    assert f"| fer2013 publictest, no copy in train | 19 | **{ev['no_copy_accuracy']:.2f} %**" in card
    for fixed in ("PrivateTest was never used", "65.4", "best epoch by accuracy", "weights stored fp16"):
        assert fixed not in card, fixed
    assert ck.read_info(out).metrics["fer2013_publictest_no_copy_n"] == 19
