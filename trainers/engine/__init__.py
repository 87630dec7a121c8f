"""The one training engine every method runs on, split by concern:

- :mod:`.config` -- :class:`TrainConfig`, ``opt()`` fields, flags generated from dataclasses;
- :mod:`.runtime` -- seeds and RNG state, device, mixed precision, torchrun processes;
- :mod:`.method` -- the :class:`Method` protocol (what a method declares, the hooks it overrides);
- :mod:`.loop` -- :class:`Trainer`: the epoch/step loop, evaluation, time budget, stages;
- :mod:`.optim` -- optimisers, the engine-owned lr schedules, stage plans;
- :mod:`.checkpointing` -- best/last checkpoints, ``state.pt`` and exact resume, ``args.json``;
- :mod:`.logs` -- logging, ``metrics.csv``, TensorBoard, progress lines;
- :mod:`.main` -- the command line (``python -m trainers.<method>``, ``--eval-only``).

Batch providers are in :mod:`trainers.data.batches`, reusable training modules (momentum pairs, the
labelled feature queue) in :mod:`trainers.modules`, losses in :mod:`trainers.losses`, the evaluator in
:mod:`trainers.evaluate`, the method registry in :mod:`trainers.methods`. To add a method, read
:mod:`.method` (its docstring is the guide) and one existing method file; nothing here needs editing.
"""
from __future__ import annotations

from ..data.batches import Batch, Batches, LoaderBatches, TensorBatches, make_batches
from ..data.splits import DataInfo, default_splits, load_data
from ..evaluate import evaluate, format_report
from .checkpointing import BEST_FILE, BEST_STATE_FILE, LAST_FILE, STATE_FILE
from .config import NoOptions, TrainConfig, duration, json_object, opt
from .errors import TrainError
from .loop import Trainer, benchmark_batches
from .main import build_parser, main, parse_config, resolve_config
from .method import Method
from .optim import LRSchedule, Stage, StagePlan, make_optimizer
from .runtime import Dist, amp_dtype_for, cpu_has_native_bf16, eval_autocast, seed_everything, select_device

__all__ = [
    "BEST_FILE", "BEST_STATE_FILE", "Batch", "Batches", "DataInfo", "Dist", "LAST_FILE", "LRSchedule",
    "LoaderBatches", "Method", "NoOptions", "STATE_FILE", "Stage", "StagePlan", "TensorBatches", "TrainConfig",
    "TrainError", "Trainer", "amp_dtype_for", "benchmark_batches", "build_parser", "cpu_has_native_bf16",
    "default_splits", "duration", "eval_autocast", "evaluate", "format_report", "json_object", "load_data", "main",
    "make_batches", "make_optimizer", "opt", "parse_config", "resolve_config", "seed_everything", "select_device",
]
