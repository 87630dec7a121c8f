"""Run configuration: the engine's :class:`TrainConfig`, the typed ``Config`` of each method, and the command
line generated from both.

Every setting is declared once, as a dataclass field made with :func:`opt` (default, help, flag details).
:func:`build_parser` turns the fields into flags; :func:`resolve_config` combines, lowest first:

1. the field defaults (engine: :class:`TrainConfig`; method: its ``Config``),
2. the method's ``defaults`` (engine settings the method trains with, e.g. Adam for DAF-CNN),
3. the method's ``table`` row for the dataset (the paper's per-dataset settings),
4. the flags given on the command line -- they always win; ``--data-opt`` options are added to the row's
   reader options (a key given replaces the row's value for that key).

With ``--resume`` the run's saved configuration replaces 1-3. The flags' defaults are suppressed in
argparse, so "given" means typed by the user, not "differs from the default".
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import typing
from dataclasses import MISSING, dataclass, field
from typing import Any, Callable, Literal, Sequence

from ferengine.validate import check_device_name

log = logging.getLogger("trainers.engine")

__all__ = ["TrainConfig", "NoOptions", "opt", "json_object", "duration", "config_fields", "flag_specs",
           "add_flags", "RESUME_FREE", "field_check", "validate_values"]


_UNSET: Any = object()


def opt(default: Any = MISSING, *, help: str, factory: Callable[[], Any] | None = None, flag: str | None = None,
        choices: Sequence[Any] | None = None, metavar: str | None = None, type: Callable[[str], Any] | None = None,
        nargs: Any = None, action: Any = None, group: str | None = None, cli: bool = True,
        check: Callable[..., Any] | None = None, lo: float | None = _UNSET, hi: float | None = None,
        lo_open: bool = False, hi_open: bool = False) -> Any:
    """A config field with its command-line flag: ``margin: float = opt(11.0, help="TC margin m")``.

    ``flag`` (default ``--field-name``), ``choices`` (default: a ``Literal`` annotation's values), ``type``,
    ``nargs``, ``action``, ``metavar`` go to argparse; ``group`` names the help section; ``cli=False`` keeps
    the field off the command line.

    Validation (:func:`field_check`, applied by argparse -- a bad flag is a usage error with
    ``ferengine.validate``'s message -- and again to the resolved configuration, e.g. a saved run's): an
    ``int`` or ``float`` field (or a tuple of them, per element) must be finite and within ``[lo, hi]``;
    ``lo`` defaults to 0 (numbers of a training run are counts, rates and weights), ``lo=None`` means no
    lower bound, ``lo_open``/``hi_open`` exclude the bound. ``check(value, name)`` replaces that rule
    (e.g. ``ferengine.validate.check_device_name``).
    """
    meta = {"help": help, "flag": flag, "choices": choices, "metavar": metavar, "type": type, "nargs": nargs,
            "action": action, "group": group, "cli": cli, "check": check, "lo": lo, "hi": hi,
            "lo_open": lo_open, "hi_open": hi_open}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def _number_kind(t: Any) -> type | None:
    """int / float for a number annotation (also inside ``X | None`` and ``tuple[X, ...]``), else None."""
    t = _unwrap_optional(t)
    if typing.get_origin(t) is tuple:
        args = [a for a in typing.get_args(t) if a is not Ellipsis]
        t = args[0] if args and all(a is args[0] for a in args) else None
    if t is bool:
        return None
    return t if t in (int, float) else None


def field_check(cls: type, name: str) -> Callable[..., Any] | None:
    """The check of one config field (see :func:`opt`): ``check(value, name) -> value``, or None."""
    from ferengine.validate import check_float, check_int

    f = config_fields(cls)[name]
    meta = f.metadata
    if meta.get("check") is not None:
        return meta["check"]
    kind = _number_kind(_hints(cls)[name])
    if kind is None:
        return None
    lo = meta.get("lo", _UNSET)
    lo = 0 if lo is _UNSET else lo
    hi = meta.get("hi")
    if kind is int:
        ilo = None if lo is None else int(lo) + (1 if meta.get("lo_open") else 0)
        ihi = None if hi is None else int(hi) - (1 if meta.get("hi_open") else 0)

        def check_field(v: Any, name: str = name) -> Any:
            return check_int(v, name, lo=ilo, hi=ihi)
    else:
        def check_field(v: Any, name: str = name) -> Any:
            return check_float(v, name, lo=lo, hi=hi, lo_open=bool(meta.get("lo_open")),
                               hi_open=bool(meta.get("hi_open")))
    return check_field


def flag_name(cls: type, name: str) -> str:
    f = config_fields(cls)[name]
    return f.metadata.get("flag") or "--" + name.replace("_", "-")


def validate_values(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` (field -> value) checked field by field (:func:`field_check`); the converted values.
    Raises ``ferengine.errors.InvalidValue`` naming the flag."""
    out = dict(values)
    fields = config_fields(cls)
    for k, v in values.items():
        if k not in fields or v is None:
            continue
        check = field_check(cls, k)
        if check is None:
            continue
        name = flag_name(cls, k)
        if isinstance(v, (list, tuple)):
            out[k] = type(v)(check(x, name=name) for x in v)
        else:
            out[k] = check(v, name=name)
    return out


def json_object(text: str) -> dict[str, Any]:
    """argparse type for a JSON object flag such as ``--arch-kwargs '{"width": 0.5}'``."""
    try:
        d = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"expected a JSON object: {exc}") from None
    if not isinstance(d, dict):
        raise argparse.ArgumentTypeError("expected a JSON object, e.g. '{\"width\": 0.5}'")
    return d


_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}


def duration(text: str) -> float:
    """argparse type for a wall-clock duration: ``600``, ``90s``, ``45m``, ``1.5h`` -> seconds."""
    t = text.strip().lower()
    num = t.rstrip("abcdefghijklmnopqrstuvwxyz")
    try:
        value = float(num) * _UNITS[t[len(num):]]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"expected a duration such as 600, 90s, 45m or 2h, got {text!r}") from None
    if value < 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"a duration must be a finite number >= 0, got {text!r}")
    return value


def _kv(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    k, v = text.split("=", 1)
    try:
        val = json.loads(v)
    except json.JSONDecodeError:
        val = v
    return k.strip().replace("-", "_"), val


class KeyValue(argparse.Action):
    """``--data-opt KEY=VALUE`` (repeatable) into one dict."""

    def __call__(self, parser, namespace, values, option_string=None):
        d = dict(getattr(namespace, self.dest, None) or {})
        k, v = _kv(values)
        d[k] = v
        setattr(namespace, self.dest, d)


# =========================================================================================== TrainConfig

D, O, R = "data", "optimisation", "run"


@dataclass
class TrainConfig:
    """Everything the engine's part of a run depends on (the method's own settings are in ``extra``).
    Saved as ``args.json`` and in ``state.pt``. ``None`` defaults are resolved at run time."""

    # data
    data: str = opt("fer2013", group=D, help="dataset name (fer2013, ferplus, rafdb, affectnet, sfew, afew-va, "
                                                "affwild2, folder)")
    data_dir: str | None = opt(None, group=D, help="folder holding the dataset ($FER_DATA_DIR, else ./data)")
    data_opts: dict[str, Any] = opt(factory=dict, group=D, flag="--data-opt", action=KeyValue, metavar="KEY=VALUE",
                                    help="reader option, repeatable (e.g. mode=distribution for ferplus)")
    train_split: str | None = opt(None, group=D, help="training split (default: the dataset's)")
    val_split: str | None = opt(None, group=D, help="validation split selecting the best checkpoint (default: "
                                "publictest for fer2013, else the dataset's validation split; 'none' = no evaluation)")
    drop_copies_of: tuple[str, ...] = opt((), group=D, metavar="SPLIT",
                                          help="remove from the training data every image bit-identical to one of "
                                               "these splits, e.g. --drop-copies-of publictest privatetest "
                                               "(FER2013's test splits hold copies of Training images)")
    limit_train: int = opt(0, group=D, metavar="N", help="train on a seeded random subset of N images (smoke runs)")
    limit_val: int = opt(0, group=D, metavar="N", help="evaluate on N images")
    input_size: int | None = opt(None, lo=8, hi=4096, group=D, help="model input side (default: the model's)")
    channels: int | None = opt(None, group=D, choices=(1, 3), help="1 grey / 3 RGB (default: the dataset's)")
    crop_margin: float | None = opt(None, lo=None, group=D, help="face crop margin stored in the checkpoint's input spec "
                                    "(none given: the dataset's measured calibration, else InputSpec's 0.25)")
    crop_offset_y: float | None = opt(None, lo=None, group=D, help="face crop centre shift (fraction of the box, + = down) "
                                      "stored in the input spec (none given: as --crop-margin)")
    crop_calibration: str | None = opt(None, group=D, metavar="FILE",
                                       help="calibration.json of python -m trainers.calibrate: its crop goes into "
                                            "the checkpoints (FER2013/FER+ have a measured one built in)")
    augment: str = opt("standard", group=D, help="augmentation preset (trainers.augment.AUGMENT_PRESETS)")
    aug: dict[str, Any] = opt(factory=dict, group=D, action=KeyValue, metavar="KEY=VALUE",
                              help="augmentation override, repeatable (translate, hflip, rotate, rotate_p, scale, "
                                   "affine_translate, affine_p, fivecrop, brightness, contrast, saturation, hue, "
                                   "jitter_p, grey_p, blur_p, blur_sigma, blur_kernel, erase, erase_area, erase_ratio, "
                                   "erase_value, padding; see trainers.augment.AugmentConfig), e.g. --aug rotate=30 "
                                   "--aug blur_sigma=[0.1,2]")
    workers: int = opt(min(4, os.cpu_count() or 1), group=D,
                       help="DataLoader workers (on-disk datasets; in-memory ones need none)")
    # optimisation
    epochs: int = opt(30, lo=1, group=O, help="epochs (a staged method: the sum of its stages)")
    time_budget: float = opt(0.0, group=O, type=duration, metavar="TIME",
                             help="wall-clock budget for this invocation's epochs (e.g. 600, 45m, 2h): after each "
                                  "epoch the run is shortened to the epochs that fit (never beyond --epochs; the "
                                  "stages of a staged method shrink in proportion), and cosine schedules are "
                                  "re-timed to end there; 0: off")
    batch_size: int = opt(128, lo=1, group=O, help="batch size (with torchrun: the global batch, split over the processes)")
    eval_batch_size: int = opt(0, group=O, help="0: 2 x batch size")
    optimizer: Literal["sgd", "adam", "adamw"] = opt("sgd", group=O, help="optimiser")
    lr: float = opt(0.01, group=O, help="learning rate (0: the weights stay as they are, e.g. to evaluate an --init)")
    momentum: float = opt(0.9, hi=1, group=O, help="SGD momentum")
    nesterov: bool = opt(False, group=O, help="SGD with Nesterov momentum")
    betas: tuple[float, float] = opt((0.9, 0.999), hi=1, hi_open=True, group=O, help="Adam betas")
    weight_decay: float = opt(0.0, group=O, help="weight decay")
    label_smoothing: float = opt(0.0, hi=1, hi_open=True, group=O, help="label smoothing of the cross-entropy")
    grad_clip: float = opt(0.0, group=O, help="max gradient norm per optimiser (0: off)")
    scheduler: Literal["none", "cosine", "step", "multistep", "exponential", "plateau"] = opt(
        "none", group=O, help="learning-rate schedule")
    schedule_interval: Literal["epoch", "step"] = opt(
        "epoch", group=O, help="step/multistep/exponential: count --step-size and --milestones in epochs or in "
                               "optimiser steps (cosine is always per step)")
    warmup_epochs: float = opt(0.0, group=O, help="linear warm-up (epochs, fractions allowed) before any schedule")
    step_size: int = opt(30, lo=1, group=O, help="step: epochs (or steps) between lr drops")
    milestones: tuple[int, ...] = opt((), group=O, help="multistep: epochs (or steps) of the lr drops")
    gamma: float = opt(0.1, lo=0, lo_open=True, group=O, help="step/multistep/exponential lr factor")
    min_lr: float = opt(0.0, group=O, help="cosine floor / plateau minimum")
    plateau_patience: int = opt(10, lo=1, group=O, help="plateau: the lr drops at the N-th consecutive epoch without gain "
                                                  "(torch's ReduceLROnPlateau(patience=N-1))")
    plateau_threshold: float = opt(0.0, group=O, help="plateau: smallest gain that counts (absolute, metric units: "
                                                      "percent for accuracy)")
    plateau_factor: float = opt(0.1, lo=0, lo_open=True, hi=1, group=O, help="plateau: lr factor")
    reload_best: bool = opt(False, group=O, help="plateau: reload the best weights whenever the lr drops")
    best_metric: str = opt("accuracy", group=O, help="validation metric selecting the best checkpoint (accuracy, "
                                                     "macro_f1, mean_class_accuracy, loss, mean_ccc, ...)")
    best_mode: Literal["auto", "max", "min"] = opt("auto", group=O, help="auto: min for loss/rmse, else max")
    # run and machine
    out: str = opt("runs/run", group=R, help="run folder (checkpoints, logs, state.pt)")
    resume: bool = opt(False, group=R, action="store_true", help="continue the run in --out from its state.pt")
    eval_only: str | None = opt(None, group=R, metavar="CKPT",
                                help="evaluate a checkpoint on the validation split and exit")
    device: str = opt("auto", check=check_device_name, group=R, help="auto | cpu | cuda | cuda:N (with torchrun: each process its own GPU)")
    amp: bool = opt(True, group=R, help="mixed precision: bf16/fp16 on CUDA; bf16 on CPUs with native bf16 "
                                        "(AVX512-BF16/AMX), else off")
    amp_dtype: Literal["auto", "bf16", "fp16"] = opt("auto", group=R, help="autocast dtype")
    channels_last: bool = opt(True, group=R, help="NHWC memory format for model and inputs (faster convolutions)")
    deterministic: bool = opt(False, group=R, action="store_true", help="deterministic CUDA kernels (slower)")
    seed: int = opt(0, hi=2**63 - 1, group=R, help="random seed")
    log_every: int = opt(50, group=R, help="steps between TensorBoard/progress-bar loss updates")
    tensorboard: bool = opt(True, group=R, help="TensorBoard logs in OUT/tb")
    bench_batches: int = opt(20, group=R, help="batches timed for the data-pipeline-alone throughput (0: off)")
    method: str = opt("", cli=False, help="the method's registry name")
    extra: dict[str, Any] = opt(factory=dict, cli=False, help="the method's own settings (its Config, as a dict)")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        return cls(**coerce(cls, {k: v for k, v in d.items() if k in config_fields(cls)}))


@dataclass
class NoOptions:
    """A method without settings of its own."""


# fields a resumed run may change without breaking exact continuation
RESUME_FREE = {"epochs", "workers", "device", "out", "resume", "eval_only", "log_every", "tensorboard",
               "bench_batches", "eval_batch_size", "time_budget"}


# ======================================================================================= fields -> flags


def config_fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def field_default(f: dataclasses.Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return MISSING


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unwrap_optional(t: Any) -> Any:
    args = typing.get_args(t)
    if args and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return t


def coerce(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """JSON/argparse values -> the field types (lists to tuples)."""
    hints = _hints(cls)
    out = dict(values)
    for k, v in values.items():
        t = _unwrap_optional(hints.get(k))
        if typing.get_origin(t) is tuple and isinstance(v, list):
            out[k] = tuple(v)
    return out


@dataclass
class FlagSpec:
    dest: str
    flags: list[str]
    kwargs: dict[str, Any]
    group: str | None
    default: Any


def flag_specs(cls: type) -> list[FlagSpec]:
    """The argparse arguments of a config dataclass's fields (``cli=False`` fields left out)."""
    hints = _hints(cls)
    specs = []
    for f in dataclasses.fields(cls):
        meta = dict(f.metadata)
        if not meta.get("cli", True):
            continue
        t = _unwrap_optional(hints[f.name])
        origin, args = typing.get_origin(t), typing.get_args(t)
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS}
        choices = meta.get("choices")
        if origin is Literal:
            choices = choices or args
            t = type(args[0])
        if meta.get("action") is not None:
            kw["action"] = meta["action"]
        elif t is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif origin is tuple:
            ell = len(args) == 2 and args[1] is Ellipsis
            kw["nargs"] = meta.get("nargs") or ("*" if ell else len(args))
            kw["type"] = meta.get("type") or args[0]
        elif t is dict or origin is dict:
            kw["type"] = meta.get("type") or json_object
            kw["metavar"] = meta.get("metavar") or "JSON"
        else:
            kw["type"] = meta.get("type") or t
        check = field_check(cls, f.name)
        flag = meta.get("flag") or "--" + f.name.replace("_", "-")
        if check is not None and kw.get("type") is not None and (meta.get("type") is None or meta.get("check")):
            kw["type"] = _argtype(check, flag)
        if choices is not None:
            kw["choices"] = tuple(choices)
        if meta.get("metavar") and "metavar" not in kw:
            kw["metavar"] = meta["metavar"]
        if meta.get("nargs") and "nargs" not in kw:
            kw["nargs"] = meta["nargs"]
        specs.append(FlagSpec(f.name, [flag], kw, meta.get("group"), field_default(f)))
    return specs


def _argtype(check: Callable[[Any, str], Any], flag: str) -> Callable[[str], Any]:
    from ferengine.validate import argtype

    return argtype(check, name=flag)


def _show(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return " ".join(map(str, v)) if v else "none"
    if isinstance(v, dict):
        return json.dumps(v) if v else "{}"
    return str(v)


def add_flags(container: argparse._ActionsContainer, spec: FlagSpec, help_text: str, default: Any,
              table: dict[str, Any] | None = None) -> None:
    """One flag, its help ending in ``(default: X; fer2013: Y, sfew: Z)``."""
    note = f"default: {_show(default)}" if default is not None else "default: none"
    if table:
        note += "; " + ", ".join(f"{k}: {_show(v)}" for k, v in table.items())
    text = f"{help_text} ({note})".replace("%", "%%")
    container.add_argument(*spec.flags, help=text, **spec.kwargs)


def help_of(cls: type, name: str) -> str:
    return str(config_fields(cls)[name].metadata.get("help", ""))
