"""Aff-Wild2, valence-arousal track (ABAW VA Estimation Challenge).

Layout: annotation files ``VA_Estimation_Challenge/Train_Set/<video>.txt`` and ``.../Validation_Set/<video>.txt``
(found at the data dir's ``Aff-Wild2/``/``affwild2/`` root, or under its ``annotations/``,
``Annotations/`` or ``*_ABAW_Annotations/`` folder; the older ``VA_Set/`` folder name is accepted too), and
the cropped-aligned frames ``cropped_aligned/<video>/00001.jpg`` (1-based, 5 digits; also
``cropped-aligned/``).

Each txt starts with the line ``valence,arousal``; line ``k + 1`` holds frame ``k``'s values in [-1, 1];
-5 marks an invalid frame and is dropped (either value -5). Frames without an image (the face detector
found no face there: common in Aff-Wild2) are dropped too; both counts are logged.

Splits: ``train`` (Train_Set), ``val`` (Validation_Set; the challenge's test labels are not public).
``labels`` are -1 (no categories); ``va`` holds the targets; ``meta`` has ``video`` and ``frame``.
Frames are the challenge's 112x112 aligned crops, decoded lazily to ``image_size`` (default 112),
``channels`` (default 3). The parsed annotations and frame listings are cached.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np

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
    subdirs,
)

log = logging.getLogger("trainers.data")

SPLITS = ("train", "val")
ALIASES = {"training": "train", "valid": "val", "validation": "val", "test": "val"}
SET_DIRS = {"train": "Train_Set", "val": "Validation_Set"}
SUBDIRS = ("Aff-Wild2", "affwild2", "aff-wild2", "AffWild2", "Aff_Wild2")
ANN_PARENTS = (".", "annotations", "Annotations")
TRACK_DIRS = ("VA_Estimation_Challenge", "VA_Set")
FRAME_DIRS = ("cropped_aligned", "cropped-aligned", "cropped_aligned_images")
SOURCE = ("Aff-Wild2 is distributed on request by the ABAW challenge organisers (ibug.doc.ic.ac.uk/resources/"
          "aff-wild2: fill in the end-user licence agreement); use the cropped_aligned frames and the VA "
          "annotations.")


def _find(data_dir: Path, split: str) -> tuple[Path | None, Path | None]:
    """(annotation set folder, cropped_aligned folder), each None when not found."""
    ann = frames = None
    for root in candidate_roots(data_dir, SUBDIRS):
        if frames is None:
            frames = next((p for p in (find_child(root, d) for d in FRAME_DIRS) if p is not None and p.is_dir()),
                          None)
        parents = [root] + [p for p in (find_child(root, d) for d in ANN_PARENTS[1:]) if p is not None]
        parents += [p for p in subdirs(root) if p.name.lower().endswith("abaw_annotations")]
        for parent in parents:
            for t in TRACK_DIRS:
                track = find_child(parent, t)
                s = find_child(track, SET_DIRS[split]) if track is not None else None
                if ann is None and s is not None and s.is_dir():
                    ann = s
    return ann, frames


def parse_va_txt(path: Path) -> np.ndarray:
    """One annotation file -> float32 (F, 2) valence, arousal (invalid -5 kept; caller drops)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot read {path}: {e}") from e
    lines = text.splitlines()
    if not lines or lines[0].replace(" ", "").lower() != "valence,arousal":
        raise DatasetError(f"{path.name} line 1: expected the header 'valence,arousal', "
                           f"found {lines[0][:60] if lines else ''!r}")
    body = lines[1:]
    while body and not body[-1].strip():
        body.pop()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            vals = np.fromstring(" ".join(body).replace(",", " "), dtype=np.float64, sep=" ")
    except ValueError:  # numpy >= 2.x raises on unparsable text
        vals = np.empty(0)
    if vals.size == 2 * len(body):
        vals = vals.reshape(-1, 2)
    else:  # find the offending line
        rows = []
        for n, line in enumerate(body, start=2):
            parts = line.split(",")
            try:
                if len(parts) != 2:
                    raise ValueError
                rows.append((float(parts[0]), float(parts[1])))
            except ValueError:
                raise DatasetError(f"{path} line {n}: expected 'valence,arousal' (two numbers), "
                                   f"found {line.strip()!r}") from None
        vals = np.asarray(rows, np.float64).reshape(-1, 2)
    ok = ((vals >= -1) & (vals <= 1)) | (vals == -5)
    if not ok.all():
        bad = int(np.flatnonzero(~ok.all(axis=1))[0])
        raise DatasetError(f"{path} line {bad + 2}: expected valence and arousal in [-1, 1] or -5 (invalid), "
                           f"found {body[bad].strip()!r}")
    return vals.astype(np.float32)


def _load(ann_dir: Path, frames_dir: Path, cache_dir: Any) -> dict[str, np.ndarray]:
    txts = sorted(p for p in ann_dir.iterdir() if p.suffix.lower() == ".txt")
    if not txts:
        raise DatasetError(f"affwild2: no <video>.txt annotation files in {ann_dir}")
    vdirs = [frames_dir / t.stem for t in txts]
    key = cache.cache_key("affwild2", txts + [d for d in vdirs if d.is_dir()])
    hit = cache.load(key, cache_dir)
    if hit is not None:
        return hit
    video, frame, files, va = [], [], [], []
    n_invalid = n_noimg = 0
    no_dir: list[str] = []
    for t, vdir in zip(txts, vdirs):
        vals = parse_va_txt(t)
        if not vdir.is_dir():
            no_dir.append(t.stem)
            n_noimg += len(vals)
            continue
        present = {p.name for p in vdir.iterdir()}
        for k in range(len(vals)):
            if vals[k, 0] == -5 or vals[k, 1] == -5:
                n_invalid += 1
                continue
            name = f"{k + 1:05d}.jpg"
            if name not in present:
                n_noimg += 1
                continue
            video.append(t.stem)
            frame.append(k + 1)
            files.append(str(vdir / name))
            va.append(vals[k])
    if no_dir:
        log.warning("affwild2: %d annotated videos have no frame folder in %s (first: %s)", len(no_dir),
                    frames_dir, no_dir[0])
    out = {"video": np.asarray(video, dtype=str), "frame": np.asarray(frame, np.int32),
           "files": np.asarray(files, dtype=str), "va": np.asarray(va, np.float32).reshape(-1, 2),
           "counts": np.asarray([len(txts), n_invalid, n_noimg], np.int64)}
    cache.save(key, out, cache_dir)
    return out


def read_affwild2(data_dir: Path, split: str, **opts: Any) -> FaceDataset:
    check_opts("affwild2", opts, COMMON_OPTS)
    split = normalise_split("affwild2", split, SPLITS, ALIASES)
    ann_dir, frames_dir = _find(data_dir, split)
    if ann_dir is None:
        raise missing("affwild2", f"the annotation folder VA_Estimation_Challenge/{SET_DIRS[split]}/ with "
                      "<video>.txt files", data_dir, candidate_roots(data_dir, SUBDIRS), SOURCE)
    if frames_dir is None:
        raise missing("affwild2", f"the frames folder cropped_aligned/<video>/00001.jpg (annotations found in "
                      f"{ann_dir})", data_dir, candidate_roots(data_dir, SUBDIRS), SOURCE)
    a = _load(ann_dir, frames_dir, opts.get("cache_dir"))
    n_videos, n_invalid, n_noimg = (int(x) for x in a["counts"])
    if not len(a["files"]):
        raise DatasetError(f"affwild2: no annotated frame of {ann_dir} has an image in {frames_dir}")
    log.info("affwild2/%s: %d frames from %d videos (dropped %d invalid -5 frames, %d without an image)",
             split, len(a["files"]), n_videos, n_invalid, n_noimg)
    info = {"source": str(ann_dir), "frames": str(frames_dir), "videos": n_videos, "dropped_invalid": n_invalid,
            "dropped_no_image": n_noimg}
    return disk_dataset("affwild2", split, (), np.full(len(a["files"]), -1, np.int64), a["files"].tolist(), opts,
                        va=a["va"], info=info, meta={"video": a["video"], "frame": a["frame"]})
