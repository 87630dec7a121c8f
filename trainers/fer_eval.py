"""``fer eval``: the ``fer.commands`` entry point that adds the evaluator to the ``fer`` command (ferengine
finds it through package metadata and never imports trainers itself). Kept free of heavy imports: ``fer``
builds its parser on every call."""
from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_fer_command", "add_arguments"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="dataset name: fer2013, ferplus, rafdb, affectnet, sfew, afew-va, "
                                                 "affwild2, folder")
    p.add_argument("--data-dir", default=None, help="folder holding the dataset (default: $FER_DATA_DIR, else ./data)")
    p.add_argument("--split", required=True, help="split to evaluate, e.g. publictest, privatetest, val, test")
    p.add_argument("--data-opt", action="append", default=[], type=_key_value, metavar="KEY=VALUE",
                   help="reader option, repeatable (e.g. mode=distribution for ferplus; va=anchors: ferplus's proxy "
                        "valence/arousal targets, which also scores a model without an AV head on its estimate)")
    p.add_argument("--json", metavar="OUT", help="also write the metrics (percent) to this JSON file")
    p.add_argument("--confusion-png", metavar="PNG", help="also draw the confusion matrix to this PNG file")
    p.add_argument("--batch-size", type=_argtype("check_int", lo=1, name="--batch-size"), default=256,
                   help="faces per inference call (default 256)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.add_argument("--checkpoint", "-c", metavar="FILE", help="model checkpoint (default: the model in assets/)")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "onnxruntime", "tensorrt"],
                   help="inference backend (default: auto)")
    p.add_argument("--device", default="auto", type=_argtype("check_device_name", name="--device"),
                   help="auto | cpu | cuda | cuda:N")


def _argtype(check: str, **kwargs: Any) -> Any:
    from ferengine import validate

    return validate.argtype(getattr(validate, check), **kwargs)


def _key_value(text: str) -> tuple[str, Any]:
    from .engine.config import _kv

    return _kv(text)


def add_fer_command(subparsers: Any) -> None:
    p = subparsers.add_parser("eval", help="accuracy, mean class accuracy, macro-F1 and confusion matrix (or "
                                           "valence/arousal metrics) of a checkpoint on a dataset split")
    add_arguments(p)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    """The boundary of ``fer eval``: the trainers' known errors become the ``fer`` command's one-line error
    (status 2; ferengine's own errors and Ctrl-C are the ``fer`` command's to report), a bug one line
    ``fer eval: internal error: ...`` (status 1; ``-v``: with its traceback)."""
    import sys
    import traceback

    from ferengine.cli import CLIError
    from ferengine.errors import FerError

    from .engine.boundary import known_errors, one_line
    from .evaluate import run_command

    try:
        return run_command(args)
    except FerError:
        raise
    except known_errors() as exc:
        raise CLIError(one_line(exc)) from None
    except Exception as exc:  # noqa: BLE001 - the boundary: a bug, reported in one line
        if getattr(args, "verbose", False):
            traceback.print_exc()
        print(f"fer eval: internal error: {type(exc).__name__}: {' '.join(str(exc).split())} (run with -v for the "
              "traceback; please report it)", file=sys.stderr)
        return 1
