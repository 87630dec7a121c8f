"""AffectNet (manually annotated part): the official ``training.csv`` / ``validation.csv`` lists.

Layout: ``<root>/training.csv`` and ``<root>/validation.csv`` (also inside ``Manually_Annotated_file_lists/``),
images under ``<root>/Manually_Annotated_Images/<subDirectory_filePath>`` (also
``<root>/Manually_Annotated/Manually_Annotated_Images/``), where ``<root>`` is the data dir or its
``AffectNet/`` / ``affectnet/`` sub-folder. Columns: ``subDirectory_filePath, face_x, face_y, face_width,
face_height, facial_landmarks, expression, valence, arousal``. A file without the header line (some copies of
validation.csv) is read with that column order.

- ``expression`` 0..10: 0 neutral, 1 happy, 2 sad, 3 surprise, 4 fear, 5 disgust, 6 anger, 7 contempt,
  8 none, 9 uncertain, 10 no-face. ``LABEL_SETS["affectnet8"]``; opt ``classes=7`` drops contempt.
- ``valence``/``arousal`` in [-1, 1]; -2 marks "not annotated" (uncertain / no-face) and becomes NaN.
- opt ``task``: ``expression`` (default: rows whose expression is one of the kept classes; ``va`` filled
  where annotated), ``va`` (rows with valence and arousal, whatever their expression, which includes
  "none"; labels -1 outside the kept classes), ``both`` (rows meeting both).
- opt ``crop``: ``auto`` (default) crops the square around the csv face box enlarged by ``margin``
  (default 0.0) unless the box does not fit inside the image, which then is taken to be a face crop
  already (re-distributed pre-cropped copies keep the original boxes); ``box`` always crops; ``none``
  never does.

Splits: ``train`` (training.csv), ``val`` (validation.csv; AffectNet's test set is not public, so papers
report on it). The csv is parsed once and cached; images decode lazily in ``__getitem__``.
"""
from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from typing import Any

import numpy as np

from ferengine.labels import LABEL_SETS

from . import cache
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
    parse_float,
    parse_int,
    square_box,
)

log = logging.getLogger("trainers.data")

SPLITS = ("train", "val")
ALIASES = {"training": "train", "valid": "val", "validation": "val", "test": "val"}
CSV_OF = {"train": "training.csv", "val": "validation.csv"}
SUBDIRS = ("AffectNet", "affectnet", "Affectnet")
LIST_DIRS = (".", "Manually_Annotated_file_lists", "Manually_Annotated/Manually_Annotated_file_lists")
IMAGE_DIRS = ("Manually_Annotated_Images", "Manually_Annotated/Manually_Annotated_Images",
              "Manually_Annotated_compressed/Manually_Annotated_Images")
COLUMNS = ("subdirectory_filepath", "face_x", "face_y", "face_width", "face_height", "facial_landmarks",
           "expression", "valence", "arousal")
SOURCE = ("AffectNet is distributed by its authors on request (mohammadmahoor.com/affectnet: fill in the "
          "request form); use the Manually_Annotated images and file lists.")
OPTS = COMMON_OPTS + ("classes", "task", "crop", "margin")


def _find_csv(data_dir: Path, split: str) -> tuple[Path, Path] | None:
    for root in candidate_roots(data_dir, SUBDIRS):
        for d in LIST_DIRS:
            folder = root if d == "." else _walk(root, d)
            p = find_child(folder, CSV_OF[split]) if folder is not None else None
            if p is not None and p.is_file():
                return root, p
    return None


def _walk(root: Path, rel: str) -> Path | None:
    cur: Path | None = root
    for part in Path(rel).parts:
        cur = find_child(cur, part) if cur is not None else None
    return cur


def parse_list(path: Path) -> dict[str, np.ndarray]:
    """AffectNet list csv -> files (str), box (N,4) float32, expression int16, va (N,2) float32."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot read {path}: {e}") from e
    reader = csv.reader(io.StringIO(text))
    files: list[str] = []
    box: list[tuple[float, float, float, float]] = []
    expr: list[int] = []
    va: list[tuple[float, float]] = []
    col = {c: i for i, c in enumerate(COLUMNS)}
    for n, row in enumerate(reader, start=1):
        if not row or not "".join(row).strip():
            continue
        if n == 1 and row[0].strip().lower() == "subdirectory_filepath":
            hdr = [h.strip().lower() for h in row]
            lacking = [c for c in COLUMNS if c not in hdr]
            if lacking:
                raise DatasetError(f"{path.name} line 1: expected the columns {','.join(COLUMNS)}; "
                                   f"missing {','.join(lacking)}")
            col = {c: hdr.index(c) for c in COLUMNS}
            continue
        if len(row) < len(col) or len(row) <= max(col.values()):
            raise DatasetError(
                f"{path.name} line {n}: expected {len(COLUMNS)} fields ({','.join(COLUMNS)}), found {len(row)}"
            )
        files.append(row[col["subdirectory_filepath"]].strip())
        box.append(tuple(parse_float(row[col[c]], path.name, n, c)  # type: ignore[misc]
                         for c in ("face_x", "face_y", "face_width", "face_height")))
        expr.append(parse_int(row[col["expression"]], path.name, n, "expression", 0, 10))
        v = parse_float(row[col["valence"]], path.name, n, "valence")
        a = parse_float(row[col["arousal"]], path.name, n, "arousal")
        for name, x in (("valence", v), ("arousal", a)):
            if not (-1.0 <= x <= 1.0 or x == -2.0):
                raise DatasetError(f"{path.name} line {n}: expected {name} in [-1, 1] or -2 (not annotated), "
                                   f"found {x}")
        va.append((v, a))
    if not files:
        raise DatasetError(f"{path}: no data rows")
    vaa = np.asarray(va, np.float32)
    vaa[vaa == -2.0] = np.nan
    return {"files": np.asarray(files, dtype=str), "box": np.asarray(box, np.float32),
            "expression": np.asarray(expr, np.int16), "va": vaa}


def read_affectnet(data_dir: Path, split: str, **opts: Any) -> FaceDataset:
    check_opts("affectnet", opts, OPTS)
    split = normalise_split("affectnet", split, SPLITS, ALIASES)
    classes = int(opts.get("classes", 8))
    if classes not in (7, 8):
        raise DatasetError(f"affectnet: option classes must be 7 or 8, got {classes}")
    task = str(opts.get("task", "expression")).lower()
    if task not in ("expression", "va", "both"):
        raise DatasetError(f"affectnet: option task must be expression, va or both, got {task!r}")
    crop = str(opts.get("crop", "auto")).lower()
    if crop not in ("auto", "box", "none"):
        raise DatasetError(f"affectnet: option crop must be auto, box or none, got {crop!r}")
    margin = float(opts.get("margin", 0.0))

    found = _find_csv(data_dir, split)
    if found is None:
        raise missing("affectnet", f"{CSV_OF[split]} (AffectNet's Manually_Annotated_file_lists) and "
                      f"Manually_Annotated_Images/", data_dir, candidate_roots(data_dir, SUBDIRS), SOURCE)
    root, csv_path = found
    img_root = None
    for base in (root, csv_path.parent, csv_path.parent.parent):
        for d in IMAGE_DIRS:
            p = _walk(base, d)
            if p is not None and p.is_dir():
                img_root = p
                break
        if img_root is not None:
            break
    if img_root is None:
        raise missing("affectnet", f"the image folder Manually_Annotated_Images/ beside {csv_path.name}",
                      data_dir, [root], SOURCE)

    key = cache.cache_key("affectnet-list", [csv_path])
    a = cache.load(key, opts.get("cache_dir"))
    if a is None:
        a = parse_list(csv_path)
        cache.save(key, a, opts.get("cache_dir"))

    expr = a["expression"].astype(np.int64)
    has_class = expr < classes  # 0..6 or 0..7
    has_va = np.isfinite(a["va"]).all(axis=1)
    keep = {"expression": has_class, "va": has_va, "both": has_class & has_va}[task]
    idx = np.flatnonzero(keep)
    labels = np.where(has_class, expr, -1)[idx]
    files = [str(img_root / f) for f in a["files"][idx]]
    # spot-check that the image paths resolve (a wrong root would otherwise fail deep in training)
    for f in files[:3]:
        if not Path(f).is_file():
            raise DatasetError(f"affectnet: image listed in {csv_path.name} not found: {f} (expected the "
                               f"images under {img_root})")
    boxes = None
    if crop != "none":
        b = a["box"][idx]
        boxes = np.asarray([square_box(x, y, x + w, y + h, margin) for x, y, w, h in b], np.float32) \
            if margin else b.copy()
    dropped = {name: int(((expr == code) & ~keep).sum())
               for code, name in ((7, "contempt"), (8, "none"), (9, "uncertain"), (10, "no-face"))}
    info = {"source": str(csv_path), "images": str(img_root), "task": task, "classes": classes, "crop": crop,
            "margin": margin, "dropped": dropped}
    log.info("affectnet/%s (%s, %d classes): %d faces of %d rows (dropped %s)", split, task, classes,
             len(idx), len(expr), dropped)
    return disk_dataset("affectnet", split, LABEL_SETS["affectnet8"][:classes], labels, files, opts,
                        boxes=boxes, va=a["va"][idx], box_fits="inside" if crop == "auto" else "always",
                        info=info)
