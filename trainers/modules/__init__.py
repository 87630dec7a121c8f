"""Reusable training parts, apart from the losses that use them (after lightly's ``models/modules``):
momentum encoders declared as momentum *pairs* (MoCo/BYOL style, solo-learn's ``momentum_pairs``) and a
labelled feature queue that also remembers which step and group each entry came from (ECAN's memory bank
and its MVA feature groups)."""
from __future__ import annotations

from .momentum import MomentumPairs, frozen_copy
from .queue import LabelledQueue

__all__ = ["LabelledQueue", "MomentumPairs", "frozen_copy"]
