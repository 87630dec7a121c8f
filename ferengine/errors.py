"""Every error ferengine raises on purpose, in one module that imports nothing of the package.

Each is a :class:`FerError` (so an entry point can have one error boundary) and keeps the built-in base
it has always had (``ValueError``, ``RuntimeError``, ``KeyError``) for callers that catch those. The
message always says what is wrong and what to do.
"""
from __future__ import annotations

__all__ = ["FerError", "CheckpointError", "BackendUnavailable", "DeviceError", "ExportError",
           "DetectorUnavailable", "SourceError", "EndOfStream", "UnknownModelError", "InvalidValue",
           "OutputError"]


class FerError(Exception):
    """Base of ferengine's user-facing errors."""


class CheckpointError(FerError, ValueError):
    """A checkpoint file cannot be used; the message says which file and why."""


class BackendUnavailable(FerError, RuntimeError):
    """A backend cannot run here; the message says why and what to install or change."""


class DeviceError(BackendUnavailable, ValueError):
    """A device name is malformed (``ValueError``) or names a device that is not there
    (``BackendUnavailable``: a CUDA device asked for on a machine without one)."""


class ExportError(FerError, RuntimeError):
    """A model could not be exported (or the export is wrong); the message says which and why."""


class DetectorUnavailable(FerError, RuntimeError):
    """The face detector cannot run here (MediaPipe missing); the message says what to install."""


class SourceError(FerError, RuntimeError):
    """A source cannot be opened or cannot deliver frames; the message says which and why."""


class EndOfStream(SourceError):
    """The source has no more frames (the normal end of a file or folder)."""


class UnknownModelError(FerError, KeyError):
    """An architecture name that is not registered."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0])


class InvalidValue(FerError, ValueError):
    """A user-given number or name out of its range (``ferengine.validate``: the library and every command
    line use the same checks and messages)."""


class OutputError(FerError, OSError):
    """An output file cannot be written (folder missing or read-only, a folder given as the file, disk
    full ...); the message names the output as the user gave it, never a hidden temp file
    (``ferengine.fileio``)."""
