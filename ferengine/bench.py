"""`python -m ferengine.bench`: latency and throughput of every stage, printed as one table.

Measures, on this machine:
- face detector ms per frame (each BlazeFace model) on 640x480 frames of a real video;
- each available backend: ms per face at batch 1, faces/s at batch 16;
- the whole pipeline (detect -> crop -> infer -> smooth) in frames/s on a real video, without display,
  on frames already decoded (pipeline only) and including video decoding (end to end);
- peak resident memory of the process.

Targets (on 2 CPU cores): detector <= 3 ms per 640x480 frame; small CNN <= 3 ms per face on ONNX
Runtime; whole pipeline >= 60 frames/s on a one-face 640x480 video.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

DEFAULT_VIDEO = Path(__file__).resolve().parents[2] / "shared/data/media/videos/pyfeat_single_face.mp4"


def _timeit(fn: Callable[[], object], repeat: int, warmup: int = 3) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000.0)
    return times


def _to_640x480(frame: np.ndarray) -> np.ndarray:
    """Scale to 640 wide and pad/crop to 480 high (keeps the face at its webcam size)."""
    h, w = frame.shape[:2]
    if w != 640:
        frame = cv2.resize(frame, (640, round(h * 640 / w)), interpolation=cv2.INTER_AREA)
        h = frame.shape[0]
    if h < 480:
        top = (480 - h) // 2
        frame = cv2.copyMakeBorder(frame, top, 480 - h - top, 0, 0, cv2.BORDER_CONSTANT)
    return np.ascontiguousarray(frame[:480])


def _read_frames(video: Path, limit: int) -> list[np.ndarray]:
    from .sources import open_source

    frames = []
    with open_source(video) as src:
        for fr in src:
            frames.append(_to_640x480(fr.image))
            if len(frames) >= limit:
                break
    return frames


def _peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024.0 if sys.platform != "darwin" else kb / 1024.0 / 1024.0


def run(video: Path, checkpoint: str | None, repeat: int, backends: list[str] | None) -> list[dict]:
    from .backends import available_backends, create_backend
    from .checkpoint import default_checkpoint_path, load
    from .faces import DETECTOR_MODELS, DetectorUnavailable, FaceDetector
    from .preprocess import to_model_input

    rows: list[dict] = []
    frames = _read_frames(video, 300)
    if not frames:
        raise SystemExit(f"bench: {video} gave no frames")

    # 1. detector
    no_detector = None
    for model in DETECTOR_MODELS:
        try:
            det = FaceDetector(model=model)
        except DetectorUnavailable as exc:
            note = "as above" if no_detector else str(exc)
            no_detector = str(exc)
            rows.append({"stage": f"detector {model}", "metric": "-", "value": None, "note": note})
            continue
        with det:
            found = [len(det.detect(f)) for f in frames[:50]]
            times = []
            for _ in range(max(1, repeat // len(frames) + 1)):
                times += _timeit(lambda: [det.detect(f) for f in frames], 1, warmup=1)
            per_frame = statistics.median(times) / len(frames)
        rows.append({"stage": f"detector {model}", "metric": "ms/frame (640x480)", "value": per_frame,
                     "note": f"faces/frame {np.mean(found):.2f}"})

    # 2. backends
    ckpt = Path(checkpoint) if checkpoint else default_checkpoint_path()
    loaded = load(ckpt)
    spec = loaded.spec
    rng = np.random.default_rng(0)
    faces16 = rng.integers(0, 256, (16, spec.size, spec.size) + ((3,) if spec.channels == 3 else ()), np.uint8)
    x1, x16 = to_model_input(faces16[:1], spec), to_model_input(faces16, spec)
    avail = available_backends()
    for name in backends or list(avail):
        if avail.get(name) is not None:
            rows.append({"stage": f"backend {name}", "metric": "-", "value": None, "note": avail[name]})
            continue
        be = create_backend(name, loaded)
        t1 = statistics.median(_timeit(lambda: be.run(x1), repeat, warmup=10))
        t16 = statistics.median(_timeit(lambda: be.run(x16), max(10, repeat // 8), warmup=3))
        be.close()
        rows.append({"stage": f"backend {name} ({be.device})", "metric": "ms/face batch 1", "value": t1,
                     "note": f"{loaded.info.arch} {spec.size}px"})
        rows.append({"stage": f"backend {name} ({be.device})", "metric": "faces/s batch 16",
                     "value": 16000.0 / t16, "note": ""})

    # 3. whole pipeline
    if no_detector is not None:
        rows.append({"stage": "pipeline", "metric": "-", "value": None, "note": "no face detector (see above)"})
    else:
        rows += _pipeline_rows(loaded, frames, video)
    rows.append({"stage": "process", "metric": "peak RSS MB", "value": _peak_rss_mb(), "note": ""})
    return rows


def _pipeline_rows(loaded, frames: list[np.ndarray], video: Path) -> list[dict]:
    """Whole-pipeline throughput on decoded frames, then with decoding."""
    from .pipeline import Pipeline
    from .sources import open_source

    rows: list[dict] = []
    with Pipeline(loaded) as pipe:
        backend_name = pipe.backend.name
        for f in frames[:10]:
            pipe.process(f)
        pipe.reset()
        t0 = time.perf_counter()
        n_faces = 0
        for i, f in enumerate(frames):
            n_faces += len(pipe.process(f, i, i / 30.0).faces)
        dt = time.perf_counter() - t0
        rows.append({"stage": f"pipeline ({backend_name})", "metric": "frames/s (decoded, 640x480)",
                     "value": len(frames) / dt, "note": f"{len(frames)} frames, {n_faces / len(frames):.2f} faces/frame"})
        pipe.reset()
        t0 = time.perf_counter()
        n = 0
        with open_source(video) as src:
            for fr in src:
                pipe.process(_to_640x480(fr.image), fr.index, fr.time_s)
                n += 1
        dt = time.perf_counter() - t0
        rows.append({"stage": f"pipeline ({backend_name})", "metric": "frames/s (decode+pipeline)",
                     "value": n / dt, "note": f"{video.name}, {n} frames"})
    return rows


def format_table(rows: list[dict]) -> str:
    w = max(34, *(len(r["stage"]) for r in rows))
    out = [f"| {'stage':<{w}} | {'metric':<28} | {'value':>9} | note", f"|{'-' * (w + 2)}|{'-' * 30}|{'-' * 11}|------"]
    for r in rows:
        v = "n/a" if r["value"] is None else f"{r['value']:9.2f}"
        out.append(f"| {r['stage']:<{w}} | {r['metric']:<28} | {v:>9} | {r['note']}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ferengine.bench", description=__doc__.split("\n")[0])
    p.add_argument("--video", type=Path, default=DEFAULT_VIDEO, help=f"one-face video (default {DEFAULT_VIDEO})")
    p.add_argument("--checkpoint", "-c", help="model to time (default: the model in assets/)")
    p.add_argument("--backends", nargs="*", help="backends to time (default: all)")
    p.add_argument("--repeat", type=int, default=200, help="timed repetitions per measurement")
    p.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = p.parse_args(argv)
    if not args.video.is_file():
        p.error(f"video {args.video} not found; pass --video FILE (a one-face video)")
    from .checkpoint import CheckpointError

    try:
        rows = run(args.video, args.checkpoint, args.repeat, args.backends)
    except CheckpointError as exc:
        p.error(str(exc))
    import os

    import torch

    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"torch threads {torch.get_num_threads()}")
    print(format_table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
