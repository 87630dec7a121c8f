"""Evaluation metrics: categorical (accuracy, mean class accuracy, macro-F1, confusion matrix) and
valence/arousal regression (RMSE, SAGR, PCC, CCC).

Conventions (they match scikit-learn's, and the tests check it):

- Inputs are 1-D integer arrays (numpy, torch or lists). Items whose true label is negative (-1 =
  "no label") are left out of every categorical metric.
- ``mean_class_accuracy`` is the mean per-class recall over the classes present in ``y_true``
  (``balanced_accuracy_score``).
- ``macro_f1`` averages the per-class F1 over the classes present in ``y_true`` or ``y_pred``
  (``f1_score(average="macro")``); a class never predicted has F1 0. Pass ``labels`` to average over a fixed
  class list instead (absent classes then score 0, as scikit-learn with ``labels=`` and ``zero_division=0``).
- ``confusion_matrix[i, j]`` counts items of true class i predicted as j.
- Fractions are in [0, 1]; :func:`format_classification_report` prints percentages.

Regression metrics take ``(N,)`` arrays or ``(N, 2)`` (valence, arousal) arrays; rows with a NaN in the
target or prediction are left out. SAGR is the fraction of items whose prediction has the target's sign
(``np.sign``, so 0 only agrees with 0). PCC is Pearson's r (0 when either side is constant); CCC is
Lin's concordance ``2 cov / (var_t + var_p + (mean_t - mean_p)^2)`` with population (1/N) moments.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np


def _np(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _labelled(y_true: Any, y_pred: Any) -> tuple[np.ndarray, np.ndarray]:
    t = _np(y_true).astype(np.int64).reshape(-1)
    p = _np(y_pred).astype(np.int64).reshape(-1)
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred differ in length: {t.shape[0]} vs {p.shape[0]}")
    keep = t >= 0
    return t[keep], p[keep]


# --------------------------------------------------------------------------------- categorical


def confusion_matrix(y_true: Any, y_pred: Any, num_classes: int | None = None) -> np.ndarray:
    """int64 ``(K, K)``: rows = true class, columns = predicted class."""
    t, p = _labelled(y_true, y_pred)
    if num_classes is None:
        num_classes = int(max(t.max(initial=-1), p.max(initial=-1))) + 1
    k = int(num_classes)
    if len(t) and (t.max() >= k or p.max() >= k or p.min() < 0):
        raise ValueError(f"labels outside 0..{k - 1}: true {t.min()}..{t.max()}, predicted {p.min()}..{p.max()}")
    return np.bincount(t * k + p, minlength=k * k).reshape(k, k).astype(np.int64)


def accuracy(y_true: Any, y_pred: Any) -> float:
    t, p = _labelled(y_true, y_pred)
    return float((t == p).mean()) if len(t) else float("nan")


def per_class_recall(cm: np.ndarray) -> np.ndarray:
    """Recall per class from a confusion matrix (NaN for classes without true items)."""
    support = cm.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, np.diag(cm) / np.maximum(support, 1), np.nan)


def mean_class_accuracy(y_true: Any, y_pred: Any, num_classes: int | None = None) -> float:
    """Mean recall over the classes present in ``y_true`` (= scikit-learn's balanced accuracy)."""
    cm = confusion_matrix(y_true, y_pred, num_classes)
    r = per_class_recall(cm)
    r = r[np.isfinite(r)]
    return float(r.mean()) if len(r) else float("nan")


def _prf(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    tp = np.diag(cm).astype(np.float64)
    pred = cm.sum(axis=0).astype(np.float64)
    support = cm.sum(axis=1).astype(np.float64)
    precision = np.divide(tp, pred, out=np.zeros_like(tp), where=pred > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = 2 * tp + (pred - tp) + (support - tp)
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    return precision, recall, f1, support


def macro_f1(y_true: Any, y_pred: Any, num_classes: int | None = None,
             labels: Sequence[int] | None = None) -> float:
    """Macro-averaged F1 over the classes seen in ``y_true`` or ``y_pred`` (or over ``labels``)."""
    k = num_classes
    if labels is not None:
        k = max(int(max(labels)) + 1, k or 0)
    cm = confusion_matrix(y_true, y_pred, k)
    _, _, f1, support = _prf(cm)
    if labels is not None:
        sel = np.asarray(list(labels), np.int64)
    else:
        sel = np.flatnonzero((support > 0) | (cm.sum(axis=0) > 0))
    return float(f1[sel].mean()) if len(sel) else float("nan")


def classification_report(y_true: Any, y_pred: Any, labels: Sequence[str]) -> dict[str, Any]:
    """Everything the trainers log and ``fer eval`` prints, as plain JSON-able types (fractions in [0,1]).

    ``{"n", "accuracy", "mean_class_accuracy", "macro_f1", "labels", "confusion_matrix" (list of lists),
    "per_class": {name: {"precision", "recall", "f1", "support"}}}``
    """
    names = list(labels)
    cm = confusion_matrix(y_true, y_pred, len(names))
    precision, recall, f1, support = _prf(cm)
    t, p = _labelled(y_true, y_pred)
    return {
        "n": int(len(t)),
        "accuracy": accuracy(t, p),
        "mean_class_accuracy": mean_class_accuracy(t, p, len(names)),
        "macro_f1": macro_f1(t, p, len(names)),
        "labels": names,
        "confusion_matrix": cm.tolist(),
        "per_class": {
            name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                   "support": int(support[i])}
            for i, name in enumerate(names)
        },
    }


def format_confusion(cm: Any, labels: Sequence[str]) -> str:
    """The confusion matrix as an aligned text table (rows = true, columns = predicted)."""
    cm = _np(cm)
    names = [str(n) for n in labels]
    w = max([len(n) for n in names] + [len(str(int(cm.max(initial=0))))] + [4])
    head = " " * (w + 1) + " ".join(n[:w].rjust(w) for n in names)
    rows = [f"{n[:w].rjust(w)} " + " ".join(str(int(v)).rjust(w) for v in row) for n, row in zip(names, cm)]
    return "\n".join(["true \\ predicted", head, *rows])


def format_classification_report(report: dict[str, Any]) -> str:
    lines = [
        f"n = {report['n']}",
        f"accuracy            {100 * report['accuracy']:6.2f} %",
        f"mean class accuracy {100 * report['mean_class_accuracy']:6.2f} %",
        f"macro F1            {100 * report['macro_f1']:6.2f} %",
        "",
        f"{'class':>12} {'precision':>9} {'recall':>7} {'F1':>7} {'support':>8}",
    ]
    for name, m in report["per_class"].items():
        lines.append(f"{name:>12} {100 * m['precision']:8.2f}% {100 * m['recall']:6.2f}% "
                     f"{100 * m['f1']:6.2f}% {m['support']:8d}")
    lines += ["", format_confusion(report["confusion_matrix"], report["labels"])]
    return "\n".join(lines)


def save_confusion_png(cm: Any, labels: Sequence[str], path: str | Path, normalize: bool = True,
                       title: str | None = None) -> Path:
    """Draw the confusion matrix (row-normalised colours with counts, or raw counts) to a PNG file."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    cm = _np(cm).astype(np.float64)
    k = len(labels)
    with np.errstate(invalid="ignore", divide="ignore"):
        shown = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1) if normalize else cm
    size = 1.0 + 0.75 * k
    fig = Figure(figsize=(size + 1.2, size), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1 if normalize else max(1.0, shown.max()))
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(k), labels=list(labels), rotation=45, ha="right")
    ax.set_yticks(range(k), labels=list(labels))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title)
    thresh = 0.5 * (1 if normalize else max(1.0, shown.max()))
    for i in range(k):
        for j in range(k):
            txt = f"{100 * shown[i, j]:.0f}%\n{int(cm[i, j])}" if normalize else f"{int(cm[i, j])}"
            ax.text(j, i, txt, ha="center", va="center", fontsize=7,
                    color="white" if shown[i, j] > thresh else "black")
    fig.tight_layout()
    from ferengine.fileio import atomic_write

    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fig.savefig(fh, format=fmt)

    atomic_write(path, write)
    return path


# ---------------------------------------------------------------------------------- regression


def _pairs(y_true: Any, y_pred: Any) -> tuple[np.ndarray, np.ndarray]:
    t = _np(y_true).astype(np.float64)
    p = _np(y_pred).astype(np.float64)
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred differ in shape: {t.shape} vs {p.shape}")
    if t.ndim == 1:
        t, p = t[:, None], p[:, None]
    keep = np.isfinite(t).all(axis=1) & np.isfinite(p).all(axis=1)
    return t[keep], p[keep]


def _per_column(fn, y_true: Any, y_pred: Any) -> float | np.ndarray:
    t, p = _pairs(y_true, y_pred)
    out = np.array([fn(t[:, j], p[:, j]) if len(t) else np.nan for j in range(t.shape[1])])
    return float(out[0]) if _np(y_true).ndim == 1 else out


def rmse(y_true: Any, y_pred: Any) -> float | np.ndarray:
    """Root mean squared error (per column for ``(N, 2)`` input)."""
    return _per_column(lambda t, p: float(np.sqrt(np.mean((t - p) ** 2))), y_true, y_pred)


def sagr(y_true: Any, y_pred: Any) -> float | np.ndarray:
    """Sign agreement: fraction of items with ``sign(pred) == sign(true)``."""
    return _per_column(lambda t, p: float(np.mean(np.sign(t) == np.sign(p))), y_true, y_pred)


def _pcc(t: np.ndarray, p: np.ndarray) -> float:
    tc, pc = t - t.mean(), p - p.mean()
    denom = np.sqrt((tc ** 2).sum() * (pc ** 2).sum())
    return float((tc * pc).sum() / denom) if denom > 0 else 0.0


def _ccc(t: np.ndarray, p: np.ndarray) -> float:
    mt, mp = t.mean(), p.mean()
    cov = np.mean((t - mt) * (p - mp))
    denom = t.var() + p.var() + (mt - mp) ** 2
    return float(2 * cov / denom) if denom > 0 else 0.0


def pcc(y_true: Any, y_pred: Any) -> float | np.ndarray:
    """Pearson correlation coefficient (0 when either side is constant)."""
    return _per_column(_pcc, y_true, y_pred)


def ccc(y_true: Any, y_pred: Any) -> float | np.ndarray:
    """Lin's concordance correlation coefficient."""
    return _per_column(_ccc, y_true, y_pred)


def regression_report(y_true: Any, y_pred: Any,
                      names: Sequence[str] = ("valence", "arousal")) -> dict[str, Any]:
    """``{"n", <name>: {"rmse", "sagr", "pcc", "ccc"} for each column, "mean_ccc"}`` for ``(N, 2)`` targets
    (or ``(N,)`` with one name). Rows with NaN are left out."""
    t, p = _pairs(y_true, y_pred)
    if t.shape[1] != len(names):
        raise ValueError(f"{t.shape[1]} target columns but {len(names)} names {tuple(names)}")
    out: dict[str, Any] = {"n": int(len(t))}
    for j, name in enumerate(names):
        a, b = t[:, j], p[:, j]
        if len(a):
            out[name] = {"rmse": float(np.sqrt(np.mean((a - b) ** 2))), "sagr": float(np.mean(np.sign(a) == np.sign(b))),
                         "pcc": _pcc(a, b), "ccc": _ccc(a, b)}
        else:
            out[name] = {k: float("nan") for k in ("rmse", "sagr", "pcc", "ccc")}
    out["mean_ccc"] = float(np.mean([out[n]["ccc"] for n in names]))
    return out


def format_regression_report(report: dict[str, Any]) -> str:
    names = [k for k, v in report.items() if isinstance(v, dict)]
    lines = [f"n = {report['n']}", f"{'':>10} {'RMSE':>7} {'SAGR':>7} {'PCC':>7} {'CCC':>7}"]
    for n in names:
        m = report[n]
        lines.append(f"{n:>10} {m['rmse']:7.4f} {m['sagr']:7.4f} {m['pcc']:7.4f} {m['ccc']:7.4f}")
    return "\n".join(lines)
