"""The dataset object every reader returns, its error type, and the helpers readers share.

``FaceDataset`` holds either the decoded faces in memory (``images``: uint8 ``(N,H,W)`` grey or
``(N,H,W,3)`` RGB) or, for on-disk datasets, one image path per item (plus an optional crop box) that
``__getitem__`` decodes lazily to a square ``image_size`` face with ``channels`` channels. Lazy decoding
uses only OpenCV and numpy, so a ``DataLoader`` with worker processes can feed it.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

log = logging.getLogger("trainers.data")

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class DatasetError(ValueError):
    """A dataset is missing, malformed or asked for something it does not have.

    The message names the file (and the 1-based line for text files), what was expected, and for a
    missing dataset where it comes from.
    """


# ----------------------------------------------------------------------------------------- dataset


class FaceDataset(Dataset):
    """Faces with categorical labels and/or valence-arousal targets.

    Attributes (the contract the training engine relies on):

    - ``name``, ``split``: dataset registry name and canonical split name.
    - ``label_names``: canonical class names in label-index order (``ferengine.labels``).
    - ``images``: uint8 tensor ``(N,H,W)`` or ``(N,H,W,3)`` in memory, or ``None`` for on-disk sets.
    - ``labels``: int64 ``(N,)``, -1 where the item has no class label.
    - ``soft_labels``: float32 ``(N,K)`` vote distributions, or ``None``.
    - ``va``: float32 ``(N,2)`` valence, arousal in [-1, 1] (NaN where missing), or ``None``.
    - ``files``: source image path per item (on-disk sets; also kept for in-memory sets read from files).
    - ``boxes``: float32 ``(N,4)`` crop box ``x, y, w, h`` in source pixels (NaN row = whole image).
    - ``image_size``, ``channels``: what lazy decoding produces.
    - ``info``: reader notes (source file, quirks found, split rule), for logs and model cards.
    - ``meta``: extra per-item numpy arrays (e.g. ``fer2013_row``, ``clip``/``frame``, ``video``), kept
      aligned by ``subset``.
    """

    def __init__(
        self,
        name: str,
        split: str,
        label_names: Sequence[str],
        labels: torch.Tensor | np.ndarray | Sequence[int],
        *,
        images: torch.Tensor | np.ndarray | None = None,
        soft_labels: torch.Tensor | np.ndarray | None = None,
        va: torch.Tensor | np.ndarray | None = None,
        files: Sequence[str] | np.ndarray | None = None,
        boxes: np.ndarray | None = None,
        image_size: int = 112,
        channels: int = 3,
        box_fits: str = "always",
        info: dict[str, Any] | None = None,
        meta: dict[str, np.ndarray] | None = None,
    ) -> None:
        self.name = name
        self.split = split
        self.label_names = tuple(label_names)
        self.labels = _as_tensor(labels, torch.int64)
        n = len(self.labels)
        self.images = None if images is None else _as_tensor(images, torch.uint8)
        self.soft_labels = None if soft_labels is None else _as_tensor(soft_labels, torch.float32)
        self.va = None if va is None else _as_tensor(va, torch.float32)
        self.files = None if files is None else np.asarray(files, dtype=str)
        self.boxes = None if boxes is None else np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        self.image_size = int(image_size)
        self.channels = int(channels)
        self.box_fits = box_fits
        self.info = dict(info or {})
        self.meta = {k: np.asarray(v) for k, v in (meta or {}).items()}
        if self.images is None and self.files is None:
            raise ValueError("FaceDataset needs images in memory or one file per item")
        for attr in ("images", "soft_labels", "va", "files", "boxes"):
            v = getattr(self, attr)
            if v is not None and len(v) != n:
                raise ValueError(f"FaceDataset.{attr} has {len(v)} rows for {n} labels")
        for k, v in self.meta.items():
            if len(v) != n:
                raise ValueError(f"FaceDataset.meta[{k!r}] has {len(v)} rows for {n} labels")

    # -- torch Dataset
    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = int(i)
        if i < 0:
            i += len(self)
        if self.images is not None:
            image = self.images[i]
        else:
            box = None if self.boxes is None else self.boxes[i]
            image = torch.from_numpy(
                load_face(self.files[i], box, self.image_size, self.channels, self.box_fits)
            )
        item: dict[str, Any] = {"image": image, "label": int(self.labels[i]), "index": i}
        if self.soft_labels is not None:
            item["soft"] = self.soft_labels[i]
        if self.va is not None:
            item["va"] = self.va[i]
        return item

    # -- helpers
    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    @property
    def in_memory(self) -> bool:
        return self.images is not None

    def subset(self, indices: Iterable[int] | np.ndarray | torch.Tensor) -> "FaceDataset":
        """A new dataset holding the given items (in the given order); arrays are copied, not shared."""
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64).reshape(-1))
        np_idx = idx.numpy()
        return FaceDataset(
            self.name,
            self.split,
            self.label_names,
            self.labels[idx],
            images=None if self.images is None else self.images[idx],
            soft_labels=None if self.soft_labels is None else self.soft_labels[idx],
            va=None if self.va is None else self.va[idx],
            files=None if self.files is None else self.files[np_idx],
            boxes=None if self.boxes is None else self.boxes[np_idx],
            image_size=self.image_size,
            channels=self.channels,
            box_fits=self.box_fits,
            info={**self.info, "subset_of": len(self)},
            meta={k: v[np_idx] for k, v in self.meta.items()},
        )

    def class_counts(self) -> np.ndarray:
        """Items per class (labels of -1 are not counted)."""
        lab = self.labels.numpy()
        return np.bincount(lab[lab >= 0], minlength=self.num_classes)

    def __repr__(self) -> str:
        kind = "in memory" if self.in_memory else f"on disk -> {self.image_size}px x{self.channels}"
        return f"FaceDataset({self.name}/{self.split}: {len(self)} faces, {self.num_classes} classes, {kind})"


def _as_tensor(x: Any, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.to(dtype)
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x)).astype(_NP_DTYPES[dtype], copy=False))


_NP_DTYPES = {torch.int64: np.int64, torch.uint8: np.uint8, torch.float32: np.float32}


# ------------------------------------------------------------------------------------------ images


def image_problem(path: str | Path) -> str | None:
    """Why a file is not a whole image, or None: empty, or a JPEG without its end-of-image marker / a PNG
    without its IEND chunk (a truncated download or copy: OpenCV would decode the part that is there, grey
    below it, with only a libjpeg warning)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 4096))
            tail = fh.read()
    except FileNotFoundError:
        return "not found"
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    return _bytes_problem(head, tail, size)


def _bytes_problem(head: bytes, tail: bytes, size: int) -> str | None:
    if size == 0:
        return "empty (0 bytes)"
    if head.startswith(b"\xff\xd8"):
        if not tail.rstrip(b"\x00\r\n\t ").endswith(b"\xff\xd9"):
            return "truncated JPEG (no end-of-image marker)"
    elif head.startswith(b"\x89PNG\r\n\x1a\n"):
        if b"IEND" not in tail[-64:]:
            return "truncated PNG (no IEND chunk)"
    return None


def read_image(path: str | Path, channels: int) -> np.ndarray:
    """Decode an image file: uint8 ``(H,W)`` grey or ``(H,W,3)`` RGB. Raises DatasetError if unreadable or
    truncated (:func:`image_problem`)."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise DatasetError(f"image file not found: {path}") from None
    except OSError as exc:
        raise DatasetError(f"cannot read image file {path}: {exc.strerror or exc}") from None
    why = _bytes_problem(data[:8], data[-4096:], len(data))
    if why:
        raise DatasetError(f"image file {path} is {why}; re-download or remove it")
    flag = cv2.IMREAD_GRAYSCALE if channels == 1 else cv2.IMREAD_COLOR
    img = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
    if img is None:
        raise DatasetError(f"cannot decode image file {path} (not a readable image)")
    if channels == 3:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    return img


def screen_images(files: Sequence[str], what: str) -> np.ndarray:
    """Which files are whole images (:func:`image_problem`): a mask. The others are reported in ONE warning
    (how many, the first few and why); none left is a :class:`DatasetError`."""
    problems = [(i, image_problem(f)) for i, f in enumerate(files)]
    bad = [(i, why) for i, why in problems if why]
    keep = np.ones(len(files), bool)
    if not bad:
        return keep
    keep[[i for i, _ in bad]] = False
    shown = "; ".join(f"{files[i]} ({why})" for i, why in bad[:3]) + ("; ..." if len(bad) > 3 else "")
    if not keep.any():
        raise DatasetError(f"{what}: none of its {len(files)} images is whole: {shown}; re-download the dataset")
    log.warning("%s: skipping %d of %d images that are truncated or corrupt: %s (re-download or remove them)",
                what, len(bad), len(files), shown)
    return keep


def crop_square(img: np.ndarray, box: Sequence[float] | None, box_fits: str = "always") -> np.ndarray:
    """Cut the square around ``box`` (``x, y, w, h``; side = max(w, h), same centre).

    Parts outside the image are filled by replicating the border. ``box_fits="inside"`` skips the crop
    when the box does not lie within the image (the image is then taken to be a face crop already, as
    in re-distributed pre-cropped copies whose csv boxes still refer to the original pictures).
    """
    if box is None or not np.all(np.isfinite(box)):
        return img
    h, w = img.shape[:2]
    x, y, bw, bh = (float(v) for v in box)
    if bw <= 0 or bh <= 0:
        return img
    if box_fits == "inside" and (x + bw > w * 1.05 + 2 or y + bh > h * 1.05 + 2):
        return img
    side = max(bw, bh)
    cx, cy = x + bw / 2.0, y + bh / 2.0
    x0, y0 = int(round(cx - side / 2.0)), int(round(cy - side / 2.0))
    s = max(1, int(round(side)))
    x1, y1 = x0 + s, y0 + s
    pad_l, pad_t = max(0, -x0), max(0, -y0)
    pad_r, pad_b = max(0, x1 - w), max(0, y1 - h)
    crop = img[max(0, y0) : min(h, y1), max(0, x0) : min(w, x1)]
    if crop.size == 0:  # box entirely outside the image
        return img
    if pad_l or pad_t or pad_r or pad_b:
        crop = cv2.copyMakeBorder(crop, pad_t, pad_b, pad_l, pad_r, cv2.BORDER_REPLICATE)
    return crop


def resize_square(img: np.ndarray, size: int) -> np.ndarray:
    """Resize to ``size`` x ``size`` (area when shrinking, bilinear when enlarging); non-square is
    centre-padded to square first (replicated border) so faces keep their aspect ratio."""
    h, w = img.shape[:2]
    if h != w:
        d = abs(h - w)
        a, b = d // 2, d - d // 2
        if h > w:
            img = cv2.copyMakeBorder(img, 0, 0, a, b, cv2.BORDER_REPLICATE)
        else:
            img = cv2.copyMakeBorder(img, a, b, 0, 0, cv2.BORDER_REPLICATE)
    if img.shape[0] != size:
        interp = cv2.INTER_AREA if img.shape[0] > size else cv2.INTER_LINEAR
        img = cv2.resize(img, (size, size), interpolation=interp)
    return np.ascontiguousarray(img)


def load_face(
    path: str | Path, box: Sequence[float] | None, size: int, channels: int, box_fits: str = "always"
) -> np.ndarray:
    """Read, crop (optional box) and resize one face to uint8 ``(size,size)`` or ``(size,size,3)``."""
    return resize_square(crop_square(read_image(path, channels), box, box_fits), size)


def square_box(x0: float, y0: float, x1: float, y1: float, margin: float) -> tuple[float, float, float, float]:
    """The square ``x, y, w, h`` around an extent, enlarged by ``margin`` (0.2 = 20 % larger side)."""
    side = max(x1 - x0, y1 - y0) * (1.0 + margin)
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    return (cx - side / 2.0, cy - side / 2.0, side, side)


def decode_all(
    files: Sequence[str], boxes: np.ndarray | None, size: int, channels: int, box_fits: str = "always",
    desc: str = "decoding",
) -> np.ndarray:
    """Decode every file to one uint8 array (for ``in_memory=True``), with a tqdm bar."""
    from tqdm import tqdm

    shape = (len(files), size, size) if channels == 1 else (len(files), size, size, 3)
    out = np.empty(shape, np.uint8)
    for i, f in enumerate(tqdm(files, desc=desc, unit="img", leave=False, disable=len(files) < 2000)):
        out[i] = load_face(f, None if boxes is None else boxes[i], size, channels, box_fits)
    return out


# ------------------------------------------------------------------------------------ locating data


def resolve_data_dir(data_dir: str | Path | None) -> Path:
    """``data_dir``, else ``$FER_DATA_DIR``, else ``./data``."""
    if data_dir is None or str(data_dir) == "":
        data_dir = os.environ.get("FER_DATA_DIR") or "data"
    return Path(data_dir).expanduser()


def find_child(parent: Path, name: str) -> Path | None:
    """``parent/name`` matched case-insensitively (exact match preferred), or None."""
    p = parent / name
    if p.exists():
        return p
    try:
        low = name.lower()
        for entry in parent.iterdir():
            if entry.name.lower() == low:
                return entry
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        pass
    return None


def candidate_roots(data_dir: Path, subdirs: Sequence[str]) -> list[Path]:
    """``data_dir`` itself and its existing sub-folders named in ``subdirs`` (case-insensitive)."""
    out = [data_dir]
    for s in subdirs:
        cur: Path | None = data_dir
        for part in Path(s).parts:
            cur = find_child(cur, part) if cur is not None else None
        if cur is not None and cur.is_dir() and cur not in out:
            out.append(cur)
    return out


def subdirs(folder: Path) -> list[Path]:
    """Sub-folders of ``folder`` sorted by name ([] when it is not a readable folder)."""
    try:
        return sorted(p for p in folder.iterdir() if p.is_dir())
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return []


def list_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder``, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


def missing(dataset: str, expected: str, data_dir: Path, looked: Sequence[Path], source: str) -> DatasetError:
    where = ", ".join(str(p) for p in looked) if looked else str(data_dir)
    if not data_dir.is_dir():
        where += "; that folder does not exist"
    return DatasetError(
        f"{dataset}: expected {expected} under {data_dir} (looked in: {where}). {source} "
        f"Pass --data-dir to the folder that holds it (or set FER_DATA_DIR)."
    )


def split_key(split: str) -> str:
    return re.sub(r"[\s_\-]", "", str(split).strip().lower())


def normalise_split(dataset: str, split: str, splits: Sequence[str], aliases: dict[str, str]) -> str:
    """Canonical split name: case-insensitive, ``_``/``-``/spaces ignored, plus per-dataset aliases."""
    k = split_key(split)
    for s in splits:
        if split_key(s) == k:
            return s
    if k in aliases:
        return aliases[k]
    alias_text = ", ".join(f"{a}={b}" for a, b in aliases.items())
    raise DatasetError(
        f"{dataset}: unknown split {split!r}; expected one of {', '.join(splits)}"
        + (f" (also accepted: {alias_text})" if alias_text else "")
    )


def parse_int(text: str, file: Path | str, line: int, what: str, lo: int | None = None,
              hi: int | None = None) -> int:
    try:
        v = int(str(text).strip())
    except ValueError:
        raise DatasetError(f"{file} line {line}: expected {what} (an integer), found {text!r}") from None
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise DatasetError(f"{file} line {line}: expected {what} in {lo}..{hi}, found {v}")
    return v


def parse_float(text: str, file: Path | str, line: int, what: str) -> float:
    try:
        return float(str(text).strip())
    except ValueError:
        raise DatasetError(f"{file} line {line}: expected {what} (a number), found {text!r}") from None


def opt_bool(v: Any) -> bool:
    if isinstance(v, str):
        return v.strip().lower() in ("1", "true", "yes", "on")
    return bool(v)


def check_opts(dataset: str, opts: dict[str, Any], known: Iterable[str]) -> None:
    """Reject unknown reader options (a typo would otherwise be silently ignored)."""
    known = set(known)
    bad = sorted(set(opts) - known)
    if bad:
        raise DatasetError(f"{dataset}: unknown option(s) {', '.join(bad)}; known: {', '.join(sorted(known))}")


ReaderFn = Callable[..., FaceDataset]


COMMON_OPTS = ("image_size", "channels", "in_memory", "cache_dir")


def disk_dataset(
    name: str,
    split: str,
    label_names: Sequence[str],
    labels: np.ndarray | Sequence[int],
    files: Sequence[str],
    opts: dict[str, Any],
    *,
    boxes: np.ndarray | None = None,
    va: np.ndarray | None = None,
    box_fits: str = "always",
    info: dict[str, Any] | None = None,
    meta: dict[str, np.ndarray] | None = None,
    default_channels: int = 3,
    default_size: int = 112,
) -> FaceDataset:
    """A dataset of image files decoded lazily to ``image_size``/``channels`` (opts), or, with
    ``in_memory=True``, decoded once into ``images`` and cached on disk (keyed by every file's path,
    size and mtime, the boxes and the output size)."""
    import hashlib

    from . import cache

    size = int(opts.get("image_size", default_size))
    channels = int(opts.get("channels", default_channels))
    if channels not in (1, 3):
        raise DatasetError(f"{name}: option channels must be 1 (grey) or 3 (RGB), got {channels}")
    if not 8 <= size <= 1024:
        raise DatasetError(f"{name}: option image_size must be in 8..1024, got {size}")
    keep = screen_images(files, f"{name}/{split}") if len(files) else np.ones(0, bool)
    if not keep.all():
        idx = np.flatnonzero(keep)
        files = [files[i] for i in idx]
        labels = np.asarray(labels)[idx]
        boxes = None if boxes is None else np.asarray(boxes).reshape(-1, 4)[idx]
        va = None if va is None else np.asarray(va)[idx]
        meta = None if meta is None else {k: np.asarray(v)[idx] for k, v in meta.items()}
        info = {**(info or {}), "skipped_corrupt": int((~keep).sum())}
    images = None
    if opt_bool(opts.get("in_memory", False)) and len(files):
        box_hash = "" if boxes is None else hashlib.sha1(np.asarray(boxes, np.float32).tobytes()).hexdigest()
        key = cache.cache_key(f"{name}-{split}-faces", files, size=size, channels=channels, boxes=box_hash,
                              box_fits=box_fits)
        hit = cache.load(key, opts.get("cache_dir"))
        if hit is not None and len(hit.get("images", ())) == len(files):
            images = hit["images"]
        else:
            images = decode_all(files, boxes, size, channels, box_fits, desc=f"{name} {split}")
            cache.save(key, {"images": images}, opts.get("cache_dir"))
    return FaceDataset(name, split, label_names, labels, images=images, va=va, files=files, boxes=boxes,
                       image_size=size, channels=channels, box_fits=box_fits, info=info, meta=meta)
