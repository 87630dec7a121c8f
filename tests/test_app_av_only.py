"""fer-desktop with a model that has ONLY a valence/arousal head (no expression categories), and with one that
has both heads: what the expression dock, the AV plane, the timeline, the face tags, the status bar, the model
dialog and a recorded CSV show, and switching between such models at runtime (pytest-qt, offscreen).

The AV-only model is the trained two-head fixture with its expression head dropped (``av_only_checkpoint``
in conftest.py): its valence/arousal depend on its input, and equal the two-head model's."""
from __future__ import annotations

import math
import os
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("PYQTGRAPH_QT_LIB", "PySide6")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

pytest.importorskip("pytestqt")
import torch  # noqa: E402
from PySide6.QtGui import QImage  # noqa: E402

from app.annotate import face_caption  # noqa: E402
from app.settings import Settings  # noqa: E402
from app.widgets.plots import AV_ONLY_TEXT, NO_MODEL_TEXT, ProbabilityChart  # noqa: E402
from app.window import LaunchOptions, MainWindow  # noqa: E402
from app.worker import SourceSpec  # noqa: E402
from ferengine import checkpoint as ck  # noqa: E402
from ferengine.labels import LABEL_SETS  # noqa: E402
from ferengine.pipeline import FaceResult  # noqa: E402
from ferengine.preprocess import crop_faces, to_model_input  # noqa: E402
from ferengine.results import LEADING_COLUMNS, TRAILING_COLUMNS, csv_columns  # noqa: E402

WAIT_MS = 20000
FER7 = tuple(LABEL_SETS["fer7"])


# the app tests' fixtures and helper, shared (private settings autouse, the offscreen window factory)
from test_app import face_video, make_window, private_settings, wait_frames  # noqa: E402,F401


def head_va(loaded, image: np.ndarray, face: FaceResult) -> np.ndarray:
    """The model's own valence/arousal on ``face`` of ``image``, computed here (crop -> input -> forward)."""
    crop = crop_faces(image, [face.box], [face.keypoints], loaded.spec)
    with torch.no_grad():
        return loaded.model(torch.from_numpy(to_model_input(crop, loaded.spec)))["va"][0].numpy()


def bar_count(chart: ProbabilityChart) -> int:
    return len(chart.bars.opts["width"])


def no_problems(win: MainWindow) -> None:
    assert win.problems == [], win.problems
    assert "Internal error" not in win.source_bar.text


def switch_model(qtbot, win: MainWindow, path: Path) -> None:
    """Load ``path`` while the video runs and wait until frames analysed by it are on screen."""
    win.open_checkpoint(path)
    qtbot.waitUntil(lambda: win.bundle is not None and win.bundle.path.resolve() == Path(path).resolve()
                    and win.state.av_source is not None and win.state.current_face() is not None, timeout=WAIT_MS)
    wait_frames(qtbot, win, 2)


def assert_categorical(win: MainWindow, av_source: str) -> FaceResult:
    face = win.state.current_face()
    chart = win.prob_chart
    assert chart.labels == FER7 and not chart.av_only and chart.message == ""
    assert bar_count(chart) == 7 and chart.values.sum() == pytest.approx(1.0, abs=1e-3)
    assert face.probs is not None and face.label in FER7
    assert f"<b>{face.label}</b>" in chart.caption.text()
    assert win.state.av_source == av_source and face.av_source == av_source
    how = "from the model's AV head" if av_source == "head" else "estimated from categories"
    assert how in win.av_plane.caption.text()
    assert face_caption(face).startswith(f"#{face.face_id} {face.label} ")
    return face


def assert_av_only(win: MainWindow) -> FaceResult:
    face = win.state.current_face()
    chart = win.prob_chart
    # the expression dock: no classes, no bars, no numbers; it says why
    assert chart.labels == () and chart.av_only and chart.message == AV_ONLY_TEXT
    assert bar_count(chart) == 0 and len(chart.values) == 0 and chart._texts == []
    assert chart.body.currentWidget() is chart.placeholder
    assert "%" not in chart.caption.text() and "Valence/arousal model" in chart.caption.text()
    # the face: the head's values, no class
    assert face.probs is None and face.label is None and face.confidence is None
    assert face.av_source == "head" and win.state.av_source == "head"
    assert math.isfinite(face.valence) and math.isfinite(face.arousal)
    # the AV plane and the timeline show that face's values, labelled as the model's own
    assert win.av_plane.point == pytest.approx((face.valence, face.arousal), abs=1e-6)
    assert "from the model's AV head" in win.av_plane.caption.text()
    assert f"{face.valence:+.2f}" in win.av_plane.caption.text()
    assert "model AV head" in win.timeline.caption.text() and "estimated" not in win.timeline.caption.text()
    _, tv = win.timeline.valence.getData()
    _, ta = win.timeline.arousal.getData()
    assert tv[-1] == pytest.approx(face.valence) and ta[-1] == pytest.approx(face.arousal)
    # the tag on the box: the values, no class name
    tag = face_caption(face)
    assert tag == f"#{face.face_id} V {face.valence:+.2f} A {face.arousal:+.2f}"
    assert not any(name in tag for name in FER7)
    return face


# ------------------------------------------------------------------------------------------ widgets


def test_probability_chart_says_when_a_model_has_no_categories(qapp):
    chart = ProbabilityChart()
    assert chart.message == "No model loaded"
    chart.set_labels(("happy", "sad"))
    chart.set_probs(np.array([0.8, 0.2], np.float32))
    assert chart.message == "" and bar_count(chart) == 2
    chart.set_labels((), av_only=True)
    assert chart.message == AV_ONLY_TEXT and chart.av_only and bar_count(chart) == 0 and chart._texts == []
    face = FaceResult(1, (0, 0, 10, 10), 0.9, np.zeros((6, 2), np.float32), None, None, None, 0.3, -0.2, "head")
    chart.set_probs(None, face, "Valence/arousal model")  # no probabilities: no bars, no label, no crash
    assert bar_count(chart) == 0 and "%" not in chart.caption.text()
    chart.set_labels(())  # no model at all: another message
    assert chart.message == NO_MODEL_TEXT and not chart.av_only
    chart.set_labels(("happy", "sad"))
    assert chart.message == "" and bar_count(chart) == 2


def test_face_tag_shows_the_heads_values_for_an_av_only_model():
    kp = np.zeros((6, 2), np.float32)
    av = FaceResult(3, (0, 0, 10, 10), 0.91, kp, None, None, None, 0.4213, -0.1, "head")
    assert face_caption(av) == "#3 V +0.42 A -0.10"
    cat = FaceResult(3, (0, 0, 10, 10), 0.91, kp, np.array([0.8, 0.2], np.float32), "happy", 0.8, 0.5, 0.2,
                     "estimated")
    assert face_caption(cat) == "#3 happy 80%"
    det = FaceResult(3, (0, 0, 10, 10), 0.91, kp, None, None, None, math.nan, math.nan, "none")
    assert face_caption(det) == "#3 face 0.91"  # detection only: no values to show


# ------------------------------------------------------------------------------------------- the window


def test_av_only_model_shows_its_own_valence_arousal_and_no_categories(qtbot, make_window, face_video,
                                                                        fastcnn_av_only_checkpoint, monkeypatch,
                                                                        tmp_path):
    win = make_window(source=SourceSpec("video", str(face_video)), checkpoint=str(fastcnn_av_only_checkpoint),
                      loop=True)
    win.smoothing_slider.setValue(0)  # each frame's values are the model's output on that frame
    qtbot.waitUntil(lambda: win.bundle is not None and win.state.av_source == "head"
                    and win.state.current_face() is not None, timeout=WAIT_MS)
    wait_frames(qtbot, win, 6)
    face = assert_av_only(win)
    # the values shown are the model's output on this face of this frame
    loaded = ck.load(fastcnn_av_only_checkpoint)
    want = head_va(loaded, win.last_packet.image, face)
    assert (face.valence, face.arousal) == pytest.approx(tuple(want), abs=1e-4)
    _, v, a = win.state.series(face.face_id)
    assert v[-1] == face.valence and a[-1] == face.arousal
    assert np.ptp(v) > 1e-3 or np.ptp(a) > 1e-3, "the head's output should change over a real video"
    # the status bar and the model dialog say what the model is
    qtbot.waitUntil(lambda: win.sb_faces.text() == "1 face", timeout=2000)
    assert "ms/face" in win.sb_infer.text() and "valence/arousal only" in win.sb_model.text()
    shown = []
    monkeypatch.setattr("app.window.QMessageBox.information", lambda parent, title, html: shown.append(html))
    win.show_model_details()
    (html,) = shown
    assert "none: this model predicts valence/arousal only" in html and "valence/arousal" in html
    assert "expression categories" not in html.split("Classes")[0]  # Heads: valence/arousal only
    # a snapshot draws the same tags
    Settings().set("snapshot/dir", str(tmp_path / "shots"))
    path = win.snapshot()
    assert path is not None and not QImage(str(path)).isNull()
    no_problems(win)


def test_record_csv_with_an_av_only_model(qtbot, make_window, tmp_path, face_video, fastcnn_av_only_checkpoint):
    pd = pytest.importorskip("pandas")
    win = make_window(source=SourceSpec("video", str(face_video)), checkpoint=str(fastcnn_av_only_checkpoint),
                      fast=True, loop=True)
    qtbot.waitUntil(lambda: win.bundle is not None, timeout=WAIT_MS)
    out = tmp_path / "rec.csv"
    win.start_recording(out)
    qtbot.waitUntil(lambda: win.recording_path is not None, timeout=WAIT_MS)
    start = win.last_packet.processed if win.last_packet else 0
    qtbot.waitUntil(lambda: win.last_packet is not None and win.last_packet.processed >= start + 10,
                    timeout=WAIT_MS)
    win.stop_recording()
    qtbot.waitUntil(lambda: win.recording_path is None, timeout=WAIT_MS)
    df = pd.read_csv(out, keep_default_na=False)
    assert list(df.columns) == csv_columns(()) == [*LEADING_COLUMNS, *TRAILING_COLUMNS]  # no class columns
    assert len(df) >= 10 and (df["label"] == "").all() and (df["av_source"] == "head").all()
    va = df[["valence", "arousal"]].to_numpy(float)
    assert np.isfinite(va).all() and (np.abs(va) <= 1).all() and np.ptp(va, axis=0).max() > 1e-3
    no_problems(win)


def test_switching_between_categorical_av_only_and_two_head_models(qtbot, make_window, face_video,
                                                                    fastcnn_checkpoint, fastcnn_av_only_checkpoint,
                                                                    fastcnn_av_checkpoint):
    win = make_window(source=SourceSpec("video", str(face_video)), checkpoint=str(fastcnn_checkpoint), loop=True)
    win.smoothing_slider.setValue(0)
    qtbot.waitUntil(lambda: win.bundle is not None and win.state.av_source == "estimated"
                    and win.state.current_face() is not None, timeout=WAIT_MS)
    wait_frames(qtbot, win, 2)
    assert_categorical(win, "estimated")

    switch_model(qtbot, win, fastcnn_av_only_checkpoint)
    assert_av_only(win)
    assert "valence/arousal only" in win.sb_model.text()

    switch_model(qtbot, win, fastcnn_checkpoint)
    assert_categorical(win, "estimated")
    assert "valence/arousal only" not in win.sb_model.text()

    # both heads: the bars AND the model's own valence/arousal (the same AV head as the AV-only model's)
    switch_model(qtbot, win, fastcnn_av_checkpoint)
    face = assert_categorical(win, "head")
    want = head_va(ck.load(fastcnn_av_only_checkpoint), win.last_packet.image, face)
    assert (face.valence, face.arousal) == pytest.approx(tuple(want), abs=1e-4)
    assert win.av_plane.point == pytest.approx((face.valence, face.arousal), abs=1e-6)
    assert "model AV head" in win.timeline.caption.text()

    switch_model(qtbot, win, fastcnn_av_only_checkpoint)
    assert_av_only(win)
    no_problems(win)


def test_model_dialog_metrics_are_numbers_not_table_dumps():
    from app.window import _metrics_text

    text = _metrics_text({"val_accuracy": 71.234567, "val_confusion_matrix": [[1, 2], [3, 4]],
                          "val_per_class": {"happy": {"f1": 0.9}}, "val_valence_ccc": 0.123456, "epoch": 2})
    assert text == "val_accuracy 71.23, val_valence_ccc 0.1235, epoch 2, (+2 tables: fer info)"
    assert _metrics_text({}) == "—"
