"""ferengine: the inference core of fer-desktop (no Qt, no training code)."""
from __future__ import annotations

__version__ = "0.1.0"
