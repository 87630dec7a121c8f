"""The method zoo: one file per method in this folder, each registering itself with
:func:`register_method`. ``python -m trainers.<name>`` runs a method, ``python -m trainers --list`` lists
them, and ``tests/test_methods.py`` tests every registered method end to end.

A method file needs nothing else: no engine edit, no entry in any list (this package finds its modules),
no ``__main__`` block (``trainers/__init__.py`` maps ``python -m trainers.<name>`` to it).
"""
from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import Sequence

from ..engine.config import config_fields
from ..engine.config import TrainConfig
from ..engine.method import Method

__all__ = ["register_method", "list_methods", "get_method", "run"]

_METHODS: dict[str, type[Method]] = {}
# names of the package's real modules and folders (they would shadow a method's `python -m trainers.<name>`)
_RESERVED = {p.stem for p in Path(__file__).resolve().parents[1].iterdir() if p.suffix == ".py" or p.is_dir()}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: check a method's declarations and add it to the registry under ``cls.name``."""
    name = cls.name
    if not name or not name.isidentifier() or name in _RESERVED:
        raise ValueError(f"method {cls.__qualname__}: name {name!r} must be an identifier and not one of {_RESERVED}")
    import dataclasses

    if not dataclasses.is_dataclass(cls.Config):
        raise TypeError(f"method {name}: Config must be a dataclass")
    engine, mine = config_fields(TrainConfig), config_fields(cls.Config)
    clash = sorted(set(engine) & set(mine))
    if clash:
        raise TypeError(f"method {name}: Config fields {clash} shadow engine settings")
    bad = sorted(set(cls.defaults) - set(engine) - set(mine))
    if bad:
        raise TypeError(f"method {name}: defaults for unknown settings {bad}")
    for data, row in cls.table.items():
        bad = sorted(set(row) - set(engine) - set(mine))
        if bad:
            raise TypeError(f"method {name}: table row {data!r} has unknown settings {bad}")
    if cls.__module__ == "__main__":  # a file run directly: let it run without claiming the name
        return cls
    old = _METHODS.get(name)
    if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"method {name!r} is registered twice ({old.__module__} and {cls.__module__})")
    _METHODS[name] = cls
    return cls


def _discover() -> None:
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


def list_methods() -> list[str]:
    """Names of every registered method, sorted."""
    _discover()
    return sorted(_METHODS)


def get_method(name: str) -> type[Method]:
    if name not in _METHODS:
        _discover()
    try:
        return _METHODS[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; registered: {', '.join(sorted(_METHODS))}") from None


def run(name: str, argv: Sequence[str] | None = None, **kwargs) -> int:
    """``python -m trainers.<name> ARGS``."""
    from ..engine.main import main

    return main(get_method(name), argv, **kwargs)
