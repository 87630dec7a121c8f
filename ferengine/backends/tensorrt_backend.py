"""TensorRT on a CUDA GPU: a serialized engine run with torch CUDA tensors as I/O buffers, through full TensorRT
(``tensorrt``, >= 10) or TensorRT-RTX (``tensorrt_rtx``), whichever :mod:`ferengine.trt` finds (``.flavour``
says which: ``"TensorRT-RTX 1.7.1.116"``).

TensorRT is imported only when this backend is created (or its availability asked), never when :mod:`ferengine`
is imported. Without an ``engine_path`` the engine comes from :func:`ferengine.export.tensorrt_engine`: built
once (fp16, batch 1..``max_batch``) into ``cache_dir("tensorrt")``, keyed by the weights, the TensorRT flavour
and version, the target compute capabilities (full TensorRT: the GPU) and the build options; an entry that is
stale, damaged or invalid on this GPU is rebuilt, never loaded blindly. With ``engine_path`` (``fer export
--format tensorrt``) that file is checked the same way and refused with the reason. TensorRT-RTX compiles its
kernels for the GPU at the first run; they are kept in a runtime cache beside the engine
(``model.engine.rtcache``), written when the backend closes. Larger batches than ``max_batch`` run in chunks.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

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
    """``fp16``/``max_batch``/``targets``: engine build options (targets: TensorRT-RTX compute capabilities, see
    :func:`ferengine.export.parse_targets`). ``engine_path``: run this prebuilt engine (``fer export --format
    tensorrt``), checked first. ``progress``: ``callback(fraction or None, message)`` while an engine is built
    (the app shows it). ``cuda_graphs``: TensorRT-RTX captures each input shape's launch as a CUDA graph
    (``CudaGraphStrategy.WHOLE_GRAPH_CAPTURE``; off by default until measured on an RTX GPU)."""

    name = "tensorrt"

    def __init__(
        self,
        loaded: "LoadedModel",
        device: str = "auto",
        *,
        fp16: bool = True,
        max_batch: int = 16,
        targets: Any = None,
        engine_path: str | Path | None = None,
        progress: Callable[[float | None, str], Any] | None = None,
        cuda_graphs: bool = False,
    ):
        super().__init__(loaded)
        from ..device import resolve_device
        from ..export import EngineError, check_engine, engine_key, tensorrt_engine
        from ..trt import TrtLogger

        if str(device).strip().lower() == "cpu":
            raise BackendUnavailable("TensorRT runs on a CUDA GPU only; use onnxruntime or torch on the CPU")
        reason = tensorrt_reason()
        if reason:
            raise BackendUnavailable(f"the tensorrt backend is unavailable: {reason}")
        self._device = resolve_device("cuda" if str(device).strip().lower() == "auto" else device)
        reason = tensorrt_reason(self._device)
        if reason:
            raise BackendUnavailable(f"the tensorrt backend is unavailable on {self._device}: {reason}")
        t = import_tensorrt("run")
        trt = t.module
        import torch

        self.flavour = t.label
        self.device = str(self._device)
        self.fp16 = fp16
        self._t = t
        self._logger = TrtLogger(t)
        self._runtime_cache = None
        self._runtime_cache_file: Path | None = None
        self._cuda_graphs = bool(cuda_graphs)
        with torch.cuda.device(self._device):
            if engine_path is not None:
                self.engine_path = Path(engine_path)
                try:
                    record = check_engine(self.engine_path, t)
                except EngineError as exc:
                    raise BackendUnavailable(str(exc)) from None
                if not record.get("key"):
                    log.warning("%s has no engine record (%s): its weights cannot be checked against %s",
                                self.engine_path, self.engine_path.name + ".json", loaded.path)
                elif record["key"] != engine_key(loaded, t, precision=record["precision"],
                                                 max_batch=record["batch"][2], opt_batch=record["batch"][1],
                                                 targets=tuple(record.get("targets") or ())):
                    raise BackendUnavailable(f"{self.engine_path}: built from other weights than {loaded.path} "
                                             "(stale); rebuild it with fer export --format tensorrt")
                self._engine = self._deserialize(trt, self.engine_path)
                if self._engine is None:
                    said = "; ".join(self._logger.errors[-2:])
                    raise BackendUnavailable(f"{self.engine_path}: {t.label} cannot load this engine"
                                             f"{f' ({said})' if said else ''}; rebuild it with fer export")
            else:
                self.engine_path, _ = tensorrt_engine(loaded, fp16=fp16, max_batch=max_batch, targets=targets,
                                                      progress=progress, tensorrt=t)
                self._engine = self._deserialize(trt, self.engine_path)
                if self._engine is None:  # damaged cache entry: build again, once
                    log.warning("cached TensorRT engine %s cannot be loaded; rebuilding it", self.engine_path)
                    self.engine_path, _ = tensorrt_engine(loaded, fp16=fp16, max_batch=max_batch, targets=targets,
                                                          progress=progress, rebuild=True, tensorrt=t)
                    self._engine = self._deserialize(trt, self.engine_path)
                    if self._engine is None:
                        raise BackendUnavailable(f"{self.engine_path}: {t.label} cannot load the engine it built: "
                                                 + ("; ".join(self._logger.errors[-2:]) or "no details"))
            self._context = self._create_context(trt)
            if self._context is None:
                raise BackendUnavailable(f"{t.label} could not create an execution context (out of GPU memory?)")
        self._setup_io(trt)

    # ------------------------------------------------------------------------------------ set-up

    def _deserialize(self, trt: Any, path: Path):
        self._runtime = trt.Runtime(self._logger)
        return self._runtime.deserialize_cuda_engine(path.read_bytes())

    def _create_context(self, trt: Any):
        """TensorRT-RTX: a context with a runtime cache of the JIT-compiled kernels, read from beside the engine;
        full TensorRT: a plain context."""
        if not self._t.rtx or not hasattr(self._engine, "create_runtime_config"):
            return self._engine.create_execution_context()
        from ..export import runtime_cache_path

        config = self._engine.create_runtime_config()
        cache = config.create_runtime_cache()
        self._runtime_cache_file = runtime_cache_path(self.engine_path)
        if self._runtime_cache_file.is_file():
            blob = self._runtime_cache_file.read_bytes()
            if not cache.deserialize(blob):
                log.warning("%s: unusable runtime cache, starting a new one", self._runtime_cache_file)
                cache.reset()
        config.set_runtime_cache(cache)
        self._runtime_cache, self._runtime_config = cache, config
        if self._cuda_graphs and hasattr(trt, "CudaGraphStrategy"):
            config.cuda_graph_strategy = trt.CudaGraphStrategy.WHOLE_GRAPH_CAPTURE
        return self._engine.create_execution_context(runtime_config=config)

    def _save_runtime_cache(self) -> None:
        if self._runtime_cache is None or self._runtime_cache_file is None:
            return
        from ..fileio import atomic_write_bytes

        try:
            blob = self._runtime_cache.serialize()
            if blob is not None and len(blob):
                atomic_write_bytes(self._runtime_cache_file, bytes(blob))
        except Exception as exc:  # noqa: BLE001 - a cache that cannot be written costs a recompile, no more
            log.warning("could not write the TensorRT-RTX runtime cache %s: %s", self._runtime_cache_file, exc)

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
        if not self._closed:
            self._save_runtime_cache()
        self._context = None
        self._runtime_cache = None
        self._engine = None
        self._runtime = None
        super().close()
