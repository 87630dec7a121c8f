"""``fer-desktop``: the desktop application's entry point.

    fer-desktop                                   # the last source (or camera 0) and the last/default model
    fer-desktop --video clip.mp4 --checkpoint model.safetensors
    fer-desktop --video clip.mp4 --screenshot out.png --frames 120    # run 120 frames, save the window, exit
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

os.environ.setdefault("PYQTGRAPH_QT_LIB", "PySide6")

log = logging.getLogger("app")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fer-desktop",
        description="Real-time facial-expression recognition: live video with face boxes, class "
                    "probabilities and valence/arousal.",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--camera", type=int, metavar="N", help="open camera N (0 = the first)")
    src.add_argument("--video", metavar="PATH", help="open a video file")
    src.add_argument("--folder", metavar="PATH", help="open a folder of images")
    p.add_argument("--checkpoint", "-c", metavar="FILE",
                   help="model checkpoint (default: the last one used, else the model shipped in assets/)")
    p.add_argument("--backend", choices=["auto", "torch", "onnxruntime", "tensorrt"],
                   help="inference backend (default: the last choice, else auto)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default: auto)")
    p.add_argument("--detector", choices=["short", "full"],
                   help="face detector: short range (webcam distance) or full range (small/distant faces)")
    p.add_argument("--loop", action="store_true", default=None, help="loop video files")
    p.add_argument("--fast", action="store_true", default=None,
                   help="process video files as fast as possible instead of in real time")
    p.add_argument("--screenshot", metavar="PNG",
                   help="run --frames frames, save a screenshot of the whole window to PNG and exit")
    p.add_argument("--frames", type=int, default=60, metavar="N", help="frames to run before --screenshot (60)")
    p.add_argument("--size", default="1400x860", metavar="WxH", help="window size for --screenshot (1400x860)")
    p.add_argument("--timeout", type=float, default=120.0, metavar="S",
                   help="--screenshot: save whatever is shown after S seconds at the latest (120)")
    p.add_argument("--log-level", default="WARNING", help="logging level (WARNING)")
    return p


def _parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"fer-desktop: --size must look like 1400x860, got {text!r}") from None
    if w < 400 or h < 300:
        raise SystemExit(f"fer-desktop: --size {text} is too small (at least 400x300)")
    return w, h


def _screenshot_controller_class():
    from PySide6.QtCore import QObject, QTimer, Slot

    class ScreenshotController(QObject):
        """Runs the window until ``frames`` frames were processed (or the source ended/failed, or the
        timeout passed), then saves ``window.grab()`` to ``path`` and quits the application.

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
            self.reason = reason
            self.window.worker.set_paused(True)  # freeze the frame without the "Paused" overlay
            QTimer.singleShot(delay_ms, self._grab)

        @Slot()
        def _grab(self) -> None:
            from PySide6.QtWidgets import QApplication

            w = self.window
            w._refresh_status()
            QApplication.processEvents()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            pixmap = w.grab()
            self.saved = pixmap.save(str(self.path), "PNG")
            if self.saved:
                print(f"fer-desktop: screenshot ({pixmap.width()}x{pixmap.height()}, {self.reason}) -> {self.path}",
                      file=sys.stderr)
            else:
                print(f"fer-desktop: could not write {self.path}", file=sys.stderr)
            # leave the loop only; main() closes the window after exec() returns (closing the last window
            # inside the loop would also post a Quit event that outlives this loop)
            QApplication.instance().exit(0 if self.saved else 1)

    return ScreenshotController


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # log to stderr while the app runs; undone on return, so an in-process call (tests) leaves no handler
    # bound to a stream that may be closed later
    root = logging.getLogger()
    old_level, handler = root.level, None
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    root.setLevel(getattr(logging, str(args.log_level).upper(), logging.WARNING))
    try:
        return _run(args)
    finally:
        root.setLevel(old_level)
        if handler is not None:
            root.removeHandler(handler)


def _run(args: argparse.Namespace) -> int:

    from PySide6.QtCore import QTimer
    from PySide6.QtWidgets import QApplication

    import pyqtgraph as pg

    from .settings import APPLICATION, ORGANISATION
    from .window import LaunchOptions, MainWindow
    from .worker import SourceSpec
    from .icon import app_icon

    app = QApplication.instance() or QApplication([sys.argv[0] if sys.argv else "fer-desktop"])
    app.setOrganizationName(ORGANISATION)
    app.setApplicationName(APPLICATION)
    app.setWindowIcon(app_icon())
    pg.setConfigOptions(antialias=True, foreground=app.palette().windowText().color())

    source = None
    if args.camera is not None:
        source = SourceSpec("camera", args.camera)
    elif args.video:
        source = SourceSpec("video", str(Path(args.video).expanduser()))
    elif args.folder:
        source = SourceSpec("folder", str(Path(args.folder).expanduser()))
    shot = args.screenshot is not None
    options = LaunchOptions(
        source=source, checkpoint=args.checkpoint, backend=args.backend, device=args.device,
        detector=args.detector, loop=args.loop, fast=args.fast,
        restore_layout=not shot, persist=not shot, probe_cameras=not shot, wait_for_model=shot,
    )
    window = MainWindow(options)
    controller = None
    if shot:
        window.resize(*_parse_size(args.size))
        controller = _screenshot_controller_class()(window, Path(args.screenshot), args.frames, args.timeout)
    window.show()

    # Ctrl+C in the terminal closes the window cleanly (Qt's loop would otherwise never see it)
    old_handler = signal.signal(signal.SIGINT, lambda *_: window.close())
    tick = QTimer()
    tick.timeout.connect(lambda: None)
    tick.start(200)
    try:
        rc = app.exec()
    finally:
        tick.stop()
        signal.signal(signal.SIGINT, old_handler)
        window.shutdown()
        window.hide()
    if controller is not None and not controller.saved:
        return 1
    return int(rc)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
