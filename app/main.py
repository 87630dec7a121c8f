"""``fer-desktop``: the desktop application's entry point.

    fer-desktop                                   # the last source (or camera 0) and the last/default model
    fer-desktop --video clip.mp4 --checkpoint model.safetensors
    fer-desktop --video clip.mp4 --screenshot out.png --frames 120    # run 120 frames, save the window, exit

Errors, by where they arise (one rule each):

* a bad option (a malformed number, size, device, log level, a path that is not there) fails in argparse,
  before any Qt object or thread exists: one line, exit status 2;
* no display to open a window on fails before ``QApplication`` exists, with how to run headless: exit 2;
* :func:`main` is the one error boundary of the program: a known error (:class:`~ferengine.errors.FerError`,
  ``OSError``) is one line and exit 2, anything else one "internal error" line and exit 1 (the traceback
  only with ``--log-level DEBUG``), Ctrl+C exit 130 (SIGTERM 143), always after the worker threads stopped;
* inside the running GUI, a source or checkpoint that cannot be used, and even an unexpected exception in
  a Qt slot, are shown in the window (status bar, message bars, dialogs) and the application goes on; in
  ``--screenshot`` mode (no one to read the window) each failure is also one line and the exit status is 2.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

os.environ.setdefault("PYQTGRAPH_QT_LIB", "PySide6")

from ferengine.errors import FerError, InvalidValue  # noqa: E402 - no Qt, no torch: cheap
from ferengine.validate import argtype, check_device_name, check_float, check_int, check_size  # noqa: E402

log = logging.getLogger("app")

PROG = "fer-desktop"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
MIN_SIZE = (400, 300)
MAX_SIDE = 8192
MAX_TIMEOUT_S = 2_000_000.0  # QTimer takes an int of milliseconds (about 24.8 days at most)
MAX_CAMERA = 255
NO_DISPLAY = ("no display (DISPLAY/WAYLAND_DISPLAY unset): run it in a desktop session, or headless with "
              "QT_QPA_PLATFORM=offscreen (e.g. with --screenshot), or under xvfb-run")
INTERNAL_HINT = "run with --log-level DEBUG for the traceback; please report it"
# Qt warnings that say nothing to a user (the offscreen platform cannot resize native windows)
QT_NOISE = ("This plugin does not support propagateSizeHints()",)


# ------------------------------------------------------------------------------------- the options


def check_window_size(value, name: str = "size") -> tuple[int, int]:
    w, h = check_size(value, name, lo=0, hi=10 ** 9)  # the form WxH; the range is the window's:
    if not (MIN_SIZE[0] <= w <= MAX_SIDE and MIN_SIZE[1] <= h <= MAX_SIDE):
        raise InvalidValue(f"{name} must be from {MIN_SIZE[0]}x{MIN_SIZE[1]} to {MAX_SIDE}x{MAX_SIDE} pixels, "
                           f"got {value!r}")
    return w, h


def check_log_level(value, name: str = "log level") -> str:
    level = str(value).strip().upper()
    if level not in LOG_LEVELS:
        raise InvalidValue(f"{name} must be one of {', '.join(LOG_LEVELS)}, got {value!r}")
    return level


# the path checks name the path (argparse puts "argument --video: " before the message)
def _existing(value, *, folder: bool, missing: str, wrong: str) -> str:
    """``value`` as an existing folder (``folder=True``) or non-folder; the two messages say what to give."""
    path = Path(value).expanduser()
    if not path.exists():
        raise InvalidValue(f"{value}: {missing}")
    if path.is_dir() != folder:
        raise InvalidValue(f"{value}: {wrong}")
    return str(path)


def check_video_path(value) -> str:
    return _existing(value, folder=False, missing="no such file; give the path of a video file",
                     wrong="is a folder; use --folder for a folder of images")


def check_folder_path(value) -> str:
    return _existing(value, folder=True, missing="no such folder; give a folder of images",
                     wrong="not a folder; use --video for a video file")


def check_checkpoint_path(value) -> str:
    return _existing(value, folder=False, missing="no such file; give a checkpoint file (.safetensors, .pt)",
                     wrong="is a folder; give a checkpoint file (.safetensors, .pt)")


def check_png_path(value) -> str:
    path = Path(value).expanduser()
    if path.is_dir():
        raise InvalidValue(f"{value}: is a folder; give a file name such as shot.png")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent  # the folders that do not exist yet are created when the PNG is saved
    if not folder.is_dir():
        raise InvalidValue(f"{value}: {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InvalidValue(f"{value}: cannot write in {folder}; give a path in a folder you can write to")
    return str(path)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Real-time facial-expression recognition: live video with face boxes, class "
                    "probabilities and valence/arousal.",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--camera", type=argtype(check_int, name="camera", lo=0, hi=MAX_CAMERA), metavar="N",
                     help="open camera N (0 = the first)")
    src.add_argument("--video", type=argtype(check_video_path), metavar="PATH", help="open a video file")
    src.add_argument("--folder", type=argtype(check_folder_path), metavar="PATH", help="open a folder of images")
    p.add_argument("--checkpoint", "-c", type=argtype(check_checkpoint_path), metavar="FILE",
                   help="model checkpoint (default: the last one used, else the model shipped in assets/)")
    p.add_argument("--backend", choices=["auto", "torch", "onnxruntime", "tensorrt"],
                   help="inference backend (default: the last choice, else auto)")
    p.add_argument("--device", type=argtype(check_device_name), default="auto",
                   help="auto, cpu, cuda, cuda:N (default: auto)")
    p.add_argument("--detector", choices=["short", "full"],
                   help="face detector: short range (webcam distance) or full range (small/distant faces)")
    p.add_argument("--loop", action="store_true", default=None, help="loop video files")
    p.add_argument("--fast", action="store_true", default=None,
                   help="process video files as fast as possible instead of in real time")
    p.add_argument("--screenshot", type=argtype(check_png_path), metavar="PNG",
                   help="run --frames frames, save a screenshot of the whole window to PNG and exit")
    p.add_argument("--frames", type=argtype(check_int, name="frames", lo=1), default=60, metavar="N",
                   help="frames to run before --screenshot (60)")
    p.add_argument("--size", type=argtype(check_window_size), default="1400x860", metavar="WxH",
                   help=f"window size for --screenshot (1400x860; {MIN_SIZE[0]}x{MIN_SIZE[1]} to "
                        f"{MAX_SIDE}x{MAX_SIDE})")
    p.add_argument("--timeout", type=argtype(check_float, name="timeout", lo=0.0, hi=MAX_TIMEOUT_S, lo_open=True),
                   default=120.0, metavar="S",
                   help="--screenshot: save whatever is shown after S seconds at the latest (120)")
    p.add_argument("--log-level", type=argtype(check_log_level), default="WARNING",
                   help=f"logging level: {', '.join(LOG_LEVELS)} (WARNING)")
    return p


def display_problem(env=None, platform: str | None = None) -> str | None:
    """Why Qt could not open a window here (it would abort), or None. Linux only: there a window needs
    an X11 or Wayland display, or a platform plugin named in QT_QPA_PLATFORM (offscreen, vnc, ...)."""
    env = os.environ if env is None else env
    platform = sys.platform if platform is None else platform
    if not platform.startswith("linux") or env.get("QT_QPA_PLATFORM"):
        return None
    if env.get("DISPLAY") or env.get("WAYLAND_DISPLAY"):
        return None
    return NO_DISPLAY


# ------------------------------------------------------------------------------------- screenshots


def _screenshot_controller_class():
    from PySide6.QtCore import QObject, QTimer, Slot

    class ScreenshotController(QObject):
        """Runs the window until ``frames`` frames were processed (or the source ended/failed, or the
        timeout passed), then saves ``window.grab()`` to ``path`` and quits the application.

        What could not be used (the source, the checkpoint, the worker's errors) is in ``window.problems``
        (one line each, collected by the window's own slots, so nothing that failed before this controller
        existed is missed): the screenshot still shows the window as it was, but the run did not do what was
        asked, and :meth:`report` says so.

        A QObject living in the GUI thread: the worker's signals reach its slots queued, on this thread.
        """

        def __init__(self, window, path: Path, frames: int, timeout_s: float):
            super().__init__(window)
            self.window = window
            self.path = Path(path)
            self.frames = max(1, int(frames))
            self.timeout_s = timeout_s
            self.saved = False
            self.reason = ""
            self.error = ""  # why the PNG could not be written
            self._triggered = False
            window.frameShown.connect(self._on_frame)
            window.worker.endOfStream.connect(self._on_end)
            window.worker.sourceFailed.connect(self._on_failed)
            self._timeout = QTimer(self)
            self._timeout.setSingleShot(True)
            self._timeout.timeout.connect(self._on_timeout)
            self._timeout.start(int(timeout_s * 1000))

        @Slot(object)
        def _on_frame(self, packet) -> None:
            if packet.processed >= self.frames:
                self.trigger(f"{packet.processed} frames", 250)

        @Slot(str, int)
        def _on_end(self, _message: str, _request: int) -> None:
            self.trigger("end of the source", 400)

        @Slot(object, str, int)
        def _on_failed(self, _spec, _message: str, _request: int) -> None:
            self.trigger("the source failed", 400)

        @Slot()
        def _on_timeout(self) -> None:
            self.trigger(f"timeout after {self.timeout_s:g} s", 0)

        def trigger(self, reason: str, delay_ms: int) -> None:
            if self._triggered:
                return
            self._triggered = True
            last = self.window.last_packet
            self.reason = reason if last is None or reason.endswith(" frames") else \
                f"{reason}, {last.processed} frames of the current source, {self.window.frames_shown} shown"
            self.window.worker.set_paused(True)  # freeze the frame without the "Paused" overlay
            QTimer.singleShot(delay_ms, self._grab)

        @Slot()
        def _grab(self) -> None:
            from PySide6.QtWidgets import QApplication

            w = self.window
            try:
                w._refresh_status()
                QApplication.processEvents()
                self.path.parent.mkdir(parents=True, exist_ok=True)
                pixmap = w.grab()
                self.saved = pixmap.save(str(self.path), "PNG")
                self.size = (pixmap.width(), pixmap.height())
                if not self.saved:
                    self.error = f"could not write {self.path}"
            except OSError as exc:
                self.error = f"could not write {self.path}: {exc}"
            finally:
                # leave the loop only (whatever happened above: never wait for more); main() closes the
                # window after exec() returns (closing the last window inside the loop would also post a
                # Quit event that outlives this loop)
                QApplication.instance().exit(0 if self.saved else 2)

        def report(self) -> int:
            """One line per failure (or the one success line) on stderr; the exit status."""
            problems = list(self.window.problems)
            if not self.saved:
                print(f"{PROG}: error: {self.error or 'no screenshot was taken'}", file=sys.stderr)
                for message in problems:
                    print(f"{PROG}: error: {message}", file=sys.stderr)
                return 2
            if problems:
                for i, message in enumerate(problems):
                    note = f" (the window was saved anyway to {self.path})" if i == 0 else ""
                    print(f"{PROG}: error: {message}{note}", file=sys.stderr)
                return 2
            w, h = self.size
            print(f"{PROG}: screenshot ({w}x{h}, {self.reason}) -> {self.path}", file=sys.stderr)
            return 0

    return ScreenshotController


# ------------------------------------------------------------------------------------- the boundary


class NoDisplay(FerError, RuntimeError):
    """There is no display to open the window on (and no QT_QPA_PLATFORM): one line, exit status 2."""


class _Interrupted(Exception):
    """Ctrl+C or SIGTERM while the window was open: the window closed cleanly, exit with ``status``."""

    def __init__(self, status: int):
        super().__init__(status)
        self.status = status


# windows whose capture thread could not be stopped (a read blocked in a driver or a decoder): they must
# never be destroyed, or Qt aborts ("QThread: Destroyed while thread ... is still running")
_UNSTOPPED: list = []


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # a bad option: usage, one error line, exit 2 (argparse)
    # log to stderr while the app runs; undone on return, so an in-process call (tests) leaves no handler
    # bound to a stream that may be closed later
    root = logging.getLogger()
    old_level, handler = root.level, None
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    root.setLevel(getattr(logging, args.log_level))
    try:
        rc = _run(args)
    except _Interrupted as exc:
        rc = exc.status
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        rc = 130
    except (FerError, OSError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        rc = 2
    except Exception as exc:  # noqa: BLE001 - the program's one boundary for what nobody expected
        log.debug("internal error", exc_info=True)
        print(f"{PROG}: internal error: {type(exc).__name__}: {exc} ({INTERNAL_HINT})", file=sys.stderr)
        rc = 1
    finally:
        root.setLevel(old_level)
        if handler is not None:
            root.removeHandler(handler)
    if _UNSTOPPED and argv is None:
        # run as the program: leave without destroying the stuck thread (nothing else is left to do)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    return rc


def _qt_message_handler(mode, context, message: str) -> None:
    """Qt's own messages go through logging (logger ``qt``), harmless offscreen noise at DEBUG."""
    from PySide6.QtCore import QtMsgType

    levels = {QtMsgType.QtDebugMsg: logging.DEBUG, QtMsgType.QtInfoMsg: logging.INFO,
              QtMsgType.QtWarningMsg: logging.WARNING, QtMsgType.QtCriticalMsg: logging.ERROR,
              QtMsgType.QtFatalMsg: logging.CRITICAL}
    level = levels.get(mode, logging.WARNING)
    if any(noise in message for noise in QT_NOISE):
        level = logging.DEBUG
    logging.getLogger("qt").log(level, "%s", message)


def _run(args: argparse.Namespace) -> int:
    if args.device not in ("auto", "cpu"):
        from ferengine.device import DeviceError, resolve_device

        try:
            resolve_device(args.device)  # a CUDA device that is not there: one line, before Qt
        except DeviceError as exc:
            raise DeviceError(f"--device {args.device}: {exc}") from None
    problem = display_problem()
    from PySide6.QtCore import qInstallMessageHandler
    from PySide6.QtWidgets import QApplication

    if problem and QApplication.instance() is None:
        raise NoDisplay(problem)
    previous = qInstallMessageHandler(_qt_message_handler)
    try:
        return _run_app(args)
    finally:
        qInstallMessageHandler(previous)


def _run_app(args: argparse.Namespace) -> int:
    from PySide6.QtCore import QTimer
    from PySide6.QtWidgets import QApplication

    import pyqtgraph as pg

    from .icon import app_icon
    from .settings import APPLICATION, ORGANISATION
    from .window import JOIN_TIMEOUT_MS, LaunchOptions, MainWindow
    from .worker import SourceSpec

    app = QApplication.instance() or QApplication([sys.argv[0] if sys.argv else PROG])
    app.setOrganizationName(ORGANISATION)
    app.setApplicationName(APPLICATION)
    app.setWindowIcon(app_icon())
    pg.setConfigOptions(antialias=True, foreground=app.palette().windowText().color())

    source = None
    if args.camera is not None:
        source = SourceSpec("camera", args.camera)
    elif args.video:
        source = SourceSpec("video", args.video)
    elif args.folder:
        source = SourceSpec("folder", args.folder)
    shot = args.screenshot is not None
    options = LaunchOptions(
        source=source, checkpoint=args.checkpoint, backend=args.backend, device=args.device,
        detector=args.detector, loop=args.loop, fast=args.fast,
        restore_layout=not shot, persist=not shot, probe_cameras=not shot, wait_for_model=shot,
    )
    window = MainWindow(options)  # stops its own thread again if it fails half-way
    signalled: list[int] = []
    internal: list[str] = []

    def on_signal(signum, _frame) -> None:
        signalled.append(128 + signum)
        window.close()  # Qt's loop would otherwise never see it

    def gui_excepthook(etype, value, tb) -> None:
        # an exception in a Qt slot (GUI thread): say it, show it, keep running
        if issubclass(etype, KeyboardInterrupt):
            on_signal(signal.SIGINT, None)
            return
        log.debug("internal error in the GUI", exc_info=(etype, value, tb))
        text = f"{etype.__name__}: {value}"
        internal.append(text)
        print(f"{PROG}: internal error: {text} ({INTERNAL_HINT})", file=sys.stderr)
        try:
            window.show_internal_error(text)
        except Exception:  # noqa: BLE001 - the window itself is what broke
            log.debug("showing the internal error", exc_info=True)

    old_hook = sys.excepthook
    old_handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    tick = QTimer()
    controller = None
    try:
        if shot:
            window.resize(*args.size)
            controller = _screenshot_controller_class()(window, Path(args.screenshot), args.frames, args.timeout)
        window.show()
        for s in old_handlers:
            signal.signal(s, on_signal)
        sys.excepthook = gui_excepthook
        tick.timeout.connect(lambda: None)  # lets Python run its signal handlers while Qt waits
        tick.start(200)
        rc = app.exec()
    finally:
        tick.stop()
        sys.excepthook = old_hook
        for s, h in old_handlers.items():
            signal.signal(s, h)
        if not window.shutdown():  # stops and joins the capture thread (bounded wait)
            _UNSTOPPED.append(window)
            stuck = (f"the capture thread did not stop within {JOIN_TIMEOUT_MS / 1000:g} s (its source is "
                     "blocked in a read); exiting without waiting for it")
            window.problems.append(stuck)
            if controller is None:
                print(f"{PROG}: error: {stuck}", file=sys.stderr)
        window.hide()
    if signalled:
        raise _Interrupted(signalled[0])
    if controller is not None:
        rc = controller.report()
    if internal:
        return 1
    return int(rc)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
