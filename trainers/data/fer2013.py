"""FER2013: Kaggle's ``fer2013.csv`` (or ``.csv.gz``), or Kaggle's ``train/`` + ``test/`` image folders.

Layouts accepted under the data dir (first found wins; the csv is preferred to the folders):

- ``fer2013.csv`` / ``fer2013.csv.gz``, directly or in ``fer2013/`` (also ``FER2013/``). Columns are found
  by header name (``emotion``, ``pixels``, ``Usage``, any order, spaces allowed, so the ``icml_face_data.csv``
  variant reads too); no ``emotion`` column gives labels -1, no ``Usage`` column makes every row Training.
  Each row holds 2304 space-separated values 0..255 (48x48 grey).
- Kaggle's image folders ``train/<emotion>/*.png`` and ``test/<emotion>/*.png`` (the popular re-upload),
  directly or in ``fer2013/``. ``test/`` is read as the ``publictest`` split. That re-upload's ``test/``
  holds 7,178 images, i.e. PublicTest and PrivateTest together (3,589 each); the folders give no way to
  tell them apart, so ``privatetest`` is an error there and a note is logged when ``test/`` has 7,178.

Splits: ``train``, ``publictest``, ``privatetest`` (the csv's ``Training``/``PublicTest``/``PrivateTest``
accepted case-insensitively; also ``val``/``valid`` = publictest and ``test`` = privatetest, the usual
paper convention).

The csv is parsed once (vectorised, in chunks of rows) and the decoded arrays cached
(``trainers.data.cache``); later runs load the cache in well under a second. Quirks are measured and
logged: blank images (all pixels equal; the real file has 12 across its three splits) and groups of
bit-identical images (across splits, with conflicting labels). They are kept, not dropped: dropping
would change the published test sets; ``info["blank"]`` lists the blank items' indices in the split.
"""
from __future__ import annotations

import gzip
import logging
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ferengine.labels import LABEL_SETS, canonical

from . import cache
from .base import (
    COMMON_OPTS,
    DatasetError,
    FaceDataset,
    candidate_roots,
    check_opts,
    decode_all,
    find_child,
    list_images,
    missing,
    normalise_split,
    screen_images,
)

log = logging.getLogger("trainers.data")

SPLITS = ("train", "publictest", "privatetest")
ALIASES = {"training": "train", "val": "publictest", "valid": "publictest", "validation": "publictest",
           "test": "privatetest"}
USAGE = {b"training": 0, b"publictest": 1, b"privatetest": 2}
USAGE_NAMES = ("Training", "PublicTest", "PrivateTest")
SIDE = 48
NPIX = SIDE * SIDE
SOURCE = (
    "FER2013 comes from Kaggle: the 'Challenges in Representation Learning: Facial Expression Recognition "
    "Challenge' data page (fer2013.csv, or fer2013.tar.gz containing it), or a re-upload with train/ and "
    "test/ image folders (kaggle.com/datasets/msambare/fer2013)."
)
SUBDIRS = ("fer2013", "FER2013", "fer-2013")
CSV_NAMES = ("fer2013.csv", "fer2013.csv.gz")


# ------------------------------------------------------------------------------------------- locate


def find_csv(data_dir: Path) -> Path | None:
    """The fer2013 csv under ``data_dir`` (or its ``fer2013/`` sub-folder), or None."""
    for root in candidate_roots(data_dir, SUBDIRS):
        for name in CSV_NAMES:
            p = find_child(root, name)
            if p is not None and p.is_file():
                return p
    return None


def find_folders(data_dir: Path) -> Path | None:
    """The folder holding Kaggle's ``train/`` (and ``test/``) emotion folders, or None."""
    for root in candidate_roots(data_dir, SUBDIRS):
        train = find_child(root, "train")
        if train is not None and train.is_dir() and any(
            find_child(train, c) is not None for c in ("happy", "angry", "neutral")
        ):
            return root
    return None


def looked_in(data_dir: Path) -> list[Path]:
    return candidate_roots(data_dir, SUBDIRS)


# -------------------------------------------------------------------------------------- parse csv


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix.lower() == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError) as e:
        raise DatasetError(f"cannot read {path}: {e}") from e


def parse_csv(path: Path) -> dict[str, np.ndarray]:
    """Parse a fer2013 csv: ``images`` uint8 (N,48,48), ``emotion`` int16 (-1 = no label),
    ``usage`` int8 (0 Training, 1 PublicTest, 2 PrivateTest), ``line`` int32 (1-based line numbers)."""
    data = _read_bytes(path)
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    lines = data.split(b"\n")
    del data
    name = path.name
    if not lines or not lines[0].strip():
        raise DatasetError(f"{path}: empty file; expected a header line 'emotion,pixels,Usage'")
    header = [h.strip().strip(b'"').lower() for h in lines[0].rstrip(b"\r").split(b",")]
    if b"pixels" not in header:
        raise DatasetError(
            f"{name} line 1: expected a header with columns emotion,pixels,Usage, found {lines[0][:80]!r}"
        )
    ncol = len(header)
    lines_header = lines[0].rstrip(b"\r")[:200].decode(errors="replace")
    pi = header.index(b"pixels")
    ei = header.index(b"emotion") if b"emotion" in header else None
    ui = header.index(b"usage") if b"usage" in header else None

    pixel_rows: list[bytes] = []
    emotion: list[int] = []
    usage: list[int] = []
    line_no: list[int] = []
    for n, raw in enumerate(lines[1:], start=2):
        line = raw.rstrip(b"\r")
        if not line.strip():
            continue
        fields = line.split(b",")
        if len(fields) != ncol:
            raise DatasetError(
                f"{name} line {n}: expected {ncol} comma-separated fields "
                f"({','.join(h.decode() for h in header)}), found {len(fields)}"
            )
        pix = fields[pi].strip().strip(b'"').strip()
        if pix.count(b" ") != NPIX - 1:
            found = len(pix.split())
            if found != NPIX:
                raise DatasetError(f"{name} line {n}: expected {NPIX} pixel values, found {found}")
            pix = b" ".join(pix.split())  # irregular spacing
        pixel_rows.append(pix)
        if ei is not None:
            e = fields[ei].strip().strip(b'"')
            try:
                ev = int(e)
            except ValueError:
                ev = -99
            if not 0 <= ev <= 6:
                raise DatasetError(
                    f"{name} line {n}: expected emotion 0..6, found {e.decode(errors='replace')!r}"
                )
            emotion.append(ev)
        else:
            emotion.append(-1)
        if ui is not None:
            u = fields[ui].strip().strip(b'"')
            code = USAGE.get(u.lower())
            if code is None:
                raise DatasetError(
                    f"{name} line {n}: expected Usage Training, PublicTest or PrivateTest, "
                    f"found {u.decode(errors='replace')!r}"
                )
            usage.append(code)
        else:
            usage.append(0)
        line_no.append(n)
    del lines
    if not pixel_rows:
        raise DatasetError(f"{path}: no data rows after the header")

    images = np.empty((len(pixel_rows), SIDE, SIDE), np.uint8)
    chunk = 2048
    for s in range(0, len(pixel_rows), chunk):
        rows = pixel_rows[s : s + chunk]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                vals = np.fromstring(b" ".join(rows), dtype=np.int32, sep=" ")
        except ValueError:  # numpy >= 2.x raises on unparsable text instead of stopping early
            vals = np.empty(0, np.int32)
        if vals.size != len(rows) * NPIX or vals.min(initial=0) < 0 or vals.max(initial=0) > 255:
            _raise_bad_row(name, rows, line_no[s : s + chunk])
        images[s : s + len(rows)] = vals.reshape(-1, SIDE, SIDE)
    return {
        "images": images,
        "emotion": np.asarray(emotion, np.int16),
        "usage": np.asarray(usage, np.int8),
        "line": np.asarray(line_no, np.int32),
        "has_emotion": np.asarray(ei is not None),
        "header": np.asarray(lines_header),
    }


def _raise_bad_row(name: str, rows: list[bytes], line_no: list[int]) -> None:
    """Find the first bad row of a chunk and raise with its line number."""
    for pix, n in zip(rows, line_no):
        tokens = pix.split()
        for t in tokens:
            try:
                v = int(t)
            except ValueError:
                raise DatasetError(
                    f"{name} line {n}: expected pixel values as integers 0..255, found {t.decode(errors='replace')!r}"
                ) from None
            if not 0 <= v <= 255:
                raise DatasetError(f"{name} line {n}: expected pixel values 0..255, found {v}")
    raise DatasetError(f"{name}: pixel values could not be parsed (lines {line_no[0]}..{line_no[-1]})")


def load_csv(path: Path, cache_dir: str | Path | None = None) -> dict[str, np.ndarray]:
    """Parsed csv arrays, from the cache when the file is unchanged (else parsed and cached)."""
    key = cache.cache_key("fer2013csv", [path])
    arrays = cache.load(key, cache_dir)
    if arrays is not None and {"images", "emotion", "usage", "line", "has_emotion"} <= set(arrays):
        log.debug("fer2013: loaded %s from cache %s", path, cache.cache_path(key, cache_dir))
        return arrays
    t0 = time.perf_counter()
    log.info("fer2013: parsing %s once (cached afterwards)...", path)
    arrays = parse_csv(path)
    arrays.update(_duplicate_stats(arrays))
    log.info("fer2013: parsed %d rows in %.1f s", len(arrays["images"]), time.perf_counter() - t0)
    cache.save(key, arrays, cache_dir)
    return arrays


def _duplicate_stats(a: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Groups of bit-identical images: how many, how many span splits, how many disagree on labels."""
    flat = np.ascontiguousarray(a["images"].reshape(len(a["images"]), -1))
    _, inv, counts = np.unique(flat.view(np.dtype((np.void, NPIX))).ravel(), return_inverse=True,
                               return_counts=True)
    inv = inv.ravel()
    dup = counts[inv] > 1
    groups = int((counts > 1).sum())
    cross = conflict = 0
    if groups:
        g = inv[dup]
        order = np.argsort(g, kind="stable")
        g, us, em = g[order], a["usage"][dup][order], a["emotion"][dup][order]
        starts = np.r_[0, np.flatnonzero(np.diff(g)) + 1]
        cross = int((np.maximum.reduceat(us, starts) != np.minimum.reduceat(us, starts)).sum())
        conflict = int((np.maximum.reduceat(em, starts) != np.minimum.reduceat(em, starts)).sum())
    return {"dup_stats": np.asarray([groups, int(dup.sum()), cross, conflict], np.int64)}


def blank_mask(images: np.ndarray) -> np.ndarray:
    """True for images whose pixels are all equal."""
    flat = images.reshape(len(images), -1)
    return flat.min(axis=1) == flat.max(axis=1)


# ------------------------------------------------------------------------------------------ reader


def read_fer2013(data_dir: Path, split: str, **opts: Any) -> FaceDataset:
    check_opts("fer2013", opts, COMMON_OPTS)
    split = normalise_split("fer2013", split, SPLITS, ALIASES)
    csv_path = find_csv(data_dir)
    if csv_path is not None:
        return _from_csv(csv_path, split, opts.get("cache_dir"))
    root = find_folders(data_dir)
    if root is not None:
        return _from_folders(root, split, opts.get("cache_dir"))
    raise missing(
        "fer2013", "fer2013.csv, fer2013.csv.gz, or Kaggle's train/<emotion>/ and test/<emotion>/ folders",
        data_dir, looked_in(data_dir), SOURCE,
    )


def _from_csv(path: Path, split: str, cache_dir: Any) -> FaceDataset:
    a = load_csv(path, cache_dir)
    code = SPLITS.index(split)
    sel = a["usage"] == code
    present = {USAGE_NAMES[c]: int((a["usage"] == c).sum()) for c in range(3)}
    if not sel.any():
        have = ", ".join(f"{k} ({v})" for k, v in present.items() if v) or "none"
        extra = (" (the PrivateTest rows are kept back in this copy: select models on publictest)"
                 if split == "privatetest" else "")
        raise DatasetError(
            f"fer2013: {path} has no {USAGE_NAMES[code]} rows{extra}; its Usage column holds: {have}"
        )
    images = a["images"][sel]
    blank = np.flatnonzero(blank_mask(images))
    info: dict[str, Any] = {"source": str(path), "rows_by_usage": present, "blank": blank.tolist()}
    if "has_emotion" in a and not bool(a["has_emotion"]):
        info["unlabelled"] = (f"{path} line 1: expected a header with columns emotion,pixels,Usage, found "
                              f"{str(a['header'])!r} (no emotion column: its rows have no labels)")
    msg = f"fer2013/{split}: {int(sel.sum())} faces from {path.name}; {len(blank)} blank images (all pixels equal)"
    if "dup_stats" in a:
        groups, items, cross, conflict = (int(v) for v in a["dup_stats"])
        info["duplicates"] = {"groups": groups, "images": items, "groups_across_splits": cross,
                              "groups_with_conflicting_labels": conflict}
        msg += (f"; whole file: {groups} groups of bit-identical images ({items} images, {cross} groups "
                f"across splits, {conflict} with conflicting labels)")
    log.info(msg)
    return FaceDataset(
        "fer2013", split, LABEL_SETS["fer7"], a["emotion"][sel].astype(np.int64),
        images=images, image_size=SIDE, channels=1, info=info,
    )


# ------------------------------------------------------------------------------------ image folders


def class_folders(split_dir: Path, label_names: tuple[str, ...], dataset: str) -> dict[int, Path]:
    """Map each emotion sub-folder of ``split_dir`` to its label index (names via ``canonical``)."""
    out: dict[int, Path] = {}
    for d in sorted(p for p in split_dir.iterdir() if p.is_dir()):
        name = canonical(d.name)
        if name not in label_names:
            raise DatasetError(
                f"{dataset}: unexpected class folder {d}; expected folders named "
                f"{', '.join(label_names)} (any case)"
            )
        out[label_names.index(name)] = d
    return out


def load_class_tree(split_dir: Path, label_names: tuple[str, ...], dataset: str, size: int, channels: int,
                    cache_dir: Any) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Decode every image of ``split_dir/<class>/`` (cached): images, labels, files."""
    files: list[str] = []
    labels: list[int] = []
    for idx, d in sorted(class_folders(split_dir, label_names, dataset).items()):
        imgs = list_images(d)
        files += [str(p) for p in imgs]
        labels += [idx] * len(imgs)
    if not files:
        raise DatasetError(f"{dataset}: no images (.png/.jpg) in the class folders of {split_dir}")
    keep = screen_images(files, f"{dataset} {split_dir}")
    if not keep.all():
        files = [f for f, k in zip(files, keep) if k]
        labels = [lab for lab, k in zip(labels, keep) if k]
    key = cache.cache_key(f"{dataset}-tree", files, size=size, channels=channels)
    hit = cache.load(key, cache_dir)
    if hit is not None and len(hit.get("images", ())) == len(files):
        return hit["images"], np.asarray(labels, np.int64), files
    images = decode_all(files, None, size, channels, desc=f"{dataset} {split_dir.name}")
    cache.save(key, {"images": images}, cache_dir)
    return images, np.asarray(labels, np.int64), files


def _from_folders(root: Path, split: str, cache_dir: Any) -> FaceDataset:
    if split == "privatetest":
        raise DatasetError(
            f"fer2013: the Kaggle image folders in {root} have no separate PrivateTest split (test/ is read "
            f"as publictest); use the fer2013.csv file for PrivateTest"
        )
    folder = find_child(root, "train" if split == "train" else "test")
    if folder is None or not folder.is_dir():
        raise DatasetError(f"fer2013: expected the folder {root / ('train' if split == 'train' else 'test')} "
                           f"with one sub-folder per emotion. {SOURCE}")
    names = LABEL_SETS["fer7"]
    images, labels, files = load_class_tree(folder, names, "fer2013", SIDE, 1, cache_dir)
    blank = np.flatnonzero(blank_mask(images))
    info = {"source": str(folder), "blank": blank.tolist(), "layout": "kaggle-folders"}
    log.info("fer2013/%s: %d faces from %s; %d blank images", split, len(labels), folder, len(blank))
    if split == "publictest":
        note = ("Kaggle's test/ folder is read as publictest" +
                ("; it holds 7178 images = PublicTest + PrivateTest together" if len(labels) == 7178 else ""))
        info["note"] = note
        log.info("fer2013: %s", note)
    return FaceDataset("fer2013", split, names, labels, images=images, files=files, image_size=SIDE,
                       channels=1, info=info)
