"""AFEW-VA: 600 clips with per-frame valence and arousal in [-10, 10] and 68 landmarks.

Layout: ``<root>/<clip>/<clip>.json`` plus the frames ``<root>/<clip>/00000.png``, ... where ``<clip>`` is
``001`` .. ``600`` and ``<root>`` is the data dir or its ``AFEW-VA/``, ``afew-va/``, ``AFEW_VA/`` or
``afew_va/`` sub-folder (clips may also sit one level down, as unpacked from the 12 per-50-clip zips,
e.g. ``<root>/01/001/``). The JSON is ``{"actor": ..., "video_id": "001", "frames": {"00000": {"valence": v,
"arousal": a, "landmarks": [[x, y], ...]}, ...}}``.

- Valence/arousal are divided by 10 into [-1, 1] (``va``); ``labels`` are -1 (no categories).
- Faces are cropped to the square around the landmarks' bounding box enlarged by ``margin`` (default
  0.25; the landmarks span brows to chin, so some margin keeps the forehead); ``margin=-1`` keeps whole frames.
- A frame listed in the JSON whose image is absent is skipped (counted in the log).

Splits: the papers use subject-independent k-fold protocols without publishing the folds, so this reader
makes a deterministic one: clips are grouped by ``actor`` (opt ``split_by="actor"``, default; ``"clip"`` to
group by clip), groups are ordered by size (largest first, ties by name) and each is assigned to the fold
that has the fewest frames so far (ties to the lower fold). ``test`` = fold ``fold`` (default 0) of
``folds`` (default 5), ``train`` = the other folds; ``all`` = every clip. No actor appears in both train and
test. The parsed JSON is cached.
"""
from __future__ import annotations

import json
import logging
import re
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
    missing,
    normalise_split,
    square_box,
    subdirs,
)

log = logging.getLogger("trainers.data")

SPLITS = ("train", "test", "all")
ALIASES = {"training": "train", "val": "test", "valid": "test", "validation": "test"}
SUBDIRS = ("AFEW-VA", "afew-va", "AFEW_VA", "afew_va", "AFEWVA", "afewva")
SOURCE = ("AFEW-VA is distributed by the iBUG group, Imperial College London "
          "(ibug.doc.ic.ac.uk/resources/afew-va-database: 12 zip files of 50 clips each).")
OPTS = COMMON_OPTS + ("fold", "folds", "split_by", "margin")
CLIP_RE = re.compile(r"^\d{3}$")


def find_clips(data_dir: Path) -> list[Path]:
    """Clip folders (``NNN/NNN.json``) under the first root that has any, searched two levels deep."""
    for root in candidate_roots(data_dir, SUBDIRS):
        clips: list[Path] = []
        for d in subdirs(root):
            if CLIP_RE.match(d.name) and (d / f"{d.name}.json").is_file():
                clips.append(d)
            elif not CLIP_RE.match(d.name):
                clips += [c for c in subdirs(d) if CLIP_RE.match(c.name) and (c / f"{c.name}.json").is_file()]
        if clips:
            return sorted(clips, key=lambda p: p.name)
    return []


def parse_clip(json_path: Path) -> tuple[str, list[str], np.ndarray, np.ndarray]:
    """One clip JSON -> (actor, frame ids, va (F,2) in [-10,10], landmark boxes (F,4) x0,y0,x1,y1)."""
    try:
        doc = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot read {json_path}: {e}") from e
    except json.JSONDecodeError as e:
        raise DatasetError(f"{json_path} line {e.lineno}: not valid JSON ({e.msg})") from e
    frames = doc.get("frames") if isinstance(doc, dict) else None
    if not isinstance(frames, dict):
        raise DatasetError(f"{json_path}: expected a JSON object with a 'frames' object "
                           f"({{\"frames\": {{\"00000\": {{\"valence\": v, \"arousal\": a, \"landmarks\": [...]}}}}}})")
    actor = str(doc.get("actor", json_path.parent.name))
    ids: list[str] = []
    va: list[tuple[float, float]] = []
    boxes: list[tuple[float, float, float, float]] = []
    for fid in sorted(frames):
        f = frames[fid]
        try:
            v, a = float(f["valence"]), float(f["arousal"])
        except (KeyError, TypeError, ValueError):
            raise DatasetError(f"{json_path}: frame {fid!r}: expected numeric 'valence' and 'arousal'") from None
        if not (-10 <= v <= 10 and -10 <= a <= 10):
            raise DatasetError(f"{json_path}: frame {fid!r}: expected valence/arousal in [-10, 10], "
                               f"found {v}, {a}")
        try:
            lm = np.asarray(f.get("landmarks") or [], dtype=np.float64).reshape(-1, 2)
        except (TypeError, ValueError):
            raise DatasetError(f"{json_path}: frame {fid!r}: expected 'landmarks' as a list of [x, y] pairs") from None
        if len(lm):
            boxes.append((lm[:, 0].min(), lm[:, 1].min(), lm[:, 0].max(), lm[:, 1].max()))
        else:
            boxes.append((np.nan,) * 4)
        ids.append(str(fid))
        va.append((v, a))
    return actor, ids, np.asarray(va, np.float32).reshape(-1, 2), np.asarray(boxes, np.float32).reshape(-1, 4)


def assign_folds(groups: dict[str, int], folds: int) -> dict[str, int]:
    """Greedy balanced assignment of groups (name -> frame count) to folds; deterministic."""
    load = [0] * folds
    out: dict[str, int] = {}
    for name, size in sorted(groups.items(), key=lambda kv: (-kv[1], kv[0])):
        k = min(range(folds), key=lambda i: (load[i], i))
        out[name] = k
        load[k] += size
    return out


def _load_all(clips: list[Path], cache_dir: Any) -> dict[str, np.ndarray]:
    jsons = [c / f"{c.name}.json" for c in clips]
    key = cache.cache_key("afew-va", jsons + clips)
    hit = cache.load(key, cache_dir)
    if hit is not None:
        return hit
    clip_col, frame_col, actor_col, va_all, box_all, file_col = [], [], [], [], [], []
    n_missing = 0
    for c, j in zip(clips, jsons):
        actor, ids, va, boxes = parse_clip(j)
        present = {p.name for p in c.iterdir()}
        for i, fid in enumerate(ids):
            name = next((f"{fid}{ext}" for ext in (".png", ".jpg") if f"{fid}{ext}" in present), None)
            if name is None:
                n_missing += 1
                continue
            clip_col.append(c.name)
            frame_col.append(fid)
            actor_col.append(actor)
            file_col.append(str(c / name))
            va_all.append(va[i])
            box_all.append(boxes[i])
    out = {"clip": np.asarray(clip_col, dtype=str), "frame": np.asarray(frame_col, dtype=str),
           "actor": np.asarray(actor_col, dtype=str), "files": np.asarray(file_col, dtype=str),
           "va": np.asarray(va_all, np.float32).reshape(-1, 2), "box": np.asarray(box_all, np.float32).reshape(-1, 4),
           "missing": np.asarray([n_missing], np.int64)}
    cache.save(key, out, cache_dir)
    return out


def read_afew_va(data_dir: Path, split: str, **opts: Any) -> FaceDataset:
    check_opts("afew-va", opts, OPTS)
    split = normalise_split("afew-va", split, SPLITS, ALIASES)
    folds = int(opts.get("folds", 5))
    fold = int(opts.get("fold", 0))
    if folds < 2 or not 0 <= fold < folds:
        raise DatasetError(f"afew-va: need folds >= 2 and 0 <= fold < folds, got fold={fold}, folds={folds}")
    split_by = str(opts.get("split_by", "actor")).lower()
    if split_by not in ("actor", "clip"):
        raise DatasetError(f"afew-va: option split_by must be 'actor' or 'clip', got {split_by!r}")
    margin = float(opts.get("margin", 0.25))
    clips = find_clips(data_dir)
    if not clips:
        raise missing("afew-va", "clip folders 001/ .. 600/ each with <clip>.json and its frames 00000.png ...",
                      data_dir, candidate_roots(data_dir, SUBDIRS), SOURCE)
    a = _load_all(clips, opts.get("cache_dir"))
    if int(a["missing"][0]):
        log.warning("afew-va: %d annotated frames have no image file and were skipped", int(a["missing"][0]))
    group = a["actor"] if split_by == "actor" else a["clip"]
    names, counts = np.unique(group, return_counts=True)
    fold_of = assign_folds(dict(zip(names.tolist(), counts.tolist())), folds)
    item_fold = np.asarray([fold_of[g] for g in group.tolist()], np.int64)
    sel = {"train": item_fold != fold, "test": item_fold == fold, "all": np.ones(len(group), bool)}[split]
    idx = np.flatnonzero(sel)
    if not len(idx):
        raise DatasetError(f"afew-va: fold {fold} of {folds} is empty ({len(names)} {split_by}s found); "
                           f"use fewer folds")
    boxes = None
    if margin > -1:
        b = a["box"][idx]
        boxes = np.asarray([square_box(*r, margin) if np.isfinite(r).all() else (np.nan,) * 4 for r in b],
                           np.float32)
    info = {"source": str(clips[0].parent), "clips": int(len(np.unique(a["clip"][idx]))), "fold": fold,
            "folds": folds, "split_by": split_by, "margin": margin,
            "split_rule": "greedy balanced folds over actors (largest first), test = fold, train = rest"}
    log.info("afew-va/%s: %d frames from %d clips (fold %d of %d by %s)", split, len(idx), info["clips"], fold,
             folds, split_by)
    return disk_dataset("afew-va", split, (), np.full(len(idx), -1, np.int64), a["files"][idx].tolist(), opts,
                        boxes=boxes, va=a["va"][idx] / 10.0, info=info,
                        meta={"clip": a["clip"][idx], "frame": a["frame"][idx], "actor": a["actor"][idx]})
