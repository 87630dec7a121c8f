"""Workarounds for bugs in the libraries the GUI runs on.

PySide6 6.12.0 on CPython < 3.12 gets the reference count of two singletons wrong: every call of a Qt method
returning ``void`` (``QLabel.setText``, ``QWidget.update``...) and every Python override of a virtual method
(``paintEvent``...) drops one reference to ``None``, and every ``Signal.emit`` drops one to ``True``. A live
GUI makes hundreds of such calls per frame, so within seconds to minutes one of the counts reaches zero and
CPython aborts with "Fatal Python error: none_dealloc" (or "bool_dealloc"). PySide6 6.11.3 does not do this,
and from Python 3.12 on these objects are immortal, so the miscount is harmless there.

:func:`guard_singleton_refcounts` detects the miscount at start-up (a few probe calls) and, only when it is
present, adds a large constant to the reference counts of ``None``, ``True`` and ``False``. These are static
objects that CPython never frees, so a surplus costs nothing; 2**48 spare references last for centuries at the
GUI's rate of loss. The real fix is ``PySide6-Essentials != 6.12.0`` (or Python >= 3.12).
"""
from __future__ import annotations

import ctypes
import logging
import sys

log = logging.getLogger("app.compat")

SPARE_REFERENCES = 1 << 48
_result: dict[str, bool] | None = None


def _probe() -> dict[str, bool]:
    from PySide6.QtCore import QObject, QPointF, Signal

    class _Probe(QObject):
        ping = Signal()

    n = 64
    point = QPointF()
    before = sys.getrefcount(None)
    for _ in range(n):
        point.setX(1.0)
    none_lost = before - sys.getrefcount(None) >= n // 2
    probe = _Probe()
    before = sys.getrefcount(True)
    for _ in range(n):
        probe.ping.emit()
    true_lost = before - sys.getrefcount(True) >= n // 2
    return {"None": none_lost, "True": true_lost}


def _add_references(obj: object, count: int) -> bool:
    """Add ``count`` to ``obj``'s reference count (CPython release builds: ``ob_refcnt`` is the first field)."""
    before = sys.getrefcount(obj)
    cell = ctypes.c_ssize_t.from_address(id(obj))
    cell.value += count
    if sys.getrefcount(obj) - before < count // 2:  # not where we thought: undo
        cell.value -= count
        return False
    return True


def guard_singleton_refcounts() -> dict[str, bool]:
    """Detect PySide6's reference miscount and compensate (see the module docstring). Idempotent; returns
    which miscounts were found (``{"None": bool, "True": bool}``)."""
    global _result
    if _result is not None:
        return _result
    if sys.implementation.name != "cpython" or sys.version_info >= (3, 12) or hasattr(sys, "gettotalrefcount"):
        _result = {"None": False, "True": False}  # immortal singletons, or a debug build we do not patch
        return _result
    _result = found = _probe()
    if any(found.values()):
        import PySide6

        ok = all(_add_references(obj, SPARE_REFERENCES) for obj in (None, True, False))
        log.warning(
            "PySide6 %s on Python %d.%d drops references to None/True (a PySide6 bug); %s. Install "
            "'PySide6-Essentials!=6.12.0' or use Python >= 3.12 to avoid it.",
            PySide6.__version__, *sys.version_info[:2],
            "compensated" if ok else "could NOT compensate: the app will crash after a while",
        )
    return found
