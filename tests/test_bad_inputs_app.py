"""The catalogue of bad inputs to ``fer-desktop``, each run through the real entry point (``python -m app`` in a
subprocess, as a user would start it): a table of cases, each the arguments (and environment), the exit status
and a fragment of the one line that must say what is wrong. Every case also asserts what must never happen:
a Python traceback, Qt's "QThread: Destroyed while thread ... is still running" abort, death by a signal
(segfault, abort), a hang (every run has a timeout).

Three kinds of case, by where the error arises:

* ``OPTION_CASES``: a bad option or a path that is not there fails in argparse (or, for the display and a
  missing CUDA device, just after it), before any Qt object or thread exists: exit 2, fast;
* ``RUN_CASES``: an input that is only found bad by opening it (a text file as a video, an empty folder, a
  garbage or NaN checkpoint, a FIFO, an absent camera) in ``--screenshot`` mode: the window shows it, the PNG
  is still written, one line per failure, exit 2; a name that is not valid UTF-8 plays (it is a good video);
* ``LIVE_CASES``: the same inputs in an interactive session: the window shows the error and the application
  keeps running (it is alive after the failure was reported) until Ctrl+C (exit 130) or SIGTERM (143).

What cannot be made to happen from outside (a bug in a Qt slot, a capture thread that never stops, an
exception after the window exists) is in tests/test_app.py, through :func:`app.main.main` in-process.
"""
from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = ("Traceback", "QThread: Destroyed", "Fatal Python error", "Aborted", "core dumped")
ERROR = "fer-desktop: error: "


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, str]:
    """The bad (and one odd but good) inputs, by placeholder name."""
    d = tmp_path_factory.mktemp("bad_inputs_app")
    text = d / "notes.txt"
    text.write_text("this is not a video\n")
    empty = d / "empty_folder"
    empty.mkdir()
    garbage = d / "garbage.safetensors"
    garbage.write_bytes(b"this is not a checkpoint" * 10)
    fifo = d / "pipe.mp4"
    os.mkfifo(fifo)
    paths = {"TEXT": str(text), "EMPTY": str(empty), "GARBAGE": str(garbage), "FIFO": str(fifo),
             "DIR": str(d), "MISSING": str(d / "missing.mp4"),
             "SETTINGS": str(d / "settings.ini"), "CACHE": str(d / "cache")}
    paths["NAN"] = str(_nan_checkpoint(d / "nan.safetensors"))
    media = Path(os.environ.get("FER_TEST_MEDIA") or ROOT.parent / "shared" / "data" / "media")
    face = media / "videos" / "pyfeat_single_face.mp4"
    if face.is_file():
        odd = d / os.fsdecode(b"caf\xe9 \xff.mp4")  # not valid UTF-8 (surrogate-escaped on the command line)
        shutil.copyfile(face, odd)
        paths["NONUTF8"] = odd
    return paths


def _nan_checkpoint(path: Path) -> Path:
    """The shipped model with one weight tensor full of NaN (it would show "angry nan%")."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    src = ROOT / "assets" / "models" / "default.safetensors"
    if not src.is_file():
        pytest.skip(f"{src} not found")
    with safe_open(str(src), "pt") as fh:
        meta = fh.metadata()
        state = {k: fh.get_tensor(k) for k in fh.keys()}
    name = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 16)
    state[name] = torch.full_like(state[name], float("nan"))
    save_file(state, str(path), metadata=meta)
    return path


def _env(inputs, **changes) -> dict[str, str]:
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen", "PYQTGRAPH_QT_LIB": "PySide6",
           "FER_DESKTOP_SETTINGS": inputs["SETTINGS"], "FER_DESKTOP_CACHE": inputs["CACHE"]}
    for k, v in changes.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


def _args(template: list[str], inputs) -> list[str]:
    out = []
    for a in template:
        for key, value in inputs.items():
            a = a.replace(f"<{key}>", str(value))
        out.append(a)
    return out


def _check_clean(proc_rc: int, err: str) -> None:
    assert proc_rc >= 0, f"killed by signal {-proc_rc}:\n{err[-3000:]}"
    for bad in FORBIDDEN:
        assert bad not in err, f"{bad!r} on stderr:\n{err[-3000:]}"


def _one_line(err: str, fragment: str) -> str:
    lines = [line for line in err.splitlines() if fragment in line]
    assert len(lines) == 1, f"{fragment!r} should be said on exactly one line, got {len(lines)}:\n{err[-3000:]}"
    return lines[0]


# ------------------------------------------------------------------- options (before any Qt object)

NO_DISPLAY_ENV = {"DISPLAY": None, "WAYLAND_DISPLAY": None, "QT_QPA_PLATFORM": None}

#  id, arguments, environment changes, fragment of the one error line
OPTION_CASES = [
    ("size-word", ["--size", "huge"], {}, "argument --size: size must be WIDTHxHEIGHT in pixels (e.g. 1400x860)"),
    ("size-too-small", ["--size", "100x100"], {}, "argument --size: size must be from 400x300 to 8192x8192"),
    ("size-too-big", ["--size", "99999x800"], {}, "argument --size: size must be from 400x300 to 8192x8192"),
    ("size-negative", ["--size=-5x300"], {}, "argument --size: size must be"),
    ("frames-zero", ["--frames", "0"], {}, "argument --frames: frames must be an integer >= 1, got '0'"),
    ("frames-word", ["--frames", "many"], {}, "argument --frames: frames must be an integer, got 'many'"),
    ("timeout-negative", ["--timeout", "-1"], {}, "argument --timeout: timeout must be in (0, "),
    ("timeout-nan", ["--timeout", "nan"], {}, "argument --timeout: timeout must be a finite number"),
    ("timeout-too-long", ["--timeout", "1e12"], {}, "argument --timeout: timeout must be in (0, "),
    ("camera-negative", ["--camera", "-1"], {}, "argument --camera: camera must be an integer from 0 to 255"),
    ("camera-word", ["--camera", "front"], {}, "argument --camera: camera must be an integer, got 'front'"),
    ("device-unknown", ["--device", "tpu"], {}, "argument --device: device 'tpu' is not a device: use 'auto'"),
    ("device-absent", ["--device", "cuda:7"], {}, "fer-desktop: error: --device cuda:7: "),
    ("log-level", ["--log-level", "LOUD"], {}, "argument --log-level: log level must be one of DEBUG, INFO"),
    ("backend", ["--backend", "fastest"], {}, "argument --backend: invalid choice: 'fastest'"),
    ("detector", ["--detector", "tiny"], {}, "argument --detector: invalid choice: 'tiny'"),
    ("two-sources", ["--camera", "0", "--video", "<TEXT>"], {}, "not allowed with argument"),
    ("video-missing", ["--video", "<MISSING>"], {}, "argument --video: <MISSING>: no such file"),
    ("video-is-a-folder", ["--video", "<DIR>"], {}, "is a folder; use --folder for a folder of images"),
    ("folder-missing", ["--folder", "<MISSING>"], {}, "argument --folder: <MISSING>: no such folder"),
    ("folder-is-a-file", ["--folder", "<TEXT>"], {}, "not a folder; use --video for a video file"),
    ("checkpoint-missing", ["--checkpoint", "<MISSING>"], {}, "<MISSING>: no such file; give a checkpoint file"),
    ("checkpoint-is-a-folder", ["--checkpoint", "<DIR>"], {}, "is a folder; give a checkpoint file"),
    ("screenshot-is-a-folder", ["--screenshot", "<DIR>"], {}, "is a folder; give a file name such as shot.png"),
    ("screenshot-under-a-file", ["--screenshot", "<TEXT>/shot.png"], {}, "is not a folder"),
    ("unknown-option", ["--colour", "red"], {}, "unrecognized arguments: --colour red"),
    ("no-display", ["--video", "<TEXT>"], NO_DISPLAY_ENV,
     "no display (DISPLAY/WAYLAND_DISPLAY unset): run it in a desktop session, or headless with "
     "QT_QPA_PLATFORM=offscreen"),
]


@pytest.mark.parametrize("args, env, fragment", [c[1:] for c in OPTION_CASES], ids=[c[0] for c in OPTION_CASES])
def test_a_bad_option_is_one_line_and_status_2_before_qt(inputs, args, env, fragment):
    if sys.platform != "linux" and env is NO_DISPLAY_ENV:
        pytest.skip("the no-display check is Linux's")
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "app", *_args(args, inputs)], cwd=ROOT, env=_env(inputs, **env),
                          capture_output=True, text=True, errors="backslashreplace", timeout=60)
    _check_clean(proc.returncode, proc.stderr)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = _one_line(proc.stderr, _args([fragment], inputs)[0])
    assert line.startswith(ERROR), line
    assert sum(ln.startswith(ERROR) for ln in proc.stderr.splitlines()) == 1, proc.stderr
    assert "This plugin" not in proc.stderr and "qt." not in proc.stderr  # Qt was never started
    assert time.monotonic() - t0 < 30


def test_the_no_display_check_is_only_for_linux_without_any_display():
    from app.main import NO_DISPLAY, display_problem

    assert display_problem({}, "linux") == NO_DISPLAY
    assert display_problem({"DISPLAY": ":0"}, "linux") is None
    assert display_problem({"WAYLAND_DISPLAY": "wayland-0"}, "linux") is None
    assert display_problem({"QT_QPA_PLATFORM": "offscreen"}, "linux") is None
    assert display_problem({}, "darwin") is None and display_problem({}, "win32") is None


# ------------------------------------------------------------------- inputs found bad by opening them

#  id, arguments (with --screenshot added), exit status, fragments that must each be on one line. A source and a
#  checkpoint are separate inputs, so one run can carry a bad one of each (each is reported on its own line).
RUN_CASES = [
    ("video-is-text+checkpoint-nan-weights", ["--video", "<TEXT>", "--checkpoint", "<NAN>"], 2,
     ["cannot decode <TEXT>", "the checkpoint could not be used: <NAN>", "non-finite"]),
    ("folder-without-images+checkpoint-garbage", ["--folder", "<EMPTY>", "--checkpoint", "<GARBAGE>"], 2,
     ["<EMPTY>: no images in this folder", "the checkpoint could not be used: <GARBAGE>"]),
    ("video-is-a-fifo", ["--video", "<FIFO>"], 2, ["<FIFO>: is a FIFO"]),
    ("camera-absent", ["--camera", "9"], 2, ["camera 9"]),
    ("video-name-not-utf8", ["--video", "<NONUTF8>"], 0, ["fer-desktop: screenshot ("]),
]
RUN_PARALLEL = 2  # the runs are independent (own output, settings); two at a time on two cores


def _screenshot_run(case, inputs):
    name, args, _status, _fragments = case
    if any("<NONUTF8>" in a for a in args) and "NONUTF8" not in inputs:
        return None  # the offline test media are not here
    out = Path(inputs["DIR"]) / "shots" / f"{name}.png"
    argv = [sys.executable, "-m", "app", *_args(args, inputs), "--screenshot", str(out), "--frames", "1",
            "--timeout", "30", "--backend", "torch", "--size", "800x500"]
    env = _env(inputs, FER_DESKTOP_SETTINGS=str(Path(inputs["DIR"]) / "settings" / f"{name}.ini"))
    t0 = time.monotonic()
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, timeout=120)
    return proc.returncode, proc.stderr.decode("utf-8", "backslashreplace"), out, time.monotonic() - t0


@pytest.fixture(scope="module")
def screenshot_runs(inputs) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(RUN_PARALLEL) as pool:
        futures = {case[0]: pool.submit(_screenshot_run, case, inputs) for case in RUN_CASES}
        return {name: f.result() for name, f in futures.items()}


@pytest.mark.parametrize("name, status, fragments", [(c[0], c[2], c[3]) for c in RUN_CASES],
                         ids=[c[0] for c in RUN_CASES])
def test_an_input_found_bad_at_run_time_is_shown_and_reported(screenshot_runs, inputs, name, status, fragments):
    if screenshot_runs[name] is None:
        pytest.skip("the offline test media are not here")
    rc, err, out, seconds = screenshot_runs[name]
    _check_clean(rc, err)
    assert rc == status, err[-3000:]
    for fragment in _args(fragments, inputs):
        line = _one_line(err, fragment)
        assert line.startswith(ERROR) or status == 0, line
    errors = [ln for ln in err.splitlines() if ln.startswith(ERROR)]
    wanted = _args(fragments, inputs)
    assert [ln for ln in errors if not any(f in ln for f in wanted)] == [], err  # nothing else went wrong
    assert bool(errors) == bool(status), err
    assert out.is_file() and out.stat().st_size > 1000  # the window was saved, showing the error
    if status:
        assert errors[0].endswith(f"(the window was saved anyway to {out})"), errors[0]
    assert seconds < 60


# ------------------------------------------------------------------- the same, in a live session

#  id, arguments, what the log says once the failure is shown, the signal that ends the session, exit status
LIVE_CASES = [
    ("video-is-text", ["--video", "<TEXT>"], "Cannot open notes.txt: cannot decode", signal.SIGINT, 130),
    ("checkpoint-garbage+camera-absent", ["--checkpoint", "<GARBAGE>", "--camera", "9"],
     "the checkpoint could not be loaded: <GARBAGE>", signal.SIGTERM, 143),
]


@pytest.mark.parametrize("args, said, sig, status", [c[1:] for c in LIVE_CASES], ids=[c[0] for c in LIVE_CASES])
def test_a_live_session_shows_the_error_and_keeps_running(inputs, args, said, sig, status):
    said = _args([said], inputs)[0]
    argv = [sys.executable, "-m", "app", *_args(args, inputs), "--log-level", "INFO", "--backend", "torch"]
    proc = subprocess.Popen(argv, cwd=ROOT, env=_env(inputs), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    err = b""
    try:
        deadline = time.monotonic() + 60
        while said.encode() not in err and time.monotonic() < deadline and proc.poll() is None:
            ready, _, _ = select.select([proc.stderr], [], [], 0.5)
            if ready:
                err += os.read(proc.stderr.fileno(), 65536)
        assert said.encode() in err, err.decode(errors="replace")[-3000:]
        time.sleep(1.5)  # the failure has been shown: the session goes on
        assert proc.poll() is None, f"fer-desktop ended after the error:\n{err.decode(errors='replace')[-3000:]}"
        proc.send_signal(sig)
        _, rest = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = (err + rest).decode(errors="replace")
    _check_clean(proc.returncode, text)
    assert proc.returncode == status, text[-3000:]
    assert ERROR not in text  # shown in the window (and logged), not a fatal error of the program
