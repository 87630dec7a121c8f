"""The one evaluator: the training run's own evaluation, ``--eval-only``, ``fer eval`` and
``trainers.release`` all compute their numbers here, on the same batches and with one label policy.

Label policy ``by-name`` (:func:`match_labels`): a checkpoint's classes and a dataset's are matched by
canonical name (``anger`` = ``angry``, ``happiness`` = ``happy``, ...). The evaluation runs on the shared
classes, in the dataset's order: dataset items of a class the checkpoint lacks are left out, and
predictions are the most probable of the shared classes (a class the dataset lacks is never predicted).
Every such adjustment is reported in ``notes``. No shared class is an error.

Metrics (:func:`evaluate`): ``n``, the items scored (labelled, of a shared class); classification -- ``accuracy``, ``mean_class_accuracy``, ``macro_f1``
(percent), ``confusion_matrix`` (rows true, columns predicted), ``per_class`` (precision, recall, F1 in
percent, support), ``loss`` (cross-entropy; from the model's ``"probs"`` when it combines heads itself),
``accuracy_<name>`` for extra ``"logits_<name>"`` outputs; valence/arousal -- RMSE, SAGR, PCC, CCC per
dimension and ``mean_ccc`` (``valence_rmse`` ... ``mean_ccc``, ``va_n``) whenever the model outputs ``"va"`` and
the data has targets.

Estimated valence/arousal: a checkpoint with no AV head, evaluated on data with valence/arousal targets, is
scored on what the app and ``fer`` show for it (``av_source`` "estimated"): ``ferengine.labels.estimate_va`` of
its class probabilities over all its own classes (the anchors ``ferengine.labels.AV_ANCHORS``). The same
metrics come under ``estimated_`` keys (``estimated_valence_rmse`` ... ``estimated_mean_ccc``,
``estimated_va_n``), and ``va_source`` says which kind a report holds (``"head"`` or ``"estimated"``). It is
the baseline an AV model is compared with. A checkpoint with an AV head is scored on its head only.

``python -m trainers.evaluate`` and ``fer eval`` (plugged into the ``fer`` command by
:mod:`trainers.fer_eval` through the ``fer.commands`` entry point) evaluate any checkpoint on any dataset
split with any backend.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger("trainers.evaluate")

__all__ = ["LABEL_POLICY", "LabelMatch", "match_labels", "evaluate", "evaluate_checkpoint", "format_report",
           "EvalError", "run_command", "main"]

LABEL_POLICY = "by-name"
NO_COPY = "no_copy"  # the subset of an evaluation split with no exact copy in the training data
PERCENT_METRICS = ("accuracy", "mean_class_accuracy", "macro_f1")


class EvalError(ValueError):
    """An evaluation cannot run as asked; the message says why."""


# =========================================================================================== labels


@dataclass
class LabelMatch:
    """How a checkpoint's classes meet a dataset's (policy :data:`LABEL_POLICY`)."""

    cols: list[int]            # model output column of each shared class, in the dataset's order
    data_index: list[int]      # dataset class index of each shared class
    names: list[str]           # canonical names of the shared classes
    data_labels: list[str]
    model_labels: list[str]
    notes: list[str] = field(default_factory=list)

    @property
    def identity(self) -> bool:
        return self.cols == list(range(len(self.model_labels))) and len(self.cols) == len(self.data_labels)

    def to_shared(self, label: torch.Tensor) -> torch.Tensor:
        """Dataset class indices -> positions among the shared classes (-1: not shared or unlabelled)."""
        table = torch.full((len(self.data_labels) + 1,), -1, dtype=torch.int64)
        table[torch.as_tensor(self.data_index, dtype=torch.int64)] = torch.arange(len(self.data_index))
        lab = label.to(torch.int64)
        return torch.where(lab >= 0, table.to(lab.device)[lab.clamp_min(0)], lab.new_full((), -1))


def match_labels(model_labels: Sequence[str], data_labels: Sequence[str]) -> LabelMatch:
    """Match classes by canonical name (see the module doc). Raises :class:`EvalError` when none is shared."""
    from ferengine.labels import canonical

    model_index = {canonical(n): i for i, n in enumerate(model_labels)}
    cols, idx, names = [], [], []
    for j, name in enumerate(data_labels):
        i = model_index.get(canonical(name))
        if i is not None:
            cols.append(i)
            idx.append(j)
            names.append(canonical(name))
    if not cols:
        raise EvalError(f"the checkpoint's classes {list(model_labels)} and the dataset's {list(data_labels)} have "
                        "no class in common; nothing to evaluate")
    m = LabelMatch(cols, idx, names, list(data_labels), list(model_labels))
    shared = set(names)
    only_model = [n for n in model_labels if canonical(n) not in shared]
    only_data = [n for n in data_labels if canonical(n) not in shared]
    if [canonical(n) for n in model_labels] != [canonical(n) for n in data_labels] and not only_model and not only_data:
        m.notes.append(f"the checkpoint orders its classes {list(model_labels)}, the dataset {list(data_labels)}: "
                       "matched by name")
    if only_model:
        m.notes.append(f"the checkpoint has classes the dataset lacks: {only_model}; predictions are the most "
                       f"probable of the {len(names)} shared classes")
    return m


# ========================================================================================== metrics


def _flatten(prefix: str, d: Any, out: dict[str, Any]) -> None:
    if isinstance(d, dict):
        for k, v in d.items():
            _flatten(f"{prefix}_{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = d


@torch.no_grad()
def evaluate(step: Callable[[Any], dict[str, torch.Tensor]], batches: Any, label_names: Sequence[str], *,
             autocast: Callable[[], Any] = nullcontext, desc: str = "eval", match: LabelMatch | None = None,
             gather: Callable[[Any], list[Any]] | None = None, quiet: bool = False,
             subsets: dict[str, np.ndarray] | None = None,
             estimate_labels: Sequence[str] | None = None) -> dict[str, Any]:
    """Run ``step`` over ``batches`` and compute the metrics (module doc). ``label_names``: the dataset's
    classes; ``match``: how the outputs' columns map onto them (None: the same classes in the same order).
    ``gather``: under torchrun, every process evaluates its share and the results are combined.
    ``subsets``: name -> bool mask over the dataset's items; each adds ``<name>_n``, ``<name>_accuracy``,
    ``<name>_mean_class_accuracy``, ``<name>_macro_f1`` (and ``<name>_mean_ccc``, ``<name>_va_n``) computed on
    the masked items only (e.g. ``no_copy``: the items with no exact copy in the training data), and with
    valence/arousal all of its metrics (``<name>_valence_rmse`` ... ``<name>_mean_ccc``, ``<name>_va_n``).
    ``estimate_labels``: the model's own class names, in its output order; where the outputs hold no ``"va"``
    and the batches have targets, valence/arousal is estimated from the class probabilities as the app does
    (:func:`estimated_va`) and scored under ``estimated_`` keys (``<name>_estimated_`` for subsets)."""
    from tqdm import tqdm

    from trainers.losses.ce import masked_cross_entropy
    from trainers.metrics import classification_report

    names = list(label_names) if match is None else list(match.names)
    cols = None if match is None or match.identity else torch.as_tensor(match.cols, dtype=torch.int64)
    preds: dict[str, list[torch.Tensor]] = {}
    labels, index, va_p, va_t, va_i = [], [], [], [], []
    est_p, est_t, est_i = [], [], []
    anchors = None if estimate_labels is None else _anchors(estimate_labels)
    loss_sum, loss_n = torch.zeros((), dtype=torch.float64), 0
    for batch in tqdm(batches, desc=desc, leave=False, disable=True if quiet else None):
        with autocast():
            out = step(batch)
        lab = batch.label if match is None or match.identity else match.to_shared(batch.label)
        valid = lab >= 0
        main = "logits" if "logits" in out else "probs" if "probs" in out else None
        for k, v in out.items():
            if not (k == main or k.startswith("logits_")):
                continue
            v = v.float()
            if cols is not None:
                v = v[:, cols.to(v.device)]
            key = "logits" if k == main else k
            preds.setdefault(key, []).append(v.argmax(1).cpu())
            if k == main and bool(valid.any()):
                if k == "logits":
                    loss_sum += masked_cross_entropy(v, lab, reduction="sum").double().cpu()
                else:  # a model's own probabilities (an ensemble's vote); renormalised over the shared classes
                    p = v[valid]
                    if cols is not None:
                        p = p / p.sum(1, keepdim=True).clamp_min(1e-12)
                    loss_sum += F.nll_loss(p.clamp_min(1e-12).log(), lab[valid], reduction="sum").double().cpu()
                loss_n += int(valid.sum())
        labels.append(lab.cpu())
        index.append(batch.index.cpu())
        if "va" in out and batch.va is not None:
            va_p.append(out["va"].float().cpu())
            va_t.append(batch.va.float().cpu())
            va_i.append(batch.index.cpu())
        elif anchors is not None and batch.va is not None and "va" not in out:
            raw = out.get("probs")
            p = raw.float() if raw is not None else out["logits"].float().softmax(1) if "logits" in out else None
            if p is not None:
                est_p.append(torch.from_numpy(estimated_va(p.cpu().numpy(), anchors)))
                est_t.append(batch.va.float().cpu())
                est_i.append(batch.index.cpu())
    if gather is not None:  # every process's share -> the whole split
        parts = gather({"preds": {k: torch.cat(v) for k, v in preds.items()},
                        "labels": torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64),
                        "index": torch.cat(index) if index else torch.zeros(0, dtype=torch.int64),
                        "va_p": torch.cat(va_p) if va_p else None, "va_t": torch.cat(va_t) if va_t else None,
                        "va_i": torch.cat(va_i) if va_i else None, "loss_sum": loss_sum, "loss_n": loss_n,
                        "est_p": torch.cat(est_p) if est_p else None, "est_t": torch.cat(est_t) if est_t else None,
                        "est_i": torch.cat(est_i) if est_i else None})
        preds = {k: [p["preds"][k] for p in parts if k in p["preds"]] for k in parts[0]["preds"]}
        labels = [p["labels"] for p in parts]
        index = [p["index"] for p in parts]
        va_i = [p["va_i"] for p in parts if p["va_i"] is not None]
        va_p = [p["va_p"] for p in parts if p["va_p"] is not None]
        va_t = [p["va_t"] for p in parts if p["va_t"] is not None]
        est_i = [p["est_i"] for p in parts if p["est_i"] is not None]
        est_p = [p["est_p"] for p in parts if p["est_p"] is not None]
        est_t = [p["est_t"] for p in parts if p["est_t"] is not None]
        loss_sum = sum((p["loss_sum"] for p in parts), torch.zeros((), dtype=torch.float64))
        loss_n = sum(p["loss_n"] for p in parts)
    metrics: dict[str, Any] = {"n": int(sum(len(x) for x in labels))}
    if not labels:
        return metrics
    y = torch.cat(labels).numpy()
    if "logits" in preds and (y >= 0).any():
        keep = y >= 0
        yp = torch.cat(preds["logits"]).numpy()
        rep = classification_report(y[keep], yp[keep], names)
        for k in PERCENT_METRICS:  # trainers.metrics gives fractions; evaluations report percent
            metrics[k] = 100.0 * float(rep[k])
        metrics["confusion_matrix"] = [list(map(int, r)) for r in rep["confusion_matrix"]]
        metrics["per_class"] = {c: {"precision": 100.0 * v["precision"], "recall": 100.0 * v["recall"],
                                    "f1": 100.0 * v["f1"], "support": v["support"]}
                                for c, v in rep["per_class"].items()}
        metrics["loss"] = float(loss_sum / max(loss_n, 1))
        metrics["n"] = int(keep.sum())  # the items scored: labelled, of a class the checkpoint knows
        for k, p in preds.items():
            if k != "logits":
                metrics["accuracy" + k[len("logits"):]] = float((torch.cat(p).numpy()[keep] == y[keep]).mean() * 100)
    if va_p:
        vp, vt = torch.cat(va_p).numpy(), torch.cat(va_t).numpy()
        if np.isfinite(vt).all(1).any():
            metrics.update(_va_metrics("", vt, vp))
    if est_p:
        vp, vt = torch.cat(est_p).numpy(), torch.cat(est_t).numpy()
        if np.isfinite(vt).all(1).any():
            metrics.update(_va_metrics(ESTIMATED, vt, vp))
    for name, mask in (subsets or {}).items():
        metrics.update(_subset_metrics(name, np.asarray(mask, bool), torch.cat(index).numpy(), y,
                                       torch.cat(preds["logits"]).numpy() if "logits" in preds else None, names,
                                       (torch.cat(va_i).numpy(), torch.cat(va_p).numpy(), torch.cat(va_t).numpy())
                                       if va_p else None,
                                       (torch.cat(est_i).numpy(), torch.cat(est_p).numpy(), torch.cat(est_t).numpy())
                                       if est_p else None))
    return metrics


ESTIMATED = "estimated_"  # the key prefix of valence/arousal estimated from class probabilities
VA_KEYS = tuple(f"{d}_{k}" for d in ("valence", "arousal") for k in ("rmse", "sagr", "pcc", "ccc")) + ("mean_ccc",)


def _anchors(labels: Sequence[str]) -> tuple[np.ndarray, np.ndarray] | None:
    """The anchors of a model's classes (``ferengine.labels.anchor_matrix``), None when none has one."""
    from ferengine.labels import anchor_matrix

    a, mask = anchor_matrix(list(labels))
    return (a, mask) if mask.any() else None


def estimated_va(probs: np.ndarray, anchors: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """``(N, 2)`` float32 valence, arousal estimated from ``(N, K)`` class probabilities over the model's own
    classes, as the app computes them (``ferengine.pipeline``, ``ferengine.labels.estimate_va``): the
    probability-weighted mean of the anchored classes' anchors, the neutral point without anchored mass."""
    a, mask = anchors
    w = np.where(mask, np.clip(np.asarray(probs, np.float64), 0.0, None), 0.0)
    total = w.sum(axis=1, keepdims=True)
    va = np.divide(w @ a, total, out=np.zeros((len(w), 2)), where=np.isfinite(total) & (total > 0))
    return np.clip(va, -1.0, 1.0).astype(np.float32)


def _va_metrics(prefix: str, vt: np.ndarray, vp: np.ndarray) -> dict[str, Any]:
    """``<prefix>valence_rmse`` ... ``<prefix>arousal_ccc``, ``<prefix>mean_ccc``, ``<prefix>va_n``."""
    from trainers.metrics import regression_report

    rep = regression_report(vt, vp)  # {"n", "valence": {rmse, sagr, pcc, ccc}, "arousal": {...}, "mean_ccc"}
    rep["va_n"] = rep.pop("n")
    flat: dict[str, Any] = {}
    _flatten("", rep, flat)  # valence_rmse, ..., arousal_ccc, mean_ccc, va_n
    return {prefix + k: v for k, v in flat.items()}


def _subset_metrics(name: str, mask: np.ndarray, idx: np.ndarray, y: np.ndarray, yp: np.ndarray | None,
                    names: Sequence[str], va: tuple[np.ndarray, np.ndarray, np.ndarray] | None,
                    est: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> dict[str, Any]:
    from trainers.metrics import classification_report

    out: dict[str, Any] = {}
    sel = mask[idx]
    if yp is not None and (y >= 0).any():
        keep = sel & (y >= 0)
        out[f"{name}_n"] = int(keep.sum())
        if keep.any():
            rep = classification_report(y[keep], yp[keep], list(names))
            for k in PERCENT_METRICS:
                out[f"{name}_{k}"] = 100.0 * float(rep[k])
        else:
            out.update({f"{name}_{k}": float("nan") for k in PERCENT_METRICS})
    for prefix, part in (("", va), (ESTIMATED, est)):
        if part is None:
            continue
        vi, vp, vt = part
        s = mask[vi] & np.isfinite(vt).all(1)
        p = f"{name}_{prefix}"
        if s.sum() > 1:
            out.update(_va_metrics(p, vt[s], vp[s]))
        else:
            out.update({p + k: float("nan") for k in VA_KEYS})
        out[f"{p}va_n"] = int(s.sum())
    return out


def subset_table(metrics: dict[str, Any]) -> str:
    """The whole split and its part with no exact copy in the training data, side by side."""
    c = metrics.get("copies_in_train") or {}
    train = c.get("train_split", "the training data")
    rows = [("whole split", ""), (f"no copy in {train}", f"{NO_COPY}_")]
    lines = [f"{'':<24} {'n':>6} {'accuracy':>9} {'mean class acc':>15} {'macro F1':>9}"]
    for label, p in rows:
        if f"{p}n" not in metrics:
            continue
        vals = [metrics.get(f"{p}{k}", float("nan")) for k in PERCENT_METRICS]
        lines.append(f"{label:<24} {metrics[f'{p}n']:>6} {vals[0]:>8.2f}% {vals[1]:>14.2f}% {vals[2]:>8.2f}%")
    if c:
        lines.append(f"({c['copies']} of {c['items']} items are bit-identical to a {train} image, "
                     f"{c['same_label']} with the same label)")
    elif "no_copy_note" in metrics:
        lines.append(f"({metrics['no_copy_note']})")
    return "\n".join(lines)


def format_report(metrics: dict[str, Any], labels: Sequence[str], title: str = "") -> str:
    """The printed report: the three classification numbers, per-class table and confusion matrix;
    valence/arousal metrics when there are any."""
    from trainers.metrics import format_confusion

    lines = [title] if title else []
    if "accuracy" in metrics:
        lines += [
            f"n = {metrics['n']}",
            f"accuracy            {metrics['accuracy']:6.2f} %",
            f"mean class accuracy {metrics['mean_class_accuracy']:6.2f} %",
            f"macro F1            {metrics['macro_f1']:6.2f} %",
            f"loss (CE)           {metrics['loss']:8.4f}",
        ]
        if f"{NO_COPY}_n" in metrics:
            lines += ["", subset_table(metrics)]
        for k, v in metrics.items():
            if k.startswith("accuracy_"):
                lines.append(f"{k:<19} {v:6.2f} %")
        lines += ["", f"{'class':>12} {'precision':>9} {'recall':>7} {'F1':>7} {'support':>8}"]
        for name, m in (metrics.get("per_class") or {}).items():
            lines.append(f"{name:>12} {m['precision']:8.2f}% {m['recall']:6.2f}% {m['f1']:6.2f}% {m['support']:8d}")
        lines += ["", format_confusion(np.asarray(metrics["confusion_matrix"]), list(labels))]
    if "mean_ccc" in metrics:
        lines += ["", f"valence/arousal, n = {metrics.get('va_n')}",
                  f"{'':>10} {'RMSE':>7} {'SAGR':>7} {'PCC':>7} {'CCC':>7}"]
        for d in ("valence", "arousal"):
            lines.append(f"{d:>10} " + " ".join(f"{metrics[f'{d}_{k}']:7.4f}" for k in ("rmse", "sagr", "pcc", "ccc")))
        lines.append(f"{'mean CCC':>10} {metrics['mean_ccc']:7.4f}")
        lines += _no_copy_va_lines(metrics, "")
    if f"{ESTIMATED}mean_ccc" in metrics:
        lines += ["", ESTIMATED_HEADER + f", n = {metrics.get(ESTIMATED + 'va_n')}",
                  f"{'':>10} {'RMSE':>7} {'SAGR':>7} {'PCC':>7} {'CCC':>7}"]
        for d in ("valence", "arousal"):
            lines.append(f"{d:>10} " + " ".join(f"{metrics[f'{ESTIMATED}{d}_{k}']:7.4f}"
                                                for k in ("rmse", "sagr", "pcc", "ccc")))
        lines.append(f"{'mean CCC':>10} {metrics[ESTIMATED + 'mean_ccc']:7.4f}")
        lines += _no_copy_va_lines(metrics, ESTIMATED)
    return "\n".join(lines)


ESTIMATED_HEADER = "valence/arousal (estimated from class probabilities via category anchors)"


def _no_copy_va_lines(metrics: dict[str, Any], prefix: str) -> list[str]:
    """The valence/arousal rows of the part of the split with no exact copy in the training data."""
    p = f"{NO_COPY}_{prefix}"
    if f"{p}va_n" not in metrics:
        return []
    train = (metrics.get("copies_in_train") or {}).get("train_split", "the training data")
    lines = [f"no copy in {train}, n = {metrics[f'{p}va_n']}"]
    for d in ("valence", "arousal"):
        lines.append(f"{d:>10} " + " ".join(f"{metrics.get(f'{p}{d}_{k}', float('nan')):7.4f}"
                                            for k in ("rmse", "sagr", "pcc", "ccc")))
    lines.append(f"{'mean CCC':>10} {metrics.get(p + 'mean_ccc', float('nan')):7.4f}")
    return lines


# ======================================================================================= checkpoints


def evaluate_checkpoint(checkpoint: Any, data: str, data_dir: str | None, split: str, *, backend: str | None = None,
                        device: str = "cpu", batch_size: int = 256, data_opts: dict[str, Any] | None = None,
                        limit: int = 0, seed: int = 0, workers: int = 0, amp: torch.dtype | None = None,
                        quiet: bool = False, dataset: Any = None, train_dataset: Any = None) -> dict[str, Any]:
    """Evaluate a checkpoint (path or ``LoadedModel``) on a dataset split with its own input spec.

    ``backend``: None runs the checkpoint's torch module directly on ``device`` (the training run's own
    arithmetic; ``--eval-only``); ``"auto" | "torch" | "onnxruntime" | "tensorrt"`` runs it through that
    ferengine backend, as the app does (``fer eval``). Returns the metrics with what was evaluated:
    checkpoint, data, split, backend, dataset size, label policy, notes, what was left out and why; for a
    split of a dataset with a training split, the same numbers on the items with no exact copy in it
    (``no_copy_*``, ``copies_in_train``; ``train_dataset`` given in-process, else read like the split); and
    ``role``: whether this split selected the model (``validation (selection)``) or not (``held out``).
    Raises :class:`EvalError`, ``ferengine.errors.FerError`` or ``trainers.data.DatasetError``.
    """
    from ferengine import checkpoint as ck
    from ferengine.device import resolve_device

    from .data import DatasetError, canonical_split
    from .data.batches import make_batches
    from .data.splits import default_splits, open_at_size, subset

    loaded = checkpoint if hasattr(checkpoint, "model") and hasattr(checkpoint, "info") else ck.load(checkpoint)
    info = loaded.info
    if dataset is None:
        dataset = open_at_size(data, data_dir, split, data_opts, info.input.size)  # faces at the model's size
    split_name = getattr(dataset, "split", split)
    try:
        split_name = canonical_split(data, split_name)
    except Exception:  # noqa: BLE001 - a dataset given in-process may use its own names
        pass
    full = len(dataset)
    dataset = subset(dataset, limit, seed + 1)
    data_labels = list(dataset.label_names)
    y_all = torch.as_tensor(np.asarray(dataset.labels), dtype=torch.int64)
    has_expr = "expression" in info.heads and bool(info.labels)
    has_va_data = getattr(dataset, "va", None) is not None and "valence_arousal" in info.heads
    if not has_expr and not has_va_data:
        raise EvalError(f"{loaded.path}: the checkpoint's heads {list(info.heads)} have nothing to score on "
                        f"{data}/{split_name} (no class labels it knows, no valence/arousal targets)")
    if has_expr and (len(dataset) == 0 or bool((y_all < 0).all())) and not has_va_data:
        why = (getattr(dataset, "info", None) or {}).get("unlabelled")
        if why:
            raise EvalError(f"{why}; {data}/{split_name} has nothing to score the checkpoint on")
        raise EvalError(f"{data}/{split_name}: no item has a class label (a valence/arousal-only dataset?); "
                        "the checkpoint scores categorical labels")
    match = match_labels(info.labels, data_labels) if has_expr else None
    notes = list(match.notes) if match else []
    dropped: dict[str, Any] = {}
    if match is not None:
        from ferengine.labels import canonical

        shared = set(match.names)
        dropped_classes = {n: int((y_all == j).sum()) for j, n in enumerate(data_labels) if canonical(n) not in shared}
        n_dropped = sum(dropped_classes.values())
        if dropped_classes:
            notes.append(f"the dataset has classes the checkpoint lacks: {list(dropped_classes)}; their {n_dropped} "
                         f"items are left out, evaluating on the {len(match.names)} shared classes")
        unlabelled = int((y_all < 0).sum())
        if unlabelled:
            notes.append(f"{unlabelled} items without a class label are left out")
        if not bool((match.to_shared(y_all) >= 0).any()) and not has_va_data:
            raise EvalError(f"{data}/{split_name}: no item belongs to a class the checkpoint knows ({match.names})")
        dropped = {"classes_not_in_checkpoint": dropped_classes, "unlabelled": unlabelled}

    subsets, copies_info, copy_note = None, None, None
    if train_dataset is None and dataset is not None and data and not _is_train_split(data, split_name):
        tsplit = default_splits(data)[0]
        try:
            train_dataset = open_at_size(data, data_dir, tsplit, data_opts, info.input.size)
        except DatasetError as exc:
            copy_note = f"copies in {data}/{tsplit} not checked: {' '.join(str(exc).split())}"
    if train_dataset is not None:
        from .data.leakage import find_copies

        copies = find_copies(dataset, train_dataset, getattr(train_dataset, "split", "train"))
        subsets, copies_info = {NO_COPY: ~copies.mask}, copies.to_dict()
        if copies.count:
            notes.append(copies.describe(split_name) + "; the numbers are given for the whole split and without them")
    if copy_note:
        notes.append(copy_note)
    role = _role(info, data, split_name)

    if backend is None:
        dev = resolve_device(device)
        model = loaded.model.to(dev).eval()
        step = lambda batch: model(batch.input)  # noqa: E731
        be_name, be_device, closer = "torch (module)", str(dev), None
    else:
        from ferengine.backends import create_backend

        be = create_backend(backend, loaded, device=device)
        dev = torch.device("cpu")

        def step(batch: Any) -> dict[str, torch.Tensor]:
            res = be.run(np.ascontiguousarray(batch.input.cpu().numpy(), dtype=np.float32))
            return {k: torch.from_numpy(v) for k, v in res.items()}

        be_name, be_device, closer = be.name, be.device, be.close
    batches = make_batches(dataset, loaded.spec, dev, batch_size, workers=workers)
    from .engine.runtime import eval_autocast

    # no AV head, AV targets, anchored classes: score the app's estimate (its "estimated" valence/arousal)
    estimate = (has_expr and not info.has_av_head and getattr(dataset, "va", None) is not None
                and _anchors(info.labels) is not None)
    if estimate:
        notes.append("the checkpoint has no valence/arousal head: its valence/arousal are estimated from its class "
                     "probabilities via the category anchors (ferengine.labels.AV_ANCHORS), as the app shows them "
                     "(estimated_* metrics)")
    t0 = time.perf_counter()
    try:
        metrics = evaluate(step, batches, data_labels, autocast=eval_autocast(dev, amp), match=match,
                           desc=f"eval {data}/{split_name}", quiet=quiet, subsets=subsets,
                           estimate_labels=list(info.labels) if estimate else None)
    finally:
        if closer is not None:
            closer()
    dt = time.perf_counter() - t0
    va_source = "head" if "mean_ccc" in metrics else "estimated" if f"{ESTIMATED}mean_ccc" in metrics else None
    return {"checkpoint": str(loaded.path), "data": data, "data_dir": str(data_dir) if data_dir else None,
            "split": split_name, "backend": be_name, "device": be_device, "dataset_size": full,
            "label_policy": LABEL_POLICY, "labels": list(match.names) if match else [], "notes": notes,
            "role": role, "copies_in_train": copies_info, "va_source": va_source,
            "dropped": dropped, "checkpoint_classes_not_in_dataset":
                [n for n in info.labels if _canon(n) not in set(match.names)] if match else [],
            **metrics, "images_per_s": metrics.get("n", 0) / dt if dt > 0 else None}


def _is_train_split(data: str, split: str) -> bool:
    from .data.splits import default_splits

    try:
        return split == default_splits(data)[0]
    except Exception:  # noqa: BLE001
        return False


# FER+ relabels FER2013's images: its splits are the same faces as FER2013's (train = Training, valid = PublicTest,
# test = PrivateTest), so a model selected on one is selected on the other
_SAME_IMAGES = {("fer2013", "train"): "fer2013/Training", ("ferplus", "train"): "fer2013/Training",
                ("fer2013", "publictest"): "fer2013/PublicTest", ("ferplus", "valid"): "fer2013/PublicTest",
                ("fer2013", "privatetest"): "fer2013/PrivateTest", ("ferplus", "test"): "fer2013/PrivateTest"}


def _faces_of(data: str, split: str | None) -> tuple[str, str]:
    """The faces a (dataset, split) holds: FER2013 and FER+ splits map to the FER2013 split of their images."""
    try:
        from .data import canonical_name, canonical_split

        name = canonical_name(data or "")
        split = canonical_split(name, split) if split else ""
    except Exception:  # noqa: BLE001 - names the readers do not know
        name, split = data or "", split or ""
    key = _SAME_IMAGES.get((name, split))
    return ("images", key) if key else (name, split)


def _role(info: Any, data: str, split: str) -> str:
    """``validation (selection)`` when the checkpoint's training run selected its epoch on this split (or on the
    same faces under another dataset's labels: FER2013 PublicTest and FER+ valid)."""
    t = (info.training or {}).get("data") or {}
    if not t:
        return "unknown (the checkpoint does not record its training data)"
    here = _faces_of(data, split)
    if t.get("val_split") and _faces_of(t.get("name") or "", t["val_split"]) == here:
        same_set = _faces_of(t.get("name") or "", None)[0] == _faces_of(data, None)[0]
        return ("validation (selection): this split chose the model's epoch" if same_set else
                f"validation (selection): the model's epoch was chosen on {t.get('name')}/{t['val_split']}, the "
                "same faces")
    if t.get("train_split") and _faces_of(t.get("name") or "", t["train_split"]) == here:
        return "training data"
    return "held out: not used to train or select the model"


def _canon(name: str) -> str:
    from ferengine.labels import canonical

    return canonical(name)


# ============================================================================================ command


def run_command(args: argparse.Namespace) -> int:
    """``fer eval`` / ``python -m trainers.evaluate``: evaluate, print the report, write JSON/PNG."""
    from ferengine import checkpoint as ck
    from ferengine.fileio import atomic_write_json

    if args.batch_size < 1:
        raise EvalError(f"--batch-size must be >= 1, got {args.batch_size}")
    opts = dict(args.data_opt)
    if args.json:  # a --json that cannot be written fails now, not after the whole evaluation
        from ferengine.fileio import check_output

        check_output(Path(args.json), make_parents=True)  # as atomic_write_json makes the folder
    if str(args.device).strip().lower() not in ("auto", ""):
        from ferengine.device import resolve_device

        resolve_device(args.device)  # a device that is not there: one line now, not after every backend tried
    path = Path(args.checkpoint) if args.checkpoint else ck.default_checkpoint_path()
    loaded = ck.load(path)
    res = evaluate_checkpoint(loaded, args.data, args.data_dir, args.split, backend=args.backend, device=args.device,
                              batch_size=args.batch_size, data_opts=opts, quiet=args.quiet)
    for note in res["notes"]:
        print(f"fer: note: {note}", file=sys.stderr)
    print(f"{loaded.path} on {args.data}/{res['split']} ({res['backend']} on {res['device']}): "
          f"{res['n']} of {res['dataset_size']} faces; {res['role']}")
    print(format_report(res, res["labels"]))
    if args.json:
        atomic_write_json(Path(args.json), _json_safe(res))
        print(f"wrote {args.json}", file=sys.stderr)
    if args.confusion_png and "confusion_matrix" in res:
        from trainers.metrics import save_confusion_png

        save_confusion_png(np.asarray(res["confusion_matrix"]), res["labels"], args.confusion_png,
                           title=f"{loaded.info.name or loaded.path.name} on {args.data}/{res['split']}")
        print(f"wrote {args.confusion_png}", file=sys.stderr)
    return 0


def _json_safe(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _json_safe(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [_json_safe(v) for v in d]
    if isinstance(d, float) and d != d:
        return None
    return d


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m trainers.evaluate`` (the same as ``fer eval``)."""
    from ferengine.cli import main as fer_main

    return fer_main(["eval", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
