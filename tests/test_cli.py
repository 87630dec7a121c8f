"""`fer` end to end, as a user types it (in-process through ferengine.cli.main)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from ferengine.cli import main
from ferengine.labels import LABEL_SETS

LABELS = list(LABEL_SETS["fer7"])
CSV_COLUMNS = ["frame", "time_s", "face_id", "x", "y", "w", "h", "score", "label", *LABELS,
               "valence", "arousal", "av_source"]


@pytest.fixture(scope="module")
def astronaut_png(tmp_path_factory):
    from skimage.data import astronaut

    folder = tmp_path_factory.mktemp("photos")
    path = folder / "astronaut.png"
    bgr = cv2.cvtColor(astronaut(), cv2.COLOR_RGB2BGR)
    # 2x: at 512 px the face is small for the short-range detector; the app's webcam frames are larger
    cv2.imwrite(str(path), cv2.resize(bgr, (1024, 1024)))
    cv2.imwrite(str(folder / "blank.png"), np.full((200, 300, 3), 128, np.uint8))
    (folder / "notes.txt").write_text("not an image")
    return path


def test_predict_json_on_a_real_face(astronaut_png, fastcnn_checkpoint, capsys):
    assert main(["predict", str(astronaut_png), "--checkpoint", str(fastcnn_checkpoint), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["labels"] == LABELS
    (img,) = out["images"]
    (face,) = img["faces"]
    assert face["label"] in LABELS
    assert sum(face[lab] for lab in LABELS) == pytest.approx(1.0, abs=1e-3)
    assert face["av_source"] == "estimated"
    # the box is on her face (upper middle of the photo), not anywhere
    cx, cy = face["x"] + face["w"] / 2, face["y"] + face["h"] / 2
    assert 300 < cx < 700 and 100 < cy < 500


def test_predict_folder_table(astronaut_png, fastcnn_checkpoint, capsys):
    assert main(["predict", str(astronaut_png.parent), "-c", str(fastcnn_checkpoint)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:2] == ["file", "id"]
    rows = {line.split()[0]: line for line in out[1:]}
    assert set(rows) == {"astronaut.png", "blank.png"}  # notes.txt is not an image
    assert "no face found" in rows["blank.png"]
    assert rows["astronaut.png"].split()[1] == "1"


def test_analyze_writes_the_documented_csv(synthetic_video, fastcnn_checkpoint, tmp_path, media_dir):
    pd = pytest.importorskip("pandas")
    video = media_dir / "videos" / "pyfeat_single_face.mp4"
    out = tmp_path / "results.csv"
    assert main(["analyze", str(video), "-c", str(fastcnn_checkpoint), "--out", str(out), "-q",
                 "--max-frames", "20"]) == 0
    df = pd.read_csv(out)
    assert list(df.columns) == CSV_COLUMNS
    assert len(df) == 20 and df["frame"].tolist() == list(range(20))  # one face in every frame
    assert df["face_id"].nunique() == 1
    assert np.allclose(df[LABELS].sum(axis=1), 1.0, atol=1e-3)
    assert (df["time_s"].diff().dropna() > 0).all()
    assert set(df["av_source"]) == {"estimated"}
    # a video without faces gives a CSV with the header only
    empty = tmp_path / "empty.csv"
    assert main(["analyze", str(synthetic_video), "-c", str(fastcnn_checkpoint), "-o", str(empty), "-q"]) == 0
    assert list(pd.read_csv(empty).columns) == CSV_COLUMNS


def test_export_onnx_runs_in_onnxruntime(fastcnn_checkpoint, tmp_path):
    import onnxruntime as ort

    out = tmp_path / "model.onnx"
    assert main(["export", "--format", "onnx", "-c", str(fastcnn_checkpoint), "--out", str(out)]) == 0
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (probs,) = sess.run(["probs"], {"input": np.zeros((3, 1, 48, 48), np.float32)})
    assert probs.shape == (3, 7) and np.allclose(probs.sum(1), 1, atol=1e-5)


def test_export_tensorrt_says_why_it_is_unavailable(fastcnn_checkpoint, tmp_path, capsys):
    from ferengine.trt import tensorrt_build_reason

    reason = tensorrt_build_reason()
    if reason is None:
        pytest.skip("a TensorRT builder is installed here (tests/test_tensorrt.py covers fer export --format tensorrt)")
    code = main(["export", "--format", "tensorrt", "-c", str(fastcnn_checkpoint), "-o", str(tmp_path / "m.engine")])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("fer: error:") and "TensorRT" in err
    assert not (tmp_path / "m.engine").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["predict", "{tmp}/nope.jpg", "-c", "{ckpt}"], "no such file or folder"),
        (["predict", "{img}", "-c", "{tmp}/missing.safetensors"], "no such file"),
        (["analyze", "{tmp}/nope.mp4", "-c", "{ckpt}", "-o", "{tmp}/r.csv"], "nope.mp4"),
        (["info", "{tmp}/bad.safetensors"], "not a fer-desktop checkpoint"),
    ],
)
def test_bad_input_is_one_line_not_a_traceback(argv, message, tmp_path, astronaut_png, fastcnn_checkpoint, capsys):
    (tmp_path / "bad.safetensors").write_bytes(b"hello world, not weights")
    argv = [a.format(tmp=tmp_path, ckpt=fastcnn_checkpoint, img=astronaut_png) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("fer: error:") and message in err
    assert "Traceback" not in err


def test_without_checkpoint_and_no_default_model(astronaut_png, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FER_DESKTOP_ASSETS", str(tmp_path))
    assert main(["predict", str(astronaut_png)]) == 2
    assert "no default model is shipped" in capsys.readouterr().err


def test_info_and_backends(fastcnn_checkpoint, capsys):
    assert main(["info", str(fastcnn_checkpoint)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["arch"] == "fastcnn" and info["labels"] == LABELS
    assert main(["backends"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split()[0] for ln in lines] == ["torch", "onnxruntime", "tensorrt"]


FER_SCRIPT = Path(sys.executable).parent / "fer"


@pytest.mark.skipif(not FER_SCRIPT.exists(), reason="package not installed (pip install -e .)")
def test_console_script_is_installed():
    out = subprocess.run([str(FER_SCRIPT), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "predict" in out.stdout and "analyze" in out.stdout


# ------------------------------------------------------------------- a model with only a valence/arousal head


def _head_va(checkpoint: Path, image: np.ndarray) -> np.ndarray:
    """The model's own valence/arousal on each face of ``image`` (largest first), computed here: detector ->
    crop -> input -> the checkpoint's torch module."""
    import torch

    from ferengine.checkpoint import load
    from ferengine.faces import FaceDetector
    from ferengine.preprocess import crop_faces, to_model_input

    loaded = load(checkpoint)
    with FaceDetector("short") as det:
        faces = det.detect(image)
    assert faces, "no face found"
    crops = crop_faces(image, [f.box for f in faces], [f.keypoints for f in faces], loaded.spec)
    with torch.no_grad():
        return loaded.model(torch.from_numpy(to_model_input(crops, loaded.spec)))["va"].numpy()


def test_predict_with_an_av_only_model(astronaut_png, fastcnn_av_only_checkpoint, fastcnn_av_checkpoint, capsys):
    """JSON: no classes, no label, the head's valence/arousal (``av_source`` "head"), equal to the model's output
    on that face; the two-head model it came from gives the same values AND its class probabilities."""
    assert main(["predict", str(astronaut_png), "-c", str(fastcnn_av_only_checkpoint), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["labels"] == []
    (face,) = out["images"][0]["faces"]
    assert set(face) == {"frame", "time_s", "face_id", "x", "y", "w", "h", "score", "label", "valence", "arousal",
                         "av_source", "confidence", "keypoints"}  # no class keys, no made-up probabilities
    assert face["label"] is None and face["confidence"] is None and face["av_source"] == "head"
    want = _head_va(fastcnn_av_only_checkpoint, cv2.imread(str(astronaut_png)))[0]
    assert (face["valence"], face["arousal"]) == pytest.approx(tuple(want), abs=1e-4)

    assert main(["predict", str(astronaut_png), "-c", str(fastcnn_av_checkpoint), "--json"]) == 0
    (both,) = json.loads(capsys.readouterr().out)["images"][0]["faces"]
    assert both["av_source"] == "head" and both["label"] in LABELS
    assert sum(both[lab] for lab in LABELS) == pytest.approx(1.0, abs=1e-3)
    assert (both["valence"], both["arousal"]) == pytest.approx((face["valence"], face["arousal"]), abs=1e-4)

    # the table: no class columns, "-" for label and confidence, where the values came from
    assert main(["predict", str(astronaut_png), "-c", str(fastcnn_av_only_checkpoint)]) == 0
    header, row = capsys.readouterr().out.splitlines()
    assert header.split()[-3:] == ["val", "aro", "av"] and not any(lab in header for lab in LABELS)
    cells = row.split()
    assert cells[0] == "astronaut.png" and cells[3:5] == ["-", "-"] and cells[-1] == "head"
    assert float(cells[5]) == pytest.approx(face["valence"], abs=0.006)
    assert float(cells[6]) == pytest.approx(face["arousal"], abs=0.006)
    assert main(["predict", str(astronaut_png), "-c", str(fastcnn_av_checkpoint)]) == 0
    header, row = capsys.readouterr().out.splitlines()
    assert header.split()[-8:] == ["av", *[lab[:8] for lab in LABELS]] and row.split()[7] == "head"


def test_analyze_with_an_av_only_model(media_dir, fastcnn_av_only_checkpoint, tmp_path):
    """The CSV of an AV-only model: no class columns, an empty label, the head's values frame by frame."""
    pd = pytest.importorskip("pandas")
    from ferengine.sources import open_source

    video = media_dir / "videos" / "pyfeat_single_face.mp4"
    out = tmp_path / "av.csv"
    n = 8
    assert main(["analyze", str(video), "-c", str(fastcnn_av_only_checkpoint), "--out", str(out), "-q",
                 "--max-frames", str(n), "--smoothing", "0", "--backend", "torch"]) == 0
    assert out.read_text().splitlines()[0] == ("frame,time_s,face_id,x,y,w,h,score,label,"
                                               "valence,arousal,av_source")
    df = pd.read_csv(out, keep_default_na=False)
    assert df["frame"].tolist() == list(range(n)) and (df["label"] == "").all()
    assert (df["av_source"] == "head").all()
    with open_source(str(video)) as src:
        frames = [f.image for _, f in zip(range(n), src)]
    want = np.stack([_head_va(fastcnn_av_only_checkpoint, img)[0] for img in frames])
    got = df[["valence", "arousal"]].to_numpy(float)
    assert np.allclose(got, want, atol=1e-4), np.abs(got - want).max()
    assert np.ptp(want, axis=0).max() > 1e-3, "the head's output should change over the frames of a real video"
