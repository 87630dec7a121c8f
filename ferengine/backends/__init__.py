"""Inference backends: one small interface over PyTorch, onnxruntime and TensorRT.

>>> backend = create_backend("auto", ferengine.checkpoint.load(path))
>>> out = backend.run(to_model_input(faces, backend.spec))   # {"probs": (N, K), "va": (N, 2)}

``"auto"`` tries, in order (the first one that can be created wins; each skipped one is logged):

- on a CUDA GPU (``device`` "auto" and torch sees a GPU, or ``device`` "cuda[:N]"): TensorRT (fp16) when a
  flavour that can run on this GPU is installed (full TensorRT; TensorRT-RTX on the RTX-class GPUs it targets),
  else torch on CUDA. onnxruntime is not tried on a GPU: its
  CUDA provider needs the separate ``onnxruntime-gpu`` build and is no faster than eager torch for
  models this small, while torch CUDA is always there when the GPU is.
- on the CPU (no GPU, or ``device="cpu"``): onnxruntime, else torch. Measured on 2 cores at batch 1:
  fastcnn 0.65 vs 1.7 ms per face, resnet18 (48 px) 6.2 vs 11.2 ms; and eager torch's OpenMP threads
  spin after each call (about 12 ms of CPU per frame for fastcnn at 30 fps), which onnxruntime, as
  configured here, does not.

Backend modules are imported on demand, so importing :mod:`ferengine` never imports onnxruntime or
TensorRT.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
from typing import TYPE_CHECKING, Any

from .base import BACKENDS, TENSORRT_INSTALL_HINT, Backend, BackendUnavailable, cuda_reason, output_names

if TYPE_CHECKING:  # pragma: no cover
    from ..checkpoint import LoadedModel

__all__ = [
    "BACKENDS", "Backend", "BackendUnavailable", "available_backends", "create_backend", "auto_order",
    "output_names", "TENSORRT_INSTALL_HINT",
]

log = logging.getLogger("ferengine.backends")

_MODULES = {
    "torch": ("torch_backend", "TorchBackend"),
    "onnxruntime": ("onnx_backend", "OnnxRuntimeBackend"),
    "tensorrt": ("tensorrt_backend", "TensorRTBackend"),
}


def _onnxruntime_reason() -> str | None:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return "onnxruntime is not installed (pip install onnxruntime)"
    except Exception as exc:  # noqa: BLE001 - a broken install
        return f"onnxruntime is installed but cannot be loaded ({type(exc).__name__}: {exc})"
    missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        return f"{' and '.join(missing)} not installed, needed to export checkpoints (pip install {' '.join(missing)})"
    return None


def available_backends() -> dict[str, str | None]:
    """``{name: None}`` for each backend usable here, ``{name: reason}`` for the others.

    torch is always usable (on the CPU at least); onnxruntime needs ``onnxruntime`` (+ ``onnx``,
    ``onnxscript`` to export); TensorRT needs full TensorRT (>= 10) and a CUDA GPU, or TensorRT-RTX and a GPU
    it targets (:mod:`ferengine.trt`; ``tensorrt_summary()`` says which flavour and what it can do here).
    """
    return {name: _reason(name) for name in BACKENDS}


def _reason(name: str) -> str | None:
    if name == "onnxruntime":
        return _onnxruntime_reason()
    if name == "tensorrt":
        from .tensorrt_backend import tensorrt_reason

        return tensorrt_reason()
    return None  # torch: a hard dependency, and the CPU is always there


def _wants_gpu(device: str) -> bool:
    d = str(device).lower()
    if d == "auto":
        return cuda_reason() is None
    return d.startswith("cuda") or d == "gpu"


def auto_order(device: str = "auto") -> list[str]:
    """The backends ``create_backend("auto", ..., device)`` tries, best first (see the module doc)."""
    return ["tensorrt", "torch"] if _wants_gpu(device) else ["onnxruntime", "torch"]


def _backend_class(name: str) -> type[Backend]:
    module, cls = _MODULES[name]
    return getattr(importlib.import_module(f".{module}", __name__), cls)


def create_backend(name: str, loaded: "LoadedModel", device: str = "auto", **options: Any) -> Backend:
    """A ready backend for ``loaded``.

    ``name``: ``"auto"`` or one of :data:`BACKENDS`. ``device``: ``"auto"``, ``"cpu"``, ``"cuda"``,
    ``"cuda:N"``. ``options`` go to the backend class (torch: ``precision``, and on CUDA ``channels_last``,
    ``cuda_graphs``, ``max_batch``; onnxruntime: ``onnx_path``, ``threads``, ``spinning``, ``tensorrt_ep``;
    tensorrt: ``fp16``, ``max_batch``, ``targets``, ``engine_path``, ``progress``, ``cuda_graphs``); with
    ``"auto"`` each candidate gets the options its constructor accepts.
    Raises :class:`BackendUnavailable` (why, and what to install) when the backend cannot run here.
    """
    from ..errors import ExportError

    if name != "auto":
        if name not in BACKENDS:
            raise ValueError(f"unknown backend {name!r}; choose 'auto' or one of {', '.join(BACKENDS)}")
        reason = _reason(name)
        if reason is not None:
            raise BackendUnavailable(f"the {name} backend is unavailable: {reason}")
        return _backend_class(name)(loaded, device, **options)

    skipped = []
    for candidate in auto_order(device):
        reason = _reason(candidate)
        if reason is not None:
            skipped.append(f"{candidate}: {reason}")
            log.debug("auto backend: skipping %s (%s)", candidate, reason)
            continue
        cls = _backend_class(candidate)
        try:
            backend = cls(loaded, device, **_accepted(cls, options))
        except (BackendUnavailable, ExportError) as exc:
            skipped.append(f"{candidate}: {exc}")
            log.warning("auto backend: %s failed (%s); trying the next one", candidate, exc)
            continue
        log.info("auto backend: %s on %s", backend.name, backend.device)
        return backend
    raise BackendUnavailable("no backend can run here: " + "; ".join(skipped))


def _accepted(cls: type, options: dict[str, Any]) -> dict[str, Any]:
    import inspect

    params = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in options.items() if k in params}
