"""Tests for ferengine.faces: MediaPipe face detector wrapper and the IoU tracker."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from skimage import data as skdata

from ferengine.faces import DETECTOR_MODELS, Face, FaceDetector, IoUTracker, iou

MEDIA = Path(__file__).parents[1].parent / "shared/data/media"
PHOTOS = MEDIA / "photos"
GROUP_PHOTO = PHOTOS / "pyfeat_multi_face.jpg"
MODELS = tuple(DETECTOR_MODELS)

# Where the astronaut's face is in skimage.data.astronaut() (512x512), checked by eye; both models' boxes
# overlap this by IoU ~0.86.
ASTRONAUT_FACE = (174.0, 75.0, 100.0, 100.0)


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return cv2.cvtColor(skdata.astronaut(), cv2.COLOR_RGB2BGR)  # skimage gives RGB


@pytest.fixture(scope="module")
def face_crop(astronaut) -> np.ndarray:
    return astronaut[30:330, 75:375]  # 300x300, face ~95 px, roughly centred


@pytest.fixture(scope="module")
def detectors():
    with FaceDetector("short") as short, FaceDetector("full") as full:
        yield {"short": short, "full": full}


def _photo(name: str) -> np.ndarray:
    if not PHOTOS.is_dir():
        pytest.skip(f"test photos not found at {PHOTOS}")
    img = cv2.imread(str(PHOTOS / name))
    assert img is not None, f"cannot read {PHOTOS / name}"
    return img


def _check_astronaut_face(face: Face, dx: float = 0.0, dy: float = 0.0) -> None:
    ref = (ASTRONAUT_FACE[0] + dx, ASTRONAUT_FACE[1] + dy, ASTRONAUT_FACE[2], ASTRONAUT_FACE[3])
    assert iou(face.box, ref) > 0.7, (face.box, ref)
    kp = face.keypoints
    assert kp.dtype == np.float32 and kp.shape == (6, 2)
    x, y, w, h = face.box
    for name, (px, py) in zip(("right eye", "left eye", "nose", "mouth"), kp[:4]):
        assert x <= px <= x + w and y <= py <= y + h, f"{name} keypoint {px, py} outside box {face.box}"
    (rex, rey), (lex, ley), (nx, ny), (mx, my) = kp[:4]
    # MediaPipe order: the subject's right eye first, which is on the image's left in a photo.
    assert rex < lex
    assert 0.3 * w < lex - rex < 0.7 * w  # pixels, not normalised coordinates
    assert max(rey, ley) < ny < my  # eyes above the nose tip above the mouth
    assert kp[4, 0] < rex and kp[5, 0] > lex  # ear tragions outside the eyes


# -- FaceDetector: single face ------------------------------------------------------------------------
@pytest.mark.parametrize("model", MODELS)
def test_astronaut_one_face(detectors, astronaut, model):
    faces = detectors[model].detect(astronaut)
    assert len(faces) == 1
    face = faces[0]
    assert isinstance(face, Face) and face.face_id == -1
    assert 0.8 < face.score <= 1.0
    _check_astronaut_face(face)


@pytest.mark.parametrize("model", MODELS)
def test_non_square_frame_pixel_coordinates(detectors, astronaut, model):
    # Keypoints come normalised from MediaPipe; on a non-square frame, scaling x by the height (or the
    # other way round) would move them by tens of pixels.
    frame = np.zeros((560, 640, 3), np.uint8)
    frame[20:532, 100:612] = astronaut
    (face,) = detectors[model].detect(frame)
    _check_astronaut_face(face, dx=100, dy=20)
    (ref,) = detectors[model].detect(astronaut)
    assert np.abs(face.keypoints - (100, 20) - ref.keypoints).max() < 0.2 * ref.box[2]


@pytest.mark.parametrize("model", MODELS)
def test_other_layouts_and_grey(detectors, astronaut, model):
    det = detectors[model]
    grey = cv2.cvtColor(astronaut, cv2.COLOR_BGR2GRAY)
    padded = np.zeros((600, 600, 3), np.uint8)
    padded[40:552, 50:562] = astronaut
    view = padded[40:552, 50:562]  # strided view into a bigger array
    assert not view.flags.c_contiguous
    for frame in (grey, grey[:, :, None], cv2.cvtColor(astronaut, cv2.COLOR_BGR2BGRA), view, np.asfortranarray(astronaut)):
        faces = det.detect(frame)
        assert len(faces) == 1, frame.shape
        _check_astronaut_face(faces[0])


@pytest.mark.parametrize("model", MODELS)
def test_mirrored_frame(detectors, astronaut, model):
    mirrored = astronaut[:, ::-1]  # negative stride, as from a selfie-view flip
    (face,) = detectors[model].detect(mirrored)
    x, y, w, h = face.box
    _check_astronaut_face(Face(box=(512 - x - w, y, w, h), keypoints=(face.keypoints[[1, 0, 2, 3, 5, 4]] * (-1, 1) + (512, 0)).astype(np.float32), score=face.score))
    # The model labels by image position: keypoint 0 ("right eye") is still the image-left eye.
    assert face.keypoints[0, 0] < face.keypoints[1, 0]


@pytest.mark.parametrize("model", MODELS)
def test_blank_and_noise_frames(detectors, model):
    rng = np.random.default_rng(0)
    frames = [
        np.zeros((480, 640, 3), np.uint8),
        np.full((480, 640, 3), 255, np.uint8),
        np.full((480, 640, 3), 128, np.uint8),
        np.full((480, 640), 128, np.uint8),
        np.zeros((1, 1, 3), np.uint8),
        np.zeros((0, 0, 3), np.uint8),
    ]
    frames += [np.clip(rng.normal(128, 40, (480, 640, 3)), 0, 255).astype(np.uint8) for _ in range(3)]
    for frame in frames:
        assert detectors[model].detect(frame) == [], frame.shape


def test_bad_frames(detectors, astronaut):
    det = detectors["short"]
    with pytest.raises(TypeError, match="uint8"):
        det.detect(astronaut.astype(np.float32))
    with pytest.raises(ValueError, match="image"):
        det.detect(astronaut[:, :, :2])
    with pytest.raises(ValueError):
        det.detect(np.zeros((2, 3, 4, 3), np.uint8))


# -- several faces --------------------------------------------------------------------------------------
def _assert_largest_first_disjoint(faces):
    areas = [f.box[2] * f.box[3] for f in faces]
    assert areas == sorted(areas, reverse=True)
    for i, a in enumerate(faces):
        for b in faces[i + 1 :]:
            assert iou(a.box, b.box) < 0.1


def test_tiled_faces_short(detectors, face_crop):
    det = detectors["short"]
    two = np.hstack([face_crop, face_crop])
    faces = det.detect(two)
    assert len(faces) == 2
    assert sorted(f.box[0] + f.box[2] / 2 < 300 for f in faces) == [False, True]  # one per tile
    three = np.vstack([two, np.hstack([face_crop, np.zeros_like(face_crop)])])
    faces = det.detect(three)
    assert len(faces) == 3
    _assert_largest_first_disjoint(faces)


def test_tiled_faces_full(detectors, face_crop):
    det = detectors["full"]
    row = np.hstack([face_crop, face_crop, face_crop])  # 900x300: faces too small for "short"
    faces = det.detect(row)
    assert len(faces) == 3
    assert sorted(int((f.box[0] + f.box[2] / 2) // 300) for f in faces) == [0, 1, 2]
    _assert_largest_first_disjoint(faces)


def test_small_face_single_detection(detectors, face_crop):
    # ~26 px face in a 640x480 frame: the full-range model gives two overlapping boxes for it (0.69 and
    # 0.53 with MediaPipe 1.2.3); detect() keeps one.
    frame = np.full((480, 640, 3), 128, np.uint8)
    frame[200:280, 300:380] = cv2.resize(face_crop, (80, 80), interpolation=cv2.INTER_AREA)
    faces = detectors["full"].detect(frame)
    assert len(faces) == 1
    x, y, w, h = faces[0].box
    assert 300 <= x + w / 2 <= 380 and 200 <= y + h / 2 <= 280


# -- real photos ----------------------------------------------------------------------------------------
def _portraits() -> list:
    if not PHOTOS.is_dir():
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"test photos not found at {PHOTOS}"))]
    return sorted(p.name for p in PHOTOS.iterdir() if p.suffix.lower() in (".jpg", ".jpeg") and p != GROUP_PHOTO)


@pytest.mark.parametrize("name", _portraits())
def test_portrait_photos(detectors, name):
    img = _photo(name)
    for model, det in detectors.items():
        faces = det.detect(img)
        assert len(faces) == 1, (model, [(round(f.score, 2), f.box) for f in faces])
        (face,) = faces
        assert face.score > 0.6, model
        x, y, w, h = face.box
        assert w > 0.05 * max(img.shape[:2]), model
        assert all(x <= px <= x + w and y <= py <= y + h for px, py in face.keypoints[:4]), model


def test_group_photo_full(detectors):
    img = _photo(GROUP_PHOTO.name)
    faces = detectors["full"].detect(img)
    assert len(faces) == 5
    assert min(f.score for f in faces) > 0.7
    _assert_largest_first_disjoint(faces)


def test_group_photo_short_needs_lower_threshold():
    img = _photo(GROUP_PHOTO.name)
    with FaceDetector("short") as det:
        n_default = len(det.detect(img))
        det.min_confidence = 0.3
        faces = det.detect(img)
    assert n_default < 5  # the short-range model scores these ~100 px faces 0.33-0.58
    assert len(faces) == 5


# -- live settings ----------------------------------------------------------------------------------------
def test_min_confidence_and_max_faces_live():
    img = _photo(GROUP_PHOTO.name)
    with FaceDetector("full") as det:
        all_faces = det.detect(img)
        assert len(all_faces) == 5
        scores = sorted(f.score for f in all_faces)
        cut = (scores[2] + scores[3]) / 2  # keeps exactly the two best
        det.min_confidence = cut
        high = det.detect(img)
        assert len(high) == 2 and all(f.score >= cut for f in high)
        det.min_confidence = 0.5
        assert len(det.detect(img)) == 5
        det.max_faces = 2
        two = det.detect(img)
        assert [f.box for f in two] == [f.box for f in all_faces[:2]]  # the two largest
        det.max_faces = 0
        assert len(det.detect(img)) == 5
        with pytest.raises(ValueError):
            det.max_faces = -1
        with pytest.raises(ValueError):
            det.min_confidence = 1.5
        assert det.max_faces == 0 and det.min_confidence == 0.5


def test_min_confidence_below_internal_threshold_rebuilds(astronaut):
    # The MediaPipe task is created with threshold 0.3; asking for less must rebuild it, otherwise
    # detections scoring under 0.3 could never come back.
    with FaceDetector("short") as det:
        assert len(det.detect(astronaut)) == 1
        det.min_confidence = 0.15
        faces = det.detect(astronaut)
    assert len(faces) > 1
    assert all(f.score >= 0.15 for f in faces)
    assert any(f.score < 0.3 for f in faces)


def test_max_faces_in_constructor(face_crop):
    with FaceDetector("short", max_faces=1) as det:
        assert len(det.detect(np.hstack([face_crop, face_crop]))) == 1


# -- errors and lifetime ------------------------------------------------------------------------------------
def test_missing_model_path(tmp_path):
    missing = tmp_path / "nope" / "face.tflite"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        FaceDetector(model_path=missing)


def test_corrupt_model_file(tmp_path):
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(b"not a tflite model" * 10)
    with pytest.raises(ValueError, match=str(bad)):
        FaceDetector(model_path=bad)


def test_unknown_model_name():
    with pytest.raises(ValueError, match="short"):
        FaceDetector("medium")


def test_close_twice_and_context_manager(astronaut):
    det = FaceDetector("short")
    assert not det.closed
    det.close()
    det.close()
    assert det.closed
    with pytest.raises(RuntimeError, match="closed"):
        det.detect(astronaut)
    with FaceDetector("full") as det2:
        assert len(det2.detect(astronaut)) == 1
    assert det2.closed
    det2.close()


# -- IoUTracker -------------------------------------------------------------------------------------------
def _face(x, y, w=100.0, h=100.0) -> Face:
    return Face(box=(float(x), float(y), float(w), float(h)), keypoints=np.zeros((6, 2), np.float32), score=0.9)


def test_iou():
    assert iou((0, 0, 10, 10), (0, 0, 10, 10)) == pytest.approx(1.0)
    assert iou((0, 0, 10, 10), (5, 0, 10, 10)) == pytest.approx(50 / 150)
    assert iou((0, 0, 10, 10), (10, 0, 10, 10)) == 0.0
    assert iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0


def test_tracker_ids_stable_and_new():
    tr = IoUTracker()
    faces = [_face(0, 0), _face(300, 0)]
    assert tr.update(faces) is faces
    assert [f.face_id for f in faces] == [1, 2]
    for step in range(1, 10):  # both drift; the list order flips every frame
        moved = [_face(300 + 4 * step, 2 * step), _face(5 * step, step)]
        if step % 2:
            moved.reverse()
        tr.update(moved)
        ids = {round(f.box[0] // 200): f.face_id for f in moved}
        assert ids == {0: 1, 1: 2}
    newcomer = _face(600, 300)
    frame = [_face(45, 9), newcomer, _face(336, 18)]
    tr.update(frame)
    assert [f.face_id for f in frame] == [1, 3, 2]
    assert tr.update([]) == []


@pytest.mark.parametrize("order", ["f1_first", "f2_first"])
def test_tracker_greedy_highest_iou_first(order):
    tr = IoUTracker(iou_threshold=0.3)
    a, b = _face(0, 0), _face(50, 0)
    tr.update([a, b])
    # f1 overlaps B best (0.67), but f2 overlaps B even more (0.96) and A only by 0.35: global greedy gives
    # B to f2 and A to f1. Matching face by face in list order would give B to f1 (f1 first), or A to f2
    # (taking the first overlap above the threshold, f2 first).
    f1, f2 = _face(30, 0), _face(48, 0)
    tr.update([f1, f2] if order == "f1_first" else [f2, f1])
    assert (f1.face_id, f2.face_id) == (a.face_id, b.face_id)


def test_tracker_gap_and_expiry():
    tr = IoUTracker(max_missed=3)
    (f,) = tr.update([_face(10, 10)])
    first = f.face_id
    for _ in range(3):
        tr.update([])
    (f,) = tr.update([_face(14, 12)])
    assert f.face_id == first  # survived a 3-frame gap
    for _ in range(4):
        tr.update([])
    (f,) = tr.update([_face(14, 12)])
    assert f.face_id != first and f.face_id > first  # expired after 4 missed frames, fresh id


def test_tracker_threshold_and_reset():
    tr = IoUTracker(iou_threshold=0.5)
    (f,) = tr.update([_face(0, 0)])
    (g,) = tr.update([_face(40, 0)])  # IoU 0.43 < 0.5: a different face
    assert g.face_id != f.face_id
    tr.reset()
    assert tr.track_ids == []
    (h,) = tr.update([_face(40, 0)])
    assert h.face_id not in (f.face_id, g.face_id)  # ids are never reused
    with pytest.raises(ValueError):
        IoUTracker(iou_threshold=0)
    with pytest.raises(ValueError):
        IoUTracker(max_missed=-1)


def test_tracker_with_detector(detectors, astronaut):
    tr = IoUTracker()
    ids = []
    for dx in range(0, 40, 8):  # the astronaut slides right
        frame = np.zeros((512, 600, 3), np.uint8)
        frame[:, dx : dx + 512] = astronaut
        faces = tr.update(detectors["short"].detect(frame))
        assert len(faces) == 1
        ids.append(faces[0].face_id)
    assert ids == [1] * 5


@pytest.mark.parametrize("model", MODELS)
def test_matches_raw_mediapipe_on_rgb(detectors, astronaut, model):
    # detect() must hand MediaPipe the frame as RGB: compare with the Tasks API called directly, with the
    # same internal score threshold (it changes boxes by a pixel or so: low-score candidates take part in
    # MediaPipe's box blending).
    import mediapipe as mp
    from mediapipe.tasks.python import BaseOptions, vision

    from ferengine import faces as faces_module

    options = vision.FaceDetectorOptions(
        base_options=BaseOptions(model_asset_path=str(detectors[model].model_path)),
        running_mode=vision.RunningMode.IMAGE,
        min_detection_confidence=faces_module._INTERNAL_THRESHOLD,
    )
    rgb = np.ascontiguousarray(astronaut[:, :, ::-1])
    with vision.FaceDetector.create_from_options(options) as raw:
        (det,) = raw.detect(mp.Image(image_format=mp.ImageFormat.SRGB, data=rgb)).detections
    (face,) = detectors[model].detect(astronaut)
    bb = det.bounding_box
    assert face.box == (bb.origin_x, bb.origin_y, bb.width, bb.height)
    assert face.score == pytest.approx(det.categories[0].score, abs=1e-6)
    expected = np.array([(k.x * 512, k.y * 512) for k in det.keypoints], np.float32)
    np.testing.assert_allclose(face.keypoints, expected, atol=1e-3)


# ------------------------------------------------------------------------------------ no MediaPipe


@pytest.fixture
def no_mediapipe(monkeypatch):
    """Makes ``import mediapipe`` fail, as on a machine where it is not installed."""
    import sys

    for name in [m for m in sys.modules if m == "mediapipe" or m.startswith("mediapipe.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "mediapipe", None)


def test_missing_mediapipe_is_a_clear_error(no_mediapipe):
    from ferengine.faces import DetectorUnavailable

    with pytest.raises(DetectorUnavailable, match=r"pip install 'mediapipe>=1\.2'"):
        FaceDetector()


def test_fer_predict_without_mediapipe_is_one_line(no_mediapipe, fastcnn_checkpoint, tmp_path, capsys):
    from ferengine.cli import main

    img = tmp_path / "face.png"
    cv2.imwrite(str(img), np.full((64, 64, 3), 128, np.uint8))
    assert main(["predict", str(img), "--checkpoint", str(fastcnn_checkpoint)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fer: error: MediaPipe is not installed"), err


def test_bench_without_mediapipe_times_the_backends(no_mediapipe, fastcnn_checkpoint, synthetic_video):
    from ferengine.bench import format_table, run

    rows = run(synthetic_video, str(fastcnn_checkpoint), 2, ["torch"])
    by_stage = {(r["stage"], r["metric"]): r for r in rows}
    assert by_stage[("detector short", "-")]["value"] is None
    assert "MediaPipe is not installed" in by_stage[("detector short", "-")]["note"]
    assert by_stage[("detector full", "-")]["note"] == "as above"
    assert by_stage[("pipeline", "-")]["value"] is None
    assert by_stage[("backend torch (cpu)", "ms/face batch 1")]["value"] > 0
    assert by_stage[("backend torch (cpu)", "faces/s batch 16")]["value"] > 0
    assert "n/a" in format_table(rows)
