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
    usual 7x7/2 conv + max-pool for 224 px input.
    """

    def __init__(
        self,
        num_classes: int = 7,
        in_chans: int = 1,
        stem: str = "small",
        av_head: bool = False,
        dropout: float = 0.0,
        pretrained: bool = False,
    ):
        super().__init__()
        if stem not in ("small", "imagenet"):
            raise ValueError(f"stem must be 'small' or 'imagenet', got {stem!r}")
        trunk = ResNet(BasicBlock, [2, 2, 2, 2])
        if pretrained:
            trunk.load_state_dict(_imagenet_state_dict())
        if stem == "small":
            trunk.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            trunk.maxpool = nn.Identity()
        if in_chans != 3:
            old = trunk.conv1
            new = nn.Conv2d(in_chans, 64, old.kernel_size, old.stride, old.padding, bias=False)
            with torch.no_grad():  # keep pretrained filters meaningful for grey input
                new.weight.copy_(old.weight.mean(dim=1, keepdim=True).expand_as(new.weight))
            trunk.conv1 = new
        self.stem = nn.Sequential(trunk.conv1, trunk.bn1, trunk.relu, trunk.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            trunk.layer1, trunk.layer2, trunk.layer3, trunk.layer4,
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = OutputHeads(512, num_classes, av_head, dropout)
        self.heads = self.head.heads
        self.feature_dim = 512
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
    dropout: float = 0.0, pretrained: bool = False,
) -> FaceResNet:
    """ResNet-18 (11.2M params); stem 'small' for 48-112 px grey faces, 'imagenet' for 224 RGB."""
    return FaceResNet(num_classes, in_chans, stem, av_head, dropout, pretrained)
