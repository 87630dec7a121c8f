"""Generic readers: a class-folder tree, or a csv list, for any face dataset not covered by its own reader.

The data dir itself is the dataset root (``--data folder --data-dir my_faces``):

- csv: ``<root>/<split>.csv`` with a header naming the columns: ``path,label``, ``path,valence,arousal`` or
  ``path,label,valence,arousal``. ``path`` is relative to the csv's folder (or absolute); ``label`` is a
  class name (mapped through ``ferengine.labels.canonical``: ``Happiness`` -> ``happy``) or an integer
  index into ``label_set``; an empty label is -1. Valence/arousal must lie in [-1, 1] (empty = NaN).
- tree (used when there is no ``<split>.csv``): ``<root>/<split>/<class>/*.png|jpg``.

Split names: ``train``, ``val``, ``test`` (folders/files matched case-insensitively; ``training``,
``valid``, ``validation``, ``testing`` accepted).

Label order, which must be the same for every split: opt ``label_set`` (a ``LABEL_SETS`` key such as
``fer7``, or comma-separated class names). Without it, the class names of *all* splits under the root are
collected; when they all belong to one of ``LABEL_SETS`` (tried in its order: fer7, ferplus8, affectnet8,
rafdb7) that whole set is used, else the sorted names. Integer labels without ``label_set`` name classes
``"0"`` .. ``"K-1"`` with K = 1 + the largest label in any split csv.

Faces are decoded whole to ``image_size`` (default 112) and ``channels`` (default 3); ``in_memory=True``
decodes once (cached on disk).
"""
from __future__ import annotations

import csv
import io
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from ferengine.labels import LABEL_SETS, canonical

from .base import (
    COMMON_OPTS,
    DatasetError,
    FaceDataset,
    check_opts,
    disk_dataset,
    find_child,
    list_images,
    normalise_split,
    parse_float,
)

log = logging.getLogger("trainers.data")

SPLITS = ("train", "val", "test")
ALIASES = {"training": "train", "valid": "val", "validation": "val", "testing": "test"}
SPELLINGS = {"train": ("train", "training"), "val": ("val", "valid", "validation"), "test": ("test", "testing")}
OPTS = COMMON_OPTS + ("label_set",)


def _split_path(root: Path, split: str, suffix: str) -> Path | None:
    for s in SPELLINGS[split]:
        p = find_child(root, s + suffix)
        if p is not None and (p.is_file() if suffix else p.is_dir()):
            return p
    return None


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]], list[int]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot read {path}: {e}") from e
    rows = list(csv.reader(io.StringIO(text)))
    if not rows:
        raise DatasetError(f"{path}: empty file; expected a header such as 'path,label' or 'path,valence,arousal'")
    header = [h.strip().lower() for h in rows[0]]
    ok = "path" in header and ("label" in header or {"valence", "arousal"} <= set(header))
    if not ok:
        raise DatasetError(f"{path.name} line 1: expected a header 'path,label', 'path,valence,arousal' or "
                           f"'path,label,valence,arousal', found {','.join(rows[0])!r}")
    out, lines = [], []
    for n, row in enumerate(rows[1:], start=2):
        if not row or not "".join(row).strip():
            continue
        if len(row) != len(header):
            raise DatasetError(f"{path.name} line {n}: expected {len(header)} fields ({','.join(header)}), "
                               f"found {len(row)}")
        out.append({h: v.strip() for h, v in zip(header, row)})
        lines.append(n)
    return header, out, lines


def _is_int(s: str) -> bool:
    return s.lstrip("-").isdigit()


def _label_names(root: Path, opt: Any) -> tuple[str, ...] | None:
    """Label order from the option, else from every split's class names (None: integer labels)."""
    if opt:
        if isinstance(opt, str) and opt in LABEL_SETS:
            return LABEL_SETS[opt]
        names = opt.split(",") if isinstance(opt, str) else list(opt)
        return tuple(canonical(n) for n in names if str(n).strip())
    names: set[str] = set()
    max_int = -1
    for split in SPLITS:
        c = _split_path(root, split, ".csv")
        if c is not None:
            header, rows, _ = _read_csv(c)
            if "label" in header:
                for r in rows:
                    lab = r["label"]
                    if _is_int(lab):
                        max_int = max(max_int, int(lab))
                    elif lab:
                        names.add(canonical(lab))
            continue
        d = _split_path(root, split, "")
        if d is not None:
            names |= {canonical(p.name) for p in d.iterdir() if p.is_dir()}
    if names:
        for ls in LABEL_SETS.values():
            if names <= set(ls):
                return ls
        return tuple(sorted(names))
    if max_int >= 0:
        return tuple(str(i) for i in range(max_int + 1))
    return None


def read_folder(data_dir: Path, split: str, **opts: Any) -> FaceDataset:
    check_opts("folder", opts, OPTS)
    split = normalise_split("folder", split, SPLITS, ALIASES)
    root = data_dir
    if not root.is_dir():
        raise DatasetError(f"folder: data dir {root} does not exist; expected {root}/<split>/<class>/*.png or "
                           f"{root}/<split>.csv")
    label_names = _label_names(root, opts.get("label_set")) or ()
    csv_path = _split_path(root, split, ".csv")
    va = None
    if csv_path is not None:
        header, rows, lines = _read_csv(csv_path)
        files, labels, va_rows = [], [], []
        for r, n in zip(rows, lines):
            p = Path(r["path"])
            files.append(str(p if p.is_absolute() else csv_path.parent / p))
            lab = r.get("label", "")
            if not lab:
                labels.append(-1)
            elif _is_int(lab):
                k = int(lab)
                if not -1 <= k < len(label_names):
                    raise DatasetError(f"{csv_path.name} line {n}: expected a label index 0..{len(label_names) - 1}"
                                       f" ({', '.join(label_names)}), found {k}")
                labels.append(k)
            else:
                c = canonical(lab)
                if c not in label_names:
                    raise DatasetError(f"{csv_path.name} line {n}: expected a class among "
                                       f"{', '.join(label_names)}, found {lab!r}")
                labels.append(label_names.index(c))
            if "valence" in header:
                pair = []
                for key in ("valence", "arousal"):
                    x = parse_float(r[key], csv_path.name, n, key) if r[key] else math.nan
                    if not (math.isnan(x) or -1.0 <= x <= 1.0):
                        raise DatasetError(f"{csv_path.name} line {n}: expected {key} in [-1, 1], found {x}")
                    pair.append(x)
                va_rows.append(pair)
        if not files:
            raise DatasetError(f"{csv_path}: no data rows")
        missing_files = [f for f in files[:5] if not Path(f).is_file()]
        if missing_files:
            raise DatasetError(f"folder: image listed in {csv_path.name} not found: {missing_files[0]} "
                               f"(paths are relative to {csv_path.parent})")
        if va_rows:
            va = np.asarray(va_rows, np.float32)
        source = str(csv_path)
    else:
        d = _split_path(root, split, "")
        if d is None:
            raise DatasetError(f"folder: expected {root / split}/<class>/*.png (class folders) or {root / split}.csv "
                               f"(path,label or path,valence,arousal) under {root}")
        files, labels = [], []
        for cdir in sorted(p for p in d.iterdir() if p.is_dir()):
            c = canonical(cdir.name)
            imgs = list_images(cdir)
            files += [str(p) for p in imgs]
            labels += [label_names.index(c) if c in label_names else -2] * len(imgs)
            if c not in label_names:
                raise DatasetError(f"folder: class folder {cdir} is not in the label set {', '.join(label_names)}")
        if not files:
            raise DatasetError(f"folder: no images (.png/.jpg) in the class folders of {d}")
        source = str(d)
    log.info("folder/%s: %d faces from %s (%d classes)", split, len(files), source, len(label_names))
    return disk_dataset("folder", split, label_names, np.asarray(labels, np.int64), files, opts, va=va,
                        info={"source": source})
