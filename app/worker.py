"""Capture + inference off the GUI thread.

:class:`CaptureWorker` is a QObject moved to its own QThread (napari's ``thread_worker`` shape: a loop that
yields results through signals and takes pause/resume/abort requests from the GUI). Its loop reads a frame,
paces it (video files play in real time unless "as fast as possible" is on), runs the
:class:`~ferengine.pipeline.Pipeline` (or the face detector alone while no model is loaded), writes the CSV
row when recording, and hands the GUI a :class:`FramePacket` through :attr:`CaptureWorker.frameReady`.

Back-pressure: at most one packet is in flight. The GUI calls :meth:`CaptureWorker.ack` once it has taken a
packet; until then newer frames are still processed (and recorded) but not sent, their results ride along
with the next packet that is (``FramePacket.results``), so the GUI's history misses nothing while the
display simply shows the newest frame. Nothing queues without bound.

Connect the worker's signals only to methods of QObjects living in the GUI thread (never to lambdas or
plain functions: those would run on the worker thread). Every public method except :meth:`run` is
called from the GUI thread: they only set flags or queue a
command that the loop applies between frames, so they never block.

:class:`ModelLoader` loads a checkpoint and builds its backend on a short-lived thread (loading a model and
exporting it for ONNX Runtime takes a moment, building a TensorRT engine minutes: its progress comes back
through :attr:`ModelLoader.progress`), then the window hands the result to the worker, which keeps running
the current backend until then.
"""
from __future__ import annotations

import logging
import math
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np
from PySide6.QtCore import QObject, Signal, Slot

from ferengine.pipeline import FaceResult, FrameResult, Pipeline
from ferengine.sources import EndOfStream, SourceError, open_source

from .state import RateMeter, fit_rect

log = logging.getLogger("app.worker")

FOLDER_INTERVAL_S = 0.5  # how long each image of a folder is shown in real-time mode
MAX_CARRIED_RESULTS = 512  # results of undisplayed frames carried to the GUI with the next packet
CAMERA_OPEN_TIMEOUT_S = 4.0
AV_NONE = "none"  # FaceResult.av_source in detection-only mode


# ------------------------------------------------------------------------------------------ data


@dataclass(frozen=True)
class SourceSpec:
    """What to open: ``kind`` is "camera" (``value`` an int), "video" or "folder" (``value`` a path)."""

    kind: str
    value: Any

    @property
    def label(self) -> str:
        if self.kind == "camera":
            return f"Camera {self.value}"
        return Path(str(self.value)).name or str(self.value)

    def to_setting(self) -> str:
        return f"{self.kind}:{self.value}"

    @classmethod
    def from_setting(cls, text: str | None) -> "SourceSpec | None":
        if not text or ":" not in text:
            return None
        kind, _, value = str(text).partition(":")
        if kind == "camera":
            try:
                return cls("camera", int(value))
            except ValueError:
                return None
        if kind in ("video", "folder") and value:
            return cls(kind, value)
        return None


@dataclass
class SourceInfo:
    spec: SourceSpec
    name: str
    fps: float | None
    frame_count: int | None
    request: int = 0  # the open_source request


@dataclass
class ModelBundle:
    """A loaded checkpoint and a ready backend for it (built by :class:`ModelLoader`)."""

    loaded: Any  # ferengine.checkpoint.LoadedModel
    backend: Any  # ferengine.backends.Backend
    path: Path
    load_s: float = 0.0
    note: str = ""  # e.g. why the requested backend was replaced

    @property
    def name(self) -> str:
        info = self.loaded.info
        return info.name or info.arch or self.path.stem


@dataclass
class FramePacket:
    """One processed frame for the GUI (the newest; ``results`` also holds the undisplayed ones)."""

    image: np.ndarray  # BGR uint8 (H, W, 3) as read from the source
    display: np.ndarray | None  # the image pre-scaled to ``display_size`` (BGR, C-contiguous), or None
    display_size: tuple[int, int]  # (w, h) the view asked for when this was scaled
    result: FrameResult  # this frame's result
    results: list[FrameResult]  # every result since the last packet, oldest first, ending with ``result``
    timeline: list[float]  # the timeline position (s) of each of ``results``
    source_serial: int  # changes whenever a new source is opened
    request: int  # the open_source request this frame's source answers
    source_name: str
    has_model: bool
    capture_fps: float
    processed: int  # frames processed from this source
    dropped: int  # frames processed but not sent to the GUI, since the source opened
    frame_count: int | None
    wall: float = field(default_factory=time.monotonic)


# ----------------------------------------------------------------------------------- detector


class DetectorProxy:
    """Stands in for the FaceDetector given to :class:`Pipeline`, so the worker can swap the detector
    (short/full range) without rebuilding the pipeline. Not owned by the pipeline (it never closes it)."""

    def __init__(self, detector):
        self.target = detector

    def detect(self, frame):
        return self.target.detect(frame)

    @property
    def min_confidence(self) -> float:
        return self.target.min_confidence

    @min_confidence.setter
    def min_confidence(self, value: float) -> None:
        self.target.min_confidence = value

    @property
    def max_faces(self) -> int:
        return self.target.max_faces

    @max_faces.setter
    def max_faces(self, value: int) -> None:
        self.target.max_faces = value

    @property
    def closed(self) -> bool:
        return getattr(self.target, "closed", False)

    def close(self) -> None:
        self.target.close()


# -------------------------------------------------------------------------------------- worker


class CaptureWorker(QObject):
    """The capture + inference loop (see the module docstring). Create it, ``moveToThread``, connect
    ``QThread.started`` to :meth:`run`; :meth:`stop` ends the loop, which closes everything it opened."""

    frameReady = Signal(object)  # FramePacket
    # the int in source signals (and FramePacket.request) is the id given to open_source: the GUI drops
    # what a source it has already replaced still had in flight
    sourceOpened = Signal(object)  # SourceInfo
    sourceFailed = Signal(object, str, int)  # SourceSpec | None, message, request
    endOfStream = Signal(str, int)  # message, request
    modelChanged = Signal(object)  # ModelBundle | None
    backendChanged = Signal(object)  # the Backend now in use
    recordingStarted = Signal(str)  # path
    recordingStopped = Signal(str, int, str)  # path, rows, reason ("" when asked)
    recordingFailed = Signal(str)
    detectorChanged = Signal(str)
    errorOccurred = Signal(str)
    finished = Signal()

    def __init__(
        self,
        detector_model: str = "short",
        smoothing: float = 0.5,
        min_confidence: float = 0.5,
        max_faces: int = 0,
        realtime: bool = True,
        loop: bool = False,
        detector_factory: Callable[..., Any] | None = None,
        source_factory: Callable[[Any], Any] | None = None,
    ):
        super().__init__()
        self._commands: "queue.Queue[tuple[str, tuple]]" = queue.Queue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._gui_busy = threading.Event()
        self._opts_lock = threading.Lock()
        self._opts = {"smoothing": float(smoothing), "min_confidence": float(min_confidence),
                      "max_faces": int(max_faces)}
        self._opts_dirty = True
        self.paused = False
        self.realtime = bool(realtime)
        self.loop = bool(loop)
        self._display_size = (0, 0)
        self._detector_model = detector_model
        self._detector_factory = detector_factory
        self._source_factory = source_factory or (lambda value: open_source(value, open_timeout=CAMERA_OPEN_TIMEOUT_S)
                                                  if isinstance(value, int) else open_source(value))
        # owned by the worker thread once run() starts
        self.detector: DetectorProxy | None = None
        self.tracker = None
        self.pipeline: Pipeline | None = None
        self.bundle: ModelBundle | None = None
        self.source = None
        self.source_spec: SourceSpec | None = None
        self._source_serial = 0
        self.request = 0
        self._ended = False
        self._writer = None
        self._carried: list[FrameResult] = []
        self._latest: tuple[np.ndarray, FrameResult] | None = None  # processed, not yet sent (GUI busy)
        self._end_message: str | None = None  # endOfStream to emit once the last frame has been sent
        self._carried_t: list[float] = []
        self._fps = RateMeter(1.0)
        self._processed = 0
        self._dropped = 0
        self._clock_base: float | None = None  # monotonic time of timeline position 0 (pacing)
        self._last_error_t = -1e9
        self.running = False

    # ============================================================ GUI-thread API (non-blocking)
    def _post(self, name: str, *args) -> None:
        self._commands.put((name, args))
        self._wake.set()

    def open_source(self, spec: SourceSpec, request: int = 0) -> None:
        """Close the current source and open ``spec``; ``request`` tags everything this source emits."""
        self._post("open", spec, int(request))

    def close_source(self) -> None:
        self._post("close_source")

    def restart(self) -> None:
        """Play the current source again from its start."""
        self._post("restart")

    def set_paused(self, paused: bool) -> None:
        self.paused = bool(paused)
        if not paused:
            self._clock_base = None  # resume the timeline from now, do not rush to catch up
        self._wake.set()

    def set_model(self, bundle: ModelBundle | None) -> None:
        self._post("model", bundle)

    def set_backend(self, backend) -> None:
        """Use a ready backend object (built for the current model) from the next frame."""
        self._post("backend", backend)

    def set_detector_model(self, name: str) -> None:
        self._post("detector", name)

    def set_options(self, **opts) -> None:
        """``smoothing``, ``min_confidence``, ``max_faces``; applied before the next frame."""
        with self._opts_lock:
            self._opts.update(opts)
            self._opts_dirty = True

    def options(self) -> dict:
        with self._opts_lock:
            return dict(self._opts)

    def set_display_size(self, w: int, h: int) -> None:
        self._display_size = (int(w), int(h))

    def start_recording(self, path: str | Path) -> None:
        self._post("record", str(path))

    def stop_recording(self) -> None:
        self._post("stop_record")

    def ack(self) -> None:
        """The GUI has taken the last packet; the next (or a held-back) frame may be sent."""
        self._gui_busy.clear()
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    @property
    def recording(self) -> bool:
        return self._writer is not None

    # ======================================================================= worker thread
    @Slot()
    def run(self) -> None:
        self.running = True
        try:
            self._setup()
            while not self._stop.is_set():
                self._drain()
                if self._stop.is_set():
                    break
                self._flush()
                if self._end_message is not None and self._latest is None:
                    message, self._end_message = self._end_message, None
                    self.endOfStream.emit(message, self.request)
                if self.source is None or self.paused or self._ended:
                    self._wake.wait(0.05)
                    self._wake.clear()
                    continue
                self._step()
        except Exception as exc:  # noqa: BLE001 - never die silently
            log.exception("worker loop failed")
            self.errorOccurred.emit(f"The capture thread stopped: {type(exc).__name__}: {exc}")
        finally:
            self._teardown()
            self.running = False
            self.finished.emit()

    def _setup(self) -> None:
        from ferengine.faces import IoUTracker

        self.tracker = IoUTracker()
        try:
            self.detector = DetectorProxy(self._make_detector(self._detector_model))
        except Exception as exc:  # noqa: BLE001 - missing assets: show frames without faces
            log.exception("face detector unavailable")
            self.detector = None
            self.errorOccurred.emit(f"Face detection is unavailable: {exc}")

    def _make_detector(self, name: str):
        opts = self.options()
        if self._detector_factory is not None:
            return self._detector_factory(name, opts["min_confidence"], opts["max_faces"])
        from ferengine.faces import FaceDetector

        return FaceDetector(name, min_confidence=opts["min_confidence"], max_faces=opts["max_faces"])

    def _teardown(self) -> None:
        self._finish_recording("the application closed")
        self._close_source()
        if self.pipeline is not None:
            try:
                self.pipeline.close()  # closes the backend; the detector is ours
            except Exception:  # noqa: BLE001
                log.exception("closing the pipeline")
            self.pipeline = None
        if self.detector is not None:
            try:
                self.detector.close()
            except Exception:  # noqa: BLE001
                log.exception("closing the face detector")
        # a model handed over but never used
        while True:
            try:
                name, args = self._commands.get_nowait()
            except queue.Empty:
                break
            if name == "model" and args[0] is not None:
                _close_quietly(args[0].backend)
            elif name == "backend":
                _close_quietly(args[0])

    # -------------------------------------------------------------- commands
    def _drain(self) -> None:
        if self._opts_dirty:
            self._apply_options()
        while True:
            try:
                name, args = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                getattr(self, f"_cmd_{name}")(*args)
            except Exception as exc:  # noqa: BLE001 - a failed command must not end the loop
                log.exception("worker command %s failed", name)
                self.errorOccurred.emit(f"{name}: {type(exc).__name__}: {exc}")

    def _apply_options(self) -> None:
        with self._opts_lock:
            opts = dict(self._opts)
            self._opts_dirty = False
        if self.detector is not None:
            self.detector.min_confidence = opts["min_confidence"]
            self.detector.max_faces = opts["max_faces"]
        if self.pipeline is not None:
            self.pipeline.smoothing = opts["smoothing"]

    def _cmd_open(self, spec: SourceSpec, request: int = 0) -> None:
        self._finish_recording("the source changed")
        self._close_source()
        self.source_spec = spec
        self.request = request
        try:
            src = self._source_factory(spec.value)
        except SourceError as exc:
            self.sourceFailed.emit(spec, str(exc), request)
            return
        except Exception as exc:  # noqa: BLE001 - e.g. permission errors
            self.sourceFailed.emit(spec, f"{spec.label}: {type(exc).__name__}: {exc}", request)
            return
        self._begin_source(src)
        self.sourceOpened.emit(SourceInfo(spec, src.name, src.fps, src.frame_count, request))

    def _begin_source(self, src) -> None:
        self.source = src
        self._source_serial += 1
        self._ended = False
        self._clock_base = None
        self._processed = 0
        self._dropped = 0
        self._carried.clear()
        self._carried_t.clear()
        self._latest = None
        self._end_message = None
        self._fps.reset()
        self._reset_tracks()

    def _reset_tracks(self) -> None:
        if self.pipeline is not None:
            self.pipeline.reset()
        elif self.tracker is not None:
            self.tracker.reset()

    def _cmd_close_source(self) -> None:
        self._finish_recording("the source was closed")
        self._close_source()
        self.source_spec = None

    def _cmd_restart(self) -> None:
        if self.source_spec is None:
            return
        if self.source is not None and self.source_spec.kind == "camera":
            self._ended = False
            return
        self._reopen()

    def _reopen(self) -> bool:
        spec = self.source_spec
        self._close_source()
        try:
            src = self._source_factory(spec.value)
        except Exception as exc:  # noqa: BLE001
            self.sourceFailed.emit(spec, str(exc), self.request)
            return False
        serial = self._source_serial
        self._begin_source(src)
        self._source_serial = serial  # same source, same timeline owner: the GUI sees the time go back
        return True

    def _close_source(self) -> None:
        if self.source is not None:
            try:
                self.source.close()
            except Exception:  # noqa: BLE001
                log.exception("closing the source")
            self.source = None

    def _cmd_model(self, bundle: ModelBundle | None) -> None:
        old = self.pipeline
        if bundle is None:
            self.pipeline = None
        else:
            opts = self.options()
            try:
                self.pipeline = Pipeline(bundle.loaded, backend=bundle.backend, detector=self.detector,
                                         tracker=self.tracker, smoothing=opts["smoothing"])
            except Exception as exc:  # noqa: BLE001
                _close_quietly(bundle.backend)
                self.errorOccurred.emit(f"Cannot use the model {bundle.path}: {exc}")
                return
        if self._writer is not None:
            self._finish_recording("the model changed (its classes may differ)")
        if old is not None:
            _close_quietly(old.backend)  # the pipeline does not own our detector
        self.bundle = bundle
        self._reset_tracks()
        self.modelChanged.emit(bundle)

    def _cmd_backend(self, backend) -> None:
        if self.pipeline is None:
            _close_quietly(backend)
            return
        self.pipeline.set_backend(backend)  # closes the old one
        self.backendChanged.emit(backend)

    def _cmd_detector(self, name: str) -> None:
        if self.detector is not None and getattr(self.detector.target, "model", None) == name:
            self.detectorChanged.emit(name)
            return
        try:
            new = self._make_detector(name)
        except Exception as exc:  # noqa: BLE001
            self.errorOccurred.emit(f"Cannot switch the face detector to {name!r}: {exc}")
            return
        if self.detector is None:
            self.detector = DetectorProxy(new)
        else:
            old, self.detector.target = self.detector.target, new
            _close_quietly(old)
        self._detector_model = name
        self._reset_tracks()
        self.detectorChanged.emit(name)

    def _cmd_record(self, path: str) -> None:
        from ferengine.results import ResultWriter

        self._finish_recording("a new recording started")
        if self.pipeline is None:
            self.recordingFailed.emit("Recording needs a model: open a checkpoint first (File > Open checkpoint…).")
            return
        try:
            self._writer = ResultWriter(path, self.pipeline.labels)
        except Exception as exc:  # noqa: BLE001
            self.recordingFailed.emit(f"Cannot write {path}: {exc}")
            return
        self.recordingStarted.emit(str(self._writer.path))

    def _cmd_stop_record(self) -> None:
        self._finish_recording("")

    def _finish_recording(self, reason: str, complete: bool = True) -> None:
        """End the recording. ``complete=False`` (the source failed under it): the rows so far are kept as
        ``NAME.partial.csv`` and the chosen file is left as it was (ferengine.fileio's output rule)."""
        writer, self._writer = self._writer, None
        if writer is None:
            return
        try:
            path = writer.close() if complete else writer.abort()
        except Exception as exc:  # noqa: BLE001
            self.recordingFailed.emit(f"Cannot finish {writer.path}: {exc}")
            return
        if not complete:
            reason = (f"{reason}; the rows so far are in {path}, {writer.path} is left as it was" if path
                      else f"{reason}; nothing was recorded")
        self.recordingStopped.emit(str(path or writer.path), int(writer.rows), reason)

    # -------------------------------------------------------------- one frame
    def _step(self) -> None:
        src = self.source
        try:
            frame = src.read()
        except EndOfStream as exc:
            if self.loop and self.source_spec is not None and self.source_spec.kind != "camera":
                if self._reopen():
                    return
            self._ended = True
            self._end_message = str(exc)  # emitted after the last frame has reached the GUI
            return
        except SourceError as exc:
            self._finish_recording("the source failed", complete=False)
            self._close_source()
            self.sourceFailed.emit(self.source_spec, str(exc), self.request)
            return
        except Exception as exc:  # noqa: BLE001
            self._finish_recording("the source failed", complete=False)
            self._close_source()
            self.sourceFailed.emit(self.source_spec, f"{getattr(src, 'name', 'source')}: {type(exc).__name__}: {exc}",
                                   self.request)
            return

        kind = self.source_spec.kind if self.source_spec else "video"
        timeline = frame.index * FOLDER_INTERVAL_S if kind == "folder" else float(frame.time_s)
        if not self._pace(kind, timeline):
            return  # a command arrived that replaces this frame (new source, stop)
        if self._opts_dirty:
            self._apply_options()
        if kind == "folder":
            self._reset_tracks()  # unrelated stills: no tracking or smoothing across them
        try:
            result = self._process(frame)
        except Exception as exc:  # noqa: BLE001 - one bad frame must not end the session
            self._report_processing_error(exc)
            return
        if self._writer is not None:
            try:
                self._writer.write(result)
            except Exception as exc:  # noqa: BLE001 - disk full etc.
                writer, self._writer = self._writer, None
                _close_quietly(writer)
                self.recordingFailed.emit(f"Recording stopped: {exc}")
        self._processed += 1
        self._fps.tick()
        self._deliver(frame.image, result, timeline)

    def _pace(self, kind: str, timeline: float) -> bool:
        """Wait until the frame is due (real-time playback of files). False when interrupted by a
        command that makes this frame moot."""
        if kind == "camera" or not self.realtime:
            self._clock_base = None
            return True
        now = time.monotonic()
        if self._clock_base is None:
            self._clock_base = now - timeline
        due = self._clock_base + timeline
        if due < now - 0.25:  # far behind (slow machine): re-anchor instead of rushing
            self._clock_base = now - timeline
            return True
        while True:
            left = due - time.monotonic()
            if left <= 0:
                return True
            self._wake.wait(min(left, 0.05))
            if self._wake.is_set():
                self._wake.clear()
                if self._stop.is_set():
                    return False
                self._flush()  # the GUI may have acknowledged: show what it missed while waiting
                if not self._commands.empty():
                    pending = list(self._commands.queue)
                    if any(name in ("open", "close_source", "restart") for name, _ in pending):
                        return False
                    self._drain()
                if self.paused:
                    # hold this frame until resumed
                    while self.paused and not self._stop.is_set():
                        self._wake.wait(0.05)
                        self._wake.clear()
                        if any(n in ("open", "close_source", "restart") for n, _ in list(self._commands.queue)):
                            return False
                        self._drain()
                    if self._stop.is_set():
                        return False
                    self._clock_base = time.monotonic() - timeline
                    return True

    def _report_processing_error(self, exc: Exception) -> None:
        """Log every failure, tell the GUI at most every 5 s (a broken model fails on every frame)."""
        log.exception("processing a frame failed")
        now = time.monotonic()
        if now - self._last_error_t >= 5.0:
            self._last_error_t = now
            self.errorOccurred.emit(f"A frame could not be processed: {type(exc).__name__}: {exc}")

    def _process(self, frame) -> FrameResult:
        if self.pipeline is not None:
            return self.pipeline.process(frame.image, frame.index, frame.time_s)
        t0 = time.perf_counter()
        faces = self.detector.detect(frame.image) if self.detector is not None else []
        t1 = time.perf_counter()
        self.tracker.update(faces)
        results = [FaceResult(f.face_id, f.box, float(f.score), f.keypoints, None, None, None,
                              math.nan, math.nan, AV_NONE) for f in faces]
        ms = (t1 - t0) * 1e3
        timings = {"detect_ms": ms, "preprocess_ms": 0.0, "infer_ms": 0.0, "post_ms": 0.0, "total_ms": ms}
        return FrameResult(frame.index, frame.time_s, results, timings, ())

    def _deliver(self, image: np.ndarray, result: FrameResult, timeline: float) -> None:
        self._carried.append(result)
        self._carried_t.append(timeline)
        if len(self._carried) > MAX_CARRIED_RESULTS:
            del self._carried[0]
            del self._carried_t[0]
        if self._latest is not None:
            self._dropped += 1  # the held-back frame is replaced by a newer one before it could be shown
        self._latest = (image, result)
        self._flush()

    def _flush(self) -> None:
        """Send the newest processed frame (with the results of any frames skipped since the last packet)
        when the GUI has acknowledged the previous one; otherwise keep it for later."""
        if self._latest is None or self._gui_busy.is_set():
            return
        image, result = self._latest
        self._latest = None
        display, size = self._prescale(image)
        packet = FramePacket(
            image=image, display=display, display_size=size, result=result,
            results=self._carried, timeline=self._carried_t, source_serial=self._source_serial, request=self.request,
            source_name=getattr(self.source, "name", ""), has_model=self.pipeline is not None,
            capture_fps=self._fps.rate(), processed=self._processed, dropped=self._dropped,
            frame_count=getattr(self.source, "frame_count", None),
        )
        self._carried, self._carried_t = [], []
        self._gui_busy.set()
        self.frameReady.emit(packet)

    def _prescale(self, image: np.ndarray) -> tuple[np.ndarray | None, tuple[int, int]]:
        """The frame resized to the view's letterbox rectangle, so the GUI thread only blits it."""
        bw, bh = self._display_size
        h, w = image.shape[:2]
        _, _, tw, th = fit_rect(w, h, bw, bh)
        if tw <= 0 or th <= 0:
            return None, (bw, bh)
        if (tw, th) == (w, h):
            return image, (bw, bh)
        interp = cv2.INTER_AREA if tw < w else cv2.INTER_LINEAR
        return cv2.resize(image, (tw, th), interpolation=interp), (bw, bh)


def _close_quietly(obj) -> None:
    if obj is None:
        return
    try:
        obj.close()
    except Exception:  # noqa: BLE001
        log.exception("closing %r", obj)


# -------------------------------------------------------------------------------- model loading


class ModelLoader(QObject):
    """Loads checkpoints and builds backends on short-lived threads; results come back as signals
    (queued to the GUI thread). Each request carries an id; the window ignores all but the latest."""

    loaded = Signal(int, object)  # request id, ModelBundle
    backendReady = Signal(int, object)  # request id, Backend
    failed = Signal(int, str, str)  # request id, what ("model" | "backend"), message
    # request id, fraction in [0, 1] or None (unknown), message: a backend being built (a TensorRT engine),
    # at most PROGRESS_INTERVAL_S apart, the latest always delivered; always before that request's result
    progress = Signal(int, object, str)

    def __init__(self, parent: QObject | None = None):
        super().__init__(parent)
        self._threads: list[threading.Thread] = []
        self._next_id = 0
        self._lock = threading.Lock()
        self._closing = False

    def _start(self, target, *args) -> int:
        with self._lock:
            self._next_id += 1
            rid = self._next_id
            self._threads = [t for t in self._threads if t.is_alive()]
            t = threading.Thread(target=target, args=(rid, *args), name=f"fer-model-{rid}", daemon=True)
            self._threads.append(t)
        t.start()
        return rid

    @property
    def busy(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def load(self, path: str | Path, backend: str = "auto", device: str = "auto") -> int:
        return self._start(self._load, Path(path), backend, device)

    def make_backend(self, loaded, backend: str, device: str = "auto") -> int:
        return self._start(self._make_backend, loaded, backend, device)

    def _load(self, rid: int, path: Path, backend: str, device: str) -> None:
        from ferengine.checkpoint import CheckpointError, load

        t0 = time.perf_counter()
        try:
            loaded = load(path, device="cpu")
        except CheckpointError as exc:
            self._emit_failed(rid, "model", str(exc))
            return
        except Exception as exc:  # noqa: BLE001 - anything else reading the file
            self._emit_failed(rid, "model", f"{path}: {type(exc).__name__}: {exc}")
            return
        reporter = _ProgressReporter(self, rid)
        try:
            be, note = _create_backend(loaded, backend, device, reporter)
        except Exception as exc:  # noqa: BLE001
            reporter.finish()
            self._emit_failed(rid, "model", f"{path}: no backend can run this model: {exc}")
            return
        reporter.finish()
        bundle = ModelBundle(loaded, be, path, time.perf_counter() - t0, note)
        if self._closing:
            _close_quietly(be)
            return
        self.loaded.emit(rid, bundle)

    def _make_backend(self, rid: int, loaded, backend: str, device: str) -> None:
        reporter = _ProgressReporter(self, rid)
        try:
            be = _create_with_progress(backend, loaded, device, reporter)
        except Exception as exc:  # noqa: BLE001 - BackendUnavailable, export errors
            reporter.finish()
            self._emit_failed(rid, "backend", str(exc))
            return
        reporter.finish()
        if self._closing:
            _close_quietly(be)
            return
        self.backendReady.emit(rid, be)

    def _emit_failed(self, rid: int, what: str, message: str) -> None:
        if not self._closing:
            self.failed.emit(rid, what, message)

    def close(self, timeout: float = 10.0) -> None:
        """Wait (bounded) for running loads; what they produce afterwards is closed, not delivered."""
        self._closing = True
        deadline = time.monotonic() + timeout
        for t in list(self._threads):
            t.join(max(0.0, deadline - time.monotonic()))


PROGRESS_INTERVAL_S = 0.1  # ModelLoader.progress: at most ~10 signals a second per request


class _ProgressReporter:
    """The ``progress(fraction, message)`` callback given to a backend being built (see
    :attr:`ModelLoader.progress`). Called on the loader's thread, possibly many times a second; emits at most
    every :data:`PROGRESS_INTERVAL_S`, and the latest call held back by that is emitted later (by a timer, or
    by :meth:`finish` once the backend is built, before its result), so the last word is never lost. It never
    raises into the build."""

    def __init__(self, loader: "ModelLoader", rid: int, interval: float = PROGRESS_INTERVAL_S):
        self._loader = loader
        self._rid = rid
        self._interval = float(interval)
        self._lock = threading.Lock()
        self._last_emit = -1e9
        self._pending: tuple[float | None, str] | None = None
        self._timer: threading.Timer | None = None
        self._done = False
        self.calls = 0

    def __call__(self, fraction=None, message: str = "") -> None:
        try:
            value = _fraction(fraction)
            text = str(message or "")
            with self._lock:
                if self._done:
                    return
                self.calls += 1
                self._pending = (value, text)
                wait = self._last_emit + self._interval - time.monotonic()
                if wait > 0:
                    if self._timer is None:
                        self._timer = threading.Timer(wait, self._flush_from_timer)
                        self._timer.daemon = True
                        self._timer.start()
                    return
                self._emit_locked()
        except Exception:  # noqa: BLE001 - reporting must never break the build
            log.exception("reporting backend build progress")

    def _emit_locked(self) -> None:
        pending, self._pending = self._pending, None
        self._last_emit = time.monotonic()
        if pending is not None and not self._loader._closing:
            self._loader.progress.emit(self._rid, pending[0], pending[1])

    def _flush_from_timer(self) -> None:
        try:
            with self._lock:
                self._timer = None
                if not self._done:
                    self._emit_locked()
        except Exception:  # noqa: BLE001
            log.exception("reporting backend build progress")

    def finish(self) -> None:
        """The build is over: emit what is still held back, then ignore any further call."""
        try:
            with self._lock:
                if self._done:
                    return
                if self._timer is not None:
                    self._timer.cancel()
                    self._timer = None
                self._emit_locked()
                self._done = True
        except Exception:  # noqa: BLE001
            log.exception("reporting backend build progress")


def _fraction(value) -> float | None:
    if value is None:
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return min(1.0, max(0.0, f)) if math.isfinite(f) else None


def _create_with_progress(backend: str, loaded, device: str, progress: Callable | None):
    """``create_backend`` with the ``progress`` option where the backend takes it: "tensorrt" (it builds
    an engine), and "auto" (``create_backend`` gives each candidate only the options its class accepts);
    torch and onnxruntime are never given it."""
    from ferengine import backends

    if progress is None or backend not in ("tensorrt", "auto"):
        return backends.create_backend(backend, loaded, device)
    return backends.create_backend(backend, loaded, device, progress=progress)


def _create_backend(loaded, backend: str, device: str, progress: Callable | None = None):
    """The requested backend, or the automatic choice (with a note) when it cannot run here."""
    from ferengine.backends import BackendUnavailable

    try:
        return _create_with_progress(backend, loaded, device, progress), ""
    except BackendUnavailable as exc:
        if backend == "auto":
            raise
        be = _create_with_progress("auto", loaded, device, progress)
        return be, f"{exc}; using {be.name} instead"
