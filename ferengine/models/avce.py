"""AVCE's deployed network (Kim & Song, "Emotion-aware Multi-view Contrastive Learning for Facial Emotion
Recognition", ECCV 2022): encoder E, compressor C and regressor R, valence/arousal only.

- E: the "parameter-reduced" AlexNet (AlexNet's five conv layers; the reduction is the compressor's 9216 -> 32
  in place of AlexNet's 4096-wide classifier) or the ResNet-18 trunk (:class:`FaceResNet`'s stem and blocks).
- C: average pooling (AlexNet: to 6x6, as AlexNet's own classifier input, 9216 values; ResNet-18: global) and
  one FC layer to the latent ``z`` (d = 32) with ReLU, as the official code's bottleneck.
- R: FC 32 -> 256, batch norm, ReLU, FC 256 -> 2, tanh: (valence, arousal) in [-1, 1].

The training-only parts (sparsemax/softmax views, projection heads H and H1) live in ``trainers.methods.avce``.
Dropout (the official code's, before both FC layers) is ``nn.Dropout``: on in training, off in eval, so
inference is deterministic (the official regressor calls ``F.dropout2d`` without ``training=``, which keeps it
on at test time). Nothing is added to the outputs (the official demo adds 0.15 to both).
"""
from __future__ import annotations

import torch
from torch import nn

from ._registry import ModelCfg, register_model
from .resnet import FaceResNet

__all__ = ["AVCENet", "AlexNetEncoder", "ALEXNET_MIN_INPUT"]

# AlexNet's three stride-2 max-pools after an 11x11/4 conv leave nothing of a face under 63 px
ALEXNET_MIN_INPUT = 63


class AlexNetEncoder(nn.Module):
    """AlexNet's convolutional features (64-192-384-256-256 channels x ``width``), as torchvision lays them out."""

    def __init__(self, in_chans: int = 3, width: float = 1.0):
        super().__init__()
        c = [max(1, int(round(k * width))) for k in (64, 192, 384, 256, 256)]
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, c[0], 11, stride=4, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
            nn.Conv2d(c[0], c[1], 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
            nn.Conv2d(c[1], c[2], 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(c[2], c[3], 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(c[3], c[4], 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
        )
        self.out_channels = c[4]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


class _ResNetEncoder(nn.Module):
    def __init__(self, in_chans: int, width: float, stem: str):
        super().__init__()
        t = FaceResNet(num_classes=1, in_chans=in_chans, stem=stem, width=width)
        self.stem, self.layer1, self.layer2, self.layer3, self.layer4 = t.stem, t.layer1, t.layer2, t.layer3, t.layer4
        self.out_channels = t.feature_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))


class AVCENet(nn.Module):
    """E -> C -> z (``latent_dim``) -> R -> ``{"va", "z"}``."""

    feature_names = ("encoder",)
    heads = ("valence_arousal",)

    def __init__(self, backbone: str = "alexnet", in_chans: int = 3, width: float = 1.0, stem: str = "imagenet",
                 latent_dim: int = 32, hidden: int = 256, dropout: float = 0.5):
        super().__init__()
        if backbone not in ("alexnet", "resnet18"):
            raise ValueError(f"backbone must be 'alexnet' or 'resnet18', got {backbone!r}")
        if not 0 < float(width) <= 8:
            raise ValueError(f"width must be in (0, 8], got {width!r}")
        if not 0 <= float(dropout) < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if int(latent_dim) < 2 or int(hidden) < 1:
            raise ValueError(f"need latent_dim >= 2 and hidden >= 1, got {latent_dim}, {hidden}")
        self.backbone = backbone
        if backbone == "alexnet":
            self.encoder = AlexNetEncoder(in_chans, width)
            self.pool = nn.AdaptiveAvgPool2d(6)
            flat = self.encoder.out_channels * 36
            size = 224
        else:
            self.encoder = _ResNetEncoder(in_chans, width, stem)
            self.pool = nn.AdaptiveAvgPool2d(1)
            flat = self.encoder.out_channels
            size = 224 if stem == "imagenet" else 112
        self.latent_dim = int(latent_dim)
        self.compress = nn.Sequential(nn.Dropout(dropout), nn.Linear(flat, self.latent_dim), nn.ReLU(inplace=True))
        self.regressor = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.latent_dim, hidden),
                                       nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 2))
        self.feature_dim = self.latent_dim
        self.default_input = {"size": size, "channels": in_chans}

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"encoder": self.encoder(x)}

    def latent(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """C: the latent ``z`` (N, latent_dim) of the encoder's map."""
        return self.compress(torch.flatten(self.pool(features["encoder"]), 1))

    def regress(self, z: torch.Tensor) -> torch.Tensor:
        """R: (valence, arousal) in [-1, 1] of ``z``."""
        return torch.tanh(self.regressor(z))

    def forward_head(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        z = self.latent(features)
        return {"va": self.regress(z), "z": z}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.forward_head(self.forward_features(x))


_CFG = dict(heads=("valence_arousal",), features=AVCENet.feature_names, head_kwargs=False)


@register_model(cfg=ModelCfg(input={"size": 224, "channels": 3}, test_kwargs={"width": 0.125, "hidden": 16}, **_CFG))
def avce_alexnet(in_chans: int = 3, width: float = 1.0, latent_dim: int = 32, hidden: int = 256,
                 dropout: float = 0.5) -> AVCENet:
    """AVCE's E/C/R on the reduced AlexNet (valence/arousal only; 2.8M params at 224 px)."""
    return AVCENet("alexnet", in_chans, width, "imagenet", latent_dim, hidden, dropout)


@register_model(cfg=ModelCfg(input={"size": 224, "channels": 3}, test_kwargs={"width": 0.125, "hidden": 16}, **_CFG))
def avce_resnet18(in_chans: int = 3, width: float = 1.0, stem: str = "imagenet", latent_dim: int = 32,
                  hidden: int = 256, dropout: float = 0.5) -> AVCENet:
    """AVCE's E/C/R on the ResNet-18 trunk (valence/arousal only; 11.2M params)."""
    return AVCENet("resnet18", in_chans, width, stem, latent_dim, hidden, dropout)
