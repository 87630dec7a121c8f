"""Baseline: plain cross-entropy training of any registered backbone (the reference every method is
compared with).

    python -m trainers.baseline --data fer2013 --data-dir ../shared/data --arch fastcnn
    python -m trainers.baseline --data fer2013 --arch resnet18 --arch-kwargs '{"dropout": 0.2}'
    python -m trainers.baseline --data ferplus --data-opt mode=distribution   # soft targets (vote distribution)

Loss: softmax cross-entropy with label smoothing on hard labels, or cross-entropy against the vote
distribution when the dataset has soft labels (``--targets auto|hard|soft``); plus ``--va-weight`` x MSE on
valence/arousal when the dataset has them (the model then gets an AV head).

Default settings and why (there is no paper to follow; these are the usual strong plain-CNN FER2013
settings, chosen to be safe rather than tuned):

- SGD with Nesterov momentum 0.9, batch 128, lr 0.05, weight decay 5e-4: SGD+momentum generalises better
  than Adam on FER2013-sized data in the published plain-CNN comparisons (e.g. Khaireddin & Chen 2021,
  "Facial Emotion Recognition: State of the Art Performance on FER2013", found SGD with Nesterov best
  among the optimisers they compared); 5e-4 is the usual decay for BN CNNs of this size on 50k-image sets.
- Cosine schedule over 60 epochs after a 2-epoch linear warm-up: no plateau patience to tune, the lr
  reaches ~0 at the end so the last epoch is usually (near) the best, and warm-up keeps the first
  large-lr steps of a freshly initialised BN net stable.
- Label smoothing 0.1: FER2013 labels are noisy (the FER+ re-labelling by 10 annotators per image
  changed many of them); smoothing keeps the model from fitting that noise with over-confident logits.
- Augmentation preset ``standard``: crop-with-padding (+-4 px), horizontal flip, +-10 deg rotation,
  0.9-1.1 zoom, brightness/contrast 0.2, random erasing p=0.5: the usual FER2013 recipe.
- Best checkpoint by validation accuracy (PublicTest for fer2013).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from ferengine.models import create_model, list_models

from ..engine import Batch, DataInfo, Method, TrainError, opt
from ..losses.ce import classification_loss, va_loss
from . import register_method

__all__ = ["Baseline", "classification_loss", "va_loss"]


@register_method
class Baseline(Method):
    """Plain cross-entropy training of any registered backbone (fastcnn, resnet18, ...)."""

    name = "baseline"
    test_args = ("--arch-kwargs", '{"width": 0.25}')
    datasets = ("fer2013", "ferplus", "rafdb", "affectnet", "sfew", "afew-va", "affwild2", "folder")

    @dataclass
    class Config:
        arch: str = opt("fastcnn", help=f"registered architecture: {', '.join(list_models())}")
        arch_kwargs: dict[str, Any] = opt(factory=dict, metavar="JSON",
                                          help="constructor arguments, e.g. '{\"width\": 0.5}' (num_classes, in_chans "
                                               "and av_head are set from the data unless given)")
        targets: Literal["auto", "hard", "soft"] = opt(
            "auto", help="auto: the vote distribution when the dataset has one, else the labels")
        va_weight: float = opt(1.0, help="weight of the valence/arousal MSE (datasets with AV labels)")
        init: str | None = opt(None, metavar="CKPT",
                               help="start from this checkpoint's weights (fine-tuning or a warm restart); its "
                                    "architecture and arguments replace --arch/--arch-kwargs")

    defaults = dict(
        epochs=60, batch_size=128, optimizer="sgd", lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4,
        scheduler="cosine", warmup_epochs=2.0, label_smoothing=0.1, augment="standard", best_metric="accuracy",
    )

    def build_model(self, data: DataInfo) -> nn.Module:
        o = self.opts
        kwargs: dict[str, Any] = {"num_classes": data.num_classes, "in_chans": data.channels}
        if data.has_va:
            kwargs["av_head"] = True
        kwargs.update(o.arch_kwargs or {})
        self.arch = o.arch
        if o.init:
            model, self.arch, kwargs = _init_from(o.init, data)
        else:
            try:
                model = create_model(self.arch, **kwargs)
            except (KeyError, TypeError, ValueError) as exc:
                raise TrainError(f"cannot build --arch {self.arch} with {kwargs}: {exc}") from None
        self.arch_kwargs = kwargs
        if o.targets == "soft" and not data.has_soft:
            raise TrainError(f"--targets soft: {data.name} has no vote distribution (soft labels)")
        self.use_soft = data.has_soft and o.targets in ("auto", "soft")
        return model

    def training_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        out = self.model(batch.input)
        logs: dict[str, torch.Tensor] = {}
        loss = torch.zeros((), device=batch.input.device)
        if "logits" in out:
            ce = classification_loss(out["logits"], batch.label, batch.soft if self.use_soft else None,
                                     self.cfg.label_smoothing)
            logs["ce"] = ce
            loss = loss + ce
        if "va" in out and batch.va is not None:
            mse = va_loss(out["va"], batch.va)
            logs["va_mse"] = mse
            loss = loss + float(self.opts.va_weight) * mse
        logs["loss"] = loss
        return logs


def _init_from(path: str, data: DataInfo) -> tuple[nn.Module, str, dict[str, Any]]:
    """The model of checkpoint ``path`` (train mode), checked against the dataset's classes."""
    from ferengine import checkpoint as ck

    try:
        loaded = ck.load(path)
    except ck.CheckpointError as exc:
        raise TrainError(f"--init: {exc}") from None
    info = loaded.info
    if "expression" in info.heads and list(info.labels) != list(data.label_names):
        raise TrainError(f"--init {path}: its classes {info.labels} are not {data.name}'s {list(data.label_names)}")
    if info.input.channels != data.channels:
        raise TrainError(f"--init {path}: a {info.input.channels}-channel model for {data.channels}-channel data")
    return loaded.model.train(), info.arch, dict(info.arch_kwargs)
