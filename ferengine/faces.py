"""Face detection (MediaPipe Tasks BlazeFace) and a small IoU tracker that keeps face ids across frames.

``FaceDetector(model="short").detect(frame_bgr)`` returns :class:`Face` objects (pixel box, 6 pixel
keypoints, score), largest first. ``IoUTracker.update(faces)`` gives each face a ``face_id`` that stays
the same while the face keeps overlapping its previous box.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from .assets import asset_path
from .errors import DetectorUnavailable
from .validate import check_max_faces, check_min_confidence

__all__ = ["DETECTOR_MODELS", "KEYPOINT_NAMES", "DetectorUnavailable", "Face", "FaceDetector", "IoUTracker", "iou",
           "MAX_ROLL_DEG", "TILTED_MIN_SCORE", "eye_line_roll", "plausible_face"]

DETECTOR_MODELS = {
    "short": "face_detection_short_range.tflite",
    "full": "face_detection_full_range_sparse.tflite",
}

# MediaPipe's keypoint order. "Right"/"left" are the subject's: in an unmirrored photo of a person facing
# the camera the right eye (index 0) is on the image's left (smaller x).
KEYPOINT_NAMES = ("right_eye", "left_eye", "nose_tip", "mouth_center", "right_ear_tragion", "left_ear_tragion")

# Keypoint geometry: a detection whose eye line is tilted more than MAX_ROLL_DEG from the horizontal must score at
# least TILTED_MIN_SCORE to count as a face (see FaceDetector, "False positives"). Measured with the short-range
# model on the offline test media (shared/data/media, every frame of the 5 videos, the 43 photos as they are and
# rotated by +-30 and +-45 degrees):
# - real faces in natural frames: scores 0.848-0.987 (pyfeat_WolfgangLanger, 472 frames), 0.952-0.970
#   (pyfeat_single_face), 0.857-0.99 in the single portraits, 0.33-0.58 for the ~100 px faces of the group photo;
#   eye-line roll at most 25.7 degrees over 733 detections >= 0.5;
# - false positives: the title lettering of pyfeat_no_face.mp4 (and the same cartoon in the two .mov files) at
#   0.51-0.615 with the default threshold 0.5 - every one with its eye line tilted 50.5-117 degrees -, and photo
#   clutter (a suit, hair, a blurred background) at 0.30-0.42;
# - real faces rotated by 45 degrees: roll up to 61 degrees but scores >= 0.65 (172 of the 173 detections >= 0.5
#   are kept by this rule).
# With the rule, none of the 10 false positives >= 0.5 is kept and all 733 natural detections >= 0.5 are.
MAX_ROLL_DEG = 45.0
TILTED_MIN_SCORE = 0.75

# The MediaPipe detector is created with at most this score threshold; ``min_confidence`` is applied on top
# in Python, so raising it (or lowering it down to here) takes effect without rebuilding the detector.
_INTERNAL_THRESHOLD = 0.3


@dataclass
class Face:
    """One detected face.

    ``box`` is ``(x, y, w, h)`` in frame pixels; it may reach past the frame edge for a face that is partly
    out of view (it is not clipped, so its centre and size stay right). ``keypoints`` is float32 ``(6, 2)``
    ``(x, y)`` pixels in :data:`KEYPOINT_NAMES` order. ``face_id`` is -1 until an :class:`IoUTracker` sets it.
    """

    box: tuple[float, float, float, float]
    keypoints: np.ndarray
    score: float
    face_id: int = -1

    @property
    def area(self) -> float:
        return self.box[2] * self.box[3]


def _close_task(holder: list) -> None:
    """Close the MediaPipe task held in ``holder[0]`` (idempotent). Module-level so that the
    ``weakref.finalize`` hook does not keep the FaceDetector alive."""
    task = holder[0] if holder else None
    if task is not None:
        holder[0] = None
        with _quiet_native_logs():
            task.close()


class FaceDetector:
    """BlazeFace face detector through the MediaPipe Tasks API (CPU, running mode IMAGE).

    ``model`` picks a shipped model: ``"short"`` (BlazeFace short range, 128x128 input) or ``"full"``
    (BlazeFace full range, sparse, 192x192 input); ``model_path`` overrides it with any BlazeFace
    ``.tflite`` that the Tasks FaceDetector accepts. ``min_confidence`` and ``max_faces`` (0 = no limit)
    can be changed at any time and apply to the next :meth:`detect`.

    Choosing a model (measured with MediaPipe 1.2.3 on 640x480 frames, 2 CPU cores, and on the project's
    test photos; scores are MediaPipe's):

    - ``"short"`` (the default) is meant for faces near the camera: a webcam user, a portrait. About
      1.0 ms per 640x480 frame. It is reliable for faces wider than about 1/8 of the frame's longer side
      (>= ~80 px at 640x480: scores 0.7-0.95); below that it degrades fast: ~65 px scores ~0.4, under
      ~40 px nothing is found. Its boxes on such small faces are ~1.3-1.6x too large and off-centre. In
      the 1000x667 group photo (five ~100 px faces) it finds all five but scores them 0.33-0.58, so only
      three pass the default 0.5. It also scores saturated RGB uniform noise up to ~0.67 (3 of 10 random
      frames above 0.5); natural blank/dark/grey frames and Gaussian noise give nothing.
    - ``"full"`` (BlazeFace full range, *sparse* weights) loads and runs fine in the Tasks API (TFLite logs
      "Sparsity tensors may not yet be fully supported" warnings while loading; harmless). About 2.5 ms
      per 640x480 frame. It finds faces down to ~25-35 px in a 640x480 frame and all five faces of the
      group photo (0.78-0.93) with tight boxes; on large close faces its scores are a bit lower than
      short's (0.7-0.98 vs 0.9-0.99) and its boxes slightly larger. On tiny faces it sometimes returns a
      second, shifted box for the same face; :meth:`detect` drops a face whose box centre lies inside
      the box of a higher-scoring face.

    False positives: the short model scores lettering and cartoon shapes up to 0.615 (the title of
    ``pyfeat_no_face.mp4``: 0.51-0.61), above the default 0.5, while the real faces of the test videos
    score 0.85-0.99. A threshold cannot separate them without losing the small faces of group photos
    (0.33-0.58), so ``check_geometry`` (default on) adds a keypoint check: a detection whose eye line
    is tilted more than :data:`MAX_ROLL_DEG` (45 degrees) must score :data:`TILTED_MIN_SCORE` (0.75).
    Natural faces never came near that tilt (at most 26 degrees measured), every false positive above
    0.5 was beyond it (50-117 degrees), and faces in photos rotated by 45 degrees still score above
    0.65 (172 of 173 kept). The numbers are in the comment at :data:`MAX_ROLL_DEG`.

    Frames are BGR, BGRA or grey uint8 numpy arrays of any memory layout (views, mirrored, strided).
    ``detect`` may be called from several threads; the calls are serialised by a lock. Call :meth:`close`
    (or use ``with``) when done: MediaPipe's own finaliser fails noisily at interpreter exit (a detector
    left open is closed by an exit hook before that, but do not rely on it).
    """

    def __init__(
        self,
        model: str = "short",
        min_confidence: float = 0.5,
        max_faces: int = 0,
        model_path: str | Path | None = None,
        check_geometry: bool = True,
    ) -> None:
        if model_path is None:
            if model not in DETECTOR_MODELS:
                raise ValueError(f"unknown face detector model {model!r}; choose one of {sorted(DETECTOR_MODELS)}")
            model_path = asset_path("mediapipe", DETECTOR_MODELS[model])
            self.model = model
        else:
            self.model = "custom"
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise FileNotFoundError(f"face detector model not found: {self.model_path}")
        self._lock = threading.RLock()
        self._holder: list = [None]  # the live MediaPipe task; shared with the exit-time finaliser
        self._finalizer = weakref.finalize(self, _close_task, self._holder)
        self._closed = False
        self.check_geometry = bool(check_geometry)
        self._min_confidence = 0.5
        self._max_faces = 0
        self.min_confidence = min_confidence
        self.max_faces = max_faces
        self._task_threshold = min(_INTERNAL_THRESHOLD, self._min_confidence)
        self._holder[0] = self._create_task(self._task_threshold)

    # -- settings ------------------------------------------------------------------------------------
    @property
    def min_confidence(self) -> float:
        return self._min_confidence

    @min_confidence.setter
    def min_confidence(self, value: float) -> None:
        self._min_confidence = check_min_confidence(value)  # a rebuild, if needed, happens in the next detect()

    @property
    def max_faces(self) -> int:
        return self._max_faces

    @max_faces.setter
    def max_faces(self, value: int) -> None:
        self._max_faces = check_max_faces(value)

    @property
    def closed(self) -> bool:
        return self._closed

    # -- MediaPipe -----------------------------------------------------------------------------------
    def _create_task(self, threshold: float):
        try:
            from mediapipe.tasks.python import BaseOptions, vision
        except ImportError as exc:
            raise DetectorUnavailable(
                f"MediaPipe is not installed here ({exc}), so faces cannot be found: pip install 'mediapipe>=1.2' "
                "(fer-desktop's own dependencies include it). Face crops that are already cut out still work "
                "with fer eval and the trainers.") from exc

        options = vision.FaceDetectorOptions(
            base_options=BaseOptions(model_asset_path=str(self.model_path)),
            running_mode=vision.RunningMode.IMAGE,
            min_detection_confidence=float(threshold),
        )
        try:
            with _quiet_native_logs():  # MediaPipe/LiteRT print dozens of INFO/WARNING lines on load
                task = vision.FaceDetector.create_from_options(options)
                import mediapipe as mp  # the first inference logs too: run it here, on a blank frame

                task.detect(mp.Image(image_format=mp.ImageFormat.SRGB, data=np.zeros((64, 64, 3), np.uint8)))
            return task
        except FileNotFoundError as e:
            raise FileNotFoundError(f"face detector model not found: {self.model_path} ({e})") from e
        except (ValueError, RuntimeError) as e:
            raise ValueError(
                f"cannot load face detector model {self.model_path}: {e} "
                "(expected a MediaPipe BlazeFace .tflite; is the file complete?)"
            ) from e

    def _task(self):
        if self._closed:
            raise RuntimeError("FaceDetector is closed")
        if self._min_confidence < self._task_threshold:
            new = self._create_task(self._min_confidence)
            _close_task(self._holder)
            self._holder[0] = new
            self._task_threshold = self._min_confidence
        return self._holder[0]

    # -- detection -----------------------------------------------------------------------------------
    def detect(self, frame_bgr: np.ndarray) -> list[Face]:
        """Detect faces in a BGR (or grey, or BGRA) uint8 frame; returns them largest box first."""
        import mediapipe as mp

        frame = np.asarray(frame_bgr)
        if frame.dtype != np.uint8:
            raise TypeError(f"detect() expects a uint8 image, got dtype {frame.dtype}")
        if frame.ndim == 3 and frame.shape[2] == 1:
            frame = frame[:, :, 0]
        if frame.ndim == 2:
            code = cv2.COLOR_GRAY2RGB
        elif frame.ndim == 3 and frame.shape[2] == 3:
            code = cv2.COLOR_BGR2RGB
        elif frame.ndim == 3 and frame.shape[2] == 4:
            code = cv2.COLOR_BGRA2RGB
        else:
            raise ValueError(f"detect() expects an (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) image, got {frame.shape}")
        height, width = frame.shape[:2]
        if height == 0 or width == 0:
            return []
        # cvtColor accepts any strides and always returns a fresh C-contiguous array, which mp.Image needs
        # (it reads the raw buffer); this is the one copy of the frame we make.
        rgb = cv2.cvtColor(frame, code)
        image = mp.Image(image_format=mp.ImageFormat.SRGB, data=rgb)
        with self._lock:
            result = self._task().detect(image)

        threshold = self._min_confidence
        faces: list[Face] = []
        for det in result.detections:
            score = float(det.categories[0].score) if det.categories else 0.0
            if score < threshold:
                continue
            bb = det.bounding_box
            kps = det.keypoints or []
            kp = np.array([(k.x, k.y) for k in kps], dtype=np.float32).reshape(-1, 2)
            kp *= np.array((width, height), dtype=np.float32)
            if self.check_geometry and not plausible_face(kp, score):
                continue
            faces.append(
                Face(box=(float(bb.origin_x), float(bb.origin_y), float(bb.width), float(bb.height)), keypoints=kp, score=score)
            )
        if len(faces) > 1:
            faces = _drop_duplicates(faces)
        faces.sort(key=lambda f: f.area, reverse=True)
        if self._max_faces:
            del faces[self._max_faces :]
        return faces

    # -- lifetime ------------------------------------------------------------------------------------
    def close(self) -> None:
        """Release the MediaPipe detector. Safe to call more than once."""
        with self._lock:
            self._closed = True
            _close_task(self._holder)
            self._finalizer.detach()

    def __enter__(self) -> "FaceDetector":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return (
            f"FaceDetector(model={self.model!r}, path={str(self.model_path)!r}, "
            f"min_confidence={self._min_confidence}, max_faces={self._max_faces}, {state})"
        )


def eye_line_roll(keypoints: np.ndarray) -> float | None:
    """Degrees the line from the right eye (keypoint 0, on the image's left) to the left eye is turned from
    the horizontal, in (-180, 180]; None without eye keypoints."""
    if keypoints is None or len(keypoints) < 2:
        return None
    dx, dy = (float(v) for v in keypoints[1] - keypoints[0])
    return float(np.degrees(np.arctan2(dy, dx)))


def plausible_face(keypoints: np.ndarray, score: float) -> bool:
    """The keypoint check of :class:`FaceDetector` (see :data:`MAX_ROLL_DEG`): an eye line tilted more
    than 45 degrees needs a score of 0.75."""
    roll = eye_line_roll(keypoints)
    return roll is None or abs(roll) <= MAX_ROLL_DEG or score >= TILTED_MIN_SCORE


def _drop_duplicates(faces: list[Face]) -> list[Face]:
    """Drop a face whose box centre lies inside the box of a higher-scoring face.

    MediaPipe's non-maximum suppression (IoU 0.3) lets through a second, slightly shifted box on the same
    face now and then with the full-range model on small (~25-40 px) faces, sometimes both above 0.5.
    Two real faces cannot have one's centre inside the other's box unless one is almost hidden.
    """
    kept: list[Face] = []
    for f in sorted(faces, key=lambda f: f.score, reverse=True):
        cx, cy = f.box[0] + f.box[2] / 2, f.box[1] + f.box[3] / 2
        if not any(k.box[0] <= cx <= k.box[0] + k.box[2] and k.box[1] <= cy <= k.box[1] + k.box[3] for k in kept):
            kept.append(f)
    return kept


def iou(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    """Intersection over union of two ``(x, y, w, h)`` boxes (0 when either is empty)."""
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    iw = min(ax + aw, bx + bw) - max(ax, bx)
    ih = min(ay + ah, by + bh) - max(ay, by)
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    union = aw * ah + bw * bh - inter
    return float(inter / union) if union > 0 else 0.0


class IoUTracker:
    """Keeps a face id across frames by box overlap.

    Each :meth:`update` matches the new faces to the live tracks greedily, highest IoU first, among pairs
    with IoU >= ``iou_threshold``. A matched face takes its track's id and the track takes the face's box;
    an unmatched face starts a new track with the next id (1, 2, 3, ...; never reused, also not after
    :meth:`reset`). A track that finds no face survives ``max_missed`` consecutive frames and is dropped
    on the next miss, so a face that disappears for up to ``max_missed`` frames and comes back near its
    last box keeps its id.
    """

    def __init__(self, iou_threshold: float = 0.3, max_missed: int = 15) -> None:
        if not 0.0 < iou_threshold <= 1.0:
            raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
        if max_missed < 0:
            raise ValueError(f"max_missed must be >= 0, got {max_missed}")
        self.iou_threshold = float(iou_threshold)
        self.max_missed = int(max_missed)
        self._next_id = 1
        # face_id -> [box, frames missed in a row]
        self._tracks: dict[int, list] = {}

    @property
    def track_ids(self) -> list[int]:
        """Ids of the live tracks (including those currently missing)."""
        return list(self._tracks)

    def update(self, faces: list[Face]) -> list[Face]:
        """Set ``face_id`` on every face in ``faces`` (in place) and return the same list."""
        pairs = []
        for fi, face in enumerate(faces):
            for tid, (box, _) in self._tracks.items():
                v = iou(face.box, box)
                if v >= self.iou_threshold:
                    pairs.append((v, fi, tid))
        pairs.sort(key=lambda p: (-p[0], p[1], p[2]))
        face_done: set[int] = set()
        matched: set[int] = set()
        for _, fi, tid in pairs:
            if fi in face_done or tid in matched:
                continue
            face_done.add(fi)
            matched.add(tid)
            faces[fi].face_id = tid
            self._tracks[tid] = [faces[fi].box, 0]
        for tid in [t for t in self._tracks if t not in matched]:
            self._tracks[tid][1] += 1
            if self._tracks[tid][1] > self.max_missed:
                del self._tracks[tid]
        for fi, face in enumerate(faces):
            if fi not in face_done:
                face.face_id = self._next_id
                self._tracks[self._next_id] = [face.box, 0]
                self._next_id += 1
        return faces

    def reset(self) -> None:
        """Forget all tracks (ids keep increasing, so old ids are never handed out again)."""
        self._tracks.clear()


@contextlib.contextmanager
def _quiet_native_logs():
    """Silence C++ log lines written straight to file descriptor 2 (set FER_DEBUG=1 to see them)."""
    if os.environ.get("FER_DEBUG"):
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real stderr (e.g. a GUI launched without a console)
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
