"""Face boxes, ids and labels drawn with QPainter: on the live view (in widget pixels, so text stays crisp
at any zoom) and on snapshots (at the frame's own resolution)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PySide6.QtCore import QPointF, QRectF, Qt
from PySide6.QtGui import QColor, QFont, QFontMetricsF, QImage, QPainter, QPainterPath, QPen

from ferengine.pipeline import AV_HEAD, FaceResult

# Okabe-Ito (colour-blind safe), then a few more; a face keeps its colour by id.
FACE_COLOURS = ("#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7",
                "#8FD175", "#FF8C8C", "#B39DDB")
VALENCE_COLOUR = "#1f77b4"
AROUSAL_COLOUR = "#d62728"


def face_colour(face_id: int) -> QColor:
    return QColor(FACE_COLOURS[(max(face_id, 1) - 1) % len(FACE_COLOURS)])


@dataclass
class AnnotationStyle:
    show_labels: bool = True
    show_keypoints: bool = False
    font_px: float = 13.0
    line_px: float = 2.0


def face_caption(face: FaceResult) -> str:
    """``#1 happy 87%`` (a model with expression categories), ``#1 V +0.42 A -0.10`` (a model with only a
    valence/arousal head: its own values, no class) or ``#1 face 0.96`` (detection only)."""
    if face.label is not None and face.confidence is not None:
        return f"#{face.face_id} {face.label} {face.confidence * 100:.0f}%"
    if face.av_source == AV_HEAD and math.isfinite(face.valence) and math.isfinite(face.arousal):
        return f"#{face.face_id} V {face.valence:+.2f} A {face.arousal:+.2f}"
    return f"#{face.face_id} face {face.score:.2f}"


def draw_faces(
    p: QPainter,
    faces: Sequence[FaceResult],
    *,
    scale: float,
    offset: tuple[float, float],
    clip: QRectF,
    selected_id: int | None,
    style: AnnotationStyle,
) -> None:
    """Draw ``faces`` (frame pixel coordinates) mapped by ``x * scale + offset``; labels are kept inside
    ``clip`` (the drawn image's rectangle)."""
    if not faces:
        return
    p.save()
    p.setRenderHint(QPainter.RenderHint.Antialiasing, True)
    font = QFont(p.font())
    font.setPixelSize(max(9, int(round(style.font_px))))
    font.setBold(True)
    p.setFont(font)
    fm = QFontMetricsF(font)
    ox, oy = offset
    for face in faces:
        x, y, w, h = face.box
        r = QRectF(x * scale + ox, y * scale + oy, w * scale, h * scale)
        colour = face_colour(face.face_id)
        selected = face.face_id == selected_id
        lw = style.line_px * (1.75 if selected else 1.0)
        # dark outline under the colour keeps the box visible on any background
        p.setBrush(Qt.BrushStyle.NoBrush)
        p.setClipRect(clip)  # a box reaching past the frame edge stops at the image, not in the letterbox
        p.setPen(QPen(QColor(0, 0, 0, 150), lw + 2))
        p.drawRect(r)
        p.setPen(QPen(colour, lw))
        p.drawRect(r)
        if selected:
            _corner_marks(p, r, colour, lw)
        if style.show_keypoints and face.keypoints is not None:
            p.setPen(Qt.PenStyle.NoPen)
            p.setBrush(colour)
            rad = max(1.5, lw)
            for kx, ky in np.asarray(face.keypoints, dtype=float).reshape(-1, 2):
                p.drawEllipse(QPointF(kx * scale + ox, ky * scale + oy), rad, rad)
        p.setClipping(False)
        if style.show_labels:
            _tag(p, fm, face_caption(face), r, colour, clip)
    p.restore()


def _corner_marks(p: QPainter, r: QRectF, colour: QColor, lw: float) -> None:
    n = min(r.width(), r.height()) * 0.18
    p.setPen(QPen(QColor("white"), lw))
    for cx, cy, dx, dy in ((r.left(), r.top(), 1, 1), (r.right(), r.top(), -1, 1),
                           (r.left(), r.bottom(), 1, -1), (r.right(), r.bottom(), -1, -1)):
        p.drawLine(QPointF(cx, cy), QPointF(cx + dx * n, cy))
        p.drawLine(QPointF(cx, cy), QPointF(cx, cy + dy * n))


def _tag(p: QPainter, fm: QFontMetricsF, text: str, box: QRectF, colour: QColor, clip: QRectF) -> None:
    pad_x, pad_y = 5.0, 2.0
    tw = fm.horizontalAdvance(text) + 2 * pad_x
    th = fm.height() + 2 * pad_y
    x = box.left() - 1
    y = box.top() - th - 1
    if y < clip.top():  # no room above: inside the box's top edge
        y = max(clip.top(), box.top() + 1)
    if y + th > clip.bottom():
        y = clip.bottom() - th
    x = min(max(x, clip.left()), max(clip.left(), clip.right() - tw))
    rect = QRectF(x, y, tw, th)
    path = QPainterPath()
    path.addRoundedRect(rect, 3, 3)
    fill = QColor(colour)
    p.fillPath(path, fill)
    # black or white text, whichever reads better on the tag colour
    lum = 0.299 * fill.red() + 0.587 * fill.green() + 0.114 * fill.blue()
    p.setPen(QColor("black") if lum > 150 else QColor("white"))
    p.drawText(rect.adjusted(pad_x, pad_y, -pad_x, -pad_y),
               int(Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignVCenter), text)


def bgr_to_qimage(image: np.ndarray) -> QImage:
    """A QImage viewing a C-contiguous BGR uint8 array (no copy: keep ``image`` alive while it is used)."""
    h, w = image.shape[:2]
    return QImage(image.data, w, h, image.strides[0], QImage.Format.Format_BGR888)


def render_annotated(image: np.ndarray, faces: Sequence[FaceResult], selected_id: int | None,
                     style: AnnotationStyle | None = None) -> QImage:
    """The frame with its annotations at the frame's own resolution (for snapshots)."""
    img = np.ascontiguousarray(image)
    out = bgr_to_qimage(img).convertToFormat(QImage.Format.Format_RGB888)  # a deep copy
    h, w = img.shape[:2]
    base = style or AnnotationStyle()
    # text and lines proportional to the frame (readable on 4K frames, not huge on 320x240)
    k = max(1.0, math.hypot(w, h) / 900.0)
    s = AnnotationStyle(base.show_labels, base.show_keypoints, base.font_px * k, base.line_px * k)
    p = QPainter(out)
    try:
        draw_faces(p, faces, scale=1.0, offset=(0.0, 0.0), clip=QRectF(0, 0, w, h),
                   selected_id=selected_id, style=s)
    finally:
        p.end()
    return out
