"""The live video: the frame letterboxed into the widget, boxes/ids/labels on top, click to select a face."""
from __future__ import annotations

from typing import Sequence

import numpy as np
from PySide6.QtCore import QPointF, QRectF, QSize, Qt, Signal
from PySide6.QtGui import QColor, QFont, QMouseEvent, QPainter, QPaintEvent, QResizeEvent
from PySide6.QtWidgets import QSizePolicy, QWidget

from ferengine.pipeline import FaceResult

from ..annotate import AnnotationStyle, bgr_to_qimage, draw_faces
from ..state import fit_rect


class VideoView(QWidget):
    """Paints the newest frame (already scaled by the worker when it could) and its faces.

    ``faceClicked(x, y)`` gives the click in frame pixels. ``displaySizeChanged(w, h)`` gives the size, in
    device pixels, the worker should pre-scale frames to.
    """

    faceClicked = Signal(float, float)
    displaySizeChanged = Signal(int, int)

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
        self.setMinimumSize(320, 200)
        self.setAttribute(Qt.WidgetAttribute.WA_OpaquePaintEvent, True)
        self.setCursor(Qt.CursorShape.CrossCursor)
        self.style_opts = AnnotationStyle()
        self.overlay_text = ""  # e.g. "Paused", "End of video"
        self.paint_count = 0  # paint events
        self.frames_painted = 0  # paint events that put a new frame on screen
        self._painted_seq = -1
        self._seq = 0
        self._image: np.ndarray | None = None
        self._display: np.ndarray | None = None
        self._display_size = (0, 0)
        self._faces: Sequence[FaceResult] = ()
        self._selected: int | None = None

    def sizeHint(self) -> QSize:
        return QSize(880, 660)

    # ------------------------------------------------------------------ data
    def set_frame(self, image: np.ndarray, display: np.ndarray | None, display_size: tuple[int, int],
                  faces: Sequence[FaceResult], selected_id: int | None) -> None:
        self._image = image
        self._display = display
        self._display_size = display_size
        self._faces = faces
        self._selected = selected_id
        self._seq += 1
        self.update()

    def set_selected(self, selected_id: int | None) -> None:
        self._selected = selected_id
        self.update()

    def clear(self) -> None:
        self._image = self._display = None
        self._faces = ()
        self.update()

    @property
    def has_frame(self) -> bool:
        return self._image is not None

    def device_size(self) -> tuple[int, int]:
        dpr = self.devicePixelRatioF()
        return int(round(self.width() * dpr)), int(round(self.height() * dpr))

    def image_rect(self) -> QRectF:
        """Where the frame is drawn, in widget (logical) pixels."""
        if self._image is None:
            return QRectF()
        h, w = self._image.shape[:2]
        dw, dh = self.device_size()
        x, y, tw, th = fit_rect(w, h, dw, dh)
        dpr = self.devicePixelRatioF()
        return QRectF(x / dpr, y / dpr, tw / dpr, th / dpr)

    # ------------------------------------------------------------------ Qt
    def resizeEvent(self, event: QResizeEvent) -> None:
        super().resizeEvent(event)
        self.displaySizeChanged.emit(*self.device_size())

    def paintEvent(self, event: QPaintEvent) -> None:
        p = QPainter(self)
        p.fillRect(self.rect(), QColor(18, 18, 20))
        if self._image is not None:
            target = self.image_rect()
            disp = self._display
            dpr = self.devicePixelRatioF()
            if (disp is not None and self._display_size == self.device_size()
                    and disp.shape[1] == int(round(target.width() * dpr))
                    and disp.shape[0] == int(round(target.height() * dpr))):
                qimg = bgr_to_qimage(disp)
                qimg.setDevicePixelRatio(dpr)
                p.drawImage(target.topLeft(), qimg)  # 1:1 blit, scaled by the worker
            else:  # the view was just resized: scale here until the worker catches up
                p.setRenderHint(QPainter.RenderHint.SmoothPixmapTransform, True)
                p.drawImage(target, bgr_to_qimage(np.ascontiguousarray(self._image)))
            h, w = self._image.shape[:2]
            scale = target.width() / w
            draw_faces(p, self._faces, scale=scale, offset=(target.left(), target.top()), clip=target,
                       selected_id=self._selected, style=self.style_opts)
        if self.overlay_text:
            self._draw_overlay(p)
        p.end()
        self.paint_count += 1
        if self._image is not None and self._painted_seq != self._seq:
            self._painted_seq = self._seq
            self.frames_painted += 1

    def _draw_overlay(self, p: QPainter) -> None:
        font = QFont(self.font())
        font.setPixelSize(18)
        font.setBold(True)
        p.setFont(font)
        fm = p.fontMetrics()
        tw = fm.horizontalAdvance(self.overlay_text) + 28
        th = fm.height() + 14
        r = QRectF((self.width() - tw) / 2, self.height() - th - 16, tw, th)
        p.setRenderHint(QPainter.RenderHint.Antialiasing, True)
        p.setPen(Qt.PenStyle.NoPen)
        p.setBrush(QColor(0, 0, 0, 170))
        p.drawRoundedRect(r, 6, 6)
        p.setPen(QColor("white"))
        p.drawText(r, int(Qt.AlignmentFlag.AlignCenter), self.overlay_text)

    def mousePressEvent(self, event: QMouseEvent) -> None:
        if event.button() != Qt.MouseButton.LeftButton or self._image is None:
            return super().mousePressEvent(event)
        target = self.image_rect()
        pos: QPointF = event.position()
        if not target.contains(pos) or target.width() <= 0:
            return
        scale = self._image.shape[1] / target.width()
        self.faceClicked.emit((pos.x() - target.left()) * scale, (pos.y() - target.top()) * scale)

    def widget_point(self, x: float, y: float) -> QPointF:
        """Frame pixel -> widget point (for tests and tooltips)."""
        target = self.image_rect()
        s = target.width() / self._image.shape[1]
        return QPointF(target.left() + x * s, target.top() + y * s)

