"""TensorRT (>= 10) on a CUDA GPU: a serialized engine run with torch CUDA tensors as I/O buffers.

``tensorrt`` is imported only when this backend is created (or its availability asked), never when
:mod:`ferengine` is imported. Without an ``engine_path`` the engine is built once from the checkpoint's
cached ONNX export (:func:`ferengine.export.build_tensorrt_engine`, fp16, batch 1..``max_batch``) into
``cache_dir("tensorrt")``, keyed by the ONNX file, the TensorRT version, the GPU and the build options
(engines do not carry over between GPUs or TensorRT versions). Larger batches run in chunks.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..trt import MIN_MAJOR, import_tensorrt, tensorrt_reason  # noqa: F401  (re-exported)
from .base import Backend, BackendUnavailable

if TYPE_CHECKING:  # pragma: no cover
    from ..checkpoint import LoadedModel

log = logging.getLogger("ferengine.backends")

def _torch_dtype(trt: Any, dtype: Any):
    import torch

    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
             "int32": torch.int32, "int64": torch.int64, "int8": torch.int8, "bool": torch.bool}
    for name, tdtype in table.items():
        if hasattr(trt, name) and dtype == getattr(trt, name):
            return tdtype
    raise BackendUnavailable(f"TensorRT tensor type {dtype} is not supported by this backend")


class TensorRTBackend(Backend):
    """``fp16``/``max_batch``: engine build options. ``onnx_path``: build from this ONNX file instead
    of the checkpoint's cached export. ``engine_path``: run this prebuilt engine (``fer export
    --format tensorrt``) as is."""

    name = "tensorrt"

    def __init__(
        self,
        loaded: "LoadedModel",
        device: str = "auto",
        *,
        fp16: bool = True,
        max_batch: int = 16,
        onnx_path: str | Path | None = None,
        engine_path: str | Path | None = None,
    ):
        super().__init__(loaded)
        reason = tensorrt_reason()
        if reason:
            raise BackendUnavailable(f"the tensorrt backend is unavailable: {reason}")
        trt = import_tensorrt()
        import torch

        from ..device import resolve_device

        if str(device).strip().lower() == "cpu":
            raise BackendUnavailable("TensorRT runs on a CUDA GPU only; use onnxruntime or torch on the CPU")
        self._device = resolve_device("cuda" if str(device).strip().lower() == "auto" else device)
        self.device = str(self._device)
        self.fp16 = fp16
        with torch.cuda.device(self._device):
            if engine_path is not None:
                self.engine_path = Path(engine_path)
                self._engine = self._deserialize(trt, self.engine_path)
                if self._engine is None:
                    raise BackendUnavailable(
                        f"{self.engine_path}: TensorRT {trt.__version__} cannot load this engine (built by "
                        "another TensorRT version or for another GPU?); rebuild it with fer export")
            else:
                self.engine_path = self._cached_engine(trt, loaded, onnx_path, fp16, max_batch)
                self._engine = self._deserialize(trt, self.engine_path)
                if self._engine is None:  # damaged cache entry: build again, once
                    log.warning("cached TensorRT engine %s cannot be loaded; rebuilding it", self.engine_path)
                    self.engine_path.unlink(missing_ok=True)
                    self.engine_path = self._cached_engine(trt, loaded, onnx_path, fp16, max_batch)
                    self._engine = self._deserialize(trt, self.engine_path)
                    if self._engine is None:
                        raise BackendUnavailable(f"{self.engine_path}: TensorRT cannot load the engine it built")
            self._context = self._engine.create_execution_context()
            if self._context is None:
                raise BackendUnavailable("TensorRT could not create an execution context (out of GPU memory?)")
        self._setup_io(trt)

    # ------------------------------------------------------------------------------------ set-up

    def _deserialize(self, trt: Any, path: Path):
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        return self._runtime.deserialize_cuda_engine(path.read_bytes())

    def _cached_engine(self, trt: Any, loaded: "LoadedModel", onnx_path: Any, fp16: bool, max_batch: int) -> Path:
        import torch

        from ..export import build_tensorrt_engine, cached_onnx, writable_cache_dir

        onnx_file = Path(onnx_path) if onnx_path is not None else cached_onnx(loaded)
        props = torch.cuda.get_device_properties(self._device)
        h = hashlib.sha256(onnx_file.read_bytes())
        h.update(f"\ntrt={trt.__version__} gpu={props.name} cc={props.major}.{props.minor} "
                 f"fp16={fp16} max_batch={max_batch}".encode())
        path = writable_cache_dir("tensorrt") / f"{onnx_file.stem}-{h.hexdigest()[:24]}.engine"
        if not path.is_file():
            build_tensorrt_engine(onnx_file, path, fp16=fp16, max_batch=max_batch)
        return path

    def _setup_io(self, trt: Any) -> None:
        engine = self._engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._all_outputs = [n for n in names if n not in inputs]
        if inputs != ["input"]:
            raise ValueError(f"{self.engine_path}: expected one input named 'input', the engine has {inputs}")
        missing = [k for k in self.outputs if k not in self._all_outputs]
        if missing:
            raise ValueError(f"{self.engine_path}: outputs {self._all_outputs} lack {missing} for heads {list(self.heads)}")
        shape = tuple(engine.get_tensor_shape("input"))
        if len(shape) != 4 or tuple(shape[1:]) != self.input_shape:
            raise ValueError(f"{self.engine_path}: engine input shape {shape} does not fit the checkpoint's "
                             f"(N, {', '.join(map(str, self.input_shape))})")
        _, _, max_shape = engine.get_tensor_profile_shape("input", 0)
        self.max_batch = int(max_shape[0]) if shape[0] == -1 else int(shape[0])
        self._dtypes = {n: _torch_dtype(trt, engine.get_tensor_dtype(n)) for n in names}

    # -------------------------------------------------------------------------------------- run

    def _run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        import torch

        parts: dict[str, list[np.ndarray]] = {k: [] for k in self.outputs}
        ctx = self._context
        with torch.cuda.device(self._device):
            stream = torch.cuda.current_stream(self._device)
            for start in range(0, x.shape[0], self.max_batch):
                inp = torch.from_numpy(x[start:start + self.max_batch]).to(self._device, self._dtypes["input"])
                if not ctx.set_input_shape("input", tuple(inp.shape)):
                    raise RuntimeError(f"TensorRT rejected input shape {tuple(inp.shape)}")
                ctx.set_tensor_address("input", inp.data_ptr())
                bufs = {}
                for name in self._all_outputs:  # every output needs a buffer, used or not
                    buf = torch.empty(tuple(ctx.get_tensor_shape(name)), dtype=self._dtypes[name], device=self._device)
                    ctx.set_tensor_address(name, buf.data_ptr())
                    bufs[name] = buf
                if not ctx.execute_async_v3(stream.cuda_stream):
                    raise RuntimeError("TensorRT execution failed (see the TensorRT log)")
                for k in self.outputs:  # .cpu() waits for the stream
                    parts[k].append(bufs[k].float().cpu().numpy())
        return {k: v[0] if len(v) == 1 else np.concatenate(v) for k, v in parts.items()}

    def close(self) -> None:
        self._context = None
        self._engine = None
        self._runtime = None
        super().close()
