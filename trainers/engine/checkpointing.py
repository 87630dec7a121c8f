"""The files of a run: ``best.safetensors`` / ``last.safetensors`` (ferengine's checkpoint contract),
``state.pt`` (everything an exact resume needs), ``best_state.pt`` (the best epoch's training network and
method state), ``args.json`` (the resolved configuration). Written atomically, by the main process only;
``state.pt`` holds every process's RNG and batch-order state, so a torchrun run resumes exactly too.
"""
from __future__ import annotations

import json
import logging
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ferengine import checkpoint as ckpt
from ferengine.fileio import atomic_write, atomic_write_text

from .errors import TrainError
from .runtime import git_commit, hardware, rng_state, set_rng_state

if TYPE_CHECKING:  # pragma: no cover
    from .loop import Trainer

log = logging.getLogger("trainers.engine")

__all__ = ["STATE_FORMAT", "STATE_VERSION", "BEST_FILE", "LAST_FILE", "STATE_FILE", "BEST_STATE_FILE",
           "atomic_torch_save", "write_args", "checkpoint_info", "save_checkpoints", "train_state", "save_state",
           "load_state", "reload_best"]

STATE_FORMAT = "fer-desktop-train-state"
STATE_VERSION = 2  # 2: engine-owned lr schedules and stage plans (1: torch schedulers; upgraded on load)
BEST_FILE, LAST_FILE, STATE_FILE, BEST_STATE_FILE = "best.safetensors", "last.safetensors", "state.pt", "best_state.pt"


def atomic_torch_save(obj: Any, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def write_args(t: "Trainer") -> None:
    d = {"method": t.method.name, "argv": t.first_argv, "resumed_with": t.resume_argvs,
         "config": t.cfg.to_dict(),
         "resolved": {"device": str(t.device), "amp_dtype": str(t.amp_dtype) if t.amp_dtype else None,
                      "input": t.spec.to_dict(), "arch": t.method.arch, "arch_kwargs": t.method.arch_kwargs,
                      "labels": list(t.data.label_names), "train_split": t.data.train_split,
                      "val_split": t.data.val_split, "train_size": t.data.train_size,
                      "val_size": t.data.val_size, "stages": t.plan.lengths(), "processes": t.dist.world_size,
                      "git_commit": git_commit()}}
    atomic_write_text(t.out / "args.json", json.dumps(d, indent=2, default=str) + "\n")


def checkpoint_info(t: "Trainer", metrics: dict[str, Any], epoch: int) -> ckpt.CheckpointInfo:
    split = t.data.val_split or "val"
    m = {f"{split}_{k}": v for k, v in metrics.items() if isinstance(v, (int, float, list, dict))}
    m["epoch"] = epoch
    model = t.method.export_model()
    heads = list(getattr(model, "heads", ["expression"]))
    cfg = t.cfg
    training = {
        "command": shlex.join(t.first_argv), "method": t.method.name,
        **({"resumed_with": [shlex.join(a) for a in t.resume_argvs]} if t.resume_argvs else {}),
        "data": {"name": cfg.data, "data_dir": cfg.data_dir, "train_split": t.data.train_split,
                 "val_split": t.data.val_split, "limit_train": cfg.limit_train, "options": cfg.data_opts},
        "split_sizes": {t.data.train_split: t.data.train_size, **(
            {t.data.val_split: t.data.val_size} if t.data.val_split else {})},
        "selection": {"split": t.data.val_split, "metric": cfg.best_metric, "mode": t.best_mode,
                      "best_epoch": t.best_epoch, "best_value": t.best_value},
        **({"copies_in_train": {t.data.val_split: t.copies.to_dict()}} if t.copies is not None else {}),
        **({"dropped_copies_of": t.train_ds.info["dropped_copies_of"]}
           if "dropped_copies_of" in getattr(t.train_ds, "info", {}) else {}),
        **({"crop_calibration": t.crop} if t.crop is not None else {}),
        **({"notes": notes} if (notes := list(t.method.training_notes())) else {}),
        "epochs": cfg.epochs, "epoch": epoch, "seed": cfg.seed, "git_commit": git_commit(),
        "hardware": hardware(t.device, t.amp_dtype, t.dist.world_size), "config": cfg.to_dict(),
    }
    return ckpt.CheckpointInfo(
        # a model without an expression head predicts no classes, whatever classes the training data had
        arch=t.method.arch, arch_kwargs=dict(t.method.arch_kwargs),
        labels=list(t.data.label_names) if "expression" in heads else [],
        input=t.spec, heads=heads, name=f"{t.method.name} {t.method.arch} {cfg.data}",
        training=training, metrics=m)


def save_checkpoints(t: "Trainer", metrics: dict[str, Any], improved: bool) -> None:
    if not t.dist.is_main:
        return
    model = t.method.export_model()
    info = checkpoint_info(t, metrics, t.epoch)
    ckpt.save(t.out / LAST_FILE, model, info)
    if improved:
        ckpt.save(t.out / BEST_FILE, model, info)
        method_state = t.method.state_dict()
        if method_state or t.cfg.reload_best or any(s.reload_best for s in t.schedules.values()):
            # the training network + the method's own tensors (e.g. DAF-CNN's centres) at the best epoch
            atomic_torch_save({"model": t.model.state_dict(), "method": method_state, "epoch": t.epoch},
                              t.out / BEST_STATE_FILE)


def _process_state(t: "Trainer") -> dict[str, Any]:
    return {"rng": rng_state(), "batches": t.train_batches.state_dict()}


def train_state(t: "Trainer") -> dict[str, Any]:
    """Everything an exact resume needs (tensors and plain containers: ``torch.load(weights_only=True)``)."""
    ranks = t.dist.all_gather_object(_process_state(t))
    return {
        "format": STATE_FORMAT, "version": STATE_VERSION, "method_name": t.method.name,
        "epoch": t.epoch, "global_step": t.global_step,
        "best": {"metric": t.cfg.best_metric, "value": t.best_value, "epoch": t.best_epoch},
        "method": t.method.state_dict(),
        "model": t.model.state_dict(),
        "optimizers": {n: o.state_dict() for n, o in t.optimizers.items()},
        "schedulers": {n: s.state_dict() for n, s in t.schedules.items()},
        "stages": t.plan.lengths(),
        "momentum": t.momentum.state_dict() if t.momentum is not None else {},
        "scaler": t.scaler.state_dict(),
        "extra": {n: o.state_dict() for n, o in t.extra_state.items()},
        "batches": ranks[0]["batches"],
        "rng": ranks[0]["rng"],
        "processes": ranks[1:],  # the other processes of a torchrun launch, rank 1.. (empty alone)
        "config": t.cfg.to_dict(),
    }


def save_state(t: "Trainer") -> None:
    s = train_state(t)  # a collective under torchrun: every process takes part
    if t.dist.is_main:
        atomic_torch_save(s, t.state_path)
    t.dist.barrier()


def _upgrade_v1(s: dict[str, Any]) -> dict[str, Any]:
    """A state.pt of the engine before it owned its schedules (torch LambdaLR/StepLR/ReduceLROnPlateau)."""
    sched = {}
    for name, old in (s.get("schedulers") or {}).items():
        opt = s["optimizers"][name]
        lrs = [float(g["lr"]) for g in opt["param_groups"]]
        steps = int(old.get("last_epoch", 0))
        if "num_bad_epochs" in old:  # ReduceLROnPlateau
            sched[name] = {"kind": "plateau", "steps": s["global_step"], "epochs": steps, "total_steps": 1,
                           "best": float(old["best"]), "bad_epochs": int(old["num_bad_epochs"]), "lrs": lrs}
        elif "lr_lambdas" in old:  # the warm-up cosine, stepped per optimiser step
            lam = (old["lr_lambdas"] or [{}])[0] or {}
            sched[name] = {"kind": "cosine", "steps": steps, "epochs": 0, "total_steps": int(lam.get("total", 1)),
                           "warmup_steps": int(lam.get("warmup", 0)),
                           "best": float("-inf"), "bad_epochs": 0, "lrs": []}
        else:  # StepLR / MultiStepLR / ExponentialLR: per epoch
            kind = "step" if "step_size" in old else "multistep" if "milestones" in old else "exponential"
            sched[name] = {"kind": kind, "steps": s["global_step"], "epochs": steps, "total_steps": 1,
                           "best": float("-inf"), "bad_epochs": 0, "lrs": []}
    s = dict(s, schedulers=sched, version=STATE_VERSION, processes=[], momentum={})
    s.setdefault("stages", None)
    return s


def load_state(t: "Trainer", s: dict[str, Any]) -> None:
    if not isinstance(s, dict) or s.get("format") != STATE_FORMAT:
        raise TrainError(f"{t.state_path}: not a training state written by this engine")
    if s.get("method_name") != t.method.name:
        raise TrainError(f"{t.state_path}: a {s.get('method_name')} run, cannot resume it with {t.method.name}")
    if int(s.get("version", 1)) == 1:
        s = _upgrade_v1(s)
    elif int(s["version"]) > STATE_VERSION:
        raise TrainError(f"{t.state_path}: written by a newer fer-desktop (state version {s['version']}); update it")
    try:
        _load_state(t, s)
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
        changed = _changed_settings(s.get("config"), t.cfg.to_dict())
        first = " ".join(str(exc).split())
        first = first[:200] + ("..." if len(first) > 200 else "")
        raise TrainError(
            f"{t.state_path}: the saved run does not fit the model and settings built now "
            f"({type(exc).__name__}: {first})"
            + (f"; changed since: {', '.join(changed)}" if changed else "")
            + "; resume with the run's own settings (only --out, --resume and e.g. --epochs), "
              "or start a new run in another --out") from None


def _changed_settings(saved: Any, now: dict[str, Any]) -> list[str]:
    if not isinstance(saved, dict):
        return []
    out = []
    for k, v in now.items():
        if k == "extra":
            old = saved.get("extra") or {}
            out += [f"--{n.replace('_', '-')} {old.get(n)!r} -> {w!r}" for n, w in (v or {}).items()
                    if old.get(n) != w]
        elif k in saved and saved[k] != v and k not in ("resume", "out", "epochs", "device", "workers"):
            out.append(f"--{k.replace('_', '-')} {saved[k]!r} -> {v!r}")
    return out


def _load_state(t: "Trainer", s: dict[str, Any]) -> None:
    t.method.load_state_dict(s["method"])  # first: may add branches / param groups
    t.model.load_state_dict(s["model"])
    for n, o in t.optimizers.items():
        o.load_state_dict(s["optimizers"][n])
    epoch = int(s["epoch"])
    if s.get("stages"):
        t.plan.resumed(s["stages"], epoch)
    for n, sch in t.schedules.items():
        sch.total_steps = t.schedule_total(epoch)
        sch.load_state_dict(s["schedulers"][n])
    old_lr = (s.get("config") or {}).get("lr")
    if isinstance(old_lr, (int, float)) and old_lr > 0 and float(old_lr) != float(t.cfg.lr):
        for sch in t.schedules.values():  # the saved optimiser state holds the old lr: --lr must win
            sch.rescale(float(t.cfg.lr) / float(old_lr))
        log.info("resume: --lr %g instead of the run's %g: every learning rate of the schedule scaled by %g",
                 t.cfg.lr, old_lr, t.cfg.lr / old_lr)
    if t.momentum is not None and s.get("momentum"):
        t.momentum.load_state_dict(s["momentum"])
    t.scaler.load_state_dict(s["scaler"])
    for n, o in t.extra_state.items():
        o.load_state_dict(s["extra"][n])
    mine = {"batches": s["batches"], "rng": s["rng"]}
    if t.dist.rank > 0:
        others = s.get("processes") or []
        if len(others) >= t.dist.rank:
            mine = others[t.dist.rank - 1]
        else:
            log.warning("resume: the saved run had fewer processes; process %d starts its augmentation afresh",
                        t.dist.rank)
            mine = None
    if mine is not None:
        t.train_batches.load_state_dict(mine["batches"])
        set_rng_state(mine["rng"])
    saved_world = 1 + len(s.get("processes") or [])
    if saved_world != t.dist.world_size:
        log.warning("resume: the run had %d process(es), now %d; it continues, but not bit-exactly", saved_world,
                    t.dist.world_size)
    t.epoch, t.global_step = epoch, int(s["global_step"])
    t.best_value, t.best_epoch = s["best"]["value"], int(s["best"]["epoch"])
    t.resumed = True
    t.metrics_log.read(t.epoch)
    try:
        prev = json.loads((t.out / "args.json").read_text())
        t.first_argv = prev.get("argv") or t.argv
        t.resume_argvs = list(prev.get("resumed_with") or []) + [t.argv]
    except (OSError, ValueError):
        t.resume_argvs = [t.argv]
    log.info("resumed %s after epoch %d (step %d, best %s %s at epoch %d)", t.out, t.epoch,
             t.global_step, t.cfg.best_metric, t.best_value, t.best_epoch)


def reload_best(t: "Trainer") -> None:
    """Load the best epoch's weights (and method state) back into the model (DAF-CNN's lr drops)."""
    path = t.out / BEST_STATE_FILE
    t.dist.barrier()  # the main process wrote it this epoch
    if not path.exists():
        log.warning("no %s to reload", path)
        return
    from .loop import read_state

    s = read_state(path)
    t.method.load_state_dict(s["method"])
    # parameters created after the best epoch (an ESR branch added since) keep their current values
    res = t.model.load_state_dict(s["model"], strict=False)
    if res.unexpected_keys:
        raise TrainError(f"{path}: weights the model does not have: {res.unexpected_keys[:5]}")
    if res.missing_keys:
        log.info("reload-best: %d tensors newer than the best epoch kept as they are", len(res.missing_keys))
