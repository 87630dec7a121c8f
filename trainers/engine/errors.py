"""The engine's error: a run cannot start or continue; the message says what to do."""
from __future__ import annotations

__all__ = ["TrainError"]


class TrainError(RuntimeError):
    """A training run cannot start or continue; the message says what to do."""
