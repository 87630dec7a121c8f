"""Model registry: ``@register_model`` fills a name -> builder table; ``create_model`` looks it up.

Every registered model is an ``nn.Module`` whose ``forward(x)`` takes a float tensor ``(N, C, H, W)``
prepared by :func:`ferengine.preprocess.to_model_input` and returns a dict:

- ``"logits"``: ``(N, num_classes)`` expression logits (when the model has an expression head);
- ``"va"``: ``(N, 2)`` valence, arousal in [-1, 1] (when the model has a valence/arousal head);
- any further keys (``"embedding"``, block features ...) are for training code and are ignored by
  inference.

A model also exposes ``heads`` (a tuple drawn from ``("expression", "valence_arousal")``) and
``default_input`` (a dict of :class:`ferengine.preprocess.InputSpec` fields it was designed for).
"""
from __future__ import annotations

import inspect
from typing import Callable

from torch import nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_DESCRIPTIONS: dict[str, str] = {}


class UnknownModelError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0])


def register_model(fn: Callable[..., nn.Module] | None = None, *, name: str | None = None):
    """Decorator registering a builder function under its own name (or ``name``)."""

    def wrap(f: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name or f.__name__
        if key in _MODELS and _MODELS[key] is not f:
            raise ValueError(f"model {key!r} is registered twice")
        _MODELS[key] = f
        _DESCRIPTIONS[key] = (inspect.getdoc(f) or "").split("\n")[0]
        return f

    return wrap(fn) if fn is not None else wrap


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
