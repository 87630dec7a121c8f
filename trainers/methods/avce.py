"""AVCE, arousal-valence contrastive learning with sparsemax/softmax views (Kim & Song, "Emotion-aware
Multi-view Contrastive Learning for Facial Emotion Recognition", ECCV 2022; papers/avce.md; METHODS.md
section 4), on the shared engine.

    python -m trainers.avce --data afew-va --data-dir DATA                     # AlexNet (paper: Table 1)
    python -m trainers.avce --data afew-va --backbone resnet18                # ResNet-18, batch 128
    python -m trainers.avce --data affectnet   |   --data affwild2            # 50k / 100k iterations
    python -m trainers.avce --data ferplus --data-opt va=anchors --iterations 0 --epochs 10 \\
        --input-size 112                                                     # the PROXY task on FER2013 faces

The exported network (``ferengine.models.avce``) is encoder E, compressor C (avg pool + FC) to the latent z
(d = 32) and regressor R (z -> valence, arousal in [-1, 1]): a valence/arousal-only model. Training adds the
views z_a = sparsemax(z), z_n = softmax(z) (``trainers.modules.sparsemax``: the exact sort-based projection onto
the simplex, not an iterative solver), the projection head H (z_a, z_n -> y_a, y_n in R^2) and the head H1
(z -> v in R^8). One step is Algorithm 1's two passes:

1. L_main = L_AV(x, GT) + L_AVCE(x, y_a, y_n) (eq. 2 with f of eq. 4; ``trainers.losses.avce``) updates E, C, R
   and H with Adam (lr 1e-4, betas 0.5, 0.9);
2. a second forward with the updated E, C gives z, z_a, z_n again; L_dis (eq. 8) on H1(z), H1(z_a), H1(z_n)
   updates E, C and H1 with SGD (lr 1e-2, momentum 0.9).

Both learning rates fall x0.8 at 5k, 25k, 45k, 65k and 85k iterations (section 4.2: "at the initial 5K
iterations, and ... every 20K"); the run lasts ``--iterations`` (50k for AFEW-VA and AffectNet, 100k for
Aff-Wild2); the best checkpoint is the one with the highest mean CCC on the validation split. Batch 256 with
AlexNet, 128 with ResNet-18 (when --batch-size is left at 256).

Where we differ from the official code (kdhht2334/AVCE_FER), on purpose:

- its regressor calls ``F.dropout2d(x)`` without ``training=``, so dropout stays on at test time; ours is
  ``nn.Dropout`` (off in eval), and evaluation is deterministic (tests/test_avce.py);
- its demo adds +0.15 to both outputs; nothing is added here;
- it solves sparsemax per sample with CVXPY (the paper: 1.3 s per batch); ours is the closed form (well under
  1 ms per batch of 256 x 32: ``python -m trainers.studies.avce_sparsemax``);
- its loss is not the paper's (a 1e-4 weight on AVCE, cos/2 and 0.25 theta/pi in the angle, 0.01 on the hold
  terms, MSE in place of RMSE): ours follows the paper's equations and settings; each term is a flag.

Choices the paper leaves open (each a flag): f is clipped to (0, 1] as a whole (``--clip f``; ``--clip angle``
clips only the angular term, as the official code); the hold terms of eq. 8 hold ``||v_bar||`` at delta2
(``--hold abs``; ``--hold linear`` is eq. 8 as printed, whose gradient ignores delta2); H and H1 take the views
in one batch so that their batch norm compares the views rather than normalising each view away; the view head
ends in 0.5 tanh (the official code's; ``--view-scale``).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ferengine.models import create_model
from ferengine.models.avce import ALEXNET_MIN_INPUT
from ferengine.preprocess import InputSpec

from ..augment import AUGMENT_PRESETS, AugmentConfig, BatchAugment, with_overrides
from ..engine import Batch, DataInfo, Method, TrainError, opt
from ..engine.optim import Stage, make_optimizer
from ..losses.avce import AVCELoss, AVLoss, DiscriminativeLoss, Similarity
from ..modules.sparsemax import sparsemax
from . import register_method

log = logging.getLogger("trainers.avce")

__all__ = ["AVCE", "AVCETrainNet", "ViewHead", "paper_augment", "PAPER_MILESTONES", "PROXY_NOTE"]

PAPER_MILESTONES = (5000, 25000, 45000, 65000, 85000)
DEFAULT_BATCH = 256
PROXY_NOTE = ("PROXY TASK: the valence/arousal targets are the vote-weighted mean of category anchors "
              "(ferengine.labels.AV_ANCHORS) of each face's FER+ votes, not human valence/arousal ratings; this is "
              "not a reproduction of the paper's AFEW-VA / AffectNet / Aff-Wild numbers")


def paper_augment(source_size: int) -> AugmentConfig:
    """Section 4.2's "resized to 224 x 224 through random cropping (center cropping when testing)": a zoom of
    256/224 with a random shift of up to 16/256 of the side (no flip, no colour: the paper names none)."""
    return AugmentConfig(translate=float(round(16 / 256 * source_size)), scale=(256 / 224, 256 / 224))


class ViewHead(nn.Module):
    """FC + BN + ReLU + FC (the paper's "FC layers and batch normalization"): H (-> 2, ``scale`` x tanh) or
    H1 (-> 8, linear). Views are passed in one batch (see the module doc)."""

    def __init__(self, dim: int, hidden: int, out: int, scale: float | None):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, out))
        self.scale = scale

    def forward(self, *views: torch.Tensor) -> list[torch.Tensor]:
        y = self.net(torch.cat(views, 0))
        if self.scale is not None:
            y = self.scale * torch.tanh(y)
        return list(y.split([v.shape[0] for v in views], 0))


class AVCETrainNet(nn.Module):
    """The training network: ``net`` (exported: E, C, R), H and H1."""

    def __init__(self, net: nn.Module, head: ViewHead, head1: ViewHead):
        super().__init__()
        self.net, self.head, self.head1 = net, head, head1

    def views(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(prediction, z, z_a = sparsemax(z), z_n = softmax(z))."""
        z = self.net.latent(self.net.forward_features(x))
        return self.net.regress(z), z, sparsemax(z.float(), -1), F.softmax(z.float(), -1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        va, z, za, zn = self.views(x)
        ya, yn = self.head(za, zn)
        v, va_, vn = self.head1(z.float(), za, zn)
        return {"va": va, "z": z, "z_a": za, "z_n": zn, "y_a": ya, "y_n": yn, "v": v, "v_a": va_, "v_n": vn}


@register_method
class AVCE(Method):
    """AVCE: valence/arousal regression with sparsemax/softmax-view contrastive learning (L_AV + L_AVCE, L_dis)."""

    name = "avce"
    paper = ("Kim & Song, Emotion-aware Multi-view Contrastive Learning for Facial Emotion Recognition, ECCV 2022 "
             "(papers/avce.md)")
    datasets = ("afew-va", "affectnet", "affwild2", "ferplus")
    test_data = "afew-va"
    test_args = ("--width", "0.125", "--hidden", "16", "--input-size", "64", "--iterations", "0")
    manual_optimization = True

    @dataclass
    class Config:
        backbone: Literal["alexnet", "resnet18"] = opt("alexnet", help="encoder E: the reduced AlexNet (batch 256) "
                                                                       "or ResNet-18 (batch 128), from scratch")
        width: float = opt(1.0, lo=0.0, lo_open=True, hi=8.0, help="channel-width multiplier of E (CPU studies)")
        stem: Literal["small", "imagenet"] | None = opt(
            None, help="ResNet-18 stem (none given: imagenet from 128 px, else small)")
        latent_dim: int = opt(32, lo=2, hi=4096, help="d, the size of z")
        hidden: int = opt(256, lo=1, hi=65536, help="hidden width of R and H (the official code's 256)")
        dis_dim: int = opt(8, lo=1, hi=4096, help="size of v = H1(z)")
        dis_hidden: int = opt(64, lo=1, hi=65536, help="hidden width of H1 (the official code's 64)")
        dropout: float = opt(0.5, lo=0.0, hi=1.0, hi_open=True, help="dropout before C's and R's FC (training only)")
        view_scale: float = opt(0.5, lo=0.0, lo_open=True, hi=10.0, help="H's output is view_scale x tanh")
        avce: bool = opt(True, help="L_AVCE (eq. 2); --no-avce for the ablation")
        dis: bool = opt(True, help="L_dis (eq. 8) and its second pass; --no-dis for Table 4's 'w/o L_dis'")
        similarity: Literal["f", "f1", "f2"] = opt("f", help="f (eq. 4), f1 (dot product) or f2 (eq. 5, polarity)")
        mu: float = opt(0.75, lo=0.0, hi=100.0, help="balance factor of eq. 4's intensity term")
        clip: Literal["f", "angle", "none"] = opt("f", help="clip to (0, 1]: the similarity, its angle term, or nothing")
        avce_alpha: float = opt(0.5, lo=0.0, hi=100.0, help="eq. 2's alpha (negative pairs)")
        avce_beta: float = opt(0.005, lo=0.0, hi=100.0, help="eq. 2's beta (positive pairs' f^2)")
        avce_gamma: float = opt(0.5, lo=0.0, hi=100.0, help="eq. 2's gamma (negative pairs' f^2)")
        delta1: float = opt(1.0, lo=0.0, hi=100.0, help="eq. 8's push margin")
        delta2: float = opt(0.8, lo=0.0, hi=2.0, help="eq. 8's holding factor")
        hold: Literal["abs", "linear"] = opt("abs", help="hold terms |·| (held at delta2) or as eq. 8 is printed")
        dis_lr: float = opt(1e-2, lo=0.0, hi=10.0, help="SGD lr of the L_dis pass (E, C, H1)")
        dis_momentum: float = opt(0.9, lo=0.0, hi=1.0, hi_open=True, help="SGD momentum of the L_dis pass")
        iterations: int = opt(50000, lo=0, hi=10**8, help="run length in iterations (the paper: 50k, Aff-Wild2 100k; "
                                                          "it wins over --epochs); 0: --epochs counts")

    # section 4.2; Adam betas (0.5, 0.9) and the milestones are the official code's
    defaults = dict(
        epochs=100, batch_size=DEFAULT_BATCH, optimizer="adam", lr=1e-4, betas=(0.5, 0.9), weight_decay=0.0,
        scheduler="multistep", schedule_interval="step", milestones=PAPER_MILESTONES, gamma=0.8, warmup_epochs=0.0,
        input_size=224, augment="paper", best_metric="mean_ccc", label_smoothing=0.0,
    )
    table = {
        "afew-va": dict(out="runs/avce_afew_va", iterations=50000),
        "affectnet": dict(out="runs/avce_affectnet", iterations=50000, data_opts={"task": "va"}),
        "affwild2": dict(out="runs/avce_affwild2", iterations=100000),
        "ferplus": dict(out="runs/avce_ferplus_proxy", data_opts={"va": "anchors"}),
    }

    def __init__(self, cfg: Any):
        super().__init__(cfg)
        o = self.opts
        if cfg.augment != "paper" and cfg.augment not in AUGMENT_PRESETS:
            raise TrainError(f"avce: --augment {cfg.augment!r}: expected paper (section 4.2's random crop) or one of "
                             f"{sorted(AUGMENT_PRESETS)}")
        if o.backbone == "resnet18" and cfg.batch_size == DEFAULT_BATCH:
            cfg.batch_size = 128
            log.info("AVCE: --backbone resnet18 trains with batch 128 (the paper's; --batch-size to change)")
        if o.backbone == "alexnet" and o.stem is not None:
            raise TrainError("avce: --stem is a ResNet-18 setting; AlexNet has its own 11x11/4 stem")
        self.sim = Similarity(o.similarity, o.mu, o.clip)
        self.avce_loss = AVCELoss(self.sim, o.avce_alpha, o.avce_beta, o.avce_gamma)
        self.av_loss = AVLoss()
        self.dis_loss = DiscriminativeLoss(o.delta1, o.delta2, o.hold)

    # ------------------------------------------------------------------ building
    def build_model(self, data: DataInfo) -> nn.Module:
        o = self.opts
        if not data.has_va:
            raise TrainError(f"avce regresses valence/arousal, and {data.name} has no valence/arousal targets; use "
                             "--data afew-va, affectnet (--data-opt task=va), affwild2, or the proxy task "
                             "--data ferplus --data-opt va=anchors")
        size = int(self.cfg.input_size or 224)
        if o.backbone == "alexnet" and size < ALEXNET_MIN_INPUT:
            raise TrainError(f"avce: AlexNet needs --input-size >= {ALEXNET_MIN_INPUT} (got {size}): its 11x11/4 "
                             "conv and three max-pools leave no map below that; use --backbone resnet18 for small "
                             "faces")
        kwargs: dict[str, Any] = {"in_chans": int(self.cfg.channels or data.channels), "latent_dim": int(o.latent_dim),
                                  "hidden": int(o.hidden), "dropout": float(o.dropout)}
        if float(o.width) != 1.0:
            kwargs["width"] = float(o.width)
        if o.backbone == "resnet18":
            kwargs["stem"] = o.stem or ("imagenet" if size >= 128 else "small")
        self.arch = f"avce_{o.backbone}"
        try:
            net = create_model(self.arch, **kwargs)
        except (TypeError, ValueError) as exc:
            raise TrainError(f"cannot build {self.arch} with {kwargs}: {exc}") from None
        self.arch_kwargs = kwargs
        self.proxy = str((self.cfg.data_opts or {}).get("va", "")).lower() == "anchors"
        if self.proxy:
            log.warning(PROXY_NOTE)
        d = int(o.latent_dim)
        return AVCETrainNet(net, ViewHead(d, int(o.hidden), 2, float(o.view_scale)),
                            ViewHead(d, int(o.dis_hidden), int(o.dis_dim), None))

    def export_model(self) -> nn.Module:
        return self.trainer.model.net

    def input_spec(self, model: nn.Module, data: DataInfo) -> InputSpec:
        size = int(self.cfg.input_size or model.net.default_input["size"])
        return InputSpec(size=size, channels=int(model.net.default_input["channels"]))

    def build_augment(self) -> list[BatchAugment]:
        if self.cfg.augment != "paper":
            return super().build_augment()
        try:
            return [BatchAugment(with_overrides(paper_augment(int(self.trainer.data.image_size)), self.cfg.aug))]
        except ValueError as exc:
            raise TrainError(f"--aug: {exc}") from None

    def build_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        c, o, m = self.cfg, self.opts, self.model
        main = [p for p in [*m.net.parameters(), *m.head.parameters()] if p.requires_grad]
        opts = {"main": make_optimizer(c.optimizer, [{"params": main}], lr=c.lr, momentum=c.momentum,
                                       nesterov=c.nesterov, weight_decay=c.weight_decay, betas=c.betas)}
        if o.dis:
            dis = [*m.net.encoder.parameters(), *m.net.compress.parameters(), *m.head1.parameters()]
            opts["dis"] = make_optimizer("sgd", [{"params": dis}], lr=float(o.dis_lr), momentum=float(o.dis_momentum),
                                         weight_decay=c.weight_decay)
        return opts

    def stages(self) -> list[Stage]:
        it = int(self.opts.iterations)
        if it <= 0:
            return [Stage("train", int(self.cfg.epochs))]
        steps = len(self.trainer.train_batches)
        epochs = max(1, math.ceil(it / steps))
        log.info("AVCE: %d iterations = %d epochs of %d steps (--iterations 0 to count in --epochs)", it, epochs, steps)
        return [Stage("train", epochs)]

    def setup(self) -> None:
        m = self.model
        n = lambda mod: sum(p.numel() for p in mod.parameters()) / 1e6  # noqa: E731
        o = self.opts
        log.info("AVCE: %s, z %d; L_AVCE %s (f=%s, mu %g, clip %s, alpha %g, beta %g, gamma %g); L_dis %s "
                 "(delta1 %g, delta2 %g, hold %s, SGD lr %g); exported %.2fM params, H %.3fM, H1 %.3fM",
                 self.arch, o.latent_dim, "on" if o.avce else "off", o.similarity, o.mu, o.clip, o.avce_alpha, o.avce_beta,
                 o.avce_gamma, "on" if o.dis else "off", o.delta1, o.delta2, o.hold, o.dis_lr, n(m.net), n(m.head),
                 n(m.head1))

    # ------------------------------------------------------------------ loop
    def _main_loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        m = self.model
        x, z, za, zn = m.views(batch.input)
        lav, parts = self.av_loss(x, batch.va)
        logs = {"av": lav.detach(), "rmse": parts["rmse"], "pcc": parts["pcc"], "ccc": parts["ccc"],
                "sparsity": (za > 0).float().sum(-1).mean().detach()}
        loss = lav
        if self.opts.avce:
            ya, yn = m.head(za, zn)
            la, fp, fn = self.avce_loss(x.float(), ya, yn)
            loss = loss + la
            logs.update({"avce": la.detach(), "f_pos": fp.mean().detach(), "f_neg": fn.mean().detach()})
        logs["loss"] = loss
        return logs

    def _dis_loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        m = self.model
        _, z, za, zn = m.views(batch.input)
        v, va, vn = m.head1(z.float(), za, zn)
        loss, parts = self.dis_loss(v, va, vn)
        return {"loss": loss, "push": parts["push"], "hold": parts["hold"]}

    def training_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        if batch.va is None:
            raise TrainError("avce: a training batch without valence/arousal targets")
        logs = self.trainer.step(lambda: self._main_loss(batch), "main")
        out = {k: v.detach() for k, v in logs.items()}
        total = out["loss"]
        if self.opts.dis:
            d = self.trainer.step(lambda: self._dis_loss(batch), "dis")
            out.update({"dis": d["loss"].detach(), "push": d["push"], "hold": d["hold"]})
            total = total + d["loss"].detach()
        out["loss"] = total
        return out

    # ------------------------------------------------------------------ notes
    def training_notes(self) -> list[str]:
        o = self.opts
        notes = [f"AVCE ({o.backbone}): L_AV{' + L_AVCE (f=' + o.similarity + ')' if o.avce else ''}"
                 f"{', L_dis' if o.dis else ', no L_dis'}; trained from scratch, as the paper",
                 "valence/arousal only: this model has no expression categories"]
        if getattr(self, "proxy", False):
            notes.insert(0, PROXY_NOTE)
        return notes
