"""Architectures of every method, behind one registry (see :mod:`._registry` for the contract)."""
from __future__ import annotations

from ._registry import (ModelCfg, UnknownModelError, create_model, describe_model, list_models, model_cfg,
                        register_model, unregister_model)
from . import avce as _avce  # noqa: F401  (registers)
from . import clcl as _clcl  # noqa: F401  (registers)
from . import daf as _daf  # noqa: F401  (registers)
from . import esr as _esr  # noqa: F401  (registers)
from . import fastcnn as _fastcnn  # noqa: F401  (registers)
from . import manet as _manet  # noqa: F401  (registers)
from . import resnet as _resnet  # noqa: F401  (registers)

__all__ = ["ModelCfg", "create_model", "describe_model", "list_models", "model_cfg", "register_model",
           "unregister_model", "UnknownModelError"]
