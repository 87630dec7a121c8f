"""fer-desktop building a backend in the background (a TensorRT engine can take minutes): the status bar shows
the build's progress, the backend in use keeps processing frames until the new one is ready, a later choice
supersedes a build still running (its backend is closed, not used), and a failed build leaves the old backend
running and says why (pytest-qt, offscreen).

No GPU needed: ``ferengine.backends.create_backend`` is replaced by a fake that, for "tensorrt", reports
progress, waits for the test to let it finish, then returns a real (torch, CPU) backend dressed up as TensorRT
or raises BackendUnavailable. Every other backend is the real one."""
from __future__ import annotations

import os
import threading
import time

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("PYQTGRAPH_QT_LIB", "PySide6")

import pytest  # noqa: E402

pytest.importorskip("pytestqt")

from app.worker import PROGRESS_INTERVAL_S, SourceSpec, _ProgressReporter  # noqa: E402
from ferengine import backends  # noqa: E402
from ferengine.errors import BackendUnavailable  # noqa: E402

# the app tests' fixtures and helper, shared (private settings autouse, the offscreen window factory)
from test_app import WAIT_MS, long_video, make_window, private_settings, wait_frames  # noqa: E402,F401

REAL_CREATE = backends.create_backend
PARSING = "building TensorRT-RTX engine: parsing the ONNX graph"
BUILDING = "building TensorRT-RTX engine: Building engine 3/10"
REASON = "TensorRT-RTX cannot build an engine for this GPU (simulated)"


class FakeTensorRT:
    """A working backend (the real torch one on the CPU) that calls itself TensorRT."""

    name = "tensorrt"
    flavour = "TensorRT-RTX test"

    def __init__(self, inner):
        self._inner = inner
        self.closed = False

    def __getattr__(self, attr):
        return getattr(self._inner, attr)

    def run(self, batch):
        return self._inner.run(batch)

    def close(self):
        self.closed = True
        self._inner.close()


class FakeFactory:
    """Stands in for ``ferengine.backends.create_backend``. A "tensorrt" build reports ``PARSING`` (fraction
    unknown), waits for ``step``, reports ``BUILDING`` at 0.3, waits for ``finish``, reports 1.0, then
    returns a FakeTensorRT (or raises BackendUnavailable(REASON) when ``fail``)."""

    def __init__(self):
        self.calls: list[tuple[str, dict]] = []
        self.step = threading.Event()
        self.finish = threading.Event()
        self.fail = False
        self.built: list[FakeTensorRT] = []

    def __call__(self, name, loaded, device="auto", **options):
        self.calls.append((name, dict(options)))
        if name != "tensorrt":
            return REAL_CREATE(name, loaded, device, **options)
        progress = options["progress"]
        progress(None, PARSING)
        assert self.step.wait(WAIT_MS / 1000)
        progress(0.3, BUILDING)
        assert self.finish.wait(WAIT_MS / 1000)
        progress(1.0, "building TensorRT-RTX engine: done")
        if self.fail:
            raise BackendUnavailable(REASON)
        be = FakeTensorRT(REAL_CREATE("torch", loaded, "cpu"))
        self.built.append(be)
        return be

    def release(self):
        self.step.set()
        self.finish.set()


@pytest.fixture
def fake_trt(make_window, monkeypatch):
    """The fake factory in place, and TensorRT offered in the Backend menu. Requested after make_window, so
    its teardown lets a build still waiting finish before the windows shut down."""
    factory = FakeFactory()
    monkeypatch.setattr(backends, "create_backend", factory)
    monkeypatch.setattr("app.window.available_backends",
                        lambda: {**backends.available_backends(), "tensorrt": None})
    yield factory
    factory.release()


def start(qtbot, make_window, video, checkpoint):
    win = make_window(source=SourceSpec("video", str(video)), checkpoint=str(checkpoint), loop=True)
    qtbot.waitUntil(lambda: win.backend_obj is not None and win.backend_obj.name == "torch", timeout=WAIT_MS)
    wait_frames(qtbot, win, 2)
    assert win.backend_actions["tensorrt"].isEnabled() and win.backend_actions["torch"].isChecked()
    assert not win.sb_build.isVisibleTo(win)
    return win


def start_tensorrt_build(qtbot, make_window, video, checkpoint):
    """The window running torch, TensorRT chosen, its build under way (PARSING shown): (window, old backend)."""
    win = start(qtbot, make_window, video, checkpoint)
    old = win.backend_obj
    win.backend_actions["tensorrt"].trigger()
    qtbot.waitUntil(lambda: win.build_text == PARSING, timeout=WAIT_MS)
    return win, old


def checked_backend(win) -> str:
    return next(name for name, act in win.backend_actions.items() if act.isChecked())


def test_build_shows_progress_and_the_old_backend_runs_until_the_new_one_is_ready(
        qtbot, make_window, fake_trt, long_video, fastcnn_checkpoint):
    win, old = start_tensorrt_build(qtbot, make_window, long_video, fastcnn_checkpoint)

    # fraction unknown: a busy bar and the message
    assert win.sb_build.isVisibleTo(win) and win.build_bar.maximum() == 0
    assert win.build_label.text() and win.build_label.text()[:20] == PARSING[:20]
    wait_frames(qtbot, win, 3)  # frames keep coming, from the old backend
    assert win.backend_obj is old and win.worker.pipeline.backend is old and not old._closed
    assert win.sb_backend.text() == "PyTorch · CPU"

    # a known fraction: a determinate bar
    fake_trt.step.set()
    qtbot.waitUntil(lambda: win.build_text.startswith(BUILDING), timeout=WAIT_MS)
    assert win.build_text == f"{BUILDING} (30 %)"
    assert win.build_bar.maximum() == 1000 and win.build_bar.value() == 300
    n = win.last_packet.processed
    wait_frames(qtbot, win, 3)
    assert win.last_packet.processed > n and win.last_packet.has_model
    assert win.backend_obj is old and win.worker.pipeline.backend is old

    # ready: the new backend takes over, the old one is closed, the bar goes away
    fake_trt.finish.set()
    qtbot.waitUntil(lambda: win.backend_obj is not old, timeout=WAIT_MS)
    new = win.backend_obj
    assert new is fake_trt.built[0] and win.worker.pipeline.backend is new and not new.closed
    assert old._closed
    assert not win.sb_build.isVisibleTo(win) and win.build_text == ""
    assert win.sb_backend.text() == "TensorRT-RTX test · CPU"  # the flavour, not just "TensorRT"
    assert checked_backend(win) == "tensorrt" and win.backend_choice == "tensorrt"
    wait_frames(qtbot, win, 3)
    assert win.problems == []

    # progress went to tensorrt only; torch (the first load, a backend without progress) never got it
    names = [(name, "progress" in opts) for name, opts in fake_trt.calls]
    assert ("tensorrt", True) in names and ("torch", False) in names
    assert all(has == (name == "tensorrt") for name, has in names)
    assert callable(dict(fake_trt.calls)["tensorrt"]["progress"])


def test_a_failed_build_leaves_the_old_backend_running_and_says_why(
        qtbot, make_window, fake_trt, long_video, fastcnn_checkpoint):
    win = start(qtbot, make_window, long_video, fastcnn_checkpoint)
    old = win.backend_obj
    fake_trt.fail = True
    win.backend_actions["tensorrt"].trigger()
    fake_trt.step.set()
    qtbot.waitUntil(lambda: win.build_text.startswith(BUILDING), timeout=WAIT_MS)
    assert checked_backend(win) == "tensorrt"  # while it builds, the menu shows what was asked for
    fake_trt.finish.set()

    expected = f"TensorRT could not be used: {REASON}; still running PyTorch · CPU"
    qtbot.waitUntil(lambda: expected in win.problems, timeout=WAIT_MS)
    assert win.statusBar().currentMessage() == expected
    assert REASON in win.model_bar.text and "still running PyTorch" in win.model_bar.text
    assert not win.sb_build.isVisibleTo(win)
    # the old backend is still the one in use, and the menu (and the saved choice) went back to it
    assert win.backend_obj is old and win.worker.pipeline.backend is old and not old._closed
    assert checked_backend(win) == "torch" and win.backend_choice == "torch"
    assert win.settings.get_str("model/backend") == "torch"
    assert win.sb_backend.text() == "PyTorch · CPU"
    n = win.last_packet.processed
    wait_frames(qtbot, win, 3)
    assert win.last_packet.processed > n and win.last_packet.has_model


def test_a_later_choice_supersedes_a_build_and_its_backend_is_closed(
        qtbot, make_window, fake_trt, long_video, fastcnn_checkpoint):
    win, old = start_tensorrt_build(qtbot, make_window, long_video, fastcnn_checkpoint)

    win.backend_actions["torch"].trigger()  # changed my mind while TensorRT builds
    qtbot.waitUntil(lambda: win.backend_obj is not old, timeout=WAIT_MS)
    chosen = win.backend_obj
    assert chosen.name == "torch" and old._closed and not win.sb_build.isVisibleTo(win)

    fake_trt.release()  # the superseded build finishes late: its backend is closed, not used
    qtbot.waitUntil(lambda: bool(fake_trt.built) and fake_trt.built[0].closed, timeout=WAIT_MS)
    wait_frames(qtbot, win, 3)
    assert win.backend_obj is chosen and win.worker.pipeline.backend is chosen and not chosen._closed
    assert not win.sb_build.isVisibleTo(win)  # its late progress is not shown either
    assert checked_backend(win) == "torch" and win.backend_choice == "torch"
    assert win.problems == []


# ------------------------------------------------------------------------------ the progress callback


class _Signal:
    def __init__(self):
        self.emitted: list[tuple] = []
        self.lock = threading.Lock()

    def emit(self, *args):
        with self.lock:
            self.emitted.append(args)


class _Loader:
    _closing = False

    def __init__(self):
        self.progress = _Signal()


def test_progress_is_throttled_and_the_last_word_is_never_lost():
    loader = _Loader()
    rep = _ProgressReporter(loader, 7)
    t0 = time.monotonic()
    for i in range(2000):  # a builder reporting far more often than the GUI needs
        rep(i / 2000, f"step {i}")
    rep(float("nan"), "odd fraction")
    rep(5, "clamped")
    rep(None, "last")
    rep.finish()
    elapsed = time.monotonic() - t0
    rep(1.0, "after the end")  # ignored
    got = loader.progress.emitted
    assert got[0] == (7, 0.0, "step 0")  # the first call goes out at once
    assert got[-1] == (7, None, "last")  # the held-back last call goes out at finish
    assert len(got) <= elapsed / PROGRESS_INTERVAL_S + 3  # about 10 a second, not one per call
    assert all(f is None or 0.0 <= f <= 1.0 for _, f, _ in got)


def test_a_held_back_report_goes_out_without_a_further_call():
    loader = _Loader()
    rep = _ProgressReporter(loader, 3)
    rep(0.1, "first")
    rep(0.2, "second")  # within the interval: held back, then sent by the timer
    deadline = time.monotonic() + 5.0
    while len(loader.progress.emitted) < 2 and time.monotonic() < deadline:
        time.sleep(PROGRESS_INTERVAL_S / 5)
    assert loader.progress.emitted == [(3, 0.1, "first"), (3, 0.2, "second")]
    rep.finish()
    assert len(loader.progress.emitted) == 2  # nothing left to send
