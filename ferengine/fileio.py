"""The one output-writing rule of fer-desktop: every file it writes (checkpoints, ONNX/TensorRT exports,
JSON reports, ``fer analyze``'s CSV through :class:`~ferengine.results.ResultWriter`) goes through here.

1. **Resolve the target first** (:func:`resolve_output`): a symlink is written *through* (its target is
   replaced, the link stays); a device, FIFO or socket (``/dev/null``, ``/dev/full``, ``/dev/stdout``) is
   written straight into, in place - never replaced by a regular file; a folder given as the file is
   refused.
2. **Check before the work** (:func:`check_output`): the folder exists (or is made, where the caller
   allows it), is a folder, and a file can be created in it (a probe file, so a read-only file system is
   caught even as root), and the file system is not full - so a long evaluation or export does not run
   to the end only to fail at its last step.
3. **Regular files are written atomically** (:func:`atomic_write`): a temp file beside the target, fsync,
   rename over the target, fsync of the folder. A reader never sees a half-written file under the final
   name and a crash mid-write leaves the previous version in place. A result that stops halfway is never
   renamed to the final name (see :func:`partial_path`).
4. **Temp names carry the writer** (:func:`temp_path`): ``.<name>.fer-<pid>-<host>-<random>.tmp`` (or
   ``.part``). When a new writer for the same target starts, temp files of *dead* processes on this host
   are cleaned (:func:`clean_stale_temps`): ``.tmp`` files (half-written, useless) are removed, ``.part``
   files (rows of a killed ``fer analyze``, valid up to their last line) are kept under the visible
   partial name. A live process's temp file is never touched.
5. **Errors name the output as the user gave it**, never the temp file: :class:`OutputError` (an
   ``OSError`` and a :class:`~ferengine.errors.FerError`), one line.

New files get the usual ``0o644`` permissions (mkstemp would make them private); an existing file keeps
its own mode when it is replaced.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import secrets
import socket
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .errors import OutputError

__all__ = ["OutputError", "OutputTarget", "resolve_output", "check_output", "atomic_write", "atomic_write_bytes",
           "atomic_write_text", "atomic_write_json", "temp_path", "partial_path", "clean_stale_temps",
           "describe_os_error"]

log = logging.getLogger("ferengine.fileio")

TEMP_KINDS = ("tmp", "part")  # atomic_write's temp files / ResultWriter's rows in progress
_HOST = hashlib.sha1(socket.gethostname().encode("utf-8", "surrogateescape")).hexdigest()[:8]
_NAME_MAX = 255  # bytes of one file name on every file system we care about
_UMASK = os.umask(0o022)  # read once, at import (os.umask cannot be read without setting it)
os.umask(_UMASK)
_SPECIAL_ROOTS = ("/dev/", "/proc/")  # a "regular file" reached through these is someone's open stream


def describe_os_error(exc: BaseException) -> str:
    """``No space left on device`` rather than ``[Errno 28] No space left on device: '/x/.y.tmp'``."""
    if isinstance(exc, OSError) and not isinstance(exc, OutputError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def show(path: str | os.PathLike) -> str:
    """A path as text that can always be printed (bytes that are not UTF-8 show as U+FFFD)."""
    return os.fsencode(path).decode("utf-8", "replace")


@dataclass(frozen=True)
class OutputTarget:
    """Where an output really goes. ``given``: the name the caller used (for messages); ``path``: the
    file that is written (a symlink's final target; ``given`` otherwise); ``special``: a device, FIFO,
    socket or an already open stream (``/dev/stdout``): written into in place, not atomically."""

    given: Path
    path: Path
    special: bool


def _first_non_folder(path: Path) -> Path | None:
    """The ancestor of ``path`` that exists but is not a folder (``notes.txt`` in ``notes.txt/r.csv``)."""
    for parent in reversed(path.parents):
        try:
            st = os.stat(parent)
        except OSError:
            return None
        if not stat.S_ISDIR(st.st_mode):
            return parent
    return None


def resolve_output(path: str | os.PathLike, *, make_parents: bool = False) -> OutputTarget:
    """Resolve ``path`` per the module's rule 1 (and make its folder when ``make_parents``).

    Raises :class:`OutputError` for a folder given as the file, a missing folder (unless
    ``make_parents``), a file where a folder should be, or a folder that cannot be looked into.
    """
    given = Path(os.fspath(path))
    if not str(given).strip():
        raise OutputError("an empty output file name: give the file to write")
    what = f"cannot write {show(given)}"
    try:
        st = os.stat(given)  # follows symlinks
    except FileNotFoundError:
        st = None
    except NotADirectoryError:
        bad = _first_non_folder(given)
        raise OutputError(f"{what}: {show(bad) if bad else 'a part of the path'} is a file, not a folder; "
                          "give a file name in an existing folder") from None
    except PermissionError:
        raise OutputError(f"{what}: permission denied to look into {show(given.parent)}") from None
    except OSError as exc:
        raise OutputError(f"{what}: {describe_os_error(exc)}") from None

    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            raise OutputError(f"{what}: it is a folder, not a file; give a file name (e.g. "
                              f"{show(given / ('results' + (given.suffix or '.csv')))})")
        if not stat.S_ISREG(st.st_mode):
            return OutputTarget(given, given, True)
        real = Path(os.path.realpath(given))
        if str(given).startswith(_SPECIAL_ROOTS) or str(real).startswith(_SPECIAL_ROOTS):
            return OutputTarget(given, given, True)  # /dev/stdout redirected to a file: the shell's stream
        return OutputTarget(given, real if os.path.islink(given) else given, False)

    # not there (yet); a dangling symlink is written through to where it points
    target = Path(os.path.realpath(given)) if os.path.islink(given) else given
    folder = target.parent
    if not folder.exists():
        bad = _first_non_folder(target)
        if bad is not None:
            raise OutputError(f"{what}: {show(bad)} is a file, not a folder; give a file name in an existing folder")
        if not make_parents:
            raise OutputError(f"{what}: the folder {show(folder)} does not exist; create it first or choose "
                              "another folder")
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"{what}: cannot create the folder {show(folder)}: {describe_os_error(exc)}") from None
    elif not folder.is_dir():
        raise OutputError(f"{what}: {show(folder)} is a file, not a folder; give a file name in an existing folder")
    return OutputTarget(given, target, False)


def _free_bytes(folder: Path) -> int | None:
    try:
        sv = os.statvfs(folder)
    except (OSError, AttributeError):  # AttributeError: Windows
        return None
    avail = sv.f_bfree if hasattr(os, "geteuid") and os.geteuid() == 0 else sv.f_bavail
    return avail * sv.f_frsize


def check_output(path: str | os.PathLike, *, make_parents: bool = False) -> OutputTarget:
    """:func:`resolve_output`, then prove that the output can be written, before any work is done: a
    probe file is created and removed in the folder (for a special file: it must be writable), and the
    file system must have free space. Also cleans stale temp files of dead writers of this target.
    Raises :class:`OutputError` naming ``path``."""
    target = resolve_output(path, make_parents=make_parents)
    what = f"cannot write {show(target.given)}"
    if target.special:
        if not os.access(target.path, os.W_OK):
            raise OutputError(f"{what}: permission denied")
        return target
    folder = target.path.parent
    clean_stale_temps(target.path)
    probe = temp_path(target.path, "tmp")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        reason = describe_os_error(exc)
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            reason = f"the folder {show(folder)} is not writable ({reason})"
        raise OutputError(f"{what}: {reason}") from None
    free = _free_bytes(folder)
    if free is not None and free == 0:
        raise OutputError(f"{what}: no space left on the device that holds {show(folder)}; free some space or "
                          "choose another folder")
    return target


# -------------------------------------------------------------------------------------- temp names


def _temp_base(name: str, room: int) -> str:
    """``name`` cut to ``room`` bytes, so that ``.<base>.<tag>`` fits in one file name."""
    return os.fsdecode(os.fsencode(name)[:room]) or "x"


_TAG_LEN = len(".fer-4194304-12345678-1234abcd.part")


def temp_path(target: str | os.PathLike, kind: str = "tmp") -> Path:
    """A fresh temp name beside ``target``: ``.<name>.fer-<pid>-<host>-<random>.<kind>``."""
    if kind not in TEMP_KINDS:
        raise ValueError(f"kind must be one of {TEMP_KINDS}, got {kind!r}")
    target = Path(target)
    base = _temp_base(target.name, _NAME_MAX - 1 - _TAG_LEN)
    return target.parent / f".{base}.fer-{os.getpid()}-{_HOST}-{secrets.token_hex(4)}.{kind}"


def _temp_pattern(target: Path) -> re.Pattern:
    base = _temp_base(target.name, _NAME_MAX - 1 - _TAG_LEN)
    return re.compile(rf"^\.{re.escape(base)}\.fer-(\d+)-([0-9a-f]{{8}})-[0-9a-f]+\.({'|'.join(TEMP_KINDS)})$")


def partial_path(target: str | os.PathLike) -> Path:
    """Where an unfinished result of ``target`` is kept: ``results.csv`` -> ``results.partial.csv``."""
    target = Path(target)
    if target.suffix and target.stem:
        return target.with_name(f"{target.stem}.partial{target.suffix}")
    return target.with_name(f"{target.name}.partial")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    except OSError:  # e.g. Windows without that pid: be safe
        return True
    return True


def _newer(a: Path, b: Path) -> bool:
    """``a`` was written after ``b`` (or there is no ``b``)."""
    try:
        return a.stat().st_mtime_ns >= b.stat().st_mtime_ns
    except FileNotFoundError:
        return True


def clean_stale_temps(target: str | os.PathLike) -> list[Path]:
    """Temp files of ``target`` left by dead writers on this host: ``.tmp`` removed, ``.part`` kept as
    :func:`partial_path` (replacing an older partial file; a ``.part`` older than the partial file there
    is removed). Returns the files handled.
    Files of live processes, of other hosts, or not named by :func:`temp_path` are left alone."""
    target = Path(target)
    pattern = _temp_pattern(target)
    done = []
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return done
    for entry in entries:
        m = pattern.match(entry.name)
        if not m or m.group(2) != _HOST or _alive(int(m.group(1))):
            continue
        stale = Path(entry.path)
        try:
            if m.group(3) == "part" and stale.stat().st_size > 0 and _newer(stale, partial_path(target)):
                os.replace(stale, partial_path(target))
                log.warning("an earlier writer of %s (pid %s) was killed before it finished; its rows are kept "
                            "in %s (partial)", show(target), m.group(1), show(partial_path(target)))
            else:
                stale.unlink()
                log.info("removed %s, left by a writer (pid %s) that was killed", show(stale), m.group(1))
            done.append(stale)
        except FileNotFoundError:  # another writer cleaned it first
            continue
        except OSError as exc:
            log.debug("cannot clean %s: %s", stale, exc)
    return done


def create_temp(target: Path, kind: str = "tmp", mode: int | None = None) -> Path:
    """Create (exclusively) an empty temp file for ``target`` with the permissions the result will have
    (``mode``, else the existing target's, else 0o666 & ~umask)."""
    if mode is None:
        try:
            mode = stat.S_IMODE(os.stat(target).st_mode)
        except OSError:
            mode = 0o666 & ~_UMASK
    for _ in range(8):
        tmp = temp_path(target, kind)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # pragma: no cover - 32 random bits, same pid
            continue
        try:
            if hasattr(os, "fchmod"):
                os.fchmod(fd, mode)
        finally:
            os.close(fd)
        if not hasattr(os, "fchmod"):  # pragma: no cover - Windows
            os.chmod(tmp, mode)
        return tmp
    raise OutputError(f"cannot write {show(target)}: no free temp name beside it")  # pragma: no cover


def fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------- writers


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], mode: int | None = None, *,
                 make_parents: bool = True) -> Path:
    """Call ``write(file_name)`` and put the result at ``path`` per the module's rule.

    Regular file: ``write`` fills a temp file beside the (resolved) target, which is then renamed over
    it. Special file (``/dev/null``, a FIFO, ``/dev/stdout``): ``write`` gets ``path`` itself. ``mode``:
    the file's permissions (``None``: an existing file's own, else 0o644). ``make_parents``: create missing
    folders. OS errors become :class:`OutputError` naming ``path``. Returns ``path``.
    """
    target = resolve_output(path, make_parents=make_parents)
    what = f"cannot write {show(target.given)}"
    if target.special:
        try:
            write(str(target.path))
        except OSError as exc:
            raise OutputError(f"{what}: {describe_os_error(exc)}") from exc
        return target.given
    clean_stale_temps(target.path)
    if mode is None and not target.path.exists():
        mode = 0o644
    try:
        tmp = create_temp(target.path, "tmp", mode)
    except OSError as exc:
        if isinstance(exc, OutputError):
            raise
        raise OutputError(f"{what}: {describe_os_error(exc)}") from exc
    try:
        write(str(tmp))
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target.path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and not isinstance(exc, OutputError):
            raise OutputError(f"{what}: {describe_os_error(exc)}") from exc
        raise
    fsync_folder(target.path.parent)
    return target.given


def atomic_write_bytes(path: str | os.PathLike, data: bytes, **kwargs: Any) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data), **kwargs)


def atomic_write_text(path: str | os.PathLike, text: str, **kwargs: Any) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, newline="", encoding="utf-8"), **kwargs)


def atomic_write_json(path: str | os.PathLike, obj: Any, **kwargs: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2) + "\n", **kwargs)
