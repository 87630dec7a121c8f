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
                   help="reader option, repeatable (e.g. mode=distribution for ferplus)")
    p.add_argument("--json", metavar="OUT", help="also write the metrics (percent) to this JSON file")
    p.add_argument("--confusion-png", metavar="PNG", help="also draw the confusion matrix to this PNG file")
    p.add_argument("--batch-size", type=int, default=256, help="faces per inference call (default 256)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.add_argument("--checkpoint", "-c", metavar="FILE", help="model checkpoint (default: the model in assets/)")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "onnxruntime", "tensorrt"],
                   help="inference backend (default: auto)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")


def _key_value(text: str) -> tuple[str, Any]:
    from .engine.config import _kv

    return _kv(text)


def add_fer_command(subparsers: Any) -> None:
    p = subparsers.add_parser("eval", help="accuracy, mean class accuracy, macro-F1 and confusion matrix (or "
                                           "valence/arousal metrics) of a checkpoint on a dataset split")
    add_arguments(p)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from ferengine.cli import CLIError

    from .data import DatasetError
    from .evaluate import EvalError, run_command

    try:
        return run_command(args)
    except (EvalError, DatasetError) as exc:
        raise CLIError(" ".join(str(exc).split())) from None
