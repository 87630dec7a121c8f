"""Optimisers, learning-rate schedules the engine owns, and training in stages.

:class:`LRSchedule` writes every param group's ``lr`` itself (no torch scheduler, no private attributes):
``lr = initial_lr x lr_scale x factor`` where ``initial_lr`` is the group's lr when it joined (a new ESR
branch can bring its own), ``lr_scale`` a per-group multiplier a method may change at any time (timm's
``lr_scale``: ESR's "old groups at 0.1x"), and ``factor`` the schedule's value at this step/epoch:

- ``none``: 1; ``cosine``: a cosine from 1 to ``min_lr/lr`` over the run, per step;
- ``step`` / ``multistep`` / ``exponential``: ``gamma`` per ``step_size`` / at each milestone / per unit,
  counted in epochs or in optimiser steps (``interval``; AVCE's "x0.8 at 5k, 25k ... iterations");
- ``plateau``: ``factor`` at the ``patience``-th consecutive epoch in which the monitored metric has not
  improved by ``threshold`` (DAF-CNN's "did not increase ... for 13 epochs": the drop comes at the 13th flat
  epoch; torch's ReduceLROnPlateau waits for more than ``patience``, i.e. one epoch later), applied to each
  group's own lr, floor ``min_lr``; the count restarts after a drop;
  with ``reload_best`` the engine reloads the best weights on each drop (DAF-CNN);
- a linear warm-up over the first ``warmup_steps`` steps in front of any of them.

``step_update(step)`` after each optimiser step and ``step(epoch, metric)`` after each epoch's evaluation
(timm's ``step_update`` / ``step``). :meth:`LRSchedule.retime` moves the end of a cosine (``--time-budget``,
a resumed run with another ``--epochs``), :meth:`LRSchedule.restart` starts it afresh (a new stage).

:class:`StagePlan`: the stages of a run (ESR: 50 epochs, then 20 per added branch). ``--time-budget``
shrinks the stages still to come in proportion (each keeps at least one epoch) instead of cutting the
last ones off.
"""
from __future__ import annotations

import bisect
import logging
import math
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Sequence

import torch

from .errors import TrainError

log = logging.getLogger("trainers.engine")

__all__ = ["make_optimizer", "LRSchedule", "Stage", "StagePlan", "SCHEDULES"]

SCHEDULES = ("none", "cosine", "step", "multistep", "exponential", "plateau")


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


class LRSchedule:
    """The learning rate of one optimiser's param groups (see the module doc)."""

    def __init__(self, optimizer: torch.optim.Optimizer, kind: str = "none", *, total_steps: int = 1,
                 steps_per_epoch: int = 1, warmup_steps: int = 0, floor: float = 0.0, interval: str = "epoch",
                 step_size: int = 30, milestones: Sequence[int] = (), gamma: float = 0.1, mode: str = "max",
                 monitor: str | None = None, patience: int = 10, threshold: float = 0.0, factor: float = 0.1,
                 min_lr: float = 0.0, reload_best: bool = False, name: str = "main"):
        if kind not in SCHEDULES:
            raise TrainError(f"unknown scheduler {kind!r}; use one of {', '.join(SCHEDULES)}")
        if interval not in ("epoch", "step"):
            raise TrainError(f"schedule interval must be 'epoch' or 'step', got {interval!r}")
        if kind == "step" and step_size < 1:
            raise TrainError(f"--step-size must be >= 1, got {step_size}")
        self.optimizer, self.kind, self.name = optimizer, kind, name
        self.total_steps, self.steps_per_epoch = max(1, int(total_steps)), max(1, int(steps_per_epoch))
        self.warmup_steps, self.floor = max(0, int(warmup_steps)), float(floor)
        self.interval, self.step_size, self.milestones = interval, int(step_size), sorted(int(m) for m in milestones)
        self.gamma = float(gamma)
        self.mode, self.monitor, self.patience = mode, monitor, int(patience)
        self.threshold, self.factor_, self.min_lr = float(threshold), float(factor), float(min_lr)
        self.reload_best = bool(reload_best)
        self.steps = 0      # optimiser steps since the schedule (re)started
        self.epochs = 0     # epochs since the schedule (re)started
        self.best = -math.inf if mode == "max" else math.inf
        self.bad_epochs = 0
        self.lrs: list[float] = []  # plateau: each group's own lr
        self._apply()

    # ----------------------------------------------------------------------------------- the value
    def _groups(self) -> list[dict[str, Any]]:
        groups = self.optimizer.param_groups
        for g in groups:
            g.setdefault("initial_lr", g["lr"])
            g.setdefault("lr_scale", 1.0)
        while len(self.lrs) < len(groups):  # a group added since (a new branch) starts at its base lr
            g = groups[len(self.lrs)]
            self.lrs.append(g["initial_lr"] * g["lr_scale"])
        return groups

    def _warm(self) -> float:
        return (self.steps + 1) / self.warmup_steps if self.steps < self.warmup_steps else 1.0

    def factor(self) -> float:
        """The schedule's multiplier now (not for ``plateau``, whose lr is per group)."""
        k = self.kind
        if k == "cosine":  # warm-up folded in, as before the engine owned its schedules
            t, w, total = self.steps, self.warmup_steps, self.total_steps
            if t < w:
                return (t + 1) / w
            p = min(1.0, (t - w) / max(1, total - w))
            return self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * p))
        count = self.epochs if self.interval == "epoch" else self.steps
        if k == "step":
            decay = self.gamma ** (count // self.step_size)
        elif k == "multistep":
            decay = self.gamma ** bisect.bisect_right(self.milestones, count)
        elif k == "exponential":
            decay = self.gamma ** count
        else:
            decay = 1.0
        return self._warm() * decay

    def _apply(self) -> None:
        groups = self._groups()
        if self.kind == "plateau":
            w = self._warm()
            for g, lr in zip(groups, self.lrs):
                g["lr"] = lr if w == 1.0 else lr * w
            return
        f = self.factor()
        for g in groups:
            g["lr"] = g["initial_lr"] * g["lr_scale"] * f

    def lr(self, group: int = 0) -> float:
        return float(self.optimizer.param_groups[group]["lr"])

    # ---------------------------------------------------------------------------------------- time
    def step_update(self) -> None:
        """After each optimiser step."""
        self.steps += 1
        if self.kind == "cosine" or self.steps <= self.warmup_steps or self.interval == "step":
            self._apply()

    def step(self, metric: float | None = None) -> bool:
        """After each epoch's evaluation. Returns True when a plateau lowered the lr."""
        self.epochs += 1
        dropped = False
        if self.kind == "plateau":
            if metric is None:
                raise TrainError("--scheduler plateau needs a validation split (--val-split)")
            better = metric > self.best + self.threshold if self.mode == "max" else metric < self.best - self.threshold
            if better:
                self.best, self.bad_epochs = float(metric), 0
            else:
                self.bad_epochs += 1
            if self.bad_epochs >= max(self.patience, 1):
                self._groups()
                for i, old in enumerate(self.lrs):
                    new = max(old * self.factor_, self.min_lr)
                    if old - new > 1e-8:
                        self.lrs[i] = new
                        dropped = True
                self.bad_epochs = 0
        self._apply()
        return dropped

    def retime(self, total_steps: int) -> None:
        """Make a cosine end at ``total_steps`` (counted from its start) and set the lr on the new curve."""
        total_steps = max(1, int(total_steps))
        if self.kind == "cosine" and total_steps != self.total_steps:
            self.total_steps = total_steps
            self._apply()
        self.total_steps = total_steps

    def restart(self, total_steps: int) -> None:
        """Start afresh (a new stage): step/epoch counters, warm-up and plateau state reset."""
        self.steps = self.epochs = self.bad_epochs = 0
        self.best = -math.inf if self.mode == "max" else math.inf
        self.lrs = []
        self.total_steps = max(1, int(total_steps))
        self._apply()

    # --------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "steps": self.steps, "epochs": self.epochs, "total_steps": self.total_steps,
                "warmup_steps": self.warmup_steps,
                "best": self.best, "bad_epochs": self.bad_epochs, "lrs": list(self.lrs)}

    def rescale(self, ratio: float) -> None:
        """Multiply every group's base lr (and plateau's current lr) by ``ratio``: a resumed run whose
        ``--lr`` was changed continues at the new lr, at the schedule's current position (the optimiser's
        saved state would otherwise bring the old lr back)."""
        for g in self._groups():
            g["initial_lr"] = g["initial_lr"] * ratio
        self.lrs = [lr * ratio for lr in self.lrs]
        self._apply()

    def load_state_dict(self, s: dict[str, Any]) -> None:
        """Restore the position and the warm-up; the total of this invocation's plan wins (a new --epochs
        re-times a cosine)."""
        if s.get("kind") != self.kind:
            raise TrainError(f"the saved run used --scheduler {s.get('kind')}, this one {self.kind}")
        self.steps, self.epochs = int(s["steps"]), int(s["epochs"])
        self.best, self.bad_epochs = float(s["best"]), int(s["bad_epochs"])
        self.lrs = [float(v) for v in s["lrs"]]
        if "warmup_steps" in s:  # the warm-up the run had (a short run's is shortened) stays
            self.warmup_steps = int(s["warmup_steps"])
        if int(s["total_steps"]) != self.total_steps and self.kind == "cosine":
            log.info("cosine schedule now ends at step %d (was %d)", self.total_steps, int(s["total_steps"]))
        self._apply()


# ============================================================================================ stages


@dataclass
class Stage:
    """A part of training: ``epochs`` long; ``restart_schedule``: the lr schedule starts afresh with it."""

    name: str
    epochs: int
    restart_schedule: bool = False


class StagePlan:
    """The stages of a run, their lengths as planned now, and the epoch each starts at."""

    def __init__(self, stages: Sequence[Stage]):
        if not stages:
            raise TrainError("a run needs at least one stage")
        for s in stages:
            if s.epochs < 1:
                raise TrainError(f"stage {s.name!r} has {s.epochs} epochs; each stage needs at least 1")
        self.stages = [Stage(**asdict(s)) for s in stages]
        self.planned = [s.epochs for s in self.stages]  # as configured; what a time budget scales

    @property
    def total(self) -> int:
        return sum(s.epochs for s in self.stages)

    def starts(self) -> list[int]:
        """1-based first epoch of each stage."""
        out, e = [], 1
        for s in self.stages:
            out.append(e)
            e += s.epochs
        return out

    def index_at(self, epoch: int) -> int:
        """The stage (0-based) epoch ``epoch`` (1-based) belongs to (the last one past the end)."""
        return max(0, bisect.bisect_right(self.starts(), epoch) - 1)

    def fit(self, done: int, total: int) -> int:
        """Re-plan the stages after epoch ``done`` so that the run ends at ``total`` epochs: the stages not
        finished share what is left in proportion to their *planned* lengths (a plan of 50, 20, 20 cut to 45
        epochs becomes 25, 10, 10), the current one keeping at least the epochs it has run and every stage to
        come at least one. Returns the new total (more than ``total`` when the minimums need it)."""
        if done >= self.total:
            return self.total
        i = self.index_at(done + 1)
        starts = self.starts()
        ran = done - (starts[i] - 1)  # epochs of stage i already run
        fixed = starts[i] - 1          # epochs of the stages before i
        planned = self.planned[i:]
        minimum = [max(ran, 1)] + [1] * (len(planned) - 1)
        budget = max(total - fixed, sum(minimum))
        ideal = [budget * p / sum(planned) for p in planned]
        share = [max(m, int(x)) for m, x in zip(minimum, ideal)]
        order = sorted(range(len(share)), key=lambda j: int(ideal[j]) - ideal[j])  # largest remainder first
        k = 0
        while sum(share) < budget:
            share[order[k % len(order)]] += 1
            k += 1
        while sum(share) > budget:  # minimums pushed it over: take from the longest above its minimum
            j = max((j for j in range(len(share)) if share[j] > minimum[j]), key=lambda j: share[j])
            share[j] -= 1
        for s, n in zip(self.stages[i:], share):
            s.epochs = n
        return self.total

    def resumed(self, saved: Sequence[int], done: int) -> None:
        """On resume: stages begun before keep the lengths they had (the current one at least its epochs
        run); stages to come take this invocation's planned lengths."""
        if len(saved) != len(self.stages):
            raise TrainError(f"the saved run has {len(saved)} stages, this one {len(self.stages)}")
        e, last = 0, len(self.stages) - 1
        for i, (s, n) in enumerate(zip(self.stages, saved)):
            n = int(n)
            if e >= done:
                break
            closed = e + n < done or (e + n == done and i < last)  # a later stage has begun
            s.epochs = max(n, 1) if closed else max(s.epochs, done - e)
            e += n

    def lengths(self) -> list[int]:
        return [s.epochs for s in self.stages]
