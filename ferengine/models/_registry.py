"""Model registry: ``@register_model`` fills a name -> builder table; ``create_model`` looks it up.

The contract every registered model keeps (``tests/test_models.py`` checks it for each, reading the
registry entry's :class:`ModelCfg`):

- ``forward(x)``: a float tensor ``(N, C, H, W)`` prepared by :func:`ferengine.preprocess.to_model_input`
  -> a dict: ``"logits"`` ``(N, num_classes)`` (expression head) and/or ``"probs"`` (a model that combines
  several heads itself, e.g. an ensemble's vote: class probabilities, used instead of softmax(logits) by
  inference), ``"va"`` ``(N, 2)`` valence, arousal in [-1, 1] (valence/arousal head); further keys
  (``"embedding"`` ...) are for training code and ignored by inference;
- ``forward_features(x)`` -> the named intermediate features (``ModelCfg.features``: blocks, and attention
  maps where the model has them), ``forward_head(features)`` -> the outputs; ``forward`` is the two in a row,
  so a training loss can read block features and outputs from ONE pass;
- ``heads`` (drawn from ``("expression", "valence_arousal")``) and ``default_input`` (the
  :class:`ferengine.preprocess.InputSpec` fields it was designed for), as the registry entry declares;
- in eval mode one face's outputs do not depend on the other faces of the batch, and the module holds only
  what inference runs (no projection heads, clustering, momentum copies; dropout off in eval).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from ..errors import UnknownModelError

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_DESCRIPTIONS: dict[str, str] = {}
_CFGS: dict[str, "ModelCfg"] = {}


@dataclass(frozen=True)
class ModelCfg:
    """What a registered model declares (timm's ``default_cfg``), read by the every-model tests.

    ``heads``: the heads of ``create_model(name)``; ``input``: its ``default_input`` (size, channels);
    ``features``: the names ``forward_features`` returns; ``head_kwargs``: the builder takes ``num_classes``
    and ``av_head`` (False for a model with fixed heads, e.g. valence/arousal only); ``av_only``: with
    ``head_kwargs``, ``num_classes=0, av_head=True`` builds a valence/arousal-only model (False for an ensemble
    whose AV is read from its class scores, ESR's); ``test_kwargs``:
    constructor arguments for a small, fast instance in the tests.
    """

    heads: tuple[str, ...] = ("expression",)
    input: dict[str, Any] = field(default_factory=lambda: {"size": 48, "channels": 1})
    features: tuple[str, ...] = ()
    head_kwargs: bool = True
    av_only: bool = True
    test_kwargs: dict[str, Any] = field(default_factory=dict)


def register_model(fn: Callable[..., nn.Module] | None = None, *, name: str | None = None,
                   cfg: ModelCfg | None = None):
    """Decorator registering a builder function under its own name (or ``name``) with its :class:`ModelCfg`."""

    def wrap(f: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name or f.__name__
        if key in _MODELS and _MODELS[key] is not f:
            raise ValueError(f"model {key!r} is registered twice")
        _MODELS[key] = f
        _DESCRIPTIONS[key] = (inspect.getdoc(f) or "").split("\n")[0]
        _CFGS[key] = cfg or ModelCfg()
        return f

    return wrap(fn) if fn is not None else wrap


def unregister_model(name: str) -> None:
    """Remove a registration (tests and plugins that register temporary models)."""
    _MODELS.pop(name, None)
    _DESCRIPTIONS.pop(name, None)
    _CFGS.pop(name, None)


def model_cfg(name: str) -> ModelCfg:
    """The registry entry's declarations for architecture ``name``."""
    _lookup(name)
    return _CFGS[name]


def list_models() -> list[str]:
    """Names of all registered architectures, sorted."""
    return sorted(_MODELS)


def describe_model(name: str) -> str:
    _lookup(name)
    return _DESCRIPTIONS[name]


def _lookup(name: str) -> Callable[..., nn.Module]:
    try:
        return _MODELS[name]
    except KeyError:
        raise UnknownModelError(
            f"unknown architecture {name!r}; registered: {', '.join(list_models())}"
        ) from None


def create_model(name: str, **kwargs) -> nn.Module:
    """Build architecture ``name`` with constructor arguments ``kwargs`` (randomly initialised)."""
    builder = _lookup(name)
    try:
        return builder(**kwargs)
    except TypeError as exc:
        sig = inspect.signature(builder)
        raise TypeError(f"bad arguments for architecture {name!r} {sig}: {exc}") from exc
