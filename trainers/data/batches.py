"""Batch providers: a dataset -> :class:`Batch` es on the training device, augmented as whole batches.

- :class:`TensorBatches`: an in-memory dataset (``ds.images``) kept as one uint8 tensor on the device;
  batches are cut by index, no per-image Python, no DataLoader.
- :class:`LoaderBatches`: an on-disk dataset decoded by DataLoader workers, then augmented on the device.

Both hand out the same batches for the same seed (order and augmentation come from their own generators,
saved for an exact resume), one augmented tensor per view, normalised by
:func:`ferengine.preprocess.to_model_input` -- the arithmetic inference uses. Under ``torchrun`` each
process takes its share of every global batch (``rank``/``world``), in the same global order.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch

from ferengine.preprocess import InputSpec, to_model_input

from ..augment import BatchAugment, to_nchw_uint8

__all__ = ["Batch", "Batches", "TensorBatches", "LoaderBatches", "make_batches"]


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


class Batches:
    """Common part of the batch providers: order, sharding, augmentation per view + ``to_model_input``."""

    channels_last = False  # hand out NHWC-strided inputs (the Trainer sets it from the config)

    def __init__(self, spec: InputSpec, device: torch.device, batch_size: int,
                 augment: Sequence[BatchAugment] | None, views: int, shuffle: bool, drop_last: bool, seed: int,
                 rank: int = 0, world: int = 1):
        self.spec, self.device, self.batch_size = spec, device, int(batch_size)
        self.views = max(1, int(views))
        augs = list(augment) if augment else []
        if augs and len(augs) not in (1, self.views):
            raise ValueError(f"{len(augs)} augmentations for {self.views} views")
        self.augments = augs * self.views if len(augs) == 1 else augs
        self.shuffle, self.drop_last = shuffle, drop_last
        self.rank, self.world = int(rank), max(1, int(world))
        self.order_gen = torch.Generator().manual_seed(seed)  # the same on every process
        self.aug_gen = torch.Generator().manual_seed(seed + 7919 + 1_000_003 * self.rank)

    def _num(self, n: int) -> int:
        if self.drop_last and n >= self.batch_size:
            return n // self.batch_size
        return math.ceil(n / self.batch_size)

    def _order(self, n: int) -> torch.Tensor:
        if self.shuffle:
            return torch.randperm(n, generator=self.order_gen)
        return torch.arange(n)

    def _global_batches(self, n: int, limit: int | None) -> list[torch.Tensor]:
        """Dataset indices of this process's part of each global batch."""
        order = self._order(n)
        count = self._num(n) if limit is None else min(limit, self._num(n))
        out = []
        for b in range(count):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            if self.world > 1:
                idx = idx.tensor_split(self.world)[self.rank]
            if len(idx):
                out.append(idx)
        return out

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

    def __iter__(self) -> Iterator[Batch]:
        return self.iter_batches()

    def iter_batches(self, limit: int | None = None) -> Iterator[Batch]:  # pragma: no cover - abstract
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {"order": self.order_gen.get_state(), "aug": self.aug_gen.get_state()}

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.order_gen.set_state(s["order"])
        self.aug_gen.set_state(s["aug"])


class TensorBatches(Batches):
    """In-memory dataset: uint8 images kept as one tensor on the training device, batches cut by index
    and augmented as whole batches (no per-image Python, no DataLoader)."""

    def __init__(self, ds: Any, spec: InputSpec, device: torch.device, batch_size: int,
                 augment: Sequence[BatchAugment] | None = None, views: int = 1, shuffle: bool = False,
                 drop_last: bool = False, seed: int = 0, rank: int = 0, world: int = 1):
        super().__init__(spec, device, batch_size, augment, views, shuffle, drop_last, seed, rank, world)
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

    def iter_batches(self, limit: int | None = None) -> Iterator[Batch]:
        for idx in self._global_batches(self.n, limit):
            idx = idx.to(self.device)
            yield self._assemble(
                self.images[idx], self.labels[idx], idx,
                None if self.soft is None else self.soft[idx], None if self.va is None else self.va[idx],
            )


class _BatchList(torch.utils.data.Sampler):
    """The batches (index lists) a DataLoader decodes next; set before each pass."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _collate(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    imgs = [to_nchw_uint8(torch.as_tensor(it["image"]).unsqueeze(0))[0] for it in items]
    shapes = {tuple(i.shape) for i in imgs}
    if len(shapes) > 1:
        raise ValueError(f"on-disk dataset returned faces of different shapes {sorted(shapes)[:3]}; "
                         "its reader must resize every face to one image_size")
    out = {"image": torch.stack(imgs),
           "label": torch.tensor([int(it["label"]) for it in items], dtype=torch.int64),
           "index": torch.tensor([int(it["index"]) for it in items], dtype=torch.int64)}
    if "soft" in items[0]:
        out["soft"] = torch.stack([torch.as_tensor(it["soft"], dtype=torch.float32) for it in items])
    if "va" in items[0]:
        out["va"] = torch.stack([torch.as_tensor(it["va"], dtype=torch.float32) for it in items])
    return out


class LoaderBatches(Batches):
    """On-disk dataset: decoded by DataLoader workers, then augmented on the device as whole batches."""

    def __init__(self, ds: Any, spec: InputSpec, device: torch.device, batch_size: int,
                 augment: Sequence[BatchAugment] | None = None, views: int = 1, shuffle: bool = False,
                 drop_last: bool = False, seed: int = 0, workers: int = 4, rank: int = 0, world: int = 1):
        super().__init__(spec, device, batch_size, augment, views, shuffle, drop_last, seed, rank, world)
        self.n = len(ds)
        self.batch_list = _BatchList()
        self.loader = torch.utils.data.DataLoader(
            ds, batch_sampler=self.batch_list, num_workers=workers, collate_fn=_collate,
            pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(seed + 1),
        )

    def __len__(self) -> int:
        return self._num(self.n)

    def iter_batches(self, limit: int | None = None) -> Iterator[Batch]:
        # the loader is told exactly which batches to decode, so it ends by itself (abandoning one
        # mid-way stalls its workers)
        self.batch_list.batches = [idx.tolist() for idx in self._global_batches(self.n, limit)]
        nb = self.device.type == "cuda"
        for d in self.loader:
            d = {k: v.to(self.device, non_blocking=nb) for k, v in d.items()}
            yield self._assemble(d["image"], d["label"], d["index"], d.get("soft"), d.get("va"))


def make_batches(ds: Any, spec: InputSpec, device: torch.device, batch_size: int, *,
                 augment: Sequence[BatchAugment] | None = None, views: int = 1, shuffle: bool = False,
                 drop_last: bool = False, seed: int = 0, workers: int = 4, rank: int = 0, world: int = 1) -> Batches:
    """The right batch provider for ``ds``: in memory -> :class:`TensorBatches`, else :class:`LoaderBatches`."""
    if getattr(ds, "images", None) is not None:
        return TensorBatches(ds, spec, device, batch_size, augment, views, shuffle, drop_last, seed, rank, world)
    if hasattr(ds, "image_size"):  # decode straight to the model's size and channels
        ds.image_size = spec.size
    if hasattr(ds, "channels"):
        ds.channels = spec.channels
    return LoaderBatches(ds, spec, device, batch_size, augment, views, shuffle, drop_last, seed, workers, rank, world)
