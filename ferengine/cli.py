"""`fer`: the command line of fer-desktop.

    fer predict IMAGE_OR_FOLDER [--checkpoint C] [--json]      per-face table (or JSON) for photos
    fer analyze VIDEO --out results.csv [--checkpoint C]        one CSV row per face per frame
    fer export --format onnx|tensorrt [--checkpoint C] [--out F]
    fer eval --data NAME --data-dir D --split SPLIT [--json OUT] [--checkpoint C]
                                                                accuracy, mean class accuracy, macro-F1,
                                                                confusion matrix on a dataset split
    fer info [CHECKPOINT]                                       what a checkpoint holds
    fer backends                                                which inference backends work here

Without ``--checkpoint`` the default model shipped in ``assets/`` is used. Errors print one line saying
what is wrong and exit with status 2; no tracebacks for bad input.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

log = logging.getLogger("fer")


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


# ----------------------------------------------------------------------------------------- helpers


def _checkpoint_path(arg: str | None) -> Path:
    from .checkpoint import default_checkpoint_path

    return Path(arg) if arg else default_checkpoint_path()


def _load(arg: str | None, device: str = "cpu"):
    from .checkpoint import load

    return load(_checkpoint_path(arg), device="cpu" if device == "auto" else device)


def _pipeline(args, loaded, smoothing: float):
    from .pipeline import Pipeline

    return Pipeline(
        loaded,
        backend=args.backend,
        device=args.device,
        detector_model=args.detector,
        smoothing=smoothing,
        min_confidence=args.min_confidence,
        max_faces=args.max_faces,
    )


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", "-c", metavar="FILE", help="model checkpoint (default: the model in assets/)")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "onnxruntime", "tensorrt"],
                   help="inference backend (default: auto = TensorRT on a GPU if installed, else ONNX Runtime)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default: auto)")


def _add_detector_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--detector", default="short", choices=["short", "full"],
                   help="BlazeFace model: short (faces within ~2 m, default) or full (distant/group scenes)")
    p.add_argument("--min-confidence", type=float, default=0.5, help="face detection threshold (default 0.5)")
    p.add_argument("--max-faces", type=int, default=0, help="keep at most N faces per frame (0 = all)")


def _face_row(fr) -> dict:
    from .results import frame_result_to_dicts

    return frame_result_to_dicts(fr)


# ------------------------------------------------------------------------------------------ commands


def cmd_predict(args) -> int:
    from .sources import IMAGE_EXTENSIONS, read_image

    target = Path(args.path)
    if target.is_dir():
        files = sorted(p for p in target.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise CLIError(f"{target}: no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in this folder")
    elif target.is_file():
        files = [target]
    else:
        raise CLIError(f"{target}: no such file or folder")
    loaded = _load(args.checkpoint)
    results = []
    with _pipeline(args, loaded, smoothing=0.0) as pipe:
        for f in files:
            try:
                image = read_image(f)
            except Exception as exc:  # unreadable image: report, go on with the rest
                log.warning("%s", exc)
                results.append({"file": str(f), "error": str(exc), "faces": []})
                continue
            pipe.reset()
            fr = pipe.process(image)
            results.append({"file": str(f), "width": image.shape[1], "height": image.shape[0],
                            "faces": _face_row(fr)})
    if args.json:
        json.dump({"checkpoint": str(loaded.path), "labels": list(pipe.labels), "images": results},
                  sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        _print_table(results, pipe.labels)
    return 0


def _print_table(results: list[dict], labels: Sequence[str]) -> None:
    short = [lab[:8] for lab in labels]
    header = f"{'file':<28} {'id':>3} {'box (x,y,w,h)':<21} {'label':<9} {'conf':>5} {'val':>6} {'aro':>6}  " + " ".join(
        f"{s:>8}" for s in short)
    print(header)
    for r in results:
        name = Path(r["file"]).name[:28]
        if r.get("error"):
            print(f"{name:<28} error: {r['error']}")
            continue
        if not r["faces"]:
            print(f"{name:<28}   - no face found")
            continue
        for face in r["faces"]:
            box = ",".join(str(int(round(face[k]))) for k in ("x", "y", "w", "h"))
            probs = " ".join(f"{face[lab]:8.3f}" for lab in labels if lab in face)
            label = face["label"] or "-"
            conf = f"{face['confidence']:5.2f}" if face["confidence"] is not None else "    -"
            print(f"{name:<28} {face['face_id']:>3} {box:<21} {label:<9} {conf} "
                  f"{face['valence']:6.2f} {face['arousal']:6.2f}  {probs}")


def cmd_analyze(args) -> int:
    from tqdm import tqdm

    from .results import ResultWriter
    from .sources import open_source

    out = Path(args.out)
    if out.is_dir():
        raise CLIError(f"--out {out} is a folder; give a .csv file name")
    loaded = _load(args.checkpoint)
    n_rows = n_frames = 0
    with open_source(args.video) as src, _pipeline(args, loaded, smoothing=args.smoothing) as pipe:
        total = src.frame_count
        if args.max_frames:
            total = min(total, args.max_frames) if total else args.max_frames
        with ResultWriter(out, pipe.labels) as writer, tqdm(
            total=total, unit="frame", desc=Path(str(args.video)).name, disable=args.quiet
        ) as bar:
            for frame in src:
                if args.max_frames and n_frames >= args.max_frames:
                    break
                fr = pipe.process(frame.image, frame.index, frame.time_s)
                writer.write(fr)
                n_frames += 1
                n_rows += len(fr.faces)
                bar.update(1)
    print(f"{n_frames} frames, {n_rows} face rows -> {out}", file=sys.stderr)
    return 0


def cmd_export(args) -> int:
    from .export import build_tensorrt_engine, export_onnx

    loaded = _load(args.checkpoint)
    src = loaded.path
    out = Path(args.out) if args.out else src.with_suffix(".onnx" if args.format == "onnx" else ".engine")
    if args.format == "onnx":
        export_onnx(loaded, out, opset=args.opset)
    else:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            onnx_path = export_onnx(loaded, Path(tmp) / "model.onnx", opset=args.opset)
            build_tensorrt_engine(onnx_path, out, fp16=not args.fp32, max_batch=args.max_batch)
    print(f"wrote {out}", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------------------------- plugins

PLUGIN_GROUP = "fer.commands"  # entry points: a function(subparsers) adding subcommands (trainers: `fer eval`)


def _plugin_commands(sub) -> set[str]:
    """Subcommands other packages add (``fer eval`` comes from fer-desktop's trainers package, which
    ferengine never imports itself). A plugin that fails to load is skipped with a warning."""
    from importlib.metadata import entry_points

    before = set(sub.choices)
    for ep in entry_points(group=PLUGIN_GROUP):
        try:
            ep.load()(sub)
        except ImportError as exc:  # its package is not installed here: the command is simply absent
            log.debug("fer: the %s command plugin %s is not importable: %s", PLUGIN_GROUP, ep.value, exc)
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not break `fer predict`
            log.warning("fer: the %s command plugin %s could not be loaded: %s", PLUGIN_GROUP, ep.value, exc)
    return set(sub.choices) - before


def _missing_eval(args) -> int:
    raise CLIError("fer eval needs the trainers package of fer-desktop (dataset readers, metrics), registered as "
                   f"a {PLUGIN_GROUP!r} entry point: install fer-desktop with pip (pip install -e . in a clone)")


def cmd_info(args) -> int:
    from .checkpoint import read_info

    path = _checkpoint_path(args.checkpoint)
    from .checkpoint import crop_note

    info = read_info(path)
    d = info.to_dict()
    d["path"] = str(path)
    cal = (info.training or {}).get("crop_calibration")
    note = crop_note(info)
    d["crop"] = {"crop_margin": info.input.crop_margin, "crop_offset_y": info.input.crop_offset_y,
                 "calibrated": note is None, "how": (cal or {}).get("how") or (cal or {}).get("command"),
                 **({"note": note} if note else {})}
    if note:
        print(f"fer: note: {note}", file=sys.stderr)
    json.dump(d, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


def cmd_backends(args) -> int:
    from .backends import available_backends

    for name, reason in available_backends().items():
        print(f"{name:<12} {'available' if reason is None else 'unavailable: ' + reason}")
    return 0


# ------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fer", description="fer-desktop command line: facial-emotion recognition")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("predict", help="faces and emotions in an image or a folder of images")
    p.add_argument("path", help="image file or folder of images")
    _add_model_args(p)
    _add_detector_args(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("analyze", help="analyse a video: one CSV row per face per frame")
    p.add_argument("video", help="video file (or camera index)")
    p.add_argument("--out", "-o", required=True, help="CSV file to write")
    _add_model_args(p)
    _add_detector_args(p)
    p.add_argument("--smoothing", type=float, default=0.5,
                   help="per-face exponential smoothing of outputs in [0, 1) (0 = off, default 0.5)")
    p.add_argument("--max-frames", type=int, default=0, help="stop after N frames (0 = whole video)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("export", help="export a checkpoint to ONNX or a TensorRT engine")
    p.add_argument("--format", required=True, choices=["onnx", "tensorrt"])
    p.add_argument("--checkpoint", "-c", metavar="FILE", help="model checkpoint (default: the model in assets/)")
    p.add_argument("--out", "-o", help="output file (default: beside the checkpoint, .onnx / .engine)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    p.add_argument("--max-batch", type=int, default=16, help="TensorRT: largest batch of faces (default 16)")
    p.add_argument("--fp32", action="store_true", help="TensorRT: build in fp32 instead of fp16")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("info", help="print what a checkpoint holds (architecture, labels, input, metrics)")
    p.add_argument("checkpoint", nargs="?", help="checkpoint (default: the model in assets/)")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("backends", help="which inference backends are usable on this machine")
    p.set_defaults(func=cmd_backends)
    if "eval" not in _plugin_commands(sub):
        p = sub.add_parser("eval", help="metrics of a checkpoint on a dataset split (needs fer-desktop's trainers)",
                           add_help=False)
        p.set_defaults(func=_missing_eval)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and getattr(args, "func", None) is not _missing_eval:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="fer: %(message)s")
    from .errors import FerError

    try:
        return args.func(args)
    except (CLIError, FerError, FileNotFoundError) as exc:
        print(f"fer: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fer: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `fer info | head`: the reader went away; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
