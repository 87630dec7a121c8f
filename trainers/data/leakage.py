"""Exact copies between splits: which evaluation items have a bit-identical copy in the training data.

FER2013's PublicTest holds 280 images that are bit-identical to a Training image (PrivateTest has copies
too); a model that memorised them scores them far above the rest, so every evaluation reports the whole split
*and* the part with no copy in the training data (:mod:`trainers.evaluate`), and a run can drop the copies of
evaluation images from its training data (``--drop-copies-of``).

A copy is the same face as read: the same decoded pixels (in-memory datasets such as FER2013/FER+), or the
same image file bytes and crop box (on-disk datasets, read once to hash them). Near-duplicates (re-encoded,
resized) are not detected.
"""
from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

log = logging.getLogger("trainers.data")

__all__ = ["image_keys", "copies_in", "Copies", "find_copies"]


def image_keys(ds: Any) -> np.ndarray:
    """A 128-bit key per item (``(N,)`` array of 16-byte values): equal keys = bit-identical faces."""
    out = np.empty(len(ds), dtype="V16")
    images = getattr(ds, "images", None)
    if images is not None:
        a = np.ascontiguousarray(np.asarray(images))
        flat = a.reshape(len(a), -1)
        shape = repr(a.shape[1:]).encode()
        for i in range(len(flat)):
            out[i] = hashlib.blake2b(flat[i].tobytes(), digest_size=16, person=b"fer-pixels", salt=shape[:16]).digest()
        return out
    files = getattr(ds, "files", None)
    if files is None:
        raise ValueError(f"{ds!r}: neither images in memory nor files to compare")
    boxes = getattr(ds, "boxes", None)
    memo: dict[str, bytes] = {}
    for i, f in enumerate(files):
        digest = memo.get(f)
        if digest is None:
            with open(f, "rb") as fh:
                digest = memo[f] = hashlib.blake2b(fh.read(), digest_size=16).digest()
        box = b"" if boxes is None else np.asarray(boxes[i], np.float32).tobytes()
        out[i] = hashlib.blake2b(digest + box, digest_size=16, person=b"fer-file").digest()
    return out


def _on_disk(ds: Any) -> bool:
    return getattr(ds, "images", None) is None and getattr(ds, "files", None) is not None


def _keys_pair(eval_ds: Any, train_ds: Any) -> tuple[np.ndarray, np.ndarray]:
    """Keys of both datasets. On disk only the files whose byte size occurs in the other dataset are read
    (a copy has the same size), so the check costs a stat per file, not a read of the whole dataset."""
    if not (_on_disk(eval_ds) and _on_disk(train_ds)):
        return image_keys(eval_ds), image_keys(train_ds)
    import os

    sizes = [np.array([os.path.getsize(f) for f in ds.files], np.int64) for ds in (eval_ds, train_ds)]
    keys = []
    for ds, own, other in ((eval_ds, sizes[0], sizes[1]), (train_ds, sizes[1], sizes[0])):
        k = np.zeros(len(ds), dtype="V16")
        cand = np.flatnonzero(np.isin(own, other))
        if len(cand):
            k[cand] = image_keys(ds.subset(cand))
        # files that cannot be copies get keys no other item has (their index, tagged by the dataset)
        rest = np.flatnonzero(~np.isin(own, other))
        tag = b"E" if ds is eval_ds else b"T"
        for i in rest:
            k[i] = tag + int(i).to_bytes(15, "little")
        keys.append(k)
    return keys[0], keys[1]


def copies_in(eval_ds: Any, train_ds: Any) -> np.ndarray:
    """``(len(eval_ds),)`` bool: the item has a bit-identical copy in ``train_ds``."""
    ek, tk = _keys_pair(eval_ds, train_ds)
    return np.isin(ek, tk)


@dataclass
class Copies:
    """The copies of an evaluation split's items in a training split."""

    mask: np.ndarray          # (N,) bool over the evaluation items
    same_label: int           # copies whose training twin has the same label (at least one twin)
    train_split: str

    @property
    def count(self) -> int:
        return int(self.mask.sum())

    def describe(self, split: str) -> str:
        n = len(self.mask)
        return (f"{self.count} of {n} {split} items ({100 * self.count / max(n, 1):.1f} %) are bit-identical to a "
                f"{self.train_split} image ({self.same_label} with the same label)")

    def to_dict(self) -> dict[str, Any]:
        return {"train_split": self.train_split, "copies": self.count, "same_label": self.same_label,
                "items": int(len(self.mask))}


def find_copies(eval_ds: Any, train_ds: Any, train_split: str = "train") -> Copies:
    """:class:`Copies` of ``eval_ds`` in ``train_ds`` (labels compared where both have one)."""
    t0 = time.perf_counter()
    ek, tk = _keys_pair(eval_ds, train_ds)
    mask = np.isin(ek, tk)
    same = 0
    if mask.any():
        el = np.asarray(eval_ds.labels)
        tl = np.asarray(train_ds.labels)
        pairs = {(bytes(k), int(lab)) for k, lab in zip(tk, tl)}
        same = sum(1 for k, lab in zip(ek[mask], el[mask]) if (bytes(k), int(lab)) in pairs)
    log.debug("copies: %d of %d found in %.2f s", int(mask.sum()), len(mask), time.perf_counter() - t0)
    return Copies(mask, int(same), train_split)
