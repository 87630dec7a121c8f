"""The face crop a dataset's training faces correspond to: the ``crop_margin`` / ``crop_offset_y`` that make
the app's crops of real faces frame them like the dataset does (measured by ``python -m trainers.calibrate``).

Trainers write it into every checkpoint's input spec: from ``--crop-calibration FILE`` (a calibrate run's
``calibration.json``), else from the measurements below for the datasets that have one, else from
``--crop-margin`` / ``--crop-offset-y``; a checkpoint trained without any says so (``fer info``, the app).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .base import DatasetError

__all__ = ["MEASURED", "crop_settings"]

# measured: docs/crop-calibration.md (FER2013 train, 2000 faces, BlazeFace short range, closed-loop checked).
# FER+ relabels the same FER2013 images, so it shares the framing.
_FER = {"crop_margin": 0.150, "crop_offset_y": -0.097,
        "command": "python -m trainers.calibrate --data fer2013 --data-dir ../shared/data --out runs/crop-calibration",
        "source": "docs/crop-calibration.md", "data": "fer2013", "split": "train", "detector": "short"}
MEASURED: dict[str, dict[str, Any]] = {"fer2013": _FER, "ferplus": _FER}


def crop_settings(data: str, calibration: str | None, margin: float | None, offset: float | None) -> dict[str, Any] | None:
    """The crop a run records: ``{"crop_margin", "crop_offset_y", "how", ...}``, or None (not calibrated:
    the input spec's defaults). Explicit flags override single values of a calibration."""
    from . import canonical_name

    rec: dict[str, Any] | None = None
    if calibration:
        path = Path(calibration)
        try:
            c = json.loads(path.read_text())
            r = c["recommended"]
            rec = {"crop_margin": float(r["crop_margin"]), "crop_offset_y": float(r["crop_offset_y"]),
                   "how": f"calibration file {path}",
                   **{k: c[k] for k in ("data", "split", "detector", "command") if k in c}}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DatasetError(f"--crop-calibration {path}: not a calibration.json of python -m trainers.calibrate "
                               f"(needs recommended.crop_margin and recommended.crop_offset_y): {exc}") from None
    else:
        try:
            key = canonical_name(data)
        except DatasetError:
            key = str(data)
        if key in MEASURED:
            rec = {**MEASURED[key], "how": f"measured for {MEASURED[key]['data']} ({MEASURED[key]['source']})"}
    if margin is not None or offset is not None:
        base = rec or {"crop_margin": None, "crop_offset_y": None}
        rec = {**base, "how": (base.get("how", "") + "; " if rec else "") + "set by --crop-margin/--crop-offset-y"}
        if margin is not None:
            rec["crop_margin"] = float(margin)
        if offset is not None:
            rec["crop_offset_y"] = float(offset)
        if rec["crop_margin"] is None or rec["crop_offset_y"] is None:
            rec["partial"] = True
    return rec
