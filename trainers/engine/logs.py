"""What a run tells its user: console and ``train.log`` logging, ``metrics.csv`` (one row per epoch,
rewritten atomically), TensorBoard, and a progress line now and then when no terminal shows a bar."""
from __future__ import annotations

import csv
import io
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

from ferengine.fileio import atomic_write_text

log = logging.getLogger("trainers.engine")

__all__ = ["setup_logging", "MetricsLog", "hms", "progress_line", "clock", "PROGRESS_EVERY_S"]

PROGRESS_EVERY_S = 60.0  # without a terminal, a progress line at most this often during an epoch


def clock() -> float:
    """--time-budget's and the progress line's clock (a test replaces ``trainers.engine.logs.clock``)."""
    return time.monotonic()


def hms(seconds: float) -> str:
    """``75`` -> ``1m15s``, ``4000`` -> ``1h06m``; ``?`` when unknown."""
    if not math.isfinite(seconds):
        return "?"
    s = int(round(max(seconds, 0.0)))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def progress_line(epoch: int, epochs: int, step: int, n_steps: int, n_img: int, elapsed: float,
                  sums: dict[str, Any]) -> str:
    """One line on a long epoch's progress (used when there is no progress bar)."""
    ips = n_img / elapsed if elapsed > 0 else float("nan")
    left = elapsed / step * (n_steps - step) if step else float("nan")
    keys = sorted(sums, key=lambda k: k != "loss")[:3]  # the total first, then the method's first terms
    losses = ", ".join(f"{k} {float(sums[k]) / max(n_img, 1):.4f}" for k in keys)
    return (f"epoch {epoch}/{epochs}: step {step}/{n_steps} ({100 * step // max(n_steps, 1)}%), "
            f"{losses or 'no losses yet'}; {ips:.1f} img/s, training ends in {hms(left)} (then evaluation)")


class MetricsLog:
    """``metrics.csv`` and TensorBoard for one run folder (written by the main process only)."""

    def __init__(self, out: Path, enabled: bool = True):
        self.out, self.enabled = out, enabled
        self.history: list[dict[str, Any]] = []
        self.writer = None

    def open_tensorboard(self, purge_step: int | None) -> None:
        if not self.enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:  # tensorboard not installed
            log.warning("TensorBoard logging is off (%s); pip install tensorboard", exc)
            return
        self.writer = SummaryWriter(str(self.out / "tb"), purge_step=purge_step)

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)

    def row(self, row: dict[str, Any], step: int) -> None:
        """Add (or replace) an epoch's row and rewrite metrics.csv atomically."""
        self.history = [r for r in self.history if int(r["epoch"]) < int(row["epoch"])] + [row]
        cols: list[str] = []
        for r in self.history:
            cols += [k for k in r if k not in cols]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in self.history:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})
        atomic_write_text(self.out / "metrics.csv", buf.getvalue())
        if self.writer is not None:
            for k, v in row.items():
                if k not in ("epoch", "step") and isinstance(v, (int, float)) and v is not None:
                    self.writer.add_scalar(f"epoch/{k}", v, step)
            self.writer.flush()

    def read(self, up_to_epoch: int) -> None:
        """On resume: the rows of the epochs the state covers (rows logged after it -- killed between the csv
        and state.pt -- are dropped)."""
        path = self.out / "metrics.csv"
        if not path.exists():
            return
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
        self.history = [r for r in rows if r.get("epoch") and int(r["epoch"]) <= up_to_epoch]

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at emit time (not the one at creation, which pytest's
    capture or a caller may since have closed)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def _not_file_only(record: logging.LogRecord) -> bool:
    """Console filter: records meant for train.log only (the error boundary prints those lines itself)."""
    from .boundary import CONSOLE_ONLY_FILE

    return not getattr(record, CONSOLE_ONLY_FILE, False)


def setup_logging(out: Path | None, rank: int = 0, level: int | str = logging.INFO) -> Callable[[], None]:
    """Console logging at ``level`` (INFO) and, with ``out``, a ``train.log`` file handler at INFO or lower
    (main process only; the other processes of a torchrun launch log only errors, prefixed with their rank).

    Returns a function that undoes both (handlers removed, the root level restored), so that a trainer
    run in-process (tests, notebooks) leaves the caller's logging as it found it.
    """
    root = logging.getLogger()
    previous_level = root.level
    added: list[logging.Handler] = []
    if not any(getattr(h, "_fer_engine", False) for h in root.handlers):
        h = _CurrentStderrHandler()
        prefix = f"[rank {rank}] " if rank else ""
        h.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {prefix}%(message)s", "%H:%M:%S"))
        h._fer_engine = True  # type: ignore[attr-defined]
        h.addFilter(_not_file_only)
        h.setLevel(logging.ERROR if rank else level)  # the main process says it all once
        added.append(h)
    if out is not None and rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(out / "train.log")
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        added.append(fh)
    for h in added:
        root.addHandler(h)
    lvl = logging.getLevelName(level) if isinstance(level, str) else level
    root.setLevel(min(logging.INFO, lvl if isinstance(lvl, int) else logging.INFO))

    def restore() -> None:
        for h in added:
            root.removeHandler(h)
            h.close()
        root.setLevel(previous_level)

    return restore
