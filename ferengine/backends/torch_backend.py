"""Eager PyTorch on the CPU or a CUDA GPU (fp32; fp16/bf16 on CUDA)."""
from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..export import InferenceModule
from .base import Backend, BackendUnavailable, cuda_reason

if TYPE_CHECKING:  # pragma: no cover
    from ..checkpoint import LoadedModel

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"`` -> the current CUDA device when torch sees one, else the CPU; ``"gpu"`` = ``"cuda"``.
    A CUDA device that is not there raises :class:`BackendUnavailable`."""
    d = str(device).strip().lower()
    if d == "auto":
        d = "cuda" if cuda_reason() is None else "cpu"
    if d == "gpu":
        d = "cuda"
    try:
        dev = torch.device(d)
    except RuntimeError as exc:
        raise ValueError(f"bad device {device!r} ({exc}); use 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cuda":
        reason = cuda_reason()
        if reason:
            raise BackendUnavailable(f"device {device!r} asked for, but {reason}")
        index = torch.cuda.current_device() if dev.index is None else dev.index
        if index >= torch.cuda.device_count():
            raise BackendUnavailable(f"no CUDA device {index}: torch sees {torch.cuda.device_count()}")
        dev = torch.device("cuda", index)
    return dev


class TorchBackend(Backend):
    """Runs a private copy of the checkpoint's module under ``torch.inference_mode()``.

    ``precision``: ``"fp32"`` (default), or ``"fp16"`` / ``"bf16"`` on CUDA (weights converted; the
    softmax is taken in fp32). Nothing process-wide is changed: torch keeps its own intra-op thread
    count (one per physical core by default), shared with the rest of the process.
    """

    name = "torch"

    def __init__(self, loaded: "LoadedModel", device: str = "auto", *, precision: str = "fp32"):
        super().__init__(loaded)
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self._device = resolve_device(device)
        self._dtype = PRECISIONS[precision]
        if self._dtype != torch.float32 and self._device.type != "cuda":
            raise ValueError(f"precision {precision!r} is for CUDA GPUs; use precision='fp32' on {self._device}")
        self.precision = precision
        self.device = str(self._device)
        model = copy.deepcopy(loaded.model).to(device=self._device, dtype=self._dtype).eval()
        self._module = InferenceModule(model, self.heads).eval()

    def _run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            t = torch.from_numpy(x).to(device=self._device, dtype=self._dtype)
            outs = self._module(t)
            return {k: v.float().cpu().numpy() for k, v in zip(self._module.output_names, outs)}

    def close(self) -> None:
        self._module = None  # type: ignore[assignment]  # frees the copy (GPU memory returns to torch's cache)
        super().close()
