"""Shared output heads: an expression classifier and an optional valence/arousal regressor."""
from __future__ import annotations

import torch
from torch import nn


def heads_of(num_classes: int, av_head: bool) -> tuple[str, ...]:
    heads = []
    if num_classes > 0:
        heads.append("expression")
    if av_head:
        heads.append("valence_arousal")
    if not heads:
        raise ValueError("a model needs an expression head (num_classes > 0) or av_head=True")
    return tuple(heads)


class OutputHeads(nn.Module):
    """``embedding -> {"logits", "va"}``; ``va`` is squashed to [-1, 1] by tanh."""

    def __init__(self, in_features: int, num_classes: int, av_head: bool, dropout: float = 0.0):
        super().__init__()
        self.heads = heads_of(num_classes, av_head)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(in_features, num_classes) if num_classes > 0 else None
        self.av = nn.Linear(in_features, 2) if av_head else None

    def forward(self, embedding: torch.Tensor) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {"embedding": embedding}
        h = self.dropout(embedding)
        if self.fc is not None:
            out["logits"] = self.fc(h)
        if self.av is not None:
            out["va"] = torch.tanh(self.av(h))
        return out
