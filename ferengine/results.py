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
from pathlib import Path
from typing import Any, Sequence

from .errors import InvalidValue, OutputError
from .fileio import check_output, create_temp, describe_os_error, fsync_folder, partial_path, show
from .pipeline import FrameResult

log = logging.getLogger(__name__)

LEADING_COLUMNS = ("frame", "time_s", "face_id", "x", "y", "w", "h", "score", "label")
TRAILING_COLUMNS = ("valence", "arousal", "av_source")

# decimals per kind of value: seconds to the microsecond, pixels to 0.01 px, probabilities and
# valence/arousal to 1e-5 (well below any model's precision)
TIME_DECIMALS = 6
PIXEL_DECIMALS = 2
VALUE_DECIMALS = 5


# the keys of frame_result_to_dicts beyond the CSV columns
EXTRA_KEYS = ("confidence", "keypoints")


def check_label_names(labels: Sequence[str], reserved: Sequence[str] = (*LEADING_COLUMNS, *TRAILING_COLUMNS,
                                                                        *EXTRA_KEYS)) -> None:
    """Class names become columns (CSV) and keys (JSON) beside a row's own fields: a name equal to one of
    those, or repeated, would silently overwrite a value. Raises :class:`InvalidValue` (a ``ValueError``)."""
    clash = sorted({c for c in labels if c in reserved})
    dupes = sorted({c for c in labels if list(labels).count(c) > 1})
    if clash or dupes:
        what = "; ".join(([f"{clash} are also the names of result fields ({', '.join(reserved)})"] if clash else [])
                         + ([f"{dupes} occur more than once"] if dupes else []))
        raise InvalidValue(f"class names {list(labels)} clash: {what}; rename the classes in the checkpoint")


def csv_columns(labels: Sequence[str]) -> list[str]:
    """The CSV header for a model with class names ``labels``."""
    check_label_names(labels)
    return [*LEADING_COLUMNS, *labels, *TRAILING_COLUMNS]


def _num(value: float | None, decimals: int) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    text = f"{float(value):.{decimals}f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


class ResultWriter:
    """Write :class:`FrameResult` rows to ``path`` as CSV (columns: see the module docstring), by the
    output rule of :mod:`ferengine.fileio`.

    The target is resolved and checked when the writer is made (a folder, a missing or read-only folder
    fail here, before any frame is analysed; a symlink is written through to its target). Rows go to a
    temp file beside the target (``.<name>.fer-<pid>-....part``), flushed after every :meth:`write`;
    :meth:`close` renames it to the target (atomic: readers never see a half-written file under the
    final name, and an existing file is replaced only then).

    A result that stops halfway never takes the final name: when the ``with`` block ends with an
    exception (Ctrl-C, a video that fails mid-way, a full disk), :meth:`abort` keeps the rows written so
    far as :attr:`partial` (``results.partial.csv``) and the previous ``results.csv``, if any, is left
    as it was. If the process itself is killed, the ``.part`` file stays (with every row up to the last
    :meth:`write`) and the next writer of the same target keeps it as ``results.partial.csv``.

    A device, FIFO or ``/dev/stdout`` is written into directly (rows appear as they are produced).
    """

    def __init__(self, path: str | os.PathLike, labels: Sequence[str]):
        self.path = Path(path)
        self.labels = tuple(labels)
        self.columns = csv_columns(self.labels)
        self.target = check_output(self.path)
        self.partial = None if self.target.special else partial_path(self.target.path)
        self.rows = 0
        self.frames = 0
        self.last_frame: int | None = None
        self._tmp: Path | None = None
        try:
            if self.target.special:
                self._fh = open(self.target.path, "w", newline="", encoding="utf-8")
            else:
                self._tmp = create_temp(self.target.path, "part")
                self._fh = open(self._tmp, "w", newline="", encoding="utf-8")
            self._csv = csv.writer(self._fh, lineterminator="\n")
            self._csv.writerow(self.columns)
            self._fh.flush()
        except OSError as exc:
            self._discard()
            raise self._error(exc) from None

    def _error(self, exc: OSError) -> OutputError:
        return exc if isinstance(exc, OutputError) else \
            OutputError(f"cannot write {show(self.path)}: {describe_os_error(exc)}")

    def _discard(self) -> None:
        fh, self._fh = getattr(self, "_fh", None), None
        if fh is not None:
            try:
                fh.close()
            except OSError:
                pass
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
            self._tmp = None

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
            try:
                self._csv.writerows(rows)
                self._fh.flush()
            except OSError as exc:
                raise self._error(exc) from None
            self.rows += len(rows)
        self.frames += 1
        self.last_frame = int(fr.index)
        return len(rows)

    def close(self) -> Path:
        """Finish the file and move it to the target (idempotent). Returns :attr:`path`. When finishing
        fails (a full disk at the last flush), the rows are kept as :attr:`partial` and
        :class:`OutputError` is raised."""
        if self._fh is None:
            return self.path
        fh = self._fh
        try:
            fh.flush()
            if self._tmp is not None:
                os.fsync(fh.fileno())
        except OSError as exc:
            self.abort()
            raise self._error(exc) from None
        self._fh = None
        fh.close()
        if self._tmp is not None:
            try:
                os.replace(self._tmp, self.target.path)
            except OSError as exc:
                self.abort()
                raise self._error(exc) from None
            self._tmp = None
            fsync_folder(self.target.path.parent)
        return self.path

    def abort(self) -> Path | None:
        """Stop without finishing: the target is left as it was; the rows written so far are kept as
        :attr:`partial` (``results.partial.csv``, replacing an older partial file) and that path is
        returned. ``None`` when nothing needed keeping (no frame was written, or a special file that
        already received the rows). Idempotent."""
        fh, self._fh = self._fh, None
        if fh is not None:
            try:
                fh.close()
            except OSError:
                pass
        tmp, self._tmp = self._tmp, None
        if tmp is None:
            return None
        if self.frames == 0:
            tmp.unlink(missing_ok=True)
            return None
        try:
            os.replace(tmp, self.partial)
        except OSError as exc:  # the rows stay in the temp file, which the next writer keeps as partial
            log.warning("cannot keep the unfinished rows of %s as %s: %s (they are in %s)", show(self.path),
                        show(self.partial), describe_os_error(exc), show(tmp))
            return tmp
        return self.partial

    def __enter__(self) -> "ResultWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        if self._fh is None and self._tmp is None:
            return
        kept = self.abort()
        if kept is not None:
            log.warning("%s did not finish (%s): the %d rows of %d frames written so far are kept in %s; "
                        "%s was not changed", show(self.path), exc_type.__name__, self.rows, self.frames,
                        show(kept), show(self.path))


def frame_result_to_dicts(fr: FrameResult, labels: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """One JSON-ready dict per face (plain Python numbers and strings).

    Keys: the CSV columns (``frame, time_s, face_id, x, y, w, h, score, label``, one key per class
    name, ``valence, arousal, av_source``) plus ``confidence`` (the label's probability) and ``keypoints`` (6 ``[x, y]`` pairs). ``labels`` defaults to ``fr.labels``.
    """
    names = tuple(labels) if labels is not None else tuple(fr.labels)
    check_label_names(names)
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
