"""ESR, the ensemble with shared representations (Siqueira, Magg & Wermter, AAAI 2020), and its diversified
version with CBAM in every branch layer (papers/diversified_features.md; METHODS.md section 5).

- Base (shared): conv 3->64 k5, 64->128 k3 + max-pool, 128->128 k3, 128->128 k3 + max-pool, each with BN + ReLU
  (no padding, as upstream ESR: a 96 px face gives a 20 x 20 map).
- Branch (x B): conv 128->128 k3, 128->256 k3 + max-pool, 256->256 k3, 256->512 k3 (padding 1), each with BN +
  ReLU and, in the diversified version (``cbam=True``), CBAM (reduction 16) after it; global average pool;
  fc 512 -> classes; and upstream ESR's fc classes -> 2 on the ReLU of the class scores for arousal/valence
  (``av_head``; the diversified fork dropped it), squashed to [-1, 1] by tanh.
- The ensemble: ``"probs"`` is the majority vote (``vote="majority"``, the paper's: the fraction of branches
  voting for each class, so the arg-max is the majority's class, ties to the lower class index) or the mean of
  the branches' softmax (``vote="mean"``); ``"va"`` is the mean of the branches' AV. ``"branch_logits"``,
  ``"branch_va"`` and the last layer's CBAM maps (``"channel_attention"`` (N, B, 512), ``"spatial_attention"``
  (N, B, 36) at 96 px) are for training.

Branches are added during training (:meth:`ESR.add_branch`); a checkpoint records their number.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._registry import ModelCfg, register_model

__all__ = ["CBAM", "ESR", "ESRBranch", "ESRBase", "VOTES"]

VOTES = ("majority", "mean")


class CBAM(nn.Module):
    """Convolutional block attention (Woo et al., ECCV 2018): channel attention (a shared MLP with reduction
    ``reduction`` on the average- and max-pooled map, sigmoid of their sum) then spatial attention (a 7x7 conv on
    the channel mean and max, sigmoid). ``forward`` returns the refined map and both attention maps."""

    def __init__(self, channels: int, reduction: int = 16, kernel: int = 7):
        super().__init__()
        hidden = max(1, channels // int(reduction))
        self.mlp = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, channels, 1))
        self.spatial = nn.Conv2d(2, 1, kernel, padding=kernel // 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mc = torch.sigmoid(self.mlp(x.mean((2, 3), keepdim=True)) + self.mlp(x.amax((2, 3), keepdim=True)))
        x = x * mc
        ms = torch.sigmoid(self.spatial(torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], 1)))
        return x * ms, mc, ms


def _conv_bn(cin: int, cout: int, k: int, pad: int = 0) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=pad), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ESRBase(nn.Module):
    def __init__(self, in_chans: int = 3, width: float = 1.0):
        super().__init__()
        c1, c2 = max(1, round(64 * width)), max(1, round(128 * width))
        self.layers = nn.Sequential(_conv_bn(in_chans, c1, 5), _conv_bn(c1, c2, 3), nn.MaxPool2d(2, 2),
                                    _conv_bn(c2, c2, 3), _conv_bn(c2, c2, 3), nn.MaxPool2d(2, 2))
        self.out_channels = c2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class ESRBranch(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, av_head: bool, cbam: bool, width: float = 1.0,
                 reduction: int = 16):
        super().__init__()
        c = [max(1, round(k * width)) for k in (128, 256, 256, 512)]
        self.convs = nn.ModuleList([_conv_bn(in_channels, c[0], 3), _conv_bn(c[0], c[1], 3), _conv_bn(c[1], c[2], 3),
                                    _conv_bn(c[2], c[3], 3, pad=1)])
        self.cbams = nn.ModuleList([CBAM(k, reduction) for k in c]) if cbam else None
        self.pool = nn.MaxPool2d(2, 2)
        self.fc = nn.Linear(c[3], num_classes)
        self.fc_dimensional = nn.Linear(num_classes, 2) if av_head else None
        self.out_channels = c[3]

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        mc = ms = None
        for i, conv in enumerate(self.convs):
            x = conv(x)
            if self.cbams is not None:
                x, mc, ms = self.cbams[i](x)
            if i == 1:
                x = self.pool(x)
        logits = self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
        out = {"logits": logits}
        if self.fc_dimensional is not None:
            out["va"] = torch.tanh(self.fc_dimensional(F.relu(logits)))
        if mc is not None:
            out["channel_attention"], out["spatial_attention"] = mc.flatten(1), ms.flatten(1)
        return out


class ESR(nn.Module):
    """Base + ``branches`` branches; see the module doc."""

    feature_names = ("base",)

    def __init__(self, num_classes: int = 8, in_chans: int = 3, av_head: bool = False, branches: int = 9,
                 cbam: bool = True, vote: str = "majority", width: float = 1.0, reduction: int = 16):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"ESR needs num_classes >= 1, got {num_classes}")
        if int(branches) < 1:
            raise ValueError(f"branches must be >= 1, got {branches}")
        if vote not in VOTES:
            raise ValueError(f"vote must be one of {VOTES}, got {vote!r}")
        if not 0 < float(width) <= 8:
            raise ValueError(f"width must be in (0, 8], got {width!r}")
        self.num_classes, self.av_head, self.cbam, self.vote = int(num_classes), bool(av_head), bool(cbam), vote
        self.width, self.reduction = float(width), int(reduction)
        self.base = ESRBase(in_chans, width)
        self.branches = nn.ModuleList()
        for _ in range(int(branches)):
            self.add_branch()
        self.heads = ("expression", "valence_arousal") if av_head else ("expression",)
        self.default_input = {"size": 96, "channels": in_chans}

    def add_branch(self) -> ESRBranch:
        """A new branch (ESR's training adds them one by one); returns it."""
        b = ESRBranch(self.base.out_channels, self.num_classes, self.av_head, self.cbam, self.width, self.reduction)
        if len(self.branches):
            b.to(next(self.branches[0].parameters()).device)
        self.branches.append(b)
        return b

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"base": self.base(x)}

    def forward_head(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        outs = [b(features["base"]) for b in self.branches]
        logits = torch.stack([o["logits"] for o in outs], 1)                   # (N, B, K)
        if self.vote == "mean":
            probs = torch.softmax(logits.float(), -1).mean(1)
        else:  # majority vote: each branch's arg-max, counted (ties: the lower class index)
            votes = F.one_hot(logits.argmax(-1), self.num_classes).to(torch.float32)
            probs = votes.mean(1)
        out = {"probs": probs, "branch_logits": logits}
        if self.av_head:
            bva = torch.stack([o["va"] for o in outs], 1)
            out["branch_va"], out["va"] = bva, bva.mean(1)
        if self.cbam:
            out["channel_attention"] = torch.stack([o["channel_attention"] for o in outs], 1)
            out["spatial_attention"] = torch.stack([o["spatial_attention"] for o in outs], 1)
        return out

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.forward_head(self.forward_features(x))


# the every-model tests run the mean vote (differentiable: they check that every parameter reaches the outputs);
# tests/test_esr.py checks the majority vote
@register_model(cfg=ModelCfg(input={"size": 96, "channels": 3}, features=ESR.feature_names, av_only=False,
                             test_kwargs={"branches": 3, "width": 0.125, "vote": "mean", "reduction": 4}))
def esr(num_classes: int = 8, in_chans: int = 3, av_head: bool = False, branches: int = 9, cbam: bool = True,
        vote: str = "majority", width: float = 1.0, reduction: int = 16) -> ESR:
    """ESR ensemble (shared base + B branches, CBAM in each branch layer: the diversified ESR; majority vote)."""
    return ESR(num_classes, in_chans, av_head, branches, cbam, vote, width, reduction)
