"""`python -m ferengine.bench`: latency and throughput of every stage, printed as one table.

Measures, on this machine:
- face detector ms per frame (each BlazeFace model) on 640x480 frames of a real video;
- each available backend: ms per face at batch 1, faces/s at batch 16;
- the whole pipeline (detect -> crop -> infer -> smooth) in frames/s on a real video, without display,
  on frames already decoded (pipeline only) and including video decoding (end to end);
- peak resident memory of the process;
- with a CUDA GPU (unless ``--no-gpu``): faces/s at batch 1, 16 and 64 (``--gpu-batches``) for torch eager
  (fp32, fp16, fp16 channels-last), torch with CUDA graphs (fp32, fp16) and TensorRT (fp16, when installed),
  each with its warm-up (creation + first run: cuDNN autotuning, graph capture, engine build or load) timed
  apart, every timing bracketed by ``torch.cuda.synchronize``; the main number is host to host (``run`` on a
  numpy batch, what the pipeline does), the note adds device to device (``run_tensor`` on a batch already on
  the GPU) for torch; then the whole pipeline in frames/s on a multi-face clip (a 2x2 mosaic of the video,
  or ``--multi-face-video``) with torch eager, torch CUDA graphs and TensorRT. Without a GPU one line says
  that these rows need one and what was found.

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


def _timeit(fn: Callable[[], object], repeat: int, warmup: int = 3,
            sync: Callable[[], object] | None = None) -> list[float]:
    """ms per call of ``fn`` (``warmup`` untimed calls first). ``sync`` (e.g. ``torch.cuda.synchronize``)
    is called before the clock starts and before it stops, so queued GPU work is inside the timing."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if sync is not None:
            sync()
        t0 = time.perf_counter()
        fn()
        if sync is not None:
            sync()
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


def run(video: Path, checkpoint: str | None, repeat: int, backends: list[str] | None, *, gpu: bool = True,
        gpu_batches: tuple[int, ...] = (1, 16, 64), multi_face_video: Path | None = None) -> list[dict]:
    """The bench's rows (see the module doc). ``gpu``: add the GPU rows when torch sees a CUDA GPU."""
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

    # 4. the GPU
    from .device import cuda_reason

    if gpu and cuda_reason() is None:
        multi = None
        if no_detector is None:
            multi = _read_frames(multi_face_video, 300) if multi_face_video else _mosaic(frames)
        rows += _gpu_rows(loaded, repeat, gpu_batches, backends, multi,
                          multi_face_video.name if multi_face_video else f"2x2 mosaic of {video.name}")
    rows.append({"stage": "process", "metric": "peak RSS MB", "value": _peak_rss_mb(), "note": ""})
    return rows


def _pipeline_rows(loaded, frames: list[np.ndarray], video: Path | None, backend="auto", label: str = "",
                   clip: str = "640x480", note: str = "") -> list[dict]:
    """Whole-pipeline throughput on decoded frames, then (when ``video`` is given) with decoding.
    ``backend``: a name for :func:`~ferengine.backends.create_backend` or a ready backend (closed here)."""
    from .pipeline import Pipeline
    from .sources import open_source

    rows: list[dict] = []
    with Pipeline(loaded, backend=backend) as pipe:
        backend_name = label or pipe.backend.name
        for f in frames[:10]:
            pipe.process(f)
        pipe.reset()
        t0 = time.perf_counter()
        n_faces = 0
        for i, f in enumerate(frames):
            n_faces += len(pipe.process(f, i, i / 30.0).faces)
        dt = time.perf_counter() - t0
        rows.append({"stage": f"pipeline ({backend_name})", "metric": f"frames/s (decoded, {clip})",
                     "value": len(frames) / dt,
                     "note": f"{note + ', ' if note else ''}{len(frames)} frames, {n_faces / len(frames):.2f} faces/frame"})
        if video is None:
            return rows
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


# ------------------------------------------------------------------------------------------- the GPU

#: (label, backend, options) of the GPU rows; torch ones get ``max_batch`` = the largest timed batch too
GPU_CONFIGS: tuple[tuple[str, str, dict], ...] = (
    ("torch eager fp32", "torch", {"precision": "fp32"}),
    ("torch eager fp16", "torch", {"precision": "fp16"}),
    ("torch eager fp16 channels_last", "torch", {"precision": "fp16", "channels_last": True}),
    ("torch cuda-graphs fp32", "torch", {"precision": "fp32", "cuda_graphs": True}),
    ("torch cuda-graphs fp16", "torch", {"precision": "fp16", "cuda_graphs": True}),
    ("tensorrt fp16", "tensorrt", {"fp16": True}),
)
#: the configurations the multi-face pipeline rows run with
GPU_PIPELINE_CONFIGS = ("torch eager fp32", "torch cuda-graphs fp16", "tensorrt fp16")


def _mosaic(frames: list[np.ndarray], grid: int = 2) -> list[np.ndarray]:
    """A multi-face clip from a one-face one: each 640x480 frame is a ``grid`` x ``grid`` mosaic of
    frames taken at different times (so the faces differ), each scaled to 1/grid of the size."""
    n = len(frames)
    h, w = frames[0].shape[:2]
    th, tw = h // grid, w // grid
    out = []
    for i in range(n):
        canvas = np.zeros_like(frames[0])
        for j in range(grid * grid):
            tile = cv2.resize(frames[(i + j * 37) % n], (tw, th), interpolation=cv2.INTER_AREA)
            r, c = divmod(j, grid)
            canvas[r * th:(r + 1) * th, c * tw:(c + 1) * tw] = tile
        out.append(canvas)
    return out


def _measure_gpu_backend(be, stage: str, opts: dict, t0: float, host: dict, faces: np.ndarray,
                         batches: tuple[int, ...], repeat: int, sync: Callable[[], object], model: str) -> list[dict]:
    """The warm-up row (``t0``: when creation began) and one faces/s row per batch size for backend ``be``."""
    be.run(host[batches[0]])
    sync()
    rows = []
    note = f"{be.device}; {model}"
    if opts.get("cuda_graphs"):
        note += (f"; graphs for batches {','.join(map(str, be.buckets))}" if be.cuda_graphs
                 else "; graph capture FAILED, ran eagerly (see the log)")
    rows.append({"stage": stage, "metric": "warm-up s (create+1st run)", "value": time.perf_counter() - t0,
                 "note": note})
    for b in batches:
        xb = host[b]
        t = statistics.median(_timeit(lambda: be.run(xb), repeat, warmup=10, sync=sync))
        extra = ""
        if hasattr(be, "run_tensor"):
            xd = be.prepare(faces[:b])
            td = statistics.median(_timeit(lambda: be.run_tensor(xd), repeat, warmup=10, sync=sync))
            tp = statistics.median(_timeit(lambda: be.run_tensor(be.prepare(faces[:b])), repeat, warmup=10, sync=sync))
            extra = (f"device->device {b * 1000.0 / td:.0f} faces/s; uint8 upload+GPU preprocess+run "
                     f"{b * 1000.0 / tp:.0f} faces/s")
        rows.append({"stage": stage, "metric": f"faces/s batch {b} (host)", "value": b * 1000.0 / t, "note": extra})
    return rows


def _gpu_rows(loaded, repeat: int, batches: tuple[int, ...], backends: list[str] | None,
              multi_frames: list[np.ndarray] | None, clip_name: str, *, device: str = "cuda",
              make: Callable | None = None, sync: Callable[[], object] | None = None) -> list[dict]:
    """faces/s per GPU configuration and batch size, each configuration's warm-up, then the multi-face
    pipeline (``multi_frames``; None = no detector). A configuration that cannot be created gives an n/a
    row with the reason. ``device``/``make``/``sync`` exist for tests (defaults: "cuda",
    :func:`~ferengine.backends.create_backend`, ``torch.cuda.synchronize``)."""
    import torch

    from .backends import available_backends, create_backend
    from .preprocess import to_model_input

    make = make or create_backend
    sync = sync or torch.cuda.synchronize
    spec = loaded.spec
    top = max(batches)
    rng = np.random.default_rng(0)
    faces = rng.integers(0, 256, (top, spec.crop_size, spec.crop_size) + ((3,) if spec.channels == 3 else ()), np.uint8)
    host = {b: to_model_input(faces[:b], spec) for b in batches}
    avail = available_backends()
    rows: list[dict] = []

    def create(name: str, opts: dict):
        opts = {**opts, "max_batch": top}
        if name == "tensorrt" and avail.get("tensorrt") is not None:
            return None, avail["tensorrt"]
        try:
            return make(name, loaded, device, **opts), ""
        except Exception as exc:  # noqa: BLE001 - one configuration failing must not end the bench
            return None, f"{type(exc).__name__}: {exc}"

    for label, name, opts in GPU_CONFIGS:
        if backends and name not in backends:
            continue
        stage = f"gpu {label}"
        sync()
        t0 = time.perf_counter()
        be, why = create(name, opts)
        if be is None:
            rows.append({"stage": stage, "metric": "-", "value": None, "note": why})
            continue
        try:
            rows += _measure_gpu_backend(be, stage, opts, t0, host, faces, batches, repeat, sync,
                                         f"{loaded.info.arch} {spec.size}px")
        except Exception as exc:  # noqa: BLE001 - e.g. out of GPU memory at the largest batch
            rows.append({"stage": stage, "metric": "-", "value": None, "note": f"failed: {type(exc).__name__}: {exc}"})
        finally:
            be.close()

    if multi_frames is None:
        rows.append({"stage": "gpu pipeline", "metric": "-", "value": None, "note": "no face detector (see above)"})
        return rows
    for label, name, opts in GPU_CONFIGS:
        if label not in GPU_PIPELINE_CONFIGS or (backends and name not in backends):
            continue
        be, why = create(name, opts)
        if be is None:
            rows.append({"stage": f"gpu pipeline ({label})", "metric": "-", "value": None, "note": why})
            continue
        try:
            rows += _pipeline_rows(loaded, multi_frames, None, backend=be, label=f"gpu {label}", clip="multi-face",
                                   note=clip_name)
        except Exception as exc:  # noqa: BLE001
            rows.append({"stage": f"pipeline (gpu {label})", "metric": "-", "value": None,
                         "note": f"failed: {type(exc).__name__}: {exc}"})
    return rows


def format_table(rows: list[dict]) -> str:
    w = max(34, *(len(r["stage"]) for r in rows))
    m = max(28, *(len(r["metric"]) for r in rows))
    out = [f"| {'stage':<{w}} | {'metric':<{m}} | {'value':>9} | note", f"|{'-' * (w + 2)}|{'-' * (m + 2)}|{'-' * 11}|------"]
    for r in rows:
        v = "n/a" if r["value"] is None else f"{r['value']:9.2f}"
        out.append(f"| {r['stage']:<{w}} | {r['metric']:<{m}} | {v:>9} | {r['note']}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ferengine.bench", description=__doc__.split("\n")[0])
    p.add_argument("--video", type=Path, default=DEFAULT_VIDEO, help=f"one-face video (default {DEFAULT_VIDEO})")
    p.add_argument("--checkpoint", "-c", help="model to time (default: the model in assets/)")
    p.add_argument("--backends", nargs="*", help="backends to time (default: all)")
    p.add_argument("--repeat", type=int, default=200, help="timed repetitions per measurement")
    p.add_argument("--json", type=Path, help="also write the rows as JSON")
    p.add_argument("--no-gpu", action="store_true", help="skip the GPU rows even when a CUDA GPU is there")
    p.add_argument("--gpu-batches", type=int, nargs="+", default=[1, 16, 64], metavar="N",
                   help="batch sizes of the GPU rows (default 1 16 64; the largest is also the CUDA-graph and "
                        "TensorRT max batch)")
    p.add_argument("--multi-face-video", type=Path,
                   help="clip for the GPU multi-face pipeline rows (default: a 2x2 mosaic of --video)")
    args = p.parse_args(argv)
    if not args.video.is_file():
        p.error(f"video {args.video} not found; pass --video FILE (a one-face video)")
    if args.multi_face_video is not None and not args.multi_face_video.is_file():
        p.error(f"video {args.multi_face_video} not found")
    if any(b < 1 for b in args.gpu_batches):
        p.error("--gpu-batches must be positive")
    from .checkpoint import CheckpointError
    from .device import cuda_reason

    try:
        rows = run(args.video, args.checkpoint, args.repeat, args.backends, gpu=not args.no_gpu,
                   gpu_batches=tuple(args.gpu_batches), multi_face_video=args.multi_face_video)
    except CheckpointError as exc:
        p.error(str(exc))
    import os

    import torch

    reason = cuda_reason()
    gpu_name = torch.cuda.get_device_name() if reason is None else "no GPU"
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"torch threads {torch.get_num_threads()}, {gpu_name}")
    if args.no_gpu:
        print("# GPU rows: skipped (--no-gpu)")
    elif reason is not None:
        print(f"# GPU rows: skipped, they need a CUDA GPU; found {reason}")
    print(format_table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
