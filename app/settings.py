"""Persistent settings (QSettings, organisation "fer-desktop").

``$FER_DESKTOP_SETTINGS`` names an INI file to use instead of the user's settings (tests, or a second
configuration); otherwise the platform's native store under "fer-desktop/fer-desktop" is used.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from PySide6.QtCore import QSettings, QStandardPaths

ORGANISATION = "fer-desktop"
APPLICATION = "fer-desktop"
ENV_VAR = "FER_DESKTOP_SETTINGS"
MAX_RECENT = 8


def open_settings() -> QSettings:
    path = os.environ.get(ENV_VAR)
    if path:
        return QSettings(path, QSettings.Format.IniFormat)
    return QSettings(QSettings.Format.NativeFormat, QSettings.Scope.UserScope, ORGANISATION, APPLICATION)


class Settings:
    """Typed access to the few values the app keeps between runs."""

    def __init__(self, qsettings: QSettings | None = None, readonly: bool = False):
        self.q = qsettings or open_settings()
        self.readonly = readonly  # reads only (screenshot mode): set() does nothing

    # -- typed helpers (QSettings returns strings from INI files)
    def get_str(self, key: str, default: str = "") -> str:
        v = self.q.value(key, default)
        return default if v is None else str(v)

    def get_float(self, key: str, default: float) -> float:
        try:
            return float(self.q.value(key, default))
        except (TypeError, ValueError):
            return default

    def get_int(self, key: str, default: int) -> int:
        try:
            return int(float(self.q.value(key, default)))
        except (TypeError, ValueError):
            return default

    def get_bool(self, key: str, default: bool) -> bool:
        v = self.q.value(key, default)
        if isinstance(v, str):
            return v.strip().lower() in ("1", "true", "yes", "on")
        return bool(v)

    def get_list(self, key: str) -> list[str]:
        v = self.q.value(key, [])
        if v is None or v == "":
            return []
        if isinstance(v, str):
            return [v]
        return [str(x) for x in v]

    def set(self, key: str, value: Any) -> None:
        if not self.readonly:
            self.q.setValue(key, value)

    def sync(self) -> None:
        if not self.readonly:
            self.q.sync()

    # -- recent checkpoints
    def recent_checkpoints(self) -> list[str]:
        return [p for p in self.get_list("model/recent") if p]

    def add_recent_checkpoint(self, path: str | Path) -> list[str]:
        path = str(Path(path).resolve())
        items = [path] + [p for p in self.recent_checkpoints() if p != path]
        items = items[:MAX_RECENT]
        self.set("model/recent", items)
        return items

    def remove_recent_checkpoint(self, path: str | Path) -> None:
        path = str(path)
        self.set("model/recent", [p for p in self.recent_checkpoints() if p != path])

    # -- folders
    def snapshot_dir(self) -> Path:
        saved = self.get_str("snapshot/dir")
        if saved:
            return Path(saved)
        return default_snapshot_dir()


def default_snapshot_dir() -> Path:
    """``~/Pictures/fer-desktop`` when the user has a Pictures folder, else the current folder."""
    pictures = QStandardPaths.writableLocation(QStandardPaths.StandardLocation.PicturesLocation)
    if pictures and Path(pictures).is_dir():
        return Path(pictures) / "fer-desktop"
    return Path.cwd()
