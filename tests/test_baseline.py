"""``python -m trainers.baseline`` end to end on a tiny FER2013 csv in the real Kaggle format: training,
checkpoint contract and input spec, ``--eval-only``, ``--resume`` from the command line, ``--limit-train``."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import write_fer2013
from ferengine import checkpoint as ck
from ferengine.labels import LABEL_SETS
from ferengine.preprocess import InputSpec
from trainers.baseline import Baseline, classification_loss, va_loss
from trainers.engine import main, parse_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def fer_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FER_DESKTOP_CACHE", str(tmp_path / "cache"))
    write_fer2013(tmp_path / "data")
    return tmp_path / "data"


FAST = ["--arch-kwargs", '{"width": 0.25}', "--batch-size", "32", "--no-tensorboard", "--bench-batches", "2"]


def test_baseline_cli_trains_evaluates_and_resumes(fer_dir, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--data", "fer2013", "--data-dir", str(fer_dir), "--arch", "fastcnn", "--epochs", "1",
            "--input-size", "40", "--out", str(out), "--seed", "3", *FAST]
    assert main(Baseline, argv) == 0
    loaded = ck.load(out / "best.safetensors")
    spec = loaded.spec
    assert (spec.size, spec.channels, spec.crop_margin, spec.crop_offset_y) == (40, 1, 0.15, -0.097), "FER2013's crop"
    assert spec.source_size == 48, "trained on 48 px faces resized to 40: inference crops at 48 and resizes alike"
    assert loaded.info.arch == "fastcnn" and loaded.info.arch_kwargs["width"] == 0.25
    assert loaded.info.labels == list(LABEL_SETS["fer7"])
    t = loaded.info.training
    assert t["command"].endswith(" ".join(argv[-4:])) and "trainers.baseline" in t["command"]
    assert t["data"]["val_split"] == "publictest" and t["split_sizes"] == {"train": 160, "publictest": 48}
    assert "publictest_accuracy" in loaded.info.metrics
    args = json.loads((out / "args.json").read_text())
    assert args["config"]["val_split"] is None and args["resolved"]["val_split"] == "publictest"

    # --resume with only --out (and a longer --epochs): the saved settings are used, epoch 2 is appended
    assert main(Baseline, ["--out", str(out), "--resume", "--epochs", "2"]) == 0
    s = torch.load(out / "state.pt", weights_only=True)
    assert s["epoch"] == 2 and s["config"]["input_size"] == 40 and s["config"]["seed"] == 3
    t2 = ck.load(out / "last.safetensors").info.training
    assert t2["command"] == t["command"] and t2["resumed_with"][0].endswith("--resume --epochs 2")
    with open(out / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert float(rows[1]["lr"]) > 0.01, "the cosine schedule must stretch to the new --epochs on resume"

    capsys.readouterr()
    ev = tmp_path / "eval"
    assert main(Baseline, ["--data", "fer2013", "--data-dir", str(fer_dir), "--eval-only",
                           str(out / "last.safetensors"), "--out", str(ev)]) == 0
    printed = capsys.readouterr().out
    for word in ("accuracy", "mean class accuracy", "macro F1", "true \\ predicted", "neutral"):
        assert word in printed
    res = json.loads((ev / "eval.json").read_text())
    assert res["split"] == "publictest" and res["n"] == 48
    assert 0 <= res["accuracy"] <= 100 and np.array(res["confusion_matrix"]).sum() == 48
    # the same number as the training run's own evaluation of those weights
    with open(out / "metrics.csv", newline="") as fh:
        last = list(csv.DictReader(fh))[-1]
    assert res["accuracy"] == pytest.approx(float(last["val_accuracy"]))


def test_limit_train_is_a_seeded_subset(fer_dir, tmp_path):
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        assert main(Baseline, ["--data", "fer2013", "--data-dir", str(fer_dir), "--epochs", "1", "--limit-train", "50",
                               "--out", str(out), *FAST]) == 0
        runs.append(ck.load(out / "last.safetensors"))
    assert runs[0].info.training["split_sizes"]["train"] == 50
    a, b = (r.model.state_dict() for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a), "same seed, same subset, same weights"


def test_bad_arch_and_missing_data_fail_clearly(fer_dir, tmp_path, capsys):
    assert main(Baseline, ["--data", "fer2013", "--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
    assert "fer2013.csv" in capsys.readouterr().err
    assert main(Baseline, ["--data", "fer2013", "--data-dir", str(fer_dir), "--arch", "nope",
                           "--out", str(tmp_path / "y")]) == 2
    assert "unknown architecture 'nope'" in capsys.readouterr().err


def test_paper_defaults_and_help():
    cfg = parse_config(Baseline, [])
    assert (cfg.optimizer, cfg.lr, cfg.nesterov, cfg.scheduler, cfg.batch_size) == ("sgd", 0.05, True, "cosine", 128)
    assert cfg.extra["arch"] == "fastcnn" and cfg.val_split is None
    r = subprocess.run([sys.executable, "-m", "trainers.baseline", "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0
    for flag in ("--data", "--data-dir", "--out", "--epochs", "--batch-size", "--lr", "--device", "--seed", "--resume",
                 "--eval-only", "--limit-train", "--workers", "--amp", "--val-split", "--input-size", "--channels",
                 "--label-smoothing", "--weight-decay", "--optimizer", "--scheduler", "--arch", "--arch-kwargs"):
        assert flag in r.stdout


def test_losses():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
    label = torch.tensor([0, 1, -1])
    ref = torch.nn.functional.cross_entropy(logits[:2], label[:2])
    assert torch.allclose(classification_loss(logits, label), ref)
    soft = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]])  # unnormalised votes; empty row ignored
    assert torch.allclose(classification_loss(logits, label, soft), ref)
    va = torch.tensor([[0.5, float("nan")], [0.0, 0.2]])
    assert torch.allclose(va_loss(torch.zeros(2, 2), va), torch.tensor((0.25 + 0.04) / 3))


def test_on_disk_loader_path_matches_in_memory(tmp_path, monkeypatch):
    """The DataLoader path (on-disk faces, 2 workers) feeds the model exactly what the in-memory path does."""
    import cv2

    monkeypatch.setenv("FER_DESKTOP_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    root = tmp_path / "faces"
    for split, n in (("train", 40), ("val", 12)):
        for i in range(n):
            cls = ("angry", "happy", "sad", "neutral")[i % 4]
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            img = np.clip(rng.normal(60 + 40 * (i % 4), 30, (32, 32)), 0, 255).astype(np.uint8)
            cv2.imwrite(str(d / f"{i:03d}.png"), img)
    common = ["--data", "folder", "--data-dir", str(root), "--epochs", "2", "--input-size", "32", "--batch-size", "8",
              "--arch-kwargs", '{"width": 0.25}', "--no-tensorboard", "--bench-batches", "1",
              "--data-opt", "channels=1", "--data-opt", "image_size=32"]
    assert main(Baseline, [*common, "--workers", "2", "--out", str(tmp_path / "disk")]) == 0
    assert main(Baseline, [*common, "--data-opt", "in_memory=true", "--out", str(tmp_path / "mem")]) == 0
    a = ck.load(tmp_path / "disk" / "last.safetensors")
    b = ck.load(tmp_path / "mem" / "last.safetensors")
    assert a.info.labels == list(LABEL_SETS["fer7"]) and a.spec.channels == 1
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    with open(tmp_path / "disk" / "metrics.csv", newline="") as fh:
        assert float(next(csv.DictReader(fh))["data_alone_ips"]) > 0


def test_init_starts_from_a_checkpoint(fer_dir, tmp_path, capsys):
    first = tmp_path / "first"
    common = ["--data", "fer2013", "--data-dir", str(fer_dir), "--no-tensorboard", "--bench-batches", "2",
              "--batch-size", "32"]
    assert main(Baseline, [*common, "--arch-kwargs", '{"width": 0.25}', "--epochs", "2", "--out", str(first)]) == 0
    trained = ck.load(first / "best.safetensors")
    # lr 0: the weights stay those of --init, so the evaluation equals the source checkpoint's
    second = tmp_path / "second"
    assert main(Baseline, [*common, "--init", str(first / "best.safetensors"), "--epochs", "1", "--lr", "0",
                           "--weight-decay", "0", "--out", str(second)]) == 0
    again = ck.load(second / "last.safetensors")
    assert again.info.arch_kwargs == trained.info.arch_kwargs
    for (k, a), b in zip(trained.model.state_dict().items(), again.model.state_dict().values()):
        if a.is_floating_point() and "running" not in k:  # BN running stats still move in train mode
            assert torch.equal(a, b), k
    # a checkpoint of other classes is refused with a clear message
    other = tmp_path / "other.safetensors"
    ck.save(other, trained.model, ck.CheckpointInfo(arch="fastcnn", arch_kwargs=trained.info.arch_kwargs,
                                                    labels=list("abcdefg"), input=trained.spec))
    assert main(Baseline, [*common, "--init", str(other), "--epochs", "1", "--out", str(tmp_path / "x")]) == 2
    assert "its classes" in capsys.readouterr().err
