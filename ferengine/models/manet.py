"""MA-Net, the global multi-scale and local attention network (Zhao, Liu & Wang, "Learning Deep Global
Multi-Scale and Local Attention Features for Facial Expression Recognition in the Wild", IEEE TIP 2021), as the
diversified-features paper uses it (papers/diversified_features.md; METHODS.md section 5).

- Front: a ResNet-18 stem (7x7/2 conv, BN, ReLU, 3x3/2 max-pool), layer1 and layer2 (BasicBlocks): 224 px ->
  128 x 28 x 28.
- Local branch: the map cut into its four non-overlapping quadrants (14 x 14 each); each quadrant has its own
  layer3 (stride 2) and layer4 (stride 1) of attention blocks (a BasicBlock with CBAM, reduction 16, on its
  residual path before the sum) -> 512 x 7 x 7; the four outputs are put back in place (14 x 14), averaged
  over space and classified by ``fc_1``.
- Global branch: layer3 and layer4 (both stride 2) of multi-scale blocks (a 3x3 conv, then its output split
  into four channel groups that two hierarchical chains of 3x3 convs run through in opposite orders, Res2Net
  style, summed; then the residual) -> 512 x 7 x 7, average-pooled and classified by ``fc_2``.
- Output: ``"logits"`` = beta x local + (1 - beta) x global (beta = 0.6, the official code's fusion of the two
  classifiers' scores); ``"logits_local"``, ``"logits_global"``; for the diversity loss ``"patches"`` (N, 4, C,
  h, w), the four quadrant outputs, and ``"feat_local"``, ``"feat_global"`` (N, C), the pooled features of the
  two branches. ``av_head``: fc over both pooled features -> 2, tanh (not in the paper; the app's AV plane).

Parameter names follow the official code (``layer3_1_p1`` ... ``layer4_2``, ``fc_1``, ``fc_2``) so that a
reader can map them. ``width`` scales every channel count (CPU studies); the default is the paper's network.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._registry import ModelCfg, register_model
from .esr import CBAM

__all__ = ["MANet", "BasicBlock", "AttentionBlock", "MultiScaleBlock", "PATCHES"]

PATCHES = 4


def _conv3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def _shortcut(cin: int, cout: int, stride: int) -> nn.Module | None:
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    """ResNet's basic block; ``cbam``: CBAM on the residual path after the second BN (MA-Net's attention block)."""

    def __init__(self, cin: int, cout: int, stride: int = 1, cbam: bool = False, reduction: int = 16):
        super().__init__()
        self.conv1, self.bn1 = _conv3(cin, cout, stride), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = _conv3(cout, cout), nn.BatchNorm2d(cout)
        self.cbam = CBAM(cout, reduction) if cbam else None
        self.downsample = _shortcut(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.cbam is not None:
            out = self.cbam(out)[0]
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class AttentionBlock(BasicBlock):
    def __init__(self, cin: int, cout: int, stride: int = 1, reduction: int = 16):
        super().__init__(cin, cout, stride, cbam=True, reduction=reduction)


class MultiScaleBlock(nn.Module):
    """MA-Net's multi-scale block: conv3x3 + BN + ReLU, then the channels in four groups g1..g4; chain A runs
    g1 -> g2 -> g3 -> g4 (each group's conv sees its group plus the previous output, after ReLU), chain B runs
    g4 -> g3 -> g2 -> g1; their concatenated outputs are summed, plus the shortcut, then ReLU. Receptive fields
    of 3 to 9 pixels side by side in one block."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        if cout % PATCHES:
            raise ValueError(f"MultiScaleBlock needs channels divisible by 4, got {cout}")
        g = cout // 4
        self.group = g
        self.conv1, self.bn1 = _conv3(cin, cout, stride), nn.BatchNorm2d(cout)
        self.chain_a = nn.ModuleList([nn.Sequential(_conv3(g, g), nn.BatchNorm2d(g)) for _ in range(4)])
        self.chain_b = nn.ModuleList([nn.Sequential(_conv3(g, g), nn.BatchNorm2d(g)) for _ in range(4)])
        self.downsample = _shortcut(cin, cout, stride)

    @staticmethod
    def _chain(convs: nn.ModuleList, parts: list[torch.Tensor], order: list[int]) -> torch.Tensor:
        outs: dict[int, torch.Tensor] = {}
        prev = None
        for i in order:
            y = convs[i](parts[i] if prev is None else F.relu(prev) + parts[i])
            outs[i] = prev = y
        return torch.cat([outs[i] for i in range(4)], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        parts = list(torch.split(out, self.group, 1))
        out = self._chain(self.chain_a, parts, [0, 1, 2, 3]) + self._chain(self.chain_b, parts, [3, 2, 1, 0])
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


def _layer(block, cin: int, cout: int, stride: int, **kw) -> nn.Sequential:
    return nn.Sequential(block(cin, cout, stride, **kw), block(cout, cout, 1, **kw))


class MANet(nn.Module):
    """See the module doc."""

    feature_names = ("front",)

    def __init__(self, num_classes: int = 7, in_chans: int = 3, av_head: bool = False, beta: float = 0.6,
                 width: float = 1.0, reduction: int = 16):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"MA-Net needs num_classes >= 1, got {num_classes}")
        if not 0.0 <= float(beta) <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {beta!r}")
        if not 0 < float(width) <= 8:
            raise ValueError(f"width must be in (0, 8], got {width!r}")
        c = [max(4, 4 * round(k * float(width) / 4)) for k in (64, 128, 256, 512)]
        self.num_classes, self.av_head, self.beta, self.width = int(num_classes), bool(av_head), float(beta), float(width)
        self.conv1 = nn.Conv2d(in_chans, c[0], 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(c[0])
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = _layer(BasicBlock, c[0], c[0], 1)
        self.layer2 = _layer(BasicBlock, c[0], c[1], 2)
        for p in range(1, PATCHES + 1):
            setattr(self, f"layer3_1_p{p}", _layer(AttentionBlock, c[1], c[2], 2, reduction=reduction))
            setattr(self, f"layer4_1_p{p}", _layer(AttentionBlock, c[2], c[3], 1, reduction=reduction))
        self.layer3_2 = _layer(MultiScaleBlock, c[1], c[2], 2)
        self.layer4_2 = _layer(MultiScaleBlock, c[2], c[3], 2)
        self.fc_1 = nn.Linear(c[3], num_classes)
        self.fc_2 = nn.Linear(c[3], num_classes)
        self.fc_va = nn.Linear(2 * c[3], 2) if av_head else None
        self.out_channels = c[3]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        self.heads = ("expression", "valence_arousal") if av_head else ("expression",)
        self.default_input = {"size": 224, "channels": in_chans}

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        return {"front": self.layer2(self.layer1(x))}

    def forward_head(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x = features["front"]
        h, w = x.shape[-2:]
        if h % 2 or w % 2:
            raise ValueError(f"MA-Net cuts its {h}x{w} map into four quadrants: the input side must be a multiple "
                             f"of 16 (224 is the paper's)")
        hh, hw = h // 2, w // 2
        quads = [x[..., :hh, :hw], x[..., :hh, hw:], x[..., hh:, :hw], x[..., hh:, hw:]]
        patches = [getattr(self, f"layer4_1_p{p + 1}")(getattr(self, f"layer3_1_p{p + 1}")(q))
                   for p, q in enumerate(quads)]
        local_map = torch.cat([torch.cat(patches[:2], 3), torch.cat(patches[2:], 3)], 2)
        feat_local = torch.flatten(F.adaptive_avg_pool2d(local_map, 1), 1)
        feat_global = torch.flatten(F.adaptive_avg_pool2d(self.layer4_2(self.layer3_2(x)), 1), 1)
        local, glob = self.fc_1(feat_local), self.fc_2(feat_global)
        out = {"logits": self.beta * local + (1.0 - self.beta) * glob, "logits_local": local, "logits_global": glob,
               "patches": torch.stack(patches, 1), "feat_local": feat_local, "feat_global": feat_global}
        if self.fc_va is not None:
            out["va"] = torch.tanh(self.fc_va(torch.cat([feat_local, feat_global], 1)))
        return out

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.forward_head(self.forward_features(x))


@register_model(cfg=ModelCfg(input={"size": 224, "channels": 3}, features=MANet.feature_names, av_only=False,
                             test_kwargs={"width": 0.0625, "reduction": 4}))
def manet(num_classes: int = 7, in_chans: int = 3, av_head: bool = False, beta: float = 0.6, width: float = 1.0,
          reduction: int = 16) -> MANet:
    """MA-Net: ResNet-18 front, local branch (4 quadrants, CBAM blocks) + global multi-scale branch, fused 0.6/0.4."""
    return MANet(num_classes, in_chans, av_head, beta, width, reduction)
