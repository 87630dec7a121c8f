"""The right-hand plots (pyqtgraph): class probabilities, the arousal-valence plane, valence/arousal over time.

Each panel is a caption line (what is shown, for which face) over a static-range, non-interactive plot:
these are readouts, not data exploration, so the ranges never jump.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QColor, QFont
from PySide6.QtWidgets import QHBoxLayout, QLabel, QSizePolicy, QSpinBox, QStackedWidget, QVBoxLayout, QWidget

from ferengine.pipeline import FaceResult

from ..annotate import AROUSAL_COLOUR, VALENCE_COLOUR, face_colour
from ..state import MAX_WINDOW_S, MIN_WINDOW_S

MUTED = "#777777"


def _plot_widget() -> pg.PlotWidget:
    w = pg.PlotWidget(background=None)
    w.setMenuEnabled(False)
    w.setMouseEnabled(False, False)
    w.hideButtons()
    w.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
    pi = w.getPlotItem()
    pi.setContentsMargins(2, 2, 8, 2)
    for name in ("left", "bottom"):
        ax = pi.getAxis(name)
        ax.setTextPen(pg.mkPen(w.palette().color(w.foregroundRole())))
        ax.setPen(pg.mkPen("#9a9a9a"))
    return w


class _Panel(QWidget):
    """A caption over a plot."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.caption = QLabel(self)
        self.caption.setTextFormat(Qt.TextFormat.RichText)
        self.caption.setWordWrap(True)
        self.caption.setMinimumHeight(self.caption.fontMetrics().height() * 2 + 4)
        self.caption.setAlignment(Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignVCenter)
        self.plot = _plot_widget()
        self.placeholder = QLabel(self)  # shown instead of the plot when there is nothing it could show
        self.placeholder.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.placeholder.setWordWrap(True)
        self.placeholder.setStyleSheet(f"color: {MUTED};")
        self.body = QStackedWidget(self)
        self.body.addWidget(self.plot)
        self.body.addWidget(self.placeholder)
        self.header = QHBoxLayout()
        self.header.setContentsMargins(0, 0, 0, 0)
        self.header.addWidget(self.caption, 1)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(6, 2, 6, 4)
        lay.setSpacing(2)
        lay.addLayout(self.header)
        lay.addWidget(self.body, 1)

    def show_placeholder(self, text: str | None) -> None:
        """Replace the plot by a centred message (``None``: show the plot)."""
        if text:
            self.placeholder.setText(text)
            self.body.setCurrentWidget(self.placeholder)
        else:
            self.body.setCurrentWidget(self.plot)

    def set_caption(self, html: str) -> None:
        if self.caption.text() != html:
            self.caption.setText(html)


def _face_tag(face: FaceResult) -> str:
    c = face_colour(face.face_id).name()
    return f'<span style="color:{c}; font-weight:bold">■</span> <b>face #{face.face_id}</b>'


# ------------------------------------------------------------------------------ probabilities

NO_MODEL_TEXT = "No model loaded:\nfaces are detected, expressions are not analysed"
AV_ONLY_TEXT = "This model predicts valence/arousal only;\nit has no expression categories"


class ProbabilityChart(_Panel):
    """Horizontal bars, one per class (names on the left axis, first class on top), 0-100 %."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.labels: tuple[str, ...] = ()
        self.av_only = False  # the model has a valence/arousal head and no expression categories
        self.values = np.zeros(0)
        self._brush_cache: dict[int, tuple] = {}
        self.update_count = 0
        pi = self.plot.getPlotItem()
        pi.setXRange(-0.005, 1.06, padding=0)
        pi.getAxis("bottom").setTicks([[(v, f"{v * 100:.0f}%") for v in (0, 0.25, 0.5, 0.75, 1.0)]])
        pi.showGrid(x=True, y=False, alpha=0.25)
        self.bars = pg.BarGraphItem(x0=np.zeros(0), y=np.zeros(0), height=0.72, width=np.zeros(0),
                                    pen=pg.mkPen(None), brush=pg.mkBrush("#8aa0b8"))
        pi.addItem(self.bars)
        self._texts: list[pg.TextItem] = []
        self.set_caption(f'<span style="color:{MUTED}">No face yet</span>')
        self.show_placeholder("No model loaded")

    @property
    def message(self) -> str:
        """The centred text shown instead of the bars ("" while the bars are shown)."""
        return self.placeholder.text() if self.body.currentWidget() is self.placeholder else ""

    def _brushes(self, base: QColor) -> tuple:
        pair = self._brush_cache.get(base.rgb())
        if pair is None:
            dim = QColor(base)
            dim.setAlpha(120)
            pair = self._brush_cache[base.rgb()] = (pg.mkBrush(base), pg.mkBrush(dim))
        return pair

    def set_labels(self, labels: Sequence[str], av_only: bool = False) -> None:
        """The model's class names; ``()`` with ``av_only=True``: a model with only a valence/arousal head
        (the chart says so and shows no bars), ``()`` otherwise: no model."""
        labels = tuple(labels)
        self.av_only = bool(av_only) and not labels
        self.show_placeholder(None if labels else AV_ONLY_TEXT if self.av_only else NO_MODEL_TEXT)
        if labels == self.labels:
            return
        self.labels = labels
        pi = self.plot.getPlotItem()
        k = len(labels)
        pi.getAxis("left").setTicks([[(k - 1 - i, name) for i, name in enumerate(labels)]])
        pi.setYRange(-0.6, max(k - 0.4, 0.6), padding=0)
        for t in self._texts:
            pi.removeItem(t)
        self._texts = []
        for i in range(k):
            t = pg.TextItem("", anchor=(0, 0.5))
            f = QFont(self.font())
            f.setPointSizeF(max(7.0, f.pointSizeF() * 0.9))
            t.setFont(f)
            pi.addItem(t)
            self._texts.append(t)
        self.set_probs(None)

    def set_probs(self, probs: np.ndarray | None, face: FaceResult | None = None, note: str = "") -> None:
        k = len(self.labels)
        p = np.zeros(k) if probs is None else np.clip(np.asarray(probs, dtype=float)[:k], 0.0, 1.0)
        self.values = p
        ys = np.arange(k - 1, -1, -1, dtype=float)
        top = int(np.argmax(p)) if probs is not None and k else -1
        solid, dim = self._brushes(face_colour(face.face_id) if face is not None else QColor("#8aa0b8"))
        brushes = [solid if i == top else dim for i in range(k)]
        self.bars.setOpts(x0=np.zeros(k), y=ys, height=0.72, width=p, brushes=brushes)
        fg = self.palette().color(self.foregroundRole())
        for i, t in enumerate(self._texts):
            if probs is None:
                t.setText("")
                continue
            v = p[i]
            t.setText(f"{v * 100:.0f}%")
            if v > 0.78:  # inside the bar's end
                t.setAnchor((1, 0.5))
                t.setColor(QColor("white"))
                t.setPos(v - 0.01, ys[i])
            else:
                t.setAnchor((0, 0.5))
                t.setColor(fg)
                t.setPos(v + 0.01, ys[i])
        if face is not None and probs is not None and k and face.label is not None and face.confidence is not None:
            self.set_caption(f"{_face_tag(face)} · <b>{face.label}</b> {face.confidence * 100:.0f}%"
                             f"{' · ' + note if note else ''}")
        elif note:
            self.set_caption(f'<span style="color:{MUTED}">{note}</span>')
        self.update_count += 1


# ------------------------------------------------------------------------------ AV plane

QUADRANTS = (  # (x, y, anchor, text): the circumplex's usual names for each quadrant
    (0.97, 0.97, (1, 0), "excited<br>pleasant"),
    (-0.97, 0.97, (0, 0), "tense<br>unpleasant"),
    (-0.97, -0.97, (0, 1), "tired<br>unpleasant"),
    (0.97, -0.97, (1, 1), "calm<br>pleasant"),
)


class AVPlane(_Panel):
    """Valence (x) against arousal (y), both -1..1, axes through the origin, the recent path fading out."""

    TRAIL_POINTS = 90
    FADE_LEVELS = 24

    def _ramp(self, colour: QColor) -> list:
        """Brushes from faint to solid for one face colour (built once per colour: the trail is redrawn
        every frame)."""
        key = colour.rgb()
        ramp = self._ramps.get(key)
        if ramp is None:
            ramp = []
            for k in range(self.FADE_LEVELS):
                c = QColor(colour)
                c.setAlphaF(0.08 + 0.6 * k / (self.FADE_LEVELS - 1) if k < self.FADE_LEVELS - 1 else 1.0)
                ramp.append(pg.mkBrush(c))
            self._ramps[key] = ramp
        return ramp

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.update_count = 0
        self._ramps: dict[int, list] = {}
        self.point = (math.nan, math.nan)
        pi = self.plot.getPlotItem()
        self.plot.setAspectLocked(True)
        pi.setXRange(-1.05, 1.05, padding=0)
        pi.setYRange(-1.05, 1.05, padding=0)
        ticks = [[(v, f"{v:g}") for v in (-1, -0.5, 0, 0.5, 1)]]
        pi.getAxis("bottom").setTicks(ticks)
        pi.getAxis("left").setTicks(ticks)
        pi.setLabel("bottom", "valence")
        pi.setLabel("left", "arousal")
        grey = pg.mkPen("#9a9a9a", width=1)
        pi.addItem(pg.InfiniteLine(pos=0, angle=0, pen=grey))
        pi.addItem(pg.InfiniteLine(pos=0, angle=90, pen=grey))
        th = np.linspace(0, 2 * np.pi, 181)
        pi.addItem(pg.PlotCurveItem(np.cos(th), np.sin(th), pen=pg.mkPen("#b5b5b5", width=1,
                                                                           style=Qt.PenStyle.DashLine)))
        for x, y, anchor, text in QUADRANTS:
            t = pg.TextItem(html=f'<div style="color:{MUTED}; text-align:{"right" if anchor[0] else "left"}">'
                                 f"{text}</div>", anchor=anchor)
            t.setPos(x, y)
            pi.addItem(t)
        self.line = pg.PlotCurveItem(pen=pg.mkPen(QColor(120, 120, 120, 110), width=1.5))
        self.trail = pg.ScatterPlotItem(pxMode=True, pen=None)
        self.dot = pg.ScatterPlotItem(pxMode=True, size=15, pen=pg.mkPen("white", width=2))
        for item in (self.line, self.trail, self.dot):
            pi.addItem(item)
        self.set_caption(f'<span style="color:{MUTED}">No face yet</span>')

    def set_trajectory(self, face: FaceResult | None, age: np.ndarray, v: np.ndarray, a: np.ndarray,
                       source: str | None, trail_s: float) -> None:
        if face is None or len(v) == 0:
            self.line.setData([], [])
            self.trail.setData([], [])
            self.dot.setData([], [])
            self.point = (math.nan, math.nan)
        else:
            if len(v) > self.TRAIL_POINTS:
                idx = np.linspace(0, len(v) - 1, self.TRAIL_POINTS).astype(int)
                age, v, a = age[idx], v[idx], a[idx]
            colour = face_colour(face.face_id)
            fade = np.clip(1.0 - age / max(trail_s, 1e-6), 0.0, 1.0)
            levels = np.rint(fade * (self.FADE_LEVELS - 1)).astype(int)
            ramp = self._ramp(colour)
            self.line.setData(v, a)
            self.trail.setData(v, a, brush=[ramp[k] for k in levels], size=(3 + 6 * fade))
            self.dot.setData([v[-1]], [a[-1]], brush=[ramp[-1]])
            self.point = (float(v[-1]), float(a[-1]))
        self.update_count += 1
        if face is None or source is None:
            return
        how = ("estimated from categories" if source == "estimated" else "from the model's AV head")
        self.set_caption(f"{_face_tag(face)} · valence <b>{self.point[0]:+.2f}</b> · arousal "
                         f"<b>{self.point[1]:+.2f}</b><br><i>{how}</i>")


# ------------------------------------------------------------------------------ timeline


class TimelinePlot(_Panel):
    """Valence and arousal of the selected face over the last N seconds (N settable)."""

    windowChanged = Signal(float)

    def __init__(self, window_s: float = 30.0, parent: QWidget | None = None):
        super().__init__(parent)
        self.update_count = 0
        self.window = QSpinBox(self)
        self.window.setRange(int(MIN_WINDOW_S), int(MAX_WINDOW_S))
        self.window.setSingleStep(5)
        self.window.setSuffix(" s")
        self.window.setPrefix("last ")
        self.window.setToolTip("How many seconds the plot shows")
        self.window.setValue(int(window_s))
        self.window.valueChanged.connect(self._on_window)
        self.header.addWidget(self.window, 0, Qt.AlignmentFlag.AlignTop)
        pi = self.plot.getPlotItem()
        pi.setYRange(-1.12, 1.12, padding=0)
        pi.getAxis("left").setTicks([[(v, f"{v:g}") for v in (-1, -0.5, 0, 0.5, 1)]])
        pi.setLabel("bottom", "seconds")
        pi.showGrid(x=True, y=True, alpha=0.2)
        pi.addItem(pg.InfiniteLine(pos=0, angle=0, pen=pg.mkPen("#9a9a9a")))
        legend = pi.addLegend(offset=(8, 4), labelTextSize="8pt", brush=pg.mkBrush(255, 255, 255, 170))
        self.valence = pi.plot([], [], pen=pg.mkPen(VALENCE_COLOUR, width=2), name="valence")
        self.arousal = pi.plot([], [], pen=pg.mkPen(AROUSAL_COLOUR, width=2), name="arousal")
        for item in (self.valence, self.arousal):
            item.setClipToView(True)
            item.setDownsampling(auto=True, method="peak")
        self._legend = legend
        self._apply_range()
        self.set_caption(f'<span style="color:{MUTED}">Valence and arousal over time</span>')

    @property
    def window_s(self) -> float:
        return float(self.window.value())

    def _apply_range(self) -> None:
        self.plot.getPlotItem().setXRange(-self.window_s, 0, padding=0.01)

    def _on_window(self, value: int) -> None:
        self._apply_range()
        self.windowChanged.emit(float(value))

    def set_series(self, face: FaceResult | None, t: np.ndarray, v: np.ndarray, a: np.ndarray,
                   source: str | None) -> None:
        self.valence.setData(t, v)
        self.arousal.setData(t, a)
        self.update_count += 1
        if face is None or source is None:
            return
        how = "estimated from categories" if source == "estimated" else "model AV head"
        self.set_caption(f"{_face_tag(face)} · <i>{how}</i>")

