"""`fer`: the command line of fer-desktop.

    fer predict IMAGE_OR_FOLDER [--checkpoint C] [--json]      per-face table (or JSON) for photos
    fer analyze VIDEO --out results.csv [--checkpoint C]        one CSV row per face per frame
    fer export --format onnx|tensorrt [--checkpoint C] [--out F]
    fer eval --data NAME --data-dir D --split SPLIT [--json OUT] [--checkpoint C]
                                                                accuracy, mean class accuracy, macro-F1,
                                                                confusion matrix on a dataset split
    fer info [CHECKPOINT]                                       what a checkpoint holds
    fer backends                                                which inference backends work here

Without ``--checkpoint`` the default model shipped in ``assets/`` is used.

Exit status (``main`` is the one error boundary of ``fer``): 0 success; 2 a bad input (an option out of
range, a file that cannot be read or written, a checkpoint that cannot be used): one line
``fer: error: ...`` naming the file or option and what to do; 1 from ``fer predict`` when some images (not
all) could not be read; 130 interrupted (Ctrl-C), 143 terminated (SIGTERM); 1 with ``fer: internal
error: ...`` for a bug (``-v`` shows its traceback). ``fer analyze`` never leaves an unfinished result
under the ``--out`` name: an interrupted or failed run keeps its rows as ``NAME.partial.csv`` and says so.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Sequence

from .errors import FerError
from .fileio import show
from .validate import argtype, check_device_name, check_int, check_max_faces, check_min_confidence, check_smoothing

log = logging.getLogger("fer")

MESSAGE_MAX = 800  # characters of an error message on its one line (-v prints all of it)


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that outputs are finished the same way as on Ctrl-C."""


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
    p.add_argument("--device", default="auto", type=argtype(check_device_name),
                   help="auto, cpu, cuda, cuda:N (default: auto)")


def _add_detector_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--detector", default="short", choices=["short", "full"],
                   help="BlazeFace model: short (faces within ~2 m, default) or full (distant/group scenes)")
    p.add_argument("--min-confidence", type=argtype(check_min_confidence), default=0.5,
                   help="face detection threshold in (0, 1] (default 0.5)")
    p.add_argument("--max-faces", type=argtype(check_max_faces), default=0,
                   help="keep at most N faces per frame (0 = all)")


def _opset(value: str) -> int:
    from .export import check_opset  # imports torch: only when --opset is given

    return check_opset(value)



def _face_row(fr) -> dict:
    from .results import frame_result_to_dicts

    return frame_result_to_dicts(fr)


# ------------------------------------------------------------------------------------------ commands


def cmd_predict(args) -> int:
    """Exit 0 when every image was read, 1 when some could not be (each says why; the others are
    reported), 2 when none could be."""
    from .sources import IMAGE_EXTENSIONS, check_input_file, read_image

    target = Path(args.path)
    if target.is_dir():
        files = sorted(p for p in target.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise CLIError(f"{show(target)}: no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in this folder")
    else:
        if not os.path.lexists(target):
            raise CLIError(f"{show(target)}: no such file or folder")
        files = [check_input_file(target, "image file")]
    first = read_image(files[0]) if len(files) == 1 else None  # one image: a bad one is the error, before loading
    loaded = _load(args.checkpoint)
    results = []
    failed = 0
    from .errors import SourceError

    with _pipeline(args, loaded, smoothing=0.0) as pipe:
        for f in files:
            try:
                image = first if first is not None else read_image(f)
            except SourceError as exc:  # unreadable image: report, go on with the rest
                print(f"fer: warning: {exc}", file=sys.stderr)
                results.append({"file": show(f), "error": str(exc), "faces": []})
                failed += 1
                continue
            pipe.reset()
            fr = pipe.process(image)
            results.append({"file": show(f), "width": image.shape[1], "height": image.shape[0],
                            "faces": _face_row(fr)})
    if args.json:
        json.dump({"checkpoint": show(loaded.path), "labels": list(pipe.labels), "images": results},
                  sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        _print_table(results, pipe.labels)
    if failed == len(files):
        raise CLIError(f"none of the {len(files)} images in {show(target)} could be read (see the warnings above)")
    if failed:
        print(f"fer: {failed} of {len(files)} images could not be read (see above)", file=sys.stderr)
        return 1
    return 0


AV_SHORT = {"head": "head", "estimated": "est."}  # the table's ``av`` column: where valence/arousal came from


def _print_table(results: list[dict], labels: Sequence[str]) -> None:
    """One line per face: box, label and its probability (``-`` for a model without expression categories),
    valence, arousal, ``av`` (``head``: the model's own AV head, ``est.``: estimated from the categories), then
    one column per class."""
    short = [lab[:8] for lab in labels]
    header = (f"{'file':<28} {'id':>3} {'box (x,y,w,h)':<21} {'label':<9} {'conf':>5} {'val':>6} {'aro':>6} "
              f"{'av':<4}  " + " ".join(f"{s:>8}" for s in short))
    print(header.rstrip())
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
            av = AV_SHORT.get(face["av_source"], face["av_source"])
            print(f"{name:<28} {face['face_id']:>3} {box:<21} {label:<9} {conf} "
                  f"{face['valence']:6.2f} {face['arousal']:6.2f} {av:<4}  {probs}".rstrip())


def cmd_analyze(args) -> int:
    from tqdm import tqdm

    from .fileio import check_output
    from .results import ResultWriter
    from .sources import open_source

    out = Path(args.out)
    check_output(out)  # a folder, a missing or read-only folder, a full disk: refused before any work
    with open_source(args.video) as src:
        loaded = _load(args.checkpoint)
        with _pipeline(args, loaded, smoothing=args.smoothing) as pipe, ResultWriter(out, pipe.labels) as writer:
            total = src.frame_count
            if args.max_frames:
                total = min(total, args.max_frames) if total else args.max_frames
            try:
                with tqdm(total=total, unit="frame", desc=src.name, disable=args.quiet) as bar:
                    for frame in src:
                        if args.max_frames and writer.frames >= args.max_frames:
                            break
                        writer.write(pipe.process(frame.image, frame.index, frame.time_s))
                        bar.update(1)
            except BaseException as exc:
                kept = writer.abort()
                why = "interrupted" if isinstance(exc, KeyboardInterrupt) else "stopped by an error"
                if kept is not None:
                    print(f"fer: PARTIAL RESULT: the analysis was {why} after {writer.frames} frames; their "
                          f"{writer.rows} face rows are in {show(kept)}, NOT in {show(out)}"
                          f"{' (left as it was)' if os.path.lexists(out) else ''}", file=sys.stderr)
                elif writer.target.special:
                    print(f"fer: PARTIAL RESULT: the analysis was {why} after {writer.frames} frames; {show(out)} "
                          f"got the rows of those frames only", file=sys.stderr)
                raise
    print(f"{writer.frames} frames, {writer.rows} face rows -> {show(out)}", file=sys.stderr)
    return 0


def cmd_export(args) -> int:
    from .export import _opset_of, build_tensorrt_engine, export_onnx
    from .fileio import check_output

    loaded = _load(args.checkpoint)
    src = loaded.path
    out = Path(args.out) if args.out else src.with_suffix(".onnx" if args.format == "onnx" else ".engine")
    check_output(out, make_parents=True)  # before the export runs, not after
    if args.format == "onnx":
        export_onnx(loaded, out, opset=args.opset)
        import onnx

        written = _opset_of(onnx.load(str(out), load_external_data=False)) if not _is_special(out) else args.opset
        print(f"wrote {show(out)}" + (f" (ONNX opset {written})" if written else ""), file=sys.stderr)
        return 0
    from .export import tensorrt_engine
    from .trt import import_tensorrt, tensorrt_build_reason

    reason = tensorrt_build_reason()
    if reason:  # before any export work
        from .errors import BackendUnavailable

        raise BackendUnavailable(f"cannot build a TensorRT engine: {reason}")
    t = import_tensorrt("build")
    last = [0.0]

    def progress(fraction, message):  # one line per phase step on a terminal, nothing when piped
        import time

        now = time.monotonic()
        if sys.stderr.isatty() and (now - last[0] > 0.1 or fraction == 1.0):
            last[0] = now
            pct = f"{fraction * 100:3.0f}%" if fraction is not None else "    "
            print(f"\r{pct} {message[:70]:<70}", end="", file=sys.stderr, flush=True)

    path, built = tensorrt_engine(loaded, out, fp16=not args.fp32, max_batch=args.max_batch, targets=args.targets,
                                  progress=progress, rebuild=args.rebuild, tensorrt=t)
    if sys.stderr.isatty():
        print("\r" + " " * 76 + "\r", end="", file=sys.stderr)
    from .export import sidecar_path

    record = json.loads(sidecar_path(path).read_text(encoding="utf-8"))
    what = (f"{record['tensorrt']}, {record['precision']}, batch 1..{record['batch'][2]}"
            + (f", compute capability {' '.join(record['targets'])}" if record.get("targets") else "")
            + (f", for {record['gpu'][0]}" if record.get("gpu") else ""))
    print(f"{'wrote' if built else 'up to date, kept'} {show(path)} ({what}); record {show(sidecar_path(path))}",
          file=sys.stderr)
    return 0


def _is_special(path: Path) -> bool:
    from .fileio import resolve_output

    return resolve_output(path).special


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
    """What a checkpoint holds, after the very load ``fer predict`` makes (a checkpoint that ``predict``
    refuses is refused here the same way)."""
    from .checkpoint import crop_note, load

    path = _checkpoint_path(args.checkpoint)
    info = load(path, device="cpu").info
    d = info.to_dict()
    d["path"] = show(path)
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
        if name == "tensorrt":
            from .trt import tensorrt_summary

            print(f"{name:<12} {tensorrt_summary()}")
            continue
        print(f"{name:<12} {'available' if reason is None else 'unavailable: ' + reason}")
    return 0


# ------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fer", description="fer-desktop command line: facial-emotion recognition",
        epilog="exit status: 0 success, 2 bad input (one line saying what to fix), 1 fer predict: some images "
               "could not be read (or an internal error), 130/143 interrupted/terminated")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more; tracebacks of internal errors")
    common = argparse.ArgumentParser(add_help=False)  # -v also after the command (fer predict -v ...)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("predict", help="faces and emotions in an image or a folder of images", parents=[common],
                       epilog="exit status: 0 every image read, 1 some could not be read, 2 none could be")
    p.add_argument("path", help="image file or folder of images")
    _add_model_args(p)
    _add_detector_args(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("analyze", help="analyse a video: one CSV row per face per frame", parents=[common],
                       epilog="an interrupted or failed run never replaces --out: its rows are kept in "
                              "NAME.partial.csv (and it says so)")
    p.add_argument("video", help="video file (or camera index, or /dev/videoN)")
    p.add_argument("--out", "-o", required=True, help="CSV file to write (a symlink is written through)")
    _add_model_args(p)
    _add_detector_args(p)
    p.add_argument("--smoothing", type=argtype(check_smoothing), default=0.5,
                   help="per-face exponential smoothing of outputs in [0, 1) (0 = off, default 0.5)")
    p.add_argument("--max-frames", type=argtype(check_int, name="max_frames", lo=0, hint=" (0 = the whole video)"),
                   default=0, help="stop after N frames (0 = whole video)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("export", help="export a checkpoint to ONNX or a TensorRT engine", parents=[common])
    p.add_argument("--format", required=True, choices=["onnx", "tensorrt"])
    p.add_argument("--checkpoint", "-c", metavar="FILE", help="model checkpoint (default: the model in assets/)")
    p.add_argument("--out", "-o", help="output file (default: beside the checkpoint, .onnx / .engine)")
    p.add_argument("--opset", type=argtype(_opset), default=None,
                   help="ONNX opset, 7 up to the newest the installed onnx knows (default: the exporter's, 18)")
    p.add_argument("--max-batch", type=argtype(check_int, name="max_batch", lo=1, hi=65536), default=16,
                   help="TensorRT: largest batch of faces (default 16)")
    p.add_argument("--fp32", action="store_true", help="TensorRT: build in fp32 instead of fp16")
    p.add_argument("--targets", metavar="CC,CC", default=None,
                   help="TensorRT-RTX: compute capabilities to build for, e.g. 8.6,8.9 or 75,80 or current "
                        "(default: every one it knows but 7.5)")
    p.add_argument("--rebuild", action="store_true",
                   help="TensorRT: build even when --out holds an up-to-date engine of this checkpoint")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("info", help="print what a checkpoint holds (architecture, labels, input, metrics)",
                       parents=[common])
    p.add_argument("checkpoint", nargs="?", help="checkpoint (default: the model in assets/)")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("backends", help="which inference backends are usable on this machine", parents=[common])
    p.set_defaults(func=cmd_backends)
    if "eval" not in _plugin_commands(sub):
        p = sub.add_parser("eval", help="metrics of a checkpoint on a dataset split (needs fer-desktop's trainers)",
                           add_help=False)
        p.set_defaults(func=_missing_eval)
    return parser


def one_line(exc: BaseException) -> str:
    """An exception's message on one line: ``[Errno 28] No space left on device: '/x'`` becomes
    ``/x: No space left on device``; newlines (torch's multi-line errors) become spaces; long ones cut."""
    if isinstance(exc, OSError) and exc.strerror and not isinstance(exc, FerError):
        text = f"{show(exc.filename)}: {exc.strerror}" if exc.filename is not None else exc.strerror
        if exc.filename2 is not None:
            text += f" (-> {show(exc.filename2)})"
    else:
        text = str(exc) or type(exc).__name__
    text = " ".join(text.split())
    if len(text) > MESSAGE_MAX:
        text = text[: MESSAGE_MAX - 40].rstrip() + " ... (run fer -v for the whole message)"
    return text


def _on_sigterm(signum, frame):  # noqa: ARG001
    raise Terminated()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and getattr(args, "func", None) is not _missing_eval:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    verbose = bool(getattr(args, "verbose", False))
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="fer: %(message)s")
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return _run(args, verbose)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _run(args, verbose: bool) -> int:
    """The one error boundary of ``fer``: every failure becomes one line and an exit status."""
    try:
        return args.func(args)
    except Terminated:
        print("fer: terminated (SIGTERM)", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("fer: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `fer info | head`: the reader went away; not an error of ours
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 0
    except (CLIError, FerError, OSError) as exc:
        if verbose:
            import traceback

            traceback.print_exc()
        print(f"fer: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - a bug: one line, the traceback with -v
        if verbose:
            import traceback

            traceback.print_exc()
            print(f"fer: internal error: {type(exc).__name__}: {one_line(exc)} (please report it)", file=sys.stderr)
        else:
            print(f"fer: internal error: {type(exc).__name__}: {one_line(exc)} (run with -v for the traceback; "
                  "please report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
