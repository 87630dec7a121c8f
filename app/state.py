"""The viewer's state, apart from any Qt widget (napari's model/view split).

:class:`ViewerState` holds what the window shows: the latest :class:`~ferengine.pipeline.FrameResult`, the
selected face, and a bounded valence/arousal history per face. The widgets read it; nothing here draws.
:class:`RateMeter` measures events per second. :func:`fit_rect` is the one letterbox computation shared by
the video view (where to draw) and the worker (what size to pre-scale frames to).
"""
from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ferengine.pipeline import FaceResult, FrameResult

DEFAULT_WINDOW_S = 30.0
MIN_WINDOW_S = 5.0
MAX_WINDOW_S = 600.0
DEFAULT_TRAIL_S = 3.0


def fit_rect(img_w: int, img_h: int, box_w: int, box_h: int) -> tuple[int, int, int, int]:
    """``(x, y, w, h)``: the largest rectangle of the image's aspect ratio centred in a ``box_w x box_h``
    box (letterbox/pillarbox), in whole pixels; ``(0, 0, 0, 0)`` when either size is empty."""
    if img_w <= 0 or img_h <= 0 or box_w <= 0 or box_h <= 0:
        return 0, 0, 0, 0
    scale = min(box_w / img_w, box_h / img_h)
    w = max(1, min(box_w, int(round(img_w * scale))))
    h = max(1, min(box_h, int(round(img_h * scale))))
    return (box_w - w) // 2, (box_h - h) // 2, w, h


class RateMeter:
    """Events per second over a sliding window (``window_s`` seconds)."""

    def __init__(self, window_s: float = 1.0):
        self.window_s = float(window_s)
        self._times: deque[float] = deque()

    def tick(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._times.append(now)
        self._trim(now)

    def _trim(self, now: float) -> None:
        limit = now - self.window_s
        while self._times and self._times[0] < limit:
            self._times.popleft()

    def rate(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        self._trim(now)
        n = len(self._times)
        if n < 2:
            return 0.0
        span = self._times[-1] - self._times[0]
        return (n - 1) / span if span > 0 else 0.0

    def reset(self) -> None:
        self._times.clear()


@dataclass
class _Track:
    t: deque = field(default_factory=deque)
    v: deque = field(default_factory=deque)
    a: deque = field(default_factory=deque)
    last_t: float = -math.inf


class ViewerState:
    """What the window shows, updated once per processed frame by :meth:`update`.

    ``t`` passed to :meth:`update` is the frame's position on the source's timeline in seconds (video time,
    camera time since it opened); when it goes backwards (a loop, a new source) the history restarts.
    """

    def __init__(self, window_s: float = DEFAULT_WINDOW_S, trail_s: float = DEFAULT_TRAIL_S):
        self.window_s = float(window_s)
        self.trail_s = float(trail_s)
        self.result: FrameResult | None = None
        self.labels: tuple[str, ...] = ()
        self.has_model = False
        self.av_source: str | None = None  # "head" | "estimated" | None (no model)
        self.selected_id: int | None = None  # the user's choice; None = the largest face
        self.now_t = 0.0
        self.frames = 0
        self._tracks: dict[int, _Track] = {}

    # ------------------------------------------------------------------ updates
    def set_window(self, seconds: float) -> None:
        self.window_s = float(min(MAX_WINDOW_S, max(MIN_WINDOW_S, seconds)))
        self._prune(self.now_t)

    def set_model(self, labels: Sequence[str], has_model: bool) -> None:
        """A new model (or none): forget the history, whose values came from the old one."""
        self.labels = tuple(labels)
        self.has_model = bool(has_model)
        self.av_source = None
        self.clear_history()

    def clear_history(self) -> None:
        self._tracks.clear()
        self.now_t = 0.0

    def reset(self) -> None:
        """A new source: no frame, no selection, no history."""
        self.result = None
        self.selected_id = None
        self.clear_history()

    def update(self, results: Sequence[FrameResult], times: Sequence[float] | None = None) -> None:
        """Add processed frames (oldest first; the last one becomes the current frame).

        ``times`` gives each frame's timeline position in seconds (default: its ``time_s``).
        """
        last = None
        for i, fr in enumerate(results):
            t = float(times[i] if times is not None else fr.time_s)
            if t < self.now_t - 1e-6:
                self.clear_history()
            self.now_t = t
            for face in fr.faces:
                if face.probs is None and not math.isfinite(face.valence):
                    continue  # detection only: no values to keep
                tr = self._tracks.get(face.face_id)
                if tr is None:
                    tr = self._tracks[face.face_id] = _Track()
                tr.t.append(t)
                tr.v.append(face.valence)
                tr.a.append(face.arousal)
                tr.last_t = t
                if self.has_model:
                    self.av_source = face.av_source
            self.frames += 1
            last = fr
        if last is not None:
            self.result = last
            if last.labels:
                self.labels = tuple(last.labels)
            self._prune(self.now_t)

    def _prune(self, now: float) -> None:
        limit = now - self.window_s
        for fid in list(self._tracks):
            tr = self._tracks[fid]
            while tr.t and tr.t[0] < limit:
                tr.t.popleft()
                tr.v.popleft()
                tr.a.popleft()
            if not tr.t:
                del self._tracks[fid]

    # ------------------------------------------------------------------ queries
    @property
    def faces(self) -> list[FaceResult]:
        return list(self.result.faces) if self.result is not None else []

    def current_face(self) -> FaceResult | None:
        """The selected face when it is in the current frame, else the largest face (or None)."""
        faces = self.faces
        if not faces:
            return None
        if self.selected_id is not None:
            for f in faces:
                if f.face_id == self.selected_id:
                    return f
        return max(faces, key=lambda f: f.box[2] * f.box[3])

    def select_at(self, x: float, y: float) -> int | None:
        """Select the face under image point ``(x, y)`` (the smallest box containing it, else the nearest
        box centre within one box size); a click on no face returns to automatic selection (largest).
        Returns the new ``selected_id``."""
        best = None
        for f in self.faces:
            bx, by, bw, bh = f.box
            if bx <= x <= bx + bw and by <= y <= by + bh:
                if best is None or bw * bh < best.box[2] * best.box[3]:
                    best = f
        if best is None:
            near = None
            for f in self.faces:
                bx, by, bw, bh = f.box
                d = math.hypot(x - (bx + bw / 2), y - (by + bh / 2))
                if d <= max(bw, bh) and (near is None or d < near[0]):
                    near = (d, f)
            best = near[1] if near else None
        self.selected_id = best.face_id if best is not None else None
        return self.selected_id

    def series(self, face_id: int | None, window_s: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(t - now, valence, arousal)`` of a face over the last ``window_s`` seconds (float64 arrays)."""
        tr = self._tracks.get(face_id) if face_id is not None else None
        if tr is None or not tr.t:
            e = np.empty(0)
            return e, e, e
        t = np.fromiter(tr.t, float, len(tr.t))
        v = np.fromiter(tr.v, float, len(tr.v))
        a = np.fromiter(tr.a, float, len(tr.a))
        window = self.window_s if window_s is None else window_s
        keep = t >= self.now_t - window
        return t[keep] - self.now_t, v[keep], a[keep]

    def trail(self, face_id: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The recent valence/arousal trajectory (last :attr:`trail_s` seconds): ``(age_s, v, a)``,
        oldest first, ``age_s >= 0``."""
        t, v, a = self.series(face_id, self.trail_s)
        return -t, v, a

    def track_ids(self) -> list[int]:
        return list(self._tracks)
