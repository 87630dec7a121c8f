"""ECAN, the extra-contrast affinity network (papers/ecan.md; METHODS.md section 2): a ResNet-18 trained
with cross-entropy + ENSC (extra-negative supervised contrast over a MoCo-style memory bank) + MVA
(multi-view affinity), eq. 11, on the shared engine.

    python -m trainers.ecan --data fer2013 --data-dir ../shared/data            # ECAN (Table 2: 73.73 %)
    python -m trainers.ecan --data fer2013 --loss ce                            # its baseline (72.33 %)
    python -m trainers.ecan --data rafdb --init resnet18_msceleb.pth           # RAF-DB (89.77 %)
    python -m trainers.ecan --data rafdb --loss supcon                          # Table 3's rows: ce, center,
                                                                                # supcon, ensc, ensc+mva

What one step does (section 3), for a batch of N images with two augmented views each:

- the query encoder (the ResNet-18 that is exported) sees view 1: its 512-d feature goes to the linear
  classifier (cross-entropy on z_q only) and through the projection head to z_q (L2-normalised);
- the momentum ("key") encoder and projection, an exponential moving average of the query ones (eq. 1,
  m = ``--key-momentum``), see view 2 without gradient: z_k;
- ENSC (eq. 6) over the 2N features z = z_q + z_k, with the memory bank's features of another class than
  each anchor as extra negatives (``trainers.losses.supcon``); SupCon (eq. 4) / ESC (eq. 5) as ablations;
- MVA (eqs. 8-10): the affinity loss of z_q to learnable class centres, weighted by alpha = 1 + the variance
  of the affinity losses of V groups (z_q and the bank's V - 1 most recent groups; ``trainers.losses.affinity``);
- total (eq. 11): (1 - lambda1) CE + lambda1 ENSC + lambda2 MVA, lambda1 = 0.2, lambda2 = 0.7;
- after the step: the key encoder's EMA update, then z_k and its labels are pushed to the bank (eq. 2),
  the oldest group dropping out. Before the first epoch a frozen pass of the key encoder fills the bank.

Choices the paper leaves open, and why (each is a flag):

- projection ``--proj-dims 512,128``: MoCo v2's MLP head (hidden 512 = the full encoder's width, ReLU, 128-d out;
  facebookresearch/moco ``builder.py``: dim=128, mlp), also SupCon's. ``--proj-dims none`` is the paper's
  literal reading (the contrastive terms on the normalised 512-d encoder features; it names no projection).
- temperature 0.07 and key momentum 0.999: MoCo's (the paper takes m = 0.999 from MoCo and gives no T).
- bank ``--bank-size 16384`` features (64 groups of 256): MoCo's queue of 65,536 is larger than FER2013's
  28,709 training images and RAF-DB's 12,271; a bank holding more than the training set holds stale
  repeats of the same images. It is cut to a whole number of global batches no larger than the training
  set (RAF-DB at batch 256: 12,032), and says so in the log.
- the contrastive and affinity losses are averaged over their anchors (``--contrast-reduction mean``,
  ``--mva-reduction mean``, DAN's affinity loss divides by the batch too): the paper writes eqs. 4-8 as sums
  over the 2N anchors, which next to the batch-mean CE of eq. 11 would weigh the contrastive term 2N = 512
  times more per anchor (docs/ecan-reproduction.md measures both).
- the MVA centres are a learnable parameter trained by the optimiser (DAN, whose affinity loss MVA extends),
  N(0, 1) at the start; ``--loss center`` (Table 3's centre loss, Wen et al. eq. 7) puts its learnable
  centres on the 512-d features the classifier sees (on the projection alone nothing keeps the centre loss
  from collapsing the projection to a point).
- optimiser: SGD lr 0.1, batch 256 (4.2); momentum 0.9 and weight decay 1e-4 (DAN's, with the same lr,
  batch and 40 RAF-DB epochs; ECAN's "GAF configuration" is not stated); a cosine schedule to 0 over the
  run (no milestones are given).
- augmentation: ``--augment none|weak|strong`` is Table 1 for the dataset (``trainers.augment.ecan_augment``,
  its magnitudes and their sources there); strong by default (the paper's default level).
- RAF-DB starts from an MS-Celeb-1M ResNet-18, which cannot be downloaded here: ``--init FILE`` takes a
  torchvision/timm ResNet-18 state_dict (safetensors or weights-only .pt) or any resnet18 checkpoint of
  ours; without it the run trains from scratch and says so in its log and its checkpoint (model card).

The exported checkpoint is the query encoder + linear classifier only (a plain ``resnet18`` of
``ferengine.models``): the projection, key encoder, centres and bank stay in ``state.pt`` for resume.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ferengine.preprocess import InputSpec

from ..augment import BatchAugment, ecan_augment, with_overrides
from ..engine import Batch, DataInfo, Method, TrainError, opt
from ..losses.affinity import centre_loss, centre_spread, mva_loss
from ..losses.ce import masked_cross_entropy
from ..losses.supcon import supcon_loss
from ..modules.momentum import frozen_copy
from ..modules.queue import LabelledQueue
from ..modules.resnet import ResNetOptions, build_resnet, resnet_input_spec
from . import register_method

log = logging.getLogger("trainers.ecan")

__all__ = ["ECAN", "ECANNet", "parse_proj_dims"]

ARCH = "resnet18"
LOSSES = ("ce", "center", "supcon", "esc", "ensc", "ensc+mva")


def parse_proj_dims(text: str | None) -> tuple[int, ...]:
    """``"512,128"`` -> (512, 128): hidden layers then the output; ``"none"``/``""`` -> () (no projection)."""
    if text is None or str(text).strip().lower() in ("", "none", "0"):
        return ()
    try:
        dims = tuple(int(x) for x in str(text).replace(" ", "").split(","))
    except ValueError:
        raise TrainError(f"--proj-dims {text!r}: expected comma-separated sizes such as 512,128, or none") from None
    if any(d < 1 or d > 65536 for d in dims):
        raise TrainError(f"--proj-dims {text!r}: every size must be in 1..65536")
    return dims


def _mlp(dim_in: int, dims: tuple[int, ...]) -> nn.Module:
    if not dims:
        return nn.Identity()
    layers: list[nn.Module] = []
    d = dim_in
    for i, h in enumerate(dims):
        layers.append(nn.Linear(d, h))
        if i < len(dims) - 1:
            layers.append(nn.ReLU(inplace=True))
        d = h
    return nn.Sequential(*layers)


class ECANNet(nn.Module):
    """The training network: ``net`` (the exported ResNet-18 + classifier), the projection, their momentum
    copies (``key``: no gradient) and the class centres of MVA / the centre loss."""

    def __init__(self, net: nn.Module, proj_dims: tuple[int, ...], *, key: bool, centres: tuple[int, int] | None,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.net = net
        self.proj = _mlp(net.feature_dim, proj_dims) if key else None
        self.net_k = frozen_copy(net) if key else None
        self.proj_k = frozen_copy(self.proj) if key else None
        self.z_dim = (proj_dims[-1] if proj_dims else net.feature_dim) if key else 0
        self.centres = None if centres is None else nn.Parameter(torch.randn(*centres, generator=generator))

    def query(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.net(x)  # {"embedding": 512-d, "logits"}
        if self.proj is not None:
            out["z"] = F.normalize(self.proj(out["embedding"]).float(), dim=1)
        return out

    @torch.no_grad()
    def key(self, x: torch.Tensor) -> torch.Tensor:
        e = self.net_k(x)["embedding"]
        return F.normalize(self.proj_k(e).float(), dim=1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.query(x)


@register_method
class ECAN(Method):
    """ECAN: ResNet-18 with CE + ENSC (memory-bank extra negatives) + MVA (multi-view affinity), eq. 11."""

    name = "ecan"
    paper = ("Jiang et al., An Extra-Contrast Affinity Network for Facial Expression Recognition in the Wild, "
             "Electronics 2022")
    test_args = ("--width", "0.125", "--bank-size", "64", "--aug", "erase=0.0", "--lr", "0.05")
    views = 2

    @dataclass
    class Config(ResNetOptions):                      # --width, --stem, --init: trainers.modules.resnet
        loss: Literal["ce", "center", "supcon", "esc", "ensc", "ensc+mva"] = opt(
            "ensc+mva", help="Table 3's loss: ce (the baseline), center (CE + lambda2 x centre loss), supcon (eq. 4), "
                             "esc (eq. 5, the whole bank as negatives), ensc (eq. 6), ensc+mva (ECAN, eq. 11)")
        lambda1: float = opt(0.2, hi=1.0, help="lambda1 of eq. 11: (1 - l1) CE + l1 contrastive")
        lambda2: float = opt(0.7, hi=100.0, help="lambda2 of eq. 11: weight of MVA (or of the centre loss)")
        temperature: float = opt(0.07, lo=0.0, lo_open=True, hi=10.0, help="temperature T of eqs. 4-6 (MoCo's 0.07)")
        key_momentum: float = opt(0.999, hi=1.0, hi_open=True, help="momentum m of the key encoder (eq. 1)")
        bank_size: int = opt(16384, lo=1, hi=1 << 24,
                             help="memory bank size in features (cut to whole global batches, at most the training set)")
        mva_groups: int = opt(5, lo=1, hi=1024, help="V of eq. 9: the current group + V - 1 bank groups")
        proj_dims: str = opt("512,128", metavar="DIMS",
                             help="projection head sizes, hidden...,out (MoCo v2: 512,128); none: the contrastive "
                                  "terms on the normalised encoder features")
        contrast_reduction: Literal["mean", "sum"] = opt(
            "mean", help="SupCon/ESC/ENSC over the 2N anchors: mean, or sum (eqs. 4-6 as printed)")
        mva_reduction: Literal["mean", "sum"] = opt("mean", help="affinity loss over the batch: mean (DAN) or sum (eq. 8)")

    # 4.2 (SGD, lr 0.1, batch 256); momentum/decay: DAN's; schedule: cosine (see the module doc)
    defaults = dict(
        epochs=200, batch_size=256, optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=1e-4, scheduler="cosine",
        warmup_epochs=0.0, label_smoothing=0.0, augment="strong", best_metric="accuracy",
    )
    table = {
        "fer2013": dict(epochs=200, input_size=48, out="runs/ecan"),
        "rafdb": dict(epochs=40, input_size=224, out="runs/ecan_rafdb"),
    }

    def __init__(self, cfg: Any):
        super().__init__(cfg)
        o = self.opts
        self.proj = parse_proj_dims(o.proj_dims)
        self.uses_key = o.loss not in ("ce", "center")
        self.views = 2 if self.uses_key else 1          # ce / center: one view, no key encoder
        self.uses_bank = o.loss in ("esc", "ensc", "ensc+mva")
        self.momentum = (float(o.key_momentum), None)
        self.init_report = None
        if self.cfg.augment not in ("none", "weak", "strong"):
            raise TrainError(f"ecan: --augment {self.cfg.augment!r}: ECAN's levels are none, weak and strong "
                             "(Table 1)")

    # ------------------------------------------------------------------ building
    def build_model(self, data: DataInfo) -> nn.Module:
        o = self.opts
        net, kwargs, self.init_report = build_resnet(ARCH, o, self.cfg, data, log)
        if not o.init and data.name == "rafdb":
            log.warning("ECAN on RAF-DB without pre-training: the paper starts from an MS-Celeb-1M ResNet-18, which "
                        "cannot be downloaded here; give one with --init FILE. Training from scratch.")
        self.arch, self.arch_kwargs = ARCH, kwargs
        centres = None
        if o.loss == "ensc+mva":
            centres = (data.num_classes, self.proj[-1] if self.proj else net.feature_dim)
        elif o.loss == "center":
            centres = (data.num_classes, net.feature_dim)
        g = torch.Generator().manual_seed(int(self.cfg.seed) + 7877)
        return ECANNet(net, self.proj, key=self.uses_key, centres=centres, generator=g)

    def export_model(self) -> nn.Module:
        return self.trainer.model.net

    def input_spec(self, model: nn.Module, data: DataInfo) -> InputSpec:
        return resnet_input_spec(model.net, self.cfg)

    def build_augment(self) -> list[BatchAugment]:
        data = self.trainer.data
        try:
            cfg = ecan_augment(self.cfg.augment, data.name, int(data.image_size), int(data.channels))
        except ValueError as exc:
            raise TrainError(f"ecan: {exc}") from None
        try:
            return [BatchAugment(with_overrides(cfg, self.cfg.aug))]
        except ValueError as exc:
            raise TrainError(f"--aug: {exc}") from None

    def setup(self) -> None:
        o, t = self.opts, self.trainer
        self.bank: LabelledQueue | None = None
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None
        if self.uses_bank:
            gb = int(t.cfg.batch_size)  # the global batch: one push = one group of every process's keys
            n = len(t.train_ds)
            # whole groups, at least one, never more than the training set (n < gb: one partial batch)
            size = max(gb, min(int(o.bank_size), n) // gb * gb) if n >= gb else min(int(o.bank_size), n)
            if size != o.bank_size:
                log.info("ECAN: memory bank of %d features (%d groups of %d) instead of --bank-size %d: a whole number "
                         "of global batches, no larger than the %d training images", size, size // gb, gb,
                         o.bank_size, n)
            self.bank = LabelledQueue(size, self.model.z_dim, device=self.device)
        log.info("ECAN: loss %s%s; views %d%s", o.loss,
                 f" (lambda1 {o.lambda1:g}, lambda2 {o.lambda2:g}, T {o.temperature:g}, m {o.key_momentum:g}, "
                 f"V {o.mva_groups}, projection {self.proj or 'none'}, reductions {o.contrast_reduction}/"
                 f"{o.mva_reduction})" if self.uses_key else "", self.views,
                 f"; bank {self.bank.size}" if self.bank is not None else "")

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        m = self.model
        if not self.uses_key:
            return []
        return [(m.net, m.net_k), (m.proj, m.proj_k)] if self.proj else [(m.net, m.net_k)]

    @torch.no_grad()
    def before_training(self) -> None:
        """Eq. 2's initialisation: the bank filled by the frozen key encoder on augmented training images."""
        if self.bank is None:
            return
        t = self.trainer
        groups = self.bank.size // int(t.cfg.batch_size) if len(t.train_ds) >= t.cfg.batch_size else 1
        batches = t.make_batches(t.train_ds, augment=True, shuffle=True, seed=int(t.cfg.seed) + 104723)
        for i, b in enumerate(batches):
            if i >= groups:
                break
            with t.autocast():
                z = self.model.key(b.input)
            self._push(z, b.label)
        log.info("ECAN: memory bank filled by a frozen pass: %d features (%d groups)", self.bank.count,
                 self.bank.pushes)

    def _push(self, z: torch.Tensor, labels: torch.Tensor) -> None:
        t = self.trainer
        if t.dist.enabled:
            z, labels = t.all_gather(z.float().contiguous()), t.all_gather(labels.contiguous())
        self.bank.push(z.float(), labels, step=t.global_step)

    # ------------------------------------------------------------------ loop
    def training_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        o = self.opts
        y = batch.label
        out = self.model(batch.inputs[0])
        ce = masked_cross_entropy(out["logits"], y, self.cfg.label_smoothing)
        logs: dict[str, torch.Tensor] = {"ce": ce.detach()}
        if o.loss == "ce":
            logs["loss"] = ce
            return logs
        if o.loss == "center":
            centre = centre_loss(out["embedding"], y, self.model.centres)  # eq. 7, on the classifier's features
            logs.update(center=centre.detach(), loss=ce + o.lambda2 * centre)
            return logs
        zq = out["z"]
        zk = self.model.key(batch.inputs[1])
        z, zy = torch.cat([zq, zk]), torch.cat([y, y])
        mode = "supcon" if o.loss == "supcon" else ("esc" if o.loss == "esc" else "ensc")
        bank, bank_y = self.bank.get() if self.bank is not None else (None, None)
        con = supcon_loss(z, zy, temperature=o.temperature, mode=mode, bank=bank, bank_labels=bank_y,
                          reduction=o.contrast_reduction)
        loss = (1.0 - o.lambda1) * ce + o.lambda1 * con
        logs[mode] = con.detach()
        if o.loss == "ensc+mva":
            past = self.bank.recent_groups(o.mva_groups - 1) if o.mva_groups > 1 else []
            mva, alpha = mva_loss(zq, y, self.model.centres, past, reduction=o.mva_reduction)
            loss = loss + o.lambda2 * mva
            logs.update(mva=mva.detach(), alpha=alpha.detach(), centre_spread=centre_spread(self.model.centres).detach())
        logs["loss"] = loss
        if self.bank is not None:
            self._pending = (zk.detach(), y)
        return logs

    def after_step(self, batch: Batch, logs: dict[str, torch.Tensor]) -> None:
        if self._pending is not None:  # eq. 2, after the key encoder's update (the engine ran it)
            self._push(*self._pending)
            self._pending = None

    # ------------------------------------------------------------------ notes, state
    def training_notes(self) -> list[str]:
        notes = [f"ECAN loss {self.opts.loss}, augmentation level {self.cfg.augment} (Table 1)"]
        if self.init_report is not None:
            notes.append("encoder initialised from " + self.init_report.summary())
        elif self.trainer.data.name == "rafdb":
            notes.append("no pre-training: the paper starts RAF-DB from an MS-Celeb-1M ResNet-18 (not available here); "
                         "this model was trained from scratch")
        else:
            notes.append("trained from scratch (random initialisation), as the paper does on FER2013")
        return notes

    def state_dict(self) -> dict[str, Any]:
        return {} if self.bank is None else {"bank": self.bank.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.bank is None:
            return
        if "bank" not in state:
            raise TrainError("the saved state has no memory bank (a run with another --loss?); resume it with the "
                             "same --loss")
        b = state["bank"]
        if tuple(b["features"].shape) != tuple(self.bank.features.shape):
            raise TrainError(f"the saved memory bank is {tuple(b['features'].shape)}, this run's is "
                             f"{tuple(self.bank.features.shape)}; resume with the same --bank-size, --batch-size and "
                             "--proj-dims")
        self.bank.load_state_dict(b)
