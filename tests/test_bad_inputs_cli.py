"""A catalogue of bad inputs, each run through the real entry point (``fer``: ``ferengine.cli.main`` in-process,
or ``python -m ferengine.cli`` in a subprocess with a timeout for crashes, hangs and signals).

Every case asserts the exit status, ONE line naming the file or option (no traceback), and, where a previous
complete result exists, that it is byte-identical afterwards. Classes (issue #13):

- options out of range: refused by argparse with ferengine.validate's message, before any work;
- outputs: a folder, a missing or read-only folder, a file used as a folder, a full disk - refused before
  the work; devices and links written through (never replaced by a regular file);
- lost or clobbered data: an interrupted or failed ``fer analyze`` keeps its rows as NAME.partial.csv and
  never touches NAME.csv; temp files of killed writers are cleaned (a live writer's never);
- crashes and hangs: a video whose name is not UTF-8 (OpenCV segfaulted), a FIFO as the video (blocked);
- tracebacks: an unusable cache folder, OS errors, multi-line library errors, bugs (one 'internal error' line);
- smaller: ``fer predict``'s exit status, ``fer info`` failing like ``predict``, ``--opset`` honoured.
"""
from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from ferengine import cli
from ferengine.cli import main
from ferengine.results import csv_columns

from conftest import make_checkpoint, synth_frame, SYNTH_FPS, SYNTH_FRAMES, SYNTH_SIZE

OLD = b"frame,time_s,face_id\n0,0,1\n"  # "a previous complete result"
FAST_EXPORT = ["--opset", "17"]  # the TorchScript exporter: ~1 s instead of dynamo's ~5 s (the exporter is not what these test)
NATIVE_NOISE = ("W0000", "I0000", "WARNING: Logging before InitGoogle", "INFO: Created TensorFlow")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A random-init fastcnn: these cases are about files and options, not predictions."""
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "fastcnn.safetensors")


@pytest.fixture(scope="module")
def long_video(tmp_path_factory) -> Path:
    """A synthetic .avi long enough (6000 frames, several seconds of work) to interrupt a run halfway."""
    path = tmp_path_factory.mktemp("long") / "long.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), SYNTH_FPS, SYNTH_SIZE)
    frames = [synth_frame(i) for i in range(20)]
    for i in range(6000):
        writer.write(frames[i % 20])
    writer.release()
    return path


def fer(argv, capsys) -> tuple[int, str, str]:
    """``fer ARGV`` in-process: (exit status, stdout, stderr); argparse's exit counts as a status."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def fer_subprocess(argv, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "ferengine.cli", *[a if isinstance(a, bytes) else str(a) for a in argv]]
    return subprocess.run(args, capture_output=True, timeout=timeout, **kwargs)


def our_lines(err: str) -> list[str]:
    """stderr without the native libraries' own log lines (MediaPipe/LiteRT write to fd 2 themselves)."""
    return [ln for ln in err.splitlines() if ln.strip() and not ln.startswith(NATIVE_NOISE)]


def one_error_line(err: str, *fragments: str) -> str:
    assert "Traceback" not in err, err
    errors = [ln for ln in our_lines(err) if "error:" in ln]
    assert len(errors) == 1, err
    for f in fragments:
        assert f in errors[0], (f, errors[0])
    return errors[0]


def old_result(tmp_path: Path, name: str = "results.csv") -> Path:
    p = tmp_path / name
    p.write_bytes(OLD)
    return p


def no_hidden_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ------------------------------------------------------------------------------ options (argparse)

OPTION_CASES = [
    # (command, extra argv, option, message)
    ("analyze", ["--min-confidence", "2"], "--min-confidence", "min_confidence must be in (0, 1], got '2'"),
    ("analyze", ["--min-confidence", "-0.5"], "--min-confidence", "min_confidence must be in (0, 1], got '-0.5'"),
    ("analyze", ["--min-confidence", "nan"], "--min-confidence", "min_confidence must be a finite number, got 'nan'"),
    ("analyze", ["--min-confidence", "0"], "--min-confidence", "min_confidence must be in (0, 1], got '0'"),
    ("predict", ["--min-confidence", "0"], "--min-confidence", "min_confidence must be in (0, 1], got '0'"),
    ("analyze", ["--max-faces", "-1"], "--max-faces", "max_faces must be an integer >= 0 (0 = unlimited), got '-1'"),
    ("analyze", ["--smoothing", "5"], "--smoothing", "smoothing must be in [0, 1) (0 = off), got '5'"),
    ("analyze", ["--smoothing", "-0.1"], "--smoothing", "smoothing must be in [0, 1) (0 = off), got '-0.1'"),
    ("analyze", ["--max-frames", "-5"], "--max-frames",
     "max_frames must be an integer >= 0 (0 = the whole video), got '-5'"),
    ("analyze", ["--device", "banana"], "--device", "device 'banana' is not a device"),
    ("predict", ["--device", "banana"], "--device", "device 'banana' is not a device"),
    ("export", ["--max-batch", "0"], "--max-batch", "max_batch must be an integer from 1 to 65536, got '0'"),
    ("export", ["--opset", "3"], "--opset", "opset must be an integer from 7 to "),
    ("export", ["--opset", "999"], "--opset", "opset must be an integer from 7 to "),
    ("export", ["--opset", "nonsense"], "--opset", "opset must be an integer, got 'nonsense'"),
]


@pytest.mark.parametrize("command, extra, option, message", OPTION_CASES,
                         ids=[f"{c}{' '.join(e)}" for c, e, _, _ in OPTION_CASES])
def test_option_out_of_range_fails_in_argparse(command, extra, option, message, tmp_path, synthetic_video,
                                               monkeypatch, capsys):
    monkeypatch.setattr(cli, "_load", lambda *a, **k: pytest.fail("the work started"))
    out = old_result(tmp_path)
    argv = {"analyze": ["analyze", synthetic_video, "--out", out],
            "predict": ["predict", synthetic_video],
            "export": ["export", "--format", "onnx", "--out", out]}[command] + extra
    code, stdout, err = fer(argv, capsys)
    assert code == 2 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"fer {command}: error: argument {option}: ") and message in last, last
    assert out.read_bytes() == OLD and no_hidden_files(tmp_path) == []


# ------------------------------------------------------------------------------------- outputs

def _read_only_folder() -> Path | None:
    """A folder no one can create files in, also as root (sysfs)."""
    p = Path("/sys")
    if not p.is_dir():
        return None
    try:
        (p / "fer-probe").touch()
    except OSError:
        return p
    return None  # pragma: no cover


OUTPUT_CASES = [
    # (id, how to make --out in tmp, message fragments)
    ("folder", lambda t: (t / "outdir").mkdir() or t / "outdir", ["outdir: it is a folder, not a file"]),
    ("missing-folder", lambda t: t / "nope" / "r.csv", ["nope/r.csv: the folder", "nope does not exist"]),
    ("file-as-folder", lambda t: (t / "notes.txt").write_text("x") and t / "notes.txt" / "r.csv",
     ["notes.txt/r.csv: ", "notes.txt is a file, not a folder"]),
    ("read-only-folder", lambda t: _read_only_folder() / "r.csv", ["/sys/r.csv", "is not writable"]),
]


@pytest.mark.parametrize("case, make, fragments", OUTPUT_CASES, ids=[c[0] for c in OUTPUT_CASES])
@pytest.mark.parametrize("command", ["analyze", "export"])
def test_bad_output_is_refused_before_the_work(command, case, make, fragments, tmp_path, synthetic_video, ckpt,
                                               monkeypatch, capsys):
    if case == "read-only-folder" and _read_only_folder() is None:
        pytest.skip("no read-only folder here")
    out = make(tmp_path)
    if command == "analyze":  # the output is checked before the model is even loaded
        monkeypatch.setattr(cli, "_load", lambda *a, **k: pytest.fail("the work started before --out was checked"))
        argv = ["analyze", synthetic_video, "-c", ckpt, "--out", out, "-q"]
    elif case == "missing-folder":  # exports make their folder, as every atomic writer does
        code, _, err = fer(["export", "--format", "onnx", "-c", ckpt, "--out", out, *FAST_EXPORT], capsys)
        assert code == 0 and out.is_file(), err
        return
    else:  # the export must not run when its result cannot be written
        import ferengine.export

        monkeypatch.setattr(ferengine.export, "export_onnx", lambda *a, **k: pytest.fail("exported before --out was checked"))
        argv = ["export", "--format", "onnx", "-c", ckpt, "--out", out]
    code, _, err = fer(argv, capsys)
    assert code == 2, err
    line = one_error_line(err, "fer: error: cannot write ", *fragments)
    assert ".fer-" not in line and ".tmp" not in line and ".part" not in line


def test_full_disk_is_one_line_naming_the_output(tmp_path, synthetic_video, ckpt, capsys):
    """/dev/full: every write fails with ENOSPC. The analysis stops at the CSV header (before any frame) and the
    export fails writing, each with one line naming /dev/full; /dev/full stays the device it was."""
    code, _, err = fer(["analyze", synthetic_video, "-c", ckpt, "--out", "/dev/full", "-q"], capsys)
    assert code == 2
    one_error_line(err, "fer: error: cannot write /dev/full: No space left on device")
    code, _, err = fer(["export", "--format", "onnx", "-c", ckpt, "--out", "/dev/full", *FAST_EXPORT], capsys)
    assert code == 2
    one_error_line(err, "fer: error: cannot write /dev/full: No space left on device")
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode)


def test_disk_full_mid_export_names_the_output_not_the_temp_file(tmp_path, ckpt, monkeypatch, capsys):
    out = old_result(tmp_path, "model.onnx")

    def full(self, data):
        raise OSError(28, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_bytes", full)
    code, _, err = fer(["export", "--format", "onnx", "-c", ckpt, "--out", out, *FAST_EXPORT], capsys)
    monkeypatch.undo()
    assert code == 2
    line = one_error_line(err, f"fer: error: cannot write {out}: No space left on device")
    assert ".fer-" not in line and ".tmp" not in line
    assert out.read_bytes() == OLD and no_hidden_files(tmp_path) == []


def test_devices_and_links_are_written_through(tmp_path, synthetic_video, ckpt, capsys):
    header = ",".join(csv_columns(list(__import__("ferengine.labels", fromlist=["x"]).LABEL_SETS["fer7"]))) + "\n"
    # /dev/null stays a device
    code, _, err = fer(["analyze", synthetic_video, "-c", ckpt, "--out", "/dev/null", "-q"], capsys)
    assert code == 0, err
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    # a link to a file: the file is replaced, the link stays a link
    real = old_result(tmp_path, "real.csv")
    link = tmp_path / "link.csv"
    link.symlink_to("real.csv")
    code, _, err = fer(["analyze", synthetic_video, "-c", ckpt, "--out", link, "-q"], capsys)
    assert code == 0, err
    assert link.is_symlink() and os.readlink(link) == "real.csv" and real.read_text() == header
    # a dangling link: its target is created
    dangling = tmp_path / "dangling.csv"
    dangling.symlink_to(tmp_path / "new.csv")
    code, _, err = fer(["analyze", synthetic_video, "-c", ckpt, "--out", dangling, "-q"], capsys)
    assert code == 0, err
    assert dangling.is_symlink() and (tmp_path / "new.csv").read_text() == header
    # an export through a link
    onnx_real, onnx_link = tmp_path / "m.onnx", tmp_path / "latest.onnx"
    onnx_real.write_bytes(OLD)
    onnx_link.symlink_to(onnx_real)
    code, _, err = fer(["export", "--format", "onnx", "-c", ckpt, "--out", onnx_link, *FAST_EXPORT], capsys)
    assert code == 0, err
    assert onnx_link.is_symlink() and onnx_real.stat().st_size > 10_000
    assert no_hidden_files(tmp_path) == []


# ------------------------------------------------------------------------------ lost or clobbered data

def test_failure_halfway_keeps_a_partial_file_and_the_previous_result(tmp_path, synthetic_video, ckpt, monkeypatch,
                                                                         capsys):
    from ferengine.errors import SourceError
    from ferengine.pipeline import Pipeline

    out = old_result(tmp_path)
    real = Pipeline.process

    def process(self, image, index=0, time_s=0.0):
        if index == 5:
            raise SourceError(f"{synthetic_video}: decoding failed at frame 5")
        return real(self, image, index, time_s)

    monkeypatch.setattr(Pipeline, "process", process)
    code, _, err = fer(["analyze", synthetic_video, "-c", ckpt, "--out", out, "-q"], capsys)
    assert code == 2
    one_error_line(err, "fer: error: ", "decoding failed at frame 5")
    partial_line = [ln for ln in our_lines(err) if "PARTIAL RESULT" in ln]
    assert len(partial_line) == 1 and "after 5 frames" in partial_line[0] and "results.partial.csv" in partial_line[0]
    assert out.read_bytes() == OLD
    assert (tmp_path / "results.partial.csv").read_text().startswith("frame,time_s,face_id")
    assert no_hidden_files(tmp_path) == []


def _wait_for(pattern: str, folder: Path, proc: subprocess.Popen, timeout: float = 120) -> Path:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        hits = sorted(folder.glob(pattern))
        if hits:
            return hits[0]
        if proc.poll() is not None:
            pytest.fail(f"fer ended ({proc.returncode}) before writing: {proc.stderr.read()[-3000:]}")
        time.sleep(0.02)
    proc.kill()
    pytest.fail("fer did not start writing")


def test_ctrl_c_halfway_never_replaces_the_previous_result(tmp_path, long_video, ckpt):
    """SIGINT to a real ``fer analyze`` (a subprocess) halfway: it used to rename the partial file over the
    previous complete results.csv."""
    out = old_result(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "ferengine.cli", "analyze", str(long_video), "-c", str(ckpt),
                             "--out", str(out), "-q", "--backend", "torch"], stderr=subprocess.PIPE, text=True)
    _wait_for(".results.csv.fer-*.part", tmp_path, proc)
    time.sleep(0.5)  # some frames in (the synthetic frames have no face: the rows stay empty)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    lines = our_lines(err)
    assert lines[-1] == "fer: interrupted"
    (loud,) = [ln for ln in lines if "PARTIAL RESULT" in ln]
    frames = int(re.search(r"after (\d+) frames", loud).group(1))
    assert 0 < frames < 6000 and "results.partial.csv" in loud and "NOT in" in loud
    assert out.read_bytes() == OLD  # byte-identical
    assert (tmp_path / "results.partial.csv").read_text().startswith("frame,time_s,face_id")
    assert no_hidden_files(tmp_path) == []


def test_sigterm_halfway_finishes_like_ctrl_c(tmp_path, synthetic_video, ckpt, monkeypatch, capsys):
    """A real SIGTERM to this process while fer analyze runs in it (fer installs its handler for the run)."""
    from ferengine.pipeline import Pipeline

    out = old_result(tmp_path)
    real = Pipeline.process

    def process(self, image, index=0, time_s=0.0):
        if index == 4:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # the handler runs here, in the main thread
        return real(self, image, index, time_s)

    monkeypatch.setattr(Pipeline, "process", process)
    before = signal.getsignal(signal.SIGTERM)
    code, _, err = fer(["analyze", synthetic_video, "-c", ckpt, "--out", out, "-q"], capsys)
    assert code == 143 and "Traceback" not in err
    lines = our_lines(err)
    assert lines[-1] == "fer: terminated (SIGTERM)" and "after 4 frames" in lines[-2]
    assert out.read_bytes() == OLD and (tmp_path / "results.partial.csv").is_file()
    assert signal.getsignal(signal.SIGTERM) == before  # put back


def test_killed_writer_leaves_temp_that_the_next_run_keeps_as_partial(tmp_path, long_video, synthetic_video, ckpt,
                                                                       capsys):
    out = old_result(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "ferengine.cli", "analyze", str(long_video), "-c", str(ckpt),
                             "--out", str(out), "-q", "--backend", "torch"], stderr=subprocess.PIPE, text=True)
    part = _wait_for(".results.csv.fer-*.part", tmp_path, proc)
    time.sleep(0.3)
    proc.kill()  # SIGKILL: nothing of ours runs
    proc.communicate(timeout=60)
    assert part.exists() and out.read_bytes() == OLD
    rows_left = part.read_text()
    # a live writer's temp file of the same target (this very test process) must survive the next run
    live = tmp_path / f".results.csv.fer-{os.getpid()}-{part.name.split('-')[2]}-0123abcd.part"
    live.write_text("live\n")
    code, _, err = fer(["analyze", synthetic_video, "-c", ckpt, "--out", out, "-q", "--max-frames", "3"], capsys)
    assert code == 0, err
    assert not part.exists() and (tmp_path / "results.partial.csv").read_text() == rows_left
    assert live.exists() and out.read_text().startswith("frame,time_s,face_id")
    assert no_hidden_files(tmp_path) == [live.name]


def test_killed_trainer_temp_files_are_removed_by_the_next_atomic_write(tmp_path):
    """trainers write checkpoints with ferengine.fileio.atomic_write; a killed one leaves .tmp files."""
    from ferengine.fileio import atomic_write_bytes, temp_path

    target = tmp_path / "last.pt"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    host = temp_path(target).name.split("-")[2]
    stale = tmp_path / f".last.pt.fer-{dead}-{host}-00000001.tmp"
    live = tmp_path / f".last.pt.fer-{os.getppid()}-{host}-00000002.tmp"
    other = tmp_path / ".best.pt.fer-1-00000000-00000003.tmp"  # another target's: not ours to judge
    for p in (stale, live, other):
        p.write_bytes(b"half a checkpoint")
    atomic_write_bytes(target, b"weights")
    assert target.read_bytes() == b"weights"
    assert not stale.exists() and live.exists() and other.exists()


# ------------------------------------------------------------------------------ crashes and hangs

# runs fer's main() for each case in ONE subprocess (a crash kills it, a hang runs into the timeout: neither
# can take pytest down); fd 1 can be redirected to a file for a case
DRIVER = """
import json, os, sys
from ferengine.cli import main
for name, argv, stdout_to in json.loads(sys.argv[1]):
    saved = None
    if stdout_to:
        sys.stdout.flush()
        saved = os.dup(1)
        fd = os.open(stdout_to, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.close(fd)
    print("=== " + name, file=sys.stderr, flush=True)
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    if saved is not None:
        sys.stdout.flush()
        os.dup2(saved, 1)
    print("=== " + name + " exit " + str(code), file=sys.stderr, flush=True)
"""


def test_crash_and_hang_cases(tmp_path, synthetic_video, ckpt):
    """- a video whose name is not UTF-8: cv2.VideoCapture segfaulted (the process died with -11);
    - --out /dev/stdout with stdout redirected to a file: the rows go down the stream (as root the output
      rule used to replace the target by a regular file);
    - a FIFO as the video: OpenCV blocked on it forever; now one line, exit 2, before any work."""
    import json

    latin1 = os.fsencode(tmp_path) + b"/caf\xe9-\xff.avi"  # latin-1 bytes: not UTF-8
    with open(latin1, "wb") as fh:
        fh.write(synthetic_video.read_bytes())
    fifo = tmp_path / "stream.mp4"
    os.mkfifo(fifo)
    old = old_result(tmp_path)
    common = ["-c", str(ckpt), "-q", "--backend", "torch"]
    cases = [
        ["not-utf8", ["analyze", os.fsdecode(latin1), "--out", str(tmp_path / "r.csv"), *common], None],
        ["stdout", ["analyze", str(synthetic_video), "--out", "/dev/stdout", *common], str(tmp_path / "captured.csv")],
        ["fifo", ["analyze", str(fifo), "--out", str(old), *common], None],
    ]
    try:
        run = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(cases)], capture_output=True, timeout=240)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"fer hung: {(exc.stderr or b'').decode(errors='replace')[-2000:]}")
    err = run.stderr.decode("utf-8", "replace")
    assert run.returncode == 0, f"fer crashed ({run.returncode}): {err[-3000:]}"
    parts = {n: (body, code) for n, body, code in re.findall(r"^=== (\S+)\n(.*?)^=== \1 exit (\S+)$", err, re.S | re.M)}
    assert set(parts) == {"not-utf8", "stdout", "fifo"}, err[-3000:]

    body, code = parts["not-utf8"]
    assert code == "0" and f"{SYNTH_FRAMES} frames" in body, body
    assert (tmp_path / "r.csv").read_text().startswith("frame,time_s")

    body, code = parts["stdout"]
    assert code == "0", body
    assert (tmp_path / "captured.csv").read_text().startswith("frame,time_s,face_id")
    assert os.path.islink("/dev/stdout") or stat.S_ISCHR(os.stat("/dev/stdout").st_mode)

    body, code = parts["fifo"]
    assert code == "2", body
    one_error_line(body, f"fer: error: {fifo}: is a FIFO (named pipe), not a video file")
    assert old.read_bytes() == OLD


@pytest.mark.parametrize("path", ["/dev/zero", "/dev/null"])
def test_device_as_video_is_refused(path, tmp_path, ckpt, capsys):
    code, _, err = fer(["analyze", path, "-c", ckpt, "--out", tmp_path / "r.csv", "-q"], capsys)
    assert code == 2
    one_error_line(err, f"fer: error: {path}: is a character device, not a video file")


# ------------------------------------------------------------------------------ tracebacks

def test_unusable_home_falls_back_to_a_temp_cache_with_one_warning(tmp_path, ckpt, monkeypatch, capsys, caplog):
    """Every fer predict died creating ~/.cache/fer-desktop/onnx when HOME was not writable."""
    import ferengine.export

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.delenv("FER_DESKTOP_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(blocker))
    monkeypatch.setattr(ferengine.export, "_FALLBACK_CACHES", {})
    img = tmp_path / "grey.png"
    cv2.imwrite(str(img), np.full((64, 64, 3), 128, np.uint8))
    code, out, err = fer(["predict", img, "-c", ckpt, "--backend", "onnxruntime", "--json"], capsys)
    assert code == 0, err
    assert "Traceback" not in err and '"images"' in out
    # the warning goes through logging (fer's handler prints it as "fer: ..."; pytest's captures it here)
    (warning,) = [r.getMessage() for r in caplog.records if r.name.startswith("ferengine") and "cache" in r.getMessage()]
    assert "~/.cache" in warning and "temporary folder" in warning and "FER_DESKTOP_CACHE" in warning
    assert "\n" not in warning


def test_unwritable_cache_variable_falls_back_once(tmp_path, monkeypatch, caplog):
    import ferengine.export as ex

    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv("FER_DESKTOP_CACHE", str(blocker / "cache"))
    monkeypatch.setattr(ex, "_FALLBACK_CACHES", {})
    a, b, c = ex.writable_cache_dir("onnx"), ex.writable_cache_dir("onnx"), ex.writable_cache_dir("tensorrt")
    assert a == b and a.is_dir() and c.is_dir() and a != c and not str(a).startswith(str(blocker))
    assert len([r for r in caplog.records if r.name.startswith("ferengine") and "cache" in r.getMessage()]) == 1


BOUNDARY_CASES = [
    # (exception raised inside a command, exit status, the line)
    (PermissionError(13, "Permission denied", "/srv/x.onnx"), 2, "fer: error: /srv/x.onnx: Permission denied"),
    (OSError(28, "No space left on device"), 2, "fer: error: No space left on device"),
    (__import__("ferengine.errors", fromlist=["x"]).ExportError("cannot export 'x':\n  torch said\n  many lines"), 2,
     "fer: error: cannot export 'x': torch said many lines"),
    (ZeroDivisionError("division by zero"), 1,
     "fer: internal error: ZeroDivisionError: division by zero (run with -v for the traceback; please report it)"),
]


@pytest.mark.parametrize("exc, status, line", BOUNDARY_CASES, ids=[type(c[0]).__name__ for c in BOUNDARY_CASES])
def test_error_boundary_gives_one_line(exc, status, line, monkeypatch, capsys):
    import ferengine.backends

    def boom():
        raise exc

    monkeypatch.setattr(ferengine.backends, "available_backends", boom)
    code, _, err = fer(["backends"], capsys)
    assert code == status and err.strip() == line
    code, _, err = fer(["-v", "backends"], capsys)  # -v: the traceback as well, then the same line
    assert code == status and "Traceback" in err and err.strip().splitlines()[-1].startswith(line.split(" (run")[0])


# ------------------------------------------------------------------------------ smaller

def _images(folder: Path, good: int, bad: int) -> Path:
    folder.mkdir()
    for i in range(good):
        cv2.imwrite(str(folder / f"ok{i}.png"), np.full((64, 64, 3), 100, np.uint8))
    for i in range(bad):
        (folder / f"bad{i}.jpg").write_bytes(b"not a jpeg")
    return folder


@pytest.mark.parametrize("good, bad, status", [(2, 0, 0), (1, 2, 1), (0, 2, 2)])
def test_predict_exit_status_says_how_many_images_failed(good, bad, status, tmp_path, ckpt, capsys):
    folder = _images(tmp_path / "imgs", good, bad)
    code, out, err = fer(["predict", folder, "-c", ckpt, "--backend", "torch"], capsys)
    assert code == status, err
    warnings = [ln for ln in our_lines(err) if ln.startswith("fer: warning:")]
    assert len(warnings) == bad and all("cannot decode" in w and "bad" in w for w in warnings)
    if status == 2:
        one_error_line(err, "fer: error: none of the 2 images in", "could be read")
    assert "Traceback" not in err


def test_single_unreadable_image_is_one_line(tmp_path, ckpt, monkeypatch, capsys):
    bad = tmp_path / "photo.jpg"
    bad.write_bytes(b"not a jpeg")
    monkeypatch.setattr(cli, "_load", lambda *a, **k: pytest.fail("the model was loaded for an unreadable image"))
    code, _, err = fer(["predict", bad, "-c", ckpt], capsys)
    assert code == 2 and err.strip() == f"fer: error: cannot decode {bad}: not an image OpenCV can read, or damaged"


def test_info_refuses_what_predict_refuses(tmp_path, ckpt, capsys):
    """fer info used to read the metadata only and exit 0 for checkpoints that predict then refused."""
    import ferengine.checkpoint as ck

    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size - 1000])  # metadata intact, weights cut short
    img = tmp_path / "grey.png"
    cv2.imwrite(str(img), np.full((64, 64, 3), 128, np.uint8))
    code_p, _, err_p = fer(["predict", img, "-c", cut], capsys)
    code_i, out_i, err_i = fer(["info", cut], capsys)
    assert code_p == code_i == 2 and out_i == ""
    assert one_error_line(err_i, "fer: error: ", "cut.safetensors") == one_error_line(err_p)
    calls = []
    real = ck.load
    try:  # and it is the very load predict uses
        ck.load = lambda *a, **k: calls.append(a) or real(*a, **k)
        assert fer(["info", ckpt], capsys)[0] == 0 and calls
    finally:
        ck.load = real


def test_export_writes_the_opset_asked_for(tmp_path, ckpt, capsys):
    """--opset 13 used to be ignored (the dynamo exporter writes >= 18) while fer reported success."""
    import onnx

    out = tmp_path / "m13.onnx"
    code, _, err = fer(["export", "--format", "onnx", "-c", ckpt, "--out", out, "--opset", "13"], capsys)
    assert code == 0, err
    model = onnx.load(str(out))
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [13]
    assert f"wrote {out} (ONNX opset 13)" in err


def test_result_fields_are_not_overwritten_by_class_names():
    """A class called 'score' would silently replace the detector's score in the JSON rows."""
    from ferengine.errors import InvalidValue
    from ferengine.pipeline import FaceResult, FrameResult
    from ferengine.results import frame_result_to_dicts

    labels = ("score", "happy")
    face = FaceResult(1, (1.0, 2.0, 3.0, 4.0), 0.9, np.zeros((6, 2), np.float32), np.array([0.2, 0.8], np.float32),
                      "happy", 0.8, 0.1, 0.2, "estimated")
    with pytest.raises(InvalidValue, match=r"\['score'\] are also the names of result fields"):
        frame_result_to_dicts(FrameResult(0, 0.0, [face], {}, labels))


def test_title_lettering_is_not_a_face(media_dir, ckpt, tmp_path, capsys):
    """The short-range detector scored the title lettering of this cartoon 0.51-0.61 (above the default 0.5):
    fer analyze wrote 4 'face' rows for a video without a human face. The keypoint check drops them."""
    out = tmp_path / "r.csv"
    video = media_dir / "videos" / "pyfeat_no_face.mp4"
    code, _, err = fer(["analyze", video, "-c", ckpt, "--out", out, "-q", "--backend", "torch"], capsys)
    assert code == 0, err
    assert len(out.read_text().splitlines()) == 1  # the header only
    assert "95 frames, 0 face rows" in err


def test_keypoint_check_numbers():
    from ferengine.faces import MAX_ROLL_DEG, TILTED_MIN_SCORE, eye_line_roll, plausible_face

    level = np.array([[100, 100], [160, 100], [130, 130], [130, 150], [80, 110], [180, 110]], np.float32)
    steep = np.array([[100, 100], [110, 160], [130, 130], [130, 150], [80, 110], [180, 110]], np.float32)  # 80.5 deg
    assert eye_line_roll(level) == 0 and eye_line_roll(steep) == pytest.approx(80.54, abs=0.01)
    assert plausible_face(level, 0.5) and not plausible_face(steep, 0.61) and plausible_face(steep, TILTED_MIN_SCORE)
    assert MAX_ROLL_DEG == 45 and TILTED_MIN_SCORE == 0.75
