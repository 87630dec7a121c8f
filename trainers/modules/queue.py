"""A labelled feature queue (memory bank): a ring buffer of features with their labels, and for each entry
the step and the *group* (one push = one group) it came from.

ECAN fills it with a frozen pass before training (eq. 2), reads all of it for ENSC's extra negatives
(bank features of another class than the anchor), and takes the most recent whole groups as MVA's V - 1
past feature groups (eqs. 9-10). Register it with ``trainer.register_state`` so a resumed run gets it back.
"""
from __future__ import annotations

from typing import Any

import torch

__all__ = ["LabelledQueue"]


class LabelledQueue:
    """``size`` entries of ``dim`` features; ``push`` overwrites the oldest entries."""

    def __init__(self, size: int, dim: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        if size < 1 or dim < 1:
            raise ValueError(f"a queue needs size >= 1 and dim >= 1, got {size} x {dim}")
        self.size, self.dim = int(size), int(dim)
        self.features = torch.zeros(self.size, self.dim, device=device, dtype=dtype)
        self.labels = torch.full((self.size,), -1, dtype=torch.int64, device=device)
        self.steps = torch.full((self.size,), -1, dtype=torch.int64, device=device)
        self.groups = torch.full((self.size,), -1, dtype=torch.int64, device=device)
        self.ptr = 0
        self.count = 0
        self.pushes = 0  # the next group id

    @torch.no_grad()
    def push(self, features: torch.Tensor, labels: torch.Tensor, step: int = -1) -> int:
        """Append one group (a batch of features); returns its group id."""
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(f"expected features of shape (n, {self.dim}), got {tuple(features.shape)}")
        n = features.shape[0]
        if n > self.size:
            features, labels, n = features[-self.size:], labels[-self.size:], self.size
        idx = (self.ptr + torch.arange(n, device=self.features.device)) % self.size
        hit = self.groups[idx]
        for g in hit[hit >= 0].unique().tolist():  # groups losing entries are no longer whole: mark them -2
            self.groups[self.groups == g] = -2
        self.features[idx] = features.detach().to(self.features.dtype)
        self.labels[idx] = labels.to(self.labels.device, torch.int64)
        self.steps[idx] = int(step)
        group = self.pushes
        self.groups[idx] = group
        self.pushes += 1
        self.ptr = (self.ptr + n) % self.size
        self.count = min(self.count + n, self.size)
        return group

    def get(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The filled part: ``(features, labels)``."""
        if self.count < self.size:
            return self.features[: self.count], self.labels[: self.count]
        return self.features, self.labels

    @property
    def full(self) -> bool:
        return self.count >= self.size

    def recent_groups(self, k: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The ``k`` most recent groups still wholly in the queue, newest first: ``[(features, labels)]``
        (fewer when the queue holds fewer whole groups)."""
        out = []
        for g in range(self.pushes - 1, -1, -1):
            if len(out) >= k:
                break
            sel = self.groups == g
            if not bool(sel.any()):
                break  # this group and all older ones were (partly) overwritten
            out.append((self.features[sel], self.labels[sel]))
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"features": self.features, "labels": self.labels, "steps": self.steps, "groups": self.groups,
                "ptr": self.ptr, "count": self.count, "pushes": self.pushes}

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.features.copy_(s["features"])
        self.labels.copy_(s["labels"])
        self.ptr, self.count = int(s["ptr"]), int(s["count"])
        if "steps" in s:
            self.steps.copy_(s["steps"])
            self.groups.copy_(s["groups"])
            self.pushes = int(s["pushes"])
