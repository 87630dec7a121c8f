"""In-window messages: a coloured bar above the video, and the centred page shown when there is no source."""
from __future__ import annotations

from typing import Callable

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QPixmap
from PySide6.QtWidgets import QFrame, QHBoxLayout, QLabel, QPushButton, QSizePolicy, QVBoxLayout, QWidget

LEVELS = {  # background, border, text
    "info": ("#e8f1fb", "#9cc0e6", "#17324d"),
    "warning": ("#fff4d6", "#e5c16b", "#4a3700"),
    "error": ("#fde6e4", "#e39a92", "#5c1710"),
}


class MessageBar(QFrame):
    """One line of status with optional action buttons; hidden while it has no text."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.setObjectName("MessageBar")
        self.label = QLabel(self)
        self.label.setWordWrap(True)
        self.label.setTextFormat(Qt.TextFormat.RichText)
        self.label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.label.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Preferred)
        self._buttons: list[QPushButton] = []
        self._lay = QHBoxLayout(self)
        self._lay.setContentsMargins(10, 5, 6, 5)
        self._lay.setSpacing(6)
        self._lay.addWidget(self.label, 1)
        self.level = "info"
        self.hide()

    @property
    def text(self) -> str:
        return self.label.text() if self.isVisibleTo(self.parentWidget()) else ""

    def show_message(self, html: str, level: str = "info",
                     actions: list[tuple[str, Callable[[], None]]] | None = None) -> None:
        bg, border, fg = LEVELS.get(level, LEVELS["info"])
        self.level = level
        self.setStyleSheet(f"#MessageBar {{ background: {bg}; border: 1px solid {border}; border-radius: 4px; }}"
                           f" #MessageBar QLabel {{ color: {fg}; }}")
        self.label.setText(html)
        for b in self._buttons:
            b.deleteLater()
        self._buttons = []
        for text, slot in actions or []:
            b = QPushButton(text, self)
            b.setCursor(Qt.CursorShape.PointingHandCursor)
            b.clicked.connect(slot)
            self._lay.addWidget(b, 0, Qt.AlignmentFlag.AlignVCenter)
            self._buttons.append(b)
        self.show()

    def clear(self) -> None:
        self.label.setText("")
        self.hide()

    @property
    def buttons(self) -> list[QPushButton]:
        return list(self._buttons)


class NoSourcePage(QWidget):
    """Shown instead of the video when no source is open: what happened, and what to do."""

    openVideo = Signal()
    openFolder = Signal()
    retry = Signal()

    def __init__(self, icon: QPixmap | None = None, parent: QWidget | None = None):
        super().__init__(parent)
        self.setAutoFillBackground(True)
        lay = QVBoxLayout(self)
        lay.addStretch(3)
        if icon is not None:
            pic = QLabel(self)
            pic.setPixmap(icon)
            pic.setAlignment(Qt.AlignmentFlag.AlignCenter)
            lay.addWidget(pic)
        self.title = QLabel("No video source", self)
        f = self.title.font()
        f.setPointSizeF(f.pointSizeF() * 1.6)
        f.setBold(True)
        self.title.setFont(f)
        self.title.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.detail = QLabel(self)
        self.detail.setWordWrap(True)
        self.detail.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.detail.setTextFormat(Qt.TextFormat.RichText)
        self.detail.setMaximumWidth(560)
        self.detail.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        lay.addWidget(self.title)
        row_detail = QHBoxLayout()
        row_detail.addStretch(1)
        row_detail.addWidget(self.detail, 4)
        row_detail.addStretch(1)
        lay.addLayout(row_detail)
        lay.addSpacing(12)
        row = QHBoxLayout()
        row.addStretch(1)
        self.open_video = QPushButton("Open video…", self)
        self.open_video.setDefault(True)
        self.open_folder = QPushButton("Open image folder…", self)
        self.retry_button = QPushButton("Try again", self)
        for b in (self.open_video, self.open_folder, self.retry_button):
            b.setMinimumHeight(32)
            b.setMinimumWidth(150)
            b.setCursor(Qt.CursorShape.PointingHandCursor)
            row.addWidget(b)
        row.addStretch(1)
        lay.addLayout(row)
        lay.addStretch(4)
        self.open_video.clicked.connect(self.openVideo)
        self.open_folder.clicked.connect(self.openFolder)
        self.retry_button.clicked.connect(self.retry)

    def set_message(self, title: str, detail_html: str, retry_text: str | None = None) -> None:
        self.title.setText(title)
        self.detail.setText(detail_html)
        self.retry_button.setVisible(bool(retry_text))
        if retry_text:
            self.retry_button.setText(retry_text)
