"""Crop calibration: make the app's face crops frame a face the way the training data does.

    python -m trainers.calibrate --data fer2013 --data-dir ../shared/data --out runs/crop-calibration
    python -m trainers.calibrate --data fer2013 --data-dir ../shared/data --apply assets/models/default.safetensors
    python -m trainers.calibrate --calibration runs/crop-calibration/calibration.json --apply CKPT [--apply CKPT ...]

FER2013 faces are tight, centred, grey 48x48 crops; the app cuts its crops around a BlazeFace box
(:func:`ferengine.preprocess.crop_faces`: side ``(1 + crop_margin) * max(box w, h)``, centre moved down by
``crop_offset_y * max(box w, h)``). To make the two agree we measure where the detector puts its box on
the dataset's own faces:

1. each face (a random sample of ``--n`` from ``--split``) gets a generous border (``--pad`` x its side on
   every side: the edge pixels replicated, then blurred, so the detector sees a whole head in a plausible
   surrounding instead of a face cut at the frame edge) and is enlarged ``--scale`` x with bicubic
   interpolation (BlazeFace is not made for 48-pixel images);
2. :class:`ferengine.faces.FaceDetector` runs on that frame; its box and eye keypoints are mapped back
   into the face's own pixel frame;
3. per face: ``crop_margin = S / max(w, h) - 1`` and ``crop_offset_y = (S/2 - box centre y) / max(w, h)``
   (``S`` = the face's side, 48): the crop that, cut around that box by ``crop_faces``, reproduces the
   dataset's framing. The recommended values are the medians (robust to the odd bad box), reported with
   their inter-quartile range, the detection rate and the spread of the eye-line angle (FER2013 faces are
   not rotated upright; the app's crops are: see ``eye_angle_deg`` in the report).

Why the measurement transfers to real frames: the detector's box relative to the face (box side / eye
distance, eye height in the box) is the same on these upscaled low-resolution faces as on real photos
(measured: the medians agree within 1 %, see docs/crop-calibration.md); and a closed-loop check measures
the app's calibrated crops of the real photos and video frames in ``--media`` with the same procedure,
which must give back the dataset's numbers. Both checks are in ``calibration.json`` (``check``).

``--apply CKPT`` writes the calibrated ``crop_margin`` / ``crop_offset_y`` into existing checkpoints'
input spec (weights stay bit-identical, everything else in the metadata stays; the calibration is recorded
in ``info.training["crop_calibration"]``). Doing this after training is legitimate because these two
fields only steer inference: the training data are already face crops, which the training engine feeds
through ``to_model_input`` (resize, channels, normalisation) without ever calling ``crop_faces``, so the
weights never depended on them; the calibration only makes the app's crops look like those faces.

Outputs in ``--out``: ``calibration.json`` (written atomically) and ``crops.png`` (dataset faces above
pipeline crops of the media with the calibrated spec and, for contrast, with the old default spec).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import cv2
import numpy as np

from ferengine.preprocess import InputSpec, crop_faces, eye_angle
from ferengine.fileio import atomic_write_bytes

log = logging.getLogger("trainers.calibrate")

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
VIDEO_EXTS = (".mp4", ".mov", ".avi", ".mkv", ".webm")


class CalibrationError(ValueError):
    """Calibration cannot run or cannot be applied; the message says why."""


# ------------------------------------------------------------------------------------------ measure


def embed_face(face: np.ndarray, scale: int = 4, pad: float = 0.5) -> tuple[np.ndarray, int]:
    """A detector-friendly frame around a small face crop, and the border width ``p`` in face pixels.

    The face (uint8 grey ``(H, W)`` or BGR) gets ``p = round(pad * max(H, W))`` pixels of border on every
    side: the edge pixels replicated, then blurred (so the border holds the colours of the hair, cheeks
    and neck without the streaks of plain replication), joined to the face without a seam; the frame is
    then enlarged ``scale`` x (bicubic). Frame pixel ``(u, v)`` is face pixel ``(u / scale - p, v / scale - p)``.
    """
    face = np.asarray(face)
    h, w = face.shape[:2]
    p = int(round(pad * max(h, w)))
    rep = cv2.copyMakeBorder(face, p, p, p, p, cv2.BORDER_REPLICATE).astype(np.float32)
    blur = cv2.GaussianBlur(rep, (0, 0), sigmaX=max(h, w) / 12.0)
    mask = np.zeros(rep.shape[:2], np.float32)
    mask[p:p + h, p:p + w] = 1.0
    mask = cv2.GaussianBlur(mask, (0, 0), sigmaX=max(h, w) / 24.0)
    mask[p:p + h, p:p + w] = 1.0  # the face itself stays untouched; the feathering is outside it
    if rep.ndim == 3:
        mask = mask[..., None]
    frame = np.clip(mask * rep + (1.0 - mask) * blur + 0.5, 0, 255).astype(np.uint8)
    if scale != 1:
        frame = cv2.resize(frame, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
    return frame, p


GEOMETRY = ("margin", "offset_y", "offset_x", "eye_distance", "eye_y", "nose_y", "mouth_y", "eye_angle_deg", "score")


def measure_faces(faces: Iterable[np.ndarray], detector: Any, scale: int = 4, pad: float = 0.5,
                  progress: bool = False) -> dict[str, np.ndarray]:
    """Where the detector's box sits in each face crop (see the module doc).

    Returns float arrays (NaN where nothing was found) ``margin`` (``S / max(w, h) - 1``), ``offset_y``
    (``(S/2 - cy) / max(w, h)``), ``offset_x`` (same for x: ~0 for centred faces), ``eye_distance`` and
    ``eye_y`` (distance between the eyes, height of their midpoint, as fractions of the crop side S),
    ``nose_y``, ``mouth_y`` (heights of the nose tip and mouth centre, fractions of S),
    ``eye_angle_deg`` (eye line, positive = image-right eye lower), ``score``; and bool ``detected``.
    A detection counts only when its box centre lies inside the crop (the largest face is taken).
    """
    from tqdm import tqdm

    faces = list(faces)
    out = {k: np.full(len(faces), np.nan) for k in GEOMETRY}
    detected = np.zeros(len(faces), bool)
    for i, face in enumerate(tqdm(faces, desc="detecting", unit="face", disable=not progress, leave=False)):
        frame, p = embed_face(face, scale, pad)
        found = detector.detect(frame)
        if not found:
            continue
        f = found[0]
        h, w = face.shape[:2]
        side_img = float(max(h, w))
        x, y = f.box[0] / scale - p, f.box[1] / scale - p
        bw, bh = f.box[2] / scale, f.box[3] / scale
        cx, cy = x + bw / 2.0, y + bh / 2.0
        if not (0 <= cx <= w and 0 <= cy <= h) or max(bw, bh) <= 0:
            continue
        kp = f.keypoints / scale - p
        side = max(bw, bh)
        detected[i] = True
        out["margin"][i] = side_img / side - 1.0
        out["offset_y"][i] = (h / 2.0 - cy) / side
        out["offset_x"][i] = (w / 2.0 - cx) / side
        out["eye_distance"][i] = float(np.linalg.norm(kp[0] - kp[1])) / side_img
        out["eye_y"][i] = float(kp[0, 1] + kp[1, 1]) / 2.0 / side_img
        out["nose_y"][i] = float(kp[2, 1]) / side_img
        out["mouth_y"][i] = float(kp[3, 1]) / side_img
        out["eye_angle_deg"][i] = float(np.degrees(eye_angle(kp)))
        out["score"][i] = f.score
    out["detected"] = detected
    return out


def robust(values: np.ndarray) -> dict[str, float]:
    """Median, quartiles and count of the finite values."""
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if not len(v):
        return {"median": float("nan"), "q25": float("nan"), "q75": float("nan"), "n": 0}
    q25, med, q75 = np.percentile(v, [25, 50, 75])
    return {"median": round(float(med), 4), "q25": round(float(q25), 4), "q75": round(float(q75), 4), "n": int(len(v))}


def summarise(m: dict[str, np.ndarray]) -> dict[str, Any]:
    """Robust statistics of :func:`measure_faces` output, and the detection rate."""
    s: dict[str, Any] = {k: robust(m[k]) for k in GEOMETRY}
    ang = np.abs(m["eye_angle_deg"][np.isfinite(m["eye_angle_deg"])])
    s["eye_angle_deg"]["abs_p90"] = round(float(np.percentile(ang, 90)), 2) if len(ang) else float("nan")
    s["eye_angle_deg"]["share_over_10"] = round(float((ang > 10).mean()), 4) if len(ang) else float("nan")
    s["detection_rate"] = round(float(m["detected"].mean()), 4) if len(m["detected"]) else 0.0
    s["n_faces"] = int(len(m["detected"]))
    s["n_detected"] = int(m["detected"].sum())
    return s


def recommend(summary: dict[str, Any]) -> dict[str, float]:
    """The InputSpec fields that reproduce the measured framing: the medians, to 3 decimals."""
    return {"crop_margin": round(summary["margin"]["median"], 3),
            "crop_offset_y": round(summary["offset_y"]["median"], 3)}


# ------------------------------------------------------------------------------- pipeline crops


def media_frames(media: Path, frames_per_video: int = 8) -> tuple[list[tuple[str, np.ndarray]], list[tuple[str, np.ndarray]]]:
    """(photos, video frames) under ``media`` (``photos/`` and ``videos/`` or the folder itself) as
    ``(name, BGR frame)`` pairs; ``frames_per_video`` evenly spaced frames of each video."""
    def files(sub: str, exts: Sequence[str]) -> list[Path]:
        folder = media / sub if (media / sub).is_dir() else media
        return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in exts)

    photos = []
    for p in files("photos", IMAGE_EXTS):
        img = cv2.imread(str(p), cv2.IMREAD_COLOR)
        if img is None:
            log.warning("%s: not a readable image, skipped", p)
            continue
        photos.append((p.name, img))
    frames = []
    for p in files("videos", VIDEO_EXTS):
        cap = cv2.VideoCapture(str(p))
        try:
            n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
            if n <= 0:
                continue
            for k in range(frames_per_video):
                idx = int((k + 0.5) * n / frames_per_video)
                cap.set(cv2.CAP_PROP_POS_FRAMES, idx)
                ok, frame = cap.read()
                if ok and frame is not None:
                    frames.append((f"{p.name}#{idx}", frame))
        finally:
            cap.release()
    return photos, frames


@dataclasses.dataclass
class MediaFace:
    source: str
    frame: np.ndarray  # the BGR frame it was found in (shared between faces of one frame)
    box: tuple[float, float, float, float]
    keypoints: np.ndarray


def detect_media(frames: Sequence[tuple[str, np.ndarray]], detector: Any, min_score: float = 0.0) -> list[MediaFace]:
    """Every face the detector finds in the frames with a score of at least ``min_score``."""
    out = []
    for name, frame in frames:
        for f in detector.detect(frame):
            if f.score >= min_score:
                out.append(MediaFace(name, frame, f.box, f.keypoints))
    return out


def pipeline_crops(faces: Sequence[MediaFace], spec: InputSpec) -> np.ndarray:
    """The app's crops (``crop_faces`` with ``spec``) of detected media faces: uint8 ``(N, S, S)``."""
    if not faces:
        return np.zeros((0, spec.size, spec.size), np.uint8)
    return np.concatenate([crop_faces(f.frame, [f.box], [f.keypoints], spec) for f in faces])


def crop_landmarks(faces: Sequence[MediaFace], spec: InputSpec) -> dict[str, dict[str, float]]:
    """Eye distance and the heights of the eyes, nose tip and mouth in the app's crops, as fractions of the
    crop side (exact: the detector's keypoints in the full frame mapped through the crop transform)."""
    from ferengine.preprocess import crop_transform

    d, ey, ny, my = [], [], [], []
    for f in faces:
        m = crop_transform(f.box, f.keypoints, spec)
        k = (f.keypoints[:4] @ m[:, :2].T + m[:, 2]) / spec.size
        d.append(np.linalg.norm(k[0] - k[1]))
        ey.append(k[:2, 1].mean())
        ny.append(k[2, 1])
        my.append(k[3, 1])
    return {"eye_distance": robust(np.array(d)), "eye_y": robust(np.array(ey)), "nose_y": robust(np.array(ny)),
            "mouth_y": robust(np.array(my))}


def detail(faces: np.ndarray) -> float:
    """Median fine-detail level of grey faces: mean |Laplacian| / standard deviation (scale-free; high when
    a crop was shrunk without low-pass filtering and aliases)."""
    vals = []
    for f in np.asarray(faces):
        f = f.astype(np.float32)
        if f.ndim == 3:
            f = cv2.cvtColor(f, cv2.COLOR_BGR2GRAY)
        vals.append(np.abs(cv2.Laplacian(f, cv2.CV_32F)).mean() / max(float(f.std()), 1.0))
    return round(float(np.median(vals)), 4) if vals else float("nan")


def spread_pick(items: Sequence[Any], k: int) -> list[Any]:
    """``k`` items evenly spread over ``items`` (all of them when there are fewer)."""
    if len(items) <= k:
        return list(items)
    return [items[int(i)] for i in np.linspace(0, len(items) - 1, k).round().astype(int)]


def contact_sheet(rows: Sequence[tuple[str, np.ndarray]], path: Path, zoom: int = 3, per_row: int = 12,
                  gap: int = 4) -> Path:
    """A PNG of labelled rows of grey faces, each enlarged ``zoom`` x (nearest neighbour: pixels stay
    visible). ``rows``: (title, uint8 ``(N, S, S)``) with N <= ``per_row``."""
    size = max((faces.shape[1] for _, faces in rows if len(faces)), default=48) * zoom
    text_h = 24
    width = per_row * size + (per_row + 1) * gap
    height = sum(text_h + size + gap for _ in rows) + gap
    sheet = np.full((height, width), 40, np.uint8)
    y = gap
    for title, faces in rows:
        cv2.putText(sheet, title, (gap, y + text_h - 7), cv2.FONT_HERSHEY_SIMPLEX, 0.55, 235, 1, cv2.LINE_AA)
        y += text_h
        for j, face in enumerate(faces[:per_row]):
            tile = cv2.resize(face, (size, size), interpolation=cv2.INTER_NEAREST)
            x = gap + j * (size + gap)
            sheet[y:y + size, x:x + size] = tile
        y += size + gap
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, cv2.imencode(".png", sheet)[1].tobytes())
    return path


MIN_REFINE_FACES = 8
REFINE_TOLERANCE = 0.015  # ~0.7 px at 48 px; the closed-loop medians of ~60 media faces jitter by ~0.01


def refine_spec(spec: InputSpec, faces: Sequence[MediaFace], target: tuple[float, float], detector: Any,
                scale: int, pad: float, iterations: int,
                tolerance: float = REFINE_TOLERANCE) -> tuple[InputSpec, dict[str, Any], list[dict[str, float]]]:
    """Closed-loop check and correction: cut the media faces with ``spec``, measure those crops exactly as
    the dataset faces were measured, and, while they read back more than ``tolerance`` away from the
    dataset's medians ``target`` = (margin, offset_y), move ``crop_margin``/``crop_offset_y`` by the
    difference (at most ``iterations`` steps). A bias of the measurement itself (the detector on enlarged
    48-pixel faces in a made-up border) then cancels, because both sides go through it. Within the
    tolerance nothing changes: the readings jitter by about 0.01 and chasing that would add noise.
    Returns (spec, the final crops' summary, the steps taken).
    """
    history: list[dict[str, float]] = []
    closed = summarise(measure_faces(pipeline_crops(faces, spec), detector, scale, pad))
    for _ in range(iterations):
        got_m, got_o = closed["margin"]["median"], closed["offset_y"]["median"]
        if not (np.isfinite(got_m) and np.isfinite(got_o)):
            break
        if abs(got_m - target[0]) <= tolerance and abs(got_o - target[1]) <= tolerance:
            break
        history.append({"crop_margin": spec.crop_margin, "crop_offset_y": spec.crop_offset_y,
                        "crops_read_margin": got_m, "crops_read_offset_y": got_o})
        new_m = round((1.0 + spec.crop_margin) * (1.0 + target[0]) / (1.0 + got_m) - 1.0, 3)
        new_o = round(spec.crop_offset_y + (target[1] - got_o), 3)
        spec = dataclasses.replace(spec, crop_margin=new_m, crop_offset_y=new_o)
        closed = summarise(measure_faces(pipeline_crops(faces, spec), detector, scale, pad))
    return spec, closed, history


# ------------------------------------------------------------------------------------------ apply


class _StoredWeights:
    """Stands in for the model in :func:`ferengine.checkpoint.save`: hands back the tensors exactly as
    they are stored in the file (same dtypes, same bits), so rewriting the metadata never round-trips
    the weights through a model."""

    def __init__(self, state: dict[str, Any]):
        self._state = state

    def state_dict(self) -> dict[str, Any]:
        return dict(self._state)


def apply_calibration(path: str | os.PathLike, calibration: dict[str, Any]) -> dict[str, Any]:
    """Set ``crop_margin`` / ``crop_offset_y`` of checkpoint ``path`` to ``calibration["recommended"]``.

    The checkpoint is validated (:func:`ferengine.checkpoint.load`), rewritten with
    :func:`ferengine.checkpoint.save` to a temporary file beside it, checked (weights bit-identical, same
    dtypes; metadata unchanged apart from the input spec and ``training["crop_calibration"]``) and only
    then renamed over the original. Returns ``{"path", "previous", "new"}``.
    """
    import torch

    from ferengine import checkpoint as ck

    path = Path(path)
    rec = calibration["recommended"]
    try:
        loaded = ck.load(path)
        meta, state, _ = ck._read(path)  # the stored tensors as they are (dtype included)
    except ck.CheckpointError as exc:
        raise CalibrationError(str(exc)) from None
    info = loaded.info
    old = info.input
    new_spec = dataclasses.replace(old, crop_margin=float(rec["crop_margin"]), crop_offset_y=float(rec["crop_offset_y"]))
    record = {k: calibration[k] for k in ("data", "split", "detector", "date", "command") if k in calibration}
    stats = calibration.get("dataset", {})
    record.update({
        "crop_margin": new_spec.crop_margin,
        "crop_offset_y": new_spec.crop_offset_y,
        "margin_iqr": [stats.get("margin", {}).get("q25"), stats.get("margin", {}).get("q75")],
        "offset_y_iqr": [stats.get("offset_y", {}).get("q25"), stats.get("offset_y", {}).get("q75")],
        "detection_rate": stats.get("detection_rate"),
        "n_detected": stats.get("n_detected"),
        "previous": {"crop_margin": old.crop_margin, "crop_offset_y": old.crop_offset_y},
    })
    new_info = dataclasses.replace(info, input=new_spec, training={**info.training, "crop_calibration": record})
    tmp = path.with_name(f".{path.stem}.calibrating{path.suffix}")
    try:
        ck.save(tmp, _StoredWeights(state), new_info)  # type: ignore[arg-type]
        meta2, state2, _ = ck._read(tmp)
        same = set(state) == set(state2) and all(
            state[k].dtype == state2[k].dtype and state[k].shape == state2[k].shape and torch.equal(state[k], state2[k])
            for k in state)
        if not same:
            raise CalibrationError(f"{path}: rewriting changed the weights; the checkpoint was left as it was")
        lost = sorted(set(meta) - set(meta2))
        if lost:
            raise CalibrationError(f"{path}: rewriting would lose metadata fields {lost}; left as it was")
        ck.load(tmp)  # still a valid checkpoint
        os.chmod(tmp, os.stat(path).st_mode & 0o777)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return {"path": str(path), "previous": record["previous"],
            "new": {"crop_margin": new_spec.crop_margin, "crop_offset_y": new_spec.crop_offset_y}}


# -------------------------------------------------------------------------------------------- run


def _default_media(data_dir: Path) -> Path | None:
    env = os.environ.get("FER_TEST_MEDIA")
    for cand in ([Path(env)] if env else []) + [data_dir / "media"]:
        if cand.is_dir():
            return cand
    return None


def calibrate(data: str, data_dir: str | Path | None, split: str = "train", n: int = 2000, seed: int = 0,
              detector_model: str = "short", min_confidence: float = 0.5, scale: int = 4, pad: float = 0.5,
              media: Path | None = None, media_min_score: float = 0.75, out: Path | None = None, sheet: bool = True,
              refine: int = 3, progress: bool = False, command: str | None = None) -> dict[str, Any]:
    """Measure, recommend, check against the media, draw ``crops.png``; returns the calibration dict
    (also written to ``out/calibration.json`` when ``out`` is given)."""
    from ferengine.faces import FaceDetector
    from trainers.data import DatasetError, load_dataset, resolve_data_dir

    data_dir = resolve_data_dir(data_dir)
    try:
        ds = load_dataset(data, data_dir, split)
    except DatasetError as exc:
        raise CalibrationError(str(exc)) from None
    if ds.images is None:
        raise CalibrationError(f"{data}: crop calibration needs a dataset of face crops held in memory "
                               "(fer2013, ferplus)")
    images = ds.images.numpy()
    if images.ndim == 4:  # RGB faces: the detector takes BGR
        images = np.ascontiguousarray(images[..., ::-1])
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(images), size=min(n, len(images)), replace=False))
    t0 = time.perf_counter()
    with FaceDetector(detector_model, min_confidence=min_confidence) as det:
        m = measure_faces((images[i] for i in idx), det, scale, pad, progress=progress)
        summary = summarise(m)
        if summary["n_detected"] == 0:
            raise CalibrationError(f"the {detector_model!r} detector found no face in {len(idx)} {data} images")
        rec = recommend(summary)
        spec = InputSpec(size=48, channels=1, crop_margin=rec["crop_margin"], crop_offset_y=rec["crop_offset_y"])
        default = InputSpec(size=48, channels=1)
        result: dict[str, Any] = {
            "recommended": {**rec, "align": True},
            "data": data, "split": ds.split, "detector": detector_model, "min_confidence": min_confidence,
            "method": {"n_sampled": int(len(idx)), "seed": seed, "scale": scale, "pad": pad,
                       "border": "replicated, blurred", "statistic": "median (q25, q75)"},
            "dataset": summary,
            "date": time.strftime("%Y-%m-%d"),
            "command": command,
        }
        media = media if media is not None else _default_media(data_dir)
        rows: list[tuple[str, np.ndarray]] = []
        if media is not None and media.is_dir():
            photos, frames = media_frames(media)
            photo_faces = detect_media(photos, det, media_min_score)
            video_faces = detect_media(frames, det, media_min_score)
            all_faces = photo_faces + video_faces
            if all_faces:
                target = (summary["margin"]["median"], summary["offset_y"]["median"])
                spec, closed, history = refine_spec(spec, all_faces, target, det, scale, pad,
                                                    refine if len(all_faces) >= MIN_REFINE_FACES else 0)
                if history:
                    result["direct"] = rec
                    result["recommended"] = {"crop_margin": spec.crop_margin, "crop_offset_y": spec.crop_offset_y,
                                             "align": True}
                    result["refinement"] = history
                frame_geo = [(max(f.box[2], f.box[3]) / np.linalg.norm(f.keypoints[0] - f.keypoints[1]),
                              (f.keypoints[:2, 1].mean() - f.box[1]) / max(f.box[2], f.box[3])) for f in all_faces]
                fer_side_eye = (1.0 / (m["eye_distance"] * (1.0 + m["margin"])))
                fer_eye_in_box = (m["eye_y"] - 0.5) * (1.0 + m["margin"]) + m["offset_y"] + 0.5
                result["check"] = {
                    "media": str(media), "media_min_score": media_min_score,
                    "n_photo_faces": len(photo_faces), "n_video_faces": len(video_faces),
                    "detector_box_vs_eyes": {
                        "note": "box side / eye distance and eye height in the box (fraction of box side from "
                                "its top): the detector's box sits the same way on the upscaled dataset faces "
                                "as on the real media when these agree",
                        "dataset": {"side_over_eye_distance": robust(fer_side_eye),
                                    "eye_height_in_box": robust(fer_eye_in_box)},
                        "media": {"side_over_eye_distance": robust(np.array([g[0] for g in frame_geo])),
                                  "eye_height_in_box": robust(np.array([g[1] for g in frame_geo]))},
                    },
                    "landmarks_in_crop": {
                        "note": "eye distance and the heights of the eye midpoint, nose tip and mouth centre, as "
                                "fractions of the crop side (dataset: detector keypoints on the dataset faces; "
                                "crops: the media keypoints mapped through the crop transform)",
                        "dataset": {k: summary[k] for k in ("eye_distance", "eye_y", "nose_y", "mouth_y")},
                        "calibrated_crops": crop_landmarks(all_faces, spec),
                        "default_spec_crops": crop_landmarks(all_faces, default),
                    },
                    "detail": {
                        "note": "median mean|Laplacian|/std of the 48x48 faces: crops shrunk from large faces "
                                "without low-pass filtering alias and read higher than the dataset",
                        "dataset": detail(images[idx]),
                        "photo_crops": detail(pipeline_crops(photo_faces, spec)) if photo_faces else None,
                        "video_crops": detail(pipeline_crops(video_faces, spec)) if video_faces else None,
                    },
                    "closed_loop": {
                        "note": "the calibrated crops of the media measured like the dataset: margin and "
                                "offset_y should come back as the dataset's",
                        "target": {"margin": target[0], "offset_y": target[1]},
                        "margin": closed["margin"], "offset_y": closed["offset_y"],
                        "detection_rate": closed["detection_rate"],
                        "eye_angle_deg": closed["eye_angle_deg"],
                    },
                }
                if sheet:
                    pick = rng.choice(len(images), size=min(24, len(images)), replace=False)
                    shown = images[pick]
                    if shown.ndim == 4:
                        shown = np.stack([cv2.cvtColor(f, cv2.COLOR_BGR2GRAY) for f in shown])
                    p_show, v_show = spread_pick(photo_faces, 24), spread_pick(video_faces, 12)
                    rows = [
                        (f"{data} {ds.split}: random dataset faces", shown[:12]),
                        (f"{data} {ds.split}: random dataset faces", shown[12:]),
                        (f"photos, calibrated spec (crop_margin {spec.crop_margin:.3f}, crop_offset_y "
                         f"{spec.crop_offset_y:+.3f})", pipeline_crops(p_show[:12], spec)),
                        ("photos, calibrated spec (continued)", pipeline_crops(p_show[12:24], spec)),
                        ("video frames, calibrated spec", pipeline_crops(v_show, spec)),
                        ("photos, OLD default spec (crop_margin 0.25, crop_offset_y 0)", pipeline_crops(p_show[:12], default)),
                        ("video frames, OLD default spec", pipeline_crops(v_show, default)),
                    ]
                    rows = [(t, faces) for t, faces in rows if len(faces)]
            else:
                log.warning("no face found in the media under %s: no closed-loop check, no crops.png", media)
        else:
            log.warning("no media folder (photos/, videos/) found: pass --media DIR for the check and crops.png")
    result["seconds"] = round(time.perf_counter() - t0, 1)
    if out is not None:
        out = Path(out)
        if rows:
            contact_sheet(rows, out / "crops.png")
            result["crops_png"] = str(out / "crops.png")
        atomic_write_bytes(out / "calibration.json", (json.dumps(result, indent=2) + "\n").encode())
    return result


def format_result(r: dict[str, Any]) -> str:
    s = r["dataset"]
    q = lambda d, f="{:.3f}": f"{f.format(d['median'])} (IQR {f.format(d['q25'])} .. {f.format(d['q75'])})"
    lines = [
        f"{r['data']}/{r['split']}: detector {r['detector']!r} found a face in {s['n_detected']} of {s['n_faces']} "
        f"faces ({100 * s['detection_rate']:.1f} %)",
        f"  crop_margin    {q(s['margin'])}",
        f"  crop_offset_y  {q(s['offset_y'])}",
        f"  offset_x       {q(s['offset_x'])}   (centred faces: ~0)",
        f"  eye distance   {q(s['eye_distance'])} of the face side",
        f"  eye line       {q(s['eye_angle_deg'], '{:+.1f}')} deg; |angle| 90th pct "
        f"{s['eye_angle_deg']['abs_p90']:.1f} deg, {100 * s['eye_angle_deg']['share_over_10']:.1f} % over 10 deg",
    ]
    if r.get("refinement"):
        steps = "; ".join(f"margin {h['crop_margin']:.3f} offset {h['crop_offset_y']:+.3f} -> crops read "
                          f"{h['crops_read_margin']:.3f} / {h['crops_read_offset_y']:+.3f}" for h in r["refinement"])
        lines.append(f"closed-loop refinement on the media crops: {steps}")
    lines.append(f"recommended: crop_margin {r['recommended']['crop_margin']:.3f}, crop_offset_y "
                 f"{r['recommended']['crop_offset_y']:+.3f}, align True")
    c = r.get("check")
    if c:
        b = c["detector_box_vs_eyes"]
        e = c["landmarks_in_crop"]
        cl = c["closed_loop"]
        dt = c["detail"]
        lines += [
            f"check on {c['n_photo_faces']} photo faces + {c['n_video_faces']} video-frame faces with score >= "
            f"{c['media_min_score']} ({c['media']}):",
            f"  box side / eye distance: dataset {b['dataset']['side_over_eye_distance']['median']:.3f}, "
            f"media {b['media']['side_over_eye_distance']['median']:.3f}",
            f"  eye height in box:       dataset {b['dataset']['eye_height_in_box']['median']:.3f}, "
            f"media {b['media']['eye_height_in_box']['median']:.3f}",
            f"  eye distance / crop side: dataset {e['dataset']['eye_distance']['median']:.3f}, calibrated "
            f"{e['calibrated_crops']['eye_distance']['median']:.3f}, old default "
            f"{e['default_spec_crops']['eye_distance']['median']:.3f}",
            *(f"  {name} height / crop side: dataset {e['dataset'][k]['median']:.3f}, calibrated "
              f"{e['calibrated_crops'][k]['median']:.3f}, old default {e['default_spec_crops'][k]['median']:.3f}"
              for k, name in (("eye_y", "eye  "), ("nose_y", "nose "), ("mouth_y", "mouth"))),
            f"  fine detail (|Laplacian|/std): dataset {dt['dataset']:.3f}, photo crops {dt['photo_crops'] or float('nan'):.3f}, "
            f"video crops {dt['video_crops'] or float('nan'):.3f}",
            f"  closed loop (calibrated crops measured like the dataset): margin {cl['margin']['median']:.3f}, "
            f"offset_y {cl['offset_y']['median']:+.3f}; eye line measured on these upright crops: IQR "
            f"{cl['eye_angle_deg']['q25']:+.1f} .. {cl['eye_angle_deg']['q75']:+.1f} deg (the angle measurement's own noise)",
        ]
    if r.get("crops_png"):
        lines.append(f"crops: {r['crops_png']}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    from ferengine.validate import argtype, check_float, check_fraction, check_int, check_min_confidence

    p = argparse.ArgumentParser(prog="python -m trainers.calibrate",
                                description="Measure the crop margin/offset that makes the app's face crops "
                                            "look like a dataset's faces; optionally write it into checkpoints.")
    p.add_argument("--data", default="fer2013", help="dataset of face crops (default fer2013)")
    p.add_argument("--data-dir", default=None, help="dataset folder (default: $FER_DATA_DIR, else ./data)")
    p.add_argument("--split", default="train", help="split to sample (default train)")
    p.add_argument("--n", type=argtype(check_int, lo=1, name="--n"), default=2000, help="faces to measure (default 2000)")
    p.add_argument("--seed", type=argtype(check_int, lo=0, name="--seed"), default=0)
    p.add_argument("--detector", default="short", choices=["short", "full"], help="BlazeFace model (default short, as the app)")
    p.add_argument("--min-confidence", type=argtype(check_min_confidence, name="--min-confidence"), default=0.5, help="detection threshold (default 0.5, as the app)")
    p.add_argument("--scale", type=argtype(check_int, lo=1, hi=16, name="--scale"), default=4, help="enlargement of the faces before detection (default 4)")
    p.add_argument("--pad", type=argtype(check_float, lo=0, hi=4, name="--pad"), default=0.5, help="border on each side, fraction of the face side (default 0.5)")
    p.add_argument("--media", type=Path, default=None,
                   help="real photos/ and videos/ for the check and crops.png (default: $FER_TEST_MEDIA, else DATA_DIR/media)")
    p.add_argument("--media-min-score", type=argtype(check_fraction, name="--media-min-score"), default=0.75,
                   help="only media faces the detector scores at least this for the check and crops.png "
                        "(default 0.75: leaves out its false positives on cartoon frames, ~0.5)")
    p.add_argument("--out", type=Path, default=Path("runs/crop-calibration"),
                   help="folder for calibration.json and crops.png (default runs/crop-calibration)")
    p.add_argument("--refine", type=int, default=3,
                   help="closed-loop refinement steps on the media crops (default 3, 0 = the direct medians)")
    p.add_argument("--no-sheet", action="store_true", help="do not draw crops.png")
    p.add_argument("--calibration", type=Path, default=None,
                   help="use this calibration.json instead of measuring (with --apply)")
    p.add_argument("--apply", action="append", default=[], metavar="CKPT",
                   help="write the calibrated crop_margin/crop_offset_y into this checkpoint (repeatable)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="the traceback of an internal error")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    from trainers.engine.boundary import guard
    from trainers.engine.errors import TrainError

    def body() -> int:
        try:
            if args.calibration is not None:
                try:
                    result = json.loads(args.calibration.read_text())
                    result["recommended"]["crop_margin"], result["recommended"]["crop_offset_y"]
                except (OSError, ValueError, KeyError, TypeError) as exc:
                    raise CalibrationError(f"{args.calibration}: not a calibration.json written by trainers.calibrate ({exc})")
                if not args.apply:
                    raise CalibrationError("--calibration only makes sense with --apply CKPT")
            else:
                if args.n < 1:
                    raise CalibrationError(f"--n must be >= 1, got {args.n}")
                result = calibrate(args.data, args.data_dir, args.split, args.n, args.seed, args.detector,
                                   args.min_confidence, args.scale, args.pad, args.media, args.media_min_score, args.out,
                                   sheet=not args.no_sheet, refine=args.refine, progress=not args.quiet,
                                   command=" ".join(["python", "-m", "trainers.calibrate", *(sys.argv[1:] if argv is None else argv)]))
                print(format_result(result))
                print(f"wrote {args.out / 'calibration.json'}")
            for ckpt in args.apply:
                done = apply_calibration(ckpt, result)
                print(f"{done['path']}: crop_margin {done['previous']['crop_margin']} -> {done['new']['crop_margin']}, "
                      f"crop_offset_y {done['previous']['crop_offset_y']} -> {done['new']['crop_offset_y']}")
        except CalibrationError as exc:
            raise TrainError(" ".join(str(exc).split())) from None
        return 0

    return guard("calibrate", body, verbose=args.verbose, verbose_hint="-v",
                 on_interrupt=lambda: "nothing of this measurement was kept; run it again")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
