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


# --------------------------------------------------------------------------------------------- eval


def match_labels(model_labels: Sequence[str], data_labels: Sequence[str]) -> tuple[list[int], list[int], list[str]]:
    """Match classes by canonical name: ``(model columns, dataset indices, names)`` of the shared classes,
    in the dataset's class order. Raises :class:`CLIError` when no class is shared."""
    from .labels import canonical

    model_index = {canonical(n): i for i, n in enumerate(model_labels)}
    cols, idx, names = [], [], []
    for j, name in enumerate(data_labels):
        i = model_index.get(canonical(name))
        if i is not None:
            cols.append(i)
            idx.append(j)
            names.append(canonical(name))
    if not cols:
        raise CLIError(
            f"the checkpoint's classes {list(model_labels)} and the dataset's {list(data_labels)} have no class "
            "in common; nothing to evaluate"
        )
    return cols, idx, names


def _face_batches(ds, batch_size: int):
    """uint8 face batches (numpy) of a FaceDataset, in order: slices of ``images`` for in-memory sets,
    else items decoded one by one."""
    import numpy as np

    n = len(ds)
    for s in range(0, n, batch_size):
        e = min(n, s + batch_size)
        if ds.images is not None:
            yield ds.images[s:e].numpy()
        else:
            yield np.stack([np.asarray(ds[i]["image"]) for i in range(s, e)])


def cmd_eval(args) -> int:
    import numpy as np

    try:  # the training package ships with fer-desktop, but ferengine must not need it to import
        from trainers.data import DatasetError, load_dataset
        from trainers.metrics import classification_report, format_classification_report, save_confusion_png
    except ImportError as exc:
        raise CLIError(f"fer eval needs the trainers package of fer-desktop (dataset readers, metrics): {exc}")
    from tqdm import tqdm

    from .backends import create_backend
    from .preprocess import to_model_input

    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be >= 1, got {args.batch_size}")
    loaded = _load(args.checkpoint, args.device)
    if "expression" not in loaded.info.heads or not loaded.info.labels:
        raise CLIError(f"{loaded.path}: the checkpoint has no expression head (heads {loaded.info.heads}); "
                       "fer eval scores categorical predictions")
    try:
        ds = load_dataset(args.data, args.data_dir, args.split)
    except DatasetError as exc:
        raise CLIError(" ".join(str(exc).split())) from None
    data_labels = list(ds.label_names)
    y_all = ds.labels.numpy().astype(np.int64)
    if len(ds) == 0 or (y_all < 0).all():
        raise CLIError(f"{args.data}/{ds.split}: no item has a class label (a valence/arousal-only dataset?); "
                       "fer eval scores categorical labels")

    model_labels = list(loaded.info.labels)
    cols, data_idx, names = match_labels(model_labels, data_labels)
    from .labels import canonical

    shared = set(names)
    only_data = [n for n in data_labels if canonical(n) not in shared]
    only_model = [n for n in model_labels if canonical(n) not in shared]
    notes = []
    if [canonical(n) for n in model_labels] != [canonical(n) for n in data_labels] and not only_data and not only_model:
        notes.append(f"the checkpoint orders its classes {model_labels}, the dataset {data_labels}: matched by name")
    # dataset class index -> position among the shared classes (-1: the model lacks that class)
    to_shared = np.full(len(data_labels), -1, np.int64)
    to_shared[data_idx] = np.arange(len(data_idx))
    unlabelled = int((y_all < 0).sum())
    y_shared = np.where(y_all >= 0, to_shared[np.clip(y_all, 0, None)], -1)
    dropped_classes = {n: int((y_all == j).sum()) for j, n in enumerate(data_labels) if canonical(n) not in shared}
    n_dropped = int(sum(dropped_classes.values()))
    if only_data:
        notes.append(f"the dataset has classes the checkpoint lacks: {only_data}; their {n_dropped} items are "
                     f"left out, evaluating on the {len(names)} shared classes")
    if only_model:
        notes.append(f"the checkpoint has classes the dataset lacks: {only_model}; predictions are the most "
                     f"probable of the {len(names)} shared classes")
    if unlabelled:
        notes.append(f"{unlabelled} items without a class label are left out")
    keep = y_shared >= 0
    if not keep.any():
        raise CLIError(f"{args.data}/{ds.split}: no item belongs to a class the checkpoint knows ({names})")
    for note in notes:
        print(f"fer: note: {note}", file=sys.stderr)

    backend = create_backend(args.backend, loaded, device=args.device)
    preds = np.empty(len(ds), np.int64)
    sel = np.asarray(cols, np.int64)
    try:
        with tqdm(total=len(ds), unit="face", desc=f"eval {args.data}/{ds.split}", disable=args.quiet or None,
                  file=sys.stderr) as bar:
            pos = 0
            for faces in _face_batches(ds, args.batch_size):
                probs = backend.run(to_model_input(faces, loaded.spec))["probs"]
                preds[pos:pos + len(faces)] = probs[:, sel].argmax(axis=1)
                pos += len(faces)
                bar.update(len(faces))
    finally:
        backend.close()

    report = classification_report(y_shared[keep], preds[keep], names)
    header = (f"{loaded.path} on {args.data}/{ds.split} ({backend.name} on {backend.device}): "
              f"{report['n']} of {len(ds)} faces")
    print(header)
    print(format_classification_report(report))
    pct = lambda v: None if v != v else round(100.0 * v, 4)  # NaN -> null
    result = {
        "accuracy": pct(report["accuracy"]),
        "mean_class_accuracy": pct(report["mean_class_accuracy"]),
        "macro_f1": pct(report["macro_f1"]),
        "n": report["n"],
        "labels": names,
        "confusion_matrix": report["confusion_matrix"],
        "per_class": {k: {"precision": pct(v["precision"]), "recall": pct(v["recall"]), "f1": pct(v["f1"]),
                          "support": v["support"]} for k, v in report["per_class"].items()},
        "checkpoint": str(loaded.path),
        "data": args.data,
        "data_dir": str(args.data_dir) if args.data_dir else None,
        "split": ds.split,
        "backend": backend.name,
        "dataset_size": len(ds),
        "dropped": {"classes_not_in_checkpoint": dropped_classes, "unlabelled": unlabelled},
        "checkpoint_classes_not_in_dataset": only_model,
    }
    if args.json:
        from .fileio import atomic_write_json

        atomic_write_json(Path(args.json), result)
        print(f"wrote {args.json}", file=sys.stderr)
    if args.confusion_png:
        save_confusion_png(np.asarray(report["confusion_matrix"]), names, args.confusion_png,
                           title=f"{loaded.info.name or loaded.path.name} on {args.data}/{ds.split}")
        print(f"wrote {args.confusion_png}", file=sys.stderr)
    return 0


def cmd_info(args) -> int:
    from .checkpoint import read_info

    path = _checkpoint_path(args.checkpoint)
    info = read_info(path)
    d = info.to_dict()
    d["path"] = str(path)
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

    p = sub.add_parser("eval", help="accuracy, mean class accuracy, macro-F1 and confusion matrix on a dataset split")
    p.add_argument("--data", required=True, help="dataset name: fer2013, ferplus, rafdb, affectnet, sfew, folder")
    p.add_argument("--data-dir", default=None, help="folder holding the dataset (default: $FER_DATA_DIR, else ./data)")
    p.add_argument("--split", required=True, help="split to evaluate, e.g. publictest, privatetest, val, test")
    p.add_argument("--json", metavar="OUT", help="also write the metrics (percent) to this JSON file")
    p.add_argument("--confusion-png", metavar="PNG", help="also draw the confusion matrix to this PNG file")
    p.add_argument("--batch-size", type=int, default=256, help="faces per inference call (default 256)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    _add_model_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("info", help="print what a checkpoint holds (architecture, labels, input, metrics)")
    p.add_argument("checkpoint", nargs="?", help="checkpoint (default: the model in assets/)")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("backends", help="which inference backends are usable on this machine")
    p.set_defaults(func=cmd_backends)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="fer: %(message)s")
    from .backends import BackendUnavailable
    from .checkpoint import CheckpointError
    from .faces import DetectorUnavailable
    from .sources import SourceError

    try:
        return args.func(args)
    except (CLIError, CheckpointError, SourceError, BackendUnavailable, DetectorUnavailable, FileNotFoundError) as exc:
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
