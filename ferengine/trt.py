"""Whether TensorRT can be used here, and why not: imported by the TensorRT backend and by the engine
builder in :mod:`ferengine.export`, never when :mod:`ferengine` is imported."""
from __future__ import annotations

from .device import cuda_reason
from .errors import BackendUnavailable

__all__ = ["TENSORRT_INSTALL_HINT", "MIN_MAJOR", "import_tensorrt", "tensorrt_reason"]

TENSORRT_INSTALL_HINT = "pip install 'fer-desktop[tensorrt]', NVIDIA GPU required"
MIN_MAJOR = 10
_TRT: list = []  # [module] or [None, reason] once tried


def import_tensorrt():
    """The ``tensorrt`` module, or :class:`BackendUnavailable` saying why it cannot be used."""
    if not _TRT:
        try:
            import tensorrt as trt
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.split(".")[0] == "tensorrt":
                _TRT.extend([None, f"TensorRT is not installed ({TENSORRT_INSTALL_HINT})"])
            else:
                _TRT.extend([None, f"TensorRT is installed but cannot be loaded ({exc})"])
        except Exception as exc:  # noqa: BLE001 - missing libnvinfer, CUDA mismatch ...
            _TRT.extend([None, f"TensorRT is installed but cannot be loaded ({type(exc).__name__}: {exc})"])
        else:
            version = getattr(trt, "__version__", "0")
            try:
                major = int(version.split(".")[0])
            except ValueError:
                major = 0
            if major < MIN_MAJOR:
                _TRT.extend([None, f"TensorRT {version} is too old, fer-desktop needs >= {MIN_MAJOR} "
                                   f"({TENSORRT_INSTALL_HINT})"])
            else:
                _TRT.append(trt)
    if _TRT[0] is None:
        raise BackendUnavailable(_TRT[1])
    return _TRT[0]


def tensorrt_reason() -> str | None:
    """None when the TensorRT backend can run here, else every reason it cannot, joined by '; '."""
    reasons = []
    try:
        import_tensorrt()
    except BackendUnavailable as exc:
        reasons.append(str(exc))
    cuda = cuda_reason()
    if cuda:
        reasons.append(cuda)
    return "; ".join(reasons) or None
