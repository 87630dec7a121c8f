"""The one validation layer for user-given numbers and names: each check is written once, raises
:class:`InvalidValue` with one message, and is used both by the library (``Pipeline(min_confidence=...)``)
and, through :func:`argtype`, by every command line (``fer``, ``fer-desktop``, the trainers), so a bad
option fails in argparse, before any work, with the same words the library would use.

    p.add_argument("--min-confidence", type=argtype(check_min_confidence), default=0.5)

A check takes the value (a string from argparse or a number from code) and returns it converted; the
``name`` in its message is the library's parameter name, or the option name when argparse calls it.
"""
from __future__ import annotations

import argparse
import math
from typing import Any, Callable

from .errors import InvalidValue

__all__ = ["InvalidValue", "argtype", "check_fraction", "check_int", "check_float", "check_min_confidence",
           "check_max_faces", "check_smoothing", "check_device_name", "check_size"]


def _number(value: Any, name: str, kind: type) -> Any:
    if isinstance(value, bool):
        raise InvalidValue(f"{name} must be a number, got {value!r}")
    try:
        x = kind(value) if kind is float else _as_int(value)
    except (TypeError, ValueError):
        raise InvalidValue(f"{name} must be {'a number' if kind is float else 'an integer'}, got {value!r}") from None
    if kind is float and not math.isfinite(x):
        raise InvalidValue(f"{name} must be a finite number, got {value!r}")
    return x


def _as_int(value: Any) -> int:
    if isinstance(value, str):
        return int(value.strip())
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(value)
        return int(value)
    return int(value)


def check_float(value: Any, name: str = "value", *, lo: float | None = None, hi: float | None = None,
                lo_open: bool = False, hi_open: bool = False, hint: str = "") -> float:
    """A finite float in the given range (bounds closed unless ``*_open``)."""
    x = _number(value, name, float)
    bad = (lo is not None and (x < lo or (lo_open and x == lo))) or \
          (hi is not None and (x > hi or (hi_open and x == hi)))
    if bad:
        raise InvalidValue(f"{name} must be {_range(lo, hi, lo_open, hi_open)}{hint}, got {value!r}")
    return x


def check_int(value: Any, name: str = "value", *, lo: int | None = None, hi: int | None = None,
              hint: str = "") -> int:
    """An integer in ``[lo, hi]``."""
    x = _number(value, name, int)
    if (lo is not None and x < lo) or (hi is not None and x > hi):
        raise InvalidValue(f"{name} must be an integer {_range(lo, hi, False, False, integer=True)}{hint}, "
                           f"got {value!r}")
    return x


def check_fraction(value: Any, name: str = "value") -> float:
    """A float in ``[0, 1]``."""
    return check_float(value, name, lo=0.0, hi=1.0)


def _range(lo, hi, lo_open, hi_open, integer: bool = False) -> str:
    if lo is not None and hi is not None:
        if integer:
            return f"from {lo} to {hi}"
        return f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo:g}"
    if hi is not None:
        return f"{'<' if hi_open else '<='} {hi:g}"
    return "a finite number"


# ------------------------------------------------------------------ the library's checks, by parameter

def check_min_confidence(value: Any, name: str = "min_confidence") -> float:
    """Face detection threshold: in (0, 1] (0 would accept anything the detector proposes)."""
    return check_float(value, name, lo=0.0, hi=1.0, lo_open=True)


def check_max_faces(value: Any, name: str = "max_faces") -> int:
    return check_int(value, name, lo=0, hint=" (0 = unlimited)")


def check_smoothing(value: Any, name: str = "smoothing") -> float:
    return check_float(value, name, lo=0.0, hi=1.0, hi_open=True, hint=" (0 = off)")


DEVICE_HINT = "use 'auto', 'cpu', 'cuda' or 'cuda:N'"


def check_device_name(value: Any, name: str = "device") -> str:
    """The syntax of a device name (``auto | cpu | cuda | cuda:N | gpu``); whether the device is there is
    :func:`ferengine.device.resolve_device`'s question, asked when the work starts."""
    d = str(value).strip().lower()
    if d in ("", "auto", "cpu", "cuda", "gpu"):
        return d or "auto"
    head, _, idx = d.partition(":")
    if head == "cuda" and idx.isdigit():
        return d
    raise InvalidValue(f"{name} {value!r} is not a device: {DEVICE_HINT}")


def check_size(value: Any, name: str = "size", *, lo: int = 1, hi: int = 16384) -> tuple[int, int]:
    """``WxH`` (e.g. ``1400x860``), each side in ``[lo, hi]``."""
    text = str(value).strip().lower()
    w, sep, h = text.partition("x")
    try:
        if not sep:
            raise ValueError
        size = (int(w), int(h))
    except ValueError:
        raise InvalidValue(f"{name} must be WIDTHxHEIGHT in pixels (e.g. 1400x860), got {value!r}") from None
    if not all(lo <= s <= hi for s in size):
        raise InvalidValue(f"{name} must be WIDTHxHEIGHT with each side from {lo} to {hi} pixels, got {value!r}")
    return size


# ------------------------------------------------------------------ argparse

def argtype(check: Callable[..., Any], **kwargs: Any) -> Callable[[str], Any]:
    """An argparse ``type=`` from a check: argparse prints the check's message (``error: argument
    --min-confidence: min_confidence must be in (0, 1], got '2'``) and exits with status 2."""

    def convert(text: str) -> Any:
        try:
            return check(text, **kwargs)
        except InvalidValue as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = getattr(check, "__name__", "value").removeprefix("check_")
    return convert
