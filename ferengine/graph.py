"""The deployed-graph contract: what every backend runs and every export writes.

A deployed model is the function ``x -> (probs[, va])``: ``x`` float32 ``(N, C, S, S)`` from
:func:`ferengine.preprocess.to_model_input`; ``probs`` ``(N, K)`` class probabilities over the checkpoint's
labels (the model's own ``"probs"`` output when it combines several heads itself, e.g. an ensemble's vote,
else the softmax of its ``"logits"``, in fp32); ``va`` ``(N, 2)`` valence, arousal in [-1, 1]. Which of the
two exist follows the checkpoint's heads (:func:`output_names`).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

__all__ = ["HEADS", "output_names", "InferenceModule", "deployed_outputs"]

HEADS = ("expression", "valence_arousal")


def output_names(heads: Sequence[str]) -> tuple[str, ...]:
    """The outputs a model with ``heads`` gives: ``probs`` (expression) then ``va`` (valence/arousal)."""
    names = []
    if "expression" in heads:
        names.append("probs")
    if "valence_arousal" in heads:
        names.append("va")
    if not names:
        raise ValueError(f"a model needs an expression or a valence_arousal head, got heads {list(heads)}")
    return tuple(names)


def deployed_outputs(out: dict, names: Sequence[str]) -> tuple:
    """A model's output dict -> the deployed tuple (see the module doc)."""
    result = []
    if "probs" in names:
        if "probs" in out:
            result.append(out["probs"].float())
        else:
            result.append(torch.softmax(out["logits"].float(), dim=1))
    if "va" in names:
        result.append(out["va"].float())
    return tuple(result)


class InferenceModule(nn.Module):
    """The deployed function of a model: ``x -> (probs[, va])`` in the order of :attr:`output_names`.
    ``heads`` defaults to ``model.heads``."""

    def __init__(self, model, heads: Sequence[str] | None = None):
        super().__init__()
        self.model = model
        self.heads = tuple(heads if heads is not None else getattr(model, "heads", ("expression",)))
        self.output_names = output_names(self.heads)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return deployed_outputs(self.model(x), self.output_names)
