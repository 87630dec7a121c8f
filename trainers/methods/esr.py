"""ESR, the ensemble with shared representations (Siqueira, Magg & Wermter, AAAI 2020), with the diversified
features of papers/diversified_features.md (METHODS.md section 5): CBAM after every branch conv and the
determinant diversity of the branches' channel and spatial attention (eq. 4), on the shared engine.

    python -m trainers.esr --data ferplus --branches 9                 # diversified ESR-9* (the paper's)
    python -m trainers.esr --data ferplus --branches 15                # ESR-15*
    python -m trainers.esr --data ferplus --plain                      # upstream ESR-9: no CBAM, no diversity
    python -m trainers.esr --data ferplus --no-diversity               # CBAM, no diversity (Table 1's row 2)
    python -m trainers.esr --data ferplus --diversity spatial          # spatial diversity only (row 3)
    python -m trainers.esr --data affectnet --data-opt task=both        # + upstream ESR's AV head (fc 8 -> 2)

The network (``ferengine.models.esr``): a shared base (4 convs, 96 px -> 128 x 20 x 20) and B branches (4
convs, GAP, fc 512 -> classes; CBAM after each conv; fc classes -> 2 for arousal/valence when the data has AV).
Training is upstream ESR's: the base and branch 1 train for ``--first-epochs`` (50) at lr 0.1; then each new
branch trains at lr 0.1 while the base and the branches before it continue at ``--old-lr`` (0.01), for
``--branch-epochs`` (20) each, until there are ``--branches``. Every stage starts its StepLR(10, 0.5) afresh
and a fresh SGD (momentum 0.9: the buffers are cleared), and, as upstream, it starts from the best ensemble so
far (``--reload-best-stage``; the best by validation accuracy, on the selection split). Batch 32, ColorJitter
(brightness and contrast 0.5), horizontal flip, RandomAffine(30 deg, translate 0.1, scale 1-1.25).

The loss of a step (eq. 4): the sum over the branches present of their cross-entropy (and of their AV MSE when
the data has AV), minus D_ch + D_sp, the determinants of the B x B similarity matrices (eq. 1, gamma 10, the
diagonal exp(0) = 1: see ``trainers.losses.diversity``) of the last CBAM's channel attention (512) and
spatial attention (6 x 6) of every branch, once there are two branches.

The checkpoint is the whole ensemble, one model: ``"probs"`` is the majority vote (``--vote majority``, the
paper's) or the mean of the branches' softmax (``--vote mean``); both are in the exported graph. Validation
also reports the mean vote (``val_accuracy_mean``) and each branch alone (``val_accuracy_b1`` ...).

Where we differ from the diversified fork (negarhdr/Diversified-Facial-Expression-Recognition), on purpose,
each tested in tests/test_esr_method.py:

- its similarity matrix leaves the diagonal at 0, so ``det`` rewards three alike branches; ours is eq. 1's 1;
- its FER+ script computes the "channel" diversity from the *spatial* attention (``criterion_div(attn_sp,
  type='channel')``); ours uses the channel attention for D_ch;
- its CBAM call returns three values from a module that does not construct with its arguments; ours is one
  CBAM (``ferengine.models.esr.CBAM``) returning the map and both attentions;
- it drops upstream ESR's AV head; ours keeps it.

Not copied: the fork and upstream cap FER+ training at 5,000 faces per class, re-drawn per branch
(``max_loaded_images_per_label``); here every training face is used every epoch. The paper's FER+ ESRs were
trained on AffectNet first and fine-tuned on FER+ (section 4); this trains from scratch on the data given
(``--init`` continues from a checkpoint instead).
"""
from __future__ import annotations

import argparse
import logging
import shutil
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ferengine.fileio import atomic_write
from ferengine.models import create_model
from ferengine.models.esr import ESR, VOTES

from ..augment import AUGMENT_PRESETS, AugmentConfig, BatchAugment, with_overrides
from ..engine import BEST_FILE, Batch, DataInfo, Method, TrainError, opt
from ..engine.optim import Stage, StagePlan
from ..losses.ce import va_loss
from ..losses.diversity import diversity
from . import register_method

log = logging.getLogger("trainers.esr")

__all__ = ["ESRMethod", "PAPER_AUGMENT", "esr_loss"]

# upstream ESR's and the fork's transforms: ColorJitter(brightness=0.5, contrast=0.5), RandomHorizontalFlip,
# RandomAffine(degrees=30, translate=(.1, .1), scale=(1.0, 1.25)) with black fill
PAPER_AUGMENT = AugmentConfig(hflip=0.5, rotate=30, scale=(1.0, 1.25), affine_translate=0.1, affine_p=1.0,
                              brightness=0.5, contrast=0.5, padding="zeros")
DIVERSITY = ("channel", "spatial")


def esr_loss(out: dict[str, torch.Tensor], label: torch.Tensor, va: torch.Tensor | None, *, gamma: float,
             kinds: tuple[str, ...], va_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """Eq. 4 on an ESR forward ``out``: sum over branches of CE (+ ``va_weight`` x AV MSE) - (D_ch + D_sp).

    ``kinds``: which diversities are subtracted ("channel": the last CBAM's channel attention, (N, B, C);
    "spatial": its spatial attention, (N, B, H*W)); nothing with one branch or no CBAM."""
    logits = out["branch_logits"].float()                                   # (N, B, K)
    n_branch = logits.shape[1]
    valid = label >= 0
    ce = torch.zeros((), device=logits.device)
    if bool(valid.any()):
        ce = sum(F.cross_entropy(logits[valid, b], label[valid]) for b in range(n_branch))
    logs = {"ce": ce.detach() / n_branch}
    loss = ce
    if va is not None and "branch_va" in out:
        mse = sum(va_loss(out["branch_va"][:, b], va) for b in range(n_branch))
        logs["va_mse"] = mse.detach() / n_branch
        loss = loss + float(va_weight) * mse
    if n_branch > 1 and kinds:
        for k in kinds:
            key = "channel_attention" if k == "channel" else "spatial_attention"
            if key not in out:
                raise TrainError(f"esr: --diversity {k} needs CBAM in the branches (not --plain / --no-cbam)")
            att = out[key]
            d = diversity([att[:, b] for b in range(n_branch)], gamma)
            logs[f"d_{k}"] = d.detach()
            loss = loss - d
    logs["loss"] = loss
    return logs


@register_method
class ESRMethod(Method):
    """ESR ensemble (shared base + branches added one by one) with CBAM and branch-diversity loss (eq. 4)."""

    name = "esr"
    paper = ("Siqueira, Magg & Wermter, Efficient Facial Feature Learning with Wide Ensemble-based CNNs, AAAI 2020; "
             "diversified: papers/diversified_features.md (eqs. 1-4)")
    datasets = ("ferplus", "affectnet", "rafdb", "fer2013", "sfew", "folder")
    test_args = ("--branches", "2", "--first-epochs", "1", "--branch-epochs", "1", "--width", "0.125",
                 "--reduction", "4", "--input-size", "64", "--vote", "mean", "--batch-size", "8")

    @dataclass
    class Config:
        branches: int = opt(9, lo=1, hi=64, help="ensemble size B (the paper: ESR-9, ESR-15)")
        first_epochs: int = opt(50, lo=1, help="epochs of the base and the first branch")
        branch_epochs: int = opt(20, lo=1, help="epochs of each branch added after the first")
        old_lr: float = opt(0.01, lo=0.0, help="lr of the base and the earlier branches while a new branch trains "
                                               "(the new one: --lr)")
        cbam: bool = opt(True, help="CBAM (reduction --reduction) after every branch conv; --no-cbam: upstream ESR's "
                                    "branches")
        diversity: tuple[str, ...] = opt(DIVERSITY, help="attention diversities subtracted from the loss: channel, "
                                                         "spatial (both: the paper's ESR*)")
        plain: bool = opt(False, help="upstream ESR: no CBAM and no diversity")
        div_gamma: float = opt(10.0, lo=0.0, lo_open=True, help="gamma of the similarity kernel (eq. 1)")
        vote: Literal["majority", "mean"] = opt("majority", help="the checkpoint's prediction: majority vote (the "
                                                                 "paper's) or mean of the branches' probabilities")
        width: float = opt(1.0, lo=0.0, lo_open=True, hi=8.0, help="channel-width multiplier (CPU studies)")
        reduction: int = opt(16, lo=1, hi=1024, help="CBAM's channel reduction")
        va_weight: float = opt(1.0, lo=0.0, help="weight of the AV MSE (data with valence/arousal)")
        reload_best_stage: bool = opt(True, help="each new branch starts from the best ensemble so far (upstream)")
        init: str | None = opt(None, metavar="CKPT", help="start from this ESR checkpoint (its branches are kept; "
                                                          "training adds branches up to --branches)")

    defaults = dict(
        epochs=50 + 8 * 20, batch_size=32, optimizer="sgd", lr=0.1, momentum=0.9, nesterov=False, weight_decay=0.0,
        scheduler="step", step_size=10, gamma=0.5, warmup_epochs=0.0, input_size=96, augment="paper",
        label_smoothing=0.0, best_metric="accuracy",
    )
    table = {
        "ferplus": dict(out="runs/esr_ferplus"),
        "affectnet": dict(out="runs/esr_affectnet"),
        "rafdb": dict(out="runs/esr_rafdb"),
    }

    @classmethod
    def add_args(cls, parser: argparse._ActionsContainer) -> None:
        parser.add_argument("--no-diversity", dest="diversity", action="store_const", const=(),
                            default=argparse.SUPPRESS, help="ablation: no diversity term, CBAM stays (= --diversity "
                                                            "with no kinds)")

    def __init__(self, cfg: Any):
        super().__init__(cfg)
        o = self.opts
        if cfg.augment != "paper" and cfg.augment not in AUGMENT_PRESETS:
            raise TrainError(f"esr: --augment {cfg.augment!r}: expected paper (upstream ESR's) or one of "
                             f"{sorted(AUGMENT_PRESETS)}")
        bad = sorted(set(o.diversity) - set(DIVERSITY))
        if bad:
            raise TrainError(f"esr: --diversity {','.join(bad)}: expected channel and/or spatial")
        if o.plain:
            o.cbam = False
        self.kinds: tuple[str, ...] = () if o.plain else tuple(dict.fromkeys(o.diversity))
        if self.kinds and not o.cbam:
            raise TrainError("esr: the diversity loss compares the branches' CBAM attention; --no-cbam needs "
                             "--no-diversity (or --plain)")
        if o.vote not in VOTES:
            raise TrainError(f"esr: --vote {o.vote!r}: expected one of {VOTES}")

    # ------------------------------------------------------------------ building
    def build_model(self, data: DataInfo) -> nn.Module:
        o = self.opts
        size = int(self.cfg.input_size or 96)
        if size < 54:
            raise TrainError(f"esr: --input-size {size} is too small: the base and branch convs have no padding and "
                             "need at least 54 px (96 is the paper's)")
        if o.init:
            model = self._init_from(o.init, data)
        else:
            kwargs: dict[str, Any] = {"num_classes": data.num_classes, "in_chans": int(self.cfg.channels or data.channels),
                                      "av_head": bool(data.has_va), "branches": 1, "cbam": bool(o.cbam),
                                      "vote": o.vote, "reduction": int(o.reduction)}
            if float(o.width) != 1.0:
                kwargs["width"] = float(o.width)
            try:
                model = create_model("esr", **kwargs)
            except (TypeError, ValueError) as exc:
                raise TrainError(f"cannot build esr with {kwargs}: {exc}") from None
            self.arch_kwargs = kwargs
        self.arch = "esr"
        self.start_branches = len(model.branches)
        if self.start_branches > int(o.branches):
            raise TrainError(f"esr: --init holds {self.start_branches} branches, more than --branches {o.branches}")
        return model

    def _init_from(self, path: str, data: DataInfo) -> ESR:
        from ferengine import checkpoint as ck

        try:
            loaded = ck.load(path)
        except ck.CheckpointError as exc:
            raise TrainError(f"--init: {exc}") from None
        if loaded.info.arch != "esr":
            raise TrainError(f"--init {path}: a {loaded.info.arch} checkpoint; esr continues ESR checkpoints only")
        if list(loaded.info.labels) != list(data.label_names):
            raise TrainError(f"--init {path}: its classes {loaded.info.labels} are not {data.name}'s "
                             f"{list(data.label_names)}")
        model = loaded.model.train()
        self.arch_kwargs = dict(loaded.info.arch_kwargs)
        model.vote = self.opts.vote
        self.arch_kwargs["vote"] = self.opts.vote
        return model

    def build_augment(self) -> list[BatchAugment]:
        if self.cfg.augment != "paper":
            return super().build_augment()
        try:
            return [BatchAugment(with_overrides(PAPER_AUGMENT, self.cfg.aug))]
        except ValueError as exc:
            raise TrainError(f"--aug: {exc}") from None

    def param_groups(self) -> list[dict[str, Any]]:
        m: ESR = self.model
        groups = [{"params": list(m.base.parameters())}]
        groups += [{"params": list(b.parameters())} for b in m.branches]
        if len(m.branches) > 1:  # an --init with several branches: all but the newest are "old"
            scale = float(self.opts.old_lr) / float(self.cfg.lr) if self.cfg.lr > 0 else 0.0
            for g in groups[:-1]:
                g["lr_scale"] = scale
        return groups

    def stages(self) -> list[Stage]:
        o = self.opts
        first = self.start_branches
        out = [Stage(f"branches 1-{first}" if first > 1 else "branch 1",
                     int(o.first_epochs) if first == 1 else int(o.branch_epochs))]
        out += [Stage(f"branch {k}", int(o.branch_epochs), restart_schedule=True)
                for k in range(first + 1, int(o.branches) + 1)]
        planned = sum(s.epochs for s in out)
        want = int(self.cfg.epochs)
        if want != planned and want != int(self.defaults["epochs"]):
            if want < len(out):
                raise TrainError(f"esr: --epochs {want} cannot hold {len(out)} stages (one per branch); give at least "
                                 f"{len(out)}, or set the plan with --first-epochs/--branch-epochs")
            plan = StagePlan(out)
            plan.fit(0, want)
            log.info("ESR: --epochs %d: the stages %s scaled to %s", want, [s.epochs for s in out], plan.lengths())
            out = plan.stages
        return out

    def setup(self) -> None:
        o, m = self.opts, self.model
        n = lambda mod: sum(p.numel() for p in mod.parameters()) / 1e6  # noqa: E731
        log.info("ESR: %d -> %d branches (%s), vote %s, diversity %s (gamma %g); base %.2fM params, branch %.2fM; "
                 "stages %s", len(m.branches), o.branches, "CBAM" if o.cbam else "no CBAM", o.vote,
                 "+".join(self.kinds) or "off", o.div_gamma, n(m.base), n(m.branches[0]), self.trainer.plan.lengths())

    # ------------------------------------------------------------------ stages
    def _add_branch(self) -> None:
        """A new branch: trained at --lr, the base and the earlier branches at --old-lr (a fresh SGD)."""
        t, m = self.trainer, self.model
        b = m.add_branch().to(self.device)
        if self.cfg.channels_last:
            b.to(memory_format=torch.channels_last)
        opt_ = t.optimizers["main"]
        scale = float(self.opts.old_lr) / float(self.cfg.lr) if self.cfg.lr > 0 else 0.0
        for g in opt_.param_groups:
            g["lr_scale"] = scale
        t.add_param_group("main", {"params": list(b.parameters()), "lr": float(self.cfg.lr), "lr_scale": 1.0,
                                   "initial_lr": float(self.cfg.lr)})
        self.arch_kwargs["branches"] = len(m.branches)

    def on_stage_start(self, index: int, stage: Stage) -> None:
        """Upstream's branch change: keep the finished stage's best ensemble (``best_esr{k}.safetensors``), start
        from it, add a branch with a fresh SGD, and select the next stage's best afresh."""
        if index == 0:
            return
        t = self.trainer
        k = len(self.model.branches)
        if t.best_epoch > 0:
            if t.dist.is_main and (t.out / BEST_FILE).exists():
                kept = t.out / f"best_esr{k}.safetensors"
                atomic_write(kept, lambda tmp: shutil.copyfile(t.out / BEST_FILE, tmp))
                log.info("ESR: the best %d-branch ensemble (epoch %d, %s %.4g) kept as %s", k, t.best_epoch,
                         self.cfg.best_metric, t.best_value, kept.name)
            if self.opts.reload_best_stage:
                t.reload_best()
                log.info("ESR: branch %d starts from the best %d-branch ensemble (epoch %d)", k + 1, k, t.best_epoch)
        t.reset_best()  # each stage selects its own best ensemble: best.safetensors ends as the whole ensemble's
        t.optimizers["main"].state.clear()  # upstream builds a new SGD for every branch
        self._add_branch()
        log.info("ESR: branch %d added (lr %g; base and branches 1-%d at %g)", k + 1, self.cfg.lr, k,
                 self.opts.old_lr)

    # ------------------------------------------------------------------ loop
    def training_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        out = self.model(batch.input)
        return esr_loss(out, batch.label, batch.va, gamma=float(self.opts.div_gamma), kinds=self.kinds,
                        va_weight=float(self.opts.va_weight))

    def eval_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        out = self.model(batch.input)
        res = {"probs": out["probs"]}
        if "va" in out:
            res["va"] = out["va"]
        logits = out["branch_logits"].float()
        res["logits_mean"] = torch.softmax(logits, -1).mean(1)
        if self.model.vote == "mean":
            res["logits_majority"] = F.one_hot(logits.argmax(-1), logits.shape[-1]).float().mean(1)
        for b in range(logits.shape[1]):
            res[f"logits_b{b + 1}"] = logits[:, b]
        return res

    # ------------------------------------------------------------------ state (resume, reload)
    def state_dict(self) -> dict[str, Any]:
        return {"branches": torch.tensor(len(self.model.branches))}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        want = int(state.get("branches", len(self.model.branches)))
        while len(self.model.branches) < want:
            self._add_branch()

    # ------------------------------------------------------------------ notes
    def training_notes(self) -> list[str]:
        o, m = self.opts, self.model
        kind = "diversified ESR (CBAM" + (f", diversity {'+'.join(self.kinds)})" if self.kinds else ", no diversity)") \
            if o.cbam else "plain ESR (no CBAM, no diversity)"
        notes = [f"ESR-{len(m.branches)}: {kind}; prediction by {'majority vote' if m.vote == 'majority' else 'mean of the branch probabilities'}"]
        if not o.init:
            notes.append("trained from scratch on the data given (the paper's FER+ ESRs were pre-trained on AffectNet)")
        return notes
