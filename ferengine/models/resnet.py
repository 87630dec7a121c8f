"""ResNet-18 for faces: the torchvision network with a stem for small grey faces or for 224 RGB."""
from __future__ import annotations

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

from ._heads import OutputHeads
from ._registry import ModelCfg, register_model

IMAGENET_URL = "https://download.pytorch.org/models/resnet18-f37072fd.pth"


class FaceResNet(nn.Module):
    """ResNet-18 trunk + :class:`OutputHeads`.

    ``stem="small"`` (for 40-112 px faces such as FER2013's 48x48) uses a 3x3 stride-1 first conv and
    no max-pool, so a 48 px face still has a 6x6 map at the last block; ``stem="imagenet"`` is the
    usual 7x7/2 conv + max-pool for 224 px input. ``width`` multiplies the channel widths 64-128-256-512
    (CPU-scale studies; 1 is the standard network, whose parameter names are torchvision's, so its
    state_dicts load with ``trainers.modules.pretrained.load_resnet_trunk``).
    """

    def __init__(
        self,
        num_classes: int = 7,
        in_chans: int = 1,
        stem: str = "small",
        av_head: bool = False,
        dropout: float = 0.0,
        pretrained: bool = False,
        width: float = 1.0,
    ):
        super().__init__()
        if stem not in ("small", "imagenet"):
            raise ValueError(f"stem must be 'small' or 'imagenet', got {stem!r}")
        if not 0 < float(width) <= 8:
            raise ValueError(f"width must be in (0, 8], got {width!r}")
        if pretrained and float(width) != 1.0:
            raise ValueError("pretrained ImageNet weights exist for width 1 only")
        trunk = ResNet(BasicBlock, [2, 2, 2, 2]) if float(width) == 1.0 else _narrow_resnet(float(width))
        c0 = trunk.conv1.out_channels
        if pretrained:
            trunk.load_state_dict(_imagenet_state_dict())
        if stem == "small":
            trunk.conv1 = nn.Conv2d(3, c0, kernel_size=3, stride=1, padding=1, bias=False)
            trunk.maxpool = nn.Identity()
        if in_chans != 3:
            old = trunk.conv1
            new = nn.Conv2d(in_chans, c0, old.kernel_size, old.stride, old.padding, bias=False)
            with torch.no_grad():  # keep pretrained filters meaningful for grey input
                new.weight.copy_(old.weight.mean(dim=1, keepdim=True).expand_as(new.weight))
            trunk.conv1 = new
        self.stem = nn.Sequential(trunk.conv1, trunk.bn1, trunk.relu, trunk.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            trunk.layer1, trunk.layer2, trunk.layer3, trunk.layer4,
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.block_channels = tuple(getattr(self, n)[-1].conv2.out_channels for n in self.feature_names)
        dim = trunk.fc.in_features
        self.head = OutputHeads(dim, num_classes, av_head, dropout)
        self.heads = self.head.heads
        self.feature_dim = dim
        size = 224 if stem == "imagenet" else 48
        self.default_input = {"size": size, "channels": in_chans}

    feature_names = ("layer1", "layer2", "layer3", "layer4")

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Outputs of the four residual stages, by name (for cross-layer and diversity losses)."""
        x = self.stem(x)
        feats = {}
        for name in self.feature_names:
            x = getattr(self, name)(x)
            feats[name] = x
        return feats

    def forward_head(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.head(torch.flatten(self.pool(features["layer4"]), 1))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.forward_head(self.forward_features(x))


def _narrow_resnet(width: float) -> ResNet:
    """torchvision's ResNet-18 layout with every channel width multiplied by ``width`` (>= 1 channel)."""
    w = [max(1, int(round(c * width))) for c in (64, 128, 256, 512)]
    net = ResNet(BasicBlock, [2, 2, 2, 2])
    net.conv1 = nn.Conv2d(3, w[0], kernel_size=7, stride=2, padding=3, bias=False)
    net.bn1 = nn.BatchNorm2d(w[0])
    net.inplanes = w[0]
    for i, (name, stride) in enumerate((("layer1", 1), ("layer2", 2), ("layer3", 2), ("layer4", 2))):
        setattr(net, name, net._make_layer(BasicBlock, w[i], 2, stride=stride))
    net.fc = nn.Linear(w[3], 1000)
    for m in net.modules():  # torchvision's initialisation of the rebuilt layers
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
    return net


def _imagenet_state_dict() -> dict[str, torch.Tensor]:
    try:
        return torch.hub.load_state_dict_from_url(IMAGENET_URL, progress=False, weights_only=True)
    except Exception as exc:  # offline, proxy, corrupt cache ...
        raise RuntimeError(
            f"could not fetch ImageNet ResNet-18 weights from {IMAGENET_URL} ({exc}). Offline: copy "
            f"resnet18-f37072fd.pth into {torch.hub.get_dir()}/checkpoints/, or train without "
            "--pretrained, or start from a checkpoint with --init"
        ) from exc


@register_model(cfg=ModelCfg(input={"size": 48, "channels": 1}, features=FaceResNet.feature_names))
def resnet18(
    num_classes: int = 7, in_chans: int = 1, stem: str = "small", av_head: bool = False,
    dropout: float = 0.0, pretrained: bool = False, width: float = 1.0,
) -> FaceResNet:
    """ResNet-18 (11.2M params); stem 'small' for 48-112 px grey faces, 'imagenet' for 224 RGB."""
    return FaceResNet(num_classes, in_chans, stem, av_head, dropout, pretrained, width)
