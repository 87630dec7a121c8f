"""trainers.calibrate: recovering a known crop margin from dataset-like crops, the report, the picture,
and --apply (weights bit-identical, only the crop fields and the calibration record change)."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from conftest import make_checkpoint
from ferengine import checkpoint as ck
from ferengine.preprocess import InputSpec, crop_faces
from trainers import calibrate as cal

KNOWN = {"tight": (0.10, 0.0), "loose": (0.45, -0.10)}  # (crop_margin, crop_offset_y) the fixtures are cut with


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FER_DESKTOP_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def detector():
    from ferengine.faces import FaceDetector

    with FaceDetector("short") as det:
        yield det


@pytest.fixture(scope="module")
def astronaut_views(detector) -> list[tuple[np.ndarray, object]]:
    """skimage's astronaut at several sizes, mirrored or not, tilted -8/0/+8 degrees, with the detected face."""
    from skimage.data import astronaut

    base = cv2.cvtColor(astronaut(), cv2.COLOR_RGB2BGR)
    views = []
    for flip in (False, True):
        for scale in (1.5, 2.0, 2.5):
            for angle in (-8, 0, 8):
                img = cv2.resize(base, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)
                if flip:
                    img = np.ascontiguousarray(img[:, ::-1])
                rot = cv2.getRotationMatrix2D((img.shape[1] / 2, img.shape[0] / 2), angle, 1.0)
                img = cv2.warpAffine(img, rot, (img.shape[1], img.shape[0]), borderMode=cv2.BORDER_REFLECT)
                faces = detector.detect(img)
                assert faces, f"no face in the astronaut view flip={flip} scale={scale} angle={angle}"
                views.append((img, faces[0]))
    return views


def _write_fer_csv(path: Path, faces: np.ndarray) -> None:
    """Kaggle's fer2013.csv format: emotion,pixels,Usage; all rows Training."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["emotion,pixels,Usage"]
    for i, f in enumerate(faces):
        lines.append(f"{i % 7},{' '.join(map(str, np.asarray(f, np.uint8).ravel()))},Training")
    path.write_text("\n".join(lines) + "\n")


def _dataset_of_crops(root: Path, views, margin: float, offset: float) -> Path:
    spec = InputSpec(size=48, channels=1, crop_margin=margin, crop_offset_y=offset)
    crops = np.concatenate([crop_faces(img, [f.box], [f.keypoints], spec) for img, f in views])
    _write_fer_csv(root / "fer2013.csv", crops)
    return root


def test_recovers_the_margin_the_crops_were_cut_with(astronaut_views, tmp_path):
    got = {}
    for name, (margin, offset) in KNOWN.items():
        data = _dataset_of_crops(tmp_path / name, astronaut_views, margin, offset)
        res = cal.calibrate("fer2013", data, "train", n=100, media=tmp_path / "no media", sheet=False)
        s = res["dataset"]
        assert s["n_faces"] == len(astronaut_views) and s["detection_rate"] >= 0.9
        rec = res["recommended"]
        # the detector's box on an enlarged 48-pixel face is within a few % of its box on the full photo
        assert abs(rec["crop_margin"] - margin) < 0.1, (name, rec, margin)
        assert abs(rec["crop_offset_y"] - offset) < 0.05, (name, rec, offset)
        assert abs(s["offset_x"]["median"]) < 0.05
        assert s["margin"]["q25"] <= rec["crop_margin"] <= s["margin"]["q75"]
        got[name] = rec
    # and it tells the two framings apart by about the right amount
    diff = got["loose"]["crop_margin"] - got["tight"]["crop_margin"]
    assert diff == pytest.approx(KNOWN["loose"][0] - KNOWN["tight"][0], abs=0.07)
    assert got["loose"]["crop_offset_y"] < got["tight"]["crop_offset_y"]


def test_cli_writes_calibration_json_and_crops_png(astronaut_views, tmp_path, capsys):
    data = _dataset_of_crops(tmp_path / "data", astronaut_views[:9], 0.2, -0.05)
    media = tmp_path / "media"
    (media / "photos").mkdir(parents=True)
    for i, (img, _) in enumerate(astronaut_views[::6]):
        cv2.imwrite(str(media / "photos" / f"view{i}.jpg"), img)
    out = tmp_path / "out"
    rc = cal.main(["--data", "fer2013", "--data-dir", str(data), "--n", "50", "--media", str(media), "--out", str(out),
                   "-q"])
    printed = capsys.readouterr().out
    assert rc == 0
    assert "recommended: crop_margin" in printed and "closed loop" in printed
    res = json.loads((out / "calibration.json").read_text())
    assert set(res["recommended"]) == {"crop_margin", "crop_offset_y", "align"}
    assert res["dataset"]["n_faces"] == 9 and res["method"]["n_sampled"] == 9
    assert res["check"]["n_photo_faces"] == len(astronaut_views[::6])
    assert res["command"].startswith("python -m trainers.calibrate")
    png = cv2.imread(str(out / "crops.png"), cv2.IMREAD_GRAYSCALE)
    assert png is not None and png.shape[1] == 12 * 144 + 13 * 4
    assert sorted(p.name for p in out.iterdir()) == ["calibration.json", "crops.png"]  # no temp files left


def _raw(path: Path) -> tuple[dict, dict]:
    meta, state, _ = ck._read(path)
    return meta, state


@pytest.mark.parametrize("kind", ["safetensors", "pt", "fp16"])
def test_apply_rewrites_only_the_crop_fields(kind, tmp_path, capsys):
    name = "model.pt" if kind == "pt" else "model.safetensors"
    path = make_checkpoint(tmp_path / name)
    if kind == "fp16":  # a half-precision file stays half precision, bit for bit
        loaded = ck.load(path)
        ck.save(path, loaded.model, loaded.info, half=True)
    meta0, state0 = _raw(path)
    calib = {"recommended": {"crop_margin": 0.15, "crop_offset_y": -0.097, "align": True}, "data": "fer2013",
             "split": "train", "detector": "short", "date": "2025-01-01", "command": "python -m trainers.calibrate",
             "dataset": {"margin": {"median": 0.15, "q25": 0.04, "q75": 0.3},
                         "offset_y": {"median": -0.097, "q25": -0.14, "q75": -0.05},
                         "detection_rate": 0.97, "n_detected": 1945}}
    (tmp_path / "calibration.json").write_text(json.dumps(calib))
    assert cal.main(["--calibration", str(tmp_path / "calibration.json"), "--apply", str(path)]) == 0
    assert "crop_margin 0.25 -> 0.15" in capsys.readouterr().out

    meta1, state1 = _raw(path)
    assert sorted(state0) == sorted(state1)
    for k in state0:
        assert state0[k].dtype == state1[k].dtype and torch.equal(state0[k], state1[k]), k
    if kind == "fp16":
        assert state1["head.fc.weight"].dtype == torch.float16
    spec = InputSpec.from_dict(meta1["input"])
    assert spec.crop_margin == 0.15 and spec.crop_offset_y == -0.097
    assert {k: v for k, v in meta1["input"].items() if not k.startswith("crop_")} == \
           {k: v for k, v in meta0["input"].items() if not k.startswith("crop_")}
    for key in ("format", "format_version", "name", "arch", "arch_kwargs", "labels", "heads", "metrics"):
        assert meta1[key] == meta0[key], key
    rec = meta1["training"].pop("crop_calibration")
    assert meta1["training"] == meta0["training"]
    assert rec["previous"] == {"crop_margin": 0.25, "crop_offset_y": 0.0}
    assert rec["crop_margin"] == 0.15 and rec["detection_rate"] == 0.97 and rec["margin_iqr"] == [0.04, 0.3]
    assert ck.load(path).spec.crop_margin == 0.15  # still loads
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["calibration.json", name])


def test_apply_to_a_bad_checkpoint_fails_cleanly(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint at all")
    (tmp_path / "c.json").write_text(json.dumps({"recommended": {"crop_margin": 0.1, "crop_offset_y": 0.0}}))
    assert cal.main(["--calibration", str(tmp_path / "c.json"), "--apply", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("calibrate: error:") and err.count("\n") == 1 and "bad.safetensors" in err
    assert bad.read_bytes() == b"not a checkpoint at all"


def test_embed_face_maps_back_to_face_pixels():
    face = np.zeros((48, 48), np.uint8)
    face[10:20, 30:40] = 255
    frame, p = cal.embed_face(face, scale=4, pad=0.5)
    assert p == 24 and frame.shape == (4 * 96, 4 * 96)
    ys, xs = np.nonzero(frame > 128)
    # the bright square comes back at face pixels 30..40 x 10..20
    assert xs.min() / 4 - p == pytest.approx(30, abs=0.5) and xs.max() / 4 - p == pytest.approx(40, abs=0.5)
    assert ys.min() / 4 - p == pytest.approx(10, abs=0.5) and ys.max() / 4 - p == pytest.approx(20, abs=0.5)
    # the face itself is untouched inside the frame (the border blends only outside it)
    small = cv2.resize(frame, (96, 96), interpolation=cv2.INTER_AREA)
    assert np.abs(small[p:p + 48, p:p + 48].astype(int) - face).mean() < 3
