"""The Method protocol: what a method declares and the hooks the engine calls.

A method is one file in ``trainers/methods/`` (plus its losses in ``trainers/losses/``)::

    @register_method
    class Center(Method):
        \"\"\"CE + centre loss on any backbone.\"\"\"
        name = "center"
        paper = "Wen et al., A Discriminative Feature Learning Approach for Deep Face Recognition, ECCV 2016"

        @dataclass
        class Config:                                  # the method's own flags, each default stated once
            lam: float = opt(0.01, help="weight of the centre loss")
            alpha: float = opt(0.5, help="centre update rate")

        defaults = dict(optimizer="adam", lr=1e-3)     # engine settings the method trains with
        table = {"fer2013": dict(batch_size=128), "rafdb": dict(batch_size=64, lam=0.003)}  # paper, per dataset

        def build_model(self, data):
            self.arch, self.arch_kwargs = "fastcnn", {"num_classes": data.num_classes, "in_chans": data.channels}
            return create_model(self.arch, **self.arch_kwargs)

        def setup(self):
            self.centres = torch.zeros(self.trainer.data.num_classes, self.model.feature_dim, device=self.device)

        def training_step(self, batch):                # under autocast (and DDP); return {"loss": ..., logs}
            f = self.model.forward_features(batch.input)
            out = self.model.forward_head(f)
            ...

``python -m trainers.center --data fer2013`` then works, ``python -m trainers --list`` lists it, and
``tests/test_methods.py`` runs it (short run, exact resume, checkpoint + ONNX, ``--eval-only``, ``--help``).

Hooks, in call order: ``build_model`` -> ``input_spec`` -> ``build_augment`` -> ``build_optimizers`` ->
``stages`` -> ``build_schedules`` -> ``setup`` -> ``momentum_pairs`` -> [resume: ``load_state_dict``, then
weights/optimisers] | [fresh: ``before_training``] -> per stage ``on_stage_start``; per epoch
``on_epoch_start``, per step ``training_step`` (+ backward and optimiser step, unless
``manual_optimization``) -> momentum update -> ``after_step``; ``eval_step`` over the validation split ->
``on_epoch_end``.
"""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

import torch
from torch import nn

from ferengine.preprocess import InputSpec

from ..augment import BatchAugment, augment_config
from ..data.batches import Batch
from ..data.splits import DataInfo
from .config import NoOptions, coerce, config_fields
from .errors import TrainError
from .optim import LRSchedule, Stage, make_optimizer

if TYPE_CHECKING:  # pragma: no cover
    from .loop import Trainer

__all__ = ["Method"]


class Method:
    """Base class of every method. Override what the method needs; see the module doc."""

    name: ClassVar[str] = "method"
    paper: ClassVar[str] = ""                                 # citation, shown by `python -m trainers --list`
    Config: ClassVar[type] = NoOptions                        # the method's own settings (dataclass of opt())
    defaults: ClassVar[dict[str, Any]] = {}                   # TrainConfig fields -> the method's values
    table: ClassVar[dict[str, dict[str, Any]]] = {}           # dataset -> the paper's settings for it
    datasets: ClassVar[tuple[str, ...]] = ()                  # datasets it is meant for (default: table's)
    test_args: ClassVar[tuple[str, ...]] = ()                 # flags for a tiny, fast run (tests/test_methods.py)
    test_data: ClassVar[str] = "fer2013"                      # the dataset fixture tests/test_methods.py uses
    views: ClassVar[int] = 1                                  # augmented views per image (ECAN: 2)
    manual_optimization: ClassVar[bool] = False               # training_step calls trainer.step() itself
    momentum: ClassVar[tuple[float, float | None]] = (0.999, None)  # momentum pairs: base (, final on a cosine)
    unused_parameters: ClassVar[bool] = False                 # some steps leave parameters without gradient
                                                              # (torchrun: DDP must look for them; implied by
                                                              # manual_optimization)

    def __init__(self, cfg: Any):
        self.cfg = cfg
        known = config_fields(self.Config)
        unknown = sorted(set(cfg.extra) - set(known))
        if unknown:
            raise TrainError(f"{self.name}: unknown settings {unknown}; known: {sorted(known)}")
        try:
            self.opts = self.Config(**coerce(self.Config, dict(cfg.extra)))
        except (TypeError, ValueError) as exc:
            raise TrainError(f"{self.name}: {exc}") from None
        self.trainer: Trainer | None = None
        self.arch: str = ""
        self.arch_kwargs: dict[str, Any] = {}

    # -- conveniences
    @property
    def model(self) -> nn.Module:
        """The training network (not wrapped: under torchrun the engine routes ``training_step`` through
        DistributedDataParallel itself)."""
        return self.trainer.model

    @property
    def device(self) -> torch.device:
        return self.trainer.device

    @classmethod
    def summary(cls) -> str:
        return (cls.__doc__ or "").strip().split("\n")[0]

    @classmethod
    def add_args(cls, parser: argparse._ActionsContainer) -> None:
        """Extra spellings of the Config's flags (e.g. ``--no-tc`` for ``--stage ce``); give them
        ``default=argparse.SUPPRESS``. The Config's fields get their flags without this."""

    # -- building
    def build_model(self, data: DataInfo) -> nn.Module:
        """The network to train; set ``self.arch`` / ``self.arch_kwargs`` for the checkpoint."""
        raise NotImplementedError

    def export_model(self) -> nn.Module:
        """The inference network written to best/last checkpoints (rebuildable from arch + arch_kwargs):
        no projection heads, momentum targets or other training-only parts."""
        return self.trainer.model

    def input_spec(self, model: nn.Module, data: DataInfo) -> InputSpec:
        """The checkpoint's input spec: size/channels from the flags, else the model's defaults (the crop and
        ``source_size`` are the engine's to set)."""
        d = dict(getattr(model, "default_input", {}) or {})
        size = self.cfg.input_size or int(d.get("size", data.image_size))
        kw: dict[str, Any] = {"size": size, "channels": data.channels}
        for k in ("mean", "std"):
            if k in d:
                kw[k] = d[k]
        return InputSpec(**kw)  # the engine adds the crop (calibration) and the training faces' source size

    def build_augment(self) -> list[BatchAugment]:
        """One augmentation for all views, or one per view."""
        return [BatchAugment(augment_config(self.cfg.augment, self.cfg.aug))]

    def param_groups(self) -> list[dict[str, Any]]:
        """Param groups of the main optimiser; a group may carry ``lr`` and ``lr_scale``."""
        return [{"params": [p for p in self.model.parameters() if p.requires_grad]}]

    def build_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """``{"main": ...}``; several optimisers need ``manual_optimization`` (AVCE)."""
        c = self.cfg
        return {"main": make_optimizer(c.optimizer, self.param_groups(), lr=c.lr, momentum=c.momentum,
                                       nesterov=c.nesterov, weight_decay=c.weight_decay, betas=c.betas)}

    def stages(self) -> Sequence[Stage]:
        """The stages of training (default: one of ``--epochs``); ESR: one per branch."""
        return [Stage("train", int(self.cfg.epochs))]

    def build_schedules(self, optimizers: dict[str, torch.optim.Optimizer], steps_per_epoch: int,
                        total_steps: int) -> dict[str, LRSchedule]:
        """The engine's lr schedule from the flags, on every optimiser."""
        c = self.cfg
        return {n: LRSchedule(
            o, c.scheduler, total_steps=total_steps, steps_per_epoch=steps_per_epoch,
            warmup_steps=self._warmup_steps(steps_per_epoch, total_steps), floor=c.min_lr / c.lr if c.lr > 0 else 0.0,
            interval=c.schedule_interval, step_size=c.step_size, milestones=c.milestones, gamma=c.gamma,
            mode=self.trainer.best_mode, monitor=c.best_metric, patience=c.plateau_patience,
            threshold=c.plateau_threshold, factor=c.plateau_factor, min_lr=c.min_lr, reload_best=c.reload_best,
            name=n) for n, o in optimizers.items()}

    def _warmup_steps(self, steps_per_epoch: int, total_steps: int) -> int:
        w = int(round(self.cfg.warmup_epochs * steps_per_epoch))
        if w > total_steps // 2:  # a short (smoke) run: a warm-up as long as the run would never reach --lr
            import logging

            logging.getLogger("trainers.engine").warning(
                "%.3g warm-up epochs in a %d-step run; warming up over the first 20%% instead",
                self.cfg.warmup_epochs, total_steps)
            w = total_steps // 5
        return w

    def setup(self) -> None:
        """Everything is built: create queues, centres; ``trainer.register_state`` them."""

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """``[(online, target), ...]`` updated by EMA after every optimiser step (``momentum``)."""
        return []

    def before_training(self) -> None:
        """Fresh runs only (not on resume), before epoch 1: e.g. fill a memory queue by a frozen pass."""

    # -- loop
    def on_stage_start(self, index: int, stage: Stage) -> None:
        """A stage begins (0-based ``index``), before its first epoch: add a branch, set ``lr_scale`` (ESR)."""

    def on_epoch_start(self, epoch: int) -> None:
        """``epoch`` is 1-based."""

    def training_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Forward + losses, under autocast. Return ``{"loss": total, ...logs}``. With
        ``manual_optimization``: call ``self.trainer.step(closure, "main")`` per update and return logs."""
        raise NotImplementedError

    def after_step(self, batch: Batch, logs: dict[str, torch.Tensor]) -> None:
        """After the optimiser step(s) and the momentum update: queue push, centre update."""

    def eval_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Outputs used for evaluation: ``"logits"`` or ``"probs"``, ``"va"``, optional ``"logits_<name>"``.
        Default: the exported network's (:meth:`export_model`), so that the run scores what its checkpoint holds."""
        return self.export_model()(batch.input)

    def on_epoch_end(self, epoch: int, metrics: dict[str, Any]) -> None:
        """After evaluation, before checkpoints and state are written."""

    def training_notes(self) -> list[str]:
        """Facts about this run a reader of the checkpoint must know (e.g. "no pre-training: ..."): stored in
        the checkpoint's training metadata (``notes``) and printed on the model card."""
        return []

    # -- state (resume); tensors and plain containers only
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Called before the weights and optimisers are loaded: rebuild structure (branches) here."""
