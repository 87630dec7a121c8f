"""RAF-DB basic emotions: aligned faces + ``EmoLabel/list_patition_label.txt``.

Layout (the official ``basic`` package): ``<root>/Image/aligned/train_00001_aligned.jpg`` and
``<root>/EmoLabel/list_patition_label.txt`` (the official spelling; ``list_partition_label.txt`` is accepted
too), where ``<root>`` is the data dir itself or its ``basic/``, ``RAF-DB/basic/``, ``rafdb/basic/``,
``RAF-DB/`` or ``rafdb/`` sub-folder. Each label line is ``train_00001.jpg 5`` with labels 1..7 =
surprise, fear, disgust, happiness, sadness, anger, neutral (stored 0-based, ``LABEL_SETS["rafdb7"]``). The
aligned file adds ``_aligned`` before the extension; a file without that suffix is accepted as well (some
copies rename them). The split is the file-name prefix (``train_``/``test_``).

Images are the official 100x100 aligned RGB faces: no crop; decoded lazily to ``image_size`` (default 112)
with ``channels`` (default 3), or once into memory with ``in_memory=True`` (cached on disk).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from ferengine.labels import LABEL_SETS

from .base import (
    COMMON_OPTS,
    DatasetError,
    FaceDataset,
    candidate_roots,
    check_opts,
    disk_dataset,
    find_child,
    missing,
    normalise_split,
    parse_int,
)

log = logging.getLogger("trainers.data")

SPLITS = ("train", "test")
ALIASES = {"training": "train", "val": "test", "valid": "test", "validation": "test"}
SUBDIRS = ("basic", "RAF-DB/basic", "rafdb/basic", "raf-db/basic", "RAF_DB/basic", "RAF-DB", "rafdb", "raf-db")
LABEL_FILES = ("list_patition_label.txt", "list_partition_label.txt")
SOURCE = ("RAF-DB is distributed by its authors on request (whdeng.cn/raf/model1.html: sign the agreement "
          "and e-mail it); use the 'basic' package.")


def _find(data_dir: Path) -> tuple[Path, Path, Path] | None:
    for root in candidate_roots(data_dir, SUBDIRS):
        emo = find_child(root, "EmoLabel")
        label = None
        if emo is not None:
            for n in LABEL_FILES:
                label = find_child(emo, n)
                if label is not None:
                    break
        img_root = find_child(root, "Image")
        aligned = find_child(img_root, "aligned") if img_root is not None else None
        if label is not None and aligned is not None:
            return root, label, aligned
    return None


def read_rafdb(data_dir: Path, split: str, **opts: Any) -> FaceDataset:
    check_opts("rafdb", opts, COMMON_OPTS)
    split = normalise_split("rafdb", split, SPLITS, ALIASES)
    found = _find(data_dir)
    if found is None:
        raise missing("rafdb", "basic/EmoLabel/list_patition_label.txt and basic/Image/aligned/ (RAF-DB basic)",
                      data_dir, candidate_roots(data_dir, SUBDIRS), SOURCE)
    root, label_file, aligned = found
    present = {p.name for p in aligned.iterdir()}
    files: list[str] = []
    labels: list[int] = []
    missing_files: list[str] = []
    try:
        text = label_file.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot read {label_file}: {e}") from e
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise DatasetError(f"{label_file} line {n}: expected '<image name> <label 1..7>' "
                               f"(e.g. 'train_00001.jpg 5'), found {line.strip()!r}")
        name, lab = parts
        label = parse_int(lab, label_file, n, "a label", 1, 7) - 1
        if not name.lower().startswith(split + "_"):
            continue
        stem, ext = Path(name).stem, Path(name).suffix
        for cand in (f"{stem}_aligned{ext}", name):
            if cand in present:
                files.append(str(aligned / cand))
                labels.append(label)
                break
        else:
            missing_files.append(f"{stem}_aligned{ext}")
    if missing_files:
        raise DatasetError(
            f"rafdb: {len(missing_files)} images listed in {label_file} are not in {aligned} "
            f"(first: {missing_files[0]}); the aligned images of the basic package are expected there"
        )
    if not files:
        raise DatasetError(f"rafdb: {label_file} lists no {split}_*.jpg images")
    info = {"source": str(root), "label_file": str(label_file)}
    log.info("rafdb/%s: %d faces from %s", split, len(files), aligned)
    return disk_dataset("rafdb", split, LABEL_SETS["rafdb7"], np.asarray(labels, np.int64), files, opts,
                        info=info)
