"""fer-desktop's Qt GUI (PySide6 + pyqtgraph) on top of :mod:`ferengine`; launched by ``fer-desktop``.

``state`` holds what is shown (no Qt), ``worker`` runs capture + inference on a QThread, ``window`` and
``widgets`` draw. Nothing here holds model logic: that is ferengine's.
"""
from __future__ import annotations

try:
    from importlib.metadata import PackageNotFoundError, version

    __version__ = version("fer-desktop")
except Exception:  # noqa: BLE001 - running from a source tree that is not installed
    __version__ = "0+unknown"
