"""The one error boundary of every trainers entry point (``python -m trainers.<method>``, ``fer eval``,
``python -m trainers.release``, ``python -m trainers.calibrate``, ``python -m trainers --list``).

:func:`guard` runs the entry point's body and turns what escapes it into one line on stderr and an exit
status:

- a known error (:class:`TrainError`, :class:`DatasetError`, :class:`EvalError`, any ferengine
  :class:`FerError`, an :class:`OSError` such as ``PermissionError`` or a full disk): ``<prog>: error: <msg>``,
  status 2 -- the message already says which file and what to do;
- ``KeyboardInterrupt``: ``<prog>: interrupted; <what was saved and how to resume>``, status 130;
- anything else (a bug): ``<prog>: internal error: <Type>: <msg> (run with ... for the traceback; please
  report it)``, status 1, and with the verbose flag the traceback itself.

An ``OSError`` names the real file even when it happened on the hidden temporary file of an atomic write
(``.state.pt.k3j2.tmp`` is reported as ``state.pt``).
"""
from __future__ import annotations

import errno
import logging
import re
import sys
import traceback
from pathlib import Path
from typing import Callable, Sequence

__all__ = ["guard", "known_errors", "one_line", "os_error_line", "wants_traceback", "CONSOLE_ONLY_FILE"]

# a log record with ``extra={CONSOLE_ONLY_FILE: True}`` goes to train.log only (the boundary prints it once)
CONSOLE_ONLY_FILE = "fer_file_only"

# atomic_write's temp names: .NAME.fer-PID-HOST-RANDOM.tmp (ferengine.fileio), or an older .NAME.RANDOM.tmp
_TMP = re.compile(r"^\.(?P<name>.+?)\.(?:fer-\d+-\S+|[A-Za-z0-9_]+)\.tmp$")


def known_errors() -> tuple[type[BaseException], ...]:
    from ferengine.errors import FerError

    from ..data.base import DatasetError
    from ..evaluate import EvalError
    from .errors import TrainError

    return (TrainError, DatasetError, EvalError, FerError, OSError)


def real_path(name: str | None) -> str | None:
    """The file an atomic write's hidden temp file stands for (other names unchanged)."""
    if not name:
        return name
    p = Path(str(name))
    m = _TMP.match(p.name)
    return str(p.with_name(m["name"])) if m else str(name)


_ADVICE = {
    errno.ENOSPC: "free some space or write elsewhere (--out)",
    errno.EDQUOT: "free some space or write elsewhere (--out)",
    errno.EACCES: "check its permissions or write elsewhere",
    errno.EPERM: "check its permissions or write elsewhere",
    errno.EROFS: "the file system is read-only; write elsewhere",
    errno.ENOENT: "check the path",
    errno.EISDIR: "it is a folder; give a file",
    errno.ENOTDIR: "a part of the path is a file, not a folder; check the path",
    errno.EEXIST: "it exists already; choose another path",
}


def os_error_line(exc: OSError) -> str:
    """``<file>: <reason>; <what to do>`` (the real file, never an atomic write's temp name)."""
    name = real_path(exc.filename)
    reason = exc.strerror or str(exc) or type(exc).__name__
    advice = _ADVICE.get(exc.errno or -1, "")
    if name:
        text = f"{name}: {reason}"
        if exc.filename2:
            text += f" (-> {real_path(exc.filename2)})"
    else:
        text = _unhide(str(exc) or reason)
    return text + (f"; {advice}" if advice else "")


def _unhide(text: str) -> str:
    """Replace the hidden temp names of atomic writes in a message by the real file names."""
    return re.sub(r"(?<![\w.])\.([^\s/'\"]+?)\.(?:fer-\d+-[^\s/'\"]+?|[A-Za-z0-9_]+)\.tmp\b", r"\1", text)


def one_line(exc: BaseException) -> str:
    """A known error as one line (an OSError: its file and what to do)."""
    if isinstance(exc, OSError) and not _is_fer_error(exc):
        return os_error_line(exc)
    text = str(exc)
    if "Original Traceback" in text:  # re-raised from a DataLoader worker: its message is the last line
        last = [ln for ln in text.strip().splitlines() if ln.strip()][-1]
        text = last.split(": ", 1)[1] if re.match(r"^[\w.]+(Error|Exception): ", last) else last
    return " ".join(_unhide(text).split()) or type(exc).__name__


def _is_fer_error(exc: BaseException) -> bool:
    from ferengine.errors import FerError

    return isinstance(exc, FerError)


def wants_traceback(argv: Sequence[str]) -> bool:
    """``-v`` / ``--verbose`` / ``--log-level DEBUG`` (or ``--log-level=debug``) on the command line."""
    args = list(argv)
    for i, a in enumerate(args):
        if a in ("-v", "--verbose", "-vv"):
            return True
        if a == "--log-level" and i + 1 < len(args) and args[i + 1].strip().upper() == "DEBUG":
            return True
        if a.lower() == "--log-level=debug":
            return True
    return False


def _to_log_file(level: int, msg: str, exc_info: bool = False) -> None:
    """The error into the run's log file (train.log) only, when one is open: the console gets it once, from
    the boundary's own line (a logger without handlers would print it a second time)."""
    if any(isinstance(h, logging.FileHandler) for h in logging.getLogger().handlers):
        logging.getLogger("trainers").log(level, "%s", msg, exc_info=exc_info, extra={CONSOLE_ONLY_FILE: True})


def guard(prog: str, body: Callable[[], int], *, verbose: bool = False, verbose_hint: str = "--log-level DEBUG",
          on_interrupt: Callable[[], str] | None = None, on_error: Callable[[BaseException, str], str] | None = None,
          stream=None) -> int:
    """Run ``body()`` (returns the exit status) behind the error boundary described in the module doc.

    ``on_interrupt()``: the sentence on what was saved and how to resume; ``on_error(exc, line)``: may
    extend a known error's line (e.g. with what changed on ``--resume``); ``verbose``: print the traceback
    of an internal error (and of a known one)."""
    err = stream if stream is not None else sys.stderr
    try:
        return int(body() or 0)
    except KeyboardInterrupt:
        note = ""
        if on_interrupt is not None:
            try:
                note = on_interrupt()
            except Exception:  # noqa: BLE001 - the interrupt is what matters
                note = ""
        print(f"{prog}: interrupted" + (f"; {note}" if note else ""), file=err)
        return 130
    except SystemExit:
        raise
    except BrokenPipeError:  # `... | head`: the reader went away; not an error of ours
        import os

        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 0
    except known_errors() as exc:
        line = one_line(exc)
        if on_error is not None:
            line = on_error(exc, line)
        _to_log_file(logging.ERROR, line)
        if verbose:
            traceback.print_exc(file=err)
        _say(err, f"{prog}: error: {line}")
        return 2
    except Exception as exc:  # noqa: BLE001 - the boundary: a bug, reported in one line
        _to_log_file(logging.ERROR, f"internal error: {type(exc).__name__}: {exc}", exc_info=True)
        if verbose:
            traceback.print_exc(file=err)
        msg = " ".join(str(exc).split())
        _say(err, f"{prog}: internal error: {type(exc).__name__}: {msg} (run with {verbose_hint} for the traceback; "
                  "please report it)")
        return 1


def _say(err, text: str) -> None:
    """One write of the whole line (``print`` writes the newline apart): under torchrun the processes share
    stderr, and each one's report must stay on its own line."""
    err.write(text + "\n")
    err.flush()
