"""The command line of every method: ``python -m trainers.<name> ...`` (also under ``torchrun``).

:func:`build_parser` generates the flags from :class:`~trainers.engine.config.TrainConfig` and the method's
``Config``; :func:`resolve_config` combines defaults, the method's settings, the paper's per-dataset table
and the flags given (see :mod:`trainers.engine.config`); :func:`main` trains, or evaluates (``--eval-only``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import textwrap
from pathlib import Path
from typing import Any, Sequence

from .config import (RESUME_FREE, TrainConfig, add_flags, coerce, config_fields, field_default, flag_specs, help_of,
                     validate_values)
from .errors import TrainError
from .method import Method

log = logging.getLogger("trainers.engine")

__all__ = ["build_parser", "parse_config", "resolve_config", "main", "settings_row"]

_GROUPS = ("data", "optimisation", "run")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_NOT_CONFIG = ("log_level", "verbose")  # flags of the invocation, not settings of the run


def _canonical_data(name: str | None) -> str | None:
    if not name:
        return None
    try:
        from trainers.data import canonical_name

        return canonical_name(name)
    except Exception:  # noqa: BLE001 - an unknown name is reported by the reader later
        return str(name).lower()


def settings_row(method_cls: type[Method], data: str | None) -> dict[str, Any]:
    """The method's ``table`` row for ``data`` (the paper's settings for that dataset; {} if none)."""
    key = _canonical_data(data)
    table = {(_canonical_data(k) or k): v for k, v in method_cls.table.items()}
    return dict(table.get(key, {})) if key else {}


def _method_defaults(method_cls: type[Method]) -> dict[str, Any]:
    return {"out": f"runs/{method_cls.name}", **method_cls.defaults}


def build_parser(method_cls: type[Method]) -> argparse.ArgumentParser:
    """All flags: the engine's (defaults: the method's where it sets them) and the method's own Config."""
    doc = (method_cls.__doc__ or "").strip()
    epilog = []
    if method_cls.paper:
        epilog.append(f"Paper: {method_cls.paper}")
    if method_cls.table:
        epilog.append("Per-dataset settings (the paper's; flags given win): " + "; ".join(
            f"{d}: " + ", ".join(f"{k}={v}" for k, v in row.items()) for d, row in method_cls.table.items()))
    parser = argparse.ArgumentParser(prog=f"python -m trainers.{method_cls.name}", description=doc.split("\n\n")[0],
                                     epilog="\n".join(textwrap.fill(e, 100, subsequent_indent="  ") for e in epilog) or None,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    mdefaults = _method_defaults(method_cls)
    groups = {g: parser.add_argument_group(g) for g in _GROUPS}
    per_data = lambda name: {d: row[name] for d, row in method_cls.table.items() if name in row}  # noqa: E731
    for spec in flag_specs(TrainConfig):
        default = mdefaults.get(spec.dest, spec.default)
        add_flags(groups.get(spec.group or "run", parser), spec, help_of(TrainConfig, spec.dest), default,
                  per_data(spec.dest))
    mine = parser.add_argument_group(f"{method_cls.name} ({method_cls.summary() or 'method settings'})")
    for spec in flag_specs(method_cls.Config):
        add_flags(mine, spec, help_of(method_cls.Config, spec.dest), mdefaults.get(spec.dest, spec.default),
                  per_data(spec.dest))
    method_cls.add_args(mine)
    run = groups["run"]
    run.add_argument("--log-level", default=argparse.SUPPRESS, choices=LOG_LEVELS, type=str.upper,
                     help="console log level; DEBUG also prints the traceback of an error (default: INFO)")
    run.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                     help="the same as --log-level DEBUG")
    return parser


def _split(method_cls: type[Method], values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    engine, mine = config_fields(TrainConfig), config_fields(method_cls.Config)
    unknown = sorted(set(values) - set(engine) - set(mine))
    if unknown:
        raise TrainError(f"{method_cls.name}: unknown settings {unknown}")
    return ({k: v for k, v in values.items() if k in engine}, {k: v for k, v in values.items() if k in mine})


def resolve_config(method_cls: type[Method], given: dict[str, Any], saved: dict[str, Any] | None = None) -> TrainConfig:
    """``given``: the flags typed (dest -> value). Fresh run: field defaults < method defaults < the dataset's
    table row < ``given``. ``saved`` (``--resume``): the run's own configuration < ``given``, with a warning
    for every change that makes the continued run differ from an uninterrupted one."""
    g_engine, g_mine = _split(method_cls, given)
    if saved is not None:
        merged = TrainConfig.from_dict(saved).to_dict()
        for k, v in g_engine.items():
            old = merged.get(k)
            v = list(v) if isinstance(v, tuple) else v
            if v != old and k not in RESUME_FREE:
                log.warning("resume: %s changed from %r to %r; the continued run will differ from the original",
                            k, old, v)
            merged[k] = v
        extra = {f.name: field_default(f) for f in dataclasses.fields(method_cls.Config)}
        extra.update(_split(method_cls, settings_row(method_cls, merged["data"]))[1])
        old_extra = dict(saved.get("extra") or {})
        unknown = sorted(set(old_extra) - set(extra))
        if unknown:
            log.warning("resume: the saved run has settings this version of %s no longer knows: %s (ignored)",
                        method_cls.name, unknown)
        extra.update({k: v for k, v in old_extra.items() if k in extra})
        for k, v in g_mine.items():
            if v != extra.get(k):
                log.warning("resume: %s changed from %r to %r; the continued run will differ from the original",
                            k, extra.get(k), v)
            extra[k] = v
        merged["extra"] = _jsonable(method_cls, extra)
        merged["method"] = method_cls.name
        return validate_config(method_cls, TrainConfig.from_dict(merged))
    d_engine, d_mine = _split(method_cls, _method_defaults(method_cls))
    data = g_engine.get("data", d_engine.get("data", TrainConfig.data))
    r_engine, r_mine = _split(method_cls, settings_row(method_cls, data))
    engine = {**d_engine, **r_engine, **g_engine}
    if "data_opts" in g_engine:  # reader options add to the row's (--data-opt mode=distribution keeps va=anchors)
        engine["data_opts"] = {**(d_engine.get("data_opts") or {}), **(r_engine.get("data_opts") or {}),
                               **(g_engine["data_opts"] or {})}
    mine = {f.name: field_default(f) for f in dataclasses.fields(method_cls.Config)}
    mine.update({**d_mine, **r_mine, **g_mine})
    cfg = TrainConfig(**coerce(TrainConfig, engine))
    cfg.extra = _jsonable(method_cls, mine)
    cfg.method = method_cls.name
    return validate_config(method_cls, cfg)


def validate_config(method_cls: type[Method], cfg: TrainConfig) -> TrainConfig:
    """Every number and name of the run within its range (:func:`~trainers.engine.config.field_check`): the
    engine's settings and the method's. Raises ``InvalidValue`` (a ``ValueError``) naming the flag."""
    engine = validate_values(TrainConfig, {k: getattr(cfg, k) for k in config_fields(TrainConfig)
                                           if k not in ("extra", "method")})
    for k, v in engine.items():
        setattr(cfg, k, v)
    cfg.extra = validate_values(method_cls.Config, dict(cfg.extra))
    return cfg


def _jsonable(method_cls: type[Method], values: dict[str, Any]) -> dict[str, Any]:
    inst = method_cls.Config(**coerce(method_cls.Config, values))
    d = dataclasses.asdict(inst)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def parse_config(method_cls: type[Method], argv: Sequence[str]) -> TrainConfig:
    """The run's configuration from a command line (with ``--resume``: from the run's ``args.json`` too)."""
    parser = build_parser(method_cls)
    given = vars(parser.parse_args(list(argv)))
    for k in _NOT_CONFIG:
        given.pop(k, None)
    saved = None
    if given.get("resume") and not given.get("eval_only"):
        from .checkpointing import STATE_FILE

        data = given.get("data") or method_cls.defaults.get("data")
        out = Path(given.get("out") or settings_row(method_cls, data).get("out")
                   or _method_defaults(method_cls)["out"])
        if not (out / STATE_FILE).is_file():
            why = "does not exist" if not out.exists() else "is not a folder" if not out.is_dir() else \
                f"holds no {STATE_FILE} (no epoch of a run was completed there)"
            raise TrainError(f"--resume: {out} {why}, so there is nothing to resume; give the --out of the run "
                             "to continue, or drop --resume to start a new run")
        args_json = out / "args.json"
        if args_json.exists():
            try:
                saved = json.loads(args_json.read_text())["config"]
                if not isinstance(saved, dict):
                    raise TypeError("'config' is not an object")
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise TrainError(f"{args_json}: cannot read the run's settings ({exc}); restore it from the run's "
                                 f"checkpoint (its training config) or start a new run in another --out") from None
            given.setdefault("out", str(out))
    try:
        cfg = resolve_config(method_cls, given, saved)
    except (TypeError, ValueError) as exc:
        where = f"{out / 'args.json'}: " if saved is not None else ""
        raise TrainError(f"{where}{method_cls.name}: {exc}") from None
    if saved is not None:
        cfg.resume = True
        cfg.changed_on_resume = _changes(method_cls, saved, cfg)  # type: ignore[attr-defined]
    return cfg


def _changes(method_cls: type[Method], saved: dict[str, Any], cfg: TrainConfig) -> list[str]:
    """The flags whose value differs from the saved run's (those that change what is trained)."""
    now = cfg.to_dict()
    old = TrainConfig.from_dict(saved).to_dict()
    out = [f"--{k.replace('_', '-')}" for k in now if k not in RESUME_FREE | {"extra", "method"}
           and now[k] != old.get(k)]
    old_extra = dict(saved.get("extra") or {})
    out += [f"--{k.replace('_', '-')}" for k, v in now["extra"].items() if v != old_extra.get(k)]
    return out


def main(method_cls: type[Method], argv: Sequence[str] | None = None, *,
         datasets: tuple[Any, Any] | None = None) -> int:
    """Command line of a method: ``python -m trainers.<name> ...``. Returns the exit status.

    One error boundary (:func:`~trainers.engine.boundary.guard`): a known error is one line and status 2,
    a bug one line and status 1 (``--log-level DEBUG`` / ``-v``: with its traceback), Ctrl-C says what was
    saved and how to resume (status 130). ``datasets=(train, val)`` substitutes in-memory datasets for
    ``--data`` (tests).
    """
    from .boundary import guard, wants_traceback

    argv = list(sys.argv[1:] if argv is None else argv)
    prog = f"python -m trainers.{method_cls.name}"
    command = [Path(sys.executable).name, "-m", f"trainers.{method_cls.name}", *argv]
    run: dict[str, Any] = {}

    def body() -> int:
        from .logs import setup_logging
        from .runtime import init_distributed

        cfg = parse_config(method_cls, argv)
        run["cfg"] = cfg
        level = _log_level(argv)
        if cfg.eval_only:
            run["restore"] = setup_logging(None, level=level)
            return _eval_only(cfg, datasets)
        from .loop import Trainer, check_out

        out = Path(cfg.out)
        check_out(out, cfg.resume)
        dist = run["dist"] = init_distributed(cfg.device)
        run["restore"] = setup_logging(out, dist.rank, level=level)
        trainer = run["trainer"] = Trainer(cfg, method_cls, datasets=datasets, argv=command, dist=dist)
        trainer.fit()
        from .checkpointing import BEST_FILE, LAST_FILE

        best = trainer.out / BEST_FILE
        log.info("done: %s (best %s %.4g at epoch %d); last: %s", best if best.exists() else "no best checkpoint",
                 cfg.best_metric, trainer.best_value if trainer.best_value is not None else float("nan"),
                 trainer.best_epoch, trainer.out / LAST_FILE)
        return 0

    def on_interrupt() -> str:
        from .checkpointing import STATE_FILE

        cfg = run.get("cfg")
        if cfg is None or cfg.eval_only:
            return "nothing was written"
        tr = run.get("trainer")
        state = Path(cfg.out) / STATE_FILE
        if tr is not None and state.exists():
            return (f"{state} holds the run after epoch {tr.epoch} (the interrupted epoch is redone); continue with: "
                    f"{prog} --out {cfg.out} --resume")
        if state.exists():
            return f"{state} is unchanged; continue with: {prog} --out {cfg.out} --resume"
        return f"no epoch was completed, nothing to resume in {cfg.out}"

    def on_error(exc: BaseException, line: str) -> str:
        cfg = run.get("cfg")
        changed = getattr(cfg, "changed_on_resume", None) if cfg is not None else None
        if changed and "resum" not in line:
            line += (f" (resuming {cfg.out} with {', '.join(changed)} changed; resume with the run's own settings "
                     "or start a new run in another --out)")
        return line

    rc = 1
    try:
        rc = guard(prog, body, verbose=wants_traceback(argv), on_interrupt=on_interrupt, on_error=on_error)
        return rc
    finally:
        if run.get("restore") is not None:
            run["restore"]()
        dist = run.get("dist")
        if dist is not None and dist.enabled:
            import torch.distributed

            if rc == 0:  # every process finished: leave together (one tearing gloo down under another's
                torch.distributed.barrier()  # last writes aborted it: "terminate called without an active exception")
            torch.distributed.destroy_process_group()


def _log_level(argv: Sequence[str]) -> str:
    from .boundary import wants_traceback

    args = list(argv)
    for i, a in enumerate(args):
        if a == "--log-level" and i + 1 < len(args):
            return args[i + 1].upper()
        if a.startswith("--log-level="):
            return a.split("=", 1)[1].upper()
    return "DEBUG" if wants_traceback(argv) else "INFO"


def _eval_only(cfg: TrainConfig, datasets: tuple[Any, Any] | None) -> int:
    """``--eval-only CKPT``: the one evaluator, with the training run's own arithmetic (the checkpoint's torch
    module on ``--device``, fp32 on a CPU), on ``--val-split``; writes OUT/eval.json (+ confusion.png)."""
    import numpy as np

    from ferengine.fileio import atomic_write_text

    from ..data.splits import default_splits
    from ..evaluate import _json_safe, evaluate_checkpoint, format_report
    from .runtime import amp_dtype_for, select_device

    device = select_device(cfg.device)
    split = cfg.val_split if cfg.val_split and cfg.val_split.lower() != "none" else default_splits(cfg.data)[1]
    dataset = None if datasets is None else datasets[1]
    res = evaluate_checkpoint(cfg.eval_only, cfg.data, cfg.data_dir, split or "val", backend=None, device=str(device),
                              batch_size=cfg.eval_batch_size or 2 * cfg.batch_size, data_opts=cfg.data_opts,
                              limit=cfg.limit_val, seed=cfg.seed, workers=cfg.workers,
                              amp=amp_dtype_for(cfg.amp, cfg.amp_dtype, device), dataset=dataset)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "eval.json", json.dumps(_json_safe(res), indent=2) + "\n")
    for note in res["notes"]:
        print(f"note: {note}", file=sys.stderr)
    print(format_report(res, res["labels"], f"{cfg.eval_only} on {cfg.data}/{res['split']}:"))
    print(f"wrote {out / 'eval.json'}")
    try:
        from trainers.metrics import save_confusion_png

        if "confusion_matrix" in res:
            save_confusion_png(np.asarray(res["confusion_matrix"]), res["labels"], out / "confusion.png")
    except Exception as exc:  # noqa: BLE001 - optional (matplotlib/OpenCV issues must not lose the metrics)
        log.debug("no confusion PNG: %s", exc)
    return 0
