"""The one parser of device names (``auto | cpu | cuda | cuda:N | gpu``), used by the backends, the CLI,
the app and the trainers, and why CUDA is or is not there."""
from __future__ import annotations

from .errors import DeviceError

__all__ = ["cuda_reason", "resolve_device", "DeviceError"]


def cuda_reason() -> str | None:
    """None when torch sees a CUDA GPU, else why not (CPU-only torch build, or no device)."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency
        return "no CUDA GPU (PyTorch is not installed)"
    if torch.version.cuda is None:
        return f"no CUDA GPU support in this PyTorch build ({torch.__version__}, CPU only)"
    if not torch.cuda.is_available():
        return f"no CUDA GPU (PyTorch {torch.__version__} with CUDA {torch.version.cuda} sees no device)"
    return None


def resolve_device(device: str | None = "auto"):
    """``"auto"`` (or empty) -> the current CUDA device when torch sees one, else the CPU; ``"gpu"`` =
    ``"cuda"``; ``"cuda"`` -> the current CUDA device with its index. Raises :class:`DeviceError` for a
    malformed name or a CUDA device that is not there."""
    import torch

    d = str(device if device is not None else "auto").strip().lower()
    if d in ("auto", ""):
        d = "cuda" if cuda_reason() is None else "cpu"
    if d == "gpu":
        d = "cuda"
    try:
        dev = torch.device(d)
    except RuntimeError as exc:
        raise DeviceError(f"bad device {device!r} ({exc}); use 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type not in ("cpu", "cuda"):
        raise DeviceError(f"bad device {device!r}: only 'auto', 'cpu', 'cuda' and 'cuda:N' are supported")
    if dev.type == "cuda":
        reason = cuda_reason()
        if reason:
            raise DeviceError(f"device {device!r} asked for, but {reason}")
        index = torch.cuda.current_device() if dev.index is None else dev.index
        if index >= torch.cuda.device_count():
            raise DeviceError(f"no CUDA device {index}: torch sees {torch.cuda.device_count()}")
        dev = torch.device("cuda", index)
    return dev
