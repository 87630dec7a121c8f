"""Eager PyTorch on the CPU or a CUDA GPU; on CUDA also fp16/bf16, channels-last and CUDA graphs.

On the CPU the backend is exactly what it always was: fp32, eager, contiguous NCHW. The CUDA-only
options (``precision`` other than fp32, ``channels_last``, ``cuda_graphs``) are REJECTED there with a
``ValueError`` that says why (rather than silently ignored), so a configuration never looks as if it
applied when it did not.

CUDA graphs (``cuda_graphs=True``): one graph per batch-size bucket (:func:`graph_buckets`: 1, 2, 4, ...
up to ``max_batch``), each captured once when the backend is created, after a warm-up on a side stream
as PyTorch's documentation requires, all sharing one memory pool (captured largest first). A batch of
``n`` faces is copied into the static input of the smallest bucket that holds it (the padding rows are
zeroed; in eval mode every row is computed independently, so padding does not change the real rows),
the graph is replayed and the first ``n`` rows of its static outputs are copied out; batches larger than
the largest bucket run in chunks (:func:`chunk_plan`). When capture fails the backend logs one warning
and runs eagerly (``backend.cuda_graphs`` is then False).

Beside ``run(np.ndarray)`` (the :class:`~ferengine.backends.base.Backend` contract), :meth:`TorchBackend.run_tensor`
takes an already prepared torch tensor (e.g. from :meth:`TorchBackend.prepare`, which preprocesses uint8
faces on the device with :func:`ferengine.preprocess.to_device_input`) and returns torch tensors on the
device, with no host round trip.
"""
from __future__ import annotations

import copy
import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..device import resolve_device
from ..graph import InferenceModule
from .base import Backend, BackendUnavailable  # noqa: F401  (BackendUnavailable: re-exported for callers)

if TYPE_CHECKING:  # pragma: no cover
    from ..checkpoint import LoadedModel

log = logging.getLogger("ferengine.backends")

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEFAULT_MAX_BATCH = 64
MAX_BATCH_RANGE = (1, 4096)
GRAPH_WARMUP_ITERS = 3  # eager runs of each bucket on a side stream before its capture (cuDNN picks its kernels)


# ------------------------------------------------------------------------- bucket logic (pure functions)


def graph_buckets(max_batch: int = DEFAULT_MAX_BATCH) -> tuple[int, ...]:
    """The batch sizes one CUDA graph each is captured for: the powers of two below ``max_batch``, then
    ``max_batch`` itself (``graph_buckets(64) == (1, 2, 4, 8, 16, 32, 64)``, ``graph_buckets(24) ==
    (1, 2, 4, 8, 16, 24)``). A padded batch thus wastes less than half of its rows."""
    if isinstance(max_batch, bool) or not isinstance(max_batch, (int, np.integer)):
        raise ValueError(f"max_batch must be an integer from {MAX_BATCH_RANGE[0]} to {MAX_BATCH_RANGE[1]}, "
                         f"got {max_batch!r}")
    m = int(max_batch)
    if not MAX_BATCH_RANGE[0] <= m <= MAX_BATCH_RANGE[1]:
        raise ValueError(f"max_batch must be an integer from {MAX_BATCH_RANGE[0]} to {MAX_BATCH_RANGE[1]}, got {m}")
    out, b = [], 1
    while b < m:
        out.append(b)
        b *= 2
    out.append(m)
    return tuple(out)


def bucket_for(n: int, buckets: tuple[int, ...]) -> int | None:
    """The smallest bucket that holds ``n`` rows (``n >= 1``), or None when ``n`` exceeds the largest."""
    if n < 1:
        raise ValueError(f"a bucket is for a batch of at least one row, got {n}")
    for b in buckets:
        if b >= n:
            return b
    return None


def chunk_plan(n: int, buckets: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """How a batch of ``n`` rows runs: ``[(start, stop, bucket), ...]``, rows ``start:stop`` padded to
    ``bucket``. Full chunks of the largest bucket first, then the remainder in the smallest bucket that
    holds it (``chunk_plan(70, (1, 2, 4, 8, 16, 32, 64)) == [(0, 64, 64), (64, 70, 8)]``); ``n == 0`` -> ``[]``."""
    if n < 0:
        raise ValueError(f"batch size must be >= 0, got {n}")
    if not buckets:
        raise ValueError("no buckets")
    top = max(buckets)
    plan, start = [], 0
    while n - start > top:
        plan.append((start, start + top, top))
        start += top
    if n > start:
        plan.append((start, n, bucket_for(n - start, tuple(sorted(buckets)))))
    return plan


# ---------------------------------------------------------------------------------------- the backend


class TorchBackend(Backend):
    """Runs a private copy of the checkpoint's module under ``torch.inference_mode()``.

    Options (all but ``precision="fp32"`` are for CUDA devices and raise ``ValueError`` on the CPU):

    - ``precision``: ``"fp32"`` (default), ``"fp16"`` or ``"bf16"``: the module copy's weights are
      converted (a model cast, not autocast: one dtype throughout, which CUDA graphs capture as is); the
      input is converted on the device; the softmax is taken in fp32 and outputs are always float32.
    - ``channels_last``: weights and input in ``torch.channels_last`` memory format (NHWC), which lets
      cuDNN use its tensor-core convolution kernels without layout transposes, mostly with fp16/bf16.
    - ``cuda_graphs``: replay one captured CUDA graph per batch-size bucket (see the module doc), which
      meant to remove the per-kernel launch overhead of small models at small batches (not yet measured).
    - ``max_batch``: the largest bucket (default 64); only used with ``cuda_graphs``.

    Nothing process-wide is changed (no cuDNN/TF32 flags): torch keeps its own settings and intra-op
    thread count (one per physical core by default), shared with the rest of the process.
    Attributes: ``precision``, ``channels_last``, ``cuda_graphs`` (True only while graphs are in use),
    ``buckets`` (the captured batch sizes, ``()`` without graphs).
    """

    name = "torch"

    def __init__(self, loaded: "LoadedModel", device: str = "auto", *, precision: str = "fp32",
                 channels_last: bool = False, cuda_graphs: bool = False, max_batch: int = DEFAULT_MAX_BATCH):
        super().__init__(loaded)
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        for opt, value in (("channels_last", channels_last), ("cuda_graphs", cuda_graphs)):
            if not isinstance(value, (bool, np.bool_)):
                raise ValueError(f"{opt} must be true or false, got {value!r}")
        buckets = graph_buckets(max_batch)  # validated whatever the device
        self._device = resolve_device(device)
        self._dtype = PRECISIONS[precision]
        if self._device.type != "cuda":
            if self._dtype != torch.float32:
                raise ValueError(f"precision {precision!r} is for CUDA GPUs; use precision='fp32' on {self._device}")
            asked = [opt for opt, v in (("channels_last", channels_last), ("cuda_graphs", cuda_graphs)) if v]
            if asked:
                raise ValueError(f"{' and '.join(asked)} {'are' if len(asked) > 1 else 'is'} for CUDA GPUs; "
                                 f"leave {' and '.join(asked)} off on {self._device}")
        self.precision = precision
        self.channels_last = bool(channels_last)
        self.max_batch = int(max_batch)
        self.device = str(self._device)
        model = copy.deepcopy(loaded.model).to(device=self._device, dtype=self._dtype).eval()
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self._module = InferenceModule(model, self.heads).eval()
        self.cuda_graphs = False
        self.buckets: tuple[int, ...] = ()
        self._graphs: dict[int, tuple[Any, torch.Tensor, tuple[torch.Tensor, ...]]] = {}
        if cuda_graphs:
            self._capture(buckets)

    # ------------------------------------------------------------------------------------- run

    def _run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            return {k: v.cpu().numpy() for k, v in self._device_forward(torch.from_numpy(x)).items()}  # waits

    def _device_forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``x`` (any device, any float dtype) -> float32 outputs on this backend's device: on the CPU the
        module eagerly, as it always ran; on CUDA through :meth:`_forward` (graphs when captured)."""
        if self._device.type != "cuda":
            t = x.to(device=self._device, dtype=self._dtype)
            return {k: v.float() for k, v in zip(self._module.output_names, self._module(t))}
        with torch.cuda.device(self._device):
            return self._forward(x.to(self._device, non_blocking=True))

    def run_tensor(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """A prepared float batch ``(N, C, S, S)`` as a torch tensor (on any device; moved to this
        backend's device when elsewhere, cast to its precision there) -> ``{"probs": (N, K), "va": (N, 2)}``
        as float32 tensors ON THE DEVICE: fresh tensors owned by the caller (never views of graph
        buffers), made under ``torch.inference_mode()`` (so not for autograd). The GPU work is queued on
        the current stream; nothing waits for it. ``N == 0`` gives empty outputs."""
        if self._closed:
            raise RuntimeError(f"{self.name} backend is closed")
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"run_tensor takes a torch tensor, got {type(x).__name__}; use run() for numpy arrays")
        c, s, _ = self.input_shape
        if x.ndim != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"{self.name} backend expects a batch of shape (N, {c}, {s}, {s}) for {self.info.arch}, "
                             f"got shape {tuple(x.shape)}; build it with TorchBackend.prepare(faces) or "
                             "ferengine.preprocess.to_device_input(faces, spec, device)")
        if not x.is_floating_point():
            raise ValueError(f"{self.name} backend expects normalised float input, got dtype {x.dtype}; "
                             "convert uint8 faces with TorchBackend.prepare(faces)")
        with torch.inference_mode():
            if x.shape[0] == 0:
                return {k: torch.zeros((0, self._width(k)), dtype=torch.float32, device=self._device)
                        for k in self.outputs}
            return self._device_forward(x)

    def prepare(self, faces: Any) -> torch.Tensor:
        """uint8 face crops (what :func:`ferengine.preprocess.to_model_input` takes) -> the float32 model
        input on this backend's device, preprocessed there (:func:`ferengine.preprocess.to_device_input`),
        ready for :meth:`run_tensor`."""
        from ..preprocess import to_device_input

        return to_device_input(faces, self.spec, self._device)

    def _forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """CUDA: ``x`` on the device (any float dtype) -> float32 outputs on the device, via the graphs
        when captured, else eagerly."""
        if self._graphs:
            return self._replay(x)
        t = x.to(dtype=self._dtype)
        if self.channels_last:
            t = t.contiguous(memory_format=torch.channels_last)
        outs = self._module(t)
        return {k: v.float() for k, v in zip(self._module.output_names, outs)}

    # ------------------------------------------------------------------------------ CUDA graphs

    def _static_input(self, batch: int) -> torch.Tensor:
        t = torch.zeros((batch,) + self.input_shape, dtype=self._dtype, device=self._device)
        return t.contiguous(memory_format=torch.channels_last) if self.channels_last else t

    def _capture(self, buckets: tuple[int, ...]) -> None:
        """Capture one graph per bucket (largest first, one shared memory pool); on failure log one
        warning, drop what was captured and stay eager."""
        graphs: dict[int, tuple[Any, torch.Tensor, tuple[torch.Tensor, ...]]] = {}
        try:
            with torch.inference_mode(), torch.cuda.device(self._device):
                pool = torch.cuda.graph_pool_handle()
                for b in sorted(buckets, reverse=True):
                    static_in = self._static_input(b)
                    side = torch.cuda.Stream()
                    side.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(side):  # warm-up off the capture stream, as PyTorch's docs require
                        for _ in range(GRAPH_WARMUP_ITERS):
                            self._module(static_in)
                    torch.cuda.current_stream().wait_stream(side)
                    graph = torch.cuda.CUDAGraph()
                    # thread_local: CUDA calls of OTHER threads (another backend still running while this one is
                    # created, e.g. Pipeline.set_backend) do not break the capture, nor does it break them
                    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                        static_out = tuple(v.float() for v in self._module(static_in))
                    graphs[b] = (graph, static_in, static_out)
                torch.cuda.synchronize(self._device)
        except Exception as exc:  # noqa: BLE001 - any capture failure: run eagerly instead
            graphs.clear()
            try:
                torch.cuda.synchronize(self._device)
            except Exception:  # noqa: BLE001 - the device is in a bad state; the eager run will say so
                pass
            log.warning("torch backend: CUDA graph capture failed on %s (%s: %s); running eagerly",
                        self.device, type(exc).__name__, exc)
            return
        self._graphs = graphs
        self.buckets = tuple(sorted(graphs))
        self.cuda_graphs = True

    def _replay(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        n = x.shape[0]
        outs = {k: torch.empty((n, self._width(k)), dtype=torch.float32, device=self._device) for k in self.outputs}
        for start, stop, bucket in chunk_plan(n, self.buckets):
            graph, static_in, static_out = self._graphs[bucket]
            k = stop - start
            static_in[:k].copy_(x[start:stop])  # casts to the precision, keeps the static layout
            if k < bucket:
                static_in[k:].zero_()
            graph.replay()
            for name, buf in zip(self._module.output_names, static_out):
                outs[name][start:stop].copy_(buf[:k])
        return outs

    def close(self) -> None:
        self._graphs = {}  # frees the graphs and their pool with the module copy
        self.cuda_graphs = False
        self._module = None  # type: ignore[assignment]  # frees the copy (GPU memory returns to torch's cache)
        super().close()
