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
architecture: attention, widths, embedding size, input size come from it); the centres start afresh
(N(0, 0.01)), as the CE-only stage 1 has none. What "replaced by TC loss" means is ambiguous: the paper
gives SFEW a lambda (0.013), which only matters next to the softmax term of eq. 13, and TC alone would
never train the classifier's last layer; so stage 2 uses eq. 13 (CE + 0.013 TC, m = 13). ``--ce-weight 0``
is the literal reading (TC alone).

Settings (paper 4.2) and their defaults here:

- Adam, lr 1e-3, minimum lr 1e-5; "if the validation accuracy did not increase by at least 0.0005 for
  13 epochs, the learning rate was reduced by a factor of 0.2 and the previous model with the best
  accuracy was reloaded": ``--scheduler plateau --plateau-patience 13 --plateau-threshold 0.05
  --plateau-factor 0.2 --min-lr 1e-5 --reload-best``. The threshold is 0.05 because the engine measures
  accuracy in percent (0.0005 as a fraction). The reload restores the weights and the centres of the
  best epoch (not the Adam moments).
- Per dataset (picked from ``--data``; flags given explicitly win): FER2013 m = 11, lambda = 0.007,
  batch 128; SFEW m = 13, lambda = 0.013, batch 32. Epoch = floor(N / batch) batches of a random
  permutation ("[N/128] batches, with the training samples randomly selected").
- Validation: FER2013 PublicTest selects the best epoch (the paper's "validation"); report PrivateTest
  with ``--eval-only ... --val-split privatetest``. SFEW: Val.
- Input: 96x96 grey in [0, 1] (the checkpoint's input spec: mean 0, std 1); SFEW is read as grey too
  (``--channels 3`` builds an RGB model instead). The paper crops faces with MTCNN; we use the datasets'
  own crops (FER2013's 48 px faces, SFEW's aligned faces) resized to 96.
- TC loss: eq. 9 over the batch, centres N(0, 0.01) updated by eq. 12 with rate ``--centre-lr`` 0.5 after
  each optimiser step (see ``trainers/losses/tc.py`` for the sign of eq. 12 and the rate, which the paper
  does not give).

Departure from the letter of the paper (measured; ``--tc-reduction sum`` restores the letter):

- Eq. 9 writes L_tc as a *sum* over the M items of the batch, while cross-entropy is the usual batch mean.
  Taken literally with lambda = 0.007, m = 11 and batch 128, TC outweighs CE about 100 to 1 (its hinge
  starts at ~m per item: lambda * sum ~ 10 against CE ~ 1.9), and on FER2013 the full model stayed at
  chance for 12 epochs and reached only 46.75 % PublicTest after 40 (H100, `--tc-reduction sum`, Adam 1e-3,
  no lr drop yet). With the batch *mean* (the default here; centre-loss implementations such as
  PaddlePaddle's ``center_loss`` average over the mini-batch too), lambda * TC is a regulariser of ~0.08 next to CE, TC falls (12.1 -> 8.5 per item, active items
  100 % -> 73 %) and the run tracks the CE-only ablation: PublicTest at epoch 22 was 61.7 % (mean),
  62.1 % (CE only) and 28.6 % (sum), same machine and settings otherwise.

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
import json
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ferengine import checkpoint as ckpt
from ferengine.labels import canonical
from ferengine.models import create_model
from ferengine.models.daf import daf_cnn
from ferengine.preprocess import InputSpec

from .engine import Batch, DataInfo, Method, TrainError, json_object
from .engine import main as engine_main
from .losses.tc import TripletCentreLoss

log = logging.getLogger("trainers.daf")

__all__ = ["DAF", "DATA_DEFAULTS", "main"]

ARCH = "daf_cnn"
# per-dataset paper settings (section 4.2); anything not listed uses DAF.defaults (the FER2013 ones)
DATA_DEFAULTS: dict[str, dict[str, Any]] = {
    "fer2013": dict(batch_size=128, margin=11.0, lam=0.007),
    "sfew": dict(batch_size=32, margin=13.0, lam=0.013, out="runs/daf_sfew"),
}


class DAF(Method):
    """DAF-CNN: VGG-style CNN + 3D attention, trained with cross-entropy + lambda x triplet-centre loss."""

    name = "daf"
    defaults = dict(
        epochs=100, batch_size=128, optimizer="adam", lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0,
        scheduler="plateau", plateau_patience=13, plateau_threshold=0.05, plateau_factor=0.2, min_lr=1e-5,
        reload_best=True, best_metric="accuracy", label_smoothing=0.0,
        augment="standard", aug={"brightness": 0.0, "contrast": 0.0, "erase": 0.0},
        out="runs/daf", margin=11.0, lam=0.007,
    )

    @classmethod
    def for_data(cls, data: str | None) -> type["DAF"]:
        """This method with ``data``'s paper settings as its defaults (FER2013's for other datasets)."""
        try:
            from trainers.data import canonical_name

            key = canonical_name(data) if data else "fer2013"
        except Exception:  # unknown name: the engine reports it properly later
            key = "fer2013"
        over = DATA_DEFAULTS.get(key, {})
        if not over:
            return cls
        return type(cls.__name__, (cls,), {"defaults": {**cls.defaults, **over}, "__doc__": cls.__doc__,
                                            "__module__": cls.__module__})

    @classmethod
    def add_args(cls, parser: argparse._ActionsContainer) -> None:
        parser.add_argument("--stage", choices=("tc", "ce"), default="tc",
                            help="tc: CE + lambda * TC (eq. 13; DAF-CNN, and SFEW fine-tuning); ce: cross-entropy "
                                 "only (the SFEW recipe's FER2013 pre-training, Table 1's NOtcl rows)")
        parser.add_argument("--no-tc", dest="stage", action="store_const", const="ce",
                            help="ablation: no triplet-centre loss (same as --stage ce)")
        parser.add_argument("--attention", action=argparse.BooleanOptionalAction, default=None,
                            help="the 3D attention module (default: on, or as in --init's checkpoint); "
                                 "--no-attention is Table 1's NOatt ablation")
        parser.add_argument("--margin", type=float, help="TC margin m (FER2013 11, SFEW 13)")
        parser.add_argument("--lam", type=float, help="TC weight lambda in CE + lambda TC (FER2013 0.007, SFEW 0.013)")
        parser.add_argument("--ce-weight", type=float, default=1.0,
                            help="weight of the cross-entropy term (0: TC alone, the literal 'softmax replaced by TC')")
        parser.add_argument("--centre-lr", type=float, default=0.5, help="centre update rate alpha (eq. 12)")
        parser.add_argument("--centre-init-std", type=float, default=0.01, help="centres start as N(0, std^2)")
        parser.add_argument("--tc-reduction", choices=("sum", "mean"), default="mean",
                            help="TC over the batch: mean (default: trains; see the module notes) or sum "
                                 "(eq. 9 as printed: with lambda 0.007 it swamps CE and stalls training)")
        parser.add_argument("--init", metavar="CKPT", default=None,
                            help="start from this checkpoint's weights and architecture (SFEW: a FER2013 model)")
        parser.add_argument("--embedding-dim", type=int, default=None, help="size of FC_1, the TC embedding (512)")
        parser.add_argument("--width", type=float, default=None, help="multiplier of the channel widths 64..512 (1)")
        parser.add_argument("--dropout", type=float, default=0.5, help="dropout before each of the two FC layers")
        parser.add_argument("--arch-kwargs", type=json_object, default={}, metavar="JSON",
                            help="further daf_cnn arguments: head_pool (flatten|avg), embedding_relu, "
                                 "attention_mlp_act (relu|none), reduction, spatial_kernel")

    # ------------------------------------------------------------------ building
    @property
    def use_tc(self) -> bool:
        return self.cfg.extra.get("stage", "tc") == "tc"

    def _resolved(self, key: str) -> Any:
        v = self.cfg.extra.get(key)
        if v is None:
            v = DATA_DEFAULTS["fer2013"][key]
        return v

    def build_model(self, data: DataInfo) -> nn.Module:
        x = self.cfg.extra
        kwargs: dict[str, Any] = {
            "num_classes": data.num_classes, "in_chans": self.cfg.channels or 1,
            "attention": True if x.get("attention") is None else bool(x["attention"]),
            "embedding_dim": x.get("embedding_dim") or 512, "dropout": float(x.get("dropout", 0.5)),
            "width": x.get("width") or 1.0, "input_size": self.cfg.input_size or 96,
        }
        kwargs.update(x.get("arch_kwargs") or {})
        init = x.get("init")
        state = None
        if init:
            kwargs, state = self._from_init(init, kwargs, data)
        elif self.cfg.data and "sfew" in str(self.cfg.data).lower():
            log.warning("training on SFEW from scratch; the paper fine-tunes a FER2013 model (--init CKPT)")
        self.arch = ARCH
        try:
            model = create_model(ARCH, **kwargs)
        except (TypeError, ValueError) as exc:
            raise TrainError(f"cannot build {ARCH} with {kwargs}: {exc}") from None
        if state is not None:
            model.load_state_dict(state)
            log.info("initialised from %s", init)
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
        x = self.cfg.extra
        given = {"attention": x.get("attention"), "embedding_dim": x.get("embedding_dim"), "width": x.get("width"),
                 "in_chans": self.cfg.channels, "input_size": self.cfg.input_size, **(x.get("arch_kwargs") or {})}
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
        kw: dict[str, Any] = {"size": int(d["size"]), "channels": int(d["channels"]),
                              "mean": d["mean"], "std": d["std"]}
        if self.cfg.crop_margin is not None:
            kw["crop_margin"] = self.cfg.crop_margin
        return InputSpec(**kw)

    def setup(self) -> None:
        self.tc: TripletCentreLoss | None = None
        if self.use_tc:
            x = self.cfg.extra
            g = torch.Generator().manual_seed(self.cfg.seed + 104729)
            self.tc = TripletCentreLoss(
                self.trainer.data.num_classes, self.model.feature_dim, margin=self._resolved("margin"),
                centre_lr=float(x.get("centre_lr", 0.5)), reduction=x.get("tc_reduction", "mean"),
                init_std=float(x.get("centre_init_std", 0.01)), generator=g).to(self.device)
        log.info("DAF-CNN: stage %s (%s), attention %s%s", "tc" if self.use_tc else "ce",
                 "CE + lambda TC" if self.use_tc else "cross-entropy only", self.arch_kwargs.get("attention"),
                 f", m={self.tc.margin:g}, lambda={self._resolved('lam'):g}, centre lr {self.tc.centre_lr:g}, "
                 f"reduction {self.tc.reduction}" if self.tc is not None else "")

    # ------------------------------------------------------------------ loop
    def training_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        out = self.model(batch.input)
        valid = batch.label >= 0
        ce = F.cross_entropy(out["logits"].float()[valid], batch.label[valid], label_smoothing=self.cfg.label_smoothing)
        ce_w = float(self.cfg.extra.get("ce_weight", 1.0))
        logs: dict[str, torch.Tensor] = {"ce": ce.detach()}
        loss = ce * ce_w if ce_w != 1.0 else ce
        if self.tc is not None:
            self.tc.train()
            r = self.tc(out["embedding"].float(), batch.label)
            loss = loss + float(self._resolved("lam")) * r.loss
            logs.update(tc=r.loss.detach(), tc_active=r.active_fraction,
                        centre_norm=self.tc.centres.norm(dim=1).mean())
        logs["loss"] = loss
        return logs

    def after_step(self, batch: Batch, logs: dict[str, torch.Tensor]) -> None:
        if self.tc is not None:
            self.tc.update_centres()  # eq. 12, with the centres and embeddings of this step's forward

    # ------------------------------------------------------------------ state (centres)
    def state_dict(self) -> dict[str, Any]:
        return {} if self.tc is None else {"centres": self.tc.centres}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.tc is None:
            return
        if "centres" not in state:
            raise TrainError("the saved state has no TC centres (a --stage ce run?); resume it with --stage ce")
        self.tc.load_state_dict({"centres": state["centres"]})


def _data_of(argv: Sequence[str]) -> str | None:
    """``--data`` from the command line, or (``--resume``) from the run's args.json."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--data")
    pre.add_argument("--out")
    pre.add_argument("--resume", action="store_true")
    ns, _ = pre.parse_known_args(list(argv))
    if ns.data:
        return ns.data
    if ns.resume:
        out = Path(ns.out or DAF.defaults["out"])
        try:
            return json.loads((out / "args.json").read_text())["config"]["data"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
    return None


def main(argv: Sequence[str] | None = None, **kwargs: Any) -> int:
    """``python -m trainers.daf``: the engine's command line with the dataset's paper defaults."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return engine_main(DAF.for_data(_data_of(argv)), argv, **kwargs)


if __name__ == "__main__":
    raise SystemExit(main())
