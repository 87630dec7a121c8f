"""FER+ (Microsoft's relabelling of FER2013): 10 annotator votes per face, 8 emotion classes.

Layouts accepted under the data dir (the csv pair is preferred):

- ``fer2013new.csv`` (directly, in ``ferplus/`` or ``FERPlus/``) together with the fer2013 csv that the
  ``fer2013`` reader finds. ``fer2013new.csv`` has one row per fer2013 row, in the same order
  (``Usage,Image name,neutral,happiness,surprise,sadness,anger,disgust,fear,contempt,unknown,NF``); rows
  with an empty ``Image name`` are faces FER+ dropped (not a face) and are skipped. The two files are
  checked row by row: same number of rows and the same ``Usage`` on every row, else an error names the
  first line that differs. (The ``ferNNNNNNN.png`` names cannot be used to align: the real file numbers
  them neither by row nor densely over the named rows.) ``meta["fer2013_row"]`` keeps each face's 0-based
  data-row index in the fer2013 csv.
- The folders FERPlus's ``generate_training_data.py`` writes: ``FER2013Train/``, ``FER2013Valid/``,
  ``FER2013Test/`` (directly, in ``ferplus/``, ``FERPlus/``, ``FERPlus/data/`` or ``data/``), each with
  ``label.csv`` (no header; rows ``fer0000000.png,"(0, 0, 48, 48)",v0..v9`` as in the FERPlus repository,
  or ``fer0000000.png,v0..v9`` as the current script writes them) and the 48x48 png files.

Splits: ``train``, ``valid`` (= fer2013 PublicTest), ``test`` (= fer2013 PrivateTest).

Modes (opt ``mode``):

- ``majority`` (default): FERPlus's own rule (``ferplus.py``, ``_process_data``): votes of at most
  ``min_votes`` (default 1: single votes are treated as annotator noise) are zeroed; the top class must
  hold more than ``majority`` (default 0.5) of the remaining votes; faces without such a majority, or
  whose majority is ``unknown`` or ``NF``, are dropped. ``labels`` = that class; 8 classes.
- ``distribution``: ``soft_labels`` = the 8 emotion votes normalised to sum 1 (raw votes, no outlier
  removal); faces are kept when their top vote over all 10 columns is an emotion (ties with unknown/NF
  go to the emotion) and they have at least one emotion vote. ``labels`` = the emotion with most votes
  (first in label order on ties), so accuracy can be measured; use ``majority`` for the test protocol.

Valence/arousal (opt ``va``): ``va=anchors`` adds ``va`` (float32 ``(N,2)`` in [-1, 1]) to the faces of either
mode: a PROXY valence/arousal task, since FER+ has no human valence/arousal ratings. Each face's target is the
vote-weighted mean of the category anchors ``ferengine.labels.AV_ANCHORS`` (Russell & Mehrabian 1977; contempt
is fer-desktop's own placement) of the 8 emotion classes: the raw 8 emotion votes normalised to sum 1 (no
outlier removal, ``unknown``/``NF`` left out, in both modes), i.e. exactly
``ferengine.labels.estimate_va(votes[:8] / votes[:8].sum(), LABEL_SETS["ferplus8"])``. So 6 happy and 4 neutral
votes give ``(0.6 * 0.81, 0.6 * 0.51)``. Every load with it logs a WARNING saying that the targets are a proxy,
and ``info["va"]`` says so too. They measure agreement with the annotators' categories placed on the anchor
plane, not valence/arousal as people rate it. ``va=none`` (the default): no ``va``. The data cache holds only
the decoded images (fer2013 csv, FERPlus folders), never targets, so loads with and without ``va`` share it
and the targets are always computed from the votes as read.

Label order: ``ferengine.labels.LABEL_SETS["ferplus8"]`` (neutral, happy, surprise, sad, angry, disgust,
fear, contempt), the vote-column order.
"""
from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from typing import Any

import numpy as np

from ferengine.labels import AV_ANCHOR_SOURCE, LABEL_SETS, anchor_matrix

from . import cache
from .base import (
    DatasetError,
    FaceDataset,
    candidate_roots,
    check_opts,
    decode_all,
    find_child,
    missing,
    normalise_split,
    parse_int,
    screen_images,
)
from .fer2013 import COMMON_OPTS, SOURCE as FER_SOURCE, find_csv, load_csv, looked_in

log = logging.getLogger("trainers.data")

SPLITS = ("train", "valid", "test")
ALIASES = {"training": "train", "publictest": "valid", "val": "valid", "validation": "valid",
           "privatetest": "test"}
FOLDERS = {"train": "FER2013Train", "valid": "FER2013Valid", "test": "FER2013Test"}
USAGE_OF = {"train": 0, "valid": 1, "test": 2}
USAGE_NAMES = ("Training", "PublicTest", "PrivateTest")
VOTE_COLUMNS = ("neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear", "contempt",
                "unknown", "nf")
SUBDIRS = ("ferplus", "FERPlus", "FERPlus/data", "FERPlus-master/data", "data")
SOURCE = ("FER+ labels come from the FERPlus GitHub repository (github.com/microsoft/FERPlus: "
          "fer2013new.csv; its src/generate_training_data.py writes the FER2013Train/Valid/Test folders); "
          "the images are FER2013's. " + FER_SOURCE)
OPTS = COMMON_OPTS + ("mode", "min_votes", "majority", "source", "va")
VA_MODES = ("none", "anchors")
PROXY_WARNING = ("valence/arousal targets are a PROXY: the vote-weighted mean of category anchors "
                 "(ferengine.labels.AV_ANCHORS), not human valence/arousal ratings")


def find_new_csv(data_dir: Path) -> Path | None:
    for root in candidate_roots(data_dir, SUBDIRS):
        p = find_child(root, "fer2013new.csv")
        if p is not None and p.is_file():
            return p
    return None


def find_folders(data_dir: Path) -> Path | None:
    for root in candidate_roots(data_dir, SUBDIRS):
        if any(find_child(root, f) is not None for f in FOLDERS.values()):
            return root
    return None


# ------------------------------------------------------------------------------------ vote rules


def majority_labels(votes: np.ndarray, min_votes: int = 1, majority: float = 0.5) -> np.ndarray:
    """FERPlus majority rule on (N,10) votes: class index 0..7, or -1 (no majority / unknown / NF)."""
    v = np.where(votes <= min_votes, 0, votes).astype(np.float64)
    total = v.sum(axis=1)
    top = v.argmax(axis=1)
    ok = (v.max(axis=1) > majority * total) & (total > 0) & (top < 8)
    return np.where(ok, top, -1).astype(np.int64)


def distribution_targets(votes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(keep mask, soft labels (N,8), argmax labels) for the vote-distribution mode."""
    emo = votes[:, :8].astype(np.float64)
    s = emo.sum(axis=1)
    keep = (s > 0) & (emo.max(axis=1) >= votes[:, 8:].max(axis=1))
    soft = emo / np.maximum(s, 1e-12)[:, None]
    return keep, soft.astype(np.float32), emo.argmax(axis=1).astype(np.int64)


def anchor_va(votes: np.ndarray) -> np.ndarray:
    """Proxy valence/arousal of (N,10) votes: float32 (N,2), the anchors (``ferengine.labels.AV_ANCHORS``) of
    the 8 emotion classes weighted by their raw votes normalised to sum 1 (``estimate_va`` of that
    distribution); ``unknown``/``NF`` votes are left out; a face without an emotion vote gets the neutral point."""
    anchors, mask = anchor_matrix(LABEL_SETS["ferplus8"])
    assert mask.all(), "every FER+ class has an anchor"
    emo = np.asarray(votes, np.float64)[:, :8]
    s = emo.sum(axis=1, keepdims=True)
    va = np.divide(emo @ anchors, s, out=np.zeros((len(emo), 2)), where=s > 0)
    return np.clip(va, -1.0, 1.0).astype(np.float32)


# ---------------------------------------------------------------------------------------- csv pair


def parse_new_csv(path: Path) -> tuple[np.ndarray, list[str], np.ndarray]:
    """fer2013new.csv -> (usage codes int8 (N,), image names, votes int32 (N,10))."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot read {path}: {e}") from e
    rows = list(csv.reader(io.StringIO(text)))
    name = path.name
    if not rows:
        raise DatasetError(f"{path}: empty file; expected the header Usage,Image name,neutral,...,NF")
    header = [h.strip().lower() for h in rows[0]]
    expected = ["usage", "image name", *VOTE_COLUMNS]
    if header != expected:
        raise DatasetError(
            f"{name} line 1: expected the header 'Usage,Image name,neutral,happiness,surprise,sadness,anger,"
            f"disgust,fear,contempt,unknown,NF', found {','.join(rows[0])!r}"
        )
    usage = np.empty(len(rows) - 1, np.int8)
    votes = np.empty((len(rows) - 1, 10), np.int32)
    names: list[str] = []
    codes = {"training": 0, "publictest": 1, "privatetest": 2}
    for i, row in enumerate(rows[1:]):
        n = i + 2
        if len(row) != 12:
            raise DatasetError(f"{name} line {n}: expected 12 comma-separated fields (Usage, Image name, "
                               f"10 vote counts), found {len(row)}")
        u = codes.get(row[0].strip().lower())
        if u is None:
            raise DatasetError(f"{name} line {n}: expected Usage Training, PublicTest or PrivateTest, "
                               f"found {row[0]!r}")
        usage[i] = u
        names.append(row[1].strip())
        try:
            votes[i] = [int(x) for x in row[2:]]
        except ValueError:
            raise DatasetError(f"{name} line {n}: expected 10 integer vote counts, found {row[2:]}") from None
        if votes[i].min() < 0:
            raise DatasetError(f"{name} line {n}: expected non-negative vote counts, found {row[2:]}")
    return usage, names, votes


def _from_csv_pair(fer_csv: Path, new_csv: Path, split: str, opts: dict[str, Any]) -> tuple:
    a = load_csv(fer_csv, opts.get("cache_dir"))
    usage, names, votes = parse_new_csv(new_csv)
    if len(usage) != len(a["usage"]):
        raise DatasetError(
            f"ferplus: {new_csv.name} has {len(usage)} data rows but {fer_csv.name} has {len(a['usage'])}; "
            f"they must describe the same FER2013 rows in the same order (use the fer2013.csv that "
            f"fer2013new.csv was made for)"
        )
    diff = np.flatnonzero(usage != a["usage"])
    if len(diff):
        i = int(diff[0])
        raise DatasetError(
            f"ferplus: row mismatch: {new_csv.name} line {i + 2} says {USAGE_NAMES[usage[i]]} but "
            f"{fer_csv.name} line {int(a['line'][i])} says {USAGE_NAMES[a['usage'][i]]}; the files are "
            f"not row-aligned"
        )
    code = USAGE_OF[split]
    has_name = np.array([len(x) > 0 for x in names], bool)
    sel = (usage == code) & has_name
    if not (usage == code).any():
        raise DatasetError(
            f"ferplus: {fer_csv} has no {USAGE_NAMES[code]} rows, so there is no {split} split"
            + (" (the PrivateTest rows are kept back in this copy: select models on valid)"
               if split == "test" else "")
        )
    idx = np.flatnonzero(sel)
    info = {"source": f"{fer_csv} + {new_csv}", "dropped_no_name": int(((usage == code) & ~has_name).sum())}
    return a["images"][idx], votes[idx], [names[i] for i in idx], idx, info


# ------------------------------------------------------------------------------------------ folders


def parse_label_csv(path: Path) -> tuple[list[str], np.ndarray]:
    """FERPlus ``label.csv``: (file names, votes int32 (N,10))."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot read {path}: {e}") from e
    files: list[str] = []
    votes: list[list[int]] = []
    for n, row in enumerate(csv.reader(io.StringIO(text)), start=1):
        if not row or not "".join(row).strip():
            continue
        if len(row) == 12:  # name, "(x, y, w, h)", 10 votes
            vals = row[2:]
        elif len(row) == 11:  # name, 10 votes
            vals = row[1:]
        else:
            raise DatasetError(
                f"{path} line {n}: expected 'ferNNNNNNN.png,\"(0, 0, 48, 48)\",' followed by 10 vote counts "
                f"(12 fields; or 11 without the box), found {len(row)} fields"
            )
        votes.append([parse_int(v, path, n, "a vote count", 0) for v in vals])
        files.append(row[0].strip())
    if not files:
        raise DatasetError(f"{path}: no label rows")
    return files, np.asarray(votes, np.int32)


def _from_folders(root: Path, split: str, opts: dict[str, Any]) -> tuple:
    folder = find_child(root, FOLDERS[split])
    if folder is None or not folder.is_dir():
        raise DatasetError(f"ferplus: expected the folder {root / FOLDERS[split]} (with label.csv and the png "
                           f"files) for the {split} split. {SOURCE}")
    label_csv = find_child(folder, "label.csv")
    if label_csv is None:
        raise DatasetError(f"ferplus: expected {folder / 'label.csv'} (FERPlus's per-folder labels). {SOURCE}")
    names, votes = parse_label_csv(label_csv)
    paths = [str(folder / f) for f in names]
    keep = screen_images(paths, f"ferplus {folder}")
    if not keep.all():
        paths = [p for p, k in zip(paths, keep) if k]
        votes = votes[keep]
    key = cache.cache_key("ferplus-folder", [label_csv, *paths], n=len(paths))
    hit = cache.load(key, opts.get("cache_dir"))
    if hit is not None and len(hit.get("images", ())) == len(paths):
        images = hit["images"]
    else:
        images = decode_all(paths, None, 48, 1, desc=f"ferplus {folder.name}")
        cache.save(key, {"images": images}, opts.get("cache_dir"))
    return images, votes, paths, None, {"source": str(folder), "layout": "ferplus-folders"}


# ------------------------------------------------------------------------------------------ reader


def read_ferplus(data_dir: Path, split: str, **opts: Any) -> FaceDataset:
    check_opts("ferplus", opts, OPTS)
    split = normalise_split("ferplus", split, SPLITS, ALIASES)
    mode = str(opts.get("mode", "majority")).lower()
    if mode not in ("majority", "distribution"):
        raise DatasetError(f"ferplus: unknown mode {mode!r}; expected 'majority' or 'distribution'")
    va_mode = str(opts.get("va", "none")).strip().lower()
    if va_mode not in VA_MODES:
        raise DatasetError(f"ferplus: unknown va {opts['va']!r}; expected 'anchors' (proxy valence/arousal targets "
                           f"from the votes and the category anchors) or 'none'")
    source = str(opts.get("source", "auto")).lower()
    new_csv = find_new_csv(data_dir) if source in ("auto", "csv") else None
    fer_csv = find_csv(data_dir) if new_csv is not None else None
    if new_csv is not None and fer_csv is not None:
        images, votes, names, rows, info = _from_csv_pair(fer_csv, new_csv, split, opts)
    else:
        root = find_folders(data_dir) if source in ("auto", "folders") else None
        if root is None:
            if new_csv is not None:  # labels found, images not
                raise missing("ferplus", f"fer2013.csv or fer2013.csv.gz (the images for {new_csv})",
                              data_dir, looked_in(data_dir), FER_SOURCE)
            raise missing(
                "ferplus", "fer2013new.csv together with fer2013.csv(.gz), or FERPlus's FER2013Train/, "
                "FER2013Valid/, FER2013Test/ folders with label.csv", data_dir,
                candidate_roots(data_dir, SUBDIRS), SOURCE,
            )
        images, votes, names, rows, info = _from_folders(root, split, opts)

    n_all = len(votes)
    soft = None
    if mode == "majority":
        labels = majority_labels(votes, int(opts.get("min_votes", 1)), float(opts.get("majority", 0.5)))
        keep = labels >= 0
    else:
        keep, soft, labels = distribution_targets(votes)
        soft = soft[keep]
    labels = labels[keep]
    info.update(mode=mode, faces_with_labels=n_all, dropped_by_vote_rule=int(n_all - keep.sum()))
    log.info("ferplus/%s (%s): %d faces kept of %d (%d dropped: no majority or unknown/not-a-face)",
             split, mode, int(keep.sum()), n_all, n_all - int(keep.sum()))
    kept = np.flatnonzero(keep)
    va = None
    if va_mode == "anchors":
        va = anchor_va(votes[kept])
        info["va"] = f"proxy: vote-weighted mean of the category anchors ({AV_ANCHOR_SOURCE}); not human ratings"
        log.warning("ferplus/%s: %s", split, PROXY_WARNING)
    files = [names[i] for i in kept] if info.get("layout") == "ferplus-folders" else None
    meta = {"image_name": np.asarray([Path(names[i]).name for i in kept], dtype=str)}
    if rows is not None:
        meta["fer2013_row"] = rows[kept]  # 0-based data-row index into the fer2013 csv
    return FaceDataset("ferplus", split, LABEL_SETS["ferplus8"], labels, images=images[keep],
                       soft_labels=soft, va=va, files=files, image_size=48, channels=1, info=info, meta=meta)
