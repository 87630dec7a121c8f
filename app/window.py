"""The main window: video on the left, plots in docks on the right, menus, toolbar and status bar.

The window owns the :class:`~app.state.ViewerState` (what is shown) and the views; the
:class:`~app.worker.CaptureWorker` (on its own QThread) owns the source, the detector and the pipeline.
They talk only through the worker's non-blocking methods and its queued signals, so the GUI thread never
waits on a camera, a file or a model.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from PySide6.QtCore import QByteArray, QThread, QTimer, Qt, Signal
from PySide6.QtGui import QAction, QActionGroup, QCloseEvent, QKeySequence
from PySide6.QtWidgets import (
    QComboBox, QDockWidget, QDoubleSpinBox, QFileDialog, QHBoxLayout, QLabel, QMainWindow, QMenu, QMessageBox,
    QProgressBar, QSlider, QSpinBox, QStackedWidget, QStyle, QToolBar, QVBoxLayout, QWidget,
)

from ferengine.backends import BACKENDS, available_backends

from . import __version__
from ._compat import guard_singleton_refcounts
from .annotate import render_annotated
from .icon import app_icon, app_pixmap, camera_icon, record_icon
from .settings import Settings
from .state import DEFAULT_WINDOW_S, RateMeter, ViewerState
from .widgets.messages import MessageBar, NoSourcePage
from .widgets.plots import AVPlane, ProbabilityChart, TimelinePlot
from .widgets.video_view import VideoView
from .worker import CaptureWorker, FramePacket, ModelBundle, ModelLoader, SourceInfo, SourceSpec

log = logging.getLogger("app.window")

BACKEND_NAMES = {"auto": "Automatic", "torch": "PyTorch", "onnxruntime": "ONNX Runtime", "tensorrt": "TensorRT"}
HEAD_NAMES = {"expression": "expression categories", "valence_arousal": "valence/arousal"}  # the model dialog
DETECTORS = (("short", "Short range (faces near the camera)"), ("full", "Full range (small or distant faces)"))
VIDEO_FILTER = "Videos (*.mp4 *.avi *.mov *.mkv *.webm *.m4v *.wmv *.mpg *.mpeg *.mjpeg);;All files (*)"
CHECKPOINT_FILTER = "Checkpoints (*.safetensors *.pt *.pth);;All files (*)"
MODEL_EXTENSIONS = (".safetensors", ".pt", ".pth")
JOIN_TIMEOUT_MS = 6000


@dataclass
class LaunchOptions:
    source: SourceSpec | None = None  # None: the last source, else camera 0
    checkpoint: str | None = None  # None: the last model, else the shipped default
    backend: str | None = None  # None: the saved choice (default "auto")
    device: str = "auto"
    detector: str | None = None
    loop: bool | None = None
    fast: bool | None = None
    restore_layout: bool = True  # window geometry/state from the settings
    persist: bool = True  # write the settings on close
    probe_cameras: bool = True
    wait_for_model: bool = False  # open the source only once the model is loaded (screenshots)


def nice_device(device: str) -> str:
    d = str(device)
    if d.endswith("ExecutionProvider"):
        d = d[: -len("ExecutionProvider")]
    low = d.lower()
    if low.startswith("cuda:") and low[5:].isdigit():
        return f"GPU {low[5:]}"
    return d.upper() if low in ("cpu", "cuda") else d


def backend_label(backend) -> str:
    """How the status bar names a backend: its flavour when it has one (e.g. "TensorRT-RTX 1.7.1"), else the
    backend's name, then the device: "TensorRT-RTX 1.7.1 · GPU 0", "ONNX Runtime · CPU"."""
    if backend is None:
        return ""
    flavour = str(getattr(backend, "flavour", "") or "").strip()
    name = flavour or BACKEND_NAMES.get(backend.name, backend.name)
    return f"{name} · {nice_device(backend.device)}"


def shipped_models() -> list[Path]:
    """Checkpoints in ``assets/models/`` (the trained defaults that ship with the app)."""
    try:
        from ferengine.assets import asset_path

        folder = asset_path("models")
    except Exception:  # noqa: BLE001 - no assets folder at all
        return []
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix in MODEL_EXTENSIONS and p.is_file())


def default_model_path() -> Path | None:
    from ferengine.checkpoint import CheckpointError, default_checkpoint_path

    try:
        return Path(default_checkpoint_path())
    except (CheckpointError, FileNotFoundError):
        return None


class MainWindow(QMainWindow):
    frameShown = Signal(object)  # FramePacket, after it was drawn into the views
    _camerasFound = Signal(list)

    def __init__(self, options: LaunchOptions | None = None, settings: Settings | None = None):
        guard_singleton_refcounts()  # before the first frame: see app/_compat.py
        super().__init__()
        self.options = options or LaunchOptions()
        self.settings = settings or Settings()
        self.settings.readonly = not self.options.persist
        self.state = ViewerState(window_s=self.settings.get_float("view/window_s", DEFAULT_WINDOW_S))
        self.bundle: ModelBundle | None = None
        self.backend_obj = None
        self.source_info: SourceInfo | None = None
        self.source_spec: SourceSpec | None = None
        self.frames_shown = 0
        self.last_packet: FramePacket | None = None
        self.last_snapshot: Path | None = None
        self.recording_path: str | None = None
        self.cameras: list[int] | None = None
        self.ended = False
        self._display_rate = RateMeter(1.0)
        self._shown_serial = -1
        self._model_request = 0
        self._model_request_interactive = False
        self._backend_request = 0
        self._backend_request_name = ""  # the backend asked for by _backend_request
        self._backend_request_loaded = None  # the LoadedModel it is being built for
        self._model_request_choice = "auto"  # the backend choice the latest checkpoint load asked for
        self._running_choice = "auto"  # the menu choice behind the backend in use (restored when a switch fails)
        self._build_request = 0  # the loader request whose progress the status bar shows (0: none)
        self._pending_source: SourceSpec | None = None
        self._source_request = 0  # id of the latest open_source; older sources' signals are dropped
        self._closed = False
        self._last_model_error = ""
        # what could not be used, one line each (sources, checkpoints, the worker's errors), in order; the
        # window shows them as they come, fer-desktop --screenshot prints them and exits with status 2
        self.problems: list[str] = []

        self.setWindowIcon(app_icon())
        self.setAcceptDrops(True)
        self.setDockOptions(QMainWindow.DockOption.AnimatedDocks | QMainWindow.DockOption.AllowNestedDocks)
        self._build_central()
        self._build_docks()
        self._build_actions()
        self._build_toolbar()
        self._build_menus()
        self._build_statusbar()
        self._restore_settings()
        self._update_title()

        # worker thread
        opts = self.worker_options()
        self.worker = CaptureWorker(
            detector_model=self.detector_combo.currentData(), smoothing=opts["smoothing"],
            min_confidence=opts["min_confidence"], max_faces=opts["max_faces"],
            realtime=not self.act_fast.isChecked(), loop=self.act_loop.isChecked(),
        )
        self.thread = QThread(self)
        self.thread.setObjectName("fer-capture")
        self.worker.moveToThread(self.thread)
        self.thread.started.connect(self.worker.run)
        self.worker.finished.connect(self.thread.quit)
        w = self.worker
        w.frameReady.connect(self._on_frame)
        w.sourceOpened.connect(self._on_source_opened)
        w.sourceFailed.connect(self._on_source_failed)
        w.endOfStream.connect(self._on_end_of_stream)
        w.modelChanged.connect(self._on_model_changed)
        w.backendChanged.connect(self._on_backend_changed)
        w.recordingStarted.connect(self._on_recording_started)
        w.recordingStopped.connect(self._on_recording_stopped)
        w.recordingFailed.connect(self._on_recording_failed)
        w.detectorChanged.connect(self._on_detector_switched)
        w.errorOccurred.connect(self._on_worker_error)
        self.video.displaySizeChanged.connect(w.set_display_size)

        self.loader = ModelLoader(self)
        self.loader.loaded.connect(self._on_model_loaded)
        self.loader.backendReady.connect(self._on_backend_ready)
        self.loader.failed.connect(self._on_load_failed)
        self.loader.progress.connect(self._on_build_progress)

        self._status_timer = QTimer(self)
        self._status_timer.setInterval(250)
        self._status_timer.timeout.connect(self._refresh_status)
        self._status_timer.start()

        self._camerasFound.connect(self._on_cameras_found)
        self.thread.start()
        try:
            self._start()
        except BaseException:
            self.shutdown()  # never leave a running thread behind a window that failed to start
            raise

    # ================================================================== construction
    def _build_central(self) -> None:
        central = QWidget(self)
        lay = QVBoxLayout(central)
        lay.setContentsMargins(4, 4, 4, 0)
        lay.setSpacing(4)
        self.model_bar = MessageBar(central)
        self.source_bar = MessageBar(central)
        self.stack = QStackedWidget(central)
        self.video = VideoView(self.stack)
        self.no_source = NoSourcePage(app_pixmap(96), self.stack)
        self.no_source.set_message("Starting…", "")
        self.stack.addWidget(self.no_source)
        self.stack.addWidget(self.video)
        lay.addWidget(self.model_bar)
        lay.addWidget(self.source_bar)
        lay.addWidget(self.stack, 1)
        self.setCentralWidget(central)
        self.video.faceClicked.connect(self._on_face_clicked)
        self.no_source.openVideo.connect(self.choose_video)
        self.no_source.openFolder.connect(self.choose_folder)
        self.no_source.retry.connect(self._retry_source)

    def _build_docks(self) -> None:
        self.prob_chart = ProbabilityChart()
        self.av_plane = AVPlane()
        self.timeline = TimelinePlot(self.state.window_s)
        self.timeline.windowChanged.connect(self._on_window_changed)
        self.docks: dict[str, QDockWidget] = {}
        for key, title, widget in (("expression", "Expression", self.prob_chart),
                                   ("av", "Arousal / valence", self.av_plane),
                                   ("timeline", "Timeline", self.timeline)):
            dock = QDockWidget(title, self)
            dock.setObjectName(f"dock_{key}")
            dock.setWidget(widget)
            dock.setFeatures(QDockWidget.DockWidgetFeature.DockWidgetMovable
                             | QDockWidget.DockWidgetFeature.DockWidgetClosable
                             | QDockWidget.DockWidgetFeature.DockWidgetFloatable)
            self.addDockWidget(Qt.DockWidgetArea.RightDockWidgetArea, dock)
            self.docks[key] = dock
        self._default_dock_sizes()

    def _default_dock_sizes(self) -> None:
        docks = list(self.docks.values())
        self.resizeDocks(docks, [440] * 3, Qt.Orientation.Horizontal)
        self.resizeDocks(docks, [250, 360, 230], Qt.Orientation.Vertical)

    def _build_actions(self) -> None:
        st = self.style()
        A = QAction
        self.act_open_video = A("Open &video…", self, shortcut=QKeySequence.StandardKey.Open,
                                triggered=self.choose_video)
        self.act_open_folder = A("Open image &folder…", self, triggered=self.choose_folder)
        self.act_open_ckpt = A("Open &checkpoint…", self, shortcut=QKeySequence("Ctrl+Shift+O"),
                               triggered=self.choose_checkpoint)
        self.act_snapshot = A(camera_icon(), "&Snapshot", self, shortcut=QKeySequence("Ctrl+S"),
                              triggered=self.snapshot)
        self.act_snapshot.setToolTip("Save the annotated frame as a PNG (Ctrl+S)")
        self.act_snapshot_dir = A("Snapshot &folder…", self, triggered=self.choose_snapshot_dir)
        self.act_record = A(record_icon(), "&Record CSV…", self, shortcut=QKeySequence("Ctrl+R"), checkable=True)
        self.act_record.setToolTip("Record every frame's results to a CSV file (same columns as `fer analyze`)")
        self.act_record.triggered.connect(self._on_record_toggled)
        self.act_quit = A("&Quit", self, shortcut=QKeySequence.StandardKey.Quit, triggered=self.close)
        self.act_pause = A(st.standardIcon(QStyle.StandardPixmap.SP_MediaPause), "Pause", self,
                           shortcut=QKeySequence(Qt.Key.Key_Space), checkable=True)
        self.act_pause.setToolTip("Pause / resume (Space)")
        self.act_pause.toggled.connect(self.set_paused)
        self.act_restart = A(st.standardIcon(QStyle.StandardPixmap.SP_MediaSkipBackward), "Restart from the beginning",
                             self, shortcut=QKeySequence("Ctrl+Home"), triggered=self.restart)
        self.act_loop = A("&Loop at the end", self, checkable=True)
        self.act_loop.toggled.connect(self._on_loop_toggled)
        self.act_fast = A("Play as &fast as possible", self, checkable=True)
        self.act_fast.setToolTip("Process video files as fast as the machine allows instead of in real time")
        self.act_fast.toggled.connect(self._on_fast_toggled)
        self.act_labels = A("Face &labels on the video", self, checkable=True, checked=True)
        self.act_labels.toggled.connect(self._on_view_options)
        self.act_keypoints = A("Face &keypoints", self, checkable=True, checked=False)
        self.act_keypoints.toggled.connect(self._on_view_options)
        self.act_fullscreen = A("&Full screen", self, shortcut=QKeySequence.StandardKey.FullScreen, checkable=True)
        self.act_fullscreen.toggled.connect(lambda on: self.showFullScreen() if on else self.showNormal())
        self.act_reset_layout = A("&Reset layout", self, triggered=self.reset_layout)
        self.act_model_info = A("Model &details…", self, triggered=self.show_model_details)
        self.act_unload = A("&Unload model (detection only)", self, triggered=self.unload_model)
        self.act_about = A("&About fer-desktop", self, triggered=self.show_about)
        self.act_rescan = A("&Rescan cameras", self, triggered=self.probe_cameras)

    def _build_toolbar(self) -> None:
        tb = QToolBar("Controls", self)
        tb.setObjectName("toolbar_controls")
        tb.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextBesideIcon)
        tb.setMovable(True)
        self.toolbar = tb
        tb.addAction(self.act_pause)
        tb.addAction(self.act_snapshot)
        tb.addAction(self.act_record)
        tb.addSeparator()

        tb.addWidget(self._tool_label("Smoothing"))
        self.smoothing_slider = QSlider(Qt.Orientation.Horizontal, self)
        self.smoothing_slider.setRange(0, 95)
        self.smoothing_slider.setFixedWidth(110)
        self.smoothing_slider.setToolTip("Per-face exponential smoothing of the outputs (0 = off)")
        self.smoothing_value = QLabel("0.50", self)
        self.smoothing_value.setMinimumWidth(self.smoothing_value.fontMetrics().horizontalAdvance("0.00") + 6)
        self.smoothing_slider.valueChanged.connect(self._on_controls)
        tb.addWidget(self.smoothing_slider)
        tb.addWidget(self.smoothing_value)
        tb.addSeparator()

        tb.addWidget(self._tool_label("Min. confidence"))
        self.conf_spin = QDoubleSpinBox(self)
        self.conf_spin.setRange(0.05, 0.99)
        self.conf_spin.setSingleStep(0.05)
        self.conf_spin.setDecimals(2)
        self.conf_spin.setToolTip("Face detection confidence threshold")
        self.conf_spin.valueChanged.connect(self._on_controls)
        tb.addWidget(self.conf_spin)
        tb.addWidget(self._tool_label("Max. faces"))
        self.max_faces_spin = QSpinBox(self)
        self.max_faces_spin.setRange(0, 32)
        self.max_faces_spin.setSpecialValueText("all")
        self.max_faces_spin.setToolTip("Keep at most this many faces per frame, largest first")
        self.max_faces_spin.valueChanged.connect(self._on_controls)
        tb.addWidget(self.max_faces_spin)
        tb.addWidget(self._tool_label("Detector"))
        self.detector_combo = QComboBox(self)
        for key, text in DETECTORS:
            self.detector_combo.addItem(text.split(" (")[0], key)
            self.detector_combo.setItemData(self.detector_combo.count() - 1, text, Qt.ItemDataRole.ToolTipRole)
        self.detector_combo.setToolTip("BlazeFace model: short range for webcam distance, full range for "
                                       "small or distant faces")
        self.detector_combo.currentIndexChanged.connect(self._on_detector_changed)
        tb.addWidget(self.detector_combo)
        self.addToolBar(Qt.ToolBarArea.TopToolBarArea, tb)

    def _tool_label(self, text: str) -> QLabel:
        lab = QLabel(f" {text} ", self)
        return lab

    def _build_menus(self) -> None:
        mb = self.menuBar()
        m = mb.addMenu("&File")
        m.addAction(self.act_open_video)
        m.addAction(self.act_open_folder)
        m.addSeparator()
        m.addAction(self.act_open_ckpt)
        self.recent_menu = m.addMenu("Recent chec&kpoints")
        self.recent_menu.aboutToShow.connect(self._fill_recent_menu)
        m.addSeparator()
        m.addAction(self.act_snapshot)
        m.addAction(self.act_snapshot_dir)
        m.addAction(self.act_record)
        m.addSeparator()
        m.addAction(self.act_quit)

        self.source_menu = mb.addMenu("&Source")
        self.source_menu.aboutToShow.connect(self._fill_source_menu)
        self._fill_source_menu()

        self.model_menu = mb.addMenu("&Model")
        self.model_menu.aboutToShow.connect(self._fill_model_menu)
        self._fill_model_menu()

        self.backend_menu = mb.addMenu("&Backend")
        self.backend_menu.setToolTipsVisible(True)
        self.backend_group = QActionGroup(self)
        self.backend_group.setExclusive(True)
        self.backend_actions: dict[str, QAction] = {}
        reasons = {"auto": None, **available_backends()}
        for name in ("auto", *BACKENDS):
            act = QAction(BACKEND_NAMES.get(name, name), self, checkable=True)
            act.setData(name)
            reason = reasons.get(name)
            if reason:
                act.setEnabled(False)
                act.setToolTip(f"Unavailable: {reason}")
                act.setText(f"{BACKEND_NAMES.get(name, name)} (unavailable)")
            elif name == "auto":
                act.setToolTip("TensorRT on a GPU when installed, else ONNX Runtime on the CPU, else PyTorch")
            else:
                act.setToolTip(f"Run the model with {BACKEND_NAMES[name]}")
            act.triggered.connect(lambda _=False, n=name: self.choose_backend(n))
            self.backend_group.addAction(act)
            self.backend_menu.addAction(act)
            self.backend_actions[name] = act
            if name == "auto":
                self.backend_menu.addSeparator()
        self.backend_menu.addSeparator()
        self.act_device = QAction("Device: no model loaded", self)
        self.act_device.setEnabled(False)
        self.backend_menu.addAction(self.act_device)

        v = mb.addMenu("&View")
        for dock in self.docks.values():
            v.addAction(dock.toggleViewAction())
        v.addAction(self.toolbar.toggleViewAction())
        v.addSeparator()
        v.addAction(self.act_labels)
        v.addAction(self.act_keypoints)
        v.addSeparator()
        win = v.addMenu("&Timeline window")
        for s in (10, 30, 60, 120, 300):
            win.addAction(QAction(f"{s} s", self, triggered=lambda _=False, s=s: self.timeline.window.setValue(s)))
        v.addSeparator()
        v.addAction(self.act_fullscreen)
        v.addAction(self.act_reset_layout)

        h = mb.addMenu("&Help")
        h.addAction(self.act_about)

    def _build_statusbar(self) -> None:
        sb = self.statusBar()
        sb.setSizeGripEnabled(True)

        def lab(tip: str, min_chars: int = 0) -> QLabel:
            w = QLabel(self)
            w.setToolTip(tip)
            w.setContentsMargins(8, 0, 8, 0)
            if min_chars:
                w.setMinimumWidth(w.fontMetrics().horizontalAdvance("0" * min_chars) + 16)
            w.setStyleSheet("QLabel { border-left: 1px solid palette(mid); }")
            sb.addPermanentWidget(w)
            return w

        self.sb_rec = lab("Recording to CSV")
        self.sb_rec.setStyleSheet("color: #c53030; font-weight: bold;")
        self.sb_rec.hide()
        self.sb_capture = lab("Frames captured and processed per second", 13)
        self.sb_display = lab("Frames drawn per second", 12)
        self.sb_infer = lab("Model inference time per face (and face detection time per frame)", 20)
        self.sb_faces = lab("Faces found in the current frame", 7)
        self.sb_model = lab("The model in use")
        self.sb_backend = lab("Inference backend and device")

        # a backend being built (a TensorRT engine takes minutes): shown while it builds, the current backend
        # keeps running meanwhile
        self.sb_build = QWidget(self)
        self.sb_build.setToolTip("Preparing the new inference backend; the current one keeps running until it "
                                 "is ready")
        row = QHBoxLayout(self.sb_build)
        row.setContentsMargins(8, 0, 8, 0)
        row.setSpacing(6)
        self.build_bar = QProgressBar(self.sb_build)
        self.build_bar.setRange(0, 0)
        self.build_bar.setFixedWidth(110)
        self.build_bar.setMaximumHeight(max(12, self.fontMetrics().height()))
        self.build_bar.setTextVisible(False)
        self.build_bar.setFormat("%p %")
        self.build_label = QLabel(self.sb_build)
        self.build_label.setMaximumWidth(self.build_label.fontMetrics().horizontalAdvance("0" * 40))
        row.addWidget(self.build_bar)
        row.addWidget(self.build_label)
        sb.insertPermanentWidget(0, self.sb_build)
        self.sb_build.hide()

    # ================================================================== startup / settings
    def _restore_settings(self) -> None:
        s = self.settings
        if self.options.restore_layout:
            geo = s.q.value("window/geometry")
            if isinstance(geo, QByteArray) and not geo.isEmpty():
                self.restoreGeometry(geo)
            else:
                self.resize(1400, 860)
            state = s.q.value("window/state")
            if isinstance(state, QByteArray) and not state.isEmpty():
                self.restoreState(state)
        else:
            self.resize(1400, 860)
        for w in (self.smoothing_slider, self.conf_spin, self.max_faces_spin, self.detector_combo):
            w.blockSignals(True)
        self.smoothing_slider.setValue(int(round(100 * min(0.95, max(0.0, s.get_float("pipeline/smoothing", 0.5))))))
        self.smoothing_value.setText(f"{self.smoothing_slider.value() / 100:.2f}")
        self.conf_spin.setValue(s.get_float("pipeline/min_confidence", 0.5))
        self.max_faces_spin.setValue(s.get_int("pipeline/max_faces", 0))
        det = self.options.detector or s.get_str("pipeline/detector", "short")
        idx = self.detector_combo.findData(det)
        self.detector_combo.setCurrentIndex(max(0, idx))
        for w in (self.smoothing_slider, self.conf_spin, self.max_faces_spin, self.detector_combo):
            w.blockSignals(False)
        self.act_loop.setChecked(self.options.loop if self.options.loop is not None else s.get_bool("source/loop", False))
        self.act_fast.setChecked(self.options.fast if self.options.fast is not None else s.get_bool("source/fast", False))
        self.act_labels.setChecked(s.get_bool("view/labels", True))
        self.act_keypoints.setChecked(s.get_bool("view/keypoints", False))
        backend = self.options.backend or s.get_str("model/backend", "auto")
        if backend not in self.backend_actions or not self.backend_actions[backend].isEnabled():
            if self.options.backend and backend in self.backend_actions:
                reason = self.backend_actions[backend].toolTip().removeprefix("Unavailable: ")
                self.statusBar().showMessage(f"{BACKEND_NAMES.get(backend, backend)} is unavailable ({reason}); "
                                             "using the automatic choice", 15000)
                log.warning("backend %s unavailable (%s); using auto", backend, reason)
            backend = "auto"
        self.backend_choice = backend
        self._running_choice = backend
        self.backend_actions[backend].setChecked(True)

    def save_settings(self) -> None:
        s = self.settings
        s.set("window/geometry", self.saveGeometry())
        s.set("window/state", self.saveState())
        s.set("pipeline/smoothing", self.smoothing_slider.value() / 100)
        s.set("pipeline/min_confidence", self.conf_spin.value())
        s.set("pipeline/max_faces", self.max_faces_spin.value())
        s.set("pipeline/detector", self.detector_combo.currentData())
        s.set("model/backend", self.backend_choice)
        s.set("source/loop", self.act_loop.isChecked())
        s.set("source/fast", self.act_fast.isChecked())
        s.set("view/labels", self.act_labels.isChecked())
        s.set("view/keypoints", self.act_keypoints.isChecked())
        s.set("view/window_s", self.timeline.window_s)
        if self.source_spec is not None:
            s.set("source/last", self.source_spec.to_setting())
        s.sync()

    def _start(self) -> None:
        # model: --checkpoint, else the last one used, else the shipped default
        path: Path | None = None
        if self.options.checkpoint:
            path = Path(self.options.checkpoint)
        else:
            last = self.settings.get_str("model/last")
            if last and Path(last).is_file():
                path = Path(last)
            else:
                path = default_model_path()
        if path is not None:
            self.open_checkpoint(path, interactive=False)
        else:
            self._show_no_model()
        # source: --camera/--video/--folder, else the last one, else camera 0
        spec = self.options.source
        if spec is None:
            spec = SourceSpec.from_setting(self.settings.get_str("source/last"))
            if spec is not None and spec.kind != "camera" and not Path(str(spec.value)).exists():
                spec = None
        if spec is None:
            spec = SourceSpec("camera", 0)
        if self.options.wait_for_model and self.loader.busy:
            self._pending_source = spec
            self.no_source.set_message("Loading the model…", "")
        else:
            self.open_source(spec)
        if self.options.probe_cameras:
            self.probe_cameras()
        else:
            self.cameras = []

    def worker_options(self) -> dict:
        return {"smoothing": self.smoothing_slider.value() / 100, "min_confidence": self.conf_spin.value(),
                "max_faces": self.max_faces_spin.value()}

    # ================================================================== sources
    def open_source(self, spec: SourceSpec) -> None:
        self.source_spec = spec
        self.ended = False
        self.source_bar.clear()
        self.video.overlay_text = ""
        self.no_source.set_message(f"Opening {spec.label}…", "")
        if not self.video.has_frame or self.stack.currentWidget() is not self.video:
            self.stack.setCurrentWidget(self.no_source)
        if self.act_pause.isChecked():
            self.act_pause.setChecked(False)
        self._source_request += 1
        self.worker.open_source(spec, self._source_request)
        self.statusBar().showMessage(f"Opening {spec.label}…", 3000)

    def open_video(self, path: str | Path) -> None:
        self.open_source(SourceSpec("video", str(path)))

    def open_folder(self, path: str | Path) -> None:
        self.open_source(SourceSpec("folder", str(path)))

    def open_camera(self, index: int) -> None:
        self.open_source(SourceSpec("camera", int(index)))

    def choose_video(self) -> None:
        start = self.settings.get_str("source/video_dir") or str(Path.home())
        path, _ = QFileDialog.getOpenFileName(self, "Open video", start, VIDEO_FILTER)
        if path:
            self.settings.set("source/video_dir", str(Path(path).parent))
            self.open_video(path)

    def choose_folder(self) -> None:
        start = self.settings.get_str("source/folder_dir") or str(Path.home())
        path = QFileDialog.getExistingDirectory(self, "Open a folder of images", start)
        if path:
            self.settings.set("source/folder_dir", str(Path(path).parent))
            self.open_folder(path)

    def _retry_source(self) -> None:
        if self.source_spec is not None:
            self.open_source(self.source_spec)
        else:
            self.open_camera(0)

    def restart(self) -> None:
        self.ended = False
        self.source_bar.clear()
        self.video.overlay_text = "Paused" if self.act_pause.isChecked() else ""
        if self.source_spec is not None and self.worker.source_spec is None:
            self.open_source(self.source_spec)  # the source had failed or closed: open it again
        else:
            self.worker.restart()

    def set_paused(self, paused: bool) -> None:
        if self.act_pause.isChecked() != paused:
            self.act_pause.setChecked(paused)  # re-enters through toggled
            return
        self.worker.set_paused(paused)
        st = self.style()
        self.act_pause.setText("Resume" if paused else "Pause")
        self.act_pause.setIcon(st.standardIcon(QStyle.StandardPixmap.SP_MediaPlay if paused
                                               else QStyle.StandardPixmap.SP_MediaPause))
        if not self.ended:
            self.video.overlay_text = "Paused" if paused else ""
            self.video.update()

    def _on_loop_toggled(self, on: bool) -> None:
        if not hasattr(self, "worker"):
            return  # restoring settings: the worker is created with the value
        self.worker.loop = on
        if on and self.ended:
            self.restart()

    def _on_fast_toggled(self, on: bool) -> None:
        if hasattr(self, "worker"):
            self.worker.realtime = not on
            self.worker.set_paused(self.act_pause.isChecked())  # re-anchors the playback clock

    def _on_source_opened(self, info: SourceInfo) -> None:
        if info.request != self._source_request:
            return
        self.source_info = info
        self.state.reset()
        self._shown_serial = -1
        self.settings.set("source/last", info.spec.to_setting())
        detail = f"{info.name}"
        if info.fps:
            detail += f" · {info.fps:.3g} fps"
        if info.frame_count:
            detail += f" · {info.frame_count} frames"
        self.statusBar().showMessage(f"Opened {detail}", 5000)
        self._update_title()

    def _on_source_failed(self, spec: SourceSpec | None, message: str, request: int = 0) -> None:
        if request != self._source_request:
            return
        label = spec.label if spec is not None else "the source"
        cams = self.cameras or []
        if spec is not None and spec.kind == "camera":
            if self.video.has_frame and self.source_info is not None and self.source_info.spec == spec:
                title = f"{label} stopped"
            elif not cams and self.cameras is not None:
                title = "No camera found"
            else:
                title = f"{label} is not available"
            retry = "Try the camera again"
        else:
            title = f"Cannot open {label}"
            retry = "Try again"
        hint = "Open a video file or a folder of images instead, or pick a camera in the Source menu."
        log.info("%s: %s", title, message)
        self._note_problem(message if label.lower() in message.lower() else f"{label}: {message}")
        self.no_source.set_message(title, f"{_esc(message)}<br><br>{hint}", retry)
        self.stack.setCurrentWidget(self.no_source)
        self.video.clear()
        self.statusBar().showMessage(f"{title}: {message}", 10000)
        self._update_title()

    def _on_end_of_stream(self, message: str, request: int = 0) -> None:
        if request != self._source_request:
            return
        self.ended = True
        n = self.last_packet.processed if self.last_packet is not None else 0
        name = self.source_info.name if self.source_info else "source"
        self.video.overlay_text = "End of video" if self.source_spec and self.source_spec.kind == "video" \
            else "End of images"
        self.video.update()
        if self.source_spec is not None and self.source_spec.kind == "folder":
            what = f"End of the images in <b>{_esc(name)}</b> ({n} image{'s' if n != 1 else ''})"
        else:
            what = f"End of <b>{_esc(name)}</b> ({n} frame{'s' if n != 1 else ''})"
        self.source_bar.show_message(
            f"{what}. Replay it, loop it, or open another source.", "info",
            [("Replay", self.restart), ("Loop", lambda: self.act_loop.setChecked(True)),
             ("Open video…", self.choose_video)])
        self.statusBar().showMessage(f"End of {name}", 5000)

    def probe_cameras(self) -> None:
        """List the cameras on a background thread (a slow driver cannot freeze the window)."""
        self.cameras = None

        def run() -> None:
            from ferengine.sources import list_cameras

            try:
                found = list_cameras()
            except Exception:  # noqa: BLE001
                log.exception("listing cameras")
                found = []
            try:
                self._camerasFound.emit(found)
            except RuntimeError:  # the window is gone
                pass

        threading.Thread(target=run, name="fer-list-cameras", daemon=True).start()

    def _on_cameras_found(self, cams: list) -> None:
        self.cameras = list(cams)
        if self.stack.currentWidget() is self.no_source and self.source_spec and self.source_spec.kind == "camera" \
                and not cams and self.no_source.title.text().endswith("not available"):
            self.no_source.title.setText("No camera found")

    def _fill_source_menu(self) -> None:
        m = self.source_menu
        m.clear()
        m.addSection("Cameras")
        if self.cameras is None:
            a = m.addAction("Looking for cameras…")
            a.setEnabled(False)
        elif not self.cameras:
            a = m.addAction("No cameras found")
            a.setEnabled(False)
        else:
            for i in self.cameras:
                a = m.addAction(f"Camera {i}", lambda i=i: self.open_camera(i))
                a.setCheckable(True)
                a.setChecked(self.source_spec == SourceSpec("camera", i))
        m.addAction(self.act_rescan)
        m.addSection("Files")
        m.addAction(self.act_open_video)
        m.addAction(self.act_open_folder)
        m.addSeparator()
        m.addAction(self.act_pause)
        m.addAction(self.act_restart)
        m.addAction(self.act_loop)
        m.addAction(self.act_fast)

    # ================================================================== frames
    def _on_frame(self, packet: FramePacket) -> None:
        try:
            if self._closed or packet.request != self._source_request:
                return  # closing, or a frame of a source that has been replaced
            self._show_packet(packet)
        finally:
            self.worker.ack()

    def _show_packet(self, packet: FramePacket) -> None:
        if packet.source_serial != self._shown_serial:
            self._shown_serial = packet.source_serial
            self.state.reset()
            if self.stack.currentWidget() is not self.video:
                self.stack.setCurrentWidget(self.video)
        if packet.has_model != self.state.has_model and not packet.has_model:
            pass
        self.state.update(packet.results, packet.timeline)
        self.last_packet = packet
        self.frames_shown += 1
        self._display_rate.tick()
        face = self.state.current_face()
        self.video.set_frame(packet.image, packet.display, packet.display_size, packet.result.faces,
                             face.face_id if face is not None else None)
        self._update_plots(face, packet.has_model)
        self.frameShown.emit(packet)

    def _update_plots(self, face, has_model: bool) -> None:
        st = self.state
        if not has_model or self.bundle is None:
            self.prob_chart.set_probs(None, None, "No model loaded — detection only" if not self.loader.busy
                                      else "Loading the model…")
        elif face is None:
            self.prob_chart.set_probs(None, None, "No face in view")
        elif face.probs is None:  # a valence/arousal-only model: no categories, no bars (the chart says so)
            self.prob_chart.set_probs(None, None, "Valence/arousal model")
        else:
            self.prob_chart.set_probs(face.probs, face)
        fid = face.face_id if face is not None and has_model else None
        age, v, a = st.trail(fid)
        self.av_plane.set_trajectory(face if fid is not None else None, age, v, a, st.av_source, st.trail_s)
        t, v, a = st.series(fid)
        self.timeline.set_series(face if fid is not None else None, t, v, a, st.av_source)
        if fid is None:
            msg = "No model loaded" if not has_model else "No face in view"
            self.av_plane.set_caption(f'<span style="color:#777">{msg}</span>')
            self.timeline.set_caption(f'<span style="color:#777">{msg}</span>')

    def _on_face_clicked(self, x: float, y: float) -> None:
        fid = self.state.select_at(x, y)
        face = self.state.current_face()
        self.video.set_selected(face.face_id if face is not None else None)
        if self.last_packet is not None:
            self._update_plots(face, self.last_packet.has_model)
        self.statusBar().showMessage(f"Selected face #{fid}" if fid is not None
                                     else "Selection cleared: showing the largest face", 3000)

    def _on_window_changed(self, seconds: float) -> None:
        self.state.set_window(seconds)
        self.settings.set("view/window_s", seconds)

    def _on_view_options(self) -> None:
        self.video.style_opts.show_labels = self.act_labels.isChecked()
        self.video.style_opts.show_keypoints = self.act_keypoints.isChecked()
        self.video.update()

    def _on_controls(self) -> None:
        self.smoothing_value.setText(f"{self.smoothing_slider.value() / 100:.2f}")
        if hasattr(self, "worker"):
            self.worker.set_options(**self.worker_options())

    def _on_detector_changed(self) -> None:
        if hasattr(self, "worker"):
            self.worker.set_detector_model(self.detector_combo.currentData())

    def _on_detector_switched(self, name: str) -> None:
        self.statusBar().showMessage(f"Face detector: {name} range", 4000)

    def _refresh_status(self) -> None:
        p = self.last_packet
        live = p is not None and not self.ended and not self.act_pause.isChecked() \
            and self.stack.currentWidget() is self.video
        cap = p.capture_fps if live else 0.0
        self.sb_capture.setText(f"capture {cap:4.1f} fps")
        self.sb_display.setText(f"display {self._display_rate.rate() if live else 0.0:4.1f} fps")
        if p is not None:
            t = p.result.timings
            n = len(p.result.faces)
            infer = (t.get("preprocess_ms", 0.0) + t.get("infer_ms", 0.0)) / n if n and p.has_model else None
            det = t.get("detect_ms", 0.0)
            self.sb_infer.setText(f"{infer:.1f} ms/face · detect {det:.1f} ms" if infer is not None
                                  else f"detect {det:.1f} ms")
            self.sb_faces.setText(f"{n} face{'s' if n != 1 else ''}")
        else:
            self.sb_infer.setText("")
            self.sb_faces.setText("")

    # ================================================================== model / backend
    def choose_checkpoint(self) -> None:
        start = self.settings.get_str("model/dir") or str(Path.home())
        path, _ = QFileDialog.getOpenFileName(self, "Open checkpoint", start, CHECKPOINT_FILTER)
        if path:
            self.settings.set("model/dir", str(Path(path).parent))
            self.open_checkpoint(path)

    def open_checkpoint(self, path: str | Path, interactive: bool = True) -> None:
        """Load a checkpoint on a background thread; the current model stays in use until it is ready, and
        stays if it fails (a dialog says why when ``interactive``)."""
        path = Path(path)
        # a backend still being built for the current model is moot: the new model gets its own
        self._supersede_backend_build()
        self._model_request = self.loader.load(path, self.backend_choice, self.options.device)
        self._model_request_choice = self.backend_choice
        self._model_request_interactive = interactive
        self.model_bar.show_message(f"Loading model <b>{_esc(path.name)}</b>…", "info")
        self.statusBar().showMessage(f"Loading {path}…")

    def _on_model_loaded(self, rid: int, bundle: ModelBundle) -> None:
        if rid == self._build_request:
            self._hide_build()
        if rid != self._model_request or self._closed:
            bundle.backend.close()
            return
        self._running_choice = self._model_request_choice
        self.worker.set_model(bundle)
        self.settings.set("model/last", str(bundle.path.resolve()))
        self.settings.add_recent_checkpoint(bundle.path)
        self._start_pending_source()

    def _on_load_failed(self, rid: int, what: str, message: str) -> None:
        if rid == self._build_request:
            self._hide_build()
        if what == "backend":
            if rid != self._backend_request:
                return  # superseded by a later choice
            self._backend_request = 0
            self._on_backend_failed(self._backend_request_name, message)
            return
        if rid != self._model_request:
            return
        self._last_model_error = message
        interactive = self._model_request_interactive
        log.info("the checkpoint could not be loaded: %s", message)
        self._note_problem(f"the checkpoint could not be used: {message}")
        self._restore_model_bar()
        if interactive:
            self.statusBar().showMessage("The checkpoint could not be loaded; the current model is still in use",
                                         8000)
            self._error_box("Cannot open checkpoint", message)
        else:
            self.statusBar().showMessage(f"The checkpoint could not be loaded: {message}", 15000)
            if self.bundle is None:
                self.model_bar.show_message(
                    f"<b>No model loaded</b> — the checkpoint could not be loaded: {_esc(message)}<br>"
                    "Faces are detected but not analysed. Use <b>File &gt; Open checkpoint…</b>", "error",
                    [("Open checkpoint…", self.choose_checkpoint)])
        self._start_pending_source()

    def _start_pending_source(self) -> None:
        if self._pending_source is not None:
            spec, self._pending_source = self._pending_source, None
            self.open_source(spec)

    def _show_no_model(self) -> None:
        self.model_bar.show_message(
            "<b>No model loaded — File &gt; Open checkpoint…</b> &nbsp;Faces are detected but their "
            "expressions are not analysed until a model is loaded.", "warning",
            [("Open checkpoint…", self.choose_checkpoint)])

    def _restore_model_bar(self) -> None:
        if self.bundle is None:
            self._show_no_model()
        elif self.bundle.note:
            self.model_bar.show_message(_esc(self.bundle.note), "warning")
        else:
            self.model_bar.clear()

    def _on_model_changed(self, bundle: ModelBundle | None) -> None:
        self.bundle = bundle
        self.backend_obj = bundle.backend if bundle is not None else None
        if bundle is None:
            self.state.set_model((), False)
            self.prob_chart.set_labels(())
        else:
            info = bundle.loaded.info
            labels = tuple(info.labels) if "expression" in info.heads else ()
            self.state.set_model(labels, True)
            self.prob_chart.set_labels(labels, av_only=not labels and info.has_av_head)
            self.statusBar().showMessage(f"Model {bundle.name} loaded in {bundle.load_s:.1f} s", 5000)
            from ferengine.checkpoint import crop_note

            note = crop_note(info)
            if note:
                log.info("%s", note)
        self._restore_model_bar()
        self._on_backend_changed(self.backend_obj)
        self._update_title()

    def unload_model(self) -> None:
        self._model_request = -1
        self._supersede_backend_build()
        self.worker.set_model(None)

    def choose_backend(self, name: str) -> None:
        """Build ``name``'s backend for the current model in the background (a TensorRT engine can take
        minutes: the status bar shows its progress); the backend in use keeps running until the new one is
        ready, and stays when it fails. A later choice supersedes a build still running (its result is closed)."""
        self.backend_choice = name
        self.settings.set("model/backend", name)
        if self.bundle is None:
            self._running_choice = name  # used by the next checkpoint load
            return
        self._backend_request = self.loader.make_backend(self.bundle.loaded, name, self.options.device)
        self._backend_request_name = name
        self._backend_request_loaded = self.bundle.loaded
        label = BACKEND_NAMES.get(name, name)
        # in the build widget only: a temporary status message beside it has no room and shows as a cut-off letter
        self.statusBar().clearMessage()
        self._show_build(self._backend_request, None, f"Switching to {label}…"
                         + (f" (still running {backend_label(self.backend_obj)})" if self.backend_obj is not None
                            else ""))

    def _supersede_backend_build(self) -> None:
        if self._backend_request and self._build_request == self._backend_request:
            self._hide_build()
        self._backend_request = 0  # whatever it still delivers is closed, not used

    def _on_backend_ready(self, rid: int, backend) -> None:
        if rid == self._build_request:
            self._hide_build()
        if (rid != self._backend_request or self._closed or self.bundle is None
                or self._backend_request_loaded is not self.bundle.loaded):
            backend.close()  # superseded (another choice, another model) or closing
            return
        self._backend_request = 0
        self._running_choice = self._backend_request_name
        self.worker.set_backend(backend)

    def _on_backend_failed(self, name: str, message: str) -> None:
        """The chosen backend cannot be built: the one in use keeps running, the menu goes back to it."""
        what = BACKEND_NAMES.get(name, name)
        running = backend_label(self.backend_obj) if self.backend_obj is not None else "without a model backend"
        text = f"{what} could not be used: {message}; still running {running}"
        log.warning("%s", text)
        self._note_problem(text)
        self.statusBar().showMessage(text, 20000)
        if not self._closed:
            self.model_bar.show_message(_esc(text), "warning", [("Dismiss", self._restore_model_bar)])
        self.backend_choice = self._running_choice
        self.settings.set("model/backend", self.backend_choice)
        if self.backend_choice == "auto" or self.backend_obj is None:
            self._check_backend_action(self.backend_choice)
        else:
            self._check_backend_action(self.backend_obj.name)

    # ------------------------------------------------------------ build progress (status bar)
    def _on_build_progress(self, rid: int, fraction, message: str) -> None:
        if self._closed:
            return
        if rid == self._build_request and rid in (self._backend_request, self._model_request):
            self._show_build(rid, fraction, message)  # the backend switch in progress
        elif rid == self._model_request and self._build_request == 0:
            self._show_build(rid, fraction, message)  # a checkpoint load that builds a TensorRT engine

    def _show_build(self, rid: int, fraction, message: str) -> None:
        self._build_request = rid
        text = str(message or "Preparing the backend…")
        fm = self.build_label.fontMetrics()
        width = self.build_label.maximumWidth() - 4
        self.build_label.setText(fm.elidedText(text, Qt.TextElideMode.ElideMiddle, width))  # keeps "3/10"
        if fraction is None:
            self.build_bar.setRange(0, 0)  # busy: how far is unknown
            self.build_bar.setTextVisible(False)
        else:
            self.build_bar.setRange(0, 1000)
            self.build_bar.setValue(int(round(1000 * min(1.0, max(0.0, float(fraction))))))
            self.build_bar.setTextVisible(True)
            text = f"{text} ({100 * float(fraction):.0f} %)"
        self.build_label.setToolTip(text)
        self.sb_build.show()

    def _hide_build(self) -> None:
        self._build_request = 0
        self.sb_build.hide()
        self.build_label.setText("")

    @property
    def build_text(self) -> str:
        """The full progress message shown while a backend builds ("" when none is)."""
        return self.build_label.toolTip() if self.sb_build.isVisibleTo(self) else ""

    def _on_backend_changed(self, backend) -> None:
        self.backend_obj = backend
        if backend is None:
            self.sb_backend.setText("")
            self.act_device.setText("Device: no model loaded")
            self.sb_model.setText("no model")
            return
        self.sb_backend.setText(backend_label(backend))
        self.act_device.setText(f"Device: {backend.device}")
        if self.bundle is not None:
            self._show_model_name()
        if self.backend_choice != "auto":
            self._check_backend_action(backend.name)
        self.statusBar().showMessage(f"Inference on {self.sb_backend.text()}", 4000)

    def _check_backend_action(self, name: str) -> None:
        act = self.backend_actions.get(name)
        if act is not None and act.isEnabled():
            act.setChecked(True)

    def _fill_recent_menu(self) -> None:
        m = self.recent_menu
        m.clear()
        recent = self.settings.recent_checkpoints()
        if not recent:
            a = m.addAction("No recent checkpoints")
            a.setEnabled(False)
            return
        current = str(self.bundle.path.resolve()) if self.bundle is not None else None
        for p in recent:
            a = m.addAction(Path(p).name, lambda p=p: self.open_checkpoint(p))
            a.setToolTip(p)
            a.setCheckable(True)
            a.setChecked(p == current)
        m.addSeparator()
        m.addAction("Clear the list", lambda: self.settings.set("model/recent", []))

    def _fill_model_menu(self) -> None:
        m = self.model_menu
        m.clear()
        m.setToolTipsVisible(True)
        current = str(self.bundle.path.resolve()) if self.bundle is not None else None
        m.addSection("Shipped models")
        shipped = shipped_models()
        if not shipped:
            a = m.addAction("No trained model shipped yet")
            a.setEnabled(False)
        for p in shipped:
            a = m.addAction(p.stem, lambda p=p: self.open_checkpoint(p))
            a.setToolTip(str(p))
            a.setCheckable(True)
            a.setChecked(str(p.resolve()) == current)
        m.addSection("Recent checkpoints")
        shipped_keys = {str(p.resolve()) for p in shipped}
        recent = [p for p in self.settings.recent_checkpoints() if p not in shipped_keys]
        if not recent:
            a = m.addAction("None yet")
            a.setEnabled(False)
        for p in recent:
            a = m.addAction(Path(p).name, lambda p=p: self.open_checkpoint(p))
            a.setToolTip(p)
            a.setCheckable(True)
            a.setChecked(p == current)
        m.addSeparator()
        m.addAction(self.act_open_ckpt)
        m.addAction(self.act_model_info)
        m.addAction(self.act_unload)
        self.act_model_info.setEnabled(self.bundle is not None)
        self.act_unload.setEnabled(self.bundle is not None)

    def show_model_details(self) -> None:
        if self.bundle is None:
            return
        info = self.bundle.loaded.info
        rows = [("File", str(self.bundle.path)), ("Name", info.name or "—"), ("Architecture", info.arch),
                ("Heads", ", ".join(HEAD_NAMES.get(h, h) for h in info.heads)),
                ("Classes", ", ".join(info.labels) if "expression" in info.heads and info.labels
                 else "none: this model predicts valence/arousal only"),
                ("Input", f"{info.input.size}×{info.input.size}, {info.input.channels} channel(s)"),
                ("Training", str(info.training.get("command", "—"))),
                ("Metrics", _metrics_text(info.metrics))]
        html = "<table>" + "".join(f"<tr><td><b>{k}</b>&nbsp;&nbsp;</td><td>{_esc(v)}</td></tr>" for k, v in rows) \
            + "</table>"
        QMessageBox.information(self, "Model details", html)

    # ================================================================== snapshot / record
    def snapshot(self) -> Path | None:
        p = self.last_packet
        if p is None or not self.video.has_frame:
            self.statusBar().showMessage("Nothing to snapshot yet: no frame has been shown", 5000)
            return None
        face = self.state.current_face()
        img = render_annotated(p.image, p.result.faces, face.face_id if face is not None else None,
                               self.video.style_opts)
        folder = self.settings.snapshot_dir()
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            self._error_box("Snapshot not saved", f"Cannot create the folder {folder}: {exc}")
            return None
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = folder / f"fer-desktop_{stamp}_frame{p.result.index:06d}.png"
        n = 1
        while path.exists():
            n += 1
            path = folder / f"fer-desktop_{stamp}_frame{p.result.index:06d}_{n}.png"
        if not img.save(str(path), "PNG"):
            self._error_box("Snapshot not saved", f"Cannot write {path}")
            return None
        self.last_snapshot = path
        self.statusBar().showMessage(f"Snapshot saved to {path}", 10000)
        return path

    def choose_snapshot_dir(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Save snapshots in", str(self.settings.snapshot_dir()))
        if path:
            self.settings.set("snapshot/dir", path)
            self.statusBar().showMessage(f"Snapshots will be saved in {path}", 6000)

    def _on_record_toggled(self, checked: bool) -> None:
        if not checked:
            self.stop_recording()
            return
        self.act_record.setChecked(False)  # checked again once the worker has started the file
        if self.bundle is None:
            self.statusBar().showMessage("Recording needs a model: File > Open checkpoint… first", 8000)
            self._error_box("Nothing to record", "Recording needs a model: open a checkpoint first "
                                                 "(File > Open checkpoint…).")
            return
        start = Path(self.settings.get_str("record/dir") or Path.home()) / time.strftime("fer-results_%Y%m%d-%H%M%S.csv")
        path, _ = QFileDialog.getSaveFileName(self, "Record results to CSV", str(start), "CSV files (*.csv)")
        if path:
            if not path.lower().endswith(".csv"):
                path += ".csv"
            self.settings.set("record/dir", str(Path(path).parent))
            self.start_recording(path)

    def start_recording(self, path: str | Path) -> None:
        self.worker.start_recording(path)

    def stop_recording(self) -> None:
        self.worker.stop_recording()

    def _on_recording_started(self, path: str) -> None:
        self.recording_path = path
        self.act_record.blockSignals(True)
        self.act_record.setChecked(True)
        self.act_record.blockSignals(False)
        self.act_record.setText("Stop recording")
        self.sb_rec.setText(f"● REC {Path(path).name}")
        self.sb_rec.setToolTip(f"Recording to {path}")
        self.sb_rec.show()
        self.statusBar().showMessage(f"Recording to {path}", 5000)

    def _on_recording_stopped(self, path: str, rows: int, reason: str) -> None:
        self.recording_path = None
        self.act_record.blockSignals(True)
        self.act_record.setChecked(False)
        self.act_record.blockSignals(False)
        self.act_record.setText("&Record CSV…")
        self.sb_rec.hide()
        msg = f"Recorded {rows} rows to {path}" + (f" (stopped: {reason})" if reason else "")
        self.statusBar().showMessage(msg, 12000)
        if reason and not self._closed:
            self.source_bar.show_message(_esc(msg), "info")

    def _on_recording_failed(self, message: str) -> None:
        self._note_problem(message)
        self._on_recording_stopped_ui()
        self.statusBar().showMessage(message, 12000)
        if not self._closed:
            self.source_bar.show_message(_esc(message), "error")

    def _on_recording_stopped_ui(self) -> None:
        self.recording_path = None
        self.act_record.blockSignals(True)
        self.act_record.setChecked(False)
        self.act_record.blockSignals(False)
        self.sb_rec.hide()

    # ================================================================== misc
    def _note_problem(self, message: str) -> None:
        if message not in self.problems:
            self.problems.append(message)

    def _on_worker_error(self, message: str) -> None:
        self._note_problem(message)
        self.statusBar().showMessage(message, 12000)
        if not self._closed:
            self.source_bar.show_message(_esc(message), "error")

    def show_internal_error(self, text: str) -> None:
        """An unexpected exception in the GUI thread (reported by fer-desktop's error boundary): say it in
        the window; the application goes on."""
        message = f"Internal error: {text} (please report it; --log-level DEBUG shows the traceback)"
        self.statusBar().showMessage(message, 15000)
        if not self._closed:
            self.source_bar.show_message(_esc(message), "error")

    def _error_box(self, title: str, text: str) -> None:
        QMessageBox.critical(self, title, text)

    def _update_title(self) -> None:
        model = self.bundle.name if self.bundle is not None else "no model"
        src = self.source_spec.label if self.source_spec is not None else None
        self.setWindowTitle(" — ".join(x for x in ("fer-desktop", model, src) if x))
        self._show_model_name()

    def _show_model_name(self) -> None:
        """The status bar's model label; it says when the checkpoint's face crop is not calibrated."""
        if self.bundle is None:
            self.sb_model.setText("model: no model")
            self.sb_model.setToolTip("")
            return
        from ferengine.checkpoint import crop_note

        info = self.bundle.loaded.info
        note = crop_note(info)
        av_only = "expression" not in info.heads
        self.sb_model.setText(f"model: {self.bundle.name}" + (" · valence/arousal only" if av_only else "")
                              + (" · crop not calibrated" if note else ""))
        self.sb_model.setToolTip(note or "")

    def reset_layout(self) -> None:
        for dock in self.docks.values():
            dock.setFloating(False)
            self.addDockWidget(Qt.DockWidgetArea.RightDockWidgetArea, dock)
            dock.show()
        self.toolbar.show()
        self._default_dock_sizes()

    def show_about(self) -> None:
        from ferengine.labels import AV_ANCHOR_SOURCE

        QMessageBox.about(self, "About fer-desktop", (
            f"<h3>fer-desktop {__version__}</h3><p>Real-time facial-expression recognition: face detection "
            "(MediaPipe BlazeFace), per-face class probabilities and valence/arousal.</p>"
            f"<p><b>Valence/arousal estimated from categories</b> uses the class anchors of {_esc(AV_ANCHOR_SOURCE)}.</p>"))

    # ================================================================== drag and drop
    def dragEnterEvent(self, event) -> None:
        if event.mimeData().hasUrls() and any(u.isLocalFile() for u in event.mimeData().urls()):
            event.acceptProposedAction()

    def dropEvent(self, event) -> None:
        paths = [Path(u.toLocalFile()) for u in event.mimeData().urls() if u.isLocalFile()]
        if paths:
            self.open_path(paths[0])
            event.acceptProposedAction()

    def open_path(self, path: str | Path) -> None:
        """Open whatever ``path`` is: a checkpoint, a folder of images, or a video (drag and drop)."""
        path = Path(path)
        if path.is_dir():
            self.open_folder(path)
        elif path.suffix.lower() in MODEL_EXTENSIONS:
            self.open_checkpoint(path)
        else:
            self.open_video(path)

    # ================================================================== shutdown
    def shutdown(self) -> bool:
        """Stop the worker (bounded wait), close the pipeline and the detector, save the settings.
        Returns True when the thread finished in time. Idempotent."""
        if self._closed:
            return self.thread.isFinished()
        self._closed = True
        self._status_timer.stop()
        if self.options.persist:
            try:
                self.save_settings()
            except Exception:  # noqa: BLE001
                log.exception("saving settings")
        self.worker.stop()
        self.thread.quit()
        ok = self.thread.wait(JOIN_TIMEOUT_MS)
        if not ok:
            log.warning("the capture thread did not stop within %.0f s", JOIN_TIMEOUT_MS / 1000)
        self.loader.close()
        return ok

    def closeEvent(self, event: QCloseEvent) -> None:
        self.shutdown()
        event.accept()


def _metrics_text(metrics: dict) -> str:
    """The model dialog's metrics: the numbers, 4 significant digits; tables (a confusion matrix, per-class
    scores) are left to ``fer info``, which prints them all."""
    nums = [f"{k} {v:.4g}" for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)]
    more = len(metrics) - len(nums)
    return ", ".join(nums + ([f"(+{more} tables: fer info)"] if more else [])) or "—"


def _esc(text: str) -> str:
    return (str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;"))
