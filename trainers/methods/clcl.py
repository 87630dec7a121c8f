"""Cross-layer contrastive learning of latent semantics (papers/cross_layer_contrastive.md; METHODS.md section 3):
a ResNet-18 whose shallow blocks are aligned with its deepest one (CLFM, CLBS) and whose classifier reads the
attention-weighted multi-scale feature of all four blocks (MSR), on the shared engine.

    python -m trainers.clcl --data ferplus --data-dir ../shared/data            # FERPlus (paper: 89.50 %)
    python -m trainers.clcl --data ferplus --no-clfm --no-clbs --no-msr         # its baseline (87.63 %)
    python -m trainers.clcl --data rafdb --init resnet18_imagenet.pth          # RAF-DB (92.21 %)
    python -m trainers.clcl --data sfew     |   --data affectnet (7 classes)    # 62.82 % / 65.29 %

One step, for a batch of N faces (eq. 10: CE + L_fm + L_bs):

- the trunk gives the block outputs f_1..f_4; the exported network (``ferengine.models.clcl``) fuses them by
  MSR (eqs. 8-9) into F, and the classifier's CE (eq. 11) is on F (on GAP(f_4) with ``--no-msr``);
- CLFM (eqs. 1-6): per block j, Conv 3x3 + BN -> average pool (3x3, stride 1) -> soft-argmax hash coding to
  ``--fd-fm`` = 16 numbers per channel (``trainers.losses.clcl.hash_codes``); per face, K-means with
  ``--k-fm`` = 4 over block 4's channel codes; each channel of block j joins its most cosine-similar centroid;
  L_fm = -sum_j alpha_j cos(vec(shallow centres), vec(deep centroids)), averaged over the faces;
- CLBS (eq. 7): per block j, Conv 3x3 + BN + ReLU to ``--cl-channels`` (GAP(512) of Fig. 2) -> GAP -> FC ->
  ReLU to ``--fd-bs`` = 128; one K-means over the batch's N block-4 vectors with ``--k-bs`` = the number of
  classes; L_bs = -sum_j beta_j cos(...);
- the best setting of Table V is the default: block 2 against block 4 only, ``--alpha 0 0.1 0 --beta 0 0.1 0``
  (alpha_1..3, beta_1..3).

Where we differ from the official code (ZhibinPeng/CCLLS), on purpose (METHODS.md's faults, each tested):

- (a) its hash coding takes each channel's top-2 positions: integers, no gradient, so its CLFM term never
  trains anything. Ours is a soft-argmax per region of a (rows x cols) grid of ``fd_fm / 2`` regions (the
  expected (y, x) of the peak under softmax(responses / ``--hash-temperature``)): the argmax's coordinates in
  the limit, and a gradient reaches the shallow blocks (tests/test_clcl.py checks it against finite
  differences on block-2 parameters).
- (b) its per-batch ``global_mean`` makes one face's prediction depend on the others of the batch: the
  exported network here is per sample (a face alone and inside a batch of 16 give the same output).
- (c) it runs K-means at evaluation: here clustering is training-only; the CL heads and K-means are not in
  the exported network (nor its ONNX graph); evaluation runs the exported network alone.

Choices the paper leaves open, and why (each is a flag):

- ``--hash-temperature 0.5``: the CLFM head ends in BN, so responses have about unit spread per channel; at
  T = 0.5 a response one standard deviation higher weighs e^2 = 7.4 times more, so the soft-argmax follows
  the peak rather than the centre of mass, while its gradient stays usable.
- deep side: the alignment loss has gradients into both blocks, as eqs. 6-7 are written (``--no-deep-grad``
  treats the deep centroids as fixed targets). K-means: farthest-point seeding, ``--kmeans-iters`` = 10 Lloyd
  steps, deterministic (nothing to save for resume).
- batch-level weighting of eq. 10: CE and L_fm are averaged over the batch (eq. 10 sums both over i, so their
  ratio is the paper's), and L_bs is added once per batch.
- optimiser: Adam lr 1e-3, weight decay 1e-4, exponential decay gamma 0.9 per epoch, 100 epochs (IV-A); batch
  256 (the official code; the paper gives none).
- input: 224 px, "resized to 256, randomly cropped to 224, erased and horizontally flipped": a zoom of
  256/224 with a random shift of up to 16/256 of the side, flip 0.5, random erasing (torchvision's defaults:
  p 0.5, area 0.02-0.33, filled with the normalised mean, i.e. mid grey here). FER+'s grey faces: the paper
  replicates them to 3 channels for its ImageNet RGB stem; replicating a grey face and convolving it with RGB
  filters equals convolving the grey face with the filters' channel sum, so the network keeps one input
  channel (the app then feeds it grey faces, as it was trained) and ``--init`` folds RGB stem filters into one
  (by their mean: the scale is immaterial to the BN that follows in training).
- ImageNet pre-training (the paper's starting point) cannot be downloaded here: the default is from scratch,
  ``--init FILE`` takes a torchvision/timm ResNet-18 state_dict (safetensors or weights-only .pt) or a
  resnet18 checkpoint of ours, and the run's log and model card say which it was.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ferengine.preprocess import InputSpec

from ..augment import AUGMENT_PRESETS, AugmentConfig, BatchAugment, with_overrides
from ..engine import Batch, DataInfo, Method, TrainError, opt
from ..losses.ce import classification_loss
from ..losses.clcl import clbs_loss, clfm_loss, hash_codes, hash_grid
from ..modules.resnet import ResNetOptions, build_resnet, resnet_input_spec
from . import register_method

log = logging.getLogger("trainers.clcl")

__all__ = ["CLCL", "CLCLNet", "CLFMHead", "CLBSHead", "paper_augment"]



def paper_augment(source_size: int) -> AugmentConfig:
    """IV-A's augmentation on a ``source_size`` face: resize to 256 + random crop 224 (zoom 8/7, shift of up to
    16/256 of the side), horizontal flip, random erasing with torchvision's defaults (fill: mid grey, the
    mean that its erasing after normalisation fills with)."""
    return AugmentConfig(translate=float(round(16 / 256 * source_size)), hflip=0.5, scale=(256 / 224, 256 / 224),
                         erase=0.5, erase_area=(0.02, 0.33), erase_ratio=(0.3, 3.3), erase_value=0.5)


class CLFMHead(nn.Module):
    """Eq. 1 for one block: Conv 3x3 + BN -> AP 3x3 (stride 1) -> soft-argmax hash codes (N, C, fd)."""

    def __init__(self, channels: int, fd: int, temperature: float):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels))
        self.pool = nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)
        self.fd, self.temperature = int(fd), float(temperature)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return hash_codes(self.pool(self.conv(f)), self.fd, self.temperature)


class CLBSHead(nn.Module):
    """Fig. 2's CLBS branch for one block: Conv 3x3 + BN + ReLU -> GAP -> FC -> ReLU, (N, fd)."""

    def __init__(self, channels: int, hidden: int, fd: int):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(channels, hidden, 3, padding=1, bias=False), nn.BatchNorm2d(hidden),
                                 nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(hidden, fd),
                                 nn.ReLU(inplace=True))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.net(f)


class CLCLNet(nn.Module):
    """The training network: ``net`` (exported: trunk + MSR + classifier) and the training-only CL heads,
    keyed by block number (1..4; 4 is the deep side)."""

    def __init__(self, net: nn.Module, clfm: dict[int, nn.Module], clbs: dict[int, nn.Module]):
        super().__init__()
        self.net = net
        self.clfm = nn.ModuleDict({str(j): m for j, m in clfm.items()})
        self.clbs = nn.ModuleDict({str(j): m for j, m in clbs.items()})

    def forward(self, x: torch.Tensor) -> dict[str, Any]:
        feats = self.net.forward_features(x)
        out = self.net.forward_head(feats)
        f = [feats[b] for b in self.net.feature_names]
        out["clfm"] = {int(j): m(f[int(j) - 1]) for j, m in self.clfm.items()}
        out["clbs"] = {int(j): m(f[int(j) - 1]) for j, m in self.clbs.items()}
        return out


def _block_weights(values: tuple[float, ...], flag: str) -> dict[int, float]:
    if len(values) != 3:
        raise TrainError(f"{flag} takes 3 numbers, the weights of blocks 1, 2 and 3 against block 4 (e.g. 0 0.1 0), "
                         f"got {len(values)}")
    return {j + 1: float(v) for j, v in enumerate(values) if float(v) != 0.0}


@register_method
class CLCL(Method):
    """Cross-layer contrastive learning: ResNet-18 + CLFM + CLBS (shallow-deep alignment) + MSR (multi-scale)."""

    name = "clcl"
    paper = ("Xie, Peng, Shen, Lu, Zhang, Song, Cross-layer Contrastive Learning of Latent Semantics for Facial "
             "Expression Recognition (papers/cross_layer_contrastive.md)")
    datasets = ("ferplus", "rafdb", "sfew", "affectnet")
    test_args = ("--width", "0.125", "--input-size", "32", "--fd-bs", "16", "--msr-dim", "16", "--cl-channels", "16",
                 "--msr-channels", "8", "--kmeans-iters", "3")
    unused_parameters = True   # --no-deep-grad leaves block 4's CL heads without gradient; a 1-face batch, CLBS

    @dataclass
    class Config(ResNetOptions):                      # --width, --stem, --init: trainers.modules.resnet
        clfm: bool = opt(True, help="CLFM, the feature-map contrast (eqs. 1-6); --no-clfm for Table IV")
        clbs: bool = opt(True, help="CLBS, the batch-sample contrast (eq. 7); --no-clbs for Table IV")
        msr: bool = opt(True, help="MSR, the multi-scale representation (eqs. 8-9); --no-msr: the classifier on "
                                   "GAP(block 4), a plain resnet18")
        alpha: tuple[float, float, float] = opt((0.0, 0.1, 0.0), hi=100.0, metavar="A",
                                                help="CLFM weights alpha_1..3 of blocks 1-3 against block 4 (Table V)")
        beta: tuple[float, float, float] = opt((0.0, 0.1, 0.0), hi=100.0, metavar="B",
                                               help="CLBS weights beta_1..3 of blocks 1-3 against block 4 (Table V)")
        k_fm: int = opt(4, lo=1, hi=4096, help="K_FM: clusters of block 4's channel codes per face (eq. 2)")
        k_bs: int | None = opt(None, lo=1, hi=4096, help="K_BS: clusters of the batch's faces (none given: the number "
                                                         "of classes)")
        fd_fm: int = opt(16, lo=2, hi=1024, help="fd_fm: hash code numbers per channel, a (y, x) pair per region")
        fd_bs: int = opt(128, lo=1, hi=65536, help="fd_bs: CLBS vector size")
        msr_dim: int = opt(128, lo=1, hi=65536, help="fd of eq. 8: MSR feature size")
        msr_channels: int | None = opt(None, lo=1, hi=65536,
                                       help="channels of MSR's conv per block (none given: 128 x --width)")
        cl_channels: int | None = opt(None, lo=1, hi=65536,
                                      help="channels of the CLBS conv before GAP (none given: 512 x --width, Fig. 2's "
                                           "GAP(512) scaled with the trunk)")
        hash_temperature: float = opt(0.5, lo=0.0, lo_open=True, hi=100.0,
                                      help="softmax temperature of the soft-argmax hash coding")
        kmeans_iters: int = opt(10, lo=0, hi=1000, help="Lloyd iterations of every K-means")
        deep_grad: bool = opt(True, help="the alignment losses also train block 4 (eqs. 6-7 as written); "
                                         "--no-deep-grad: deep centroids are fixed targets")

    # IV-A: Adam 1e-3, weight decay 1e-4, exponential decay 0.9, 100 epochs, 224 px; batch 256 (official code)
    defaults = dict(
        epochs=100, batch_size=256, optimizer="adam", lr=1e-3, weight_decay=1e-4, scheduler="exponential",
        gamma=0.9, schedule_interval="epoch", warmup_epochs=0.0, label_smoothing=0.0, input_size=224,
        augment="paper", best_metric="accuracy",
    )
    table = {
        "ferplus": dict(out="runs/clcl_ferplus"),
        "rafdb": dict(out="runs/clcl_rafdb"),
        "sfew": dict(out="runs/clcl_sfew"),
        "affectnet": dict(out="runs/clcl_affectnet", data_opts={"classes": 7}),
    }

    def __init__(self, cfg: Any):
        super().__init__(cfg)
        o = self.opts
        try:
            hash_grid(int(o.fd_fm))
        except ValueError as exc:
            raise TrainError(f"--fd-fm: {exc}") from None
        self.alpha = _block_weights(tuple(o.alpha), "--alpha") if o.clfm else {}
        self.beta = _block_weights(tuple(o.beta), "--beta") if o.clbs else {}
        if o.clfm and not self.alpha:
            log.warning("CLFM is on but every --alpha is 0: no CLFM term")
        if o.clbs and not self.beta:
            log.warning("CLBS is on but every --beta is 0: no CLBS term")
        if cfg.augment != "paper" and cfg.augment not in AUGMENT_PRESETS:
            raise TrainError(f"clcl: --augment {cfg.augment!r}: expected paper (section IV-A's) or one of "
                             f"{sorted(AUGMENT_PRESETS)}")
        self.init_report = None

    # ------------------------------------------------------------------ building
    def build_model(self, data: DataInfo) -> nn.Module:
        o = self.opts
        width = float(o.width) if o.width is not None else 1.0
        arch = "clcl_resnet18" if o.msr else "resnet18"
        extra = {"msr_dim": int(o.msr_dim), "msr_channels": int(o.msr_channels or max(1, round(128 * width)))} \
            if o.msr else {}
        net, kwargs, self.init_report = build_resnet(arch, o, self.cfg, data, log, **extra)
        if not o.init:
            log.warning("CLCL: no pre-training: the paper starts from ImageNet weights, which cannot be downloaded "
                        "here; give a ResNet-18 file with --init FILE. Training from scratch.")
        self.arch, self.arch_kwargs = arch, kwargs
        chans = net.block_channels
        clfm: dict[int, nn.Module] = {}
        clbs: dict[int, nn.Module] = {}
        if self.alpha:
            for j in (*self.alpha, 4):
                clfm[j] = CLFMHead(chans[j - 1], int(o.fd_fm), float(o.hash_temperature))
        if self.beta:
            hidden = int(o.cl_channels) if o.cl_channels else max(1, int(round(512 * width)))
            for j in (*self.beta, 4):
                clbs[j] = CLBSHead(chans[j - 1], hidden, int(o.fd_bs))
        self.k_bs = int(o.k_bs) if o.k_bs else data.num_classes
        return CLCLNet(net, clfm, clbs)

    def export_model(self) -> nn.Module:
        return self.trainer.model.net

    def input_spec(self, model: nn.Module, data: DataInfo) -> InputSpec:
        return resnet_input_spec(model.net, self.cfg)

    def build_augment(self) -> list[BatchAugment]:
        if self.cfg.augment != "paper":
            return super().build_augment()
        try:
            return [BatchAugment(with_overrides(paper_augment(int(self.trainer.data.image_size)), self.cfg.aug))]
        except ValueError as exc:
            raise TrainError(f"--aug: {exc}") from None

    def setup(self) -> None:
        o = self.opts
        m = self.model
        n_cl = sum(p.numel() for p in [*m.clfm.parameters(), *m.clbs.parameters()])
        n_net = sum(p.numel() for p in m.net.parameters())
        parts = [f"CLFM {self.alpha or 'off'}", f"CLBS {self.beta or 'off'}", f"MSR {'on' if o.msr else 'off'}"]
        if self.alpha:
            parts.append(f"K_FM {o.k_fm}, fd_fm {o.fd_fm} (hash grid {'x'.join(map(str, hash_grid(int(o.fd_fm))))}, "
                         f"T {o.hash_temperature:g})")
        if self.beta:
            parts.append(f"K_BS {self.k_bs}, fd_bs {o.fd_bs}")
        if self.alpha or self.beta:
            parts.append(f"deep grad {'on' if o.deep_grad else 'off'}, K-means {o.kmeans_iters} iterations")
        log.info("CLCL: %s; exported %s %.2fM params, training-only CL heads %.2fM", "; ".join(parts), self.arch,
                 n_net / 1e6, n_cl / 1e6)

    # ------------------------------------------------------------------ loop
    def training_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        o = self.opts
        out = self.model(batch.input)
        # FER+'s majority labels (the paper's protocol); with --data-opt mode=distribution, its vote distribution
        ce = classification_loss(out["logits"], batch.label, batch.soft, self.cfg.label_smoothing)
        loss = ce
        logs: dict[str, torch.Tensor] = {"ce": ce.detach()}
        if self.alpha:
            codes = out["clfm"]
            fm, cos = clfm_loss({j: codes[j] for j in self.alpha}, codes[4], self.alpha, k=int(o.k_fm),
                                iters=int(o.kmeans_iters), deep_grad=bool(o.deep_grad))
            loss = loss + fm
            logs["fm"] = fm.detach()
            logs.update({f"cos_fm{j}": c for j, c in cos.items()})
        if self.beta:
            vecs = out["clbs"]
            if vecs[4].shape[0] >= 2:
                bs, cos = clbs_loss({j: vecs[j] for j in self.beta}, vecs[4], self.beta, k=self.k_bs,
                                    iters=int(o.kmeans_iters), deep_grad=bool(o.deep_grad))
                loss = loss + bs
                logs["bs"] = bs.detach()
                logs.update({f"cos_bs{j}": c for j, c in cos.items()})
        if "msr_weights" in out:
            mu = out["msr_weights"].detach().float().mean(0)
            logs.update({f"mu{j + 1}": mu[j] for j in range(mu.shape[0])})
        logs["loss"] = loss
        return logs

    # ------------------------------------------------------------------ notes
    def training_notes(self) -> list[str]:
        o = self.opts
        parts = [f"CLFM {'alpha ' + str(self.alpha) if self.alpha else 'off'}",
                 f"CLBS {'beta ' + str(self.beta) if self.beta else 'off'}", f"MSR {'on' if o.msr else 'off'}"]
        notes = ["cross-layer contrastive learning: " + ", ".join(parts)]
        if self.init_report is not None:
            notes.append("trunk initialised from " + self.init_report.summary())
        else:
            notes.append("no pre-training: the paper starts from an ImageNet ResNet-18 (not available here); this "
                         "model was trained from scratch")
        return notes
