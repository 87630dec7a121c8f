"""Decoded-array cache: parse or decode a dataset once, load it in milliseconds afterwards.

Entries live in ``$FER_DESKTOP_CACHE`` (else ``~/.cache/fer-desktop/datasets``), never next to the
(possibly read-only) data. An entry is an uncompressed ``.npz`` named by a hash of what it was built
from: the source files' absolute paths, sizes and *contents* (a SHA-1 of every byte; for a folder source,
the names and sizes of the files in it), plus the reader's own parameters and a format version. So a
corrected file makes a new entry even when it keeps the old one's size and modification time (``cp -p``,
``rsync -a``), and touching a file does not (the entry built from the file's previous version is removed
when the new one is saved). Hashing costs about a second per 100-200 MB (FER2013's 84 MB csv.gz: ~0.4 s),
once per process for each file (:func:`content_digest` remembers a file's digest while its size, mtime,
ctime and inode stay the same; a copy with ``cp -p`` still gets a new ctime). Entries are written with
``ferengine.fileio.atomic_write`` (a temp file in the cache folder renamed into place), so a killed run or two
concurrent runs never leave a half-written entry behind.
"""
from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
import zipfile
from pathlib import Path
from typing import Any, Iterable

import numpy as np

log = logging.getLogger("trainers.data")

CACHE_VERSION = 2  # 2: keyed on the sources' contents (1: on their mtimes)


def cache_dir(override: str | Path | None = None) -> Path:
    if override:
        return Path(override).expanduser()
    env = os.environ.get("FER_DESKTOP_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "fer-desktop" / "datasets"


_DIGESTS: dict[tuple[Any, ...], str] = {}  # this process's file digests, by path and stat identity


def content_digest(path: str | Path) -> str:
    """SHA-1 of a file's bytes (remembered in this process while its size, mtime, ctime and inode stay the
    same: any write, including a ``cp -p`` over it, changes its ctime)."""
    p = Path(path)
    st = p.stat()
    ident = (str(p.resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)
    d = _DIGESTS.get(ident)
    if d is None:
        h = hashlib.sha1()
        with open(p, "rb") as fh:
            while True:
                chunk = fh.read(1 << 22)
                if not chunk:
                    break
                h.update(chunk)
        d = _DIGESTS[ident] = h.hexdigest()
    return d


def file_signature(path: str | Path) -> list[Any]:
    """Absolute path, size and content of a file (SHA-1 of its bytes), or of a folder (the names and sizes
    of the entries in it)."""
    p = Path(path)
    st = p.stat()
    if p.is_dir():
        listing = sorted((e.name, e.stat().st_size if e.is_file() else -1) for e in p.iterdir())
        return [str(p.resolve()), len(listing), _digest({"listing": listing}, 40)]
    return [str(p.resolve()), int(st.st_size), content_digest(p)]


def _digest(doc: dict[str, Any], n: int) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:n]


def cache_key(kind: str, sources: Iterable[str | Path], **params: Any) -> str:
    """Stable key for an entry built by ``kind`` from ``sources`` with ``params``: ``KIND-SLOT-VERSION``.

    SLOT hashes what the entry is *for* (kind, the sources' paths, params); VERSION hashes the sources'
    sizes and contents too (:func:`file_signature`). Saving a new version of a slot removes the older ones (see ``save``)."""
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
    from ferengine.fileio import atomic_write

    path = cache_path(key, directory)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    try:
        atomic_write(path, write)
    except OSError as e:
        log.warning("could not write dataset cache %s (%s); the data will be parsed again next run", path,
                    e.strerror or e)
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
