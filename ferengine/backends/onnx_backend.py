"""onnxruntime: the checkpoint exported to ONNX (cached), on the CPU or, with onnxruntime-gpu, CUDA.

The ONNX file is made from the :class:`LoadedModel` on demand by :func:`ferengine.export.cached_onnx`
(keyed by the weights, so switching backend at run time costs one export per checkpoint, ever), or
given as ``onnx_path``. Providers follow ``device``: ``"cpu"`` -> CPU only; ``"cuda[:N]"`` -> the CUDA
provider (TensorRT provider in front when TensorRT is installed), an error if this onnxruntime has
none; ``"auto"`` -> CUDA when this onnxruntime has the provider and torch sees a GPU, else CPU.

Session options are tuned for a live app on a small CPU (see :func:`session_options`).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .base import Backend, BackendUnavailable, cuda_reason, physical_cores

if TYPE_CHECKING:  # pragma: no cover
    from ..checkpoint import LoadedModel

log = logging.getLogger("ferengine.backends")

GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def _import_ort():
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise BackendUnavailable(f"onnxruntime is not installed (pip install onnxruntime): {exc}") from None
    return ort


def session_options(ort: Any, threads: int | None = None, spinning: bool = False):
    """Low-latency options for small batches (1-16 faces) on a few cores.

    - ``intra_op_num_threads`` = physical cores available to this process (``threads`` overrides):
      convolutions split across cores (resnet18 48 px, 2 cores: 6.2 ms/face vs 11.1 with 1 thread);
      hyper-threads add contention, not speed.
    - sequential execution, one inter-op thread: these graphs are a single chain.
    - graph optimisation ALL (constant folding, conv+BN+activation fusion, NCHWc layouts): 1.3-1.5x
      faster at batch 1 and 1.4-1.7x at batch 16 than BASIC here.
    - no spinning: with it, ORT's workers busy-wait after every run. Measured in a 30 fps loop on 2
      cores, spinning bought 0.1-0.4 ms per run and burned 17-25 ms of extra CPU per frame (most of
      a core) that the face detector, the capture thread and the GUI need. ``spinning=True`` for
      throughput benchmarks.
    """
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = int(threads) if threads else (physical_cores() or 0)  # 0: ORT's default
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    so.log_severity_level = 3  # errors only: no warnings about e.g. unused initialisers on stderr
    return so


class OnnxRuntimeBackend(Backend):
    """``onnx_path``: run this file instead of exporting ``loaded`` (its input shape, output names and
    embedded labels must match the checkpoint). ``threads``/``spinning``: see :func:`session_options`.
    ``tensorrt_ep``: put onnxruntime's TensorRT provider in front on a GPU (default: when TensorRT is
    installed). ``opset``: for the export."""

    name = "onnxruntime"

    def __init__(
        self,
        loaded: "LoadedModel",
        device: str = "auto",
        *,
        onnx_path: str | Path | None = None,
        threads: int | None = None,
        spinning: bool = False,
        tensorrt_ep: bool | None = None,
        opset: int | None = None,
    ):
        super().__init__(loaded)
        ort = _import_ort()
        providers, gpu_asked = self._providers(ort, device, tensorrt_ep)
        so = session_options(ort, threads, spinning)
        if onnx_path is not None:
            self.onnx_path = Path(onnx_path)
            if not self.onnx_path.is_file():
                raise FileNotFoundError(f"{self.onnx_path}: no such ONNX file")
            self._session = self._open(ort, so, providers)
        else:
            from ..export import cached_onnx

            self.onnx_path = cached_onnx(loaded, opset)
            try:
                self._session = self._open(ort, so, providers)
            except Exception as exc:  # noqa: BLE001 - a damaged cache entry: export again, once
                log.warning("cached ONNX file %s cannot be opened (%s); exporting it again", self.onnx_path, exc)
                self.onnx_path.unlink(missing_ok=True)
                self.onnx_path = cached_onnx(loaded, opset)
                self._session = self._open(ort, so, providers)
        used = self._session.get_providers()
        if gpu_asked == "required" and used[0] == "CPUExecutionProvider":
            raise BackendUnavailable(
                f"onnxruntime could not start its GPU providers {providers[:-1]} for device {device!r} "
                "(CUDA/cuDNN libraries missing or mismatched?); use device='cpu' or the torch backend"
            )
        self.providers = tuple(used)
        self.device = used[0]
        self.threads = so.intra_op_num_threads
        self._check_session(loaded)

    # ------------------------------------------------------------------------------------ set-up

    def _providers(self, ort: Any, device: str, tensorrt_ep: bool | None) -> tuple[list, str | None]:
        d = str(device).strip().lower()
        have = set(ort.get_available_providers())
        if d == "cpu":
            return ["CPUExecutionProvider"], None
        if d == "auto":
            if "CUDAExecutionProvider" not in have or cuda_reason() is not None:
                return ["CPUExecutionProvider"], None
            index, need = 0, "optional"
        elif d == "gpu" or d.startswith("cuda"):
            _, _, idx = d.partition(":")
            if idx and not idx.isdigit():
                raise ValueError(f"bad device {device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'")
            index, need = int(idx or 0), "required"
            if "CUDAExecutionProvider" not in have:
                raise BackendUnavailable(
                    f"this onnxruntime ({ort.__version__}) has no CUDA provider (providers: "
                    f"{', '.join(sorted(have))}); pip install onnxruntime-gpu, or use device='cpu'"
                )
        else:
            raise ValueError(f"bad device {device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'")
        providers: list = [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
        if tensorrt_ep is None:
            from .tensorrt_backend import tensorrt_reason

            tensorrt_ep = "TensorrtExecutionProvider" in have and tensorrt_reason() is None
        if tensorrt_ep and "TensorrtExecutionProvider" in have:
            from ..export import writable_cache_dir

            c, s, _ = self.input_shape
            shape = lambda n: f"input:{n}x{c}x{s}x{s}"  # noqa: E731 - one profile for batches 1..16
            providers.insert(0, ("TensorrtExecutionProvider", {
                "device_id": index, "trt_fp16_enable": True, "trt_engine_cache_enable": True,
                "trt_engine_cache_path": str(writable_cache_dir("ort-tensorrt")),
                "trt_profile_min_shapes": shape(1), "trt_profile_opt_shapes": shape(4),
                "trt_profile_max_shapes": shape(16),
            }))
        return providers, need

    def _open(self, ort: Any, so: Any, providers: list):
        return ort.InferenceSession(str(self.onnx_path), so, providers=providers)

    def _check_session(self, loaded: "LoadedModel") -> None:
        sess, src = self._session, self.onnx_path
        inputs = sess.get_inputs()
        if len(inputs) != 1 or inputs[0].name != "input":
            raise ValueError(f"{src}: expected one input named 'input', got {[i.name for i in inputs]}")
        shape = list(inputs[0].shape)
        if len(shape) != 4 or any(isinstance(d, int) and d != e for d, e in zip(shape[1:], self.input_shape)):
            raise ValueError(f"{src}: input shape {shape} does not fit the checkpoint's (N, "
                             f"{', '.join(map(str, self.input_shape))})")
        if isinstance(shape[0], int) and shape[0] > 0:
            log.warning("%s has a fixed batch size of %d", src, shape[0])
        have = [o.name for o in sess.get_outputs()]
        missing = [k for k in self.outputs if k not in have]
        if missing:
            raise ValueError(f"{src}: outputs {have} lack {missing} for heads {list(self.heads)}")
        raw = sess.get_modelmeta().custom_metadata_map.get("fer_checkpoint")
        if raw:
            try:
                labels = json.loads(raw).get("labels")
            except (ValueError, AttributeError):
                labels = None
            if labels is not None and list(labels) != list(self.labels):
                raise ValueError(f"{src} was exported with labels {labels}, the checkpoint has {list(self.labels)}")

    # -------------------------------------------------------------------------------------- run

    def _run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        outs = self._session.run(list(self.outputs), {"input": x})
        return {k: np.asarray(v, dtype=np.float32) for k, v in zip(self.outputs, outs)}

    def close(self) -> None:
        self._session = None
        super().close()
