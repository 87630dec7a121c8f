"""DAF-CNN (Zhou, Fan, Tjahjadi, Das Choudhury, "Discriminative Attention-augmented Feature Learning for
Facial Expression Recognition in the Wild"): a VGG-style backbone, a 3D (channel then spatial) attention
module and a two-FC classifier whose first FC output is the embedding the triplet-centre loss acts on
(the loss itself is training code: ``trainers/losses/tc.py``).

What the paper states, and what we chose where it does not (section numbers are the paper's):

- Input: 96x96 grey, "normalized to [0,1] by dividing each pixel grey level by 255" (4.2), so
  ``default_input`` carries mean 0, std 1 (the checkpoint's InputSpec then scales to [0,1] exactly).
- Backbone (3.1): five VGG-style blocks of 3, 3, 4, 4, 4 convolutions, "each followed by a batch
  normalization (BN) layer". Not stated, our choice: 3x3 convolutions (VGG), ReLU after each BN, and
  VGG-19's widths 64-128-256-512-512 (``width`` scales them); 2x2 max-pooling *between* blocks (four
  pools: a 96 px face leaves a 6x6x512 map for the attention, which the 7x7 spatial kernel can cover;
  a fifth pool would leave 3x3).
- 3D attention (3.2, eqs. 1-5): channel attention ``A_c = sigmoid(Net(avgpool x) + Net(maxpool x))`` with
  ``Net = FC_2(FC_1(.))`` shared, FC_1 reducing C to C/r (r = 8), then spatial attention
  ``A_s = sigmoid(conv7x7([mean_c M'; max_c M']))``; ``M' = A_c(x) * x``, ``M = A_s(M') * M'`` (channel
  first: "instructing the network what and where to focus in order"). Eq. 2 writes no activation between
  FC_1 and FC_2; we put a ReLU there as in CBAM [16], whose module this is (without one the two layers
  collapse to one linear map): ``attention_mlp_act="none"`` is the literal reading. The paper
  concatenates the two maps "along the width dimension"; a 7x7 conv producing a WxH mask needs them as
  two channels, which is what we do. No BN after the 7x7 conv (eq. 3 has none).
- Classifier (3.1, 4.2): "two fully connected (FC) layers", "a dropout rate of 0.5 is employed for the
  last two FC layers". Not stated, our choices: the refined 512x6x6 map is flattened (``head_pool=
  "flatten"``, VGG-style; ``"avg"`` = global average pooling instead), dropout 0.5 before each FC,
  FC_1 -> ReLU gives the ``embedding_dim`` (default 512) embedding fed to the TC loss, FC_2 gives the
  logits. ``embedding_relu=False`` takes FC_1's output before the ReLU as the embedding instead.
  With ``head_pool="flatten"`` the first FC's size depends on ``input_size`` (a constructor argument,
  stored in the checkpoint).

``attention=False`` builds the paper's "NOatt" ablation (no attention module at all).
Output: ``{"embedding": (N, embedding_dim), "logits": (N, num_classes)[, "va": (N, 2)]}``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._heads import OutputHeads
from ._registry import ModelCfg, register_model

BLOCK_DEPTHS = (3, 3, 4, 4, 4)
BLOCK_WIDTHS = (64, 128, 256, 512, 512)


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class ChannelAttention(nn.Module):
    """Eqs. 1-2: ``A_c(x) = sigmoid(Net(avg(x)) + Net(max(x)))``, shape ``(N, C, 1, 1)``."""

    def __init__(self, channels: int, reduction: int = 8, act: str = "relu"):
        super().__init__()
        if act not in ("relu", "none"):
            raise ValueError(f"attention_mlp_act must be 'relu' or 'none', got {act!r}")
        hidden = max(1, channels // reduction)
        self.fc1 = nn.Linear(channels, hidden)
        self.act = nn.ReLU(inplace=False) if act == "relu" else nn.Identity()
        self.fc2 = nn.Linear(hidden, channels)

    def net(self, v: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(v)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.net(x.mean(dim=(2, 3))) + self.net(x.amax(dim=(2, 3)))
        return torch.sigmoid(a)[:, :, None, None]


class SpatialAttention(nn.Module):
    """Eq. 3: ``A_s(x) = sigmoid(conv_k([mean_c(x); max_c(x)]))``, shape ``(N, 1, H, W)``."""

    def __init__(self, kernel_size: int = 7):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.conv(m))


class Attention3D(nn.Module):
    """Eqs. 4-5: ``M' = A_c(x) * x``, then ``M = A_s(M') * M'``."""

    def __init__(self, channels: int, reduction: int = 8, kernel_size: int = 7, mlp_act: str = "relu"):
        super().__init__()
        self.channel = ChannelAttention(channels, reduction, mlp_act)
        self.spatial = SpatialAttention(kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m1 = self.channel(x) * x
        return self.spatial(m1) * m1


class DAFCNN(nn.Module):
    """VGG-style 5-block backbone -> 3D attention -> FC_1 (embedding) -> FC_2 (logits). See the module
    docstring for what comes from the paper and what was chosen."""

    def __init__(
        self,
        num_classes: int = 7,
        in_chans: int = 1,
        attention: bool = True,
        embedding_dim: int = 512,
        dropout: float = 0.5,
        av_head: bool = False,
        width: float = 1.0,
        input_size: int = 96,
        reduction: int = 8,
        spatial_kernel: int = 7,
        attention_mlp_act: str = "relu",
        head_pool: str = "flatten",
        embedding_relu: bool = True,
    ):
        super().__init__()
        if head_pool not in ("flatten", "avg"):
            raise ValueError(f"head_pool must be 'flatten' or 'avg', got {head_pool!r}")
        chans = [max(8, int(round(c * width))) for c in BLOCK_WIDTHS]
        pools = len(BLOCK_DEPTHS) - 1
        side = int(input_size) >> pools
        if head_pool == "flatten" and side < 1:
            raise ValueError(f"input_size {input_size} is too small for {pools} 2x2 pools (needs >= {2 ** pools})")
        self.blocks = nn.ModuleList()
        cin = in_chans
        for i, (depth, c) in enumerate(zip(BLOCK_DEPTHS, chans)):
            layers: list[nn.Module] = []
            for j in range(depth):
                layers += _conv_bn_relu(cin if j == 0 else c, c)
            if i < pools:  # pooling between blocks
                layers.append(nn.MaxPool2d(2))
            self.blocks.append(nn.Sequential(*layers))
            cin = c
        self.attention = Attention3D(cin, reduction, spatial_kernel, attention_mlp_act) if attention else nn.Identity()
        self.head_pool = head_pool
        flat = cin * side * side if head_pool == "flatten" else cin
        self.fc1 = nn.Sequential(nn.Dropout(dropout) if dropout > 0 else nn.Identity(), nn.Linear(flat, embedding_dim))
        self.embedding_relu = bool(embedding_relu)
        self.head = OutputHeads(embedding_dim, num_classes, av_head, dropout)
        self.heads = self.head.heads
        self.feature_dim = embedding_dim
        self.default_input = {"size": int(input_size), "channels": in_chans, "mean": (0.0,), "std": (1.0,)}

    feature_names = ("block1", "block2", "block3", "block4", "block5")

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The five backbone blocks (blocks 1-4 after their max-pool), then the attention: its channel map
        ``attention_channel`` (N, C, 1, 1) and spatial map ``attention_spatial`` (N, 1, H, W) (absent with
        ``attention=False``) and the refined map ``refined`` (eq. 5's M) the classifier reads."""
        feats: dict[str, torch.Tensor] = {}
        for name, block in zip(self.feature_names, self.blocks):
            x = block(x)
            feats[name] = x
        if isinstance(self.attention, Attention3D):
            ac = self.attention.channel(x)
            m1 = ac * x
            as_ = self.attention.spatial(m1)
            feats["attention_channel"], feats["attention_spatial"] = ac, as_
            feats["refined"] = as_ * m1
        else:
            feats["refined"] = x
        return feats

    def forward_head(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        m = features["refined"]
        v = torch.flatten(m, 1) if self.head_pool == "flatten" else m.mean(dim=(2, 3))
        z = self.fc1(v)
        h = F.relu(z)
        out = self.head(h)  # {"embedding": h, "logits", ["va"]}: dropout -> FC_2
        if not self.embedding_relu:
            out["embedding"] = z
        return out

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.forward_head(self.forward_features(x))


@register_model(cfg=ModelCfg(input={"size": 96, "channels": 1},
                             test_kwargs={"width": 0.125, "input_size": 32, "embedding_dim": 16},
                             features=DAFCNN.feature_names + ("attention_channel", "attention_spatial", "refined")))
def daf_cnn(
    num_classes: int = 7,
    in_chans: int = 1,
    attention: bool = True,
    embedding_dim: int = 512,
    dropout: float = 0.5,
    av_head: bool = False,
    width: float = 1.0,
    input_size: int = 96,
    reduction: int = 8,
    spatial_kernel: int = 7,
    attention_mlp_act: str = "relu",
    head_pool: str = "flatten",
    embedding_relu: bool = True,
) -> DAFCNN:
    """DAF-CNN: VGG-style 5 blocks (3,3,4,4,4 conv-BN-ReLU) + channel/spatial attention + 2 FC, 96 px grey."""
    return DAFCNN(num_classes, in_chans, attention, embedding_dim, dropout, av_head, width, input_size, reduction,
                  spatial_kernel, attention_mlp_act, head_pool, embedding_relu)
