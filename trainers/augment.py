"""Batched data augmentation on uint8 face tensors, on whatever device the batch lives on.

One call augments a whole batch with tensor ops only (no per-image Python), in torchvision's order:

1. geometry, as ONE ``F.grid_sample`` per batch (the steps' matrices are composed): random translation by
   whole pixels (the "random crop with padding" of the usual recipes: shifting by up to ``translate`` px
   and filling the uncovered border is what cropping a padded image does), horizontal flip, rotation
   (applied with probability ``rotate_p``) and scale, then ``RandomAffine``-style translation (``affine_*``)
   and last one of the five ``FiveCrop`` crops rescaled to the full size (``fivecrop``);
2. colour jitter, all of it applied with probability ``jitter_p``: per-image brightness (multiplicative),
   contrast (around the image's mean), saturation (blend with the image's grey) and hue (a chroma rotation);
3. random greyscale (``grey_p``), 4. Gaussian blur (``blur_p``, per-image sigma);
5. random erasing: one rectangle per image (probability ``erase``), filled with a random grey level or
   ``erase_value``.

Every random number comes from a ``torch.Generator`` on the CPU (a few numbers per image), so a seed
gives the same augmentation on CPU and GPU and the generator's state can be saved for exact resume.
Each call draws one ``(N, 13)`` block for the original steps and, only when one of the steps added for
ECAN's Table 1 is on (rotate_p < 1, affine, fivecrop, jitter_p < 1, saturation, hue, grey, blur), a
second ``(N, 11)`` block after it; configs without those steps draw exactly what they always drew.
The output is float32 ``(N, C, H, W)`` in [0, 1], ready for ``ferengine.preprocess.to_model_input``
(which resizes, converts channels and normalises exactly as at inference).

:func:`ecan_augment` gives ECAN's per-dataset none/weak/strong settings (its Table 1).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["AugmentConfig", "BatchAugment", "AUGMENT_PRESETS", "augment_config", "with_overrides", "ecan_augment", "to_nchw_uint8",
           "adjust_saturation", "adjust_hue", "gaussian_blur", "blur_kernel_size", "LUMA"]

LUMA = (0.299, 0.587, 0.114)  # ITU-R 601 luminance weights (torchvision's rgb_to_grayscale, within 1e-4)
_EXTRA = 11  # columns of the second random block (the steps added for ECAN's Table 1)


@dataclass(frozen=True)
class AugmentConfig:
    """What :class:`BatchAugment` does; 0 (or an empty range) switches a step off.

    Original steps:

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

    Steps added for ECAN's Table 1 (torchvision's transforms of the same name; every default keeps the
    behaviour and the random stream of the configs above):

    - ``rotate_p``: probability that the rotation is applied (``RandomApply([RandomRotation])``); 1 = always.
    - ``affine_translate`` / ``affine_p``: ``RandomAffine(0, translate=(a, a))`` applied with probability
      ``affine_p``: a shift uniform in +-a*W horizontally and +-a*H vertically, continuous (torchvision
      rounds it to whole pixels), after the rotation.
    - ``fivecrop``: ``FiveCrop(fivecrop * side)``, the last geometric step: one of its five crops (the 4
      corners and the centre, at torchvision's positions) chosen uniformly per image and rescaled
      (bilinear, edges clamped as ``resize`` does) to the full image size. One random crop per image,
      not all five: a view is one image (ECAN 3.1, x~ = Aug(x)), the batch keeps its shape and the
      other views of the same image draw their own crop; five stacked crops would be five views.
    - ``jitter_p``: probability that the colour jitter (brightness, contrast, saturation, hue, in that
      fixed order; torchvision's ``ColorJitter`` shuffles the order) is applied to an image
      (``RandomApply([ColorJitter], p)``); 1 = always.
    - ``saturation``: factor in [max(0, 1 - v), 1 + v], blending the image with its greyscale (RGB only,
      a no-op on 1 channel).
    - ``hue``: shift in [-v, v] of a full turn (v <= 0.5), RGB only, as a rotation of the chroma plane in
      YIQ space -- a batched approximation of torchvision's shift of the HSV hue (same direction, same
      luma; not the same colours for saturated pixels).
    - ``grey_p``: ``RandomGrayscale``: probability that an RGB image becomes its luminance ``LUMA`` on
      all 3 channels (identity on 1 channel).
    - ``blur_p`` / ``blur_sigma`` / ``blur_kernel``: Gaussian blur with probability ``blur_p``, sigma
      uniform in ``blur_sigma``, an odd kernel of about ``blur_kernel`` x the side (SimCLR: 10 %, at
      least 3 taps), separable, reflect padding (as torchvision's ``gaussian_blur``).
    - ``erase_value``: fill of the erased rectangle: None = a random grey level per image (as before), a
      number in [0, 1] = that value (torchvision ``RandomErasing``'s default 0 is black here, in [0, 1]
      pixel space).
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
    # ECAN Table 1 additions
    rotate_p: float = 1.0
    affine_translate: float = 0.0
    affine_p: float = 0.0
    fivecrop: float = 0.0
    jitter_p: float = 1.0
    saturation: float = 0.0
    hue: float = 0.0
    grey_p: float = 0.0
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel: float = 0.1
    erase_value: float | None = None

    def __post_init__(self) -> None:
        if self.padding not in ("zeros", "border", "reflection"):
            raise ValueError(f"augment padding must be zeros, border or reflection, got {self.padding!r}")
        for name in ("hflip", "erase", "rotate_p", "affine_p", "jitter_p", "grey_p", "blur_p"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"augment {name} is a probability in [0, 1], got {v}")
        for name in ("scale", "erase_area", "erase_ratio", "blur_sigma"):
            v = tuple(float(x) for x in getattr(self, name))
            if len(v) != 2 or v[0] > v[1] or v[0] <= 0:
                raise ValueError(f"augment {name} must be a (min, max) pair of positive numbers, got {v}")
            object.__setattr__(self, name, v)
        for name in ("translate", "rotate", "brightness", "contrast", "saturation", "hue", "affine_translate",
                     "blur_kernel"):
            if getattr(self, name) < 0:
                raise ValueError(f"augment {name} must be >= 0, got {getattr(self, name)}")
        if self.hue > 0.5:
            raise ValueError(f"augment hue is a fraction of a turn in [0, 0.5], got {self.hue}")
        if self.affine_translate > 1:
            raise ValueError(f"augment affine_translate is a fraction of the side in [0, 1], "
                             f"got {self.affine_translate}")
        if not 0.0 <= self.fivecrop <= 1.0:
            raise ValueError(f"augment fivecrop is the crop side as a fraction of the image side, in (0, 1] "
                             f"(0 = off), got {self.fivecrop}")
        if self.erase_value is not None:
            if not 0.0 <= self.erase_value <= 1.0:
                raise ValueError(f"augment erase_value must be None (a random grey) or in [0, 1], "
                                 f"got {self.erase_value}")
            object.__setattr__(self, "erase_value", float(self.erase_value))

    @property
    def affine(self) -> bool:
        return bool(self.affine_p and self.affine_translate)

    @property
    def geometric(self) -> bool:
        return bool(self.translate or self.hflip or self.rotate or self.scale != (1.0, 1.0) or self.affine
                    or self.fivecrop)

    @property
    def jitter(self) -> bool:
        return bool(self.brightness or self.contrast or self.saturation or self.hue)

    @property
    def extended(self) -> bool:
        """Whether a step added for ECAN's Table 1 is on, i.e. whether a call draws the second block."""
        return bool((self.rotate and self.rotate_p < 1.0) or self.affine or self.fivecrop
                    or (self.jitter and self.jitter_p < 1.0) or self.saturation or self.hue or self.grey_p
                    or self.blur_p)

    @property
    def active(self) -> bool:
        return bool(self.geometric or self.jitter or self.erase or self.grey_p or self.blur_p)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for name in ("scale", "erase_area", "erase_ratio", "blur_sigma"):
            d[name] = list(getattr(self, name))
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
    return with_overrides(base, overrides)


def with_overrides(base: AugmentConfig, overrides: dict[str, Any] | None) -> AugmentConfig:
    """``base`` with the ``--aug KEY=VALUE`` field overrides; ValueError naming an unknown or bad one."""
    if not overrides:
        return base
    known = {f.name for f in fields(AugmentConfig)}
    bad = sorted(set(overrides) - known)
    if bad:
        raise ValueError(f"unknown augmentation option(s) {bad}; known: {sorted(known)}")
    try:
        return replace(base, **overrides)
    except TypeError as exc:
        raise ValueError(f"augmentation options {overrides}: {exc}") from None


# ECAN (papers/ecan.md, section 4.3, Table 1) lists which transforms each level uses on each dataset, no
# magnitudes. The magnitudes below, with their precedents:
#
# | Table 1 row          | setting                                   | precedent                               |
# | -------------------- | ----------------------------------------- | --------------------------------------- |
# | RandomCrop           | padded crop: translate = round(side / 12) | 4 px on 48 (FER2013 recipes), 16 px on  |
# |                      | (fer), round(side / 14) (raf)             | 224 (RAF-DB); computed from image_size  |
# | RandomHorizontalFlip | p 0.5                                     | torchvision default                     |
# | RandomRotation       | 10 degrees, always applied (rotate_p 1)   | the FER2013 recipes' 10 degrees         |
# | RandomErasing        | p 0.5, area (0.02, 0.33), ratio (0.3, 3.3), value 0 | torchvision defaults          |
# | RandomGrayscale      | p 0.2                                     | SupCon reference code                   |
# | RandomColorJitter    | (0.4, 0.4, 0.4, 0.1) with p 0.8           | SupCon / SimCLR                         |
# | RandomAffine         | translate 0.2 with p 0.5                  | Khaireddin & Chen 2021 (usef-kh/fer)    |
# | FiveCrop             | 40/48 of the side, one crop per view      | the same FER2013 recipe's crop size     |
# | RandomGaussianBlur   | p 0.5, sigma (0.1, 2.0), kernel 10 % side | SimCLR                                  |
#
# Table 1's check marks (RAF-DB none/weak/strong, FER2013 none/weak/strong):
ECAN_TABLE1: dict[str, dict[str, frozenset[str]]] = {
    "rafdb": {
        "none": frozenset(),
        "weak": frozenset({"hflip", "erase", "grey"}),
        "strong": frozenset({"crop", "jitter", "hflip", "rotate", "erase", "grey", "blur"}),
    },
    "fer2013": {
        "none": frozenset(),
        "weak": frozenset({"crop", "hflip", "rotate", "erase", "grey"}),
        "strong": frozenset({"crop", "jitter", "hflip", "rotate", "erase", "grey", "affine", "fivecrop"}),
    },
}
_ECAN_DATASETS = {"fer2013": "fer2013", "ferplus": "fer2013", "rafdb": "rafdb"}


def ecan_augment(level: str, dataset: str, image_size: int, channels: int) -> AugmentConfig:
    """ECAN's Table 1 augmentation ``level`` (none|weak|strong) for ``dataset`` (fer2013, ferplus as
    fer2013, rafdb) on ``image_size`` px images with ``channels`` (1 or 3) channels.

    The colour steps (jitter's saturation/hue, greyscale) stay in the config on 1-channel images, where
    they are no-ops, so a dataset's config (and its random stream) does not depend on ``channels``.
    """
    if level not in ("none", "weak", "strong"):
        raise ValueError(f"ECAN augmentation level must be none, weak or strong, got {level!r}")
    key = _ECAN_DATASETS.get(str(dataset).lower())
    if key is None:
        raise ValueError(f"ECAN's Table 1 has no augmentation for dataset {dataset!r}; known: "
                         f"{', '.join(_ECAN_DATASETS)}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if int(image_size) < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")
    steps = ECAN_TABLE1[key][level]
    kw: dict[str, Any] = {}
    if "crop" in steps:
        kw["translate"] = float(round(image_size / (12.0 if key == "fer2013" else 14.0)))
    if "hflip" in steps:
        kw["hflip"] = 0.5
    if "rotate" in steps:
        kw.update(rotate=10.0, rotate_p=1.0)
    if "erase" in steps:
        kw.update(erase=0.5, erase_area=(0.02, 0.33), erase_ratio=(0.3, 3.3), erase_value=0.0)
    if "grey" in steps:
        kw["grey_p"] = 0.2
    if "jitter" in steps:
        kw.update(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, jitter_p=0.8)
    if "affine" in steps:
        kw.update(affine_translate=0.2, affine_p=0.5)
    if "fivecrop" in steps:
        kw["fivecrop"] = 40.0 / 48.0
    if "blur" in steps:
        kw.update(blur_p=0.5, blur_sigma=(0.1, 2.0), blur_kernel=0.1)
    return AugmentConfig(**kw)


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
        n, c, h, w = x.shape
        if n == 0 or not cfg.active:
            return x.contiguous()
        g = generator
        # draw everything first, in a fixed order, so the stream does not depend on which steps run
        u = torch.rand(n, 13, generator=g, dtype=torch.float64)
        # the ECAN Table 1 steps' numbers: a second block, only when one of them is on (the configs
        # without them draw exactly what they always drew); columns: 0 rotate on, 1 affine on, 2-3 affine
        # shift, 4 fivecrop position, 5 jitter on, 6 saturation, 7 hue, 8 grey on, 9 blur on, 10 sigma
        e = torch.rand(n, _EXTRA, generator=g, dtype=torch.float64) if cfg.extended else None
        if cfg.geometric:
            x = self._geometry(x, u[:, :5], e)
        if cfg.jitter:
            x = self._jitter(x, u[:, 5:7], e)
        if cfg.grey_p and c == 3:
            x = self._grey(x, e[:, 8])
        if cfg.blur_p:
            x = self._blur(x, e[:, 9:11])
        if cfg.erase:
            x = self._erase(x, u[:, 7:13])
        return x

    # -- steps
    def _geometry(self, x: torch.Tensor, u: torch.Tensor, e: torch.Tensor | None = None) -> torch.Tensor:
        cfg = self.config
        n, _, h, w = x.shape
        t = float(cfg.translate)
        # whole-pixel shifts in [-t, t]: a random crop from the zero-padded image
        tx = torch.floor(u[:, 0] * (2 * math.floor(t) + 1)) - math.floor(t)
        ty = torch.floor(u[:, 1] * (2 * math.floor(t) + 1)) - math.floor(t)
        flip = torch.where(u[:, 2] < cfg.hflip, -1.0, 1.0).double()
        ang = (u[:, 3] * 2 - 1) * math.radians(cfg.rotate)
        if e is not None and cfg.rotate_p < 1.0:
            ang = torch.where(e[:, 0] < cfg.rotate_p, ang, torch.zeros_like(ang))
        lo, hi = cfg.scale
        s = lo + u[:, 4] * (hi - lo)
        # output pixel (centred coords) -> source pixel: p_src = R(ang) diag(flip, 1) p_out / s - shift
        cos, sin = torch.cos(ang) / s, torch.sin(ang) / s
        a = torch.stack([cos * flip, -sin, sin * flip, cos], 1).view(n, 2, 2)
        # to affine_grid's normalised coords (x in [-1,1] over w, y over h): A_n = D^-1 A D
        d = torch.tensor([w / 2.0, h / 2.0], dtype=torch.float64)
        a_n = a * d.view(1, 1, 2) / d.view(1, 2, 1)
        if e is not None and cfg.affine:
            # RandomAffine's shift dq (applied after the rotation): p_src = A (q - dq) - shift, so the
            # translation becomes -(A dq + shift), in pixels, then normalised
            on = (e[:, 1] < cfg.affine_p).double()
            dq = torch.stack([(e[:, 2] * 2 - 1) * (cfg.affine_translate * w),
                              (e[:, 3] * 2 - 1) * (cfg.affine_translate * h)], 1) * on.unsqueeze(1)
            off = torch.bmm(a, dq.unsqueeze(2)).squeeze(2) + torch.stack([tx, ty], 1)
            shift = -off / d.view(1, 2)
        else:
            shift = torch.stack([-tx / (w / 2.0), -ty / (h / 2.0)], 1)
        if e is not None and cfg.fivecrop:
            grid = self._fivecrop_grid(a_n, shift, e[:, 4], x)
        else:
            theta = torch.cat([a_n, shift.unsqueeze(2)], 2).to(device=x.device, dtype=x.dtype)
            grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode=cfg.padding, align_corners=False)

    def _fivecrop_grid(self, a_n: torch.Tensor, shift: torch.Tensor, u: torch.Tensor,
                       x: torch.Tensor) -> torch.Tensor:
        """The sampling grid of the geometry (``a_n``, ``shift``) followed by FiveCrop + resize.

        Output pixel centre j (normalised X_j = (2j+1)/w - 1) reads the crop's point
        ``l + (j + 0.5) cw / w - 0.5`` (``resize``'s bilinear, align_corners=False), clamped to the crop's
        first/last pixel centres as ``interpolate`` clamps at the image edges; that point, in the
        geometry's output, then goes through the geometry's own map. Built per axis, then combined.
        """
        n, _, h, w = x.shape
        ch, cw = self.crop_size(h, w)
        # torchvision's five_crop: tl, tr, bl, br, centre (centre_crop rounds (side - crop) / 2)
        tops = torch.tensor([0, 0, h - ch, h - ch, int(round((h - ch) / 2.0))], dtype=torch.float64)
        lefts = torch.tensor([0, w - cw, 0, w - cw, int(round((w - cw) / 2.0))], dtype=torch.float64)
        idx = torch.floor(u * 5).long().clamp_(0, 4)
        top, left = tops[idx], lefts[idx]
        dev, dt = x.device, x.dtype

        def axis(start: torch.Tensor, crop: int, side: int) -> torch.Tensor:
            # normalised source coordinate per image and output index: (n, side)
            base = (torch.arange(side, device=dev, dtype=dt) * 2 + 1) / side - 1
            centre = ((start + crop / 2.0 - side / 2.0) / (side / 2.0)).to(dev, dt).view(n, 1)
            lo = ((start + 0.5 - side / 2.0) / (side / 2.0)).to(dev, dt).view(n, 1)
            hi = ((start + crop - 0.5 - side / 2.0) / (side / 2.0)).to(dev, dt).view(n, 1)
            return torch.minimum(torch.maximum(base * (crop / side) + centre, lo), hi)

        qx = axis(left, cw, w).view(n, 1, w)
        qy = axis(top, ch, h).view(n, h, 1)
        m = a_n.to(dev, dt)
        sh = shift.to(dev, dt)
        gx = m[:, 0, 0].view(n, 1, 1) * qx + m[:, 0, 1].view(n, 1, 1) * qy + sh[:, 0].view(n, 1, 1)
        gy = m[:, 1, 0].view(n, 1, 1) * qx + m[:, 1, 1].view(n, 1, 1) * qy + sh[:, 1].view(n, 1, 1)
        return torch.stack([gx, gy], 3)

    def crop_size(self, h: int, w: int) -> tuple[int, int]:
        """FiveCrop's (height, width) on an ``h`` x ``w`` image."""
        f = self.config.fivecrop
        return max(1, min(h, int(round(f * h)))), max(1, min(w, int(round(f * w))))

    def _jitter(self, x: torch.Tensor, u: torch.Tensor, e: torch.Tensor | None) -> torch.Tensor:
        cfg = self.config
        n, c = x.shape[:2]
        y = x
        if cfg.brightness or cfg.contrast:
            y = self._photometry(y, u)
        if c == 3 and cfg.saturation:
            lo = max(0.0, 1.0 - cfg.saturation)
            y = adjust_saturation(y, lo + e[:, 6] * (1.0 + cfg.saturation - lo))
        if c == 3 and cfg.hue:
            y = adjust_hue(y, (e[:, 7] * 2 - 1) * cfg.hue)
        if e is not None and cfg.jitter_p < 1.0:
            on = (e[:, 5] < cfg.jitter_p).to(x.device).view(n, 1, 1, 1)
            y = torch.where(on, y, x)
        return y

    def _photometry(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        n = x.shape[0]
        b = (1.0 + (u[:, 0] * 2 - 1) * cfg.brightness).to(x.device, x.dtype).view(n, 1, 1, 1)
        c = (1.0 + (u[:, 1] * 2 - 1) * cfg.contrast).to(x.device, x.dtype).view(n, 1, 1, 1)
        x = x * b
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        return ((x - mean) * c + mean).clamp_(0.0, 1.0)

    def _grey(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        on = (u < self.config.grey_p).to(x.device).view(-1, 1, 1, 1)
        return torch.where(on, _luma(x).expand_as(x), x)

    def _blur(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        n, _, h, w = x.shape
        on = u[:, 0] < cfg.blur_p
        idx = torch.nonzero(on).squeeze(1)  # a CPU mask: no device sync
        if idx.numel() == 0:
            return x
        s0, s1 = cfg.blur_sigma
        sigma = s0 + u[idx, 1] * (s1 - s0)
        kh, kw = blur_kernel_size(h, cfg.blur_kernel), blur_kernel_size(w, cfg.blur_kernel)
        if idx.numel() == n:
            return gaussian_blur(x, sigma, (kh, kw))
        idx = idx.to(x.device)
        return x.index_copy(0, idx, gaussian_blur(x.index_select(0, idx), sigma, (kh, kw)))

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
        if cfg.erase_value is None:
            value = u[:, 5].to(device=dev, dtype=x.dtype).view(n, 1, 1, 1)  # a random grey level per image
        else:
            value = torch.tensor(cfg.erase_value, device=dev, dtype=x.dtype)
        return torch.where(mask.unsqueeze(1), value, x)


# ------------------------------------------------------------------------------- batched colour / blur


def _luma(x: torch.Tensor) -> torch.Tensor:
    """``(N,3,H,W)`` -> ``(N,1,H,W)`` luminance."""
    r, g, b = LUMA
    return r * x[:, 0:1] + g * x[:, 1:2] + b * x[:, 2:3]


def _per_image(v: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(v, dtype=torch.float64).to(x.device, x.dtype)
    return t.reshape(-1, 1, 1, 1).expand(x.shape[0], 1, 1, 1)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor | float) -> torch.Tensor:
    """Per-image saturation of an RGB float batch: ``factor * x + (1 - factor) * grey``, clamped to [0, 1]
    (torchvision's ``adjust_saturation``); 1-channel batches are returned as they are."""
    if x.shape[1] != 3:
        return x
    f = _per_image(factor, x)
    return (f * x + (1.0 - f) * _luma(x)).clamp_(0.0, 1.0)


# RGB -> YIQ (NTSC); its inverse is computed, so the round trip is the identity to rounding
_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.595716, -0.274453, -0.321263], [0.211456, -0.522591, 0.311135]],
                    dtype=torch.float64)
_YIQ_INV = torch.linalg.inv(_YIQ)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor | float) -> torch.Tensor:
    """Per-image hue shift of an RGB float batch by ``shift`` of a full turn (in [-0.5, 0.5]), clamped.

    An approximation of torchvision's ``adjust_hue`` (which shifts H in HSV): the chroma (I, Q) of YIQ is
    rotated by ``-2 pi shift`` (the sign makes +shift go red -> green -> blue, as HSV's hue does), the luma
    Y is kept; one 3x3 matrix per image. 1-channel batches are returned as they are.
    """
    if x.shape[1] != 3:
        return x
    n = x.shape[0]
    ang = -2.0 * math.pi * torch.as_tensor(shift, dtype=torch.float64).reshape(-1).expand(n)
    cos, sin = torch.cos(ang), torch.sin(ang)
    rot = torch.zeros(n, 3, 3, dtype=torch.float64)
    rot[:, 0, 0] = 1.0
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
    m = (_YIQ_INV @ rot @ _YIQ).to(x.device, x.dtype)
    return torch.bmm(m, x.reshape(n, 3, -1)).view(x.shape).clamp_(0.0, 1.0)


def blur_kernel_size(side: int, fraction: float) -> int:
    """An odd kernel of about ``fraction * side`` taps (SimCLR: 10 % of the side), at least 3 and below the
    side (reflect padding needs the half kernel inside the image); 1 (no blur) on sides under 3."""
    k = int(fraction * side) // 2 * 2 + 1
    return max(1, min(max(k, 3), side if side % 2 else side - 1))


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor | float, kernel: tuple[int, int]) -> torch.Tensor:
    """Per-image Gaussian blur of a float ``(N,C,H,W)`` batch: separable, ``kernel`` = (kh, kw) odd taps,
    ``sigma`` one per image (or one for all), reflect padding -- torchvision's ``gaussian_blur`` kernel
    (``exp(-t^2 / 2 sigma^2)`` on ``t = -(k-1)/2 .. (k-1)/2``, normalised), one grouped convolution per axis."""
    n, c, h, w = x.shape
    kh, kw = kernel
    sig = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1).expand(n)

    def taps(k: int) -> torch.Tensor:  # (n*c, k)
        t = torch.linspace(-(k - 1) * 0.5, (k - 1) * 0.5, k, dtype=torch.float64)
        pdf = torch.exp(-0.5 * (t.view(1, k) / sig.view(n, 1)) ** 2)
        return (pdf / pdf.sum(1, keepdim=True)).repeat_interleave(c, 0).to(x.device, x.dtype)

    y = x.reshape(1, n * c, h, w)
    if kw > 1:
        y = F.conv2d(F.pad(y, (kw // 2, kw // 2, 0, 0), mode="reflect"), taps(kw).view(n * c, 1, 1, kw), groups=n * c)
    if kh > 1:
        y = F.conv2d(F.pad(y, (0, 0, kh // 2, kh // 2), mode="reflect"), taps(kh).view(n * c, 1, kh, 1), groups=n * c)
    return y.reshape(n, c, h, w)
