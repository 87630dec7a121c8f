"""Dataset readers: each reads the format users actually download and returns a :class:`FaceDataset`.

>>> ds = load_dataset("fer2013", "../shared/data", "train")       # doctest: +SKIP
>>> ds.images.shape, ds.label_names                                # (28709, 48, 48), ("angry", ...)

``load_dataset(name, data_dir, split, **opts)``: ``data_dir`` None means ``$FER_DATA_DIR``, else ``./data``;
each reader looks for its own file or sub-folder under it (see each module's docstring for the layouts and
options). ``dataset_splits(name)`` lists the canonical split names; readers also accept the datasets'
original spellings case-insensitively (``Training``, ``PublicTest``, ``PrivateTest``, ``Validation``...).

Options every reader accepts: ``image_size`` and ``channels`` (what on-disk readers decode to: default 112
and RGB; fer2013/ferplus keep their native 48x48 grey, ``ferengine.preprocess.to_model_input`` resizes a
batch), ``in_memory`` (on-disk readers: decode once into ``images``, cached), ``cache_dir`` (else
``$FER_DESKTOP_CACHE`` or ``~/.cache/fer-desktop/datasets``). Reader-specific options are listed in the
modules; an unknown option is an error.

Registered datasets: fer2013, ferplus, rafdb, affectnet, sfew, afew-va, affwild2, folder.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from . import affectnet, afew_va, affwild2, fer2013, ferplus, folder, rafdb, sfew
from .base import DatasetError, FaceDataset, resolve_data_dir

__all__ = ["DATASETS", "DatasetError", "FaceDataset", "dataset_splits", "load_dataset", "resolve_data_dir",
           "canonical_name", "canonical_split"]

DATASETS: dict[str, Callable[..., FaceDataset]] = {
    "fer2013": fer2013.read_fer2013,
    "ferplus": ferplus.read_ferplus,
    "rafdb": rafdb.read_rafdb,
    "affectnet": affectnet.read_affectnet,
    "sfew": sfew.read_sfew,
    "afew-va": afew_va.read_afew_va,
    "affwild2": affwild2.read_affwild2,
    "folder": folder.read_folder,
}

_MODULES = {"fer2013": fer2013, "ferplus": ferplus, "rafdb": rafdb, "affectnet": affectnet, "sfew": sfew,
            "afew-va": afew_va, "affwild2": affwild2, "folder": folder}

# Spellings people use for the same datasets (keys compared without '-', '_', spaces, case).
_NAME_ALIASES = {"fer2013": "fer2013", "fer": "fer2013", "ferplus": "ferplus", "fer+": "ferplus",
                 "rafdb": "rafdb", "raf": "rafdb", "affectnet": "affectnet", "sfew": "sfew", "sfew2": "sfew",
                 "afewva": "afew-va", "affwild2": "affwild2", "folder": "folder", "csv": "folder"}


def canonical_name(name: str) -> str:
    """Registry name for ``name`` (``AFEW_VA`` -> ``afew-va``, ``RAF-DB`` -> ``rafdb``)."""
    key = "".join(ch for ch in str(name).lower() if ch not in "-_ .")
    if key in _NAME_ALIASES:
        return _NAME_ALIASES[key]
    raise DatasetError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")


def dataset_splits(name: str) -> tuple[str, ...]:
    """Canonical split names of a dataset, e.g. fer2013: ("train", "publictest", "privatetest")."""
    return tuple(_MODULES[canonical_name(name)].SPLITS)


def canonical_split(name: str, split: str) -> str:
    """The canonical spelling of ``split`` for dataset ``name`` (``PublicTest`` -> ``publictest``)."""
    from .base import normalise_split

    n = canonical_name(name)
    m = _MODULES[n]
    return normalise_split(n, split, m.SPLITS, m.ALIASES)


def load_dataset(name: str, data_dir: str | Path | None, split: str, **opts: Any) -> FaceDataset:
    """Read one split of a dataset. Raises :class:`DatasetError` with a message saying what is missing
    or malformed, where, and where the dataset comes from."""
    n = canonical_name(name)
    return DATASETS[n](resolve_data_dir(data_dir), split, **opts)
