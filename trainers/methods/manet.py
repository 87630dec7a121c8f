"""MA-Net (Zhao, Liu & Wang, IEEE TIP 2021) with the diversified features of papers/diversified_features.md
(eq. 5; METHODS.md section 5), on the shared engine.

    python -m trainers.manet --data rafdb                       # the paper's MA-Net* (lambda 0.6, diversity)
    python -m trainers.manet --data rafdb --no-diversity        # MA-Net as published (the baseline)
    python -m trainers.manet --data ferplus --init FILE         # from a checkpoint or a ResNet-18 state_dict
    python -m trainers.manet --data ferplus --width 0.25 --input-size 112 --epochs 10    # a CPU study

The network is ``ferengine.models.manet`` (50.55 M parameters at the paper's width): a ResNet-18 front to
28 x 28, a local branch of four quadrant attention branches and a global multi-scale branch; its output is
0.6 x local + 0.4 x global scores. The loss (eq. 5)::

    lambda CE(local) + (1 - lambda) CE(global) - (D_b + D_sp + D_ch),     lambda = 0.6

D_sp and D_ch are the determinant diversities (``trainers.losses.diversity``, eq. 1 with the diagonal 1,
gamma 10) of the four quadrants' layer4 maps pooled over channels (7 x 7) and over space (512); D_b is that of
the two branches' pooled features (512 each). SGD lr 0.01, momentum 0.9, weight decay 1e-4, batch 128,
StepLR(15, 0.1), 100 epochs (the official MA-Net training); the best checkpoint by validation accuracy.
``--diversity`` picks the terms (``branch channel spatial``; ``--no-diversity``: none, MA-Net as published).

Pre-training: the paper fine-tunes MA-Net pre-trained on MS-Celeb-1M (the authors' file), which cannot be
downloaded here. ``--init FILE`` starts from a file the user has: one of our MA-Net checkpoints (all weights;
the classifiers too when the classes match), or a ResNet-18 ``state_dict`` (torchvision/timm names, e.g. a
face-recognition ResNet-18): its stem, layer1 and layer2 go to the front, and its layer3/layer4 convolutions and
BNs to each of the four local branches (an attention block is a basic block plus CBAM); the multi-scale global
branch, the CBAMs and the classifiers start fresh. Without ``--init`` the network trains from scratch, and the
model card says so.

Augmentation: the official MA-Net code trains with RandomResizedCrop(224) and a flip; this engine has no
random-resized crop, so ``--augment paper`` is a flip, a zoom of 1-1.25 and a shift of up to 10 % (and, on FER+,
the diversified fork's FER+ script's: ColorJitter 0.5/0.5, flip, RandomAffine(30 deg, 0.1, 1-1.25)).

Where the diversified fork (negarhdr/Diversified-Facial-Expression-Recognition) differs and we do not copy it:
its similarity matrices leave the diagonal at 0 (``det`` then rewards alike learners for 3+ of them: the four
patches here); ours is eq. 1's, exp(0) = 1 (tests/test_diversity.py, tests/test_manet.py).
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ferengine.models import create_model
from ferengine.models.manet import MANet

from ..augment import AUGMENT_PRESETS, AugmentConfig, BatchAugment, with_overrides
from ..engine import Batch, DataInfo, Method, TrainError, opt
from ..losses.ce import va_loss
from ..losses.diversity import diversity, pool
from . import register_method
from .esr import PAPER_AUGMENT as FORK_FERPLUS_AUGMENT

log = logging.getLogger("trainers.manet")

__all__ = ["MANetMethod", "manet_loss", "PAPER_AUGMENT", "DIVERSITY"]

PAPER_AUGMENT = AugmentConfig(hflip=0.5, scale=(1.0, 1.25), affine_translate=0.1, affine_p=1.0)
DIVERSITY = ("branch", "channel", "spatial")


def manet_loss(out: dict[str, torch.Tensor], label: torch.Tensor, va: torch.Tensor | None, *, lam: float,
               gamma: float, kinds: tuple[str, ...], va_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """Eq. 5 on a MA-Net forward ``out``: lam CE_local + (1 - lam) CE_global - (D_b + D_sp + D_ch) (the terms
    in ``kinds``), + ``va_weight`` x AV MSE when the data and the model have valence/arousal."""
    valid = label >= 0
    zero = torch.zeros((), device=out["logits"].device)
    ce_l = F.cross_entropy(out["logits_local"].float()[valid], label[valid]) if bool(valid.any()) else zero
    ce_g = F.cross_entropy(out["logits_global"].float()[valid], label[valid]) if bool(valid.any()) else zero
    loss = float(lam) * ce_l + (1.0 - float(lam)) * ce_g
    logs = {"ce_local": ce_l.detach(), "ce_global": ce_g.detach()}
    patches = out["patches"]
    for k in kinds:
        if k == "branch":
            d = diversity([out["feat_local"], out["feat_global"]], gamma)
        else:
            d = diversity([pool(patches[:, p], k) for p in range(patches.shape[1])], gamma)
        logs[f"d_{k}"] = d.detach()
        loss = loss - d
    if va is not None and "va" in out:
        mse = va_loss(out["va"], va)
        logs["va_mse"] = mse.detach()
        loss = loss + float(va_weight) * mse
    logs["loss"] = loss
    return logs


@register_method
class MANetMethod(Method):
    """MA-Net (local attention + global multi-scale branches) with patch and branch diversity (eq. 5)."""

    name = "manet"
    paper = ("Zhao, Liu & Wang, Learning Deep Global Multi-Scale and Local Attention Features for FER in the Wild, "
             "IEEE TIP 2021; diversified: papers/diversified_features.md (eq. 5)")
    datasets = ("rafdb", "ferplus", "affectnet", "fer2013", "sfew", "folder")
    test_args = ("--width", "0.0625", "--reduction", "4", "--input-size", "64", "--batch-size", "16", "--lr", "0.05")

    @dataclass
    class Config:
        lam: float = opt(0.6, hi=1.0, help="lambda of eq. 5 (local vs global CE); also the output fusion weight")
        diversity: tuple[str, ...] = opt(DIVERSITY, help="diversity terms subtracted: branch (D_b), channel (D_ch), "
                                                         "spatial (D_sp) (all three: the paper's MA-Net*)")
        div_gamma: float = opt(10.0, lo=0.0, lo_open=True, help="gamma of the similarity kernel (eq. 1)")
        width: float = opt(1.0, lo=0.0, lo_open=True, hi=8.0, help="channel-width multiplier (CPU studies)")
        reduction: int = opt(16, lo=1, hi=1024, help="CBAM's channel reduction in the local branch")
        va_weight: float = opt(1.0, help="weight of the AV MSE (data with valence/arousal)")
        init: str | None = opt(None, metavar="FILE", help="start from a MA-Net checkpoint or a ResNet-18 state_dict "
                                                          "(e.g. MS-Celeb-1M; nothing is downloaded)")

    defaults = dict(
        epochs=100, batch_size=128, optimizer="sgd", lr=0.01, momentum=0.9, nesterov=False, weight_decay=1e-4,
        scheduler="step", step_size=15, gamma=0.1, warmup_epochs=0.0, input_size=224, augment="paper",
        label_smoothing=0.0, best_metric="accuracy",
    )
    table = {
        "rafdb": dict(out="runs/manet_rafdb"),
        "ferplus": dict(out="runs/manet_ferplus"),
        "affectnet": dict(out="runs/manet_affectnet"),
    }

    @classmethod
    def add_args(cls, parser: argparse._ActionsContainer) -> None:
        parser.add_argument("--no-diversity", dest="diversity", action="store_const", const=(),
                            default=argparse.SUPPRESS, help="MA-Net as published: no diversity term (= --diversity "
                                                            "with no terms)")

    def __init__(self, cfg: Any):
        super().__init__(cfg)
        if cfg.augment != "paper" and cfg.augment not in AUGMENT_PRESETS:
            raise TrainError(f"manet: --augment {cfg.augment!r}: expected paper or one of {sorted(AUGMENT_PRESETS)}")
        bad = sorted(set(self.opts.diversity) - set(DIVERSITY))
        if bad:
            raise TrainError(f"manet: --diversity {','.join(bad)}: expected any of {', '.join(DIVERSITY)}")
        self.kinds = tuple(dict.fromkeys(self.opts.diversity))
        self.init_report = ""

    # ------------------------------------------------------------------ building
    def build_model(self, data: DataInfo) -> nn.Module:
        o = self.opts
        size = int(self.cfg.input_size or 224)
        if size % 16 or size < 32:
            raise TrainError(f"manet: --input-size {size}: the front's map (size / 8) is cut into four quadrants, so "
                             "the side must be a multiple of 16 and at least 32 (224 is the paper's)")
        kwargs: dict[str, Any] = {"num_classes": data.num_classes, "in_chans": int(self.cfg.channels or data.channels),
                                  "av_head": bool(data.has_va), "beta": float(o.lam), "reduction": int(o.reduction)}
        if float(o.width) != 1.0:
            kwargs["width"] = float(o.width)
        try:
            model = create_model("manet", **kwargs)
        except (TypeError, ValueError) as exc:
            raise TrainError(f"cannot build manet with {kwargs}: {exc}") from None
        self.arch, self.arch_kwargs = "manet", kwargs
        if o.init:
            self.init_report = _init_manet(model, o.init, list(data.label_names))
            log.info("MA-Net --init: %s", self.init_report)
        return model

    def build_augment(self) -> list[BatchAugment]:
        if self.cfg.augment != "paper":
            return super().build_augment()
        base = FORK_FERPLUS_AUGMENT if self.cfg.data == "ferplus" else PAPER_AUGMENT
        try:
            return [BatchAugment(with_overrides(base, self.cfg.aug))]
        except ValueError as exc:
            raise TrainError(f"--aug: {exc}") from None

    def setup(self) -> None:
        n = sum(p.numel() for p in self.model.parameters()) / 1e6
        log.info("MA-Net: %.2fM params, lambda %g, diversity %s (gamma %g)", n, self.opts.lam,
                 "+".join(self.kinds) or "off", self.opts.div_gamma)

    # ------------------------------------------------------------------ loop
    def training_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        out = self.model(batch.input)
        return manet_loss(out, batch.label, batch.va, lam=float(self.opts.lam), gamma=float(self.opts.div_gamma),
                          kinds=self.kinds, va_weight=float(self.opts.va_weight))

    def eval_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        out = self.model(batch.input)
        return {k: out[k] for k in ("logits", "logits_local", "logits_global", "va") if k in out}

    def training_notes(self) -> list[str]:
        terms = {"branch": "D_b", "channel": "D_ch", "spatial": "D_sp"}
        notes = [f"MA-Net, lambda {self.opts.lam}: " + (
            "diversity " + " + ".join(terms[k] for k in self.kinds) if self.kinds else "no diversity (MA-Net as published)")]
        notes.append(f"initialised from {self.opts.init}: {self.init_report}" if self.opts.init else
                     "trained from scratch: no MS-Celeb-1M pre-training (the paper's MA-Net was pre-trained on it)")
        return notes


def _init_manet(model: MANet, path: str, labels: list[str]) -> str:
    """Load ``path`` into ``model``: a MA-Net checkpoint of ours (everything of the same shape; the classifiers
    only with the same classes) or a ResNet-18 state_dict (front, and layer3/layer4 into each local branch)."""
    from ferengine import checkpoint as ck

    from ..modules.pretrained import _is_own_checkpoint, read_state_dict

    mine = model.state_dict()
    own = _is_own_checkpoint(path)
    if own and ck.read_info(path).arch == "manet":
        try:
            loaded = ck.load(path)
        except ck.CheckpointError as exc:
            raise TrainError(f"--init: {exc}") from None
        src = loaded.model.state_dict()
        same = list(loaded.info.labels) == labels
        take = {k: v for k, v in src.items() if k in mine and mine[k].shape == v.shape
                and (same or not k.startswith(("fc_1.", "fc_2.")))}
        skipped = sorted(set(mine) - set(take))
        model.load_state_dict(take, strict=False)
        return (f"MA-Net checkpoint: {len(take)}/{len(mine)} tensors" + ("" if same else ", classifiers fresh (other "
                                                                                          "classes)")
                + (f"; fresh: {', '.join(skipped[:4])}{' ...' if len(skipped) > 4 else ''}" if skipped else ""))
    sd = read_state_dict(path)
    # our ResNet-18 checkpoints (ferengine.models.resnet) name the stem stem.0 / stem.1; torchvision conv1 / bn1
    sd = {("conv1." + k[7:] if k.startswith("stem.0.") else "bn1." + k[7:] if k.startswith("stem.1.") else k): v
          for k, v in sd.items()}
    take: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        targets = [k] if not k.startswith(("layer3.", "layer4.")) else [
            k.replace("layer3.", f"layer3_1_p{p}.", 1).replace("layer4.", f"layer4_1_p{p}.", 1) for p in range(1, 5)]
        for t in targets:
            if t in mine and mine[t].shape == v.shape and not t.startswith(("fc",)):
                take[t] = v
            elif t in mine and t == "conv1.weight" and v.shape[1] == 3 and mine[t].shape[1] == 1 \
                    and v.shape[0] == mine[t].shape[0]:
                take[t] = v.sum(1, keepdim=True)  # an RGB stem on grey faces: the channel sum
    if not any(k.startswith("layer1.") for k in take):
        raise TrainError(f"--init {path}: no ResNet-18 layer1 tensors of the right shapes in it (is it a ResNet-18 at "
                         f"width {model.width}?); expected names like layer1.0.conv1.weight")
    model.load_state_dict(take, strict=False)
    return f"ResNet-18 state_dict: {len(take)}/{len(mine)} tensors (front + 4 x layer3/layer4); the rest fresh"
