"""The inference network of cross-layer contrastive learning (Xie, Peng, Shen et al., "Cross-layer Contrastive
Learning of Latent Semantics for Facial Expression Recognition"; METHODS.md section 3): a ResNet-18 whose
classifier reads the multi-scale representation (MSR, eqs. 8-9) of its four blocks.

The contrastive modules of the paper (CLFM, CLBS, with their K-means) only shape the training: they live in
``trainers/methods/clcl.py`` and are not part of this network, so nothing here clusters, and nothing here
looks at another face of the batch (the official code's per-batch ``global_mean`` makes one face's
prediction depend on the others; here every operation is per sample, BatchNorm included in eval mode).

MSR, per block j = 1..4 with output ``f_j`` (C_j channels, side S_j):

    PS_r (pixel shuffle, r = 2^(j-1))  ->  Conv 3x3 stride 2 + BN + ReLU (to ``msr_channels``)
      ->  AP (global average)  ->  Flatten  ->  Conv1x1 (a linear map, to fd = ``msr_dim``)   = f'_j
    mu_j = sigmoid(w^T f'_j + b)     (eq. 8; one w shared by the blocks: the paper writes one W)
    F = sum_j mu_j f'_j              (eq. 9)   ->  linear classifier (eq. 11's T)

The pixel shuffle brings every block to the side of block 1 (56 px at 224 input, 48 px for a 48 px face
with the small stem) with C_j / r^2 channels (64, 32, 16, 8 at full width), so the block-wise convolutions
see maps of one size. "Conv" of eq. 8 is not specified beyond "convolution block"; ours is 3x3, stride 2
(the official code reduces to 128 channels with strided convolutions), BN, ReLU. ``mu`` is returned as
``"msr_weights"`` (N, 4) for inspection; inference ignores it.
"""
from __future__ import annotations

import torch
from torch import nn

from ._heads import OutputHeads
from ._registry import ModelCfg, register_model
from .resnet import FaceResNet

__all__ = ["MSR", "CLCLResNet"]


class MSR(nn.Module):
    """Eqs. 8-9 over the blocks' features: ``forward([f_1..f_L]) -> (F (N, dim), mu (N, L))``."""

    def __init__(self, block_channels: tuple[int, ...], dim: int = 128, channels: int = 128):
        super().__init__()
        self.factors = tuple(2 ** j for j in range(len(block_channels)))
        branches = []
        for j, (c, r) in enumerate(zip(block_channels, self.factors)):
            if c % (r * r):
                raise ValueError(
                    f"MSR: block {j + 1} has {c} channels, which its pixel shuffle by r = {r} cannot split into "
                    f"r^2 = {r * r} groups; choose a width whose blocks have channels divisible by 1, 4, 16, 64 "
                    "(e.g. 1, 0.5, 0.25, 0.125)")
            branches.append(nn.Sequential(
                nn.PixelShuffle(r) if r > 1 else nn.Identity(),
                nn.Conv2d(c // (r * r), channels, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(channels),
                nn.ReLU(inplace=True),
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(1),
                nn.Linear(channels, dim),          # Conv1x1 on the flattened 1x1 map
            ))
        self.branches = nn.ModuleList(branches)
        self.attention = nn.Linear(dim, 1)         # w, b of eq. 8 (shared by the blocks)
        self.dim = dim

    def forward(self, feats: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        f = torch.stack([b(x) for b, x in zip(self.branches, feats)], 1)      # (N, L, dim): f'_j
        mu = torch.sigmoid(self.attention(f)).squeeze(2)                     # (N, L)
        return (mu.unsqueeze(2) * f).sum(1), mu


class CLCLResNet(FaceResNet):
    """ResNet-18 trunk (:class:`FaceResNet`) + MSR + the output heads on the fused feature F."""

    def __init__(self, num_classes: int = 7, in_chans: int = 1, stem: str = "small", av_head: bool = False,
                 dropout: float = 0.0, width: float = 1.0, msr_dim: int = 128, msr_channels: int = 128):
        super().__init__(num_classes, in_chans, stem, av_head, dropout, pretrained=False, width=width)
        self.msr = MSR(self.block_channels, int(msr_dim), int(msr_channels))
        self.head = OutputHeads(self.msr.dim, num_classes, av_head, dropout)
        self.heads = self.head.heads
        self.feature_dim = self.msr.dim

    def forward_head(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        fused, mu = self.msr([features[n] for n in self.feature_names])
        out = self.head(fused)
        out["msr_weights"] = mu
        return out


@register_model(cfg=ModelCfg(input={"size": 48, "channels": 1}, features=FaceResNet.feature_names,
                             test_kwargs={"width": 0.125, "msr_dim": 16, "msr_channels": 8}))
def clcl_resnet18(
    num_classes: int = 7, in_chans: int = 1, stem: str = "small", av_head: bool = False, dropout: float = 0.0,
    width: float = 1.0, msr_dim: int = 128, msr_channels: int = 128,
) -> CLCLResNet:
    """ResNet-18 + multi-scale representation (cross-layer contrastive learning, eqs. 8-9; 11.4M params)."""
    return CLCLResNet(num_classes, in_chans, stem, av_head, dropout, width, msr_dim, msr_channels)
