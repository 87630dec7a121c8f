"""Face crop, alignment, resize and normalisation: the one preprocessing path of training and inference.

Inference: ``crop_faces(frame, faces, spec)`` cuts an eye-line-aligned square around each detected face
(uint8, the checkpoint's size and channels); ``to_model_input(crops, spec)`` turns uint8 faces into the
normalised float32 ``(N, C, H, W)`` batch the model takes. Training feeds its (already cropped) dataset
faces through the same ``to_model_input``, on numpy arrays or torch tensors (CPU or GPU), so the model
sees identical arithmetic in both places; a model trained on smaller faces than its input (FER2013's 48 px
upsampled to 96) records that in ``InputSpec.source_size`` and inference crops at that size first.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Sequence

import cv2
import numpy as np

import torch
import torch.nn.functional as F

from .errors import InvalidValue


@dataclass(frozen=True)
class InputSpec:
    """What a model expects, stored in every checkpoint.

    - ``size``: side of the square input in pixels.
    - ``channels``: 1 (grey) or 3 (RGB).
    - ``mean``/``std``: per channel, applied to pixel/255.
    - ``crop_margin``: the crop side is ``(1 + crop_margin) * max(box w, box h)`` of the detector box.
    - ``crop_offset_y``: shift of the crop centre, as a fraction of the box side (positive = down).
    - ``align``: rotate so that the eye line is horizontal.
    - ``source_size``: the side the training faces had before they were resized to ``size`` (FER2013's 48
      for a 96 px model), or None when they were ``size`` already. Inference then crops at ``source_size``
      (the area path of :func:`crop_faces`) and resizes to ``size`` exactly as training did
      (:func:`to_model_input`), so the model never sees detail its training data did not have.
    """

    size: int = 48
    channels: int = 1
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)
    crop_margin: float = 0.25
    crop_offset_y: float = 0.0
    align: bool = True
    source_size: int | None = None

    def __post_init__(self) -> None:
        # every field checked here, once, for the constructor and from_dict alike: a spec read from an untrusted
        # checkpoint with NaN, a negative std, a zero size or a string for a number fails with one sentence
        size = _int_field(self.size, "size", SIZE_RANGE)
        if self.channels not in (1, 3) or isinstance(self.channels, (bool, np.bool_, str)):
            raise InvalidValue(f"InputSpec.channels must be 1 (grey) or 3 (RGB), got {_shown(self.channels)}")
        channels = int(self.channels)
        set_ = object.__setattr__
        set_(self, "size", size)
        set_(self, "channels", channels)
        mean = _per_channel(self.mean, channels, "mean")
        std = _per_channel(self.std, channels, "std")
        if any(not s > 0 for s in std):
            raise InvalidValue(f"InputSpec.std must be positive finite numbers, got {list(std)}")
        set_(self, "mean", mean)
        set_(self, "std", std)
        margin = _float_field(self.crop_margin, "crop_margin")
        if not CROP_MARGIN_RANGE[0] < margin <= CROP_MARGIN_RANGE[1]:
            raise InvalidValue(f"InputSpec.crop_margin must be > {CROP_MARGIN_RANGE[0]:g} and <= "
                               f"{CROP_MARGIN_RANGE[1]:g} (a fraction of the face box), got {self.crop_margin!r}")
        offset = _float_field(self.crop_offset_y, "crop_offset_y")
        if not CROP_OFFSET_RANGE[0] <= offset <= CROP_OFFSET_RANGE[1]:
            raise InvalidValue(f"InputSpec.crop_offset_y must be in [{CROP_OFFSET_RANGE[0]:g}, {CROP_OFFSET_RANGE[1]:g}] "
                               f"(a fraction of the face box), got {self.crop_offset_y!r}")
        set_(self, "crop_margin", margin)
        set_(self, "crop_offset_y", offset)
        if not isinstance(self.align, (bool, np.bool_)):
            raise InvalidValue(f"InputSpec.align must be true or false, got {_shown(self.align)}")
        set_(self, "align", bool(self.align))
        if self.source_size is not None:
            source = _int_field(self.source_size, "source_size", SIZE_RANGE)
            set_(self, "source_size", None if source == size else source)

    @property
    def crop_size(self) -> int:
        """The side :func:`crop_faces` cuts at: ``source_size`` when set, else ``size``."""
        return int(self.source_size or self.size)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        if d["source_size"] is None:  # files stay readable by versions without the field
            del d["source_size"]
        return d

    @classmethod
    def from_dict(cls, d: Any) -> "InputSpec":
        """The spec from its :meth:`to_dict` form (a checkpoint's ``input`` object); raises
        :class:`~ferengine.errors.InvalidValue` (a ``ValueError``) naming the field and what it must be."""
        if not isinstance(d, dict):
            raise InvalidValue(f"the input spec must be an object of fields ({', '.join(f.name for f in fields(cls))}), "
                               f"got {_shown(d)}")
        known = {f.name for f in fields(cls)}
        unknown = set(map(str, d)) - known
        if unknown:
            raise InvalidValue(f"unknown input-spec fields {sorted(unknown)}; expected some of {sorted(known)}")
        return cls(**d)


SIZE_RANGE = (8, 1024)
CROP_MARGIN_RANGE = (-0.9, 10.0)  # (open, closed]
CROP_OFFSET_RANGE = (-2.0, 2.0)


def _shown(v: Any) -> str:
    """``v`` for a message: its repr (cut at 40 characters) and its type."""
    text = repr(v)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{text} ({type(v).__name__})"


def _int_field(v: Any, name: str, bounds: tuple[int, int]) -> int:
    lo, hi = bounds
    ok = isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))
    if not ok and isinstance(v, (float, np.floating)) and math.isfinite(v) and float(v).is_integer():
        ok = True
    if not ok:
        raise InvalidValue(f"InputSpec.{name} must be an integer from {lo} to {hi}, got {_shown(v)}")
    x = int(v)
    if not lo <= x <= hi:
        raise InvalidValue(f"InputSpec.{name} must be an integer from {lo} to {hi}, got {x}")
    return x


def _float_field(v: Any, name: str) -> float:
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise InvalidValue(f"InputSpec.{name} must be a number, got {_shown(v)}")
    x = float(v)
    if not math.isfinite(x):
        raise InvalidValue(f"InputSpec.{name} must be a finite number, got {x}")
    return x


def _count(n: int) -> str:
    return "1 number" if n == 1 else f"{n} numbers"


def _per_channel(v: Any, channels: int, name: str) -> tuple[float, ...]:
    if isinstance(v, (list, tuple, np.ndarray)):
        items = list(v)
    else:
        items = [v]
    if not all(isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))
               for x in items):
        raise InvalidValue(f"InputSpec.{name} must be a number or a list of {_count(channels)}, got {_shown(v)}")
    vals = tuple(float(x) for x in items)
    if len(vals) == 1:
        vals = vals * channels
    if len(vals) != channels:
        raise InvalidValue(f"InputSpec.{name} needs {'1 value' if channels == 1 else f'1 or {channels} values'} "
                           f"for {channels} channel(s), got {len(vals)}")
    if not all(math.isfinite(x) for x in vals):
        raise InvalidValue(f"InputSpec.{name} must be finite numbers, got {list(vals)}")
    return vals


# --------------------------------------------------------------------------------------------- crop


def eye_angle(keypoints: np.ndarray | None) -> float:
    """Angle (radians) of the line from the image-left eye to the image-right eye.

    ``keypoints`` are BlazeFace's 6 points in pixels; the first two are the eyes.
    """
    if keypoints is None or len(keypoints) < 2:
        return 0.0
    (x0, y0), (x1, y1) = keypoints[0], keypoints[1]
    if x0 > x1:  # order the pair left-to-right in the image
        x0, y0, x1, y1 = x1, y1, x0, y0
    return math.atan2(y1 - y0, x1 - x0)


def crop_transform(
    box: Sequence[float], keypoints: np.ndarray | None, spec: InputSpec
) -> np.ndarray:
    """2x3 affine matrix mapping frame pixels to the ``spec.crop_size`` square crop of one face."""
    x, y, w, h = (float(v) for v in box)
    side = max(w, h) * (1.0 + spec.crop_margin)
    cx = x + w / 2.0
    cy = y + h / 2.0 + spec.crop_offset_y * max(w, h)
    angle = eye_angle(keypoints) if spec.align else 0.0
    size = spec.crop_size
    s = size / max(side, 1e-6)
    c, si = math.cos(angle) * s, math.sin(angle) * s
    # rotate by -angle about the centre, scale, then move the centre to the middle of the crop
    return np.array(
        [[c, si, size / 2.0 - (c * cx + si * cy)], [-si, c, size / 2.0 - (-si * cx + c * cy)]],
        dtype=np.float64,
    )


def crop_faces(
    frame_bgr: np.ndarray,
    boxes: Sequence[Sequence[float]],
    keypoints: Sequence[np.ndarray | None] | None,
    spec: InputSpec,
) -> np.ndarray:
    """Cut one aligned square per face: uint8 ``(N, S, S)`` (grey) or ``(N, S, S, 3)`` (RGB) with
    ``S = spec.crop_size`` (the training faces' resolution; :func:`to_model_input` brings it to ``spec.size``).

    ``frame_bgr`` is an OpenCV BGR (or single-channel grey) image; ``boxes`` are ``(x, y, w, h)`` pixels.
    """
    if frame_bgr.ndim == 2:
        src = frame_bgr if spec.channels == 1 else cv2.cvtColor(frame_bgr, cv2.COLOR_GRAY2RGB)
    elif spec.channels == 1:
        src = cv2.cvtColor(frame_bgr, cv2.COLOR_BGR2GRAY)
    else:
        src = cv2.cvtColor(frame_bgr, cv2.COLOR_BGR2RGB)
    n = len(boxes)
    size = spec.crop_size
    shape = (n, size, size) if spec.channels == 1 else (n, size, size, 3)
    out = np.empty(shape, dtype=np.uint8)
    kps = keypoints if keypoints is not None else [None] * n
    for i, (box, kp) in enumerate(zip(boxes, kps)):
        m = crop_transform(box, kp, spec)
        # Shrinking a 300 px face straight to 48 px with bilinear sampling aliases (speckled hair and
        # skin, broken glasses frames) where the dataset faces are smooth. So sample at k x the output
        # size (k = the integer part of the shrink factor, at most 4) and area-average k x k blocks down.
        k = int(min(4, max(1, math.floor(1.0 / max(math.hypot(m[0, 0], m[0, 1]), 1e-6)))))
        if k == 1:
            out[i] = cv2.warpAffine(src, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        else:
            mk = m * k
            mk[:, 2] += (k - 1) / 2.0  # pixel centres: big u = k * small x + (k - 1) / 2
            big = cv2.warpAffine(src, mk, (size * k, size * k), flags=cv2.INTER_LINEAR,
                                 borderMode=cv2.BORDER_REPLICATE)
            out[i] = cv2.resize(big, (size, size), interpolation=cv2.INTER_AREA)
    return out


# ------------------------------------------------------------------------------------ normalise


def to_model_input(images: Any, spec: InputSpec):
    """uint8 faces -> normalised float32 ``(N, C, size, size)``: ONE arithmetic for training and inference.

    ``images``: numpy array or torch tensor, ``(N, H, W)`` grey, ``(N, H, W, 3)`` RGB (numpy layout) or
    ``(N, C, H, W)`` (torch layout, C in {1, 3}); torch tensors may also be float in [0, 1] (augmented
    batches). Faces of another size are resized in float32 with bilinear interpolation (antialiased when
    shrinking, ``torch.nn.functional.interpolate``); grey faces are repeated to RGB, RGB faces are converted
    to grey (ITU-R 601 luma) as the spec demands; then ``(x/255 - mean) / std``. Numpy input runs the very
    same torch operations on the CPU (no copy), so the app, ``fer eval`` and the training batches agree to
    the last bit. Returns the same kind (numpy/torch, device) as given.
    """
    if isinstance(images, torch.Tensor):
        return _to_input_torch(images, spec)
    a = _faces_array(images)
    if a.ndim == 4:
        a = a.transpose(0, 3, 1, 2)  # NHWC -> NCHW view
    with torch.inference_mode():
        return _to_input_torch(torch.from_numpy(np.ascontiguousarray(a)), spec).numpy()


def _faces_array(images: Any) -> np.ndarray:
    """Numpy faces as ``(N, H, W)`` or ``(N, H, W, C)`` (one ``(H, W)`` face becomes a batch of one)."""
    a = np.asarray(images)
    if a.ndim == 2:
        a = a[None]
    if a.ndim not in (3, 4) or (a.ndim == 4 and a.shape[-1] not in (1, 3)):
        raise ValueError(f"expected faces as (N,H,W) or (N,H,W,3) uint8, got shape {a.shape}")
    return a


_LUMA = (0.299, 0.587, 0.114)


def _to_input_torch(t: "torch.Tensor", spec: InputSpec) -> "torch.Tensor":
    if t.ndim == 3:
        t = t.unsqueeze(1)  # N,1,H,W
    elif t.ndim == 4 and t.shape[1] not in (1, 3) and t.shape[-1] in (1, 3):
        t = t.permute(0, 3, 1, 2)  # NHWC -> NCHW
    if t.ndim != 4 or t.shape[1] not in (1, 3):
        raise ValueError(f"expected faces as (N,H,W), (N,H,W,C) or (N,C,H,W), got shape {tuple(t.shape)}")
    x = t.float() * (1.0 / 255.0) if t.dtype == torch.uint8 else t.float()
    if x.shape[-2:] != (spec.size, spec.size):
        x = F.interpolate(x, size=(spec.size, spec.size), mode="bilinear", align_corners=False,
                          antialias=x.shape[-1] > spec.size)
    c = x.shape[1]
    if c == 3 and spec.channels == 1:
        x = (x * torch.tensor(_LUMA, device=x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
    elif c == 1 and spec.channels == 3:
        x = x.expand(-1, 3, -1, -1)
    mean = torch.tensor(spec.mean, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, device=x.device).view(1, -1, 1, 1)
    return ((x - mean) / std).contiguous()


def to_device_input(images: Any, spec: InputSpec, device: Any = "cpu", *, non_blocking: bool = True) -> "torch.Tensor":
    """uint8 faces -> the normalised float32 ``(N, C, size, size)`` batch as a torch tensor ON ``device``.

    The same input as :func:`to_model_input` (numpy or torch; ``(N, H, W)``, ``(N, H, W, 3)`` or
    ``(N, C, H, W)``; uint8, or float in [0, 1] for tensors) and the very same torch arithmetic
    (resize, grey/RGB conversion, ``(x/255 - mean) / std``), but run where the model runs: the faces
    are uploaded as uint8 (a quarter of the bytes of the float batch) and converted on the device, so a
    GPU backend's :meth:`~ferengine.backends.torch_backend.TorchBackend.run_tensor` can take the result
    without a host round trip. Numpy NHWC faces are made NCHW-contiguous before the float conversion,
    exactly as :func:`to_model_input` does, so on the CPU the two agree to the last bit; on a CUDA
    device the resize kernels (bilinear, antialiased when shrinking) and the grey conversion's 3-term
    sum may round differently in the last bits (a few 1e-7 relative; not yet measured on a GPU, and
    tests/test_torch_gpu_path.py allows 1e-4, far below one grey level, 1/255/std).
    ``non_blocking``: the host-to-device copy may overlap (it only does for pinned host memory).
    """
    dev = torch.device(device)
    if isinstance(images, torch.Tensor):
        t = images
    else:
        t = torch.from_numpy(np.ascontiguousarray(_faces_array(images)))
        if t.ndim == 4:
            t = t.permute(0, 3, 1, 2)  # NHWC -> NCHW view, made contiguous on the device below
    t = t.to(dev, non_blocking=non_blocking)
    if t.ndim == 4 and t.shape[1] in (1, 3) and not t.is_contiguous():
        t = t.contiguous()  # the layout to_model_input's numpy path converts from
    return _to_input_torch(t, spec)
