"""The application icon, drawn with QPainter (no image files to ship or to lose in a wheel install):
a face with a detection box's corner marks on a blue tile, and small glyphs for the toolbar."""
from __future__ import annotations

from PySide6.QtCore import QPointF, QRectF, Qt
from PySide6.QtGui import QBrush, QColor, QIcon, QLinearGradient, QPainter, QPainterPath, QPen, QPixmap


def _tile(size: int) -> QPixmap:
    pm = QPixmap(size, size)
    pm.fill(Qt.GlobalColor.transparent)
    s = float(size)
    p = QPainter(pm)
    p.setRenderHint(QPainter.RenderHint.Antialiasing, True)
    grad = QLinearGradient(0, 0, s, s)
    grad.setColorAt(0.0, QColor("#2b6cb0"))
    grad.setColorAt(1.0, QColor("#1a365d"))
    p.setPen(Qt.PenStyle.NoPen)
    p.setBrush(QBrush(grad))
    p.drawRoundedRect(QRectF(0.04 * s, 0.04 * s, 0.92 * s, 0.92 * s), 0.2 * s, 0.2 * s)
    # detection-box corners
    p.setPen(QPen(QColor("#f6ad55"), max(1.0, 0.055 * s), Qt.PenStyle.SolidLine, Qt.PenCapStyle.RoundCap))
    a, b, n = 0.2 * s, 0.8 * s, 0.16 * s
    for cx, cy, dx, dy in ((a, a, 1, 1), (b, a, -1, 1), (a, b, 1, -1), (b, b, -1, -1)):
        p.drawLine(QPointF(cx, cy), QPointF(cx + dx * n, cy))
        p.drawLine(QPointF(cx, cy), QPointF(cx, cy + dy * n))
    # face
    p.setPen(QPen(QColor("white"), max(1.0, 0.05 * s)))
    p.setBrush(Qt.BrushStyle.NoBrush)
    p.drawEllipse(QPointF(0.5 * s, 0.5 * s), 0.22 * s, 0.22 * s)
    p.setPen(Qt.PenStyle.NoPen)
    p.setBrush(QColor("white"))
    for ex in (0.42, 0.58):
        p.drawEllipse(QPointF(ex * s, 0.45 * s), 0.03 * s, 0.03 * s)
    smile = QPainterPath()
    smile.moveTo(0.4 * s, 0.55 * s)
    smile.quadTo(0.5 * s, 0.66 * s, 0.6 * s, 0.55 * s)
    p.setPen(QPen(QColor("white"), max(1.0, 0.045 * s), Qt.PenStyle.SolidLine, Qt.PenCapStyle.RoundCap))
    p.drawPath(smile)
    p.end()
    return pm


def app_icon() -> QIcon:
    icon = QIcon()
    for size in (16, 24, 32, 48, 64, 128, 256):
        icon.addPixmap(_tile(size))
    return icon


def app_pixmap(size: int = 96) -> QPixmap:
    return _tile(size)


def record_icon(size: int = 32) -> QIcon:
    """A red dot (record) / grey dot when off."""
    icon = QIcon()
    for on, mode_state in ((False, QIcon.State.Off), (True, QIcon.State.On)):
        pm = QPixmap(size, size)
        pm.fill(Qt.GlobalColor.transparent)
        p = QPainter(pm)
        p.setRenderHint(QPainter.RenderHint.Antialiasing, True)
        p.setPen(QPen(QColor("#7a1010" if on else "#555555"), 1.5))
        p.setBrush(QColor("#e53e3e" if on else "#c53030"))
        r = size * 0.32
        p.drawEllipse(QPointF(size / 2, size / 2), r, r)
        if on:  # a square "stop" mark inside while recording
            p.setPen(Qt.PenStyle.NoPen)
            p.setBrush(QColor("white"))
            q = size * 0.12
            p.drawRect(QRectF(size / 2 - q, size / 2 - q, 2 * q, 2 * q))
        p.end()
        icon.addPixmap(pm, QIcon.Mode.Normal, mode_state)
    return icon


def camera_icon(size: int = 32) -> QIcon:
    """A simple camera glyph (snapshot)."""
    pm = QPixmap(size, size)
    pm.fill(Qt.GlobalColor.transparent)
    s = float(size)
    p = QPainter(pm)
    p.setRenderHint(QPainter.RenderHint.Antialiasing, True)
    p.setPen(QPen(QColor("#2d3748"), max(1.0, s * 0.07)))
    p.setBrush(QColor("#e2e8f0"))
    p.drawRoundedRect(QRectF(0.1 * s, 0.3 * s, 0.8 * s, 0.52 * s), 0.08 * s, 0.08 * s)
    p.drawRect(QRectF(0.36 * s, 0.2 * s, 0.28 * s, 0.1 * s))
    p.setBrush(QColor("#4a5568"))
    p.drawEllipse(QPointF(0.5 * s, 0.56 * s), 0.15 * s, 0.15 * s)
    p.end()
    return QIcon(pm)
