"""Momentum (EMA) targets of online modules: ``target <- m * target + (1 - m) * online`` (MoCo eq. 1).

A method declares its pairs, e.g. ECAN's momentum encoder over encoder *and* projection::

    def momentum_pairs(self):
        return [(self.model.encoder, self.model.encoder_k), (self.model.proj, self.model.proj_k)]

and the engine updates every pair after each optimiser step (:meth:`Method.momentum_update`), with the
momentum from ``--momentum-target``-style settings of the method: constant, or raised from ``base`` to
``final`` over training on a cosine (BYOL, solo-learn). The targets are submodules of the training model,
so they are saved and resumed with it; they never receive gradients and are not exported.
"""
from __future__ import annotations

import copy
import math
from typing import Any, Sequence

import torch
from torch import nn

__all__ = ["MomentumPairs", "frozen_copy"]


def frozen_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` that takes no gradient (a momentum target's starting point)."""
    return copy.deepcopy(module).requires_grad_(False)


class MomentumPairs:
    """Updates momentum targets from their online modules. ``momentum``: the base momentum;
    ``final_momentum``: if set, the momentum rises from ``momentum`` to it on a cosine over
    ``total_steps`` (solo-learn's ``MomentumUpdater``); buffers (BN statistics) are copied."""

    def __init__(self, pairs: Sequence[tuple[nn.Module, nn.Module]], momentum: float = 0.999,
                 final_momentum: float | None = None, total_steps: int = 1):
        if not pairs:
            raise ValueError("MomentumPairs needs at least one (online, target) pair")
        for online, target in pairs:
            a = [p.shape for p in online.parameters()]
            b = [p.shape for p in target.parameters()]
            if a != b:
                raise ValueError(f"momentum pair {type(online).__name__} -> {type(target).__name__}: "
                                 "the target's parameters do not match the online module's")
        self.pairs = list(pairs)
        self.base = float(momentum)
        self.final = None if final_momentum is None else float(final_momentum)
        self.total_steps = max(1, int(total_steps))
        self.current = self.base

    def momentum_at(self, step: int) -> float:
        if self.final is None:
            return self.base
        t = min(1.0, step / self.total_steps)
        return self.final - (self.final - self.base) * (math.cos(math.pi * t) + 1) / 2

    @torch.no_grad()
    def update(self, step: int | None = None) -> None:
        """One EMA step of every pair (``step``: optimiser steps done, for a rising momentum)."""
        m = self.current = self.momentum_at(step or 0)
        for online, target in self.pairs:
            tp = list(target.parameters())
            op = [p.detach() for p in online.parameters()]
            torch._foreach_lerp_(tp, op, 1.0 - m)
            for bt, bo in zip(target.buffers(), online.buffers()):
                bt.copy_(bo)

    def state_dict(self) -> dict[str, Any]:
        # the target weights are part of the model's state; only the schedule position is ours
        return {"current": self.current}

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.current = float(s["current"])
