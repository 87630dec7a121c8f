"""SFEW 2.0 (Static Facial Expressions in the Wild): one folder per split, one sub-folder per emotion.

Layout: ``<root>/Train/<Emotion>/*.png``, ``<root>/Val/<Emotion>/*.png`` and ``<root>/Test/*.png`` (no labels:
``labels`` are -1), with emotion folders ``Angry Disgust Fear Happy Neutral Sad Surprise`` (any case; other
spellings through ``ferengine.labels.canonical``). ``<root>`` is the data dir or its ``SFEW/``, ``SFEW_2.0/``,
``SFEW2/`` or ``sfew/`` sub-folder. Split folders may be spelled ``train``/``Training``, ``val``/``valid``/
``Validation``, ``test``/``Testing``; the organisers' ``Train/Train_Aligned_Faces/<Emotion>/`` nesting is
followed too. A test folder that does have emotion sub-folders is read with its labels.

Label order: ``LABEL_SETS["fer7"]`` (angry, disgust, fear, happy, sad, surprise, neutral), so a model
pre-trained on FER2013 fine-tunes on SFEW without re-mapping its outputs (the DAF-CNN protocol).
Images are decoded whole (SFEW's aligned faces are already crops) to ``image_size`` (default 112),
``channels`` (default 3); ``in_memory=True`` decodes once (cached on disk).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from ferengine.labels import LABEL_SETS, canonical

from .base import (
    COMMON_OPTS,
    DatasetError,
    FaceDataset,
    candidate_roots,
    check_opts,
    disk_dataset,
    find_child,
    list_images,
    missing,
    normalise_split,
)

log = logging.getLogger("trainers.data")

SPLITS = ("train", "val", "test")
ALIASES = {"training": "train", "valid": "val", "validation": "val", "testing": "test"}
FOLDER_NAMES = {"train": ("Train", "Training"), "val": ("Val", "Valid", "Validation"),
                "test": ("Test", "Testing")}
SUBDIRS = ("SFEW", "SFEW_2.0", "SFEW2", "SFEW_2", "sfew", "sfew2")
SOURCE = ("SFEW 2.0 is distributed on request by the EmotiW challenge organisers "
          "(cs.anu.edu.au/few: request form / end-user licence agreement).")


def _split_folder(data_dir: Path, split: str) -> Path | None:
    for root in candidate_roots(data_dir, SUBDIRS):
        for name in FOLDER_NAMES[split]:
            d = find_child(root, name)
            if d is not None and d.is_dir():
                nested = find_child(d, f"{d.name}_Aligned_Faces")
                return nested if nested is not None and nested.is_dir() else d
    return None


def read_sfew(data_dir: Path, split: str, **opts: Any) -> FaceDataset:
    check_opts("sfew", opts, COMMON_OPTS)
    split = normalise_split("sfew", split, SPLITS, ALIASES)
    folder = _split_folder(data_dir, split)
    if folder is None:
        raise missing("sfew", f"the split folder {FOLDER_NAMES[split][0]}/ (with one sub-folder per emotion: "
                      "Angry Disgust Fear Happy Neutral Sad Surprise)", data_dir,
                      candidate_roots(data_dir, SUBDIRS), SOURCE)
    names = LABEL_SETS["fer7"]
    files: list[str] = []
    labels: list[int] = []
    subdirs = sorted(p for p in folder.iterdir() if p.is_dir())
    if subdirs:
        for d in subdirs:
            c = canonical(d.name)
            if c not in names:
                raise DatasetError(f"sfew: unexpected folder {d}; expected emotion folders Angry Disgust Fear "
                                   f"Happy Neutral Sad Surprise (any case)")
            imgs = list_images(d)
            files += [str(p) for p in imgs]
            labels += [names.index(c)] * len(imgs)
    else:
        imgs = list_images(folder)
        files = [str(p) for p in imgs]
        labels = [-1] * len(imgs)
        if split != "test":
            raise DatasetError(f"sfew: {folder} has no emotion sub-folders; the {split} split needs "
                               f"{folder}/<Emotion>/*.png")
    if not files:
        raise DatasetError(f"sfew: no images (.png/.jpg) in {folder}")
    labelled = labels[0] >= 0
    log.info("sfew/%s: %d faces from %s%s", split, len(files), folder, "" if labelled else " (no labels)")
    return disk_dataset("sfew", split, names, np.asarray(labels, np.int64), files, opts,
                        info={"source": str(folder), "labelled": labelled})
