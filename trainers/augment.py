"""Batched data augmentation on uint8 face tensors, on whatever device the batch lives on.

One call augments a whole batch with tensor ops only (no per-image Python):

1. geometry, as ONE ``F.affine_grid`` + ``F.grid_sample`` per batch: random translation by whole pixels
   (the "random crop with padding" of the usual recipes: shifting by up to ``translate`` px and filling
   the uncovered border is what cropping a padded image does), horizontal flip, rotation and scale;
2. photometry: per-image brightness (multiplicative) and contrast (around the image's mean) jitter;
3. random erasing: one rectangle per image (probability ``erase``), filled with a random grey level.

Every random number comes from a ``torch.Generator`` on the CPU (a few numbers per image), so a seed
gives the same augmentation on CPU and GPU and the generator's state can be saved for exact resume.
The output is float32 ``(N, C, H, W)`` in [0, 1], ready for ``ferengine.preprocess.to_model_input``
(which resizes, converts channels and normalises exactly as at inference).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["AugmentConfig", "BatchAugment", "AUGMENT_PRESETS", "augment_config", "to_nchw_uint8"]


@dataclass(frozen=True)
class AugmentConfig:
    """What :class:`BatchAugment` does; 0 (or an empty range) switches a step off.

    - ``translate``: max shift in pixels of the source image, each axis (e.g. 4 on 48 px = crop 48 from
      56 padded).
    - ``hflip``: probability of a horizontal flip.
    - ``rotate``: max rotation in degrees (uniform in +-rotate).
    - ``scale``: (min, max) zoom factor (>1 zooms in).
    - ``brightness`` / ``contrast``: factor drawn uniformly in [1 - v, 1 + v].
    - ``erase``: probability of erasing one rectangle; ``erase_area`` its area as a fraction of the
      image, ``erase_ratio`` its aspect-ratio range (log-uniform).
    - ``padding``: how uncovered pixels are filled: ``zeros`` (black, as padded crops), ``border`` or
      ``reflection``.
    """

    translate: float = 0.0
    hflip: float = 0.0
    rotate: float = 0.0
    scale: tuple[float, float] = (1.0, 1.0)
    brightness: float = 0.0
    contrast: float = 0.0
    erase: float = 0.0
    erase_area: tuple[float, float] = (0.02, 0.2)
    erase_ratio: tuple[float, float] = (0.3, 3.3)
    padding: str = "zeros"

    def __post_init__(self) -> None:
        if self.padding not in ("zeros", "border", "reflection"):
            raise ValueError(f"augment padding must be zeros, border or reflection, got {self.padding!r}")
        for name in ("hflip", "erase"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"augment {name} is a probability in [0, 1], got {v}")
        for name in ("scale", "erase_area", "erase_ratio"):
            v = tuple(float(x) for x in getattr(self, name))
            if len(v) != 2 or v[0] > v[1] or v[0] <= 0:
                raise ValueError(f"augment {name} must be a (min, max) pair of positive numbers, got {v}")
            object.__setattr__(self, name, v)
        for name in ("translate", "rotate", "brightness", "contrast"):
            if getattr(self, name) < 0:
                raise ValueError(f"augment {name} must be >= 0, got {getattr(self, name)}")

    @property
    def geometric(self) -> bool:
        return bool(self.translate or self.hflip or self.rotate or self.scale != (1.0, 1.0))

    @property
    def active(self) -> bool:
        return bool(self.geometric or self.brightness or self.contrast or self.erase)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["scale"], d["erase_area"], d["erase_ratio"] = (
            list(self.scale), list(self.erase_area), list(self.erase_ratio))
        return d


AUGMENT_PRESETS: dict[str, AugmentConfig] = {
    "none": AugmentConfig(),
    # flip + small shifts: the classic "weak" augmentation
    "weak": AugmentConfig(translate=3, hflip=0.5),
    # the usual FER2013 recipe: crop-with-padding, flip, small rotation/zoom, light colour jitter, erasing
    "standard": AugmentConfig(translate=4, hflip=0.5, rotate=10, scale=(0.9, 1.1), brightness=0.2,
                              contrast=0.2, erase=0.5),
    # heavier geometry and photometry (contrastive methods)
    "strong": AugmentConfig(translate=6, hflip=0.5, rotate=20, scale=(0.8, 1.2), brightness=0.4,
                            contrast=0.4, erase=0.5, erase_area=(0.02, 0.33)),
}


def augment_config(preset: str = "standard", overrides: dict[str, Any] | None = None) -> AugmentConfig:
    """A preset (``none|weak|standard|strong``) with field overrides (e.g. ``{"rotate": 30}``)."""
    try:
        base = AUGMENT_PRESETS[preset]
    except KeyError:
        raise ValueError(f"unknown augmentation preset {preset!r}; known: {', '.join(AUGMENT_PRESETS)}") from None
    if not overrides:
        return base
    known = {f.name for f in fields(AugmentConfig)}
    bad = sorted(set(overrides) - known)
    if bad:
        raise ValueError(f"unknown augmentation option(s) {bad}; known: {sorted(known)}")
    return replace(base, **overrides)


def to_nchw_uint8(images: torch.Tensor) -> torch.Tensor:
    """``(N,H,W)`` / ``(N,H,W,3)`` / ``(N,C,H,W)`` -> ``(N,C,H,W)`` (a view where possible)."""
    if images.ndim == 3:
        return images.unsqueeze(1)
    if images.ndim == 4 and images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):
        return images.permute(0, 3, 1, 2)
    if images.ndim == 4 and images.shape[1] in (1, 3):
        return images
    raise ValueError(f"expected faces as (N,H,W), (N,H,W,3) or (N,C,H,W), got {tuple(images.shape)}")


class BatchAugment:
    """Augments a uint8 (or [0,1] float) ``(N,C,H,W)`` batch: ``aug(batch, generator) -> float [0,1]``.

    ``generator`` is a CPU ``torch.Generator``; all random parameters are drawn from it, in a fixed
    order, then moved to the batch's device.
    """

    def __init__(self, config: AugmentConfig | None = None):
        self.config = config or AugmentConfig()

    def __repr__(self) -> str:
        return f"BatchAugment({self.config})"

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        x = to_nchw_uint8(images)
        x = x.float() * (1.0 / 255.0) if x.dtype == torch.uint8 else x.float()
        cfg = self.config
        n, _, h, w = x.shape
        if n == 0 or not cfg.active:
            return x.contiguous()
        g = generator
        # draw everything first, in a fixed order, so the stream does not depend on which steps run
        u = torch.rand(n, 13, generator=g, dtype=torch.float64)
        if cfg.geometric:
            x = self._geometry(x, u[:, :5])
        if cfg.brightness or cfg.contrast:
            x = self._photometry(x, u[:, 5:7])
        if cfg.erase:
            x = self._erase(x, u[:, 7:13])
        return x

    # -- steps
    def _geometry(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        n, _, h, w = x.shape
        t = float(cfg.translate)
        # whole-pixel shifts in [-t, t]: a random crop from the zero-padded image
        tx = torch.floor(u[:, 0] * (2 * math.floor(t) + 1)) - math.floor(t)
        ty = torch.floor(u[:, 1] * (2 * math.floor(t) + 1)) - math.floor(t)
        flip = torch.where(u[:, 2] < cfg.hflip, -1.0, 1.0).double()
        ang = (u[:, 3] * 2 - 1) * math.radians(cfg.rotate)
        lo, hi = cfg.scale
        s = lo + u[:, 4] * (hi - lo)
        # output pixel (centred coords) -> source pixel: p_src = R(ang) diag(flip, 1) p_out / s - shift
        cos, sin = torch.cos(ang) / s, torch.sin(ang) / s
        a = torch.stack([cos * flip, -sin, sin * flip, cos], 1).view(n, 2, 2)
        # to affine_grid's normalised coords (x in [-1,1] over w, y over h): A_n = D^-1 A D
        d = torch.tensor([w / 2.0, h / 2.0], dtype=torch.float64)
        a_n = a * d.view(1, 1, 2) / d.view(1, 2, 1)
        shift = torch.stack([-tx / (w / 2.0), -ty / (h / 2.0)], 1)
        theta = torch.cat([a_n, shift.unsqueeze(2)], 2).to(device=x.device, dtype=x.dtype)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode=cfg.padding, align_corners=False)

    def _photometry(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        n = x.shape[0]
        b = (1.0 + (u[:, 0] * 2 - 1) * cfg.brightness).to(x.device, x.dtype).view(n, 1, 1, 1)
        c = (1.0 + (u[:, 1] * 2 - 1) * cfg.contrast).to(x.device, x.dtype).view(n, 1, 1, 1)
        x = x * b
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        return ((x - mean) * c + mean).clamp_(0.0, 1.0)

    def _erase(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        n, _, h, w = x.shape
        a0, a1 = cfg.erase_area
        area = (a0 + u[:, 0] * (a1 - a0)) * (h * w)
        r0, r1 = math.log(cfg.erase_ratio[0]), math.log(cfg.erase_ratio[1])
        ratio = torch.exp(r0 + u[:, 1] * (r1 - r0))
        eh = torch.sqrt(area * ratio).round().clamp(1, h)
        ew = torch.sqrt(area / ratio).round().clamp(1, w)
        top = torch.floor(u[:, 2] * (h - eh + 1))
        left = torch.floor(u[:, 3] * (w - ew + 1))
        on = u[:, 4] < cfg.erase
        dev = x.device
        ys = torch.arange(h, device=dev).view(1, h, 1)
        xs = torch.arange(w, device=dev).view(1, 1, w)
        top, left, eh, ew = (t.to(dev).view(n, 1, 1) for t in (top, left, eh, ew))
        mask = (ys >= top) & (ys < top + eh) & (xs >= left) & (xs < left + ew) & on.to(dev).view(n, 1, 1)
        value = u[:, 5].to(device=dev, dtype=x.dtype).view(n, 1, 1, 1)  # a random grey level per image
        return torch.where(mask.unsqueeze(1), value, x)
