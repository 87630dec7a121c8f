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
   accuracy, mean class accuracy, macro-F1, confusion matrix (also as PNG beside the card) for an expression
   head; RMSE, SAGR, PCC and CCC of valence and arousal for a valence/arousal head (or the app's estimate from a
   categorical model, when the data has AV targets); the reader options (``--data-opt``) default to the
   training run's own when ``--data`` is its dataset (FER+'s ``va=anchors`` proxy targets, for example);
3. latency: ONNX Runtime and PyTorch ms per face at batch 1 (median of ``--repeat``) on this machine;
4. the model card (Markdown): data, the exact training command(s) (from the checkpoint), selection
   protocol, metrics, confusion matrix, latency, crop calibration, intended use and limitations.

The shipped file appears at ``--out`` only when every step has succeeded (it is built beside it under a
temporary name): a failed release leaves ``--out`` as it was.
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
            data_dir: str | None, split: str, repeat: int, notes: Path | None = None,
            data_opts: dict[str, Any] | None = None) -> dict[str, Any]:
    from ferengine import checkpoint as ck
    from ferengine.backends import create_backend
    from ferengine.preprocess import to_model_input

    from trainers.engine.errors import TrainError

    src, out = Path(src), Path(out)
    if out.resolve() == src.resolve() or (out.exists() and src.exists() and os.path.samefile(out, src)):
        raise TrainError(f"--out {out} is the checkpoint being released ({src}): it would be replaced by its "
                         f"{'fp16 ' if half else ''}copy; give another --out (e.g. "
                         f"assets/models/{src.stem}-release.safetensors)")
    if out.is_dir():
        raise TrainError(f"--out {out} is a folder; give the file to write (e.g. {out / 'model.safetensors'})")
    loaded = ck.load(src)
    info = loaded.info
    spec = info.input
    training = dict(info.training)
    if calibration is not None:
        try:
            cal = json.loads(Path(calibration).read_text())
            rec = cal["recommended"]
            margin, offset = float(rec["crop_margin"]), float(rec["crop_offset_y"])
        except OSError:
            raise
        except (ValueError, KeyError, TypeError) as exc:
            raise TrainError(f"--calibration {calibration}: not a calibration.json written by trainers.calibrate "
                             f"({type(exc).__name__}: {exc}); run python -m trainers.calibrate to make one") from None
        spec = dataclasses.replace(spec, crop_margin=margin, crop_offset_y=offset)
        training["crop_calibration"] = {k: cal.get(k) for k in ("data", "split", "detector", "command")} | {
            "crop_margin": spec.crop_margin, "crop_offset_y": spec.crop_offset_y,
            "previous": {"crop_margin": info.input.crop_margin, "crop_offset_y": info.input.crop_offset_y}}
    training.setdefault("released_from", str(src))  # a released file released again keeps its origin
    if notes is not None:
        training["release_notes"] = Path(notes).read_text(encoding="utf-8").strip()
    info = dataclasses.replace(info, name=name, input=spec, training=training)
    if data_opts is None:  # the training run's reader options when evaluating on its dataset
        tdata = training.get("data") or {}
        data_opts = dict(tdata.get("options") or {}) if _same_dataset(tdata.get("name"), data) else {}
    final = out
    out = out.parent / f".{out.name.split('.')[0]}.releasing.safetensors"
    try:
        result = _release_steps(loaded, info, out, final, half=half, data=data, data_dir=data_dir, split=split,
                                data_opts=data_opts, repeat=repeat, name=name)
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    os.replace(out, final)
    result["checkpoint"] = str(final)
    card = Path(result["card"])
    atomic_write_text(card, model_card(ck.load(final), result))
    return result


def _same_dataset(a: str | None, b: str) -> bool:
    try:
        from trainers.data import canonical_name

        return bool(a) and canonical_name(a) == canonical_name(b)
    except Exception:  # noqa: BLE001 - a name the readers do not know
        return a == b


def _release_steps(loaded, info, out: Path, final: Path, *, half: bool, data: str, data_dir: str | None, split: str,
                   data_opts: dict[str, Any], repeat: int, name: str) -> dict[str, Any]:
    from ferengine import checkpoint as ck
    from ferengine.backends import create_backend
    from ferengine.preprocess import to_model_input

    spec = info.input
    ck.save(out, loaded.model, info, half=half)

    # evaluate the file that ships, as a user would
    card_dir = final.parent
    stem = final.name.split(".")[0]
    eval_json = card_dir / f"{stem}.eval.json"
    cm_png = card_dir / f"{stem}.confusion.png"
    from ferengine.fileio import atomic_write_json

    from trainers.evaluate import _json_safe, evaluate_checkpoint
    from trainers.metrics import save_confusion_png

    metrics = _json_safe(evaluate_checkpoint(out, data, data_dir, split, backend="onnxruntime", device="cpu",
                                             quiet=True, data_opts=data_opts))
    metrics["data_opts"] = dict(data_opts)
    atomic_write_json(eval_json, metrics)
    if "confusion_matrix" in metrics:
        save_confusion_png(np.asarray(metrics["confusion_matrix"]), metrics["labels"], cm_png,
                           title=f"{name} on {data}/{metrics['split']}")
    else:
        cm_png = None

    # store the metrics in the shipped checkpoint too (weights unchanged)
    shipped = ck.load(out)
    key = f"{data}_{split}"
    new_metrics = dict(shipped.info.metrics) | {
        f"{key}_{k}": metrics[k] for k in ("accuracy", "mean_class_accuracy", "macro_f1", "n", "no_copy_accuracy",
                                           "no_copy_mean_class_accuracy", "no_copy_macro_f1", "no_copy_n",
                                           *(f"{p}{w}{d}_{m}" for p in ("", "no_copy_") for w in ("", "estimated_")
                                             for d in ("valence", "arousal") for m in ("rmse", "sagr", "pcc", "ccc")),
                                           *(f"{p}{w}{k}" for p in ("", "no_copy_") for w in ("", "estimated_")
                                             for k in ("mean_ccc", "va_n")))
        if k in metrics}
    ck.save(out, shipped.model, dataclasses.replace(shipped.info, metrics=new_metrics), half=half)
    shipped = ck.load(out)

    x = to_model_input(np.random.default_rng(0).integers(0, 256, (1, spec.size, spec.size), np.uint8), spec)
    latency = {}
    for backend in ("onnxruntime", "torch"):
        with create_backend(backend, shipped, device="cpu") as be:
            latency[backend] = _latency_ms(be.run, x, repeat)
    n_params = sum(p.numel() for p in shipped.model.parameters())
    result = {"checkpoint": str(out), "size_bytes": out.stat().st_size, "params": n_params, "metrics": metrics,
              "stored_dtypes": stored_dtypes(out),
              "latency_ms_per_face_batch1": latency, "eval_json": str(eval_json),
              "confusion_png": None if cm_png is None else str(cm_png), "card": str(card_dir / f"{stem}.md")}
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


# Published numbers a card may cite, as what they are: (method, number, the paper's protocol). Only cited for the
# dataset they belong to, and never as a comparison on our split.
PAPER_NUMBERS = {
    "fer2013": [("DAF-CNN (Zhou et al.)", 72.39, "accuracy on FER2013's 3,589-image test set, the split after its "
                 "validation set: PrivateTest"),
                ("ECAN", 73.73, "accuracy on what the paper calls FER2013's 'public test set' (beside a 'public "
                 "validation set'; which Usage split it is, the paper does not say unambiguously)")],
}


def stored_dtypes(path: Path) -> list[str]:
    """The dtypes the weights are stored in (safetensors header; a .pt file's tensors)."""
    from ferengine import checkpoint as ck

    return ck.stored_dtypes(path)


def _label_order(labels: Sequence[str]) -> str:
    from ferengine.labels import LABEL_SETS, canonical

    canon = [canonical(x) for x in labels]
    for name, ls in LABEL_SETS.items():
        if canon == [canonical(x) for x in ls]:
            return {"fer7": "FER2013 order", "ferplus8": "FER+ order", "affectnet8": "AffectNet order"}.get(
                name, f"{name} order")
    return "the training data's order"


def _pct(v: Any) -> str:
    return "n/a" if v is None or v != v else f"{v:.2f} %"


def model_card(loaded, r: dict[str, Any]) -> str:
    """The model card: every sentence from the checkpoint's metadata or from what this release measured."""
    from ferengine.labels import AV_ANCHOR_SOURCE

    info = loaded.info
    t = info.training
    m = r["metrics"]
    labels = m.get("labels") or []
    cm = m.get("confusion_matrix")
    commands = _command_history(t)
    cm_rows = ["| true \\ predicted | " + " | ".join(labels) + " | recall |",
               "|---" * (len(labels) + 2) + "|"]
    for lab, row in zip(labels, cm or []):
        rec = m["per_class"][lab]["recall"]
        cm_rows.append(f"| **{lab}** | " + " | ".join(str(v) for v in row) + f" | {rec:.1f} % |")
    spec = info.input
    cal = t.get("crop_calibration")
    lat = r["latency_ms_per_face_batch1"]
    data = t.get("data", {}) or {}
    sel = t.get("selection") or {}
    sel_split = sel.get("split") or data.get("val_split")
    sel_metric = sel.get("metric") or (t.get("config") or {}).get("best_metric")
    dtypes = sorted(set(r.get("stored_dtypes") or []))
    if "valence_arousal" in info.heads:
        av = "valence/arousal from the model's own head"
    else:
        av = f"no valence/arousal head: the app estimates them from the class probabilities ({AV_ANCHOR_SOURCE})"
    role = m.get("role", "")
    evaluated = f"{m['data']} `{m['split']}`"
    split_used = []
    if data.get("train_split"):
        split_used.append(f"trained on {data.get('name')} `{data['train_split']}` "
                          f"({(t.get('split_sizes') or {}).get(data['train_split'], '?')} faces"
                          + (f", {t['dropped_copies_of']['items']} copies of {', '.join(t['dropped_copies_of']['splits'])} "
                             "images removed" if t.get("dropped_copies_of") else "") + ")")
    if sel_split:
        split_used.append(f"epoch selected on `{sel_split}` by {sel_metric or 'its validation metric'}"
                          + (f" (epoch {t.get('epoch')} of {t.get('epochs')})" if t.get("epoch") else ""))
    split_used.append(f"this card evaluates {evaluated} ({role or 'role unknown'})")
    eval_rows = [f"| {m['data']} {m['split']}, whole split | {m['n']} | **{_pct(m['accuracy'])}** | "
                 f"{_pct(m['mean_class_accuracy'])} | {_pct(m['macro_f1'])} |"] if cm is not None else []
    c = m.get("copies_in_train")
    if "no_copy_n" in m and cm is not None:
        eval_rows.append(f"| {m['data']} {m['split']}, no copy in {c['train_split'] if c else 'train'} | "
                         f"{m['no_copy_n']} | **{_pct(m.get('no_copy_accuracy'))}** | "
                         f"{_pct(m.get('no_copy_mean_class_accuracy'))} | {_pct(m.get('no_copy_macro_f1'))} |")
    copies_line = (f"{c['copies']} of the {c['items']} {m['split']} images are bit-identical to a `{c['train_split']}` "
                   f"image ({c['same_label']} with the same label): the second row leaves them out."
                   if c and c.get("copies") else
                   ("No image of the split is a bit-identical copy of a training image." if c else
                    "Copies in the training data were not checked (no training split to compare with)."))
    papers = [f"- {who}: {num:.2f} % ({how})" for who, num, how in PAPER_NUMBERS.get(m["data"], [])]
    sel_note = ("This split selected the model, so its numbers are validation numbers, optimistic for unseen data."
                if role.startswith("validation") else "")
    lines = [
        f"# {info.name}",
        "",
        f"`{Path(r['checkpoint']).name}`, released from `{t.get('released_from', '?')}`.",
        "",
        "| | |", "|---|---|",
        f"| architecture | `{info.arch}` {json.dumps(info.arch_kwargs)} ({r['params'] / 1e6:.2f} M parameters) |",
        f"| input | {spec.size}x{spec.size} {'grey' if spec.channels == 1 else 'RGB'}, (x/255 - {spec.mean[0]}) / {spec.std[0]}, "
        f"crop margin {spec.crop_margin:.3f}, crop offset y {spec.crop_offset_y:.3f}, eye-line aligned: {spec.align} |",
        (f"| classes | {', '.join(info.labels)} ({_label_order(info.labels)}) |" if "expression" in info.heads else
         "| classes | none: this model predicts valence and arousal only |"),
        f"| heads | {', '.join(info.heads)}; {av} |",
        f"| file | {r['size_bytes'] / 1024:.0f} KiB, safetensors, weights stored as {', '.join(dtypes) or '?'} "
        f"(computed in float32) |",
        "",
        "## Training",
        "",
        "Splits: " + "; ".join(split_used) + ".",
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
        *(["## Notes", "", *[f"- {n}" for n in t.get("notes") or [] if isinstance(n, str)],
           *([""] if t.get("notes") else []), *([t["release_notes"], ""] if t.get("release_notes") else [])]
          if t.get("release_notes") or t.get("notes") else []),
        f"## Evaluation (the shipped file, through {m.get('backend', 'ONNX Runtime')})",
        "",
        "```bash",
        f"fer eval --checkpoint {r['checkpoint']} --data {m['data']} --split {m['split']}"
        + "".join(f" --data-opt {k}={v}" for k, v in (m.get("data_opts") or {}).items()),
        "```",
        "",
        *(["| data | n | accuracy | mean class accuracy | macro-F1 |", "|---|---|---|---|---|", *eval_rows, ""]
          if eval_rows else []),
        *_av_section(m),
        copies_line + (" " + sel_note if sel_note else ""),
        "",
        *(["Published numbers on this dataset, for orientation only (other splits or protocols, not comparable "
           "one to one with the table above):", "", *papers, ""] if papers else []),
        *(["Confusion matrix on the whole split (rows: true class, columns: predicted):", "", *cm_rows, "",
           f"![confusion matrix]({Path(r['confusion_png']).name})", ""] if cm is not None and r.get("confusion_png")
          else []),
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
         "like the training faces (see docs/crop-calibration.md)." if cal else
         "Not calibrated: the app crops with the checkpoint's default margin, which may frame faces differently "
         "from the training data."),
        "",
        "## Intended use and limitations",
        "",
        ("Research and demonstration of facial-expression recognition on frontal faces. " if "expression" in info.heads
         else "Research and demonstration of valence/arousal estimation from frontal faces. ")
        + _data_limitations(m, data.get("name")) +
        "Expression is not emotion: a predicted label describes a facial display, not what a person feels. "
        "Do not use it for decisions about people.",
        "",
    ]
    return "\n".join(lines)


def _av_section(m: dict[str, Any]) -> list[str]:
    """The valence/arousal table (the head's, or the app's estimate from a categorical model), whole split and
    no-copy part; nothing when the evaluation had no valence/arousal."""
    rows = []
    for w, what in (("", "the model's valence/arousal head"),
                    ("estimated_", "the app's estimate from the class probabilities (category anchors)")):
        if f"{w}mean_ccc" not in m:
            continue
        head = [f"Valence/arousal from {what}:", "",
                "| data | n | RMSE V | RMSE A | SAGR V | SAGR A | PCC V | PCC A | CCC V | CCC A | mean CCC |",
                "|---" * 11 + "|"]
        for p, part in (("", "whole split"), ("no_copy_", "no copy in train")):
            if f"{p}{w}mean_ccc" not in m:
                continue
            cells = [f"{float(m.get(f'{p}{w}{d}_{k}', float('nan'))):.4f}" for k in ("rmse", "sagr", "pcc", "ccc")
                     for d in ("valence", "arousal")]
            head.append(f"| {m['data']} {m['split']}, {part} | {m.get(f'{p}{w}va_n', '?')} | " + " | ".join(cells)
                        + f" | **{float(m[f'{p}{w}mean_ccc']):.4f}** |")
        rows += head + [""]
    return rows


def _data_limitations(m: dict[str, Any], name: str | None) -> str:
    """What the evaluation itself shows about the weak classes (lowest recalls), and the training data."""
    pc = m.get("per_class") or {}
    weak = sorted(((v["recall"], k, v["support"]) for k, v in pc.items() if v.get("support")), key=lambda x: x[0])[:2]
    text = ""
    if weak:
        text = "Weakest classes on this split: " + ", ".join(f"{k} (recall {r:.1f} %, {n} faces)" for r, k, n in weak) + ". "
    if name == "fer2013":
        text += ("FER2013 is web imagery labelled once per image; FER+ re-labelled it with 10 annotators per image and "
                 "disagrees with many labels (see ferplus in ../shared/data). ")
    return text


def main(argv: Sequence[str] | None = None) -> int:
    from ferengine.validate import argtype, check_int

    p = argparse.ArgumentParser(prog="python -m trainers.release", description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", type=Path, help="trained checkpoint (e.g. runs/x/best.safetensors)")
    p.add_argument("--out", type=Path, required=True, help="the shipped file (e.g. assets/models/default.safetensors)")
    p.add_argument("--name", required=True, help="display name")
    p.add_argument("--half", action=argparse.BooleanOptionalAction, default=True, help="store weights as fp16 (default)")
    p.add_argument("--calibration", type=Path, help="calibration.json from python -m trainers.calibrate")
    p.add_argument("--data", default="fer2013")
    p.add_argument("--data-dir")
    p.add_argument("--split", default="publictest")
    from trainers.fer_eval import _key_value

    p.add_argument("--data-opt", action="append", default=None, type=_key_value, metavar="KEY=VALUE",
                   help="reader option, repeatable (default: the training run's own options when --data is its "
                        "dataset, e.g. va=anchors for FER+'s proxy valence/arousal targets)")
    p.add_argument("--repeat", type=argtype(check_int, lo=1, name="--repeat"), default=300,
                   help="timed runs for the latency figures")
    p.add_argument("-v", "--verbose", action="store_true", help="the traceback of an internal error")
    p.add_argument("--notes", type=Path, help="markdown file added to the card under 'Notes' (and kept in the "
                                              "checkpoint's metadata): where and how it was trained, caveats")
    args = p.parse_args(argv)
    from trainers.engine.boundary import guard, wants_traceback

    def body() -> int:
        r = release(args.checkpoint, args.out, name=args.name, half=args.half, calibration=args.calibration,
                    data=args.data, data_dir=args.data_dir, split=args.split, repeat=args.repeat, notes=args.notes,
                    data_opts=None if args.data_opt is None else dict(args.data_opt))
        print(json.dumps({k: v for k, v in r.items() if k != "metrics"}, indent=2))
        return 0

    return guard("release", body, verbose=args.verbose or wants_traceback(argv or []), verbose_hint="-v",
                 on_interrupt=lambda: f"{args.out} is either its previous version or the new one, never a part")


if __name__ == "__main__":
    sys.exit(main())
