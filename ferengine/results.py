"""Pipeline results as CSV (one row per face per frame) and as JSON-ready dicts.

CSV columns, in this order::

    frame, time_s, face_id, x, y, w, h, score, label, <one column per class name>, valence, arousal, av_source

``pandas.read_csv(path)`` reads the file as is. Frames without a face add no row. A model without an
expression head has no class columns and an empty ``label``.
"""
from __future__ import annotations

import csv
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

from .pipeline import FrameResult

log = logging.getLogger(__name__)

LEADING_COLUMNS = ("frame", "time_s", "face_id", "x", "y", "w", "h", "score", "label")
TRAILING_COLUMNS = ("valence", "arousal", "av_source")

# decimals per kind of value: seconds to the microsecond, pixels to 0.01 px, probabilities and
# valence/arousal to 1e-5 (well below any model's precision)
TIME_DECIMALS = 6
PIXEL_DECIMALS = 2
VALUE_DECIMALS = 5


def csv_columns(labels: Sequence[str]) -> list[str]:
    """The CSV header for a model with class names ``labels``."""
    cols = [*LEADING_COLUMNS, *labels, *TRAILING_COLUMNS]
    clash = sorted({c for c in labels if c in LEADING_COLUMNS or c in TRAILING_COLUMNS})
    if clash or len(set(labels)) != len(labels):
        raise ValueError(f"class names {list(labels)} clash with each other or with the CSV columns {clash}")
    return cols


def _num(value: float | None, decimals: int) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    text = f"{float(value):.{decimals}f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


class ResultWriter:
    """Write :class:`FrameResult` rows to ``path`` as CSV (columns: see the module docstring).

    Rows go to a temporary file in the same folder (``.<name>.<random>.part``), flushed after every
    :meth:`write`; :meth:`close` renames it to ``path`` (atomic: readers never see a half-written file
    under the final name, and an existing file is replaced only then). When the ``with`` block ends
    with an exception the rows written so far are still renamed to ``path``: an analysis that fails
    halfway keeps what it produced (the exception propagates). Only if the process itself dies is the
    ``.part`` file left behind, with every row written up to the last :meth:`write`.
    """

    def __init__(self, path: str | os.PathLike, labels: Sequence[str]):
        self.path = Path(path)
        self.labels = tuple(labels)
        self.columns = csv_columns(self.labels)
        folder = self.path.parent
        if not folder.is_dir():
            raise FileNotFoundError(f"cannot write {self.path}: folder {folder} does not exist")
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".part", dir=folder)
        self._tmp = Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the result the usual permissions
        self._fh = os.fdopen(fd, "w", newline="", encoding="utf-8")
        self._csv = csv.writer(self._fh, lineterminator="\n")
        self._csv.writerow(self.columns)
        self._fh.flush()
        self.rows = 0

    @property
    def closed(self) -> bool:
        return self._fh is None

    def write(self, fr: FrameResult) -> int:
        """Append one row per face of ``fr``; returns the number of rows written."""
        if self._fh is None:
            raise ValueError(f"ResultWriter for {self.path} is closed")
        k = len(self.labels)
        if fr.labels and tuple(fr.labels) != self.labels:
            raise ValueError(f"frame result labels {list(fr.labels)} differ from the writer's {list(self.labels)}")
        rows = []
        frame, t = str(int(fr.index)), _num(fr.time_s, TIME_DECIMALS)
        for face in fr.faces:
            x, y, w, h = face.box
            if face.probs is not None and k:
                probs = [_num(p, VALUE_DECIMALS) for p in face.probs.tolist()]
                if len(probs) != k:
                    raise ValueError(f"face {face.face_id}: {len(probs)} probabilities for {k} classes")
            else:
                probs = [""] * k
            rows.append([
                frame, t, str(int(face.face_id)),
                _num(x, PIXEL_DECIMALS), _num(y, PIXEL_DECIMALS), _num(w, PIXEL_DECIMALS), _num(h, PIXEL_DECIMALS),
                _num(face.score, VALUE_DECIMALS), face.label or "", *probs,
                _num(face.valence, VALUE_DECIMALS), _num(face.arousal, VALUE_DECIMALS), face.av_source,
            ])
        if rows:
            self._csv.writerows(rows)
            self._fh.flush()
            self.rows += len(rows)
        return len(rows)

    def close(self) -> Path:
        """Finish the file and move it to :attr:`path` (idempotent). Returns the path."""
        if self._fh is None:
            return self.path
        fh, self._fh = self._fh, None
        try:
            fh.flush()
            os.fsync(fh.fileno())
        finally:
            fh.close()
        os.replace(self._tmp, self.path)
        return self.path

    def __enter__(self) -> "ResultWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and self._fh is not None:
            log.warning("keeping the %d rows written before the error in %s", self.rows, self.path)
        self.close()


def frame_result_to_dicts(fr: FrameResult, labels: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """One JSON-ready dict per face (plain Python numbers and strings).

    Keys: the CSV columns (``frame, time_s, face_id, x, y, w, h, score, label``, one key per class
    name, ``valence, arousal, av_source``) plus ``confidence`` (the label's probability) and ``keypoints`` (6 ``[x, y]`` pairs). ``labels`` defaults to ``fr.labels``.
    """
    names = tuple(labels) if labels is not None else tuple(fr.labels)
    out = []
    for face in fr.faces:
        x, y, w, h = (round(float(v), PIXEL_DECIMALS) for v in face.box)
        d: dict[str, Any] = {
            "frame": int(fr.index), "time_s": round(float(fr.time_s), TIME_DECIMALS), "face_id": int(face.face_id),
            "x": x, "y": y, "w": w, "h": h, "score": round(float(face.score), VALUE_DECIMALS),
            "label": face.label,
        }
        if face.probs is not None:
            for name, p in zip(names, face.probs.tolist()):
                d[name] = round(p, VALUE_DECIMALS)
        conf = None if face.confidence is None else round(float(face.confidence), VALUE_DECIMALS)
        d.update({
            "valence": round(float(face.valence), VALUE_DECIMALS),
            "arousal": round(float(face.arousal), VALUE_DECIMALS),
            "av_source": face.av_source,
            "confidence": conf,
            "keypoints": [[round(float(a), PIXEL_DECIMALS), round(float(b), PIXEL_DECIMALS)]
                          for a, b in (face.keypoints.tolist() if face.keypoints is not None else [])],
        })
        out.append(d)
    return out
