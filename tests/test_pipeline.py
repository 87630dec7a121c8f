"""The pipeline (detect -> track -> crop -> one batched inference -> smoothing) and the result writers."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from ferengine import checkpoint as ck
from ferengine.faces import Face, IoUTracker
from ferengine.labels import AV_ANCHORS, LABEL_SETS, estimate_va
from ferengine.pipeline import FaceResult, FrameResult, Pipeline
from ferengine.errors import OutputError
from ferengine.results import ResultWriter, csv_columns, frame_result_to_dicts

LABELS = LABEL_SETS["fer7"]


@pytest.fixture(scope="module")
def astronaut_bgr() -> np.ndarray:
    from skimage.data import astronaut

    return cv2.cvtColor(astronaut(), cv2.COLOR_RGB2BGR)


@pytest.fixture(scope="module")
def three_faces_bgr(astronaut_bgr) -> np.ndarray:
    """640x473: the astronaut's face three times side by side."""
    face = cv2.resize(astronaut_bgr[20:260, 100:340], (213, 213), interpolation=cv2.INTER_AREA)
    row = np.concatenate([face, face, face], axis=1)
    return cv2.copyMakeBorder(row, 130, 130, 0, 1, cv2.BORDER_CONSTANT)


@pytest.fixture(scope="module")
def loaded(fastcnn_checkpoint):
    return ck.load(fastcnn_checkpoint)


@pytest.fixture(scope="module")
def pipe(loaded):
    with Pipeline(loaded, backend="torch", device="cpu", smoothing=0.0) as p:
        yield p


class CountingBackend:
    """A torch backend that records the batch of every call."""

    def __init__(self, loaded):
        from ferengine.backends import create_backend

        self.inner, self.batches, self.closed = create_backend("torch", loaded, "cpu"), [], False
        self.name, self.device = self.inner.name, self.inner.device

    def run(self, batch):
        self.batches.append(np.array(batch))
        return self.inner.run(batch)

    def close(self):
        self.closed = True
        self.inner.close()


# ---------------------------------------------------------------------------------------- real model


def test_one_face_astronaut(pipe, astronaut_bgr):
    pipe.reset()
    fr = pipe.process(astronaut_bgr, index=3, time_s=0.1)
    assert isinstance(fr, FrameResult) and fr.index == 3 and fr.time_s == pytest.approx(0.1)
    assert fr.labels == LABELS
    assert len(fr.faces) == 1
    face = fr.faces[0]
    assert isinstance(face, FaceResult) and face.face_id >= 1
    x, y, w, h = face.box
    assert 150 < x + w / 2 < 260 and 80 < y + h / 2 < 180 and 60 < w < 160  # her face
    assert face.keypoints.shape == (6, 2)
    assert face.probs.shape == (7,) and face.probs.dtype == np.float32
    assert face.probs.sum() == pytest.approx(1.0, abs=1e-5) and (face.probs >= 0).all()
    assert face.label in LABELS and face.label == LABELS[int(face.probs.argmax())]
    assert face.confidence == pytest.approx(float(face.probs.max()))
    assert face.av_source == "estimated"
    assert (face.valence, face.arousal) == pytest.approx(estimate_va(face.probs, LABELS), abs=1e-5)
    assert -1 <= face.valence <= 1 and -1 <= face.arousal <= 1
    t = fr.timings
    assert {"detect_ms", "preprocess_ms", "infer_ms", "total_ms"} <= set(t)
    assert all(v >= 0 for v in t.values())
    assert t["total_ms"] >= t["detect_ms"] + t["preprocess_ms"] + t["infer_ms"] - 1e-6


def test_probabilities_match_the_model(pipe, astronaut_bgr, loaded):
    """The pipeline's probabilities are the model's softmax on the preprocessed crop."""
    import torch

    from ferengine.preprocess import crop_faces, to_model_input

    pipe.reset()
    fr = pipe.process(astronaut_bgr)
    f = fr.faces[0]
    x = to_model_input(crop_faces(astronaut_bgr, [f.box], [f.keypoints], loaded.spec), loaded.spec)
    with torch.no_grad():
        ref = loaded.model(torch.from_numpy(x))["logits"].softmax(1)[0].numpy()
    np.testing.assert_allclose(f.probs, ref, atol=1e-4)


def test_blank_frame_has_no_faces_and_no_inference(loaded):
    counting = CountingBackend(loaded)
    with Pipeline(loaded, backend=counting) as p:
        fr = p.process(np.zeros((480, 640, 3), np.uint8), index=7)
        assert fr.faces == [] and fr.index == 7
        assert fr.timings["infer_ms"] == 0.0
        assert counting.batches == []
    assert counting.closed  # a backend handed to the pipeline is closed with it


def test_av_head_model_reports_head_values(fastcnn_av_checkpoint, astronaut_bgr):
    av_loaded = ck.load(fastcnn_av_checkpoint)
    counting = CountingBackend(av_loaded)
    with Pipeline(av_loaded, backend=counting, smoothing=0.0) as p:
        fr = p.process(astronaut_bgr)
        out = counting.inner.run(counting.batches[0])
    face = fr.faces[0]
    assert face.av_source == "head"
    assert set(out) >= {"probs", "va"}
    assert (face.valence, face.arousal) == pytest.approx(tuple(out["va"][0]), abs=1e-6)
    assert face.probs.sum() == pytest.approx(1.0, abs=1e-5)


def test_several_faces_one_batched_call(loaded, three_faces_bgr):
    with Pipeline(loaded, backend="torch", device="cpu", smoothing=0.0) as p:
        counting = CountingBackend(loaded)
        p.set_backend(counting)  # live switch
        assert p.backend is counting
        results = [p.process(three_faces_bgr, i) for i in range(3)]
    assert [len(fr.faces) for fr in results] == [3, 3, 3]
    assert len(counting.batches) == 3  # one call per frame ...
    assert [b.shape for b in counting.batches] == [(3, 1, 48, 48)] * 3  # ... with every face in it
    ids = [sorted(f.face_id for f in fr.faces) for fr in results]
    assert ids[0] == ids[1] == ids[2] and len(set(ids[0])) == 3
    # same face image, same alignment: nearly the same probabilities for all three (the detector's boxes
    # differ by a pixel or so, which a trained model notices a little)
    p = np.stack([f.probs for f in results[0].faces])
    assert np.abs(p - p[0]).max() < 0.1
    assert counting.closed


def test_path_and_default_checkpoint(fastcnn_checkpoint, monkeypatch, tmp_path):
    with Pipeline(str(fastcnn_checkpoint), backend="torch", device="cpu") as p:
        assert p.labels == LABELS and p.loaded.path == fastcnn_checkpoint
        detector = p.detector
    assert detector.closed  # the pipeline created it, the pipeline closed it
    monkeypatch.setenv("FER_DESKTOP_ASSETS", str(tmp_path))
    with pytest.raises(ck.CheckpointError, match="no default model"):
        Pipeline(None, backend="torch")


def test_set_backend_failure_keeps_the_current_one(loaded, astronaut_bgr):
    with Pipeline(loaded, backend="torch", device="cpu") as p:
        before = p.backend
        with pytest.raises(Exception):
            p.set_backend("no-such-backend")
        assert p.backend is before
        assert len(p.process(astronaut_bgr).faces) == 1
    with pytest.raises(RuntimeError, match="closed"):
        p.process(astronaut_bgr)


def test_ids_stable_on_a_real_video(pipe, media_dir):
    from ferengine.sources import open_source

    video = media_dir / "videos" / "pyfeat_single_face.mp4"
    if not video.exists():
        pytest.skip(f"{video} not found")
    pipe.reset()
    ids = []
    with open_source(video) as src:
        for frame in src:
            fr = pipe.process(frame.image, frame.index, frame.time_s)
            ids.append([f.face_id for f in fr.faces])
            if frame.index >= 39:
                break
    with_face = [i for i in ids if i]
    assert len(with_face) >= 0.9 * len(ids)
    assert all(len(i) == 1 for i in with_face)
    assert len({i[0] for i in with_face}) == 1


# ----------------------------------------------------------------------------------- smoothing maths


class ScriptedDetector:
    """Returns the boxes it is told to, as fresh Face objects (no MediaPipe)."""

    def __init__(self):
        self.boxes: list[tuple] = []
        self.min_confidence, self.max_faces, self.closed = 0.5, 0, False

    def detect(self, frame):
        kp = np.array([[30, 40], [60, 40], [45, 55], [45, 70], [20, 45], [70, 45]], np.float32)
        return [Face(box=b, keypoints=kp + (b[0], b[1]), score=0.9) for b in self.boxes]

    def close(self):
        self.closed = True


class ScriptedBackend:
    """Returns the next scripted output (rows per face) on every run."""

    name, device = "scripted", "cpu"

    def __init__(self, outputs):
        self.outputs, self.calls = list(outputs), 0

    def run(self, batch):
        out = self.outputs[self.calls]
        self.calls += 1
        assert all(len(v) == len(batch) for v in out.values())
        return {k: np.asarray(v, np.float32) for k, v in out.items()}

    def close(self):
        pass


BOX_A, BOX_B = (10.0, 10.0, 80.0, 80.0), (200.0, 10.0, 80.0, 80.0)
FRAME = np.zeros((120, 320, 3), np.uint8)


def _onehot(k, n=7):
    p = np.zeros(n, np.float32)
    p[k] = 1.0
    return p


def test_smoothing_maths(loaded):
    happy, sad = LABELS.index("happy"), LABELS.index("sad")
    det = ScriptedDetector()
    p1, p2, p3, p4 = _onehot(happy), _onehot(sad), _onehot(sad), _onehot(happy)
    q = np.full(7, 1 / 7, np.float32)
    backend = ScriptedBackend([{"probs": [p1, q]}, {"probs": [p2, q]}, {"probs": [p3, q]}, {"probs": [p4, q]}])
    det.boxes = [BOX_A, BOX_B]
    with Pipeline(loaded, backend=backend, detector=det, smoothing=0.5,
                  tracker=IoUTracker(max_missed=0)) as p:
        r1 = p.process(FRAME)
        np.testing.assert_allclose(r1.faces[0].probs, p1)  # first sight: nothing to smooth with
        r2 = p.process(FRAME)
        s2 = 0.5 * p1 + 0.5 * p2
        np.testing.assert_allclose(r2.faces[0].probs, s2, atol=1e-6)
        np.testing.assert_allclose(r2.faces[1].probs, q, atol=1e-6)  # faces are smoothed independently
        assert r2.faces[0].face_id == r1.faces[0].face_id
        # estimated AV follows the smoothed probabilities
        assert (r2.faces[0].valence, r2.faces[0].arousal) == pytest.approx(estimate_va(s2, LABELS), abs=1e-6)
        p.smoothing = 0.8  # live change
        r3 = p.process(FRAME)
        s3 = 0.8 * s2 + 0.2 * p3
        np.testing.assert_allclose(r3.faces[0].probs, s3, atol=1e-6)
        assert r3.faces[0].label == "sad" and r3.faces[0].confidence == pytest.approx(0.6)  # 0.4 happy, 0.6 sad
        p.smoothing = 0.0  # off: raw outputs
        r4 = p.process(FRAME)
        np.testing.assert_allclose(r4.faces[0].probs, p4)
        for bad in (1.0, -0.1, 1.5):
            with pytest.raises(ValueError):
                p.smoothing = bad
        assert p.smoothing == 0.0
    assert not det.closed  # the caller's detector is the caller's to close


def test_state_is_dropped_when_the_track_disappears(loaded):
    happy, sad = LABELS.index("happy"), LABELS.index("sad")
    det = ScriptedDetector()
    va1, va2 = [0.5, -0.5], [-0.5, 0.5]
    backend = ScriptedBackend([
        {"probs": [_onehot(happy)], "va": [va1]},
        {"probs": [_onehot(sad)], "va": [va2]},
        {"probs": [_onehot(sad)], "va": [va2]},
    ])
    with Pipeline(loaded, backend=backend, detector=det, smoothing=0.5,
                  tracker=IoUTracker(max_missed=1)) as p:
        det.boxes = [BOX_A]
        r1 = p.process(FRAME)
        assert r1.faces[0].av_source == "head"
        assert (r1.faces[0].valence, r1.faces[0].arousal) == pytest.approx(va1)
        det.boxes = []
        p.process(FRAME)  # missed once: the track (and its state) survive
        assert p._state.keys() == {r1.faces[0].face_id}
        det.boxes = [BOX_A]
        r2 = p.process(FRAME)  # back within max_missed: same id, smoothed
        assert r2.faces[0].face_id == r1.faces[0].face_id
        assert (r2.faces[0].valence, r2.faces[0].arousal) == pytest.approx([0.0, 0.0], abs=1e-6)
        det.boxes = []
        p.process(FRAME)
        p.process(FRAME)  # missed twice > max_missed: track gone, state gone
        assert p._state == {}
        det.boxes = [BOX_A]
        r3 = p.process(FRAME)
        assert r3.faces[0].face_id != r1.faces[0].face_id
        np.testing.assert_allclose(r3.faces[0].probs, _onehot(sad))  # fresh, not smoothed with the old face
        assert (r3.faces[0].valence, r3.faces[0].arousal) == pytest.approx(va2)


def test_reset_forgets_state(loaded):
    det = ScriptedDetector()
    det.boxes = [BOX_A]
    backend = ScriptedBackend([{"probs": [_onehot(0)]}, {"probs": [_onehot(1)]}])
    with Pipeline(loaded, backend=backend, detector=det, smoothing=0.9) as p:
        p.process(FRAME)
        p.reset()
        np.testing.assert_allclose(p.process(FRAME).faces[0].probs, _onehot(1))


# --------------------------------------------------------------------------------------------- results


def _frame_result(index, faces_spec, labels=LABELS):
    faces = []
    for fid, probs in faces_spec:
        probs = np.asarray(probs, np.float32)
        k = int(probs.argmax())
        v, a = estimate_va(probs, labels)
        faces.append(FaceResult(fid, (10.5 * fid, 20.25, 64.0, 70.125), 0.87654321, np.zeros((6, 2), np.float32),
                                probs, labels[k], float(probs[k]), v, a, "estimated"))
    return FrameResult(index, index / 30.0, faces, {"total_ms": 1.0}, tuple(labels))


def test_csv_columns_and_values(tmp_path):
    pd = pytest.importorskip("pandas")
    out = tmp_path / "res.csv"
    probs = np.array([0.1, 0.0, 0.05, 0.6, 0.05, 0.1, 0.1], np.float32)
    with ResultWriter(out, LABELS) as w:
        w.write(_frame_result(0, [(1, probs), (2, _onehot(6))]))
        w.write(_frame_result(1, []))  # no face: no row
        w.write(_frame_result(2, [(1, probs)]))
        assert not out.exists()  # still in the temp file
    df = pd.read_csv(out)
    assert list(df.columns) == ["frame", "time_s", "face_id", "x", "y", "w", "h", "score", "label",
                                *LABELS, "valence", "arousal", "av_source"]
    assert list(df.columns) == csv_columns(LABELS)
    assert len(df) == 3 and df["frame"].tolist() == [0, 0, 2] and df["face_id"].tolist() == [1, 2, 1]
    assert df["time_s"].tolist() == pytest.approx([0, 0, 2 / 30], abs=1e-6)
    assert df["label"].tolist() == ["happy", "neutral", "happy"]
    np.testing.assert_allclose(df.loc[0, list(LABELS)].to_numpy(float), probs, atol=1e-5)
    assert df.loc[0, "x"] == pytest.approx(10.5) and df.loc[0, "h"] == pytest.approx(70.125, abs=0.006)
    assert df.loc[0, "score"] == pytest.approx(0.87654, abs=1e-5)
    assert (df.loc[0, "valence"], df.loc[0, "arousal"]) == pytest.approx(estimate_va(probs, LABELS), abs=1e-5)
    assert df.loc[1, "valence"] == 0 and df["av_source"].eq("estimated").all()
    assert [p.name for p in tmp_path.iterdir()] == ["res.csv"]  # no temp file left


def test_csv_kept_as_partial_when_the_block_raises(tmp_path):
    pd = pytest.importorskip("pandas")
    out = tmp_path / "res.csv"
    out.write_text("old contents\n")
    with pytest.raises(KeyboardInterrupt):
        with ResultWriter(out, LABELS) as w:
            w.write(_frame_result(0, [(1, _onehot(3))]))
            assert out.read_text() == "old contents\n"  # replaced atomically, only at the end
            raise KeyboardInterrupt
    assert out.read_text() == "old contents\n"  # an unfinished result never takes the final name
    df = pd.read_csv(tmp_path / "res.partial.csv")
    assert len(df) == 1 and df.loc[0, "label"] == "happy"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["res.csv", "res.partial.csv"]


def test_writer_rejects_mismatched_labels_and_missing_folder(tmp_path):
    with pytest.raises(OutputError, match="folder .*nope does not exist"):
        ResultWriter(tmp_path / "nope" / "r.csv", LABELS)
    with pytest.raises(ValueError, match="clash"):
        ResultWriter(tmp_path / "r.csv", ("happy", "label"))
    with ResultWriter(tmp_path / "r.csv", LABEL_SETS["ferplus8"]) as w:
        with pytest.raises(ValueError, match="differ"):
            w.write(_frame_result(0, [(1, _onehot(3))]))


def test_frame_result_to_dicts_is_json_ready():
    probs = np.array([0.1, 0.0, 0.05, 0.6, 0.05, 0.1, 0.1], np.float32)
    fr = _frame_result(4, [(3, probs)])
    [d] = frame_result_to_dicts(fr)
    text = json.dumps(d)  # plain Python types only
    back = json.loads(text)
    assert back["frame"] == 4 and back["face_id"] == 3 and back["label"] == "happy"
    assert back["happy"] == pytest.approx(0.6, abs=1e-5) and back["confidence"] == pytest.approx(0.6, abs=1e-5)
    assert [back[k] for k in ("x", "y", "w", "h")] == pytest.approx([31.5, 20.25, 64.0, 70.125], abs=0.006)
    assert back["av_source"] == "estimated" and len(back["keypoints"]) == 6
    assert set(csv_columns(LABELS)) <= set(back)
    assert frame_result_to_dicts(_frame_result(5, [])) == []


def test_estimated_va_for_one_hot_faces_is_the_anchor(loaded):
    det = ScriptedDetector()
    det.boxes = [BOX_A]
    surprise = LABELS.index("surprise")
    with Pipeline(loaded, backend=ScriptedBackend([{"probs": [_onehot(surprise)]}]), detector=det,
                  smoothing=0.0) as p:
        f = p.process(FRAME).faces[0]
    assert (f.valence, f.arousal) == pytest.approx(AV_ANCHORS["surprise"], abs=1e-6)
    assert f.label == "surprise" and f.av_source == "estimated"
