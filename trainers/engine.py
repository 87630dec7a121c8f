"""The one training engine every trainer (``trainers.baseline``, ``daf``, ``ecan``, ``clcl``, ``avce``,
``esr``, ``manet``) runs on: data, loop, evaluation, checkpoints, resume, logging.

Shape (after torchvision's ``references/classification/train.py``): :func:`load_data` opens the splits,
:meth:`Trainer.train_one_epoch` / :func:`evaluate` run one pass, :meth:`Trainer.fit` loops over epochs,
:func:`main` is the command line. A trainer never forks the loop: it subclasses :class:`Method` and
overrides the hooks it needs.

How a method plugs in
=====================
::

    class Center(Method):                     # a hypothetical "CE + centre loss" trainer
        name = "center"
        defaults = dict(optimizer="adam", lr=1e-3, scheduler="plateau", reload_best=True)

        @classmethod
        def add_args(cls, parser):            # method flags land in cfg.extra
            parser.add_argument("--lam", type=float, default=0.01)

        def build_model(self, data):          # -> nn.Module from ferengine.models
            self.arch, self.arch_kwargs = "fastcnn", {"num_classes": data.num_classes, "in_chans": data.channels}
            return create_model(self.arch, **self.arch_kwargs)

        def setup(self):                      # after model/optimisers exist; register extra state here
            self.centres = torch.zeros(self.trainer.data.num_classes, self.model.feature_dim, device=self.device)

        def training_step(self, batch):       # runs under autocast; return {"loss": ..., other logs}
            out = self.model(batch.input)
            ce = F.cross_entropy(out["logits"], batch.label)
            c = ((out["embedding"] - self.centres[batch.label]) ** 2).sum(1).mean()
            self._emb = out["embedding"].detach()
            return {"loss": ce + self.cfg.extra["lam"] * c, "ce": ce, "centre": c}

        def after_step(self, batch, logs):    # parameters with their own update rule
            self.centres.index_add_(0, batch.label, 0.1 * (self._emb - self.centres[batch.label]))

        def state_dict(self):                 # goes into state.pt (resume) and best_state.pt
            return {"centres": self.centres}

        def load_state_dict(self, state):
            self.centres.copy_(state["centres"])

    if __name__ == "__main__":
        raise SystemExit(main(Center))

Hooks and the method that needs each
====================================
- ``defaults`` / ``add_args``: every trainer (paper settings as defaults; ablation flags).
- ``views = 2`` (or ``build_augment`` returning one :class:`~trainers.augment.BatchAugment` per view, e.g.
  weak + strong): ``batch.inputs`` holds one augmented tensor per view -- ECAN, any contrastive loss.
- :class:`MomentumEncoder` (EMA copy updated in ``after_step``) and :class:`FeatureQueue` (features + labels,
  ring buffer), both registered with ``trainer.register_state``; ``before_training`` (fresh runs only, not
  on resume) fills the queue with a frozen pass over ``trainer.make_batches(trainer.train_ds, ...)`` -- ECAN.
- Several optimisers: ``build_optimizers`` returns ``{"main": ..., "dis": ...}``. Either ``training_step``
  returns ``{"loss/main": L_main, "loss/dis": L_dis}`` (each optimiser steps on the gradient of its own
  loss, both taken from the same forward), or ``manual_optimization = True`` and ``training_step`` calls
  ``self.trainer.step(loss, "main")`` itself, as often as it likes (two forward/backward passes) -- AVCE.
- Regression targets: ``batch.va`` (float (B,2), NaN where missing); ``evaluate`` adds RMSE/SAGR/PCC/CCC
  whenever the model outputs ``"va"`` and the data has valence/arousal -- AVCE (and ESR's AV head).
- Multi-branch outputs: extra ``"logits_<name>"`` outputs of ``eval_step`` get their own accuracy; new
  branches are added in ``on_epoch_start`` with ``trainer.add_param_group("main", {...,"lr": ...})`` and
  re-created from ``state_dict`` on resume (``load_state_dict`` runs before the weights are loaded) -- ESR.
- Auxiliary parameters with their own update rule (not in any optimiser): keep them on the method, update
  them in ``training_step``/``after_step``, return them from ``state_dict`` -- DAF-CNN's class centres.
- Intermediate features: :func:`forward_with_blocks` gives the outputs plus ``model.forward_blocks``
  features in one pass -- cross-layer contrastive learning, diversity losses (ESR, MA-Net).
- Plateau scheduling with "reload the best weights on an lr drop": ``--scheduler plateau --reload-best``
  (patience, threshold (absolute, in the monitored metric's units: percent for accuracy), factor,
  min lr) -- DAF-CNN. Per-iteration schedules: return ``Schedule(..., interval="step")`` from
  ``build_schedulers`` -- AVCE.
- ``eval_step``: what evaluation runs (default ``model(batch.input)``) -- ESR (vote), ECAN (encoder q).
- ``export_model`` / ``arch`` / ``arch_kwargs``: the inference network written to the checkpoints.

Files in ``--out``: ``args.json`` (resolved config), ``best.safetensors`` / ``last.safetensors`` (the
ferengine checkpoint contract), ``state.pt`` (everything needed to resume, ``torch.load(weights_only=True)``
-safe), ``best_state.pt`` (the best epoch's training network and method state such as class centres, which
the inference checkpoints do not carry; written with ``--reload-best`` or a non-empty method state),
``metrics.csv``, ``tb/`` (TensorBoard), ``train.log``,
``eval.json`` (``--eval-only``).
"""
from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import io
import json
import logging
import math
import os
import platform
import random
import shlex
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ferengine import checkpoint as ckpt
from ferengine.preprocess import InputSpec, to_model_input
from ferengine.fileio import atomic_write, atomic_write_text

from .augment import AUGMENT_PRESETS, BatchAugment, augment_config, to_nchw_uint8

log = logging.getLogger("trainers.engine")

STATE_FORMAT = "fer-desktop-train-state"
STATE_VERSION = 1
BEST_FILE, LAST_FILE, STATE_FILE, BEST_STATE_FILE = "best.safetensors", "last.safetensors", "state.pt", "best_state.pt"


class TrainError(RuntimeError):
    """A training run cannot start or continue; the message says what to do."""


# ============================================================================================ config


@dataclass
class TrainConfig:
    """Everything a run depends on. Built by :func:`config_from_args`; saved as ``args.json``.

    Fields whose default is ``None`` are resolved at run time (documented per field).
    """

    # data
    data: str = "fer2013"
    data_dir: str | None = None                 # None: $FER_DATA_DIR, else ./data
    data_opts: dict[str, Any] = field(default_factory=dict)  # reader options (--data-opt KEY=VALUE)
    train_split: str | None = None              # None: the dataset's training split
    val_split: str | None = None                # None: publictest (fer2013), else val/valid/test; "none" = no eval
    limit_train: int = 0                        # >0: a seeded random subset of the training split
    limit_val: int = 0
    input_size: int | None = None               # None: the model's default_input size
    channels: int | None = None                 # None: the dataset's (1 grey, 3 RGB)
    crop_margin: float | None = None            # None: InputSpec's default (stored in the checkpoint)
    augment: str = "standard"                   # preset of trainers.augment.AUGMENT_PRESETS
    aug: dict[str, Any] = field(default_factory=dict)  # preset overrides (--aug KEY=VALUE)
    workers: int = 4                            # DataLoader workers for on-disk datasets
    # optimisation
    epochs: int = 30
    time_budget: float = 0.0                    # seconds of training loop; >0: fit the epoch count to it
    batch_size: int = 128
    eval_batch_size: int = 0                    # 0: 2 x batch_size
    optimizer: str = "sgd"                      # sgd | adam | adamw
    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    label_smoothing: float = 0.0
    grad_clip: float = 0.0                      # >0: clip the gradient norm per optimiser
    scheduler: str = "none"                     # none | cosine | step | multistep | exponential | plateau
    warmup_epochs: float = 0.0                  # cosine: linear warm-up
    step_size: int = 30                         # step
    milestones: tuple[int, ...] = ()            # multistep (epochs)
    gamma: float = 0.1                          # step / multistep / exponential
    min_lr: float = 0.0                         # cosine floor; plateau min_lr
    plateau_patience: int = 10
    plateau_threshold: float = 0.0              # absolute, in the monitored metric's units
    plateau_factor: float = 0.1
    reload_best: bool = False                   # plateau: reload the best weights when the lr drops
    best_metric: str = "accuracy"               # validation metric selecting best.safetensors
    best_mode: str = "auto"                     # max | min | auto (min for loss/rmse, else max)
    # machine
    device: str = "auto"                        # auto | cpu | cuda | cuda:N
    amp: bool = True                            # mixed precision: CUDA, or bf16 on CPUs with native bf16
    amp_dtype: str = "auto"                     # auto (bf16 where supported, else fp16) | bf16 | fp16
    channels_last: bool = True                  # NHWC memory format (faster convolutions on CPU and GPU)
    deterministic: bool = False
    seed: int = 0
    # run
    out: str = "runs/run"
    resume: bool = False
    eval_only: str | None = None
    log_every: int = 50                         # steps between TensorBoard/tqdm loss updates
    tensorboard: bool = True
    bench_batches: int = 20                     # batches of the data-pipeline-alone benchmark (0: off)
    method: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # the method's own flags

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"], d["milestones"] = list(self.betas), list(self.milestones)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        if "betas" in kw:
            kw["betas"] = tuple(kw["betas"])
        if "milestones" in kw:
            kw["milestones"] = tuple(kw["milestones"])
        return cls(**kw)


FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}
# fields a resumed run may change without breaking exact continuation
RESUME_FREE = {"epochs", "workers", "device", "out", "resume", "eval_only", "log_every", "tensorboard",
               "bench_batches", "eval_batch_size", "time_budget"}


def json_object(text: str) -> dict[str, Any]:
    """argparse type for a JSON object flag such as ``--arch-kwargs '{"width": 0.5}'``."""
    try:
        d = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"expected a JSON object: {exc}") from None
    if not isinstance(d, dict):
        raise argparse.ArgumentTypeError("expected a JSON object, e.g. '{\"width\": 0.5}'")
    return d


_clock = time.monotonic  # --time-budget's clock (a test replaces it)
PROGRESS_EVERY_S = 60.0  # without a terminal, a progress line at most this often during an epoch

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


def _hms(seconds: float) -> str:
    """``75`` -> ``1m15s``, ``4000`` -> ``1h06m``; ``?`` when unknown."""
    if not math.isfinite(seconds):
        return "?"
    s = int(round(max(seconds, 0.0)))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _kv(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    k, v = text.split("=", 1)
    try:
        val = json.loads(v)
    except json.JSONDecodeError:
        val = v
    return k.strip().replace("-", "_"), val


class _KVAction(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        d = dict(getattr(namespace, self.dest) or {})
        k, v = values
        d[k] = v
        setattr(namespace, self.dest, d)


def add_common_args(parser: argparse.ArgumentParser, defaults: dict[str, Any] | None = None) -> None:
    """The flags every trainer accepts. ``defaults`` (the method's paper settings) override the engine's."""
    c = TrainConfig()
    g = parser.add_argument_group("data")
    g.add_argument("--data", default=c.data, help="dataset name (fer2013, ferplus, rafdb, affectnet, ...)")
    g.add_argument("--data-dir", default=c.data_dir, help="folder holding the dataset ($FER_DATA_DIR, else ./data)")
    g.add_argument("--data-opt", dest="data_opts", type=_kv, action=_KVAction, default={}, metavar="KEY=VALUE",
                   help="reader option, repeatable (e.g. mode=distribution for ferplus)")
    g.add_argument("--train-split", default=c.train_split, help="training split (default: the dataset's)")
    g.add_argument("--val-split", default=c.val_split,
                   help="validation split selecting the best checkpoint (default: publictest for fer2013, "
                        "else the dataset's validation split; 'none' = no evaluation)")
    g.add_argument("--limit-train", type=int, default=c.limit_train, metavar="N",
                   help="train on a seeded random subset of N images (smoke runs)")
    g.add_argument("--limit-val", type=int, default=c.limit_val, metavar="N", help="evaluate on N images")
    g.add_argument("--input-size", type=int, default=c.input_size, help="model input side (default: the model's)")
    g.add_argument("--channels", type=int, choices=(1, 3), default=c.channels,
                   help="1 grey / 3 RGB (default: the dataset's)")
    g.add_argument("--crop-margin", type=float, default=c.crop_margin,
                   help="face crop margin stored in the checkpoint's input spec (default: InputSpec's)")
    g.add_argument("--augment", default=c.augment, choices=sorted(AUGMENT_PRESETS), help="augmentation preset")
    g.add_argument("--aug", type=_kv, action=_KVAction, default={}, metavar="KEY=VALUE",
                   help="augmentation override, repeatable (translate, hflip, rotate, scale, brightness, "
                        "contrast, erase, erase_area, erase_ratio, padding), e.g. --aug rotate=30")
    g.add_argument("--workers", type=int, default=min(c.workers, os.cpu_count() or 1),
                   help="DataLoader workers (on-disk datasets; in-memory ones need none)")
    g = parser.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=c.epochs)
    g.add_argument("--time-budget", type=duration, default=c.time_budget, metavar="TIME",
                   help="wall-clock budget for this invocation's epochs (e.g. 600, 45m, 2h): after each epoch "
                        "the run is shortened to the epochs that fit (never beyond --epochs), and a cosine "
                        "schedule is re-timed to end there; 0: off")
    g.add_argument("--batch-size", type=int, default=c.batch_size)
    g.add_argument("--eval-batch-size", type=int, default=c.eval_batch_size, help="0: 2 x batch size")
    g.add_argument("--optimizer", choices=("sgd", "adam", "adamw"), default=c.optimizer)
    g.add_argument("--lr", type=float, default=c.lr)
    g.add_argument("--momentum", type=float, default=c.momentum, help="SGD momentum")
    g.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=c.nesterov)
    g.add_argument("--betas", type=float, nargs=2, default=c.betas, help="Adam betas")
    g.add_argument("--weight-decay", type=float, default=c.weight_decay)
    g.add_argument("--label-smoothing", type=float, default=c.label_smoothing)
    g.add_argument("--grad-clip", type=float, default=c.grad_clip, help="max gradient norm (0: off)")
    g.add_argument("--scheduler", choices=("none", "cosine", "step", "multistep", "exponential", "plateau"),
                   default=c.scheduler)
    g.add_argument("--warmup-epochs", type=float, default=c.warmup_epochs, help="cosine: linear warm-up")
    g.add_argument("--step-size", type=int, default=c.step_size, help="step: epochs between lr drops")
    g.add_argument("--milestones", type=int, nargs="*", default=c.milestones, help="multistep: epochs")
    g.add_argument("--gamma", type=float, default=c.gamma, help="step/multistep/exponential lr factor")
    g.add_argument("--min-lr", type=float, default=c.min_lr, help="cosine floor / plateau minimum")
    g.add_argument("--plateau-patience", type=int, default=c.plateau_patience)
    g.add_argument("--plateau-threshold", type=float, default=c.plateau_threshold,
                   help="plateau: smallest gain that counts (absolute, metric units: percent for accuracy)")
    g.add_argument("--plateau-factor", type=float, default=c.plateau_factor)
    g.add_argument("--reload-best", action=argparse.BooleanOptionalAction, default=c.reload_best,
                   help="plateau: reload the best weights whenever the lr drops")
    g.add_argument("--best-metric", default=c.best_metric,
                   help="validation metric selecting the best checkpoint (accuracy, macro_f1, "
                        "mean_class_accuracy, loss, ccc_mean, ...)")
    g.add_argument("--best-mode", choices=("auto", "max", "min"), default=c.best_mode)
    g = parser.add_argument_group("run")
    g.add_argument("--out", default=c.out, help="run folder (checkpoints, logs, state.pt)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its state.pt")
    g.add_argument("--eval-only", metavar="CKPT", default=c.eval_only,
                   help="evaluate a checkpoint on the validation split and exit")
    g.add_argument("--device", default=c.device, help="auto | cpu | cuda | cuda:N")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=c.amp,
                   help="mixed precision: bf16/fp16 on CUDA; bf16 on CPUs with native bf16 (AVX512-BF16/AMX), else off")
    g.add_argument("--amp-dtype", choices=("auto", "bf16", "fp16"), default=c.amp_dtype)
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=c.channels_last,
                   help="NHWC memory format for model and inputs (default on: faster convolutions)")
    g.add_argument("--deterministic", action="store_true", help="deterministic CUDA kernels (slower)")
    g.add_argument("--seed", type=int, default=c.seed)
    g.add_argument("--log-every", type=int, default=c.log_every)
    g.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=c.tensorboard)
    g.add_argument("--bench-batches", type=int, default=c.bench_batches,
                   help="batches timed for the data-pipeline-alone throughput (0: off)")
    if defaults:
        unknown = sorted(set(defaults) - FIELDS)
        if unknown:
            raise ValueError(f"defaults for unknown engine settings {unknown}")
        parser.set_defaults(**defaults)


def build_parser(method_cls: type["Method"]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"python -m trainers.{method_cls.name}",
        description=(method_cls.__doc__ or "").strip().split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_common_args(parser, {k: v for k, v in method_cls.defaults.items() if k in FIELDS})
    g = parser.add_argument_group(f"{method_cls.name}")
    method_cls.add_args(g)
    extra_defaults = {k: v for k, v in method_cls.defaults.items() if k not in FIELDS}
    if extra_defaults:
        parser.set_defaults(**extra_defaults)
    return parser


def config_from_args(args: argparse.Namespace, method: str = "") -> TrainConfig:
    """Common flags -> the dataclass fields; everything else (the method's flags) -> ``cfg.extra``."""
    d = vars(args)
    kw = {k: v for k, v in d.items() if k in FIELDS and k != "extra"}
    kw["extra"] = {k: v for k, v in d.items() if k not in FIELDS}
    kw["betas"] = tuple(kw.get("betas", (0.9, 0.999)))
    kw["milestones"] = tuple(kw.get("milestones", ()))
    kw["method"] = method or kw.get("method", "")
    return TrainConfig(**kw)


def merge_resume_config(cfg: TrainConfig, saved: dict[str, Any], parser: argparse.ArgumentParser) -> TrainConfig:
    """For ``--resume``: the saved run's settings, except flags given explicitly on this command line.

    A flag counts as given when its value differs from the parser default; changing a setting other
    than epochs/workers/device/logging on resume is allowed but warned about (the continued run is
    then no longer identical to an uninterrupted one).
    """
    merged = cfg.to_dict()
    for k, old in saved.items():
        if k == "extra":
            continue
        if k not in FIELDS or k in ("resume", "eval_only", "out"):
            continue
        new = merged[k]
        default = parser.get_default(k)
        if isinstance(default, tuple):
            default = list(default)
        if new == default or new is None:
            merged[k] = old
        elif new != old and k not in RESUME_FREE:
            log.warning("resume: %s changed from %r to %r; the continued run will differ from the original", k, old, new)
    extra = dict(merged["extra"])
    for k, old in (saved.get("extra") or {}).items():
        new = extra.get(k)
        default = parser.get_default(k)
        if k not in extra or new == default:
            extra[k] = old
        elif new != old:
            log.warning("resume: %s changed from %r to %r; the continued run will differ from the original", k, old, new)
    merged["extra"] = extra
    return TrainConfig.from_dict(merged)


# ============================================================================== seeds, device, AMP


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def select_device(name: str = "auto") -> torch.device:
    if name in ("auto", "", None):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TrainError(f"--device {name}: CUDA is not available here (torch {torch.__version__}); use --device cpu")
    return dev


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 natively (AVX512-BF16 or AMX): autocast then pays off (~2.5x)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split("flags", 2)[1].split("\n", 1)[0].split()
    except (OSError, IndexError):
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def amp_dtype_for(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for training forward passes, or None (--no-amp, or a CPU without native bf16).

    CUDA: bf16 where supported, else fp16. CPU: bf16 only on CPUs with native bf16 instructions
    (measured on a 2-core AVX512-BF16 EPYC: fastcnn trains at 856 img/s with bf16 + channels-last
    against 327 img/s in fp32); never fp16 on CPU.
    """
    if not cfg.amp:
        return None
    if device.type == "cpu":
        return torch.bfloat16 if cfg.amp_dtype in ("auto", "bf16") and cpu_has_native_bf16() else None
    if device.type != "cuda":
        return None
    if cfg.amp_dtype == "fp16":
        return torch.float16
    if cfg.amp_dtype == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def eval_autocast(device: torch.device, amp: torch.dtype | None) -> Callable[[], Any]:
    """Autocast for evaluation: the training dtype on CUDA, fp32 on CPU. A CPU evaluates in fp32 because
    the numbers it reports are the ones the app reproduces (its backends run fp32 on CPU): bf16 moved a
    DAF-CNN checkpoint's PublicTest accuracy from 36.47 % to 36.61 %."""
    if amp is None or device.type != "cuda":
        return nullcontext
    return lambda: torch.autocast(device.type, dtype=amp)


def _rng_state() -> dict[str, Any]:
    """Python, numpy, torch and CUDA RNG states as tensors/plain containers (weights_only-safe)."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(s: dict[str, Any]) -> None:
    p = s["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss"]))
    n = s["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(s["torch"])
    if s.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def _atomic_torch_save(obj: Any, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def _atomic_text(path: Path, text: str) -> None:
    atomic_write_text(path, text)


def _git_commit() -> str | None:
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=5).stdout.strip()
        if not sha:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


# ============================================================================================= data


@dataclass
class Batch:
    """One training/evaluation batch, on the training device.

    ``inputs``: one normalised float ``(B,C,S,S)`` tensor per view (``input`` = the first);
    ``label``: int64 ``(B,)`` (-1 = no class label); ``soft``: float ``(B,K)`` or None;
    ``va``: float ``(B,2)`` (NaN = missing) or None; ``index``: dataset indices ``(B,)``.
    """

    inputs: list[torch.Tensor]
    label: torch.Tensor
    index: torch.Tensor
    soft: torch.Tensor | None = None
    va: torch.Tensor | None = None

    @property
    def input(self) -> torch.Tensor:
        return self.inputs[0]

    def __len__(self) -> int:
        return int(self.label.shape[0])


class _Batches:
    """Common part of the batch providers: augmentation per view + ``to_model_input``."""

    channels_last = False  # hand out NHWC-strided inputs (the Trainer sets it from the config)

    def __init__(self, spec: InputSpec, device: torch.device, batch_size: int,
                 augment: Sequence[BatchAugment] | None, views: int, shuffle: bool, drop_last: bool, seed: int):
        self.spec, self.device, self.batch_size = spec, device, int(batch_size)
        self.views = max(1, int(views))
        augs = list(augment) if augment else []
        if augs and len(augs) not in (1, self.views):
            raise ValueError(f"{len(augs)} augmentations for {self.views} views")
        self.augments = augs * self.views if len(augs) == 1 else augs
        self.shuffle, self.drop_last = shuffle, drop_last
        self.order_gen = torch.Generator().manual_seed(seed)
        self.aug_gen = torch.Generator().manual_seed(seed + 7919)

    def _num(self, n: int) -> int:
        if self.drop_last and n >= self.batch_size:
            return n // self.batch_size
        return math.ceil(n / self.batch_size)

    def _order(self, n: int) -> torch.Tensor:
        if self.shuffle:
            return torch.randperm(n, generator=self.order_gen)
        return torch.arange(n)

    def _assemble(self, x: torch.Tensor, label: torch.Tensor, index: torch.Tensor,
                  soft: torch.Tensor | None, va: torch.Tensor | None) -> Batch:
        if self.augments:
            inputs = [self._prepare(aug(x, self.aug_gen)) for aug in self.augments]
        else:
            xi = self._prepare(x)
            inputs = [xi] * self.views
        return Batch(inputs, label, index, soft, va)

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        xi = to_model_input(x, self.spec)
        return xi.contiguous(memory_format=torch.channels_last) if self.channels_last else xi

    def state_dict(self) -> dict[str, Any]:
        return {"order": self.order_gen.get_state(), "aug": self.aug_gen.get_state()}

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.order_gen.set_state(s["order"])
        self.aug_gen.set_state(s["aug"])


class TensorBatches(_Batches):
    """In-memory dataset: uint8 images kept as one tensor on the training device, batches cut by index
    and augmented as whole batches (no per-image Python, no DataLoader)."""

    def __init__(self, ds: Any, spec: InputSpec, device: torch.device, batch_size: int,
                 augment: Sequence[BatchAugment] | None = None, views: int = 1, shuffle: bool = False,
                 drop_last: bool = False, seed: int = 0):
        super().__init__(spec, device, batch_size, augment, views, shuffle, drop_last, seed)
        images = torch.as_tensor(ds.images)
        self.images = to_nchw_uint8(images).contiguous().to(device)
        self.labels = torch.as_tensor(ds.labels, dtype=torch.int64).to(device)
        soft = getattr(ds, "soft_labels", None)
        va = getattr(ds, "va", None)
        self.soft = None if soft is None else torch.as_tensor(soft, dtype=torch.float32).to(device)
        self.va = None if va is None else torch.as_tensor(va, dtype=torch.float32).to(device)
        self.n = int(self.labels.shape[0])

    def __len__(self) -> int:
        return self._num(self.n)

    def __iter__(self) -> Iterator[Batch]:
        return self.iter_batches()

    def iter_batches(self, limit: int | None = None) -> Iterator[Batch]:
        order = self._order(self.n).to(self.device)
        for b in range(len(self) if limit is None else min(limit, len(self))):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            yield self._assemble(
                self.images[idx], self.labels[idx], idx,
                None if self.soft is None else self.soft[idx], None if self.va is None else self.va[idx],
            )


class _OrderSampler(torch.utils.data.Sampler):
    def __init__(self, n: int):
        self.order: list[int] = list(range(n))

    def __iter__(self):
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.order)


def _collate(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    imgs = [to_nchw_uint8(torch.as_tensor(it["image"]).unsqueeze(0))[0] for it in items]
    shapes = {tuple(i.shape) for i in imgs}
    if len(shapes) > 1:
        raise TrainError(f"on-disk dataset returned faces of different shapes {sorted(shapes)[:3]}; "
                         "its reader must resize every face to one image_size")
    out = {"image": torch.stack(imgs),
           "label": torch.tensor([int(it["label"]) for it in items], dtype=torch.int64),
           "index": torch.tensor([int(it["index"]) for it in items], dtype=torch.int64)}
    if "soft" in items[0]:
        out["soft"] = torch.stack([torch.as_tensor(it["soft"], dtype=torch.float32) for it in items])
    if "va" in items[0]:
        out["va"] = torch.stack([torch.as_tensor(it["va"], dtype=torch.float32) for it in items])
    return out


class LoaderBatches(_Batches):
    """On-disk dataset: decoded by DataLoader workers, then augmented on the device as whole batches."""

    def __init__(self, ds: Any, spec: InputSpec, device: torch.device, batch_size: int,
                 augment: Sequence[BatchAugment] | None = None, views: int = 1, shuffle: bool = False,
                 drop_last: bool = False, seed: int = 0, workers: int = 4):
        super().__init__(spec, device, batch_size, augment, views, shuffle, drop_last, seed)
        self.n = len(ds)
        self.sampler = _OrderSampler(self.n)
        self.loader = torch.utils.data.DataLoader(
            ds, batch_size=self.batch_size, sampler=self.sampler, num_workers=workers,
            collate_fn=_collate, pin_memory=device.type == "cuda", drop_last=drop_last and self.n >= self.batch_size,
            generator=torch.Generator().manual_seed(seed + 1),
        )

    def __len__(self) -> int:
        return self._num(self.n)

    def __iter__(self) -> Iterator[Batch]:
        return self.iter_batches()

    def iter_batches(self, limit: int | None = None) -> Iterator[Batch]:
        order = self._order(self.n)
        if limit is not None:  # the loader then ends by itself: abandoning one mid-way stalls its workers
            order = order[: limit * self.batch_size]
        self.sampler.order = order.tolist()
        nb = self.device.type == "cuda"
        for d in self.loader:
            d = {k: v.to(self.device, non_blocking=nb) for k, v in d.items()}
            yield self._assemble(d["image"], d["label"], d["index"], d.get("soft"), d.get("va"))


@dataclass
class DataInfo:
    """What the model builder needs to know about the data."""

    name: str
    label_names: tuple[str, ...]
    channels: int
    image_size: int
    has_va: bool
    has_soft: bool
    train_size: int
    val_size: int
    train_split: str
    val_split: str | None
    in_memory: bool

    @property
    def num_classes(self) -> int:
        return len(self.label_names)


def open_dataset(name: str, data_dir: str | None, split: str, opts: dict[str, Any] | None = None) -> Any:
    """``trainers.data.load_dataset`` (one place, so tests can substitute datasets)."""
    from trainers.data import DatasetError, load_dataset

    try:
        return load_dataset(name, data_dir, split, **(opts or {}))
    except DatasetError as exc:
        raise TrainError(str(exc)) from None


TRAIN_SPLITS = ("train", "training")
VAL_SPLITS = ("publictest", "val", "valid", "validation", "test")


def default_splits(name: str) -> tuple[str, str | None]:
    """(training split, validation split) of a dataset, from ``trainers.data.dataset_splits``."""
    try:
        from trainers.data import dataset_splits

        splits = dataset_splits(name)
    except (ImportError, KeyError, ValueError):
        return "train", "val"
    names = list(splits.keys()) if isinstance(splits, dict) else list(splits)
    low = [s.lower() for s in names]
    train = next((names[low.index(s)] for s in TRAIN_SPLITS if s in low), names[0] if names else "train")
    val = next((names[low.index(s)] for s in VAL_SPLITS if s in low), None)
    if val is None:
        val = next((s for s in names if s != train), None)
    return train, val


def subset(ds: Any, n: int, seed: int) -> Any:
    """A seeded random subset of ``n`` items (kept in dataset order)."""
    if n <= 0 or n >= len(ds):
        return ds
    idx = np.sort(np.random.default_rng(seed).choice(len(ds), size=n, replace=False))
    return ds.subset(idx)


def load_data(cfg: TrainConfig, datasets: tuple[Any, Any] | None = None) -> tuple[Any, Any | None, DataInfo]:
    """Open the training and validation splits (``datasets`` = (train, val) given in-process skips the readers)."""
    train_split, val_split = default_splits(cfg.data) if datasets is None else ("train", "val")
    train_split = cfg.train_split or train_split
    if cfg.val_split is not None:
        val_split = None if cfg.val_split.lower() == "none" else cfg.val_split
    if datasets is not None:
        train_ds, val_ds = datasets
    else:
        train_ds = open_dataset(cfg.data, cfg.data_dir, train_split, cfg.data_opts)
        val_ds = open_dataset(cfg.data, cfg.data_dir, val_split, cfg.data_opts) if val_split else None
    if val_ds is None:
        val_split = None
    full = len(train_ds)
    train_ds = subset(train_ds, cfg.limit_train, cfg.seed)
    if val_ds is not None:
        val_ds = subset(val_ds, cfg.limit_val, cfg.seed + 1)
    images = getattr(train_ds, "images", None)
    if images is not None:
        if images.ndim == 3:  # (N,H,W) grey
            channels, image_size = 1, int(images.shape[1])
        elif images.shape[-1] in (1, 3):  # (N,H,W,C)
            channels, image_size = int(images.shape[-1]), int(images.shape[1])
        else:  # (N,C,H,W)
            channels, image_size = int(images.shape[1]), int(images.shape[2])
    else:
        channels = int(getattr(train_ds, "channels", 3))
        image_size = int(getattr(train_ds, "image_size", 112))
    info = DataInfo(
        name=cfg.data, label_names=tuple(train_ds.label_names), channels=cfg.channels or channels,
        image_size=image_size, has_va=getattr(train_ds, "va", None) is not None,
        has_soft=getattr(train_ds, "soft_labels", None) is not None, train_size=len(train_ds),
        val_size=0 if val_ds is None else len(val_ds), train_split=train_split, val_split=val_split,
        in_memory=images is not None,
    )
    log.info("data: %s %s %d faces%s, %s %s; %d classes %s; %dpx x%d %s", cfg.data, train_split, len(train_ds),
             f" (of {full})" if len(train_ds) < full else "", val_split, info.val_size, info.num_classes,
             list(info.label_names), image_size, channels, "in memory" if info.in_memory else "on disk")
    return train_ds, val_ds, info


def make_batches(ds: Any, spec: InputSpec, device: torch.device, batch_size: int, *,
                 augment: Sequence[BatchAugment] | None = None, views: int = 1, shuffle: bool = False,
                 drop_last: bool = False, seed: int = 0, workers: int = 4) -> _Batches:
    """The right batch provider for ``ds``: in memory -> :class:`TensorBatches`, else :class:`LoaderBatches`."""
    if getattr(ds, "images", None) is not None:
        return TensorBatches(ds, spec, device, batch_size, augment, views, shuffle, drop_last, seed)
    if hasattr(ds, "image_size"):  # decode straight to the model's size and channels
        ds.image_size = spec.size
    if hasattr(ds, "channels"):
        ds.channels = spec.channels
    return LoaderBatches(ds, spec, device, batch_size, augment, views, shuffle, drop_last, seed, workers)


def benchmark_batches(batches: _Batches, max_batches: int = 20) -> float:
    """Images/s of the data pipeline alone (decode/gather + augment + normalise), no model.

    In memory: the median batch rate over ``max_batches`` batches after 2 warm-up ones, so that a moment
    of CPU contention does not decide the figure. DataLoader (workers prefetch, so single batches say
    nothing): all timed images over the total time. Leaves every generator (the provider's and the
    global ones) as it found them.
    """
    saved, rng = batches.state_dict(), _rng_state()
    sync = torch.cuda.synchronize if batches.device.type == "cuda" else (lambda: None)
    rates: list[float] = []
    n, t0 = 0, 0.0
    try:
        sync()
        t = time.perf_counter()
        for i, b in enumerate(batches.iter_batches(limit=max_batches + 2)):
            sync()
            now = time.perf_counter()
            if i >= 2:  # warm-up: workers, allocator, kernels
                rates.append(len(b) * len(b.inputs) / max(now - t, 1e-9))
                n += len(b) * len(b.inputs)
            else:
                t0 = now
            t = now
    finally:
        batches.load_state_dict(saved)
        _set_rng_state(rng)
    if not rates:
        return float("nan")
    if isinstance(batches, TensorBatches):
        return float(np.median(rates))
    return n / max(t - t0, 1e-9)


# ================================================================================ method building blocks


class MomentumEncoder:
    """An EMA copy of a module, ``k <- m k + (1 - m) q`` after each step (buffers copied) -- ECAN's
    momentum encoder (MoCo eq. 1). Register it: ``trainer.register_state("ema", enc)``."""

    def __init__(self, module: nn.Module, momentum: float = 0.999):
        self.module = copy.deepcopy(module).requires_grad_(False)
        self.momentum = float(momentum)

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        ema_p = [p for p in self.module.parameters()]
        src_p = [p.detach() for p in module.parameters()]
        torch._foreach_lerp_(ema_p, src_p, 1.0 - self.momentum)
        for b_ema, b in zip(self.module.buffers(), module.buffers()):
            b_ema.copy_(b)

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "momentum": self.momentum}

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.module.load_state_dict(s["module"])
        self.momentum = float(s["momentum"])


class FeatureQueue:
    """A ring buffer of ``size`` features with their labels (and the step they were written) -- ECAN's
    memory bank (MoCo queue). ``push`` overwrites the oldest; ``get()`` returns the filled part."""

    def __init__(self, size: int, dim: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.size, self.dim = int(size), int(dim)
        self.features = torch.zeros(self.size, self.dim, device=device, dtype=dtype)
        self.labels = torch.full((self.size,), -1, dtype=torch.int64, device=device)
        self.ptr = 0
        self.count = 0

    @torch.no_grad()
    def push(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        n = features.shape[0]
        if n > self.size:
            features, labels, n = features[-self.size:], labels[-self.size:], self.size
        idx = (self.ptr + torch.arange(n, device=self.features.device)) % self.size
        self.features[idx] = features.detach().to(self.features.dtype)
        self.labels[idx] = labels.to(torch.int64)
        self.ptr = (self.ptr + n) % self.size
        self.count = min(self.count + n, self.size)

    def get(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.count < self.size:
            return self.features[: self.count], self.labels[: self.count]
        return self.features, self.labels

    @property
    def full(self) -> bool:
        return self.count >= self.size

    def state_dict(self) -> dict[str, Any]:
        return {"features": self.features, "labels": self.labels, "ptr": self.ptr, "count": self.count}

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.features.copy_(s["features"])
        self.labels.copy_(s["labels"])
        self.ptr, self.count = int(s["ptr"]), int(s["count"])


def forward_with_blocks(model: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    """The model's outputs plus ``"blocks"``: its ``forward_blocks`` features, in ONE forward pass.

    Uses ``model.forward_with_blocks`` when the model has one; otherwise models shaped like ours
    (``forward_blocks`` -> ``pool`` -> ``head``, e.g. fastcnn, resnet18).
    """
    if hasattr(model, "forward_with_blocks"):
        return model.forward_with_blocks(x)
    if all(hasattr(model, a) for a in ("forward_blocks", "pool", "head")):
        feats = model.forward_blocks(x)
        out = dict(model.head(torch.flatten(model.pool(feats[-1]), 1)))
        out["blocks"] = feats
        return out
    raise TypeError(f"{type(model).__name__} has no forward_with_blocks nor forward_blocks/pool/head")


# ========================================================================= optimisers and schedules


def make_optimizer(name: str, params: Iterable[Any], *, lr: float, momentum: float = 0.9, nesterov: bool = False,
                   weight_decay: float = 0.0, betas: Sequence[float] = (0.9, 0.999)) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0,
                               weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay)
    raise TrainError(f"unknown optimizer {name!r}; use sgd, adam or adamw")


@dataclass
class Schedule:
    """An lr scheduler and when it steps: ``interval`` "epoch" or "step"; ``monitor`` (a validation metric)
    for ReduceLROnPlateau; ``reload_best``: reload the best weights whenever it lowers the lr."""

    scheduler: Any
    interval: str = "epoch"
    optimizer: str = "main"
    monitor: str | None = None
    reload_best: bool = False


class _WarmupCosine:
    """Per-step factor: linear warm-up then cosine to ``floor`` (picklable, unlike a lambda)."""

    def __init__(self, warmup: int, total: int, floor: float):
        self.warmup, self.total, self.floor = warmup, max(total, 1), floor

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        t = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * t))


def make_schedule(cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int,
                  mode: str = "max", name: str = "main") -> Schedule | None:
    s = cfg.scheduler
    if s == "none":
        return None
    if s == "cosine":
        floor = cfg.min_lr / cfg.lr if cfg.lr > 0 else 0.0
        total = cfg.epochs * steps_per_epoch
        warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
        if warmup > total // 2:  # a short (smoke) run: a warm-up as long as the run would never reach --lr
            log.warning("cosine: %.3g warm-up epochs in a %d-epoch run; warming up over the first 20%% instead",
                        cfg.warmup_epochs, cfg.epochs)
            warmup = total // 5
        fn = _WarmupCosine(warmup, total, floor)
        return Schedule(torch.optim.lr_scheduler.LambdaLR(optimizer, fn), "step", name)
    if s == "step":
        return Schedule(torch.optim.lr_scheduler.StepLR(optimizer, cfg.step_size, cfg.gamma), "epoch", name)
    if s == "multistep":
        return Schedule(torch.optim.lr_scheduler.MultiStepLR(optimizer, list(cfg.milestones), cfg.gamma), "epoch", name)
    if s == "exponential":
        return Schedule(torch.optim.lr_scheduler.ExponentialLR(optimizer, cfg.gamma), "epoch", name)
    if s == "plateau":
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode=mode, factor=cfg.plateau_factor, patience=cfg.plateau_patience,
            threshold=cfg.plateau_threshold, threshold_mode="abs", min_lr=cfg.min_lr)
        return Schedule(sched, "epoch", name, monitor=cfg.best_metric, reload_best=cfg.reload_best)
    raise TrainError(f"unknown scheduler {s!r}")


# ============================================================================================ method


class Method:
    """Base class of every trainer: the hooks the engine calls. Override what the method needs.

    Call order: ``build_model`` -> ``build_augment`` -> ``build_optimizers`` -> ``build_schedulers`` ->
    ``setup`` -> [resume: ``load_state_dict``, then weights/optimisers] | [fresh: ``before_training``] ->
    per epoch: ``on_epoch_start``, per step ``training_step`` (+ engine backward/step) -> ``after_step``,
    then ``eval_step`` over the validation set -> ``on_epoch_end``.
    """

    name: ClassVar[str] = "method"
    defaults: ClassVar[dict[str, Any]] = {}      # TrainConfig fields (and own flags) -> paper defaults
    views: ClassVar[int] = 1                     # augmented views per image (ECAN: 2)
    manual_optimization: ClassVar[bool] = False  # True: training_step calls trainer.step() itself (AVCE)

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.trainer: Trainer | None = None
        self.arch: str = ""
        self.arch_kwargs: dict[str, Any] = {}

    # -- conveniences
    @property
    def model(self) -> nn.Module:
        return self.trainer.model

    @property
    def device(self) -> torch.device:
        return self.trainer.device

    # -- command line
    @classmethod
    def add_args(cls, parser: argparse._ActionsContainer) -> None:
        """Method-specific flags (their values land in ``cfg.extra``)."""

    # -- building
    def build_model(self, data: DataInfo) -> nn.Module:
        """The network to train; set ``self.arch`` / ``self.arch_kwargs`` for the checkpoint."""
        raise NotImplementedError

    def export_model(self) -> nn.Module:
        """The inference network written to best/last checkpoints (rebuildable from arch + arch_kwargs)."""
        return self.trainer.model

    def input_spec(self, model: nn.Module, data: DataInfo) -> InputSpec:
        """The checkpoint's input spec: size/channels from the flags, else the model's defaults."""
        d = dict(getattr(model, "default_input", {}) or {})
        size = self.cfg.input_size or int(d.get("size", data.image_size))
        kw: dict[str, Any] = {"size": size, "channels": data.channels}
        for k in ("mean", "std"):
            if k in d:
                kw[k] = d[k]
        if self.cfg.crop_margin is not None:
            kw["crop_margin"] = self.cfg.crop_margin
        return InputSpec(**kw)

    def build_augment(self) -> list[BatchAugment]:
        """One augmentation for all views, or one per view."""
        return [BatchAugment(augment_config(self.cfg.augment, self.cfg.aug))]

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": [p for p in self.model.parameters() if p.requires_grad]}]

    def build_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        c = self.cfg
        return {"main": make_optimizer(c.optimizer, self.param_groups(), lr=c.lr, momentum=c.momentum,
                                       nesterov=c.nesterov, weight_decay=c.weight_decay, betas=c.betas)}

    def build_schedulers(self, optimizers: dict[str, torch.optim.Optimizer], steps_per_epoch: int) -> dict[str, Schedule]:
        s = make_schedule(self.cfg, optimizers["main"], steps_per_epoch, self.trainer.best_mode)
        return {"main": s} if s else {}

    def setup(self) -> None:
        """Everything is built: create EMA encoders, queues, centres; ``trainer.register_state`` them."""

    def before_training(self) -> None:
        """Fresh runs only (not on resume), before epoch 1: e.g. fill a memory queue by a frozen pass."""

    # -- loop
    def on_epoch_start(self, epoch: int) -> None:
        """``epoch`` is 1-based. E.g. add a branch and its param group (ESR)."""

    def training_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Forward + losses. Return ``{"loss": total, ...logs}`` or ``{"loss/<optimiser>": ...}``;
        with ``manual_optimization`` call ``self.trainer.step(loss, name)`` here and return logs."""
        raise NotImplementedError

    def after_step(self, batch: Batch, logs: dict[str, torch.Tensor]) -> None:
        """After the optimiser step(s): EMA update, queue push, centre update."""

    def eval_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Outputs used for evaluation: ``"logits"``, ``"va"``, optional ``"logits_<name>"``."""
        return self.model(batch.input)

    def on_epoch_end(self, epoch: int, metrics: dict[str, Any]) -> None:
        """After evaluation, before checkpoints and state are written."""

    # -- state (resume); tensors and plain containers only
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Called before the weights and optimisers are loaded: rebuild structure (branches) here."""


# ======================================================================================== evaluation


def _flatten(prefix: str, d: Any, out: dict[str, Any]) -> None:
    if isinstance(d, dict):
        for k, v in d.items():
            _flatten(f"{prefix}_{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = d


PERCENT_METRICS = ("accuracy", "mean_class_accuracy", "macro_f1")


@torch.no_grad()
def evaluate(step: Callable[[Batch], dict[str, torch.Tensor]], batches: _Batches, label_names: Sequence[str],
             autocast: Callable[[], Any] = nullcontext, desc: str = "eval") -> dict[str, Any]:
    """Run ``step`` over ``batches`` and compute metrics (trainers.metrics).

    Classification (when the outputs have ``"logits"`` and items have labels): ``accuracy``,
    ``mean_class_accuracy``, ``macro_f1`` (percent), ``confusion_matrix``, ``loss`` (cross-entropy);
    ``accuracy_<name>`` for extra ``"logits_<name>"`` outputs. Valence/arousal (outputs ``"va"`` and
    targets present): RMSE, SAGR, PCC, CCC per dimension (and their means).
    """
    from tqdm import tqdm

    preds: dict[str, list[torch.Tensor]] = {}
    labels, va_p, va_t = [], [], []
    loss_sum, loss_n = torch.zeros((), dtype=torch.float64), 0
    for batch in tqdm(batches, desc=desc, leave=False, disable=None):
        with autocast():
            out = step(batch)
        lab = batch.label
        if "logits" in out:
            logits = out["logits"].float()
            valid = lab >= 0
            if bool(valid.any()):
                loss_sum += F.cross_entropy(logits[valid], lab[valid], reduction="sum").double().cpu()
                loss_n += int(valid.sum())
        for k, v in out.items():
            if k == "logits" or k.startswith("logits_"):
                preds.setdefault(k, []).append(v.float().argmax(1).cpu())
        labels.append(lab.cpu())
        if "va" in out and batch.va is not None:
            va_p.append(out["va"].float().cpu())
            va_t.append(batch.va.float().cpu())
    metrics: dict[str, Any] = {"n": int(sum(len(x) for x in labels))}
    if not labels:
        return metrics
    y = torch.cat(labels).numpy()
    if "logits" in preds and (y >= 0).any():
        from trainers.metrics import classification_report

        keep = y >= 0
        yp = torch.cat(preds["logits"]).numpy()
        rep = classification_report(y[keep], yp[keep], list(label_names))
        for k in PERCENT_METRICS:  # trainers.metrics gives fractions; the engine reports percent
            metrics[k] = 100.0 * float(rep[k])
        metrics["confusion_matrix"] = [list(map(int, r)) for r in rep["confusion_matrix"]]
        metrics["per_class"] = rep.get("per_class", {})
        metrics["loss"] = float(loss_sum / max(loss_n, 1))
        for k, p in preds.items():
            if k != "logits":
                metrics["accuracy" + k[len("logits"):]] = float((torch.cat(p).numpy()[keep] == y[keep]).mean() * 100)
    if va_p:
        from trainers.metrics import regression_report

        vp, vt = torch.cat(va_p).numpy(), torch.cat(va_t).numpy()
        if np.isfinite(vt).all(1).any():
            rep = regression_report(vt, vp)  # {"n", "valence": {rmse, sagr, pcc, ccc}, "arousal": {...}, "mean_ccc"}
            rep["va_n"] = rep.pop("n")
            flat: dict[str, Any] = {}
            _flatten("", rep, flat)  # valence_rmse, ..., arousal_ccc, mean_ccc, va_n
            metrics.update(flat)
    return metrics


def format_report(metrics: dict[str, Any], label_names: Sequence[str], title: str = "") -> str:
    """Human-readable metrics and confusion matrix (rows: true, columns: predicted)."""
    lines = [title] if title else []
    main_keys = ("n", "accuracy", "mean_class_accuracy", "macro_f1", "loss")
    for k in main_keys:
        if k not in metrics:
            continue
        v = metrics[k]
        if k == "n":
            lines.append(f"  {k:<20} {v}")
        elif k == "loss":
            lines.append(f"  {k:<20} {v:.4f}")
        else:
            lines.append(f"  {k:<20} {v:.2f}%")
    for k, v in metrics.items():
        if k not in main_keys and isinstance(v, (int, float)):
            lines.append(f"  {k:<20} {v:.4f}")
    cm = metrics.get("confusion_matrix")
    if cm is not None:
        from trainers.metrics import format_confusion

        lines.append("  " + format_confusion(np.asarray(cm), list(label_names)).replace("\n", "\n  "))
    return "\n".join(lines)


# ============================================================================================ trainer


class Trainer:
    """Builds a run from a config and a method, then :meth:`fit` trains it.

    ``datasets=(train, val)`` uses in-memory datasets instead of ``--data`` (tests, notebooks);
    ``callbacks`` are objects with optional ``on_step_end(trainer, epoch, step)`` and
    ``on_epoch_end(trainer, epoch, row)`` (after the metrics row is logged, before ``state.pt``).
    """

    def __init__(self, cfg: TrainConfig, method: Method | type[Method], *, datasets: tuple[Any, Any] | None = None,
                 callbacks: Sequence[Any] = (), argv: Sequence[str] | None = None):
        self.method = method(cfg) if isinstance(method, type) else method
        self.method.trainer = self
        cfg.method = cfg.method or self.method.name
        self.cfg = cfg
        self.callbacks = list(callbacks)
        self.argv = list(argv) if argv is not None else [sys.executable, *sys.argv]
        self.out = Path(cfg.out)
        self.state_path = self.out / STATE_FILE
        self._check_out()
        seed_everything(cfg.seed)
        self.device = select_device(cfg.device)
        self.amp_dtype = amp_dtype_for(cfg, self.device)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = not cfg.deterministic
            if cfg.deterministic:
                torch.use_deterministic_algorithms(True, warn_only=True)
        self.best_mode = self._best_mode()
        self.extra_state: dict[str, Any] = {}
        self.epoch = 0            # completed epochs
        self.global_step = 0
        self.best_value: float | None = None
        self.best_epoch = 0
        self.history: list[dict[str, Any]] = []
        self.resumed = False
        self.data_ips: float | None = None
        self.writer = None
        self.first_argv, self.resume_argvs = self.argv, []  # the command that started the run, and resumes

        self.train_ds, self.val_ds, self.data = load_data(cfg, datasets)
        self.model = self.method.build_model(self.data).to(self.device)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.spec = self.method.input_spec(self.model, self.data)
        bs = cfg.batch_size
        self.train_batches = make_batches(
            self.train_ds, self.spec, self.device, bs, augment=self.method.build_augment(),
            views=self.method.views, shuffle=True, drop_last=len(self.train_ds) > bs, seed=cfg.seed, workers=cfg.workers)
        self.val_batches = None if self.val_ds is None else make_batches(
            self.val_ds, self.spec, self.device, cfg.eval_batch_size or 2 * bs, seed=cfg.seed, workers=cfg.workers)
        for b in (self.train_batches, self.val_batches):
            if b is not None:
                b.channels_last = cfg.channels_last
        self.optimizers = self.method.build_optimizers()
        self.schedules = self.method.build_schedulers(self.optimizers, len(self.train_batches))
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.method.setup()
        n_params = sum(p.numel() for p in self.model.parameters())
        log.info("model: %s %s (%.2fM params), input %s; device %s%s", self.method.arch or type(self.model).__name__,
                 self.method.arch_kwargs, n_params / 1e6, self.spec.to_dict(), self.device,
                 f", AMP {self.amp_dtype}" if self.amp_dtype else "")
        if cfg.resume:
            if self.state_path.exists():
                self._load_state(torch.load(self.state_path, map_location="cpu", weights_only=True))
            else:
                log.warning("--resume: no %s in %s; starting a fresh run", STATE_FILE, self.out)

    # ---------------------------------------------------------------- helpers for methods
    def autocast(self):
        """Mixed-precision context for forward passes (no-op on CPU / --no-amp)."""
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def register_state(self, name: str, obj: Any) -> Any:
        """Include ``obj.state_dict()`` in state.pt (and restore it on resume). Returns ``obj``."""
        if name in self.extra_state:
            raise ValueError(f"state {name!r} registered twice")
        self.extra_state[name] = obj
        return obj

    def add_param_group(self, optimizer: str, group: dict[str, Any]) -> None:
        """Add parameters (a new branch) to an optimiser during training, with its own lr (ESR)."""
        opt = self.optimizers[optimizer]
        opt.add_param_group(group)
        g = opt.param_groups[-1]
        g.setdefault("initial_lr", g["lr"])
        for s in self.schedules.values():
            if s.optimizer != optimizer:
                continue
            sch = s.scheduler
            if hasattr(sch, "base_lrs"):
                sch.base_lrs.append(g["initial_lr"])
            if hasattr(sch, "min_lrs"):
                sch.min_lrs.append(sch.min_lrs[-1] if sch.min_lrs else 0.0)
            if hasattr(sch, "_last_lr"):
                sch._last_lr = [gr["lr"] for gr in opt.param_groups]
            if hasattr(sch, "lr_lambdas"):
                sch.lr_lambdas.append(sch.lr_lambdas[-1])

    def step(self, loss: torch.Tensor, *optimizers: str) -> None:
        """zero_grad, backward, (clip), step for the named optimisers (all when none named).

        For ``manual_optimization`` methods; may be called several times per training step.
        """
        opts = [self.optimizers[n] for n in (optimizers or self.optimizers)]
        for o in opts:
            o.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        for o in opts:
            self._clip_and_step(o)

    def _clip_and_step(self, opt: torch.optim.Optimizer) -> None:
        if self.cfg.grad_clip > 0:
            self.scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], self.cfg.grad_clip)
        self.scaler.step(opt)

    def _optimize(self, logs: dict[str, torch.Tensor]) -> None:
        per_opt = {k.split("/", 1)[1]: v for k, v in logs.items() if k.startswith("loss/")}
        if not per_opt:
            if "loss" not in logs:
                raise TrainError(f"{self.method.name}.training_step returned no 'loss' (got {sorted(logs)})")
            self.step(logs["loss"])
            return
        unknown = sorted(set(per_opt) - set(self.optimizers))
        if unknown:
            raise TrainError(f"losses for unknown optimisers {unknown}; optimisers: {sorted(self.optimizers)}")
        # each optimiser steps on the gradient of its own loss, all taken from the same forward pass
        grads = {}
        for name, loss in per_opt.items():
            params = [p for g in self.optimizers[name].param_groups for p in g["params"] if p.requires_grad]
            gs = torch.autograd.grad(self.scaler.scale(loss), params, retain_graph=True, allow_unused=True)
            grads[name] = (params, gs)
        for name, (params, gs) in grads.items():
            opt = self.optimizers[name]
            opt.zero_grad(set_to_none=True)
            for p, g in zip(params, gs):
                p.grad = g
            self._clip_and_step(opt)
            opt.zero_grad(set_to_none=True)

    def make_batches(self, ds: Any, *, augment: bool = False, views: int = 1, shuffle: bool = False,
                     seed: int | None = None, batch_size: int | None = None) -> _Batches:
        """A batch provider over any dataset (e.g. the frozen pass that fills ECAN's queue)."""
        aug = self.method.build_augment() if augment else None
        return make_batches(ds, self.spec, self.device, batch_size or self.cfg.batch_size, augment=aug, views=views,
                            shuffle=shuffle, seed=self.cfg.seed + 17 if seed is None else seed, workers=self.cfg.workers)

    def lr(self, optimizer: str = "main", group: int = 0) -> float:
        return float(self.optimizers[optimizer].param_groups[group]["lr"])

    # ---------------------------------------------------------------- loop
    def train_one_epoch(self, epoch: int) -> dict[str, float]:
        from tqdm import tqdm

        self.model.train()
        self.method.on_epoch_start(epoch)
        sums: dict[str, torch.Tensor] = {}
        n_img, t_data = 0, 0.0
        step_scheds = [s for s in self.schedules.values() if s.interval == "step"]
        t0 = time.perf_counter()
        it = iter(self.train_batches)
        n_steps = len(self.train_batches)
        bar = tqdm(total=n_steps, desc=f"epoch {epoch}/{self.cfg.epochs}", leave=False, disable=None)
        # without a terminal (nohup, a log file) tqdm stays silent: say where the epoch is now and then instead
        next_note = _clock() + PROGRESS_EVERY_S if bar.disable else float("inf")
        step = 0
        while True:
            td = time.perf_counter()
            batch = next(it, None)
            t_data += time.perf_counter() - td
            if batch is None:
                break
            if self.method.manual_optimization:
                logs = self.method.training_step(batch)
            else:
                with self.autocast():
                    logs = self.method.training_step(batch)
                self._optimize(logs)
            if self.scaler.is_enabled():
                self.scaler.update()
            self.method.after_step(batch, logs)
            for s in step_scheds:
                s.scheduler.step()
            self.global_step += 1
            step += 1
            n_img += len(batch)
            for k, v in logs.items():
                if isinstance(v, torch.Tensor) and v.numel() == 1:
                    v = v.detach().float() * len(batch)
                    sums[k] = sums[k] + v if k in sums else v
                elif isinstance(v, (int, float)):
                    sums[k] = sums.get(k, 0.0) + float(v) * len(batch)
            if self.cfg.log_every and step % self.cfg.log_every == 0:
                cur = {k: float(v) / n_img for k, v in sums.items()}
                bar.set_postfix({k: f"{v:.4f}" for k, v in list(cur.items())[:3]})
                if self.writer is not None:
                    for k, v in cur.items():
                        self.writer.add_scalar(f"train_step/{k}", v, self.global_step)
            bar.update(1)
            if step < n_steps and _clock() >= next_note:
                next_note = _clock() + PROGRESS_EVERY_S
                self._note_progress(epoch, step, n_steps, n_img, time.perf_counter() - t0, sums)
            for cb in self.callbacks:
                if hasattr(cb, "on_step_end"):
                    cb.on_step_end(self, epoch, step)
        bar.close()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dt = time.perf_counter() - t0
        res = {f"train_{k.replace('/', '_')}": float(v) / max(n_img, 1) for k, v in sums.items()}
        res.update(train_images=n_img, train_ips=n_img / dt if dt > 0 else float("nan"),
                   data_ips=n_img / t_data if t_data > 0 else float("nan"), epoch_time=dt)
        return res

    def _note_progress(self, epoch: int, step: int, n_steps: int, n_img: int, elapsed: float,
                       sums: dict[str, Any]) -> None:
        """One log line on a long epoch's progress (used when there is no progress bar)."""
        ips = n_img / elapsed if elapsed > 0 else float("nan")
        left = elapsed / step * (n_steps - step) if step else float("nan")
        keys = sorted(sums, key=lambda k: k != "loss")[:3]  # the total first, then the method's first terms
        losses = ", ".join(f"{k} {float(sums[k]) / max(n_img, 1):.4f}" for k in keys)
        log.info("epoch %d/%d: step %d/%d (%d%%), %s; %.1f img/s, training ends in %s (then evaluation)",
                 epoch, self.cfg.epochs, step, n_steps, 100 * step // max(n_steps, 1), losses or "no losses yet",
                 ips, _hms(left))

    def evaluate(self) -> dict[str, Any]:
        if self.val_batches is None:
            return {}
        self.model.eval()
        return evaluate(self.method.eval_step, self.val_batches, self.data.label_names,
                        eval_autocast(self.device, self.amp_dtype),
                        desc=f"eval {self.data.val_split}")

    def fit(self) -> dict[str, Any]:
        """Train to ``cfg.epochs`` (from the resumed epoch); returns the last epoch's metrics row."""
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        self._write_args()
        self.writer = self._open_writer()
        if not self.resumed:
            self.method.before_training()
        if cfg.bench_batches > 0:
            self.data_ips = benchmark_batches(self.train_batches, cfg.bench_batches)
            log.info("data pipeline alone: %.0f images/s (%s, batch %d, %d view(s), %s)", self.data_ips,
                     "in memory" if self.data.in_memory else f"{cfg.workers} workers", cfg.batch_size,
                     self.method.views, self.device)
        row: dict[str, Any] = {}
        requested, started, durations = cfg.epochs, _clock(), []
        epoch = self.epoch
        while epoch < cfg.epochs:
            epoch += 1
            t_epoch = _clock()
            lrs = {n: self.lr(n) for n in self.optimizers}
            train = self.train_one_epoch(epoch)
            metrics = self.evaluate()
            self.method.on_epoch_end(epoch, metrics)
            self.epoch = epoch
            improved = self._update_best(metrics)
            self._save_checkpoints(metrics, improved)
            self._step_epoch_schedules(metrics)
            row = {"epoch": epoch, "step": self.global_step}
            row.update({f"lr_{n}" if len(lrs) > 1 else "lr": v for n, v in lrs.items()})
            row.update(train)
            row["data_alone_ips"] = self.data_ips
            row.update({f"val_{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
            row["best"] = self.best_value
            self._log_row(row)
            log.info("epoch %d/%d  loss %.4f  %s  lr %.3g  train %.0f img/s (data %.0f img/s)  %.1fs%s", epoch,
                     cfg.epochs, train.get("train_loss", float("nan")),
                     "  ".join(f"{k} {metrics[k]:.2f}" for k in ("accuracy", "mean_class_accuracy", "macro_f1")
                               if k in metrics), next(iter(lrs.values())), train["train_ips"], train["data_ips"],
                     train["epoch_time"], "  *best*" if improved else "")
            for cb in self.callbacks:
                if hasattr(cb, "on_epoch_end"):
                    cb.on_epoch_end(self, epoch, row)
            if cfg.time_budget > 0:
                durations.append(_clock() - t_epoch)
                self._fit_to_budget(epoch, requested, _clock() - started, durations)
            self._save_state()
        if self.writer is not None:
            self.writer.close()
        return row

    def _fit_to_budget(self, epoch: int, requested: int, elapsed: float, durations: list[float]) -> None:
        """--time-budget: set cfg.epochs to the epochs that fit (at most ``requested``), judged by the mean
        of the last three epochs (the first one, with its warm-up, counts only until there are more)."""
        recent = (durations[1:] or durations)[-3:]
        per_epoch = sum(recent) / len(recent)
        fit = epoch + int(max(0.0, self.cfg.time_budget - elapsed) // per_epoch)
        target = max(epoch, min(requested, fit))
        if target == self.cfg.epochs:
            return
        # a warning when the run is first cut short; later adjustments are routine
        log.log(logging.WARNING if self.cfg.epochs == requested else logging.INFO,
                "time budget %.0f s: %.1f s per epoch, %.0f s used; the run now ends after epoch %d (of %d asked)",
                self.cfg.time_budget, per_epoch, elapsed, target, requested)
        self.cfg.epochs = target
        self._retime_cosine(target * len(self.train_batches))

    def _retime_cosine(self, total: int, only: str | None = None) -> None:
        """Make every warm-up/cosine schedule (or only the one named) end at step ``total``, and set the
        optimiser's current lr to the re-timed curve."""
        for n, sch in self.schedules.items():
            fns = [f for f in getattr(sch.scheduler, "lr_lambdas", []) if isinstance(f, _WarmupCosine)]
            if not fns or (only is not None and n != only):
                continue
            for f in fns:
                f.total = max(total, 1)
            lam = sch.scheduler
            opt = self.optimizers[sch.optimizer]
            for g, base, fn in zip(opt.param_groups, lam.base_lrs, lam.lr_lambdas):
                g["lr"] = base * fn(lam.last_epoch)
            lam._last_lr = [g["lr"] for g in opt.param_groups]

    # ---------------------------------------------------------------- best / schedules
    def _best_mode(self) -> str:
        if self.cfg.best_mode != "auto":
            return self.cfg.best_mode
        m = self.cfg.best_metric.lower()
        return "min" if any(s in m for s in ("loss", "rmse", "error")) else "max"

    def _metric(self, metrics: dict[str, Any], name: str) -> float | None:
        if not metrics:
            return None
        if name not in metrics:
            avail = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)))
            raise TrainError(f"--best-metric {name!r} is not among the validation metrics {avail}")
        return float(metrics[name])

    def _update_best(self, metrics: dict[str, Any]) -> bool:
        v = self._metric(metrics, self.cfg.best_metric)
        if v is None or not math.isfinite(v):
            return False
        b = self.best_value
        if b is None or (v > b if self.best_mode == "max" else v < b):
            self.best_value, self.best_epoch = v, self.epoch
            return True
        return False

    def _step_epoch_schedules(self, metrics: dict[str, Any]) -> None:
        for name, s in self.schedules.items():
            if s.interval != "epoch":
                continue
            opt = self.optimizers[s.optimizer]
            before = [g["lr"] for g in opt.param_groups]
            if isinstance(s.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                v = self._metric(metrics, s.monitor or self.cfg.best_metric)
                if v is None:
                    raise TrainError("--scheduler plateau needs a validation split (--val-split)")
                s.scheduler.step(v)
            else:
                s.scheduler.step()
            after = [g["lr"] for g in opt.param_groups]
            if s.reload_best and any(a < b for a, b in zip(after, before)):
                self.reload_best()
                log.info("lr %s -> %s: reloaded the best weights (epoch %d)", before[0], after[0], self.best_epoch)

    def reload_best(self) -> None:
        """Load the best epoch's weights (and method state) back into the model (DAF-CNN's lr drops)."""
        path = self.out / BEST_STATE_FILE
        if not path.exists():
            log.warning("no %s to reload", path)
            return
        s = torch.load(path, map_location="cpu", weights_only=True)
        self.method.load_state_dict(s["method"])
        # parameters created after the best epoch (an ESR branch added since) keep their current values
        res = self.model.load_state_dict(s["model"], strict=False)
        if res.unexpected_keys:
            raise TrainError(f"{path}: weights the model does not have: {res.unexpected_keys[:5]}")
        if res.missing_keys:
            log.info("reload-best: %d tensors newer than the best epoch kept as they are", len(res.missing_keys))

    # ---------------------------------------------------------------- files
    def _check_out(self) -> None:
        if self.cfg.eval_only:
            return
        if not self.cfg.resume and self.state_path.exists():
            raise TrainError(f"{self.out} already holds a run ({STATE_FILE}); pass --resume to continue it, "
                             "or choose another --out")

    def _write_args(self) -> None:
        d = {"method": self.method.name, "argv": self.first_argv, "resumed_with": self.resume_argvs,
             "config": self.cfg.to_dict(),
             "resolved": {"device": str(self.device), "amp_dtype": str(self.amp_dtype) if self.amp_dtype else None,
                          "input": self.spec.to_dict(), "arch": self.method.arch, "arch_kwargs": self.method.arch_kwargs,
                          "labels": list(self.data.label_names), "train_split": self.data.train_split,
                          "val_split": self.data.val_split, "train_size": self.data.train_size,
                          "val_size": self.data.val_size, "git_commit": _git_commit()}}
        _atomic_text(self.out / "args.json", json.dumps(d, indent=2, default=str) + "\n")

    def _open_writer(self):
        if not self.cfg.tensorboard:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:  # tensorboard not installed
            log.warning("TensorBoard logging is off (%s); pip install tensorboard", exc)
            return None
        return SummaryWriter(str(self.out / "tb"), purge_step=self.global_step if self.resumed else None)

    def _log_row(self, row: dict[str, Any]) -> None:
        self.history = [r for r in self.history if int(r["epoch"]) < int(row["epoch"])] + [row]
        cols: list[str] = []
        for r in self.history:
            cols += [k for k in r if k not in cols]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in self.history:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})
        _atomic_text(self.out / "metrics.csv", buf.getvalue())
        if self.writer is not None:
            for k, v in row.items():
                if k not in ("epoch", "step") and isinstance(v, (int, float)) and v is not None:
                    self.writer.add_scalar(f"epoch/{k}", v, self.global_step)
            self.writer.flush()

    def _read_history(self) -> None:
        path = self.out / "metrics.csv"
        if not path.exists():
            return
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
        # rows logged after the state we resume from (killed between the csv and state.pt) are dropped
        self.history = [r for r in rows if r.get("epoch") and int(r["epoch"]) <= self.epoch]

    def hardware(self) -> dict[str, Any]:
        """Where this run computes: device (and GPU name), precision, torch version (for model cards)."""
        d = self.device
        name = torch.cuda.get_device_name(d) if d.type == "cuda" else (platform.processor() or platform.machine())
        return {"device": str(d), "name": name, "cpus": os.cpu_count(), "torch": torch.__version__,
                "amp": str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else None}

    def checkpoint_info(self, metrics: dict[str, Any], epoch: int) -> ckpt.CheckpointInfo:
        split = self.data.val_split or "val"
        m = {f"{split}_{k}": v for k, v in metrics.items() if isinstance(v, (int, float, list, dict))}
        m["epoch"] = epoch
        model = self.method.export_model()
        heads = list(getattr(model, "heads", ["expression"]))
        training = {
            "command": shlex.join(self.first_argv), "method": self.method.name,
            **({"resumed_with": [shlex.join(a) for a in self.resume_argvs]} if self.resume_argvs else {}),
            "data": {"name": self.cfg.data, "data_dir": self.cfg.data_dir, "train_split": self.data.train_split,
                     "val_split": self.data.val_split, "limit_train": self.cfg.limit_train,
                     "options": self.cfg.data_opts},
            "split_sizes": {self.data.train_split: self.data.train_size, **(
                {self.data.val_split: self.data.val_size} if self.data.val_split else {})},
            "epochs": self.cfg.epochs, "epoch": epoch, "seed": self.cfg.seed, "git_commit": _git_commit(),
            "hardware": self.hardware(), "config": self.cfg.to_dict(),
        }
        return ckpt.CheckpointInfo(
            arch=self.method.arch, arch_kwargs=dict(self.method.arch_kwargs), labels=list(self.data.label_names),
            input=self.spec, heads=heads, name=f"{self.method.name} {self.method.arch} {self.cfg.data}",
            training=training, metrics=m)

    def _save_checkpoints(self, metrics: dict[str, Any], improved: bool) -> None:
        model = self.method.export_model()
        info = self.checkpoint_info(metrics, self.epoch)
        ckpt.save(self.out / LAST_FILE, model, info)
        if improved:
            ckpt.save(self.out / BEST_FILE, model, info)
            method_state = self.method.state_dict()
            if method_state or self.cfg.reload_best or any(s.reload_best for s in self.schedules.values()):
                # the training network + the method's own tensors (e.g. DAF-CNN's centres) at the best epoch
                _atomic_torch_save({"model": self.model.state_dict(), "method": method_state,
                                    "epoch": self.epoch}, self.out / BEST_STATE_FILE)

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT, "version": STATE_VERSION, "method_name": self.method.name,
            "epoch": self.epoch, "global_step": self.global_step,
            "best": {"metric": self.cfg.best_metric, "value": self.best_value, "epoch": self.best_epoch},
            "method": self.method.state_dict(),
            "model": self.model.state_dict(),
            "optimizers": {n: o.state_dict() for n, o in self.optimizers.items()},
            "schedulers": {n: s.scheduler.state_dict() for n, s in self.schedules.items()},
            "scaler": self.scaler.state_dict(),
            "extra": {n: o.state_dict() for n, o in self.extra_state.items()},
            "batches": self.train_batches.state_dict(),
            "rng": _rng_state(),
            "config": self.cfg.to_dict(),
        }

    def _save_state(self) -> None:
        _atomic_torch_save(self.state_dict(), self.state_path)

    def _load_state(self, s: dict[str, Any]) -> None:
        if not isinstance(s, dict) or s.get("format") != STATE_FORMAT:
            raise TrainError(f"{self.state_path}: not a training state written by this engine")
        if s.get("method_name") != self.method.name:
            raise TrainError(f"{self.state_path}: a {s.get('method_name')} run, cannot resume it with {self.method.name}")
        self.method.load_state_dict(s["method"])  # first: may add branches / param groups
        self.model.load_state_dict(s["model"])
        for n, o in self.optimizers.items():
            o.load_state_dict(s["optimizers"][n])
        for n, sch in self.schedules.items():
            fresh = [(f, f.total) for f in getattr(sch.scheduler, "lr_lambdas", []) if isinstance(f, _WarmupCosine)]
            sch.scheduler.load_state_dict(s["schedulers"][n])
            if any(f.total != total for f, total in fresh):  # resumed with another --epochs: re-time the cosine
                log.info("cosine schedule now ends at step %d (was %d)", fresh[0][1], fresh[0][0].total)
                self._retime_cosine(fresh[0][1], only=n)
        self.scaler.load_state_dict(s["scaler"])
        for n, o in self.extra_state.items():
            o.load_state_dict(s["extra"][n])
        self.train_batches.load_state_dict(s["batches"])
        _set_rng_state(s["rng"])
        self.epoch, self.global_step = int(s["epoch"]), int(s["global_step"])
        self.best_value, self.best_epoch = s["best"]["value"], int(s["best"]["epoch"])
        self.resumed = True
        self._read_history()
        try:
            prev = json.loads((self.out / "args.json").read_text())
            self.first_argv = prev.get("argv") or self.argv
            self.resume_argvs = list(prev.get("resumed_with") or []) + [self.argv]
        except (OSError, ValueError):
            self.resume_argvs = [self.argv]
        log.info("resumed %s after epoch %d (step %d, best %s %s at epoch %d)", self.out, self.epoch,
                 self.global_step, self.cfg.best_metric, self.best_value, self.best_epoch)


# ============================================================================================ eval-only


def _label_map(ckpt_labels: Sequence[str], data_labels: Sequence[str]) -> np.ndarray | None:
    """Index map checkpoint class -> dataset class when both hold the same classes in another order."""
    from ferengine.labels import canonical

    a, b = [canonical(x) for x in ckpt_labels], [canonical(x) for x in data_labels]
    if a == b:
        return None
    if sorted(a) != sorted(b):
        raise TrainError(f"the checkpoint's classes {list(ckpt_labels)} are not the dataset's {list(data_labels)}")
    return np.array([b.index(x) for x in a])


def evaluate_checkpoint(cfg: TrainConfig, path: str | os.PathLike, dataset: Any | None = None) -> dict[str, Any]:
    """``--eval-only``: evaluate a checkpoint on ``cfg.val_split`` with the checkpoint's own input spec."""
    device = select_device(cfg.device)
    try:
        loaded = ckpt.load(path, device)
    except ckpt.CheckpointError as exc:
        raise TrainError(str(exc)) from None
    if dataset is None:
        _, val = default_splits(cfg.data)
        split = cfg.val_split if cfg.val_split and cfg.val_split.lower() != "none" else val
        dataset = open_dataset(cfg.data, cfg.data_dir, split, cfg.data_opts)
    else:
        split = cfg.val_split or getattr(dataset, "split", "val")
    dataset = subset(dataset, cfg.limit_val, cfg.seed + 1)
    labels = list(dataset.label_names)
    remap = _label_map(loaded.info.labels, labels) if loaded.info.labels else None
    model = loaded.model.eval()

    def step(batch: Batch) -> dict[str, torch.Tensor]:
        out = dict(model(batch.input))
        if remap is not None and "logits" in out:
            lg = out["logits"]
            out["logits"] = torch.empty_like(lg).index_copy_(1, torch.as_tensor(remap, device=lg.device), lg)
        return out

    batches = make_batches(dataset, loaded.spec, device, cfg.eval_batch_size or 2 * cfg.batch_size, workers=cfg.workers)
    t0 = time.perf_counter()
    metrics = evaluate(step, batches, labels, eval_autocast(device, amp_dtype_for(cfg, device)),
                       desc=f"eval {split}")
    dt = time.perf_counter() - t0
    result = {"checkpoint": str(path), "data": cfg.data, "split": split, **metrics,
              "images_per_s": metrics.get("n", 0) / dt if dt > 0 else None, "labels": labels}
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_text(out / "eval.json", json.dumps(result, indent=2) + "\n")
    result["report"] = format_report(metrics, labels, f"{path} on {cfg.data}/{split}:")
    result["eval_json"] = str(out / "eval.json")
    try:
        from trainers.metrics import save_confusion_png

        if "confusion_matrix" in metrics:
            save_confusion_png(np.asarray(metrics["confusion_matrix"]), labels, out / "confusion.png")
    except Exception as exc:  # optional extra (matplotlib/OpenCV issues must not lose the metrics)
        log.debug("no confusion PNG: %s", exc)
    return result


# ================================================================================================= main


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at emit time (not the one at creation, which pytest's
    capture or a caller may since have closed)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def _setup_logging(out: Path | None) -> Callable[[], None]:
    """Console logging at INFO and, with ``out``, a ``train.log`` file handler.

    Returns a function that undoes both (handlers removed, the root level restored), so that a trainer
    run in-process (tests, notebooks) leaves the caller's logging as it found it.
    """
    root = logging.getLogger()
    previous_level = root.level
    added: list[logging.Handler] = []
    if not any(getattr(h, "_fer_engine", False) for h in root.handlers):
        h = _CurrentStderrHandler()
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        h._fer_engine = True  # type: ignore[attr-defined]
        added.append(h)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(out / "train.log")
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        added.append(fh)
    for h in added:
        root.addHandler(h)
    root.setLevel(logging.INFO)

    def restore() -> None:
        for h in added:
            root.removeHandler(h)
            h.close()
        root.setLevel(previous_level)

    return restore


def main(method_cls: type[Method], argv: Sequence[str] | None = None, *,
         datasets: tuple[Any, Any] | None = None) -> int:
    """Command line of a trainer: ``python -m trainers.<name> ...``. Returns the exit status.

    ``datasets=(train, val)`` substitutes in-memory datasets for ``--data`` (tests).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(method_cls)
    args = parser.parse_args(argv)
    cfg = config_from_args(args, method_cls.name)
    command = [Path(sys.executable).name, "-m", f"trainers.{method_cls.name}", *argv]
    restore_logging = None
    try:
        if cfg.eval_only:
            restore_logging = _setup_logging(None)
            res = evaluate_checkpoint(cfg, cfg.eval_only, None if datasets is None else datasets[1])
            print(res["report"])
            print(f"wrote {res['eval_json']}")
            return 0
        out = Path(cfg.out)
        if cfg.resume and (out / "args.json").exists():
            saved = json.loads((out / "args.json").read_text())
            cfg = merge_resume_config(cfg, saved.get("config", {}), parser)
            cfg.resume = True
        restore_logging = _setup_logging(out)
        trainer = Trainer(cfg, method_cls, datasets=datasets, argv=command)
        trainer.fit()
        best = trainer.out / BEST_FILE
        log.info("done: %s (best %s %.4g at epoch %d); last: %s", best if best.exists() else "no best checkpoint",
                 cfg.best_metric, trainer.best_value if trainer.best_value is not None else float("nan"),
                 trainer.best_epoch, trainer.out / LAST_FILE)
        return 0
    except TrainError as exc:
        logging.getLogger("trainers").error("%s", exc)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if restore_logging is not None:
            restore_logging()
