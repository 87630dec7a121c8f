"""What every ResNet-18 method of the zoo shares (ECAN, cross-layer contrastive learning): the ``--width``,
``--stem`` and ``--init`` flags (:class:`ResNetOptions`, a base of the method's ``Config``), building the
registered network from them (:func:`build_resnet`) and the checkpoint's input spec (:func:`resnet_input_spec`:
ImageNet statistics for RGB input, which torchvision / MS-Celeb ResNet-18 weights were trained with)."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from ferengine.models import create_model
from ferengine.preprocess import InputSpec

from ..engine.config import opt
from ..engine.errors import TrainError
from .pretrained import InitReport, load_resnet_trunk

__all__ = ["ResNetOptions", "build_resnet", "resnet_input_spec", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class ResNetOptions:
    """The trunk's flags; a method's ``Config`` derives from this dataclass."""

    width: float | None = opt(None, lo=0.0, lo_open=True, hi=8.0,
                              help="ResNet-18 channel-width multiplier (CPU-scale studies; none given: 1)")
    stem: Literal["small", "imagenet"] | None = opt(
        None, help="small: 3x3 stride-1 stem for <= 112 px input; imagenet: 7x7/2 + max-pool (none given: by "
                   "input size, imagenet from 128 px)")
    init: str | None = opt(None, metavar="FILE",
                           help="start the trunk from a torchvision/timm ResNet-18 state_dict (.safetensors / "
                                "weights-only .pt, e.g. ImageNet or MS-Celeb-1M weights) or a ResNet-18 checkpoint "
                                "of ours")


def build_resnet(arch: str, o: ResNetOptions, cfg: Any, data: Any, log: logging.Logger,
                 **extra: Any) -> tuple[nn.Module, dict[str, Any], InitReport | None]:
    """``arch`` (``resnet18`` or a network on its trunk) for ``data`` with the flags' width and stem (by
    ``cfg.input_size``) and ``extra`` constructor arguments, its trunk loaded from ``o.init`` if given.
    Returns (network, constructor arguments for the checkpoint, the init report or None)."""
    size = int(cfg.input_size or 48)
    kwargs: dict[str, Any] = {"num_classes": data.num_classes, "in_chans": int(cfg.channels or data.channels),
                              "stem": o.stem or ("imagenet" if size >= 128 else "small")}
    if o.width is not None and float(o.width) != 1.0:
        kwargs["width"] = float(o.width)
    kwargs.update(extra)
    try:
        net = create_model(arch, **kwargs)
    except (TypeError, ValueError) as exc:
        raise TrainError(f"cannot build {arch} with {kwargs}: {exc}") from None
    report = None
    if o.init:
        report = load_resnet_trunk(net, o.init, list(data.label_names))
        log.info("trunk initialised from %s", report.summary())
    return net, kwargs, report


def resnet_input_spec(net: nn.Module, cfg: Any) -> InputSpec:
    size = int(cfg.input_size or net.default_input["size"])
    ch = int(net.default_input["channels"])
    if ch == 3:
        return InputSpec(size=size, channels=3, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    return InputSpec(size=size, channels=ch)
