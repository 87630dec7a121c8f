"""Architectures of every method, behind one registry (see :mod:`._registry` for the contract)."""
from __future__ import annotations

from ._registry import UnknownModelError, create_model, describe_model, list_models, register_model
from . import daf as _daf  # noqa: F401  (registers)
from . import fastcnn as _fastcnn  # noqa: F401  (registers)
from . import resnet as _resnet  # noqa: F401  (registers)

__all__ = ["create_model", "describe_model", "list_models", "register_model", "UnknownModelError"]
