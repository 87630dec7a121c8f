"""Frame -> faces -> one batched inference -> per-face results (probabilities, label, valence/arousal).

    with Pipeline("model.safetensors") as pipe:       # or a LoadedModel, or None for the default model
        fr = pipe.process(frame_bgr, index, time_s)   # FrameResult: faces, timings
        for face in fr.faces:
            face.face_id, face.box, face.label, face.probs, face.valence, face.arousal, face.av_source

Per frame: ``detector.detect`` -> ``tracker.update`` (stable ``face_id``) -> ``preprocess.crop_faces``
(eye-line alignment from the keypoints) -> ``to_model_input`` -> ONE ``backend.run`` for all faces ->
per-face exponential smoothing keyed by ``face_id``. Valence/arousal come from the model's AV head
(``av_source="head"``) or, for categorical-only models, are estimated from the (smoothed) class
probabilities with :func:`ferengine.labels.estimate_va` (``av_source="estimated"``).

Thread-safety: :meth:`Pipeline.process` is meant to run on one worker thread; :meth:`set_backend`,
:attr:`smoothing`, :attr:`min_confidence`, :attr:`max_faces` and :meth:`reset` may be called from another
thread (the GUI) at any time and apply from the next frame.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .checkpoint import CheckpointError, LoadedModel, default_checkpoint_path, load
from .labels import anchor_matrix
from .preprocess import crop_faces, to_model_input

if TYPE_CHECKING:  # pragma: no cover
    from .faces import FaceDetector

AV_HEAD = "head"
AV_ESTIMATED = "estimated"


@dataclass
class FaceResult:
    face_id: int
    box: tuple[float, float, float, float]  # x, y, w, h in frame pixels
    score: float  # detector confidence
    keypoints: np.ndarray  # (6, 2) float32 pixels (MediaPipe order)
    probs: np.ndarray | None  # (K,) float32, smoothed; None for a model without an expression head
    label: str | None  # argmax of probs
    confidence: float | None  # probs[argmax]
    valence: float  # [-1, 1], smoothed
    arousal: float  # [-1, 1], smoothed
    av_source: str  # "head" | "estimated"


@dataclass
class FrameResult:
    index: int
    time_s: float
    faces: list[FaceResult]
    timings: dict[str, float]  # detect_ms, preprocess_ms, infer_ms, post_ms, total_ms
    labels: tuple[str, ...] = field(default=())  # the class names of FaceResult.probs


class Pipeline:
    """Face detection + tracking + batched expression inference + smoothing (see the module docstring).

    ``loaded``: a :class:`LoadedModel`, a checkpoint path, or ``None`` for
    :func:`ferengine.checkpoint.default_checkpoint_path` (raises :class:`CheckpointError` when no default
    model is shipped). ``backend``/``device``: see :func:`ferengine.backends.create_backend`; an object with
    ``run(batch) -> dict`` and ``close()`` is used as is. ``detector``: a :class:`FaceDetector` owned by the
    caller (not closed here); otherwise one is created from ``detector_model``, ``min_confidence`` and
    ``max_faces`` and closed by :meth:`close`. ``smoothing`` in [0, 1): per face,
    ``new = smoothing * old + (1 - smoothing) * current`` (0 = off).
    """

    def __init__(
        self,
        loaded: LoadedModel | str | os.PathLike | None = None,
        backend: Any = "auto",
        device: str = "auto",
        detector: "FaceDetector | None" = None,
        detector_model: str = "short",
        smoothing: float = 0.5,
        min_confidence: float = 0.5,
        max_faces: int = 0,
        tracker: Any = None,
    ):
        from .faces import FaceDetector, IoUTracker

        if loaded is None:
            loaded = default_checkpoint_path()
        if not isinstance(loaded, LoadedModel):
            loaded = load(loaded, device="cpu")
        self.loaded = loaded
        info = loaded.info
        self.spec = loaded.spec
        self.labels: tuple[str, ...] = tuple(info.labels) if "expression" in info.heads else ()
        self.has_av_head: bool = info.has_av_head
        self._anchors, self._anchor_mask = anchor_matrix(self.labels)
        self._anchors32 = self._anchors.astype(np.float32)
        self._mask32 = self._anchor_mask.astype(np.float32)

        self._lock = threading.RLock()  # guards the backend and the smoothing state
        self._backend = None
        self._closed = False
        self._smoothing = 0.0
        self.smoothing = smoothing
        # face_id -> [probs (K,) float32 | None, va (2,) float32]
        self._state: dict[int, list] = {}

        self._owns_detector = detector is None
        self._detector = detector
        try:
            self._backend = self._make_backend(backend, device)
            if detector is None:
                self._detector = FaceDetector(detector_model, min_confidence=min_confidence, max_faces=max_faces)
        except BaseException:
            self.close()
            raise
        self._tracker = tracker if tracker is not None else IoUTracker()

    # -- settings -------------------------------------------------------------------------------------
    @property
    def smoothing(self) -> float:
        return self._smoothing

    @smoothing.setter
    def smoothing(self, value: float) -> None:
        from .validate import check_smoothing

        self._smoothing = check_smoothing(value)

    @property
    def min_confidence(self) -> float:
        return self._detector.min_confidence

    @min_confidence.setter
    def min_confidence(self, value: float) -> None:
        self._detector.min_confidence = value

    @property
    def max_faces(self) -> int:
        return self._detector.max_faces

    @max_faces.setter
    def max_faces(self, value: int) -> None:
        self._detector.max_faces = value

    @property
    def backend(self):
        """The current backend (``.name``, ``.device``)."""
        return self._backend

    @property
    def detector(self) -> "FaceDetector":
        return self._detector

    @property
    def tracker(self):
        return self._tracker

    def _make_backend(self, backend: Any, device: str):
        if not isinstance(backend, str):
            return backend  # a ready Backend (or a test double)
        from .backends import create_backend

        return create_backend(backend, self.loaded, device)

    def set_backend(self, name: Any, device: str = "auto") -> None:
        """Switch the inference backend; the old one is closed only once the new one is ready, so a
        backend that cannot be created (:class:`BackendUnavailable`) leaves the current one in use."""
        new = self._make_backend(name, device)
        with self._lock:
            old, self._backend = self._backend, new
        if old is not None and old is not new:
            old.close()

    def reset(self) -> None:
        """Forget tracks and smoothing state (call when the source changes or between unrelated images)."""
        with self._lock:
            self._tracker.reset()
            self._state.clear()

    # -- the hot path ---------------------------------------------------------------------------------
    def process(self, frame_bgr: np.ndarray, index: int = 0, time_s: float = 0.0) -> FrameResult:
        """Run one frame (BGR uint8) through the pipeline."""
        if self._closed:
            raise RuntimeError("Pipeline is closed")
        clock = time.perf_counter
        t0 = clock()
        faces = self._detector.detect(frame_bgr)
        t1 = clock()
        with self._lock:
            self._tracker.update(faces)
            n = len(faces)
            if n:
                crops = crop_faces(frame_bgr, [f.box for f in faces], [f.keypoints for f in faces], self.spec)
                batch = to_model_input(crops, self.spec)
                t2 = clock()
                out = self._backend.run(batch)
                t3 = clock()
                results = self._post(faces, out)
            else:
                t2 = t3 = t1
                results = []
            self._forget_lost_tracks()
        t4 = clock()
        timings = {
            "detect_ms": (t1 - t0) * 1e3,
            "preprocess_ms": (t2 - t1) * 1e3,
            "infer_ms": (t3 - t2) * 1e3,
            "post_ms": (t4 - t3) * 1e3,
            "total_ms": (t4 - t0) * 1e3,
        }
        return FrameResult(int(index), float(time_s), results, timings, self.labels)

    def _post(self, faces: list, out: dict[str, np.ndarray]) -> list[FaceResult]:
        n = len(faces)
        # Backend.run hands out fresh arrays owned by the caller: smoothed in place, kept in the results
        probs = out.get("probs") if self.labels else None
        if probs is not None:
            probs = np.asarray(probs, dtype=np.float32).reshape(n, -1)
        va = out.get("va")
        if va is not None:
            va = np.asarray(va, dtype=np.float32).reshape(n, 2)
            source = AV_HEAD
        elif probs is None:
            raise RuntimeError("the backend returned neither 'probs' nor 'va'")
        else:
            source = AV_ESTIMATED

        s = self._smoothing
        if s > 0.0:
            for i, face in enumerate(faces):
                prev = self._state.get(face.face_id)
                if prev is None:
                    continue
                if probs is not None and prev[0] is not None:
                    probs[i] *= 1.0 - s
                    probs[i] += s * prev[0]
                if va is not None:
                    va[i] *= 1.0 - s
                    va[i] += s * prev[1]
        if va is None:  # estimated from the smoothed probabilities (linear, so already smooth)
            w = probs * self._mask32
            total = w.sum(axis=1, keepdims=True)
            va = np.divide(w @ self._anchors32, total, out=np.zeros((n, 2), np.float32), where=total > 0)
        np.clip(va, -1.0, 1.0, out=va)

        labels = self.labels
        if probs is not None:
            top = probs.argmax(axis=1)
        results = []
        for i, face in enumerate(faces):
            p = probs[i] if probs is not None else None
            v = va[i]
            if s > 0.0:
                self._state[face.face_id] = [p, v]
            if p is not None:
                k = int(top[i])
                label, conf = labels[k], float(p[k])
            else:
                label = conf = None
            results.append(FaceResult(
                face.face_id, face.box, float(face.score), face.keypoints, p, label, conf,
                float(v[0]), float(v[1]), source,
            ))
        return results

    def _forget_lost_tracks(self) -> None:
        """Drop the smoothing state of faces whose track the tracker no longer holds."""
        if not self._state:
            return
        if self._smoothing == 0.0:
            self._state.clear()
            return
        live = getattr(self._tracker, "track_ids", None)
        if live is None:
            return
        live = set(live)
        for fid in [f for f in self._state if f not in live]:
            del self._state[fid]

    # -- lifetime -------------------------------------------------------------------------------------
    def close(self) -> None:
        """Close the backend and the detector this pipeline created (idempotent)."""
        self._closed = True
        with self._lock:
            backend, self._backend = self._backend, None
            self._state.clear()
        if backend is not None:
            backend.close()
        if self._owns_detector and self._detector is not None:
            self._detector.close()

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        b = self._backend
        return (f"Pipeline({self.loaded.info.name or self.loaded.info.arch!r}, backend="
                f"{getattr(b, 'name', b)!r}/{getattr(b, 'device', '?')!r}, smoothing={self._smoothing})")


__all__ = ["AV_ESTIMATED", "AV_HEAD", "CheckpointError", "FaceResult", "FrameResult", "Pipeline"]
