"""DAF-CNN's triplet-centre loss, reading by reading, at a scale a 2-core CPU can train in an afternoon.

    python -m trainers.studies.daf_tc --data-dir ../shared/data --out runs/daf-tc     # trains what is missing
    python -m trainers.studies.daf_tc --out runs/daf-tc --table                        # only the table

Every reading is one ``python -m trainers.daf`` run on the whole FER2013 Training split, selected on
PublicTest, with the paper's settings (Adam 1e-3, the plateau rule, batch 128, m = 11, lambda = 0.007,
attention) at a reduced scale: channel widths x0.25, the native 48 px input, ``--epochs`` (default 20).
The table (docs/daf-reproduction.md, "CPU reduced-scale TC readings") gives, for the best epoch by PublicTest
accuracy, the whole split and its part with no copy in Training, and the class separation of the PublicTest
embeddings (``trainers.losses.tc.class_separation``: mean distance to the own class mean over mean distance
to the nearest other class mean, lower = tighter) at epoch 1, at the epoch before TC starts, and at the end.
A killed run resumes where it stopped on the next call.
"""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

# name -> (what it is, flags of trainers.daf)
READINGS: dict[str, tuple[str, list[str]]] = {
    "ce": ("cross-entropy only (--no-tc; Table 1's NOtcl)", ["--no-tc"]),
    "mean": ("TC averaged over the batch (lambda/128 per item), from step 1, centres N(0, 0.01)",
             ["--tc-reduction", "mean", "--tc-start", "0", "--centre-init", "normal"]),
    "sum": ("TC summed over the batch (eq. 9 as printed), from step 1, centres N(0, 0.01)",
            ["--tc-reduction", "sum", "--tc-start", "0", "--centre-init", "normal"]),
    "sum_warm5": ("eq. 9 as printed, lambda ramped 0 -> 0.007 over 5 epochs, centres N(0, 0.01)",
                  ["--tc-reduction", "sum", "--tc-start", "0", "--centre-init", "normal", "--lam-warmup", "5"]),
    "ce_then_sum": ("CE for 8 epochs, then eq. 9 as printed with centres at the class means (the default)",
                    ["--tc-reduction", "sum", "--tc-start", "8", "--centre-init", "means"]),
    "ce_then_mean": ("CE for 8 epochs, then TC averaged, centres at the class means",
                     ["--tc-reduction", "mean", "--tc-start", "8", "--centre-init", "means"]),
}
SCALE = ["--width", "0.25", "--input-size", "48"]


def _rows(run: Path) -> list[dict[str, str]]:
    f = run / "metrics.csv"
    if not f.is_file():
        return []
    with f.open(newline="") as fh:
        return list(csv.DictReader(fh))


def train(name: str, out: Path, data_dir: str, epochs: int, extra: list[str]) -> int:
    run = out / name
    if len(_rows(run)) >= epochs:
        return 0
    cmd = [sys.executable, "-m", "trainers.daf", "--data", "fer2013", "--data-dir", data_dir, "--out", str(run),
           "--epochs", str(epochs), *SCALE, *READINGS[name][1], *extra]
    if (run / "state.pt").is_file():
        cmd = [sys.executable, "-m", "trainers.daf", "--out", str(run), "--resume", "--epochs", str(epochs)]
    print("+", " ".join(cmd), flush=True)
    return subprocess.call(cmd)


def _f(row: dict[str, str], key: str, fmt: str = ".2f") -> str:
    v = row.get(key, "")
    return format(float(v), fmt) if v not in ("", None) else "-"


def table(out: Path, names: list[str]) -> str:
    lines = ["| reading | epochs | best epoch | PublicTest acc (whole / no copy) | mean class acc (whole / no copy) "
             "| sep ratio ep 1 -> before TC -> last | sep ratio at best | TC hinge met (last) | TC per item (last) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in names:
        rows = _rows(out / name)
        if not rows:
            lines.append(f"| {name} | not run | | | | | | | |")
            continue
        best = max(rows, key=lambda r: float(r["val_accuracy"]))
        last = rows[-1]
        cfg = json.loads((out / name / "args.json").read_text())["config"]  # the run's own settings
        x = cfg.get("extra", {})
        start = int(x.get("tc_start") or 0)
        before = rows[min(start, len(rows)) - 1] if start >= 1 else rows[0]
        tc = "-"
        if last.get("train_tc"):  # the logged TC is per batch with sum, per item with mean
            per_item = float(last["train_tc"]) / (cfg["batch_size"] if x.get("tc_reduction") == "sum" else 1)
            tc = f"{per_item:.2f}"
        lines.append(
            f"| {name} | {len(rows)} | {best['epoch']} | {_f(best, 'val_accuracy')} / {_f(best, 'val_no_copy_accuracy')} "
            f"| {_f(best, 'val_mean_class_accuracy')} / {_f(best, 'val_no_copy_mean_class_accuracy')} "
            f"| {_f(rows[0], 'val_sep_ratio', '.3f')} -> {_f(before, 'val_sep_ratio', '.3f')} -> "
            f"{_f(last, 'val_sep_ratio', '.3f')} | {_f(best, 'val_sep_ratio', '.3f')} "
            f"| {_f(last, 'val_tc_hinge_met', '.3f')} | {tc} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainers.studies.daf_tc", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default="../shared/data", help="folder holding fer2013/ (default %(default)s)")
    p.add_argument("--out", default="runs/daf-tc", help="one run folder per reading under it (default %(default)s)")
    p.add_argument("--epochs", type=int, default=20, help="epochs per reading (default %(default)s)")
    p.add_argument("--only", nargs="+", choices=list(READINGS), default=list(READINGS), metavar="READING",
                   help=f"readings to train and tabulate, of: {', '.join(READINGS)}")
    p.add_argument("--table", action="store_true", help="train nothing; print the table of what is there")
    p.add_argument("extra", nargs="*", help="after --: further trainers.daf flags for every new run")
    a = p.parse_args(argv)
    out = Path(a.out)
    if not a.table:
        for name in a.only:
            rc = train(name, out, a.data_dir, a.epochs, a.extra)
            if rc:
                print(f"trainers.daf exited with {rc} for reading {name!r}; its run folder is {out / name}",
                      file=sys.stderr)
                return rc
    print(table(out, a.only))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
