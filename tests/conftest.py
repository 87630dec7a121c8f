"""Shared fixtures: a random-init checkpoint, a synthetic video, the offline test media."""
from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np
import pytest

import os

# the offline test media (real faces, never committed): ../shared/data/media beside the clone, or $FER_TEST_MEDIA
MEDIA_DIR = Path(os.environ.get("FER_TEST_MEDIA") or Path(__file__).resolve().parents[2] / "shared" / "data" / "media")

SYNTH_FPS = 25.0
SYNTH_FRAMES = 12
SYNTH_SIZE = (160, 120)  # w, h


# -------------------------------------------------------------------------------- a tiny model, trained


LABELS = ("hstripes", "vstripes", "checker", "blob")


def patterns(n: int, seed: int, size: int = 48, noise: float = 25.0, label_names=None, va: bool = False):
    """4 classes of synthetic grey patterns (flip- and small-rotation-invariant), random phase/frequency/contrast,
    as a FaceDataset; ``label_names`` (default LABELS) may name more classes than the 4 used; ``va``: each class
    also gets a valence/arousal target (its corner of the plane, plus noise)."""
    from trainers.data import FaceDataset

    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    imgs = np.empty((n, size, size), np.uint8)
    for i, c in enumerate(y):
        ph, f = rng.uniform(0, 2 * np.pi), rng.uniform(0.3, 0.5) * 48 / size
        if c == 0:
            p = np.sin(f * yy + ph)
        elif c == 1:
            p = np.sin(f * xx + ph)
        elif c == 2:
            p = np.sign(np.sin(f * xx + ph) * np.sin(f * yy + ph))
        else:
            cx, cy = size / 2 + rng.uniform(-4, 4), size / 2 + rng.uniform(-4, 4)
            p = 2 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * (rng.uniform(0.12, 0.2) * size) ** 2)) - 1
        img = 128 + 60 * p * rng.uniform(0.5, 1.0) + rng.normal(0, noise, (size, size))
        imgs[i] = np.clip(img, 0, 255)
    targets = None
    if va:
        corners = np.array([[0.6, 0.5], [-0.6, 0.5], [-0.5, -0.5], [0.5, -0.6]])
        targets = np.clip(corners[y] + rng.normal(0, 0.1, (n, 2)), -1, 1).astype(np.float32)
    return FaceDataset("patterns", "train", label_names or LABELS, y, images=imgs, va=targets)


def train_checkpoint(path: Path, *, av_head: bool = False, seed: int = 0, epochs: int = 4) -> Path:
    """A tiny fastcnn (width 0.25) TRAINED for real on the patterns (seconds), with FER2013's seven class names
    (the patterns fill the first four), as ``trainers.baseline`` writes it; its outputs depend on its input (the
    fixture checks). ``av_head``: trained on valence/arousal targets too. Uncalibrated crop (data "patterns")."""
    import shutil
    import tempfile

    import torch

    from ferengine import checkpoint as ck
    from ferengine.labels import LABEL_SETS
    from trainers.baseline import Baseline
    from trainers.engine import TrainConfig, Trainer

    fer7 = LABEL_SETS["fer7"]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(data="patterns", out=tmp, epochs=epochs, batch_size=32, lr=0.05, optimizer="sgd",
                          nesterov=True, scheduler="cosine", warmup_epochs=0.5, weight_decay=5e-4, augment="standard",
                          tensorboard=False, bench_batches=0, seed=seed,
                          extra={"arch": "fastcnn", "arch_kwargs": {"width": 0.25}})
        torch.manual_seed(seed)
        tr = Trainer(cfg, Baseline, datasets=(patterns(320, seed, label_names=fer7, va=av_head),
                                              patterns(96, seed + 1, label_names=fer7, va=av_head)), argv=["pytest"])
        tr.fit()
        assert tr.best_value is not None and tr.best_value > 60.0, f"the tiny model did not learn: {tr.best_value}"
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(tmp) / "best.safetensors", path)
    loaded = ck.load(path)
    x = patterns(16, seed + 2)
    from ferengine.preprocess import to_model_input

    with torch.no_grad():
        out = loaded.model(torch.from_numpy(to_model_input(x.images.numpy(), loaded.spec)))
    p = out["logits"].softmax(1)
    assert float((p - p[:1]).abs().max()) > 0.2, "the trained fixture's outputs must depend on its input"
    if av_head:
        assert float((out["va"] - out["va"][:1]).abs().max()) > 0.2
    return path


def av_only_checkpoint(src: Path, path: Path) -> Path:
    """The trained two-head checkpoint ``src`` (:func:`train_checkpoint` with ``av_head=True``) as a model with
    ONLY its valence/arousal head: the same trained body and AV head, the expression head dropped, saved with
    :func:`ferengine.checkpoint.save` as ``heads == ["valence_arousal"]``, ``labels == []``. Its valence/arousal
    output equals ``src``'s and depends on its input (checked here)."""
    import dataclasses

    import torch

    from ferengine import checkpoint as ck
    from ferengine.models import create_model
    from ferengine.preprocess import to_model_input

    both = ck.load(src)
    assert both.info.heads == ["expression", "valence_arousal"]
    kwargs = {**both.info.arch_kwargs, "num_classes": 0, "av_head": True}
    model = create_model(both.info.arch, **kwargs).eval()
    state = {k: v for k, v in both.model.state_dict().items() if not k.startswith("head.fc.")}
    assert sorted(state) == sorted(model.state_dict()), "the AV-only model must take every weight but head.fc"
    model.load_state_dict(state)
    info = dataclasses.replace(both.info, arch_kwargs=kwargs, labels=[], heads=["valence_arousal"],
                               name=f"{both.info.name} (AV only)",  # the classification metrics are not its own
                               metrics={k: v for k, v in both.info.metrics.items() if "valence" in k or "arousal" in k})
    ck.save(path, model, info)
    loaded = ck.load(path)
    assert loaded.info.heads == ["valence_arousal"] and loaded.info.labels == []
    x = torch.from_numpy(to_model_input(patterns(16, 7).images.numpy(), loaded.spec))
    with torch.no_grad():
        out, ref = loaded.model(x), both.model(x)
    assert "logits" not in out and torch.allclose(out["va"], ref["va"], atol=1e-6)
    assert float((out["va"] - out["va"][:1]).abs().max()) > 0.2, "its valence/arousal must depend on its input"
    return path


def make_checkpoint(path: Path, *, av_head: bool = False, num_classes: int = 7, width: float = 0.25,
                    labels: tuple[str, ...] | None = None, seed: int = 0) -> Path:
    """A randomly initialised fastcnn written with :func:`ferengine.checkpoint.save` -- for tests of metadata,
    label sets and file handling only: its outputs barely depend on its input (use :func:`train_checkpoint`
    where the predictions matter)."""
    import torch

    from ferengine import checkpoint as ck
    from ferengine.labels import LABEL_SETS
    from ferengine.models import create_model
    from ferengine.preprocess import InputSpec

    torch.manual_seed(seed)
    kwargs = {"num_classes": num_classes, "width": width, "av_head": av_head}
    model = create_model("fastcnn", **kwargs).eval()
    if labels is None:
        labels = LABEL_SETS["fer7"] if num_classes == 7 else LABEL_SETS["ferplus8"][:num_classes]
    heads = (["expression"] if num_classes else []) + (["valence_arousal"] if av_head else [])
    info = ck.CheckpointInfo(arch="fastcnn", arch_kwargs=kwargs, labels=list(labels), heads=heads,
                             input=InputSpec(size=48, channels=1), name="random fastcnn",
                             training={"command": "pytest fixture"})
    return ck.save(path, model, info)


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Keep exports (ONNX files) written during tests out of the user's ~/.cache/fer-desktop."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FER_DESKTOP_CACHE", str(tmp_path_factory.mktemp("fer-cache")))
        yield


@pytest.fixture(scope="session")
def fastcnn_checkpoint(tmp_path_factory) -> Path:
    """A tiny fastcnn trained for real (input-dependent outputs)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FER_DESKTOP_CACHE", str(tmp_path_factory.mktemp("train-cache")))
        return train_checkpoint(tmp_path_factory.mktemp("ckpt") / "fastcnn.safetensors")


@pytest.fixture(scope="session")
def fastcnn_av_checkpoint(tmp_path_factory) -> Path:
    """The same with a valence/arousal head trained on AV targets."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FER_DESKTOP_CACHE", str(tmp_path_factory.mktemp("train-cache-av")))
        return train_checkpoint(tmp_path_factory.mktemp("ckpt_av") / "fastcnn_av.safetensors", av_head=True)


@pytest.fixture(scope="session")
def fastcnn_av_only_checkpoint(fastcnn_av_checkpoint, tmp_path_factory) -> Path:
    """A model with only a valence/arousal head (no expression categories): the trained AV fixture's body and
    AV head (input-dependent outputs, see :func:`av_only_checkpoint`)."""
    return av_only_checkpoint(fastcnn_av_checkpoint,
                              tmp_path_factory.mktemp("ckpt_av_only") / "fastcnn_av_only.safetensors")


def synth_frame(i: int) -> np.ndarray:
    """Frame ``i`` of the synthetic video: grey level encodes the index (10 * i + 5)."""
    w, h = SYNTH_SIZE
    img = np.full((h, w, 3), 10 * i + 5, np.uint8)
    cv2.rectangle(img, (10 + 5 * i, 20), (40 + 5 * i, 60), (255, 255, 255), -1)
    return img


@pytest.fixture(scope="session")
def synthetic_video(tmp_path_factory) -> Path:
    """A tiny MJPG .avi: SYNTH_FRAMES frames at SYNTH_FPS, SYNTH_SIZE."""
    path = tmp_path_factory.mktemp("video") / "synthetic.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), SYNTH_FPS, SYNTH_SIZE)
    assert writer.isOpened(), "OpenCV cannot write MJPG .avi here"
    for i in range(SYNTH_FRAMES):
        writer.write(synth_frame(i))
    writer.release()
    return path


@pytest.fixture(scope="session")
def media_dir() -> Path:
    """``../shared/data/media`` (real faces, never committed); skips the test when absent."""
    if not MEDIA_DIR.is_dir():
        pytest.skip(f"offline test media not found at {MEDIA_DIR}")
    return MEDIA_DIR


def pattern_face(rng, size: int, amplitude: float, noise: float, blob_var: float) -> tuple[int, np.ndarray]:
    """(class, uint8 size x size face) of one of 4 easy synthetic patterns: horizontal stripes, vertical stripes,
    a checker, a central blob (variance ``blob_var``), random phase and frequency."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    c = int(rng.integers(0, 4))
    ph, f = rng.uniform(0, 2 * np.pi), rng.uniform(0.3, 0.5)
    m = size / 2
    p = [np.sin(f * yy + ph), np.sin(f * xx + ph), np.sign(np.sin(f * xx + ph) * np.sin(f * yy + ph)),
         2 * np.exp(-((xx - m) ** 2 + (yy - m) ** 2) / blob_var) - 1][c]
    return c, np.clip(128 + amplitude * p + rng.normal(0, noise, (size, size)), 0, 255).astype(np.uint8)


def write_fer2013(folder: Path, n_train: int = 160, n_val: int = 48, n_private: int = 0, seed: int = 0,
                  copies: int = 0) -> Path:
    """fer2013.csv (emotion,pixels,Usage) in Kaggle's format whose classes 0..3 are easy synthetic patterns.
    ``copies``: the first PublicTest rows take the pixels of Training rows 0, 1, ... (as the real file's do);
    every third copy with another label than its Training twin."""
    rng = np.random.default_rng(seed)
    rows = []
    for usage, n in (("Training", n_train), ("PublicTest", n_val), ("PrivateTest", n_private)):
        for _ in range(n):
            c, img = pattern_face(rng, 48, 60, 20, 60.0)
            rows.append((c, " ".join(map(str, img.reshape(-1))), usage))
    for i in range(copies):
        c, pixels, _ = rows[i]
        rows[n_train + i] = ((c + 1) % 4 if i % 3 == 2 else c, pixels, "PublicTest")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "fer2013.csv"
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["emotion", "pixels", "Usage"])
        w.writerows(rows)
    return path


def write_afew_va(folder: Path, n_clips: int = 12, frames: int = 16, seed: int = 0) -> Path:
    """AFEW-VA in its real layout (``AFEW-VA/<clip>/<clip>.json`` + ``00000.png`` ...; valence/arousal in
    [-10, 10] and 68 landmarks per frame) whose faces are learnable: each frame's face (the landmarks' box) is one
    of 4 synthetic patterns, and its valence/arousal is that pattern's corner of the plane plus noise. Six actors,
    so the reader's subject folds split them."""
    import json

    import cv2

    rng = np.random.default_rng(seed)
    corners = np.array([[6.0, 5.0], [-6.0, 5.0], [-5.0, -5.0], [5.0, -6.0]])
    base = folder / "AFEW-VA"
    for k in range(n_clips):
        clip = f"{k + 1:03d}"
        d = base / clip
        d.mkdir(parents=True, exist_ok=True)
        doc: dict = {"actor": f"actor{k % 6}", "video_id": clip, "frames": {}}
        for f in range(frames):
            c, face = pattern_face(rng, 64, 70, 15, 120.0)
            img = np.full((120, 160, 3), 40, np.uint8)
            img[28:92, 48:112] = face[..., None]
            fid = f"{f:05d}"
            cv2.imwrite(str(d / f"{fid}.png"), img)
            lm = [[52.0 + 56 * (i % 9) / 8, 32.0 + 56 * (i // 9) / 7] for i in range(68)]
            v, a = np.clip(corners[c] + rng.normal(0, 1.0, 2), -10, 10)
            doc["frames"][fid] = {"valence": round(float(v), 2), "arousal": round(float(a), 2), "landmarks": lm}
        (d / f"{clip}.json").write_text(json.dumps(doc))
    return base


# ------------------------------------------------------------------------------- training-run helpers


class Kill(Exception):
    pass


class KillAt:
    """Simulates a crash: raises at a given step of an epoch, or after an epoch's metrics row is logged
    (before its state.pt is written)."""

    def __init__(self, epoch: int, step: int | None = None):
        self.epoch, self.step = epoch, step

    def on_step_end(self, trainer, epoch, step):
        if self.step is not None and epoch == self.epoch and step == self.step:
            raise Kill(f"killed at epoch {epoch} step {step}")

    def on_epoch_end(self, trainer, epoch, row):
        if self.step is None and epoch == self.epoch:
            raise Kill(f"killed after logging epoch {epoch}")


def deep_diff(a, b, path="") -> list[str]:
    """Paths where two nested state structures differ (tensors compared bitwise)."""
    import torch

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        ok = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
        return [] if ok else [path]
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{path} keys {sorted(map(str, a))} != {sorted(map(str, b))}"]
        return [d for k in a for d in deep_diff(a[k], b[k], f"{path}/{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{path} length"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in deep_diff(x, y, f"{path}[{i}]")]
    same = a == b or (isinstance(a, float) and isinstance(b, float) and a != a and b != b)
    return [] if same else [f"{path}: {a!r} != {b!r}"]
