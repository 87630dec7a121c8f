"""Decoded-array cache: parse or decode a dataset once, load it in milliseconds afterwards.

Entries live in ``$FER_DESKTOP_CACHE`` (else ``~/.cache/fer-desktop/datasets``), never next to the
(possibly read-only) data. An entry is an uncompressed ``.npz`` named by a hash of what it was built
from: the source files' absolute paths, sizes and modification times, plus the reader's own parameters
and a format version, so editing, replacing or touching a source file makes a new entry (and the entry
built from the file's previous version is removed when the new one is saved). Entries are
written to a temporary file in the cache folder and renamed into place, so a killed run or two
concurrent runs never leave a half-written entry behind.
"""
from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Iterable

import numpy as np

log = logging.getLogger("trainers.data")

CACHE_VERSION = 1


def cache_dir(override: str | Path | None = None) -> Path:
    if override:
        return Path(override).expanduser()
    env = os.environ.get("FER_DESKTOP_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "fer-desktop" / "datasets"


def file_signature(path: str | Path) -> list[Any]:
    """Absolute path, size and mtime (ns) of a file or folder."""
    p = Path(path)
    st = p.stat()
    return [str(p.resolve()), int(st.st_size), int(st.st_mtime_ns)]


def _digest(doc: dict[str, Any], n: int) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:n]


def cache_key(kind: str, sources: Iterable[str | Path], **params: Any) -> str:
    """Stable key for an entry built by ``kind`` from ``sources`` with ``params``: ``KIND-SLOT-VERSION``.

    SLOT hashes what the entry is *for* (kind, the sources' paths, params); VERSION hashes the sources'
    sizes and mtimes too. Saving a new version of a slot removes the older ones (see ``save``)."""
    signatures = [file_signature(s) for s in sources]
    slot = {"v": CACHE_VERSION, "kind": kind, "paths": [sig[0] for sig in signatures], "params": params}
    return f"{kind}-{_digest(slot, 8)}-{_digest(dict(slot, sources=signatures), 12)}"


_KEY = re.compile(r"(?P<slot>.+-[0-9a-f]{8})-[0-9a-f]{12}")


def cache_path(key: str, directory: str | Path | None = None) -> Path:
    return cache_dir(directory) / f"{key}.npz"


def load(key: str, directory: str | Path | None = None) -> dict[str, np.ndarray] | None:
    """The cached arrays, or None when absent or unreadable (a corrupt entry is removed)."""
    path = cache_path(key, directory)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        log.warning("ignoring unreadable cache entry %s (%s); it will be rebuilt", path, e)
        try:
            path.unlink()
        except OSError:
            pass
        return None


def save(key: str, arrays: dict[str, np.ndarray], directory: str | Path | None = None) -> Path | None:
    """Write an entry atomically. A cache that cannot be written is logged, not fatal."""
    path = cache_path(key, directory)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)  # mkstemp makes 0600; a cache entry is not secret
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
    except OSError as e:
        log.warning("could not write dataset cache %s (%s); the data will be parsed again next run", path, e)
        return None
    log.info("cached decoded data in %s", path)
    _evict_older_versions(key, path)
    return path


def _evict_older_versions(key: str, path: Path) -> None:
    """Remove the entries of the same slot built from earlier versions of the sources: they can never be
    hit again (a re-downloaded or touched dataset would otherwise leave a full copy behind each time)."""
    m = _KEY.fullmatch(key)
    if m is None:
        return
    for old in path.parent.glob(f"{glob.escape(m['slot'])}-*.npz"):
        if old != path and _KEY.fullmatch(old.stem):
            try:
                old.unlink()
                log.info("removed stale cache entry %s (its sources have changed since)", old.name)
            except OSError:
                pass
