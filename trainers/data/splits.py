"""The splits of a training run: which dataset splits train and select, seeded subsets, and what the
model builder needs to know about the data (:class:`DataInfo`)."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .base import DatasetError

log = logging.getLogger("trainers.data")

__all__ = ["DataInfo", "TRAIN_SPLITS", "VAL_SPLITS", "default_splits", "load_data", "open_dataset", "subset"]

TRAIN_SPLITS = ("train", "training")
VAL_SPLITS = ("publictest", "val", "valid", "validation", "test")


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
    from . import load_dataset

    return load_dataset(name, data_dir, split, **(opts or {}))


def default_splits(name: str) -> tuple[str, str | None]:
    """(training split, validation split) of a dataset, from ``trainers.data.dataset_splits``."""
    from . import dataset_splits

    try:
        names = list(dataset_splits(name))
    except (KeyError, ValueError):
        return "train", "val"
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


def _drop_copies(train_ds: Any, data: str, data_dir: str | None, opts: dict[str, Any] | None,
                 splits: Sequence[str], val_split: str | None, val_ds: Any) -> Any:
    from .leakage import copies_in

    drop = np.zeros(len(train_ds), bool)
    for s in splits:
        if val_ds is not None and val_split is not None and s.lower() in (val_split.lower(), "val"):
            other = val_ds
        else:
            other = open_dataset(data, data_dir, s, opts)
        hit = copies_in(train_ds, other)
        log.info("--drop-copies-of %s: %d %s items are bit-identical to a %s image; dropped from training",
                 s, int(hit.sum()), getattr(train_ds, "split", "training"), s)
        drop |= hit
    if not drop.any():
        return train_ds
    kept = train_ds.subset(np.flatnonzero(~drop))
    kept.info["dropped_copies_of"] = {"splits": list(splits), "items": int(drop.sum())}
    return kept


def has_targets(ds: Any) -> bool:
    """Whether any item has something to learn from: a class label (>= 0), a vote distribution, or a finite
    valence/arousal target."""
    labels = getattr(ds, "labels", None)
    if labels is None:
        return True  # not a FaceDataset: nothing to judge by
    if bool((labels >= 0).any()):
        return True
    soft = getattr(ds, "soft_labels", None)
    if soft is not None and bool((soft.sum(1) > 0).any()):
        return True
    va = getattr(ds, "va", None)
    return va is not None and bool(torch_isfinite_any(va))


def torch_isfinite_any(x: Any) -> bool:
    import torch

    return bool(torch.isfinite(torch.as_tensor(x)).any())


def _check_targets(ds: Any, data: str, split: str | None, role: str, advice: str) -> None:
    if has_targets(ds):
        return
    info = getattr(ds, "info", {}) or {}
    if info.get("unlabelled"):
        raise DatasetError(f"{info['unlabelled']}; the {role} split {data}/{split} needs labels{advice}")
    where = f" (from {info['source']})" if info.get("source") else ""
    raise DatasetError(f"{data}/{split}{where}: none of its {len(ds)} items has a label or a valence/arousal "
                       f"target, so it cannot be the {role} split{advice}")


def open_at_size(name: str, data_dir: str | None, split: str, opts: dict[str, Any] | None, size: int | None) -> Any:
    """``open_dataset``, with an on-disk dataset's faces decoded at ``size`` px when that is more than the reader's
    default and no ``image_size`` option was given: a 224 px model then trains on 224 px faces, not on the
    reader's 112 px ones upsampled. In-memory datasets (FER2013's 48 px) are what they are."""
    ds = open_dataset(name, data_dir, split, opts)
    if (size and getattr(ds, "images", None) is None and "image_size" not in (opts or {})
            and int(getattr(ds, "image_size", size)) < int(size)):
        log.info("%s/%s: decoding the faces at %d px, the model's input (the reader's default: %d; --data-opt "
                 "image_size=N to choose)", name, split, int(size), int(ds.image_size))
        ds = open_dataset(name, data_dir, split, {**(opts or {}), "image_size": int(size)})
    return ds


def load_data(data: str, data_dir: str | None, *, train_split: str | None = None, val_split: str | None = None,
              opts: dict[str, Any] | None = None, limit_train: int = 0, limit_val: int = 0, seed: int = 0,
              channels: int | None = None, datasets: tuple[Any, Any] | None = None,
              drop_copies_of: Sequence[str] = (), input_size: int | None = None) -> tuple[Any, Any | None, DataInfo]:
    """Open the training and validation splits (``datasets`` = (train, val) given in-process skips the
    readers). ``val_split="none"``: no evaluation. ``drop_copies_of``: splits whose images are removed from
    the training data where it holds a bit-identical copy (before ``limit_train``). ``input_size``: the model's
    input side, at which on-disk faces are decoded (:func:`open_at_size`). Raises :class:`DatasetError`."""
    d_train, d_val = default_splits(data) if datasets is None else ("train", "val")
    train_split = train_split or d_train
    vs: str | None = d_val
    if val_split is not None:
        vs = None if val_split.lower() == "none" else val_split
    if datasets is not None:
        train_ds, val_ds = datasets
    else:
        train_ds = open_at_size(data, data_dir, train_split, opts, input_size)
        val_ds = open_at_size(data, data_dir, vs, opts, input_size) if vs else None
    if val_ds is None:
        vs = None
    if drop_copies_of:
        train_ds = _drop_copies(train_ds, data, data_dir, opts, drop_copies_of, vs, val_ds)
    full = len(train_ds)
    if full == 0:
        raise DatasetError(f"{data}/{train_split}: the training split is empty")
    _check_targets(train_ds, data, train_split, "training", "")
    if val_ds is not None:
        _check_targets(val_ds, data, vs, "validation", "; pick another --val-split, or --val-split none to train "
                                                        "without evaluation")
    train_ds = subset(train_ds, limit_train, seed)
    if val_ds is not None:
        val_ds = subset(val_ds, limit_val, seed + 1)
    images = getattr(train_ds, "images", None)
    if images is not None:
        if images.ndim == 3:  # (N,H,W) grey
            ch, image_size = 1, int(images.shape[1])
        elif images.shape[-1] in (1, 3):  # (N,H,W,C)
            ch, image_size = int(images.shape[-1]), int(images.shape[1])
        else:  # (N,C,H,W)
            ch, image_size = int(images.shape[1]), int(images.shape[2])
    else:
        ch = int(getattr(train_ds, "channels", 3))
        image_size = int(getattr(train_ds, "image_size", 112))
    info = DataInfo(
        name=data, label_names=tuple(train_ds.label_names), channels=channels or ch,
        image_size=image_size, has_va=getattr(train_ds, "va", None) is not None,
        has_soft=getattr(train_ds, "soft_labels", None) is not None, train_size=len(train_ds),
        val_size=0 if val_ds is None else len(val_ds), train_split=train_split, val_split=vs,
        in_memory=images is not None,
    )
    log.info("data: %s %s %d faces%s, %s %s; %d classes %s; %dpx x%d %s", data, train_split, len(train_ds),
             f" (of {full})" if len(train_ds) < full else "", vs, info.val_size, info.num_classes,
             list(info.label_names), image_size, ch, "in memory" if info.in_memory else "on disk")
    return train_ds, val_ds, info
