"""Bad inputs through the trainers' real entry points (``python -m trainers.<method>`` as ``run(name, argv)``,
``fer eval``, ``python -m trainers.release``, ``python -m trainers.calibrate``, ``python -m trainers``): each
class of problem gives its exit status and ONE line naming the file or option and what to do, never a
Python traceback, and nothing the user had is lost (a run's best checkpoint stays byte-identical after a
refused resume; no hidden temp file is left behind).

The table ``CASES`` holds the runs that must fail: ``(id, argv builder, exit status, fragment of the one
line)``; the special classes (non-finite loss, internal error, Ctrl-C, a full disk, corrupt images, the
content-keyed cache) have their own tests below.
"""
from __future__ import annotations

import csv
import errno
import os
import shutil
from pathlib import Path

import pytest
import torch

from conftest import write_fer2013
from trainers.methods import get_method, run

COMMON = ["--batch-size", "32", "--no-tensorboard", "--bench-batches", "0", "--workers", "0"]
TINY = [*COMMON, *get_method("baseline").test_args]
PROG = "python -m trainers.baseline"


def call(fn, *args):
    """Exit status of an entry point (argparse's usage errors are SystemExit(2))."""
    try:
        return fn(*args)
    except SystemExit as exc:
        return exc.code


def one_error_line(err: str, fragment: str) -> str:
    """The single error line of ``err``: no traceback, the fragment said once."""
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1, f"expected one error line, got:\n{err}"
    assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    assert err.count(fragment) == 1, f"the message is printed more than once:\n{err}"
    return lines[0]


def no_temp_files(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob(".*.tmp")]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Fixture data (FER2013 csv, tiny) and one finished 1-epoch baseline run to resume from."""
    tmp = tmp_path_factory.mktemp("bad")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FER_DESKTOP_CACHE", str(tmp / "cache"))
        data = tmp / "data"
        write_fer2013(data / "fer2013", n_train=64, n_val=32)
        ok = tmp / "ok"
        assert run("baseline", ["--data", "fer2013", "--data-dir", str(data), "--out", str(ok), "--epochs", "1",
                                *TINY]) == 0
        assert no_temp_files(ok) == []
        yield {"tmp": tmp, "data": data, "ok": ok}


@pytest.fixture
def fresh(env, tmp_path, monkeypatch):
    monkeypatch.setenv("FER_DESKTOP_CACHE", str(env["tmp"] / "cache"))

    def train(*extra: str, data: Path | None = None, out: Path | None = None) -> list[str]:
        return ["--data", "fer2013", "--data-dir", str(data or env["data"]), "--out", str(out or tmp_path / "run"),
                "--epochs", "1", *TINY, *extra]

    def resumable(name: str = "copy") -> Path:
        dst = tmp_path / name
        shutil.copytree(env["ok"], dst)
        return dst

    return {"train": train, "resumable": resumable, "tmp": tmp_path, **env}


def _csv_rows(src: Path, dst: Path, edit) -> Path:
    rows = list(csv.reader(src.open(newline="")))
    dst.mkdir(parents=True, exist_ok=True)
    with (dst / "fer2013.csv").open("w", newline="") as fh:
        csv.writer(fh).writerows(edit(rows))
    return dst.parent


def _no_emotion(f, tmp):
    return f["train"](data=_csv_rows(f["data"] / "fer2013" / "fer2013.csv", tmp / "noemo" / "fer2013",
                                     lambda rows: [r[1:] for r in rows]))


def _short_pixels(f, tmp):
    def edit(rows):
        rows[5][1] = " ".join(rows[5][1].split()[:2000])
        return rows
    return f["train"](data=_csv_rows(f["data"] / "fer2013" / "fer2013.csv", tmp / "short" / "fer2013", edit))


def _bad_emotion(f, tmp):
    def edit(rows):
        rows[3][0] = "9"
        return rows
    return f["train"](data=_csv_rows(f["data"] / "fer2013" / "fer2013.csv", tmp / "emo9" / "fer2013", edit))


def _out_is_file(f, tmp):
    p = tmp / "a-file"
    p.write_text("keep me")
    return f["train"](out=p)


def _resume_state(content: bytes | None):
    def build(f, tmp):
        run_dir = f["resumable"]()
        if content is not None:
            (run_dir / "state.pt").write_bytes(content)
        return ["--out", str(run_dir), "--resume", "--epochs", "2"]
    return build


def _resume_damaged(f, tmp):
    run_dir = f["resumable"]()
    b = (run_dir / "state.pt").read_bytes()
    (run_dir / "state.pt").write_bytes(b[: len(b) // 2])
    return ["--out", str(run_dir), "--resume", "--epochs", "2"]


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def _resume_pickled_code(f, tmp):
    run_dir = f["resumable"]()
    torch.save({"format": "fer-desktop-train-state", "x": _Payload()}, run_dir / "state.pt")
    return ["--out", str(run_dir), "--resume", "--epochs", "2"]


def _resume_with(*flags: str):
    def build(f, tmp):
        return ["--out", str(f["resumable"]()), "--resume", "--epochs", "2", *flags]
    return build


def _resume_args_json(text: str):
    def build(f, tmp):
        run_dir = f["resumable"]()
        (run_dir / "args.json").write_text(text(run_dir / "args.json"))
        return ["--out", str(run_dir), "--resume", "--epochs", "2"]
    return build


def _lr_in_args_json(path: Path) -> str:
    import json

    d = json.loads(path.read_text())
    d["config"]["lr"] = -1
    return json.dumps(d)


# (id, argv builder (fresh, tmp) -> argv, exit status, fragment of the one error line)
CASES = [
    # out-of-range options: argparse, with ferengine.validate's message
    ("lr-nan", lambda f, t: f["train"]("--lr", "nan"), 2, "--lr must be a finite number, got 'nan'"),
    ("lr-negative", lambda f, t: f["train"]("--lr", "-1"), 2, "--lr must be >= 0, got '-1'"),
    ("batch-size-0", lambda f, t: f["train"]("--batch-size", "0"), 2, "--batch-size must be an integer >= 1"),
    ("epochs-0", lambda f, t: f["train"]("--epochs", "0"), 2, "--epochs must be an integer >= 1, got '0'"),
    ("epochs-negative", lambda f, t: f["train"]("--epochs", "-1"), 2, "--epochs must be an integer >= 1"),
    ("device-banana", lambda f, t: f["train"]("--device", "banana"), 2, "--device 'banana' is not a device"),
    ("betas-1", lambda f, t: f["train"]("--betas", "0.9", "1"), 2, "--betas must be in [0, 1)"),
    ("label-smoothing-1", lambda f, t: f["train"]("--label-smoothing", "1"), 2, "--label-smoothing must be in [0, 1)"),
    ("milestone-negative", lambda f, t: f["train"]("--milestones", "3", "-1"), 2, "--milestones must be an integer >= 0"),
    ("seed-negative", lambda f, t: f["train"]("--seed", "-1"), 2, "--seed must be an integer"),
    ("workers-text", lambda f, t: f["train"]("--workers", "two"), 2, "--workers must be an integer, got 'two'"),
    ("method-option-inf", lambda f, t: f["train"]("--va-weight", "inf"), 2, "--va-weight must be a finite number"),
    # data
    ("no-dataset", lambda f, t: f["train"](data=t / "nowhere"), 2, "expected fer2013.csv"),
    ("csv-no-emotion-column", _no_emotion, 2, "fer2013.csv line 1: expected a header with columns emotion"),
    ("csv-short-pixel-row", _short_pixels, 2, "fer2013.csv line 6: expected 2304 pixel values, found 2000"),
    ("csv-bad-emotion", _bad_emotion, 2, "fer2013.csv line 4: expected emotion 0..6, found '9'"),
    # run folder and resume
    ("out-is-a-file", _out_is_file, 2, "is a file, not a folder"),
    ("resume-nothing", lambda f, t: ["--out", str(t / "never"), "--resume"], 2, "nothing to resume"),
    ("resume-no-state", lambda f, t: (t / "empty-run").mkdir() or ["--out", str(t / "empty-run"), "--resume"], 2,
     "holds no state.pt"),
    ("resume-empty-state", _resume_state(b""), 2, "state.pt: the training state is empty"),
    ("resume-damaged-state", _resume_damaged, 2, "state.pt: not a training state this engine can load"),
    ("resume-pickled-code", _resume_pickled_code, 2, "holds Python objects (code), which are never loaded"),
    ("resume-other-width", _resume_with("--arch-kwargs", '{"width": 0.5}'), 2,
     "does not fit the model and settings built now"),
    ("resume-other-arch", _resume_with("--arch", "resnet18", "--arch-kwargs", "{}"), 2, "--arch 'fastcnn' -> 'resnet18'"),
    ("resume-damaged-args-json", _resume_args_json(lambda p: "{not json"), 2, "args.json: cannot read the run's settings"),
    ("resume-bad-lr-in-args-json", _resume_args_json(_lr_in_args_json), 2, "args.json: baseline: --lr must be >= 0"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_loses_nothing(case, fresh, capsys, monkeypatch):
    _, build, status, fragment = case
    argv = build(fresh, fresh["tmp"])
    out = Path(argv[argv.index("--out") + 1])
    before = {p: p.read_bytes() for p in (out.iterdir() if out.is_dir() else [out] if out.is_file() else [])
              if p.is_file() and p.suffix in (".safetensors", ".pt", ".csv", "") or p.name == "args.json"}
    monkeypatch.chdir(fresh["tmp"])
    capsys.readouterr()
    assert call(run, "baseline", argv) == status
    one_error_line(capsys.readouterr().err, fragment)
    for p, data in before.items():
        assert p.read_bytes() == data, f"{p} changed"
    if out.is_dir():
        assert no_temp_files(out) == []
        if not before:
            assert not (out / "best.safetensors").exists()
    assert not (fresh["tmp"] / "PWNED").exists(), "the pickled state ran code"


def test_a_method_options_are_checked_by_the_same_rule(fresh, capsys):
    """Every method's Config gets the engine's range rule with no code of its own (DAF-CNN's margin, lambda)."""
    for flag, value in (("--margin", "-1"), ("--lam", "nan"), ("--centre-lr", "-0.5"), ("--dropout", "1.5"),
                        ("--width", "0"), ("--width", "1000"), ("--embedding-dim", "0")):
        assert call(run, "daf", [*fresh["train"](), flag, value]) == 2
        one_error_line(capsys.readouterr().err, f"{flag} must be")


def test_a_diverging_run_stops_at_the_step_and_writes_no_weights(fresh, capsys):
    out = fresh["tmp"] / "diverge"
    assert run("baseline", fresh["train"]("--lr", "1e30", "--warmup-epochs", "0", out=out)) == 2
    line = one_error_line(capsys.readouterr().err, "the training loss became non-finite")
    assert "at epoch 1, step" in line and "--lr" in line
    assert not (out / "best.safetensors").exists() and not (out / "last.safetensors").exists()
    assert not (out / "state.pt").exists()


def test_a_diverging_resume_keeps_the_last_good_epoch(fresh, capsys, monkeypatch):
    from trainers.baseline import Baseline

    real = Baseline.training_step

    def nan_at_step_2(self, batch):
        logs = real(self, batch)
        if self.trainer.global_step == 3:  # epoch 2 (2 steps per epoch), its 2nd step
            logs["loss"] = logs["loss"] * float("nan")
        return logs

    monkeypatch.setattr(Baseline, "training_step", nan_at_step_2)
    run_dir = fresh["resumable"]()
    best = (run_dir / "best.safetensors").read_bytes()
    state = (run_dir / "state.pt").read_bytes()
    assert run("baseline", ["--out", str(run_dir), "--resume", "--epochs", "2"]) == 2
    line = one_error_line(capsys.readouterr().err, "the training loss became non-finite")
    assert "at epoch 2, step 2 of 2" in line
    assert "after epoch 1" in line and "nothing of epoch 2 was written" in line
    assert (run_dir / "best.safetensors").read_bytes() == best and (run_dir / "state.pt").read_bytes() == state


def test_an_internal_error_is_one_line_and_its_traceback_on_request(fresh, capsys, monkeypatch):
    from trainers.engine import loop

    def boom(self):
        raise ZeroDivisionError("simulated bug")

    monkeypatch.setattr(loop.Trainer, "fit", boom)
    assert run("baseline", fresh["train"]()) == 1
    err = capsys.readouterr().err
    line = one_error_line(err, "internal error: ZeroDivisionError: simulated bug")
    assert line.startswith(f"{PROG}: internal error:") and "--log-level DEBUG" in line and "please report it" in line
    assert run("baseline", fresh["train"]("-v", out=fresh["tmp"] / "v")) == 1
    assert "Traceback" in capsys.readouterr().err


def test_ctrl_c_says_what_was_saved_and_how_to_resume(fresh, capsys, monkeypatch):
    from trainers.engine import loop

    run_dir = fresh["resumable"]()
    real = loop.Trainer.train_one_epoch

    def interrupted(self, epoch):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop.Trainer, "train_one_epoch", interrupted)
    assert run("baseline", ["--out", str(run_dir), "--resume", "--epochs", "2"]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = [ln for ln in err.splitlines() if "interrupted" in ln]
    assert len(line) == 1 and "after epoch 1" in line[0] and f"--out {run_dir} --resume" in line[0]
    assert torch.load(run_dir / "state.pt", weights_only=True)["epoch"] == 1
    monkeypatch.setattr(loop.Trainer, "train_one_epoch", real)
    assert run("baseline", ["--out", str(run_dir), "--resume", "--epochs", "2"]) == 0


def test_a_full_disk_names_the_real_file_not_the_temp_file(fresh, capsys, monkeypatch):
    from trainers.engine import checkpointing

    def full(obj, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(path).parent / f".{Path(path).name}.x1y2.tmp"))

    monkeypatch.setattr(checkpointing.torch, "save", full)
    out = fresh["tmp"] / "full"
    assert run("baseline", fresh["train"](out=out)) == 2
    line = one_error_line(capsys.readouterr().err, f"{out / 'state.pt'}: No space left on device")
    assert ".state.pt." not in line and "x1y2" not in line


def test_truncated_images_are_skipped_with_one_warning_or_refused(fresh, capsys):
    import cv2
    import numpy as np

    root = fresh["tmp"] / "faces"
    for split in ("train", "val"):
        for c in ("happy", "sad"):
            (root / split / c).mkdir(parents=True)
            for i in range(6):
                img = np.full((48, 48), 60 + 100 * (c == "happy"), np.uint8)
                cv2.putText(img, str(i), (10, 30), cv2.FONT_HERSHEY_SIMPLEX, 1, 255, 2)
                cv2.imwrite(str(root / split / c / f"{i}.jpg"), img)
    bad = [root / "train" / "happy" / "0.jpg", root / "train" / "sad" / "3.jpg"]
    for p in bad:
        p.write_bytes(p.read_bytes()[:200])
    argv = ["--data", "folder", "--data-dir", str(root), "--out", str(fresh["tmp"] / "f"), "--epochs", "1",
            "--data-opt", "image_size=48", *TINY, "--batch-size", "4"]
    assert run("baseline", argv) == 0
    err = capsys.readouterr().err
    warn = [ln for ln in err.splitlines() if "truncated or corrupt" in ln]
    assert len(warn) == 1 and "skipping 2 of 12" in warn[0] and str(bad[0]) in warn[0], err
    # every training image truncated: refused before training, naming the files
    for p in (root / "train").rglob("*.jpg"):
        p.write_bytes(p.read_bytes()[:200])
    assert run("baseline", [*argv[:5], str(fresh["tmp"] / "g"), *argv[6:]]) == 2
    one_error_line(capsys.readouterr().err, "none of its 12 images is whole")


def test_a_corrected_file_copied_with_its_mtime_is_read_again(fresh, tmp_path, monkeypatch):
    """cp -p / rsync -a keep size and mtime: the cache is keyed on the content, so the new labels are used."""
    from trainers.data import load_dataset

    monkeypatch.setenv("FER_DESKTOP_CACHE", str(tmp_path / "c"))
    path = write_fer2013(tmp_path / "d" / "fer2013", n_train=20, n_val=4)
    first = load_dataset("fer2013", tmp_path / "d", "train").labels.clone()
    st = path.stat()
    rows = list(csv.reader(path.open(newline="")))
    for r in rows[1:]:
        r[0] = str((int(r[0]) + 1) % 7)
    with path.open("w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns
    again = load_dataset("fer2013", tmp_path / "d", "train").labels
    assert torch.equal(again, (first + 1) % 7)


def test_fer_eval_release_calibrate_and_list(fresh, capsys):
    from ferengine.cli import main as fer_main
    from ferengine.device import cuda_reason
    from trainers import __main__ as zoo
    from trainers import calibrate, release

    best = fresh["ok"] / "best.safetensors"
    data = ["--data", "fer2013", "--data-dir", str(fresh["data"]), "--split", "publictest", "-c", str(best)]
    if cuda_reason() is not None:  # this machine has no GPU: one line, before any backend is tried
        assert call(fer_main, ["eval", *data, "--device", "cuda"]) == 2
        one_error_line(capsys.readouterr().err, "device 'cuda' asked for, but no CUDA GPU")
    assert call(fer_main, ["eval", *data, "--batch-size", "0"]) == 2
    one_error_line(capsys.readouterr().err, "--batch-size must be an integer >= 1")
    nolab = _no_emotion(fresh, fresh["tmp"])
    assert call(fer_main, ["eval", *data[:2], "--data-dir", nolab[nolab.index("--data-dir") + 1], *data[4:]]) == 2
    one_error_line(capsys.readouterr().err, "fer2013.csv line 1")
    # an unwritable --json is refused before the evaluation runs (it used to fail after it)
    folder, afile = fresh["tmp"] / "a-folder", fresh["tmp"] / "a-file"
    folder.mkdir()
    afile.write_text("x")
    for bad in (folder, afile / "m.json"):
        assert call(fer_main, ["eval", *data, "--json", str(bad)]) == 2
        cap = capsys.readouterr()
        one_error_line(cap.err, f"cannot write {bad}")
        assert "accuracy" not in cap.out + cap.err, "nothing was evaluated"

    kept = best.read_bytes()
    same = str(fresh["ok"] / ".." / fresh["ok"].name / "best.safetensors")
    assert call(release.main, [str(best), "--out", same, "--name", "x"]) == 2
    one_error_line(capsys.readouterr().err, "is the checkpoint being released")
    assert best.read_bytes() == kept
    assert call(release.main, [str(best), "--out", str(fresh["tmp"] / "o.safetensors"), "--name", "x",
                               "--repeat", "0"]) == 2
    one_error_line(capsys.readouterr().err, "--repeat must be an integer >= 1")

    assert call(calibrate.main, ["--n", "0"]) == 2
    one_error_line(capsys.readouterr().err, "--n must be an integer >= 1")
    assert call(calibrate.main, ["--calibration", str(fresh["tmp"] / "none.json"), "--apply", str(best)]) == 2
    one_error_line(capsys.readouterr().err, "none.json: not a calibration.json")

    assert zoo._guarded(["--list"]) == 0
    assert "baseline:" in capsys.readouterr().out


@pytest.mark.parametrize("temp", [".state.pt.fer-4242-host.lan-k3j2.tmp", ".state.pt.k3j2x_9.tmp"])
def test_an_os_error_on_a_temp_file_names_the_real_file(temp, tmp_path):
    from trainers.engine.boundary import one_line

    line = one_line(PermissionError(errno.EACCES, "Permission denied", str(tmp_path / temp)))
    assert line.startswith(f"{tmp_path / 'state.pt'}: Permission denied") and "tmp;" not in line
    assert "check its permissions" in line


def test_resume_with_a_new_lr_trains_at_that_lr(fresh):
    """--resume --lr X: the saved optimiser state holds the old lr; the continued run must use X (it
    silently kept the old one), at the schedule's position (a step schedule's decay applies to X too)."""
    sched = ["--scheduler", "step", "--step-size", "1", "--gamma", "0.5"]
    first = fresh["tmp"] / "sched"
    assert run("baseline", fresh["train"](*sched, out=first)) == 0
    assert run("baseline", ["--out", str(first), "--resume", "--epochs", "2", "--lr", "0.02"]) == 0
    with open(first / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    lr1 = float(rows[0]["lr"])
    assert float(rows[1]["lr"]) == pytest.approx(0.02 * 0.5), f"epoch 1 ran at {lr1}; epoch 2 must run at 0.02 x 0.5"
