"""The one training loop: :class:`Trainer` builds a run from a config and a method, :meth:`Trainer.fit`
trains it (after torchvision's ``references/classification/train.py``: ``train_one_epoch`` / ``evaluate`` /
``fit``). Under ``torchrun`` the method's ``training_step`` runs inside DistributedDataParallel, each
process on its share of every batch; the main process alone writes files and logs."""
from __future__ import annotations

import logging
import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..data.base import DatasetError
from ..data.batches import Batch, Batches, TensorBatches, make_batches
from ..data.splits import load_data
from ..evaluate import evaluate
from . import checkpointing as files
from . import logs
from .errors import TrainError
from .method import Method
from .optim import StagePlan
from .runtime import Dist, amp_dtype_for, eval_autocast, rng_state, seed_everything, select_device, set_rng_state

log = logging.getLogger("trainers.engine")

__all__ = ["Trainer", "benchmark_batches", "check_out", "read_state"]


def check_out(out: Path, resume: bool = False) -> None:
    """The run folder can be used: not a file, and (without ``--resume``) holding no run already."""
    if out.exists() and not out.is_dir():
        raise TrainError(f"--out {out} is a file, not a folder; give a folder for the run's files "
                         "(checkpoints, logs, state.pt)")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise TrainError(f"--out {out}: {parent} is a file, not a folder; give another --out")
            break
    state = out / files.STATE_FILE
    if not resume and state.exists():
        raise TrainError(f"{out} already holds a run ({files.STATE_FILE}); pass --resume to continue it, "
                         "or choose another --out")


def read_state(path: Path) -> dict[str, Any]:
    """``state.pt`` as plain tensors and containers (``weights_only``: a file holding code is refused,
    never run); a clear error for an empty, damaged or foreign file."""
    what = "resume from an intact copy (e.g. a backup), or start a new run in another --out"
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise TrainError(f"{path}: cannot read the training state ({exc.strerror or exc}); {what}") from None
    if size == 0:
        raise TrainError(f"{path}: the training state is empty (0 bytes; a write that never finished?); {what}")
    try:
        s = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as exc:
        raise TrainError(f"{path}: cannot read the training state ({exc.strerror or exc}); {what}") from None
    except Exception as exc:  # noqa: BLE001 - torch/pickle raise many types for a damaged or hostile file
        text = " ".join(str(exc).split())
        if "weights_only" in text or "Unsupported global" in text or "GLOBAL" in text:
            why = "it holds Python objects (code), which are never loaded"
        else:
            why = f"damaged or not a torch file ({type(exc).__name__}: {text[:160]})"
        raise TrainError(f"{path}: not a training state this engine can load: {why}; {what}") from None
    if not isinstance(s, dict):
        raise TrainError(f"{path}: not a training state written by this engine (a {type(s).__name__}); {what}")
    return s


class _StepModule(nn.Module):
    """What DistributedDataParallel wraps: the training model, and a forward that runs any function of the
    method (``training_step``, or a manual method's closure), so that all its model calls are one DDP pass."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(*args)


class Trainer:
    """Builds a run from a config and a method, then :meth:`fit` trains it.

    ``datasets=(train, val)`` uses in-memory datasets instead of ``--data`` (tests, notebooks);
    ``callbacks`` are objects with optional ``on_step_end(trainer, epoch, step)`` and
    ``on_epoch_end(trainer, epoch, row)`` (after the metrics row is logged, before ``state.pt``).
    ``dist``: the processes of a torchrun launch (:func:`~trainers.engine.runtime.init_distributed`).
    """

    def __init__(self, cfg: Any, method: Method | type[Method], *, datasets: tuple[Any, Any] | None = None,
                 callbacks: Sequence[Any] = (), argv: Sequence[str] | None = None, dist: Dist | None = None):
        self.method = method(cfg) if isinstance(method, type) else method
        self.method.trainer = self
        cfg.method = cfg.method or self.method.name
        self.cfg = cfg
        self.dist = dist or Dist()
        self.callbacks = list(callbacks)
        self.argv = list(argv) if argv is not None else [sys.executable, *sys.argv]
        self.out = Path(cfg.out)
        self.state_path = self.out / files.STATE_FILE
        self._check_out()
        seed_everything(cfg.seed)
        self.device = select_device(cfg.device, self.dist.local_rank)
        self.amp_dtype = amp_dtype_for(cfg.amp, cfg.amp_dtype, self.device)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = not cfg.deterministic
            if cfg.deterministic:
                torch.use_deterministic_algorithms(True, warn_only=True)
        self.best_mode = self._best_mode()
        self.extra_state: dict[str, Any] = {}
        self.epoch = 0            # completed epochs
        self.global_step = 0
        self.best_value: float | None = None
        self.best_epoch = 0
        self.resumed = False
        self.data_ips: float | None = None
        self.metrics_log = logs.MetricsLog(self.out, enabled=cfg.tensorboard and self.dist.is_main)
        self.first_argv, self.resume_argvs = self.argv, []  # the command that started the run, and resumes

        try:
            self.train_ds, self.val_ds, self.data = load_data(
                cfg.data, cfg.data_dir, train_split=cfg.train_split, val_split=cfg.val_split, opts=cfg.data_opts,
                limit_train=cfg.limit_train, limit_val=cfg.limit_val, seed=cfg.seed, channels=cfg.channels,
                datasets=datasets, drop_copies_of=cfg.drop_copies_of, input_size=cfg.input_size)
        except DatasetError as exc:
            raise TrainError(str(exc)) from None
        self.copies = None  # the validation items with an exact copy in the training data (as trained on)
        if self.val_ds is not None:
            from ..data.leakage import find_copies

            self.copies = find_copies(self.val_ds, self.train_ds, self.data.train_split)
            if self.copies.count:
                log.warning("%s: its metrics are reported for the whole split and for the %d items with no copy "
                            "(val_no_copy_*); --drop-copies-of %s removes the copies from training",
                            self.copies.describe(self.data.val_split), len(self.copies.mask) - self.copies.count,
                            self.data.val_split)
        self.model = self.method.build_model(self.data).to(self.device)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.spec, self.crop = self._input_spec()
        bs, world = cfg.batch_size, self.dist.world_size
        if world > 1 and bs % world:
            raise TrainError(f"--batch-size {bs} does not split over {world} processes; use a multiple of {world}")
        shard = dict(rank=self.dist.rank, world=world)
        self.train_batches = make_batches(
            self.train_ds, self.spec, self.device, bs, augment=self.method.build_augment(),
            views=self.method.views, shuffle=True, drop_last=len(self.train_ds) > bs, seed=cfg.seed,
            workers=cfg.workers, **shard)
        self.val_batches = None if self.val_ds is None else make_batches(
            self.val_ds, self.spec, self.device, cfg.eval_batch_size or 2 * bs, seed=cfg.seed, workers=cfg.workers,
            **shard)
        for b in (self.train_batches, self.val_batches):
            if b is not None:
                b.channels_last = cfg.channels_last
        self.optimizers = self.method.build_optimizers()
        if len(self.optimizers) > 1 and not self.method.manual_optimization:
            raise TrainError(f"{self.method.name}: {len(self.optimizers)} optimisers {sorted(self.optimizers)} need "
                             "manual_optimization = True (training_step calls trainer.step per optimiser)")
        self.plan = StagePlan(self.method.stages())
        self.cfg.epochs = self.plan.total
        self.steps_per_epoch = len(self.train_batches)
        self.schedules = self.method.build_schedules(self.optimizers, self.steps_per_epoch,
                                                     self.schedule_total(0))
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.method.setup()
        pairs = self.method.momentum_pairs()
        self.momentum = None
        if pairs:
            from ..modules.momentum import MomentumPairs

            base, final = self.method.momentum
            self.momentum = MomentumPairs(pairs, base, final, total_steps=self.plan.total * self.steps_per_epoch)
        self._ddp = None
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            unused = self.method.manual_optimization or self.method.unused_parameters
            self._ddp = DistributedDataParallel(_StepModule(self.model), device_ids=ids,
                                                find_unused_parameters=unused)
        n_params = sum(p.numel() for p in self.model.parameters())
        log.info("model: %s %s (%.2fM params), input %s; device %s%s%s", self.method.arch or type(self.model).__name__,
                 self.method.arch_kwargs, n_params / 1e6, self.spec.to_dict(), self.device,
                 f", AMP {self.amp_dtype}" if self.amp_dtype else "",
                 f", {world} processes ({self.dist.backend})" if world > 1 else "")
        if cfg.resume:
            if not self.state_path.is_file():
                raise TrainError(f"--resume: {self.out} holds no {files.STATE_FILE}, so there is nothing to resume; "
                                 "give the --out of the run to continue, or drop --resume to start a new run")
            files.load_state(self, read_state(self.state_path))

    def _input_spec(self) -> tuple[Any, dict[str, Any] | None]:
        """The method's input spec + the crop the training faces correspond to (a calibration) + the size
        the training faces had (in-memory datasets resized to the model's input: FER2013's 48 px)."""
        import dataclasses

        from ..data.crops import crop_settings

        spec = self.method.input_spec(self.model, self.data)
        cfg = self.cfg
        try:
            crop = crop_settings(cfg.data, cfg.crop_calibration, cfg.crop_margin, cfg.crop_offset_y)
        except DatasetError as exc:
            raise TrainError(str(exc)) from None
        changes: dict[str, Any] = {}
        if crop is not None:
            changes.update({k: crop[k] for k in ("crop_margin", "crop_offset_y") if crop.get(k) is not None})
        else:
            log.warning("no crop calibration for %s: the checkpoints get InputSpec's default crop (margin %.2f, "
                        "offset %.2f), which may frame real faces unlike the training faces; measure one with "
                        "python -m trainers.calibrate --data %s and pass --crop-calibration", cfg.data,
                        spec.crop_margin, spec.crop_offset_y, cfg.data)
        if self.data.in_memory and self.data.image_size != spec.size:
            changes["source_size"] = self.data.image_size
        return (dataclasses.replace(spec, **changes) if changes else spec), crop

    # ---------------------------------------------------------------- helpers for methods
    def autocast(self):
        """Mixed-precision context for forward passes (no-op on CPU / --no-amp)."""
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def register_state(self, name: str, obj: Any) -> Any:
        """Include ``obj.state_dict()`` in state.pt (and restore it on resume). Returns ``obj``."""
        if name in self.extra_state:
            raise ValueError(f"state {name!r} registered twice")
        self.extra_state[name] = obj
        return obj

    def add_param_group(self, optimizer: str, group: dict[str, Any]) -> None:
        """Add parameters (a new branch) to an optimiser during training, with its own ``lr`` and ``lr_scale``
        (ESR); the optimiser's schedule drives it from then on."""
        opt = self.optimizers[optimizer]
        opt.add_param_group(group)
        g = opt.param_groups[-1]
        g.setdefault("initial_lr", g["lr"])
        g.setdefault("lr_scale", 1.0)
        if optimizer in self.schedules:
            self.schedules[optimizer]._apply()

    def forward(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` under autocast -- through DistributedDataParallel under torchrun, so that its
        gradients are averaged over the processes."""
        with self.autocast():
            if self._ddp is not None:
                return self._ddp(fn, *args)
            return fn(*args)

    def step(self, loss: torch.Tensor | Callable[[], Any], *optimizers: str) -> Any:
        """zero_grad, backward, (clip), step for the named optimisers (all when none named).

        For ``manual_optimization`` methods, as often per training step as they like. ``loss``: a tensor, or
        a closure returning the loss (or a dict with ``"loss"``) -- a closure is required under torchrun,
        where the forward must run inside DistributedDataParallel. Returns what the closure returned.
        """
        result: Any = loss
        if callable(loss):
            result = self.forward(loss)
            loss = result["loss"] if isinstance(result, dict) else result
        elif self._ddp is not None:
            raise TrainError(f"{self.method.name}: under torchrun trainer.step needs a closure computing the loss "
                             "(its forward must run inside DistributedDataParallel)")
        self._backward_step(loss, optimizers or tuple(self.optimizers))
        return result

    def _backward_step(self, loss: torch.Tensor, names: Sequence[str]) -> None:
        opts = [self.optimizers[n] for n in names]
        for o in opts:
            o.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        for o in opts:
            if self.cfg.grad_clip > 0:
                self.scaler.unscale_(o)
                torch.nn.utils.clip_grad_norm_([p for g in o.param_groups for p in g["params"]], self.cfg.grad_clip)
            self.scaler.step(o)

    def all_reduce_(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Sum (or mean) a tensor over the processes in place (no-op alone): e.g. DAF-CNN's centre updates."""
        return self.dist.all_reduce_(t, op)

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every process's ``t`` concatenated (itself alone): e.g. the keys a MoCo queue receives."""
        return self.dist.all_gather(t)

    def make_batches(self, ds: Any, *, augment: bool = False, views: int = 1, shuffle: bool = False,
                     seed: int | None = None, batch_size: int | None = None) -> Batches:
        """A batch provider over any dataset (e.g. the frozen pass that fills ECAN's queue); this process's
        share of it under torchrun."""
        aug = self.method.build_augment() if augment else None
        return make_batches(ds, self.spec, self.device, batch_size or self.cfg.batch_size, augment=aug, views=views,
                            shuffle=shuffle, seed=self.cfg.seed + 17 if seed is None else seed,
                            workers=self.cfg.workers, rank=self.dist.rank, world=self.dist.world_size)

    def lr(self, optimizer: str = "main", group: int = 0) -> float:
        return float(self.optimizers[optimizer].param_groups[group]["lr"])

    def schedule_total(self, epoch: int) -> int:
        """Steps the schedule segment holding epoch ``epoch + 1`` lasts: from the last stage that restarts the
        schedule (or the first stage) to the next one (or the end of the plan)."""
        st = self.plan.stages
        i = self.plan.index_at(epoch + 1)
        a = max(j for j in range(i + 1) if j == 0 or st[j].restart_schedule)
        b = next((j for j in range(i + 1, len(st)) if st[j].restart_schedule), len(st))
        return sum(s.epochs for s in st[a:b]) * self.steps_per_epoch

    # ---------------------------------------------------------------- loop
    def train_one_epoch(self, epoch: int) -> dict[str, float]:
        from tqdm import tqdm

        self.model.train()
        self.method.on_epoch_start(epoch)
        sums: dict[str, torch.Tensor] = {}
        n_img, t_data = 0, 0.0
        t0 = time.perf_counter()
        it = iter(self.train_batches)
        n_steps = len(self.train_batches)
        bar = tqdm(total=n_steps, desc=f"epoch {epoch}/{self.cfg.epochs}", leave=False,
                   disable=None if self.dist.is_main else True)
        # without a terminal (nohup, a log file) tqdm stays silent: say where the epoch is now and then instead
        next_note = logs.clock() + logs.PROGRESS_EVERY_S if bar.disable and self.dist.is_main else float("inf")
        manual = self.method.manual_optimization
        step = 0
        # the first step whose loss was not finite (-1: none), kept on the device (no sync per step on a GPU)
        first_bad = torch.full((), -1, dtype=torch.long, device=self.device)
        sync_every = 1 if self.device.type == "cpu" else max(1, self.cfg.log_every or 50)
        while True:
            td = time.perf_counter()
            batch = next(it, None)
            t_data += time.perf_counter() - td
            if batch is None:
                break
            if manual:
                logs_ = self.method.training_step(batch)
            else:
                logs_ = self.forward(self.method.training_step, batch)
                if "loss" not in logs_:
                    raise TrainError(f"{self.method.name}.training_step returned no 'loss' (got {sorted(logs_)})")
                self._backward_step(logs_["loss"], tuple(self.optimizers))
            if self.scaler.is_enabled():
                self.scaler.update()
            if self.momentum is not None:
                self.momentum.update(self.global_step + 1)
            loss = logs_.get("loss")
            if isinstance(loss, torch.Tensor) and loss.numel() == 1:
                bad = ~torch.isfinite(loss.detach().float().reshape(()))
                first_bad = torch.where(bad & (first_bad < 0), torch.full_like(first_bad, step + 1), first_bad)
            if (step + 1) % sync_every == 0 or step + 1 == n_steps:
                self._check_finite_loss(first_bad, epoch, n_steps, logs_)
            self.method.after_step(batch, logs_)
            for s in self.schedules.values():
                s.step_update()
            self.global_step += 1
            step += 1
            n_img += len(batch)
            for k, v in logs_.items():
                if isinstance(v, torch.Tensor) and v.numel() == 1:
                    v = v.detach().float() * len(batch)
                    sums[k] = sums[k] + v if k in sums else v
                elif isinstance(v, (int, float)):
                    sums[k] = sums.get(k, 0.0) + float(v) * len(batch)
            if self.cfg.log_every and step % self.cfg.log_every == 0:
                cur = {k: float(v) / n_img for k, v in sums.items()}
                bar.set_postfix({k: f"{v:.4f}" for k, v in list(cur.items())[:3]})
                for k, v in cur.items():
                    self.metrics_log.scalar(f"train_step/{k}", v, self.global_step)
            bar.update(1)
            if step < n_steps and logs.clock() >= next_note:
                next_note = logs.clock() + logs.PROGRESS_EVERY_S
                log.info("%s", logs.progress_line(epoch, self.cfg.epochs, step, n_steps, n_img,
                                                  time.perf_counter() - t0, sums))
            for cb in self.callbacks:
                if hasattr(cb, "on_step_end"):
                    cb.on_step_end(self, epoch, step)
        bar.close()
        self._check_finite_loss(first_bad, epoch, n_steps, {})
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dt = time.perf_counter() - t0
        if self.dist.enabled:  # the losses of the whole global batch
            n_all = torch.tensor(float(n_img), dtype=torch.float64)
            self.dist.all_reduce_(n_all)
            for k in list(sums):
                v = sums[k] if isinstance(sums[k], torch.Tensor) else torch.tensor(sums[k])
                sums[k] = self.dist.all_reduce_(v.detach().double().cpu().clone())
            n_img = int(n_all)
        res = {f"train_{k.replace('/', '_')}": float(v) / max(n_img, 1) for k, v in sums.items()}
        res.update(train_images=n_img, train_ips=n_img / dt if dt > 0 else float("nan"),
                   data_ips=(n_img / self.dist.world_size) / t_data if t_data > 0 else float("nan"), epoch_time=dt)
        return res

    def _check_finite_loss(self, first_bad: torch.Tensor, epoch: int, n_steps: int, logs_: dict[str, Any]) -> None:
        """Stop the run when the training loss was NaN or infinite: its weights are lost, and nothing of this
        epoch is written (state.pt and the checkpoints stay those of the last finished epoch). Under torchrun
        every process takes part (the same steps of each process's equal share): the first bad step of any
        process stops them all at once, instead of one stopping while the others wait in the next all-reduce."""
        if self.dist.enabled:  # the earliest bad step of any process (-1: none anywhere)
            none = torch.iinfo(torch.long).max
            b = torch.where(first_bad < 0, torch.full_like(first_bad, none), first_bad)
            torch.distributed.all_reduce(b, op=torch.distributed.ReduceOp.MIN)
            first_bad = torch.where(b == none, torch.full_like(b, -1), b)
        bad_step = int(first_bad)
        if bad_step < 0:
            return
        kept = (f"{self.state_path} (after epoch {self.epoch}) and the checkpoints are those of the last finished "
                f"epoch; nothing of epoch {epoch} was written" if self.state_path.exists()
                else "nothing was written (no epoch finished)")
        raise TrainError(
            f"the training loss became non-finite (NaN or inf) at epoch {epoch}, step {bad_step} of {n_steps}; the "
            f"weights diverged: lower --lr (now {self.cfg.lr:g}), add --grad-clip or --warmup-epochs, or check the "
            f"data; {kept}")

    def _check_finite_weights(self) -> None:
        """Never write non-finite weights as a checkpoint (best or last)."""
        for name, p in self.method.export_model().state_dict().items():
            if p.is_floating_point() and not bool(torch.isfinite(p).all()):
                raise TrainError(f"after epoch {self.epoch} the weights are not finite ({name} holds NaN/inf); "
                                 f"nothing of this epoch was written; lower --lr (now {self.cfg.lr:g}) or add "
                                 "--grad-clip")

    def evaluate(self) -> dict[str, Any]:
        if self.val_batches is None:
            return {}
        self.model.eval()
        return evaluate(self.method.eval_step, self.val_batches, self.data.label_names,
                        autocast=eval_autocast(self.device, self.amp_dtype), desc=f"eval {self.data.val_split}",
                        gather=self.dist.all_gather_object if self.dist.enabled else None,
                        quiet=not self.dist.is_main,
                        subsets=None if self.copies is None else {"no_copy": ~self.copies.mask})

    def fit(self) -> dict[str, Any]:
        """Train to the end of the plan (from the resumed epoch); returns the last epoch's metrics row."""
        cfg = self.cfg
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            files.write_args(self)
            self.metrics_log.open_tensorboard(self.global_step if self.resumed else None)
        self.dist.barrier()
        if not self.resumed:
            self.method.before_training()
        if cfg.bench_batches > 0:
            self.data_ips = benchmark_batches(self.train_batches, cfg.bench_batches)
            log.info("data pipeline alone: %.0f images/s (%s, batch %d, %d view(s), %s)", self.data_ips,
                     "in memory" if self.data.in_memory else f"{cfg.workers} workers", cfg.batch_size,
                     self.method.views, self.device)
        row: dict[str, Any] = {}
        requested, started, durations = self.plan.total, logs.clock(), []
        epoch = self.epoch
        while epoch < self.plan.total:
            epoch += 1
            t_epoch = logs.clock()
            self._maybe_start_stage(epoch)
            lrs = {n: self.lr(n) for n in self.optimizers}
            train = self.train_one_epoch(epoch)
            metrics = self.evaluate()
            self.method.on_epoch_end(epoch, metrics)
            self.epoch = epoch
            self._check_finite_weights()
            improved = self._update_best(metrics)
            files.save_checkpoints(self, metrics, improved)
            self._step_epoch_schedules(metrics)
            row = {"epoch": epoch, "step": self.global_step}
            if len(self.plan.stages) > 1:
                row["stage"] = self.plan.index_at(epoch)
            row.update({f"lr_{n}" if len(lrs) > 1 else "lr": v for n, v in lrs.items()})
            row.update(train)
            row["data_alone_ips"] = self.data_ips
            row.update({f"val_{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
            row["best"] = self.best_value
            if self.dist.is_main:
                self.metrics_log.row(row, self.global_step)
            log.info("epoch %d/%d  loss %.4f  %s  lr %.3g  train %.0f img/s (data %.0f img/s)  %.1fs%s", epoch,
                     self.plan.total, train.get("train_loss", float("nan")),
                     "  ".join(f"{k} {metrics[k]:.2f}" for k in ("accuracy", "mean_class_accuracy", "macro_f1",
                                                                    "no_copy_accuracy", "mean_ccc")
                               if k in metrics), next(iter(lrs.values())), train["train_ips"], train["data_ips"],
                     train["epoch_time"], "  *best*" if improved else "")
            for cb in self.callbacks:
                if hasattr(cb, "on_epoch_end"):
                    cb.on_epoch_end(self, epoch, row)
            self._check_in_step()
            if cfg.time_budget > 0:
                durations.append(logs.clock() - t_epoch)
                self._fit_to_budget(epoch, requested, logs.clock() - started, durations)
            files.save_state(self)
        self.metrics_log.close()
        return row

    def _check_in_step(self) -> None:
        """Under torchrun: every process must hold the same weights (a method that changed them outside the
        DDP pass, or a process that skipped a step, would otherwise go unnoticed)."""
        if not self.dist.enabled:
            return
        with torch.no_grad():
            sums = [float(p.double().sum()) for p in self.model.parameters()]
        seen = self.dist.all_gather_object(sums)
        if any(s != seen[0] for s in seen[1:]):
            raise TrainError(f"the {self.dist.world_size} processes hold different weights after epoch {self.epoch}; "
                             f"{self.method.name} must change its parameters only through trainer.step / the DDP pass")

    def _maybe_start_stage(self, epoch: int) -> None:
        i = self.plan.index_at(epoch)
        if self.plan.starts()[i] != epoch:
            return
        stage = self.plan.stages[i]
        if i > 0 and stage.restart_schedule:
            for s in self.schedules.values():
                s.restart(stage.epochs * self.steps_per_epoch)
        if len(self.plan.stages) > 1:
            log.info("stage %d/%d %r: epochs %d-%d", i + 1, len(self.plan.stages), stage.name, epoch,
                     epoch + stage.epochs - 1)
        self.method.on_stage_start(i, stage)

    @property
    def history(self) -> list[dict[str, Any]]:
        return self.metrics_log.history

    def _fit_to_budget(self, epoch: int, requested: int, elapsed: float, durations: list[float]) -> None:
        """--time-budget: end the run after the epochs that fit (at most ``requested``), judged by the mean
        of the last three epochs (the first one, with its warm-up, counts only until there are more); the
        stages still to come shrink in proportion, and cosine schedules are re-timed."""
        recent = (durations[1:] or durations)[-3:]
        per_epoch = sum(recent) / len(recent)
        fit = epoch + int(max(0.0, self.cfg.time_budget - elapsed) // per_epoch)
        target = max(epoch, min(requested, fit))
        if target == self.plan.total:
            return
        before = self.plan.total
        total = self.plan.fit(epoch, target)
        if total == before:
            return
        # a warning when the run is first cut short; later adjustments are routine
        log.log(logging.WARNING if before == requested else logging.INFO,
                "time budget %.0f s: %.1f s per epoch, %.0f s used; the run now ends after epoch %d (of %d asked)%s",
                self.cfg.time_budget, per_epoch, elapsed, total, requested,
                f", stages {self.plan.lengths()}" if len(self.plan.stages) > 1 else "")
        self.cfg.epochs = total
        for s in self.schedules.values():
            s.retime(self.schedule_total(epoch))

    # ---------------------------------------------------------------- best / schedules
    def _best_mode(self) -> str:
        if self.cfg.best_mode != "auto":
            return self.cfg.best_mode
        m = self.cfg.best_metric.lower()
        return "min" if any(s in m for s in ("loss", "rmse", "error")) else "max"

    def _metric(self, metrics: dict[str, Any], name: str) -> float | None:
        if not metrics:
            return None
        if name not in metrics:
            avail = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)))
            raise TrainError(f"--best-metric {name!r} is not among the validation metrics {avail}")
        return float(metrics[name])

    def _update_best(self, metrics: dict[str, Any]) -> bool:
        v = self._metric(metrics, self.cfg.best_metric)
        if v is None or not math.isfinite(v):
            return False
        b = self.best_value
        if b is None or (v > b if self.best_mode == "max" else v < b):
            self.best_value, self.best_epoch = v, self.epoch
            return True
        return False

    def _step_epoch_schedules(self, metrics: dict[str, Any]) -> None:
        for name, s in self.schedules.items():
            before = s.lr()
            metric = self._metric(metrics, s.monitor or self.cfg.best_metric) if s.kind == "plateau" else None
            dropped = s.step(metric)
            if dropped and s.reload_best:
                self.reload_best()
                log.info("lr %s -> %s: reloaded the best weights (epoch %d)", before, s.lr(), self.best_epoch)

    def reload_best(self) -> None:
        """Load the best epoch's weights (and method state) back into the model (DAF-CNN's lr drops)."""
        files.reload_best(self)

    def reset_best(self) -> None:
        """Start the selection afresh: the next epoch becomes the best (ESR: every stage, a larger ensemble,
        selects its own best; best.safetensors then ends as the best of the last stage)."""
        self.best_value, self.best_epoch = None, 0

    # ---------------------------------------------------------------- files
    def _check_out(self) -> None:
        if self.cfg.eval_only:
            return
        check_out(self.out, self.cfg.resume)

    def hardware(self) -> dict[str, Any]:
        from .runtime import hardware

        return hardware(self.device, self.amp_dtype, self.dist.world_size)

    def state_dict(self) -> dict[str, Any]:
        return files.train_state(self)


def benchmark_batches(batches: Batches, max_batches: int = 20) -> float:
    """Images/s of the data pipeline alone (decode/gather + augment + normalise), no model.

    In memory: the median batch rate over ``max_batches`` batches after 2 warm-up ones, so that a moment
    of CPU contention does not decide the figure. DataLoader (workers prefetch, so single batches say
    nothing): all timed images over the total time. Leaves every generator (the provider's and the
    global ones) as it found them.
    """
    saved, rng = batches.state_dict(), rng_state()
    sync = torch.cuda.synchronize if batches.device.type == "cuda" else (lambda: None)
    rates: list[float] = []
    n, t0 = 0, 0.0
    try:
        sync()
        t = time.perf_counter()
        for i, b in enumerate(batches.iter_batches(limit=max_batches + 2)):
            sync()
            now = time.perf_counter()
            if i >= 2:  # warm-up: workers, allocator, kernels
                rates.append(len(b) * len(b.inputs) / max(now - t, 1e-9))
                n += len(b) * len(b.inputs)
            else:
                t0 = now
            t = now
    finally:
        batches.load_state_dict(saved)
        set_rng_state(rng)
    if not rates:
        return float("nan")
    if isinstance(batches, TensorBatches):
        return float(np.median(rates))
    return n / max(t - t0, 1e-9)
