"""Frame sources: a camera, a video file, a folder of images or one image, behind one small interface.

    with open_source("clip.mp4") as src:          # or 0 (camera), "0", a folder, an image file
        for frame in src:                         # Frame(image=BGR uint8, index, time_s[, path])
            ...

``read()`` returns the next :class:`Frame`, raises :class:`EndOfStream` at the end and
:class:`SourceError` (with a message saying what to do) when the source cannot deliver; iteration stops
cleanly at the end. Nothing here blocks for long: a camera that cannot be opened fails within
``open_timeout`` seconds, and a camera that stops delivering frames raises instead of spinning.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import stat
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import cv2
import numpy as np

from .errors import EndOfStream, SourceError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})

CAMERA_HINT = "a camera is given by its index (0, 1, ...) or its /dev/videoN device"


def show(path: str | os.PathLike) -> str:
    """A path as printable text (bytes that are not UTF-8 show as U+FFFD)."""
    return os.fsencode(path).decode("utf-8", "replace")


def _kind_of(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def check_input_file(path: str | os.PathLike, what: str = "file") -> Path:
    """``path`` is a regular file this process can read, or :class:`SourceError` saying what it is instead.

    Nothing here opens a FIFO or device (that would block, or hand a stream to a decoder that waits
    forever): they are refused by their type first. ``what`` names the expected kind in messages
    ("video file", "image file").
    """
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise SourceError(f"{show(path)}: no such file") from None
    except NotADirectoryError:
        raise SourceError(f"{show(path)}: no such file (a part of the path is a file, not a folder)") from None
    except OSError as exc:
        raise SourceError(f"cannot open {show(path)}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(st.st_mode):
        raise SourceError(f"{show(path)}: is a folder, not a {what}")
    if not stat.S_ISREG(st.st_mode):
        hint = f"; {CAMERA_HINT}" if what == "video file" else ""
        raise SourceError(f"{show(path)}: is {_kind_of(st.st_mode)}, not a {what}: fer reads {what}s from disk "
                          f"(save a stream to a file first){hint}")
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise SourceError(f"cannot read {show(path)}: {exc.strerror or exc}") from None
    os.close(fd)
    return path


def _camera_device_index(path: Path) -> int | None:
    """N for a path that is (or links to) the Linux camera device ``/dev/videoN``, else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        if not stat.S_ISCHR(os.stat(path).st_mode):
            return None
    except OSError:
        return None
    m = re.fullmatch(r"/dev/video(\d+)", os.path.realpath(path))
    return int(m.group(1)) if m else None


def _opencv_safe(name: str) -> bool:
    """Whether OpenCV can be handed ``name`` as is: a name that is not valid UTF-8 (its bytes kept as
    surrogate escapes by Python) crashes ``cv2.VideoCapture`` (a segfault, OpenCV 5.1)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True



@dataclass
class Frame:
    image: np.ndarray  # BGR uint8 (H, W, 3)
    index: int  # 0-based position in the source
    time_s: float  # seconds since the start of the source
    path: Path | None = None  # the image file, for folder/image sources


class Source:
    """Base class: a context manager and an iterator of :class:`Frame`."""

    name: str = ""
    fps: float | None = None
    frame_count: int | None = None

    def read(self) -> Frame:  # pragma: no cover - abstract
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __iter__(self) -> Iterator[Frame]:
        while True:
            try:
                frame = self.read()
            except EndOfStream:
                return
            yield frame

    def __enter__(self) -> "Source":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


# ------------------------------------------------------------------------------------ OpenCV helpers


@contextlib.contextmanager
def _quiet_opencv() -> Iterator[None]:
    """Silence OpenCV's own stderr warnings (failed backend probes) for the duration."""
    try:
        utils_logging = cv2.utils.logging
        old = utils_logging.getLogLevel()
        utils_logging.setLogLevel(utils_logging.LOG_LEVEL_SILENT)
    except AttributeError:  # pragma: no cover - very old OpenCV
        yield
        return
    try:
        yield
    finally:
        utils_logging.setLogLevel(old)


def _camera_api() -> int:
    """The capture backend to use for camera indices on this platform.

    Linux: V4L2 (CAP_ANY would also try FFmpeg and the Orbbec backend, slower and noisier);
    macOS: AVFoundation; Windows: Media Foundation (OpenCV's default there).
    """
    if sys.platform.startswith("linux"):
        return cv2.CAP_V4L2
    if sys.platform == "darwin":
        return cv2.CAP_AVFOUNDATION
    if sys.platform.startswith("win"):
        return cv2.CAP_MSMF
    return cv2.CAP_ANY


def _open_capture(index: int, api: int, timeout_s: float) -> cv2.VideoCapture:
    """``cv2.VideoCapture(index, api)`` (replaceable in tests)."""
    params: list[int] = []
    if hasattr(cv2, "CAP_PROP_OPEN_TIMEOUT_MSEC"):
        params += [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, int(timeout_s * 1000)]
    if hasattr(cv2, "CAP_PROP_READ_TIMEOUT_MSEC"):
        params += [cv2.CAP_PROP_READ_TIMEOUT_MSEC, int(timeout_s * 1000)]
    with _quiet_opencv():
        cap = cv2.VideoCapture(index, api, params) if params else cv2.VideoCapture(index, api)
        if not cap.isOpened() and params:  # a backend that refuses the parameters
            cap = cv2.VideoCapture(index, api)
    return cap


def _call_with_timeout(fn: Callable[[], cv2.VideoCapture], timeout_s: float) -> cv2.VideoCapture | None:
    """Run ``fn`` on a daemon thread; ``None`` when it takes longer than ``timeout_s``.

    A capture that opens after the deadline is released by the thread itself, so a slow driver can
    never leave the device held.
    """
    box: dict[str, object] = {}
    done = threading.Event()
    lock = threading.Lock()

    def run() -> None:
        try:
            cap = fn()
        except BaseException as exc:  # noqa: BLE001 - reported to the caller
            cap, box["error"] = None, exc
        with lock:
            if "abandoned" in box:
                if cap is not None:
                    cap.release()
                return
            box["cap"] = cap
            done.set()

    threading.Thread(target=run, name="fer-camera-open", daemon=True).start()
    done.wait(timeout_s)
    with lock:
        if not done.is_set():
            box["abandoned"] = True
            return None
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["cap"]  # type: ignore[return-value]


def _linux_device_missing(index: int) -> bool:
    return sys.platform.startswith("linux") and not os.path.exists(f"/dev/video{index}")


# -------------------------------------------------------------------------------------------- camera


class CameraSource(Source):
    """A camera by OpenCV index. ``time_s`` is wall-clock seconds since the source was opened.

    ``open_timeout`` bounds the time to open the device (a missing, busy or hung camera raises
    :class:`SourceError` by then). A camera that stops delivering (unplugged, taken by another
    program) raises :class:`SourceError` after ``max_failures`` consecutive failed reads.
    ``width``/``height`` request a capture size (the driver may choose another).
    """

    def __init__(
        self, index: int, *, width: int | None = None, height: int | None = None,
        open_timeout: float = 5.0, max_failures: int = 10,
    ):
        self.index = int(index)
        self.name = f"camera {self.index}"
        self.frame_count = None
        self.max_failures = max(1, int(max_failures))
        self._index = 0
        hint = (
            "check that it is connected and not in use by another program, or pick another camera "
            "(fer-desktop lists the cameras it finds)"
        )
        if self.index < 0:
            raise SourceError(f"camera {self.index} could not be opened: camera indices start at 0")
        if _linux_device_missing(self.index):
            raise SourceError(f"camera {self.index} could not be opened: /dev/video{self.index} does not "
                              f"exist; {hint}")
        api = _camera_api()
        cap = _call_with_timeout(lambda: _open_capture(self.index, api, open_timeout), open_timeout)
        if cap is None:
            raise SourceError(f"camera {self.index} could not be opened within {open_timeout:g} s; {hint}")
        if not cap.isOpened():
            cap.release()
            raise SourceError(f"camera {self.index} could not be opened; {hint}")
        if width:
            cap.set(cv2.CAP_PROP_FRAME_WIDTH, int(width))
        if height:
            cap.set(cv2.CAP_PROP_FRAME_HEIGHT, int(height))
        self._cap: cv2.VideoCapture | None = cap
        fps = cap.get(cv2.CAP_PROP_FPS)
        self.fps = float(fps) if fps and fps > 0 and np.isfinite(fps) else None
        self._t0 = time.monotonic()

    def read(self) -> Frame:
        if self._cap is None:
            raise SourceError(f"{self.name} is closed")
        for _ in range(self.max_failures):
            ok, image = self._cap.read()
            if ok and image is not None and image.size:
                frame = Frame(_as_bgr(image), self._index, time.monotonic() - self._t0)
                self._index += 1
                return frame
            time.sleep(0.01)
        raise SourceError(
            f"{self.name} stopped delivering frames ({self.max_failures} reads in a row failed); "
            "it may have been unplugged or taken by another program"
        )

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None


def list_cameras(max_index: int = 8, timeout_s: float = 2.0) -> list[int]:
    """Indices ``0..max_index-1`` of the cameras that open, probed quietly and quickly.

    On Linux, indices without a ``/dev/videoN`` node are skipped without touching OpenCV. A probe
    that takes longer than ``timeout_s`` counts as absent.
    """
    found = []
    api = _camera_api()
    for index in range(max(0, int(max_index))):
        if _linux_device_missing(index):
            continue
        try:
            cap = _call_with_timeout(lambda i=index: _open_capture(i, api, timeout_s), timeout_s)
        except Exception:  # noqa: BLE001 - a driver error means "not usable"
            continue
        if cap is None:
            continue
        if cap.isOpened():
            found.append(index)
        cap.release()
    return found


# --------------------------------------------------------------------------------------------- video


# FFmpeg "decodes" text files as video through its tty/bintext demuxers (ANSI art); refuse those.
_TEXT_CODECS = frozenset({"ansi", "bint", "xbin", "idf"})


def _fourcc(cap: cv2.VideoCapture) -> str:
    code = int(cap.get(cv2.CAP_PROP_FOURCC)) & 0xFFFFFFFF
    return code.to_bytes(4, "little").rstrip(b"\0 ").decode("ascii", "replace").lower()


class VideoSource(Source):
    """A video file decoded by OpenCV (FFmpeg). ``time_s = index / fps`` (or the container's
    timestamp when the file states no frame rate); ``frame_count`` is the container's count (may be
    approximate for some formats)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.name = show(self.path.name)
        self._link_dir: str | None = None
        check_input_file(self.path, "video file")
        name = os.path.abspath(self.path)  # absolute: FFmpeg would read "http:x" or "concat:x" as a protocol
        if not _opencv_safe(name):
            name = self._safe_link(name)
        with _quiet_opencv():
            cap = cv2.VideoCapture(name)
        if not cap.isOpened():
            cap.release()
            self._drop_link()
            raise SourceError(f"cannot decode {show(self.path)}: OpenCV could not open it as a video "
                              "(not a video, damaged, or a codec FFmpeg lacks)")
        codec = _fourcc(cap)
        if codec in _TEXT_CODECS:
            cap.release()
            self._drop_link()
            raise SourceError(f"cannot decode {show(self.path)}: it is a text file, not a video (FFmpeg would "
                              f"render it as {codec!r} text art)")
        self._cap: cv2.VideoCapture | None = cap
        self.codec = codec
        fps = cap.get(cv2.CAP_PROP_FPS)
        self.fps = float(fps) if fps and fps > 0 and np.isfinite(fps) else None
        n = cap.get(cv2.CAP_PROP_FRAME_COUNT)
        self.frame_count = int(n) if n and n > 0 and np.isfinite(n) else None
        self._index = 0

    def read(self) -> Frame:
        if self._cap is None:
            raise SourceError(f"{show(self.path)} is closed")
        ok, image = self._cap.read()
        if not ok or image is None:
            if self._index == 0:
                raise SourceError(f"cannot decode {show(self.path)}: no frame could be read from it")
            if self.frame_count and self._index < self.frame_count - 1:
                log.warning("%s: decoding stopped at frame %d of %d", show(self.path), self._index, self.frame_count)
            raise EndOfStream(f"{show(self.path)}: end of video after {self._index} frames")
        if self.fps:
            t = self._index / self.fps
        else:
            t = max(0.0, self._cap.get(cv2.CAP_PROP_POS_MSEC) / 1000.0)
        frame = Frame(_as_bgr(image), self._index, t)
        self._index += 1
        return frame

    def _safe_link(self, name: str) -> str:
        """A symlink with a plain name (``video.<ext>``) to ``name`` in a private temp folder, for names
        OpenCV cannot take (see :func:`_opencv_safe`); removed by :meth:`close`."""
        suffix = self.path.suffix if re.fullmatch(r"\.[A-Za-z0-9]{1,8}", self.path.suffix) else ""
        try:
            self._link_dir = tempfile.mkdtemp(prefix="fer-video-")
            link = os.path.join(self._link_dir, "video" + suffix)
            os.symlink(name, link)
        except OSError as exc:
            self._drop_link()
            raise SourceError(f"cannot open {show(self.path)}: its name is not valid UTF-8, which OpenCV cannot "
                              f"take, and a temporary link to it could not be made ({exc.strerror or exc});"
                              " rename the file") from None
        return link

    def _drop_link(self) -> None:
        if self._link_dir is not None:
            shutil.rmtree(self._link_dir, ignore_errors=True)
            self._link_dir = None

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None
        self._drop_link()

    def __del__(self) -> None:
        self._drop_link()


# -------------------------------------------------------------------------------------------- images


def _natural_key(p: Path) -> list:
    """``img2`` before ``img10``: digit runs compare as numbers."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", p.name)]


def _imread(path: Path) -> np.ndarray | None:
    """Decode an image file to BGR uint8 (works with non-ASCII paths on every OS); None if it can't."""
    try:
        data = np.fromfile(str(path), dtype=np.uint8)
    except OSError:
        return None
    if data.size == 0:
        return None
    with _quiet_opencv():
        image = cv2.imdecode(data, cv2.IMREAD_COLOR)
    return image if image is not None and image.size else None


def read_image(path: str | os.PathLike) -> np.ndarray:
    """One image file as BGR uint8; :class:`SourceError` naming the file when it cannot be read."""
    path = check_input_file(path, "image file")
    image = _imread(path)
    if image is None:
        raise SourceError(f"cannot decode {show(path)}: not an image OpenCV can read, or damaged")
    return _as_bgr(image)


def _as_bgr(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    return image


class ImageFolderSource(Source):
    """The images of a folder (not recursive), in natural name order (``2.jpg`` before ``10.jpg``).

    Files with an extension in :data:`IMAGE_EXTENSIONS` (any case) are used. Unreadable images are
    skipped with a logged warning; ``index`` counts the files, so it matches the sorted listing
    (:attr:`paths`). ``time_s`` is 0 (stills). A folder without images raises :class:`SourceError`.
    """

    def __init__(self, folder: str | os.PathLike, *, paths: list[Path] | None = None):
        self.folder = Path(folder)
        self.name = self.folder.name
        if paths is None:
            if not self.folder.is_dir():
                raise SourceError(f"{show(self.folder)}: no such folder")
            paths = sorted(
                (p for p in self.folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()),
                key=_natural_key,
            )
            if not paths:
                raise SourceError(f"{show(self.folder)}: no images in this folder (looked for "
                                  f"{', '.join(sorted(IMAGE_EXTENSIONS))})")
        self.paths = list(paths)
        self.frame_count = len(self.paths)
        self.fps = None
        self._next = 0
        self._delivered = 0

    def read(self) -> Frame:
        while self._next < len(self.paths):
            i, path = self._next, self.paths[self._next]
            self._next += 1
            image = _imread(path)
            if image is None:
                log.warning("skipping %s: cannot decode it as an image", path)
                continue
            self._delivered += 1
            return Frame(_as_bgr(image), i, 0.0, path)
        if self._delivered == 0:
            raise SourceError(f"{show(self.folder)}: none of its {len(self.paths)} images could be decoded")
        raise EndOfStream(f"{show(self.folder)}: no more images")


class ImageSource(ImageFolderSource):
    """A single image file: one frame, then the end. An undecodable file raises :class:`SourceError`."""

    def __init__(self, path: str | os.PathLike):
        path = check_input_file(path, "image file")
        super().__init__(path.parent, paths=[path])
        self.name = path.name
        self.path = path

    def read(self) -> Frame:
        if self._next == 0:
            self._next = 1
            image = _imread(self.path)
            if image is None:
                raise SourceError(f"cannot decode {show(self.path)}: not an image OpenCV can read, or damaged")
            self._delivered = 1
            return Frame(_as_bgr(image), 0, 0.0, self.path)
        raise EndOfStream(f"{show(self.path)}: no more images")


# ----------------------------------------------------------------------------------------- factory


def open_source(spec: int | str | os.PathLike, **kwargs) -> Source:
    """Open ``spec``: an int or digit string is a camera index (so is a ``/dev/videoN`` device on Linux), a
    folder gives its images, an image file one frame, any other regular file is decoded as a video; FIFOs,
    sockets and other devices are refused (:func:`check_input_file`). ``kwargs`` go to :class:`CameraSource`."""
    if isinstance(spec, bool):
        raise SourceError(f"not a source: {spec!r}")
    if isinstance(spec, (int, np.integer)):
        return CameraSource(int(spec), **kwargs)
    if isinstance(spec, str) and spec.strip().isdigit() and not Path(spec).exists():
        return CameraSource(int(spec.strip()), **kwargs)
    path = Path(spec)
    if path.is_dir():
        return ImageFolderSource(path)
    if not os.path.lexists(path):
        raise SourceError(f"{show(path)}: no such file or folder")
    camera = _camera_device_index(path)
    if camera is not None:
        return CameraSource(camera, **kwargs)
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        return ImageSource(path)
    return VideoSource(path)
