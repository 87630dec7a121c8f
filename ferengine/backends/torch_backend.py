"""Eager PyTorch on the CPU or a CUDA GPU (fp32; fp16/bf16 on CUDA)."""
from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..device import resolve_device
from ..graph import InferenceModule
from .base import Backend, BackendUnavailable

if TYPE_CHECKING:  # pragma: no cover
    from ..checkpoint import LoadedModel

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


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
