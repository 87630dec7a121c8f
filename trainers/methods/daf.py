"""DAF-CNN (papers/daf_cnn.md; METHODS.md section 1): attention-augmented VGG-style CNN trained with softmax
cross-entropy + lambda x triplet-centre loss (eq. 13), on the shared engine.

    python -m trainers.daf --data fer2013 --data-dir ../shared/data                    # DAF-CNN (Table 1, 72.39%)
    python -m trainers.daf --data fer2013 --no-attention                                # DAF-CNN_NOatt      (71.38)
    python -m trainers.daf --data fer2013 --no-tc                                       # DAF-CNN_NOtcl      (71.80)
    python -m trainers.daf --data fer2013 --no-attention --no-tc                        # DAF-CNN_NOatt&tcl  (70.41)
    python -m trainers.daf --eval-only runs/daf/best.safetensors --val-split privatetest

SFEW 2.0 (the paper's two-stage recipe, 4.3.2: "pre-train the model on the FER2013 training set and then
fine-tune on the SFEW training set"; "the pre-trained model equipped with attention module and supervised
by softmax loss ... in the fine-tuning stage, the softmax loss is replaced by TC loss")::

    python -m trainers.daf --data fer2013 --stage ce --out runs/daf_fer_ce             # stage 1: CE only, attention on
    python -m trainers.daf --data sfew --init runs/daf_fer_ce/best.safetensors         # stage 2: TC fine-tuning

``--stage ce`` trains with cross-entropy alone (``--no-tc`` is the same switch under Table 1's name);
``--stage tc`` (the default) with CE + lambda TC. ``--init CKPT`` starts from a checkpoint's weights (its
architecture: attention, widths, embedding size, input size come from it); on SFEW TC starts at once
(``--tc-start 0``, the --init model being the pre-training) with the centres at the class means of the
pre-trained embeddings (``--centre-init means``; ``normal`` for 4.2's N(0, 0.01)). What "replaced by TC
loss" means is ambiguous: the paper gives SFEW a lambda (0.013), which only matters next to the softmax
term of eq. 13, and TC alone would never train the classifier's last layer; so stage 2 uses eq. 13
(CE + 0.013 TC, m = 13). ``--ce-weight 0`` is the literal reading (TC alone).

Settings (paper 4.2) and their defaults here:

- Adam, lr 1e-3, minimum lr 1e-5; "if the validation accuracy did not increase by at least 0.0005 for
  13 epochs, the learning rate was reduced by a factor of 0.2 and the previous model with the best
  accuracy was reloaded": ``--scheduler plateau --plateau-patience 13 --plateau-threshold 0.05
  --plateau-factor 0.2 --min-lr 1e-5 --reload-best``, the drop coming at the 13th epoch without such a gain.
  The threshold is 0.05 because the engine measures accuracy in percent (0.0005 as a fraction). The reload restores the weights and the centres of the
  best epoch (not the Adam moments).
- Per dataset (picked from ``--data``; flags given explicitly win): FER2013 m = 11, lambda = 0.007,
  batch 128; SFEW m = 13, lambda = 0.013, batch 32. Epoch = floor(N / batch) batches of a random
  permutation ("[N/128] batches, with the training samples randomly selected").
- Validation: FER2013 PublicTest selects the best epoch (the paper's "validation"); report PrivateTest
  with ``--eval-only ... --val-split privatetest``. SFEW: Val.
- Input: 96x96 grey in [0, 1] (the checkpoint's input spec: mean 0, std 1); SFEW is read as grey too
  (``--channels 3`` builds an RGB model instead). The paper crops faces with MTCNN; we use the datasets'
  own crops (FER2013's 48 px faces, SFEW's aligned faces) resized to 96.
- TC loss: eq. 9 over the batch, updated by eq. 12 with rate ``--centre-lr`` 0.5 after each optimiser
  step (see ``trainers/losses/tc.py`` for the sign of eq. 12 and the rate, which the paper does not give).

The reading of TC (measured: docs/daf-reproduction.md, "CPU reduced-scale TC readings", made with
``python -m trainers.studies.daf_tc``):

- Eq. 9 is a *sum* over the M items of the batch and cross-entropy the usual batch mean. With lambda =
  0.007, m = 11, M = 128 the sum is ~5x CE in value at the start (lambda * M * ~m ~ 10 against ~1.9) and,
  per item, about as strong as CE (gradient weight lambda = 0.007 against CE's 1/M = 0.0078). The batch
  *mean* (Wen et al.'s own centre-loss layer divides by M: ydwen/caffe-face ``center_loss_layer.cpp``)
  makes TC 1/143 of CE per item: a light regulariser.
- The sum from the first step, with the centres at 4.2's N(0, 0.01), wrecks training (PublicTest accuracy,
  the split that selected each run's epoch): the H100 run stayed at the majority class for 12 epochs (46.75 %
  whole split after 40; its no-copy part was not measured then); at the CPU scale (an earlier pair of runs, same command) it reached 43.10 % (42.43 %
  on the images with no copy in Training) where CE alone reached 60.60 % (59.53 %). With the mean the run
  tracks CE alone (60.88 %, 60.05 % no copy).
- Default: the paper's own SFEW recipe in one run -- cross-entropy alone for ``--tc-start 8`` epochs, then
  CE + lambda * eq. 9 as printed (``--tc-reduction sum``) with the centres set to the class means of the
  training embeddings (``--centre-init means``). TC then does what the paper says it does, it tightens the
  classes: the class-separation ratio of the PublicTest embeddings (intra / nearest-other distance, logged
  as ``val_sep_ratio``) was 0.61 at epoch 8, before TC, and 0.50 at epoch 20. At the CPU scale (widths
  x0.25, 48 px, 20 epochs) it cost accuracy against CE alone: best PublicTest 57.15 % (56.33 % no copy)
  against 61.66 % (60.74 %); the full schedule, where the
  paper's +0.59 points (Table 1) would have to show, has not been run. ``--tc-reduction mean --tc-start 0
  --centre-init normal`` is the mean reading, ``--tc-reduction sum --tc-start 0 --centre-init normal`` the
  letter of 4.2 from step 1, ``--lam-warmup E`` ramps lambda over E epochs.

Not stated by the paper, our choices (each an option):

- Epochs: not given. ``--epochs 100`` is a cap: the plateau rule reaches the lr floor after three drops
  (1e-3 -> 2e-4 -> 4e-5 -> 1e-5), i.e. after at least 3 x 13 epochs without gain past the first peak;
  100 leaves room for the gains that reset the patience on the way. The paper states no stopping rule.
- Augmentation: "a data augmentation strategy is employed" only. Default: geometric jitter -- shifts of
  up to 4 px (of the face as read: FER2013's 48 px, SFEW's 96 px), horizontal flip, +-10 deg rotation, 0.9-1.1 zoom -- the
  usual FER2013 recipe of that time, without colour jitter or erasing (``--augment``/``--aug`` change it).
- Architecture details (widths 64-128-256-512-512, flatten + FC 512 embedding, ReLU in the attention
  MLP): see ``ferengine/models/daf.py``; ``--embedding-dim``, ``--width``, ``--arch-kwargs`` change them.
"""
from __future__ import annotations

import argparse
import inspect
import logging
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from ferengine import checkpoint as ckpt
from ferengine.labels import canonical
from ferengine.models import create_model
from ferengine.models.daf import daf_cnn
from ferengine.preprocess import InputSpec

from ..engine import Batch, DataInfo, Method, TrainError, opt
from ..losses.ce import masked_cross_entropy
from ..losses.tc import TripletCentreLoss
from . import register_method

log = logging.getLogger("trainers.daf")

__all__ = ["DAF"]

ARCH = "daf_cnn"


@register_method
class DAF(Method):
    """DAF-CNN: VGG-style CNN + 3D attention, trained with cross-entropy + lambda x triplet-centre loss."""

    name = "daf"
    paper = ("Zhou, Fan, Tjahjadi, Das Choudhury: Discriminative Attention-augmented Feature Learning for Facial "
             "Expression Recognition in the Wild (papers/daf_cnn.md)")

    # TC from the first step, so that the every-method tests (resume, eval, export) cover the TC path
    test_args = ("--input-size", "32", "--width", "0.125", "--embedding-dim", "32", "--batch-size", "8",
                 "--tc-start", "0")

    @dataclass
    class Config:
        stage: Literal["tc", "ce"] = opt("tc", help="tc: CE + lambda * TC (eq. 13; DAF-CNN, and SFEW fine-tuning); "
                                                    "ce: cross-entropy only (the SFEW recipe's FER2013 pre-training, "
                                                    "Table 1's NOtcl rows)")
        attention: bool | None = opt(None, help="the 3D attention module (none given: on, or as in --init's "
                                                "checkpoint); --no-attention is Table 1's NOatt ablation")
        margin: float = opt(11.0, help="TC margin m")
        lam: float = opt(0.007, help="TC weight lambda in CE + lambda TC")
        ce_weight: float = opt(1.0, help="weight of the cross-entropy term (0: TC alone, the literal 'softmax "
                                         "replaced by TC')")
        centre_lr: float = opt(0.5, help="centre update rate alpha (eq. 12)")
        centre_init_std: float = opt(0.01, help="centres start as N(0, std^2) (--centre-init normal)")
        centre_init: Literal["normal", "means"] = opt(
            "means", help="means: the class means of the training embeddings, measured when TC starts (a frozen "
                          "pass; the default); normal: N(0, std^2) (4.2's initialisation)")
        lam_warmup: float = opt(0.0, help="epochs over which lambda rises linearly from 0 to --lam (0: off)")
        tc_start: float = opt(8.0, help="epochs of cross-entropy alone before TC starts (the paper's SFEW recipe "
                                        "in one run: CE pre-training, then CE + lambda TC; default 8 on FER2013, 0 "
                                        "on SFEW, whose --init model is the pre-training); 0: TC from the start")
        tc_reduction: Literal["sum", "mean"] = opt(
            "sum", help="TC over the batch: sum (eq. 9 as printed, the default: per item as strong as CE) or mean "
                        "(divided by the batch size, as Wen et al.'s centre-loss layer: 1/143 of CE per item)")
        init: str | None = opt(None, metavar="CKPT", help="start from this checkpoint's weights and architecture "
                                                          "(SFEW: a FER2013 model)")
        embedding_dim: int | None = opt(None, lo=1, hi=65536, help="size of FC_1, the TC embedding (none given: 512)")
        width: float | None = opt(None, lo=0.0, lo_open=True, hi=16.0,
                                  help="multiplier of the channel widths 64..512 (none given: 1)")
        dropout: float = opt(0.5, hi=1.0, hi_open=True, help="dropout before each of the two FC layers")
        arch_kwargs: dict[str, Any] = opt(factory=dict, metavar="JSON",
                                          help="further daf_cnn arguments: head_pool (flatten|avg), embedding_relu, "
                                               "attention_mlp_act (relu|none), reduction, spatial_kernel")

    # section 4.2; the plateau threshold is 0.05 because the engine measures accuracy in percent (0.0005)
    defaults = dict(
        epochs=100, batch_size=128, optimizer="adam", lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0,
        scheduler="plateau", plateau_patience=13, plateau_threshold=0.05, plateau_factor=0.2, min_lr=1e-5,
        reload_best=True, best_metric="accuracy", label_smoothing=0.0,
        augment="standard", aug={"brightness": 0.0, "contrast": 0.0, "erase": 0.0},
    )
    table = {
        "fer2013": dict(batch_size=128, margin=11.0, lam=0.007),
        "sfew": dict(batch_size=32, margin=13.0, lam=0.013, tc_start=0.0, out="runs/daf_sfew"),
    }

    @classmethod
    def add_args(cls, parser: argparse._ActionsContainer) -> None:
        parser.add_argument("--no-tc", dest="stage", action="store_const", const="ce", default=argparse.SUPPRESS,
                            help="ablation: no triplet-centre loss (same as --stage ce)")

    # ------------------------------------------------------------------ building
    @property
    def use_tc(self) -> bool:
        return self.opts.stage == "tc"

    def build_model(self, data: DataInfo) -> nn.Module:
        o = self.opts
        kwargs: dict[str, Any] = {
            "num_classes": data.num_classes, "in_chans": self.cfg.channels or 1,
            "attention": True if o.attention is None else bool(o.attention),
            "embedding_dim": o.embedding_dim or 512, "dropout": float(o.dropout),
            "width": o.width or 1.0, "input_size": self.cfg.input_size or 96,
        }
        kwargs.update(o.arch_kwargs or {})
        state = None
        if o.init:
            kwargs, state = self._from_init(o.init, kwargs, data)
        elif self.cfg.data and "sfew" in str(self.cfg.data).lower():
            log.warning("training on SFEW from scratch; the paper fine-tunes a FER2013 model (--init CKPT)")
        self.arch = ARCH
        try:
            model = create_model(ARCH, **kwargs)
        except (TypeError, ValueError) as exc:
            raise TrainError(f"cannot build {ARCH} with {kwargs}: {exc}") from None
        if state is not None:
            model.load_state_dict(state)
            log.info("initialised from %s", o.init)
        self.arch_kwargs = kwargs
        return model

    def _from_init(self, path: str, kwargs: dict[str, Any], data: DataInfo) -> tuple[dict[str, Any], dict]:
        try:
            loaded = ckpt.load(path)
        except ckpt.CheckpointError as exc:
            raise TrainError(f"--init: {exc}") from None
        info = loaded.info
        if info.arch != ARCH:
            raise TrainError(f"--init {path}: a {info.arch!r} checkpoint; DAF-CNN fine-tunes a {ARCH!r} one")
        ik = dict(info.arch_kwargs)
        o = self.opts
        given = {"attention": o.attention, "embedding_dim": o.embedding_dim, "width": o.width,
                 "in_chans": self.cfg.channels, "input_size": self.cfg.input_size, **(o.arch_kwargs or {})}
        sig = inspect.signature(daf_cnn).parameters
        effective = {**{k: p.default for k, p in sig.items()}, **ik}  # the checkpoint's, defaults included
        clash = {k: (v, effective.get(k)) for k, v in given.items()
                 if v is not None and k not in ("dropout", "num_classes") and effective.get(k) != v}
        if clash:
            raise TrainError(f"--init {path}: the checkpoint's architecture differs from the flags: "
                             + ", ".join(f"{k}={a!r} given, checkpoint has {b!r}" for k, (a, b) in clash.items()))
        ck_labels = [canonical(s) for s in info.labels]
        data_labels = [canonical(s) for s in data.label_names]
        if ck_labels != data_labels:
            raise TrainError(f"--init {path}: its classes {info.labels} are not {data.name}'s {list(data.label_names)} "
                             "(same classes in the same order needed)")
        ik["num_classes"] = data.num_classes
        ik["dropout"] = kwargs["dropout"]
        return ik, loaded.model.state_dict()

    def input_spec(self, model: nn.Module, data: DataInfo) -> InputSpec:
        """96x96 in [0, 1] with the model's own channels (grey, also for SFEW's RGB files)."""
        d = model.default_input
        return InputSpec(size=int(d["size"]), channels=int(d["channels"]), mean=d["mean"], std=d["std"])

    def setup(self) -> None:
        self.tc: TripletCentreLoss | None = None
        o = self.opts
        if self.use_tc:
            g = torch.Generator().manual_seed(self.cfg.seed + 104729)
            self.tc = TripletCentreLoss(
                self.trainer.data.num_classes, self.model.feature_dim, margin=o.margin, centre_lr=o.centre_lr,
                reduction=o.tc_reduction, init_std=o.centre_init_std, generator=g).to(self.device)
        self.centres_ready = o.centre_init == "normal"  # "means": set when TC starts
        self._val_emb: list[torch.Tensor] = []
        self._val_lab: list[torch.Tensor] = []
        log.info("DAF-CNN: stage %s (%s), attention %s%s", o.stage,
                 "CE + lambda TC" if self.use_tc else "cross-entropy only", self.arch_kwargs.get("attention"),
                 f", m={o.margin:g}, lambda={o.lam:g}, centre lr {o.centre_lr:g}, reduction {o.tc_reduction}"
                 if self.tc is not None else "")

    # ------------------------------------------------------------------ loop
    def _tc_on(self) -> bool:
        """TC is part of the loss from epoch ``tc_start`` on (counted in steps, so fractions work)."""
        if self.tc is None:
            return False
        start = self.opts.tc_start * self.trainer.steps_per_epoch
        return self.trainer.global_step >= start

    def lam_now(self) -> float:
        """lambda at this step: --lam, ramped from 0 over --lam-warmup epochs after TC starts."""
        o = self.opts
        if o.lam_warmup <= 0:
            return float(o.lam)
        spe = self.trainer.steps_per_epoch
        t = self.trainer.global_step - o.tc_start * spe
        return float(o.lam) * min(1.0, max(0.0, (t + 1) / (o.lam_warmup * spe)))

    def on_epoch_start(self, epoch: int) -> None:
        """--centre-init means: at the start of the epoch in which TC starts (outside any training step)."""
        t = self.trainer
        if self.tc is not None and not self.centres_ready and \
                t.global_step + t.steps_per_epoch > self.opts.tc_start * t.steps_per_epoch:
            self._centres_from_means()

    @torch.no_grad()
    def _centres_from_means(self) -> None:
        """--centre-init means: the class means of the training embeddings (eval mode, a frozen pass)."""
        model, t = self.model, self.trainer
        was = model.training
        model.eval()
        k, dim = self.tc.centres.shape
        sums = torch.zeros(k, dim, device=self.device, dtype=torch.float64)
        counts = torch.zeros(k, device=self.device, dtype=torch.float64)
        for b in t.make_batches(t.train_ds, batch_size=2 * t.cfg.batch_size):
            ok = b.label >= 0
            e = model(b.input)["embedding"].double()[ok]
            sums.index_add_(0, b.label[ok], e)
            counts.index_add_(0, b.label[ok], torch.ones_like(b.label[ok], dtype=torch.float64))
        t.all_reduce_(sums), t.all_reduce_(counts)
        have = counts > 0
        self.tc.centres[have] = (sums[have] / counts[have, None]).to(self.tc.centres.dtype)
        self.centres_ready = True
        model.train(was)
        log.info("DAF-CNN: TC starts at step %d; centres set to the class means of %d training embeddings",
                 t.global_step, int(counts.sum()))

    def training_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        out = self.model(batch.input)
        ce = masked_cross_entropy(out["logits"], batch.label, self.cfg.label_smoothing)
        ce_w = float(self.opts.ce_weight)
        logs: dict[str, torch.Tensor] = {"ce": ce.detach()}
        loss = ce * ce_w if ce_w != 1.0 else ce
        if self._tc_on():
            self.tc.train()
            r = self.tc(out["embedding"].float(), batch.label)
            lam = self.lam_now()
            loss = loss + lam * r.loss
            logs.update(tc=r.loss.detach(), tc_active=r.active_fraction,
                        centre_norm=self.tc.centres.norm(dim=1).mean(), lam=torch.tensor(lam))
        logs["loss"] = loss
        return logs

    def after_step(self, batch: Batch, logs: dict[str, torch.Tensor]) -> None:
        if self.tc is not None and "tc" in logs:  # eq. 12, with this step's centres and embeddings (whole batch)
            self.tc.update_centres(self.trainer.all_reduce_ if self.trainer.dist.enabled else None)

    # ------------------------------------------------------------------ class separation, every epoch
    def eval_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        out = self.model(batch.input)
        self._val_emb.append(out["embedding"].float().cpu())
        self._val_lab.append(batch.label.cpu())
        return out

    def on_epoch_end(self, epoch: int, metrics: dict[str, Any]) -> None:
        """Adds how tight the validation embeddings' classes are (``trainers.losses.tc.class_separation``):
        ``sep_ratio`` (intra / nearest-other distance to the class means of the validation embeddings,
        lower = tighter), ``sep_intra``, ``sep_inter``; with TC also ``tc_hinge_met`` (eq. 10 satisfied
        w.r.t. the TC centres)."""
        if not self._val_emb:
            return
        from ..losses.tc import class_separation

        parts = self.trainer.dist.all_gather_object((torch.cat(self._val_emb), torch.cat(self._val_lab)))
        self._val_emb, self._val_lab = [], []
        emb, lab = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        sep = class_separation(emb, lab)
        metrics.update(sep_intra=sep["intra"], sep_inter=sep["inter"], sep_ratio=sep["ratio"])
        if self.tc is not None and self.centres_ready:
            metrics["tc_hinge_met"] = class_separation(emb, lab, self.tc.centres.cpu(), self.opts.margin)["hinge_met"]

    # ------------------------------------------------------------------ state (centres)
    def state_dict(self) -> dict[str, Any]:
        return {} if self.tc is None else {"centres": self.tc.centres, "centres_ready": int(self.centres_ready)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.tc is None:
            return
        if "centres" not in state:
            raise TrainError("the saved state has no TC centres (a --stage ce run?); resume it with --stage ce")
        self.tc.load_state_dict({"centres": state["centres"]})
        self.centres_ready = bool(state.get("centres_ready", True))
