"""fer-desktop's GUI (pytest-qt, offscreen): the window on real and synthetic videos, model loading and
errors, missing/failing sources, recording, snapshots, pause, shutdown, settings, screenshot mode."""
from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("PYQTGRAPH_QT_LIB", "PySide6")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

pytest.importorskip("pytestqt")
from PySide6.QtGui import QImage  # noqa: E402
from PySide6.QtWidgets import QMessageBox  # noqa: E402

from app.settings import ENV_VAR, Settings  # noqa: E402
from app.state import RateMeter, ViewerState, fit_rect  # noqa: E402
from app.window import LaunchOptions, MainWindow  # noqa: E402
from app.worker import SourceSpec  # noqa: E402
from ferengine.pipeline import FaceResult, FrameResult  # noqa: E402
from ferengine.results import csv_columns  # noqa: E402
from ferengine.sources import Frame, SourceError  # noqa: E402

FACE_VIDEO = "videos/pyfeat_single_face.mp4"
WAIT_MS = 15000


@pytest.fixture(autouse=True)
def private_settings(tmp_path, monkeypatch):
    """Every test gets its own settings file: the user's settings are never read or written."""
    path = tmp_path / "settings" / "fer-desktop.ini"
    monkeypatch.setenv(ENV_VAR, str(path))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # snapshot/record defaults land in the sandbox
    return path


@pytest.fixture(scope="module")
def long_video(tmp_path_factory) -> Path:
    """A 320x240 MJPG video, 60 frames at 25 fps, no faces (plays with loop for as long as needed)."""
    path = tmp_path_factory.mktemp("app_video") / "long.avi"
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25.0, (320, 240))
    assert w.isOpened()
    for i in range(60):
        img = np.full((240, 320, 3), 40 + 2 * i, np.uint8)
        cv2.circle(img, (40 + 4 * i, 120), 20, (255, 255, 255), -1)
        w.write(img)
    w.release()
    return path


@pytest.fixture
def face_video(media_dir) -> Path:
    path = media_dir / FACE_VIDEO
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return path


@pytest.fixture
def make_window(qtbot):
    """Build a MainWindow (shown, offscreen); every window is shut down at teardown."""
    windows = []

    def make(**kw) -> MainWindow:
        kw.setdefault("probe_cameras", False)
        kw.setdefault("restore_layout", False)
        kw.setdefault("backend", "torch")  # no ONNX export: faster tests
        win = MainWindow(LaunchOptions(**kw))
        qtbot.addWidget(win)
        win.show()
        windows.append(win)
        return win

    yield make
    for win in windows:
        win.shutdown()


def wait_frames(qtbot, win: MainWindow, n: int = 3, timeout: int = WAIT_MS) -> None:
    start = win.frames_shown
    try:
        qtbot.waitUntil(lambda: win.frames_shown >= start + n, timeout=timeout)
    except Exception:
        w = win.worker
        raise AssertionError(
            f"{n} frames not shown: shown {win.frames_shown} (from {start}), worker running {w.running}, "
            f"source {w.source}, processed {w._processed}, gui busy {w._gui_busy.is_set()}, ended {win.ended}, "
            f"requests {win._source_request}/{w.request}, page {win.stack.currentWidget()}, "
            f"no-source title {win.no_source.title.text()!r}") from None


# ----------------------------------------------------------------------------------- pure state


def _face(fid, box, v=0.1, a=0.2, probs=(0.7, 0.3)):
    p = np.asarray(probs, np.float32)
    return FaceResult(fid, box, 0.9, np.zeros((6, 2), np.float32), p, "happy", float(p.max()), v, a, "estimated")


def test_fit_rect_letterboxes_and_keeps_aspect():
    assert fit_rect(640, 360, 800, 800) == (0, 175, 800, 450)
    assert fit_rect(640, 480, 1000, 480) == (180, 0, 640, 480)
    assert fit_rect(0, 10, 100, 100) == (0, 0, 0, 0)


def test_viewer_state_selection_history_and_window():
    st = ViewerState(window_s=10.0, trail_s=1.0)
    st.set_model(("happy", "sad"), True)
    small, big = _face(1, (0, 0, 10, 10)), _face(2, (50, 50, 100, 100), v=-0.5)
    for i in range(30):  # 30 frames at 10 fps
        st.update([FrameResult(i, i / 10, [small, big], {}, ("happy", "sad"))])
    assert st.current_face().face_id == 2  # the largest by default
    assert st.select_at(5, 5) == 1 and st.current_face().face_id == 1
    assert st.select_at(400, 400) is None and st.current_face().face_id == 2  # click on nothing: auto again
    t, v, a = st.series(2)
    assert len(t) == 30 and t[-1] == 0 and np.allclose(v, -0.5)
    age, _, _ = st.trail(2)
    assert age.max() <= 1.0 + 1e-9 and len(age) == 11
    st.set_window(1.0)  # clamped to the minimum
    assert st.window_s == 5.0 and len(st.series(2)[0]) == 30
    st.update([FrameResult(0, 0.0, [big], {}, ("happy", "sad"))])  # time went back: a loop
    assert len(st.series(2)[0]) == 1


def test_rate_meter():
    m = RateMeter(1.0)
    for i in range(31):
        m.tick(100 + i / 30)
    assert m.rate(101.0) == pytest.approx(30.0, rel=0.05)
    assert m.rate(105.0) == 0.0


# ----------------------------------------------------------------------------------- the window


def test_real_video_shows_results_for_a_real_face(qtbot, make_window, face_video, fastcnn_checkpoint):
    win = make_window(source=SourceSpec("video", str(face_video)), checkpoint=str(fastcnn_checkpoint))
    t0 = time.monotonic()
    qtbot.waitUntil(lambda: win.bundle is not None and win.state.current_face() is not None
                    and win.state.current_face().probs is not None, timeout=WAIT_MS)
    wait_frames(qtbot, win, 3)
    assert time.monotonic() - t0 < 10
    face = win.state.current_face()
    h, w = win.last_packet.image.shape[:2]
    x, y, bw, bh = face.box
    assert 0.1 * w < bw < 0.9 * w and 0 <= x + bw / 2 <= w and 0 <= y + bh / 2 <= h
    # the bar chart shows this face's probabilities over the model's classes
    assert win.prob_chart.labels == tuple(win.bundle.loaded.info.labels)
    assert win.prob_chart.values.sum() == pytest.approx(1.0, abs=1e-3)
    assert f"face #{face.face_id}" in win.prob_chart.caption.text()
    # AV plane and timeline have data, labelled as estimated (the fastcnn has no AV head)
    assert all(math.isfinite(c) for c in win.av_plane.point)
    assert "estimated from categories" in win.av_plane.caption.text()
    assert "estimated from categories" in win.timeline.caption.text()
    assert win.stack.currentWidget() is win.video and win.video.paint_count > 0
    qtbot.waitUntil(lambda: win.sb_faces.text() == "1 face", timeout=2000)  # the status bar refreshes at 4 Hz
    assert "ms/face" in win.sb_infer.text()
    name = win.bundle.loaded.info.name
    assert name == "baseline fastcnn patterns" and name in win.windowTitle() and name in win.sb_model.text()


def test_av_head_model_is_labelled_as_such(qtbot, make_window, face_video, fastcnn_av_checkpoint):
    win = make_window(source=SourceSpec("video", str(face_video)), checkpoint=str(fastcnn_av_checkpoint))
    qtbot.waitUntil(lambda: win.bundle is not None and win.state.current_face() is not None
                    and win.state.av_source == "head", timeout=WAIT_MS)
    wait_frames(qtbot, win, 2)
    assert "AV head" in win.av_plane.caption.text()
    assert "estimated" not in win.av_plane.caption.text()


def test_synthetic_video_plays_to_the_end_and_says_so(qtbot, make_window, synthetic_video, fastcnn_checkpoint):
    win = make_window(source=SourceSpec("video", str(synthetic_video)), checkpoint=str(fastcnn_checkpoint))
    qtbot.waitUntil(lambda: win.ended, timeout=WAIT_MS)
    assert win.last_packet.processed == 12  # every frame of the file, in order
    assert "End of <b>synthetic.avi</b> (12 frames)" in win.source_bar.text
    assert win.video.overlay_text == "End of video"
    assert win.stack.currentWidget() is win.video  # the last frame stays on screen
    assert [b.text() for b in win.source_bar.buttons][:2] == ["Replay", "Loop"]
    n = win.frames_shown
    win.restart()
    qtbot.waitUntil(lambda: win.frames_shown > n and win.ended, timeout=WAIT_MS)


def test_video_plays_in_real_time_unless_fast(qtbot, make_window, synthetic_video):
    win = make_window(source=SourceSpec("video", str(synthetic_video)))  # 12 frames at 25 fps = 0.48 s
    t0 = time.monotonic()
    qtbot.waitUntil(lambda: win.ended, timeout=WAIT_MS)
    real = time.monotonic() - t0
    assert real >= 0.4
    win.act_fast.setChecked(True)
    win.restart()
    t0 = time.monotonic()
    qtbot.waitUntil(lambda: not win.ended, timeout=WAIT_MS)
    qtbot.waitUntil(lambda: win.ended, timeout=WAIT_MS)
    assert time.monotonic() - t0 < real


def test_no_model_still_detects_and_says_so(qtbot, make_window, monkeypatch, synthetic_video):
    monkeypatch.setattr("app.window.default_model_path", lambda: None)
    win = make_window(source=SourceSpec("video", str(synthetic_video)))
    wait_frames(qtbot, win, 2)
    text = win.model_bar.text
    assert "No model loaded" in text and "File &gt; Open checkpoint" in text
    assert win.bundle is None and not win.last_packet.has_model
    assert "No model loaded" in win.prob_chart.caption.text()
    assert "no model" in win.windowTitle()


def test_bad_checkpoint_shows_the_error_and_keeps_the_model(qtbot, make_window, monkeypatch, tmp_path,
                                                            long_video, fastcnn_checkpoint):
    win = make_window(source=SourceSpec("video", str(long_video)), checkpoint=str(fastcnn_checkpoint), loop=True)
    qtbot.waitUntil(lambda: win.bundle is not None, timeout=WAIT_MS)
    good = win.bundle
    boxes = []
    monkeypatch.setattr(QMessageBox, "critical", lambda parent, title, text, *a, **k: boxes.append((title, text)))
    bad = tmp_path / "broken.safetensors"
    bad.write_text("this is not a checkpoint")
    win.open_checkpoint(bad)
    qtbot.waitUntil(lambda: len(boxes) > 0, timeout=WAIT_MS)
    title, text = boxes[0]
    assert "checkpoint" in title.lower()
    assert str(bad) in text and "not a fer-desktop checkpoint" in text  # the CheckpointError's own words
    assert win.bundle is good and win.worker.bundle is good
    assert not win.model_bar.isVisibleTo(win)  # the "Loading…" bar went away again
    wait_frames(qtbot, win, 3)  # still running with the old model
    assert win.last_packet.has_model


def test_no_camera_start_shows_the_message_and_does_not_hang(qtbot, make_window):
    t0 = time.monotonic()
    win = make_window(source=SourceSpec("camera", 99))
    qtbot.waitUntil(lambda: win.stack.currentWidget() is win.no_source
                    and "camera" in win.no_source.title.text().lower()
                    and "not available" in win.no_source.title.text().lower() or "No camera" in
                    win.no_source.title.text(), timeout=8000)
    assert time.monotonic() - t0 < 8
    assert "camera 99" in win.no_source.detail.text().lower()
    assert win.no_source.open_video.isVisibleTo(win) and win.no_source.open_video.text() == "Open video…"
    t0 = time.monotonic()
    assert win.shutdown() and time.monotonic() - t0 < 3


def test_unreadable_file_gives_a_message_and_the_app_stays_usable(qtbot, make_window, tmp_path, long_video):
    junk = tmp_path / "notes.mp4"
    junk.write_bytes(os.urandom(2000))
    win = make_window(source=SourceSpec("video", str(junk)))
    qtbot.waitUntil(lambda: win.stack.currentWidget() is win.no_source
                    and win.no_source.title.text().startswith("Cannot open"), timeout=WAIT_MS)
    assert "notes.mp4" in win.no_source.detail.text()
    win.open_video(long_video)
    wait_frames(qtbot, win, 3)
    assert win.stack.currentWidget() is win.video


def test_camera_unplugged_mid_stream(qtbot, make_window, monkeypatch):
    class FlakyCamera:
        name, fps, frame_count = "camera 0", 30.0, None

        def __init__(self):
            self.i = 0

        def read(self):
            self.i += 1
            if self.i > 8:
                raise SourceError("camera 0 stopped delivering frames (10 reads in a row failed); "
                                  "it may have been unplugged")
            time.sleep(0.01)
            return Frame(np.full((120, 160, 3), 90, np.uint8), self.i - 1, self.i / 30)

        def close(self):
            pass

    monkeypatch.setattr("app.worker.open_source", lambda value, **kw: FlakyCamera())
    win = make_window(source=SourceSpec("camera", 0))
    qtbot.waitUntil(lambda: win.stack.currentWidget() is win.no_source
                    and "stopped" in win.no_source.title.text(), timeout=WAIT_MS)
    assert "unplugged" in win.no_source.detail.text()
    assert win.no_source.retry_button.isVisibleTo(win)
    assert win.worker.source is None and win.thread.isRunning()


def test_record_csv_writes_the_analyze_columns(qtbot, make_window, tmp_path, media_dir, fastcnn_checkpoint):
    pd = pytest.importorskip("pandas")
    video = media_dir / FACE_VIDEO
    if not video.is_file():
        pytest.skip(f"{video} not found")
    win = make_window(source=SourceSpec("video", str(video)), checkpoint=str(fastcnn_checkpoint), fast=True)
    qtbot.waitUntil(lambda: win.bundle is not None, timeout=WAIT_MS)
    out = tmp_path / "rec.csv"
    win.start_recording(out)
    qtbot.waitUntil(lambda: win.recording_path is not None, timeout=WAIT_MS)
    assert win.act_record.isChecked() and win.sb_rec.isVisibleTo(win)
    start = win.last_packet.processed if win.last_packet else 0
    qtbot.waitUntil(lambda: win.last_packet is not None and win.last_packet.processed >= start + 10,
                    timeout=WAIT_MS)
    win.stop_recording()
    qtbot.waitUntil(lambda: win.recording_path is None, timeout=WAIT_MS)
    df = pd.read_csv(out)
    assert list(df.columns) == csv_columns(win.bundle.loaded.info.labels)
    assert len(df) >= 10 and df["face_id"].notna().all()
    assert df["frame"].is_monotonic_increasing and (df["av_source"] == "estimated").all()
    probs = df[list(win.bundle.loaded.info.labels)].to_numpy()
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-3)
    assert not win.act_record.isChecked()


def test_record_without_a_model_is_refused(qtbot, make_window, monkeypatch, tmp_path, long_video):
    monkeypatch.setattr("app.window.default_model_path", lambda: None)
    win = make_window(source=SourceSpec("video", str(long_video)), loop=True)
    wait_frames(qtbot, win, 1)
    win.start_recording(tmp_path / "x.csv")
    qtbot.waitUntil(lambda: "needs a model" in win.source_bar.text, timeout=WAIT_MS)
    assert not (tmp_path / "x.csv").exists() and win.recording_path is None


def test_snapshot_saves_the_annotated_frame(qtbot, make_window, private_settings, tmp_path, long_video):
    shots = tmp_path / "shots"
    Settings().set("snapshot/dir", str(shots))
    win = make_window(source=SourceSpec("video", str(long_video)), loop=True)
    wait_frames(qtbot, win, 2)
    path = win.snapshot()
    assert path is not None and path.parent == shots and path.suffix == ".png"
    img = QImage(str(path))
    assert (img.width(), img.height()) == (320, 240)  # the frame's own resolution
    assert str(path) in win.statusBar().currentMessage()


def test_pause_stops_frame_updates(qtbot, make_window, long_video):
    win = make_window(source=SourceSpec("video", str(long_video)), loop=True)
    wait_frames(qtbot, win, 3)
    win.set_paused(True)
    assert win.act_pause.isChecked() and win.video.overlay_text == "Paused"
    qtbot.wait(200)  # a frame already on its way may still land
    n, painted = win.frames_shown, win.last_packet.processed
    qtbot.wait(600)
    assert win.frames_shown == n and win.last_packet.processed == painted
    win.set_paused(False)
    assert win.video.overlay_text == ""
    wait_frames(qtbot, win, 3)


def test_close_stops_the_worker_and_closes_the_detector(qtbot, make_window, long_video, fastcnn_checkpoint):
    win = make_window(source=SourceSpec("video", str(long_video)), checkpoint=str(fastcnn_checkpoint), loop=True)
    qtbot.waitUntil(lambda: win.bundle is not None, timeout=WAIT_MS)
    wait_frames(qtbot, win, 3)
    detector = win.worker.detector.target
    backend = win.worker.pipeline.backend
    assert not detector.closed
    t0 = time.monotonic()
    win.close()
    assert time.monotonic() - t0 < 5
    assert win.thread.isFinished() and not win.worker.running
    assert detector.closed
    assert win.worker.pipeline is None and win.worker.source is None
    with pytest.raises(RuntimeError):
        backend.run(np.zeros((1, 1, 48, 48), np.float32))  # closed


def test_backend_menu_disables_unavailable_backends_with_the_reason(qtbot, make_window, long_video):
    from ferengine.backends import available_backends

    win = make_window(source=SourceSpec("video", str(long_video)))
    reasons = available_backends()
    assert set(win.backend_actions) == {"auto", *reasons}
    for name, reason in reasons.items():
        act = win.backend_actions[name]
        assert act.isEnabled() == (reason is None), name
        if reason:
            assert reason in act.toolTip()
    assert win.backend_menu.toolTipsVisible()
    if reasons["tensorrt"] is not None:  # the usual case without an NVIDIA GPU + TensorRT
        assert not win.backend_actions["tensorrt"].isEnabled()
        assert "TensorRT" in win.backend_actions["tensorrt"].toolTip()


def test_backend_switch_keeps_running(qtbot, make_window, long_video, fastcnn_checkpoint):
    from ferengine.backends import available_backends

    if available_backends()["onnxruntime"] is not None:
        pytest.skip("onnxruntime unavailable")
    win = make_window(source=SourceSpec("video", str(long_video)), checkpoint=str(fastcnn_checkpoint), loop=True)
    qtbot.waitUntil(lambda: win.backend_obj is not None and win.backend_obj.name == "torch", timeout=WAIT_MS)
    win.backend_actions["onnxruntime"].trigger()
    qtbot.waitUntil(lambda: win.backend_obj is not None and win.backend_obj.name == "onnxruntime", timeout=WAIT_MS)
    assert "ONNX Runtime" in win.sb_backend.text()
    wait_frames(qtbot, win, 3)


def test_controls_reach_the_worker(qtbot, make_window, long_video):
    win = make_window(source=SourceSpec("video", str(long_video)), loop=True)
    wait_frames(qtbot, win, 1)
    win.smoothing_slider.setValue(80)
    win.conf_spin.setValue(0.7)
    win.max_faces_spin.setValue(2)
    assert win.worker.options() == {"smoothing": 0.8, "min_confidence": 0.7, "max_faces": 2}
    qtbot.waitUntil(lambda: win.worker.detector.min_confidence == 0.7 and win.worker.detector.max_faces == 2,
                    timeout=WAIT_MS)
    win.detector_combo.setCurrentIndex(win.detector_combo.findData("full"))
    qtbot.waitUntil(lambda: win.worker.detector.target.model == "full", timeout=WAIT_MS)
    wait_frames(qtbot, win, 2)


def test_settings_persist_between_runs(qtbot, make_window, private_settings, long_video):
    win = make_window(source=SourceSpec("video", str(long_video)), restore_layout=True)
    win.smoothing_slider.setValue(30)
    win.conf_spin.setValue(0.65)
    win.timeline.window.setValue(60)
    win.resize(777, 555)  # inside the offscreen screen (800x800): restoreGeometry clamps to the screen
    wait_frames(qtbot, win, 1)
    win.close()
    assert private_settings.is_file()
    win2 = make_window(restore_layout=True)  # no source given: reopens the last one
    assert win2.smoothing_slider.value() == 30 and win2.conf_spin.value() == pytest.approx(0.65)
    assert win2.timeline.window_s == 60 and win2.state.window_s == 60
    assert (win2.width(), win2.height()) == (777, 555)
    assert win2.source_spec == SourceSpec("video", str(long_video))
    wait_frames(qtbot, win2, 1)


def test_click_selects_a_face(qtbot, make_window, face_video):
    win = make_window(source=SourceSpec("video", str(face_video)))
    qtbot.waitUntil(lambda: win.state.current_face() is not None, timeout=WAIT_MS)
    from PySide6.QtCore import Qt

    face = win.state.current_face()
    x, y, w, h = face.box
    pt = win.video.widget_point(x + w / 2, y + h / 2).toPoint()
    qtbot.mouseClick(win.video, Qt.MouseButton.LeftButton, pos=pt)
    assert win.state.selected_id == face.face_id
    qtbot.mouseClick(win.video, Qt.MouseButton.LeftButton, pos=win.video.widget_point(1, 1).toPoint())
    assert win.state.selected_id is None


def test_screenshot_mode_writes_a_png_of_the_window(tmp_path, long_video, fastcnn_checkpoint, private_settings):
    exe = Path(sys.executable).with_name("fer-desktop")
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "app"]
    out = tmp_path / "shot.png"
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen"}
    proc = subprocess.run(cmd + ["--video", str(long_video), "--checkpoint", str(fastcnn_checkpoint),
                                 "--backend", "torch", "--screenshot", str(out), "--frames", "5",
                                 "--size", "1000x700", "--timeout", "60"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    img = QImage(str(out))
    assert not img.isNull() and (img.width(), img.height()) == (1000, 700)
    assert "5 frames" in proc.stderr
    assert not private_settings.exists()  # screenshot mode leaves the settings alone


def test_screenshot_mode_without_a_camera_saves_the_page_and_says_so(qapp, tmp_path, private_settings, capfd):
    """No source at all (in-process this time): the no-camera page is shown and still saved; the run did not
    do what was asked, so one error line and exit status 2."""
    from app.main import main

    out = tmp_path / "nocam.png"
    t0 = time.monotonic()
    rc = main(["--camera", "99", "--screenshot", str(out), "--frames", "5", "--timeout", "30", "--size", "900x600"])
    assert rc == 2 and time.monotonic() - t0 < 20
    img = QImage(str(out))
    assert (img.width(), img.height()) == (900, 600)
    err = capfd.readouterr().err
    line = [ln for ln in err.splitlines() if "camera 99" in ln]
    assert len(line) == 1 and line[0].startswith("fer-desktop: error: ") and f"saved anyway to {out}" in line[0]


def test_an_exception_in_a_gui_slot_is_shown_and_the_app_goes_on(qapp, monkeypatch, tmp_path, long_video,
                                                                  fastcnn_checkpoint, private_settings, capfd):
    """The GUI thread's boundary: a bug in a Qt slot is one "internal error" line and a message in the
    window, frames keep coming, and the run ends with status 1 (after the screenshot it was asked for)."""
    from app.main import main

    seen = []
    real = MainWindow._update_plots

    def buggy(self, face, has_model):
        seen.append(self)
        if len(seen) == 2:
            raise RuntimeError("simulated bug in a slot")
        return real(self, face, has_model)

    monkeypatch.setattr(MainWindow, "_update_plots", buggy)
    out = tmp_path / "shot.png"
    rc = main(["--video", str(long_video), "--loop", "--checkpoint", str(fastcnn_checkpoint), "--backend", "torch",
               "--screenshot", str(out), "--frames", "8", "--timeout", "60"])
    err = capfd.readouterr().err
    assert rc == 1, err[-2000:]
    lines = [ln for ln in err.splitlines() if "simulated bug in a slot" in ln]
    assert lines == ["fer-desktop: internal error: RuntimeError: simulated bug in a slot (run with --log-level "
                     "DEBUG for the traceback; please report it)"]
    assert "Traceback" not in err
    win = seen[0]
    assert len(seen) >= 8  # frames went on being shown after the bug
    assert "Internal error: RuntimeError: simulated bug in a slot" in win.source_bar.text
    assert QImage(str(out)).width() > 0 and "fer-desktop: screenshot (" in err
    assert win.thread.isFinished()


@pytest.mark.parametrize("exc, status, said", [
    (RuntimeError("simulated bug at start-up"), 1,
     "fer-desktop: internal error: RuntimeError: simulated bug at start-up (run with --log-level DEBUG"),
    (OSError(28, "No space left on device"), 2, "fer-desktop: error: [Errno 28] No space left on device"),
    (KeyboardInterrupt(), 130, "fer-desktop: interrupted"),
])
def test_an_error_after_the_window_exists_stops_the_thread_first(qapp, monkeypatch, tmp_path, long_video,
                                                                  private_settings, capfd, exc, status, said):
    """The program's boundary, for an error raised once the capture thread runs: the thread is stopped and
    joined (Qt would abort: "QThread: Destroyed while thread ... is still running"), then one line."""
    from app.main import main

    windows = []

    def show(self):
        windows.append(self)
        raise exc

    monkeypatch.setattr(MainWindow, "show", show)
    rc = main(["--video", str(long_video), "--screenshot", str(tmp_path / "x.png")])
    err = capfd.readouterr().err
    assert rc == status and said in err and "Traceback" not in err, err[-2000:]
    assert [ln for ln in err.splitlines() if ln.startswith("fer-desktop:")] == [ln for ln in err.splitlines()
                                                                                 if said in ln]
    assert windows and windows[0].thread.isFinished()


def test_a_capture_thread_that_cannot_stop_does_not_abort(qapp, monkeypatch, tmp_path, long_video,
                                                          private_settings, capfd):
    """A source blocked in a read (a driver, a decoder) past the join timeout: said in one line, exit 2, and
    the thread is kept (never destroyed while running, which would abort the process)."""
    import threading

    import app.main as app_main

    release = threading.Event()

    def blocking_open(value, **kw):
        release.wait(30)
        raise SourceError(f"{value}: released by the test")

    monkeypatch.setattr("app.worker.open_source", blocking_open)
    monkeypatch.setattr("app.window.JOIN_TIMEOUT_MS", 300)
    monkeypatch.setattr(app_main, "_UNSTOPPED", [])
    t0 = time.monotonic()
    rc = app_main.main(["--video", str(long_video), "--screenshot", str(tmp_path / "x.png"), "--timeout", "1"])
    err = capfd.readouterr().err
    try:
        assert rc == 2 and time.monotonic() - t0 < 20, err[-2000:]
        stuck = [ln for ln in err.splitlines() if "did not stop" in ln]
        assert len(stuck) == 1 and stuck[0].startswith("fer-desktop: error: the capture thread did not stop "
                                                       "within 0.3 s"), err
        assert len(app_main._UNSTOPPED) == 1 and app_main._UNSTOPPED[0].thread.isRunning()
    finally:
        release.set()
        for win in app_main._UNSTOPPED:
            assert win.thread.wait(10000)


def test_image_folder_and_drop_dispatch(qtbot, make_window, tmp_path, fastcnn_checkpoint, long_video):
    folder = tmp_path / "stills"
    folder.mkdir()
    for i in range(3):
        cv2.imwrite(str(folder / f"img{i + 1}.png"), np.full((90, 120, 3), 60 * i, np.uint8))
    (folder / "notes.txt").write_text("not an image")
    win = make_window(source=SourceSpec("video", str(long_video)), fast=True)
    wait_frames(qtbot, win, 1)
    win.open_path(folder)  # what a drop of the folder does
    qtbot.waitUntil(lambda: win.ended, timeout=WAIT_MS)
    assert win.source_spec == SourceSpec("folder", str(folder)) and win.last_packet.processed == 3
    assert win.video.overlay_text == "End of images" and "(3 images)" in win.source_bar.text
    win.open_path(fastcnn_checkpoint)  # a dropped checkpoint is loaded (replacing the default model)
    qtbot.waitUntil(lambda: win.bundle is not None and win.bundle.path == Path(fastcnn_checkpoint), timeout=WAIT_MS)
    assert win.bundle.path == Path(fastcnn_checkpoint)
    assert str(Path(fastcnn_checkpoint).resolve()) in win.settings.recent_checkpoints()


def test_pyside_refcount_bug_is_compensated(qapp):
    """PySide6 6.12.0 + CPython 3.11 drop references to None (void calls) and True (emit): the app must
    compensate, or a live window aborts within a minute (app/_compat.py)."""
    from PySide6.QtCore import QObject, QPointF, Signal

    from app._compat import SPARE_REFERENCES, guard_singleton_refcounts

    found = guard_singleton_refcounts()

    class Probe(QObject):
        ping = Signal()

    probe, point = Probe(), QPointF()
    n0, t0 = sys.getrefcount(None), sys.getrefcount(True)
    for _ in range(200):
        point.setX(2.0)
        probe.ping.emit()
    none_lost, true_lost = n0 - sys.getrefcount(None), t0 - sys.getrefcount(True)
    assert found["None"] == (none_lost >= 100) and found["True"] == (true_lost >= 100)
    if found["None"] or found["True"]:
        for obj in (None, True, False):
            assert sys.getrefcount(obj) > SPARE_REFERENCES // 2


def test_a_failing_model_reports_and_keeps_running(qtbot, make_window, long_video, fastcnn_checkpoint):
    win = make_window(source=SourceSpec("video", str(long_video)), checkpoint=str(fastcnn_checkpoint), loop=True)
    qtbot.waitUntil(lambda: win.bundle is not None, timeout=WAIT_MS)

    def broken(*args, **kwargs):
        raise RuntimeError("simulated backend failure")

    win.worker.pipeline.process = broken  # every frame now fails inside the pipeline
    qtbot.waitUntil(lambda: "simulated backend failure" in win.source_bar.text, timeout=WAIT_MS)
    qtbot.wait(300)
    assert win.thread.isRunning() and win.worker.running  # the loop survived
    del win.worker.pipeline.process  # the real method again
    wait_frames(qtbot, win, 3)


def test_a_shipped_default_model_is_used_and_listed(qtbot, make_window, monkeypatch, tmp_path, long_video,
                                                     fastcnn_checkpoint):
    """When assets/models/default.safetensors exists the app starts with it, and the Model menu lists it."""
    import shutil

    from ferengine.assets import assets_dir

    assets = tmp_path / "assets"
    (assets / "models").mkdir(parents=True)
    (assets / "mediapipe").symlink_to(assets_dir() / "mediapipe", target_is_directory=True)
    shutil.copy(fastcnn_checkpoint, assets / "models" / "default.safetensors")
    monkeypatch.setenv("FER_DESKTOP_ASSETS", str(assets))
    win = make_window(source=SourceSpec("video", str(long_video)), loop=True)
    qtbot.waitUntil(lambda: win.bundle is not None, timeout=WAIT_MS)
    assert win.bundle.path == assets / "models" / "default.safetensors"
    assert not win.model_bar.isVisibleTo(win)
    # the fixture checkpoint records no crop calibration: the status bar says so, with the why in its tooltip
    assert win.sb_model.text() == "model: baseline fastcnn patterns · crop not calibrated"
    assert "no crop calibration recorded" in win.sb_model.toolTip()
    win._fill_model_menu()
    shipped = [a for a in win.model_menu.actions() if a.text() == "default"]
    assert len(shipped) == 1 and shipped[0].isChecked()


def test_a_source_failing_under_a_recording_keeps_the_rows_as_partial(qtbot, make_window, tmp_path, long_video,
                                                                       fastcnn_checkpoint):
    """The output rule of ferengine.fileio in the app: a recording that the source ends by failing (not the
    user by stopping it) keeps its rows as NAME.partial.csv and leaves the chosen file as it was."""
    win = make_window(source=SourceSpec("video", str(long_video)), checkpoint=str(fastcnn_checkpoint), loop=True,
                      fast=True)
    qtbot.waitUntil(lambda: win.bundle is not None, timeout=WAIT_MS)
    out = tmp_path / "rec.csv"
    out.write_text("a complete earlier recording\n")
    win.start_recording(out)
    qtbot.waitUntil(lambda: win.recording_path is not None, timeout=WAIT_MS)
    start = win.last_packet.processed if win.last_packet else 0
    qtbot.waitUntil(lambda: win.last_packet is not None and win.last_packet.processed >= start + 5, timeout=WAIT_MS)

    def fail():
        raise SourceError("long.avi: the decoder stopped (simulated)")

    win.worker.source.read = fail
    qtbot.waitUntil(lambda: win.recording_path is None, timeout=WAIT_MS)
    assert out.read_text() == "a complete earlier recording\n"
    partial = tmp_path / "rec.partial.csv"
    assert partial.is_file() and partial.read_text().splitlines()[0].startswith("frame,time_s,face_id")
