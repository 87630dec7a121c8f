"""The backend interface: ``run(float32 (N, C, S, S)) -> {"probs": (N, K), "va": (N, 2)}``.

Every backend takes a :class:`ferengine.checkpoint.LoadedModel` and snapshots it when it is created (the
torch backend copies the module, the others export it), so later changes to ``loaded.model`` do not
leak into a running backend, and a backend never changes ``loaded.model`` (device, dtype, train/eval).
"""
from __future__ import annotations

import abc
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..device import cuda_reason
from ..errors import BackendUnavailable
from ..graph import output_names
from ..trt import TENSORRT_INSTALL_HINT

if TYPE_CHECKING:  # pragma: no cover
    from ..checkpoint import LoadedModel

log = logging.getLogger("ferengine.backends")

__all__ = ["BACKENDS", "TENSORRT_INSTALL_HINT", "Backend", "BackendUnavailable", "cuda_reason", "output_names",
           "physical_cores"]

BACKENDS = ("torch", "onnxruntime", "tensorrt")



class Backend(abc.ABC):
    """One loaded model, ready to run batches of preprocessed faces.

    Subclasses implement :meth:`_run` (a validated, C-contiguous float32 batch of at least one face ->
    the output dict) and, when they hold resources, :meth:`close`. A backend is a context manager.
    ``run`` is not meant to be called from two threads at once.
    """

    name: str = ""
    device: str = ""

    def __init__(self, loaded: "LoadedModel"):
        self.info = loaded.info
        self.spec = loaded.spec
        self.labels: tuple[str, ...] = tuple(loaded.info.labels)
        self.heads: tuple[str, ...] = tuple(loaded.info.heads)
        self.outputs: tuple[str, ...] = output_names(self.heads)
        self.input_shape: tuple[int, int, int] = (self.spec.channels, self.spec.size, self.spec.size)
        self._closed = False

    # ---------------------------------------------------------------------------------------- API

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """float32 ``(N, C, S, S)`` from :func:`ferengine.preprocess.to_model_input` -> a dict with
        ``"probs"`` ``(N, K)`` (softmax over the checkpoint's labels) and/or ``"va"`` ``(N, 2)``
        (valence, arousal in [-1, 1]), per the checkpoint's heads. Fresh float32 arrays, owned by the
        caller. ``N == 0`` is allowed and gives empty outputs."""
        if self._closed:
            raise RuntimeError(f"{self.name} backend is closed")
        x = self.check_input(batch)
        if x.shape[0] == 0:
            return {k: np.zeros((0, self._width(k)), np.float32) for k in self.outputs}
        return self._run(x)

    def close(self) -> None:
        """Release the model (GPU memory, sessions). Idempotent; ``run`` raises afterwards."""
        self._closed = True

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} on {self.device}: {self.info.arch} {self.outputs}>"

    # ----------------------------------------------------------------------------------- helpers

    def check_input(self, batch: Any) -> np.ndarray:
        """The batch as C-contiguous float32, or a ValueError saying what is wrong with it."""
        if not isinstance(batch, np.ndarray):
            if hasattr(batch, "detach") and hasattr(batch, "cpu"):  # a torch tensor
                batch = batch.detach().cpu().numpy()
            else:
                batch = np.asarray(batch)
        c, s, _ = self.input_shape
        if batch.ndim != 4 or tuple(batch.shape[1:]) != self.input_shape:
            raise ValueError(
                f"{self.name} backend expects a float32 batch of shape (N, {c}, {s}, {s}) for "
                f"{self.info.arch} ({c} channel{'s' if c > 1 else ''}, {s}x{s}), got shape "
                f"{tuple(batch.shape)}; build it with ferengine.preprocess.to_model_input(faces, spec)"
            )
        if not np.issubdtype(batch.dtype, np.floating):
            raise ValueError(
                f"{self.name} backend expects normalised float32 input, got dtype {batch.dtype}; "
                "convert uint8 faces with ferengine.preprocess.to_model_input(faces, spec)"
            )
        return np.ascontiguousarray(batch, dtype=np.float32)

    def _width(self, output: str) -> int:
        return len(self.labels) if output == "probs" else 2

    @abc.abstractmethod
    def _run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """``x``: C-contiguous float32 ``(N, C, S, S)``, N >= 1."""


# ------------------------------------------------------------------------------------- machines


def physical_cores() -> int | None:
    """Physical CPU cores this process may use (Linux topology under its CPU affinity), or None."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return None
    cores = set()
    for cpu in cpus:
        topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            pkg = (topo / "physical_package_id").read_text().strip()
            core = (topo / "core_id").read_text().strip()
        except OSError:
            return len(cpus) or None
        cores.add((pkg, core))
    return len(cores) or None
