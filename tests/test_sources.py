"""Frame sources: video files, image folders, single images, cameras (real failures and fakes)."""
from __future__ import annotations

import logging
import time

import cv2
import numpy as np
import pytest

from ferengine import sources
from ferengine.sources import (
    CameraSource, EndOfStream, ImageFolderSource, ImageSource, SourceError, VideoSource, list_cameras,
    open_source,
)

from conftest import SYNTH_FPS, SYNTH_FRAMES, SYNTH_SIZE


# --------------------------------------------------------------------------------------------- video


def test_video_frames_times_and_end(synthetic_video):
    with open_source(synthetic_video) as src:
        assert isinstance(src, VideoSource)
        assert src.fps == pytest.approx(SYNTH_FPS)
        assert src.frame_count == SYNTH_FRAMES
        frames = list(src)
        with pytest.raises(EndOfStream):
            src.read()
    assert len(frames) == SYNTH_FRAMES
    assert [f.index for f in frames] == list(range(SYNTH_FRAMES))
    assert [f.time_s for f in frames] == pytest.approx([i / SYNTH_FPS for i in range(SYNTH_FRAMES)])
    w, h = SYNTH_SIZE
    for i, f in enumerate(frames):
        assert f.image.shape == (h, w, 3) and f.image.dtype == np.uint8
        # the background grey encodes the frame index (JPEG keeps flat areas within a few levels)
        assert abs(int(f.image[h - 5, w - 5].mean()) - (10 * i + 5)) <= 3


def test_video_read_after_close_raises(synthetic_video):
    src = VideoSource(synthetic_video)
    src.read()
    src.close()
    with pytest.raises(SourceError):
        src.read()
    src.close()  # idempotent


def test_missing_paths_name_the_path(tmp_path):
    missing = tmp_path / "nope.mp4"
    for fn in (open_source, VideoSource, ImageSource):
        with pytest.raises(SourceError, match="nope.mp4"):
            fn(missing)
    with pytest.raises(SourceError, match="no such folder"):
        ImageFolderSource(tmp_path / "nofolder")


@pytest.mark.parametrize("name", ["notes.txt", "fake.mp4"])
def test_non_video_file_cannot_decode(tmp_path, name):
    path = tmp_path / name
    path.write_text("this is not a video\n" * 50)
    with pytest.raises(SourceError, match="cannot decode") as err:
        with open_source(path) as src:
            src.read()
    assert name in str(err.value)
    assert not isinstance(err.value, EndOfStream)


def test_video_whose_name_is_not_utf8_opens(synthetic_video, tmp_path):
    """cv2.VideoCapture segfaults on a name with non-UTF-8 bytes; the source opens it through a link with a
    plain name (in a subprocess: a regression would kill the interpreter, not fail an assert)."""
    import os
    import subprocess
    import sys

    name = os.fsencode(tmp_path) + b"/clip-\xff\xfe.avi"
    with open(synthetic_video, "rb") as fh, open(name, "wb") as out:
        out.write(fh.read())
    code = ("import os, sys\nfrom ferengine.sources import open_source\n"
            "with open_source(os.fsdecode(sys.argv[1].encode('utf-8', 'surrogateescape'))) as src:\n"
            "    n, link = sum(1 for _ in src), src._link_dir\n"
            "print(n, src.name, link is not None and not os.path.exists(link))\n")
    out = subprocess.run([sys.executable, "-c", code, os.fsdecode(name)], capture_output=True, timeout=120,
                         env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    assert out.returncode == 0, out.stderr.decode(errors="replace")[-2000:]
    n, shown, cleaned = out.stdout.decode().split()
    assert int(n) == SYNTH_FRAMES and shown == "clip-\ufffd\ufffd.avi" and cleaned == "True"


@pytest.mark.parametrize("name", ["100%d.avi", "a%03d.avi", "http:clip.avi", "caf\u00e9 \u263a.avi"])
def test_video_names_that_look_special_open_as_files(synthetic_video, tmp_path, name, monkeypatch):
    """printf patterns, a "protocol:" prefix (FFmpeg reads "http:x" as a URL: the source hands OpenCV the
    absolute path) and non-ASCII UTF-8, also relative to the working folder."""
    import shutil

    shutil.copy(synthetic_video, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    with open_source(name) as src:
        assert sum(1 for _ in src) == SYNTH_FRAMES


def test_fifo_and_devices_are_refused_without_blocking(tmp_path):
    import os
    import subprocess
    import sys

    fifo = tmp_path / "stream.mp4"
    os.mkfifo(fifo)
    code = ("import sys\nfrom ferengine.sources import open_source, SourceError\n"
            "for p in sys.argv[1:]:\n"
            "    try:\n        open_source(p)\n    except SourceError as e:\n        print(e)\n")
    out = subprocess.run([sys.executable, "-c", code, str(fifo), "/dev/zero"], capture_output=True, text=True,
                         timeout=60)  # before the fix the FIFO blocked forever inside OpenCV
    lines = out.stdout.splitlines()
    assert out.returncode == 0 and len(lines) == 2, out.stderr[-2000:]
    assert lines[0].startswith(f"{fifo}: is a FIFO (named pipe), not a video file")
    assert lines[1].startswith("/dev/zero: is a character device, not a video file")
    with pytest.raises(SourceError, match="is a FIFO"):
        ImageSource(tmp_path / "stream.mp4")


def test_camera_device_path_is_a_camera(monkeypatch):
    """``/dev/videoN`` (or a link to it) opens camera N, not OpenCV's file reader."""
    opened = []
    monkeypatch.setattr(sources, "_camera_device_index", lambda p: 3 if str(p) == "/dev/v4l/by-id/cam" else None)
    monkeypatch.setattr(sources, "CameraSource", lambda index, **kw: opened.append(index) or "camera")
    monkeypatch.setattr(sources.os.path, "lexists", lambda p: True)
    assert open_source("/dev/v4l/by-id/cam") == "camera" and opened == [3]


def test_camera_device_index_only_for_video_devices(tmp_path):
    (tmp_path / "video0").write_bytes(b"")
    assert sources._camera_device_index(tmp_path / "video0") is None  # a regular file
    assert sources._camera_device_index(__import__("pathlib").Path("/dev/null")) is None  # another device


# -------------------------------------------------------------------------------------------- images


def _write_images(folder, names):
    folder.mkdir(exist_ok=True)
    for k, name in enumerate(names):
        img = np.full((20, 30, 3), 20 * k + 10, np.uint8)
        assert cv2.imwrite(str(folder / name), img)


def test_folder_natural_order_skips_corrupt_and_others(tmp_path, caplog):
    folder = tmp_path / "imgs"
    _write_images(folder, ["img10.png", "img2.jpg", "img1.bmp", "IMG3.PNG"])
    (folder / "img5.jpg").write_bytes(b"\xff\xd8\xff garbage, not a jpeg")
    (folder / "readme.txt").write_text("not an image")
    (folder / "sub.png").mkdir()  # a folder with an image-like name is not an image
    with caplog.at_level(logging.WARNING, logger="ferengine.sources"):
        with open_source(folder) as src:
            assert isinstance(src, ImageFolderSource)
            assert [p.name for p in src.paths] == ["img1.bmp", "img2.jpg", "IMG3.PNG", "img5.jpg", "img10.png"]
            assert src.frame_count == 5 and src.fps is None
            frames = list(src)
    assert [f.path.name for f in frames] == ["img1.bmp", "img2.jpg", "IMG3.PNG", "img10.png"]
    assert [f.index for f in frames] == [0, 1, 2, 4]  # the index matches the listing
    assert all(f.image.shape == (20, 30, 3) and f.time_s == 0.0 for f in frames)
    assert int(frames[0].image.mean()) == pytest.approx(20 * 2 + 10, abs=2)  # img1.bmp was written 3rd
    assert any("img5.jpg" in r.getMessage() for r in caplog.records)


def test_empty_folder_and_all_corrupt_folder(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    with pytest.raises(SourceError, match="no images"):
        open_source(empty)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"not a png")
    with open_source(bad) as src:
        with pytest.raises(SourceError, match="could be decoded") as err:
            src.read()
    assert not isinstance(err.value, EndOfStream)


def test_single_image_then_end(tmp_path):
    _write_images(tmp_path, ["one.png"])
    with open_source(tmp_path / "one.png") as src:
        assert isinstance(src, ImageSource) and src.frame_count == 1
        f = src.read()
        assert f.index == 0 and f.path.name == "one.png" and f.image.shape == (20, 30, 3)
        with pytest.raises(EndOfStream):
            src.read()
    assert len(list(open_source(tmp_path / "one.png"))) == 1


def test_grey_and_alpha_images_come_out_bgr(tmp_path):
    assert cv2.imwrite(str(tmp_path / "grey.png"), np.full((8, 9), 77, np.uint8))
    assert cv2.imwrite(str(tmp_path / "rgba.png"), np.full((8, 9, 4), 99, np.uint8))
    frames = list(open_source(tmp_path))
    assert [f.image.shape for f in frames] == [(8, 9, 3), (8, 9, 3)]


def test_corrupt_single_image_raises(tmp_path):
    path = tmp_path / "broken.jpg"
    path.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    with open_source(path) as src:
        with pytest.raises(SourceError, match="cannot decode .*broken.jpg"):
            src.read()


# ------------------------------------------------------------------------------------------- cameras


def test_missing_camera_fails_promptly():
    t0 = time.monotonic()
    with pytest.raises(SourceError, match="camera 99 could not be opened"):
        open_source(99)
    with pytest.raises(SourceError, match="camera 99 could not be opened"):
        open_source("99")
    assert time.monotonic() - t0 < 5.0


def test_list_cameras_is_quick():
    t0 = time.monotonic()
    cams = list_cameras(4)
    assert isinstance(cams, list) and all(isinstance(i, int) and 0 <= i < 4 for i in cams)
    assert time.monotonic() - t0 < 10.0


class FakeCapture:
    """Delivers ``good`` frames, then fails every read (an unplugged camera)."""

    def __init__(self, good: int = 3, opened: bool = True):
        self.good, self.opened, self.reads, self.released = good, opened, 0, False

    def isOpened(self):
        return self.opened

    def read(self):
        self.reads += 1
        if self.reads <= self.good:
            return True, np.zeros((4, 5, 3), np.uint8)
        return False, None

    def get(self, prop):
        return 30.0 if prop == cv2.CAP_PROP_FPS else 0.0

    def set(self, prop, value):
        return True

    def release(self):
        self.released = True


@pytest.fixture
def fake_camera(monkeypatch):
    caps: dict[int, FakeCapture] = {}
    monkeypatch.setattr(sources, "_linux_device_missing", lambda index: False)
    monkeypatch.setattr(sources, "_open_capture", lambda index, api, timeout: caps[index])
    return caps


def test_camera_that_stops_delivering_raises(fake_camera):
    fake_camera[7] = cap = FakeCapture(good=3)
    t0 = time.monotonic()
    with open_source(7) as src:
        assert src.name == "camera 7" and src.fps == 30.0 and src.frame_count is None
        frames = []
        with pytest.raises(SourceError, match="stopped delivering") as err:
            for f in src:
                frames.append(f)
    assert not isinstance(err.value, EndOfStream)
    assert [f.index for f in frames] == [0, 1, 2]
    assert frames[1].time_s >= frames[0].time_s >= 0.0
    assert cap.released and cap.reads == 3 + src.max_failures
    assert time.monotonic() - t0 < 2.0


def test_camera_that_does_not_open(fake_camera):
    fake_camera[3] = cap = FakeCapture(opened=False)
    with pytest.raises(SourceError, match="camera 3 could not be opened"):
        CameraSource(3)
    assert cap.released


def test_camera_whose_driver_hangs_times_out(monkeypatch):
    monkeypatch.setattr(sources, "_linux_device_missing", lambda index: False)
    late = FakeCapture()

    def hang(index, api, timeout):
        time.sleep(1.0)
        return late

    monkeypatch.setattr(sources, "_open_capture", hang)
    t0 = time.monotonic()
    with pytest.raises(SourceError, match=r"camera 2 could not be opened within 0.2 s"):
        CameraSource(2, open_timeout=0.2)
    assert time.monotonic() - t0 < 0.8
    time.sleep(1.0)
    assert late.released  # opened after the deadline: released, not leaked


def test_list_cameras_reports_the_ones_that_open(fake_camera):
    for i in range(4):
        fake_camera[i] = FakeCapture(opened=(i in (0, 2)))
    assert list_cameras(4) == [0, 2]
    assert all(c.released for c in fake_camera.values())
