"""Export a checkpoint for deployment: ONNX (for onnxruntime) and TensorRT engines.

``export_onnx(loaded, path)`` writes one self-contained ``.onnx`` file: input ``"input"`` float32
``(batch, C, S, S)``, outputs ``"probs"`` (softmax, ``(batch, K)``) and/or ``"va"`` (``(batch, 2)``) per the
checkpoint's heads, a dynamic batch axis, and the checkpoint's info JSON in the model's
``metadata_props`` under ``"fer_checkpoint"``. The file is checked with ``onnx.checker``, compared with
the torch model on onnxruntime (batch 1 and 3) when onnxruntime is installed, and written atomically.

Exporter: ``torch.onnx.export(..., dynamo=True)`` (torch.export + onnxscript, PyTorch's default since 2.9).
It is the maintained path (the TorchScript exporter warns that it will be removed), and it proves the
batch axis dynamic symbolically: a model that specialises on its batch size fails at export instead of
silently baking a size in. Its graphs run as fast on onnxruntime as the TorchScript exporter's (within
noise: fastcnn 0.65 vs 0.67 ms, resnet18 6.2 vs 6.0 ms per face on 2 cores). It is slower to export
(1-2 s per model against 0.05-0.4 s); the backends cache the result, so that is paid once per
checkpoint. ``exporter="auto"`` falls back to the TorchScript exporter (with a logged warning) when the
dynamo path raises or its result does not match torch - e.g. an older PyTorch, or a future
architecture torch.export cannot trace.

Cache: backends convert a loaded checkpoint on demand through :func:`cached_onnx` (and the TensorRT
backend through ``cache_dir("tensorrt")``). The cache lives in ``$FER_DESKTOP_CACHE/<kind>/``, default
``${XDG_CACHE_HOME:-~/.cache}/fer-desktop/<kind>/``; files are keyed by :func:`fingerprint`. When that
folder cannot be made or written (read-only ``HOME``), a temporary folder is used for the run, with one
warning (:func:`writable_cache_dir`).
"""
from __future__ import annotations

import copy
import hashlib
import inspect
import io
import json
import logging
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from torch import nn

from .device import cuda_reason
from .errors import BackendUnavailable, ExportError
from .graph import InferenceModule, output_names
from .fileio import atomic_write_bytes, show
from .validate import check_int

if TYPE_CHECKING:  # pragma: no cover
    from .checkpoint import LoadedModel

log = logging.getLogger("ferengine.export")

META_KEY = "fer_checkpoint"
EXPORT_VERSION = 1  # bump when the exported graph's contract changes: invalidates every cache entry
CACHE_ENV = "FER_DESKTOP_CACHE"
EXPORTERS = ("auto", "dynamo", "torchscript")
TORCHSCRIPT_OPSET = 17
MIN_OPSET = 7  # the lowest opset torch's TorchScript exporter writes
DYNAMO_MIN_OPSET = 18  # the dynamo exporter writes 18 and up (asked for less, it silently writes 18)
VERIFY_ATOL = 1e-4


# ExportError and InferenceModule (the deployed graph) live in ferengine.errors and ferengine.graph;
# imported here for callers that look for them in ferengine.export.
__all__ = ["ExportError", "InferenceModule", "export_onnx", "build_tensorrt_engine", "cached_onnx", "cache_dir",
           "writable_cache_dir", "fingerprint", "opset_range", "check_opset", "onnx_to_fp16", "tensorrt_engine",
           "check_engine", "EngineError", "engine_key", "parse_targets", "sidecar_path", "runtime_cache_path"]


def opset_range() -> tuple[int, int]:
    """The ONNX opsets :func:`export_onnx` can write here: 7 (TorchScript exporter) up to the newest one
    the installed ``onnx`` knows (dynamo exporter, 18 and up). Measured with torch 2.14 / onnx 1.23 /
    onnxscript 0.7: 7-17 only through TorchScript, 18-23 both, 24-28 only dynamo; above onnx's newest
    the dynamo exporter silently wrote opset 18, so those are refused."""
    import onnx

    return MIN_OPSET, int(onnx.defs.onnx_opset_version())


def check_opset(value, name: str = "opset") -> int:
    """An opset in :func:`opset_range` (:class:`~ferengine.errors.InvalidValue` otherwise)."""
    lo, hi = opset_range()
    return check_int(value, name, lo=lo, hi=hi, hint=" (the ONNX opsets this PyTorch and onnx can write)")


def _cpu_copy(model: nn.Module) -> nn.Module:
    """An fp32 CPU copy in eval mode; ``model`` itself is left untouched."""
    return copy.deepcopy(model).to(device="cpu", dtype=torch.float32).eval()


# ------------------------------------------------------------------------------------------- onnx


def export_onnx(
    loaded: "LoadedModel",
    path: str | os.PathLike,
    opset: int | None = None,
    *,
    exporter: str = "auto",
    verify: bool = True,
) -> Path:
    """Export ``loaded`` to ONNX at ``path`` (atomically) and return the path.

    ``opset``: ONNX opset (default: the exporter's own, 18+ for dynamo, 17 for TorchScript), checked by
    :func:`check_opset`; the written graph is checked to carry exactly that opset (an exporter that
    writes another one counts as failed). ``exporter``: ``"auto"`` (dynamo, falling back to
    TorchScript; TorchScript alone for opsets below 18), ``"dynamo"`` or ``"torchscript"``.
    ``verify``: compare onnxruntime with torch at batch 1 and 3 (max abs diff < 1e-4) before writing.
    Raises :class:`ExportError` naming the model and the reason.
    """
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    if opset is not None:
        opset = check_opset(opset)
    import onnx

    path = Path(path)
    info = loaded.info
    module = InferenceModule(_cpu_copy(loaded.model), info.heads).eval()
    names = module.output_names
    c, s = info.input.channels, info.input.size
    sample = torch.randn(2, c, s, s, generator=torch.Generator().manual_seed(0))

    if exporter != "auto":
        tries = [exporter]
    elif opset is not None and opset < DYNAMO_MIN_OPSET:
        tries = ["torchscript"]
    else:
        tries = ["dynamo", "torchscript"]
    errors = []
    for i, how in enumerate(tries):
        try:
            proto = _export_dynamo(module, sample, names, opset) if how == "dynamo" else \
                _export_torchscript(module, sample, names, opset)
            written = _opset_of(proto)
            if opset is not None and written != opset:
                raise ExportError(f"it wrote opset {written}, not the {opset} asked for")
            _check_graph(proto, names, (c, s, s))
            onnx.checker.check_model(proto, full_check=True)
            if verify:
                _verify(proto, module, (c, s, s))
        except Exception as exc:  # noqa: BLE001 - reported, or retried with the next exporter
            errors.append(f"{how} exporter: {type(exc).__name__}: {exc}")
            if i + 1 < len(tries):
                log.warning("ONNX export of %s with the %s exporter failed (%s); trying %s",
                            info.arch, how, exc, tries[i + 1])
            continue
        break
    else:
        raise ExportError(f"cannot export {info.arch!r} ({show(loaded.path)}) to ONNX"
                          f"{f' with opset {opset}' if opset is not None else ''}: " + "; ".join(errors))

    del proto.metadata_props[:]
    for key, value in (
        (META_KEY, json.dumps(info.to_dict(), sort_keys=True)),
        ("fer_export_version", str(EXPORT_VERSION)),
        ("fer_exporter", how),
        ("fer_outputs", ",".join(names)),
    ):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.doc_string = f"fer-desktop {info.name or info.arch}: input (batch,{c},{s},{s}) -> {', '.join(names)}"
    data = proto.SerializeToString()
    atomic_write_bytes(path, data)
    log.info("exported %s to %s (%s exporter, opset %s, %.1f MB)", info.arch, path, how,
             _opset_of(proto), len(data) / 1e6)
    return path


def _export_dynamo(module: nn.Module, sample: torch.Tensor, names: tuple[str, ...], opset: int | None):
    if "dynamo" not in inspect.signature(torch.onnx.export).parameters:
        raise ExportError(f"torch {torch.__version__} has no dynamo ONNX exporter (needs torch >= 2.5)")
    batch = torch.export.Dim("batch", min=1, max=65536)
    program = torch.onnx.export(
        module, (sample,), None, dynamo=True, input_names=["input"], output_names=list(names),
        dynamic_shapes=({0: batch},), opset_version=opset, verbose=False,
    )
    if program is None:  # pragma: no cover - torch versions that need a file
        raise ExportError("torch.onnx.export(dynamo=True) returned no program")
    return program.model_proto


def _export_torchscript(module: nn.Module, sample: torch.Tensor, names: tuple[str, ...], opset: int | None):
    import onnx

    kwargs = {}
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        kwargs["dynamo"] = False
    buf = io.BytesIO()
    axes = {n: {0: "batch"} for n in ("input", *names)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # chosen knowingly, see the module doc
        torch.onnx.export(
            module, (sample,), buf, input_names=["input"], output_names=list(names), dynamic_axes=axes,
            opset_version=opset or TORCHSCRIPT_OPSET, do_constant_folding=True, **kwargs,
        )
    return onnx.load_from_string(buf.getvalue())


def _check_graph(proto, names: tuple[str, ...], chw: tuple[int, int, int]) -> None:
    """The graph has our input/output names, a symbolic batch axis, and the checkpoint's input shape."""
    init = {t.name for t in proto.graph.initializer}
    inputs = [v for v in proto.graph.input if v.name not in init]
    outputs = list(proto.graph.output)
    if [v.name for v in inputs] != ["input"]:
        raise ExportError(f"graph inputs are {[v.name for v in inputs]}, expected ['input']")
    if tuple(v.name for v in outputs) != names:
        raise ExportError(f"graph outputs are {[v.name for v in outputs]}, expected {list(names)}")
    dims = inputs[0].type.tensor_type.shape.dim
    if len(dims) != 4 or tuple(d.dim_value for d in dims[1:]) != chw:
        raise ExportError(f"graph input shape is {_shape(inputs[0])}, expected (batch, {chw[0]}, {chw[1]}, {chw[2]})")
    for v in (inputs[0], *outputs):
        d0 = v.type.tensor_type.shape.dim[0] if v.type.tensor_type.shape.dim else None
        if d0 is None or d0.HasField("dim_value") or not d0.dim_param:
            raise ExportError(f"{v.name!r} has shape {_shape(v)}: the batch axis is not dynamic")


def _shape(value) -> tuple:
    return tuple(d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim)


def _opset_of(proto) -> int | None:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)


def _verify(proto, module: nn.Module, chw: tuple[int, int, int]) -> None:
    """onnxruntime on the exported graph agrees with torch at batch 1 and 3 (skipped without ORT)."""
    try:
        import onnxruntime as ort
    except ImportError:
        log.debug("onnxruntime not installed: exported graph not compared with torch")
        return
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(1)
    for n in (1, 3):
        x = torch.randn(n, *chw, generator=gen)
        with torch.inference_mode():
            ref = [t.numpy() for t in module(x)]
        got = sess.run(None, {"input": x.numpy()})
        for name, a, b in zip(module.output_names, got, ref):
            if a.shape != b.shape:
                raise ExportError(f"onnxruntime gives {name} of shape {a.shape} at batch {n}, torch {b.shape}")
            diff = float(np.max(np.abs(a - b))) if a.size else 0.0
            if not diff < VERIFY_ATOL:
                raise ExportError(f"onnxruntime and torch differ on {name} at batch {n}: max abs diff {diff:.2e}")


def read_onnx_info(path: str | os.PathLike):
    """The :class:`~ferengine.checkpoint.CheckpointInfo` embedded in an exported ``.onnx`` file."""
    import onnx

    from .checkpoint import CheckpointError, CheckpointInfo

    proto = onnx.load(str(path), load_external_data=False)
    meta = {p.key: p.value for p in proto.metadata_props}
    if META_KEY not in meta:
        raise CheckpointError(f"{path}: an ONNX file without fer-desktop metadata (not made by export_onnx)")
    return CheckpointInfo.from_dict(json.loads(meta[META_KEY]), str(path))


# ------------------------------------------------------------------------------------------ cache


def cache_dir(kind: str = "onnx") -> Path:
    """``$FER_DESKTOP_CACHE/<kind>``, else ``${XDG_CACHE_HOME:-~/.cache}/fer-desktop/<kind>``."""
    root = os.environ.get(CACHE_ENV)
    if root:
        base = Path(root).expanduser()
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "fer-desktop"
    return base / kind


_FALLBACK_CACHES: dict[str, Path] = {}


def writable_cache_dir(kind: str = "onnx") -> Path:
    """:func:`cache_dir` made and proved writable; when it cannot be (an unwritable or missing ``HOME``, a
    read-only ``$FER_DESKTOP_CACHE``), a temporary folder for this process instead, removed at exit,
    with one warning line saying so (exports are then redone by every run)."""
    if kind in _FALLBACK_CACHES:
        return _FALLBACK_CACHES[kind]
    try:
        folder = cache_dir(kind)
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".probe-{os.getpid()}-{os.urandom(4).hex()}"
        probe.touch(exist_ok=False)
        probe.unlink()
        return folder
    except (OSError, RuntimeError) as exc:  # RuntimeError: Path.home() without a home
        import atexit
        import shutil
        import tempfile

        reason = f"{exc.strerror}: {show(exc.filename)}" if isinstance(exc, OSError) and exc.filename else str(exc)
        where = os.environ.get(CACHE_ENV) or os.environ.get("XDG_CACHE_HOME") or "~/.cache"
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f"fer-desktop-{kind}-"))
        except OSError as exc2:
            raise ExportError(f"no folder to export the model into: the cache ({where}) is unusable ({reason}) and "
                              f"so is the temp folder ({exc2.strerror}); set {CACHE_ENV} to a writable folder") from None
        atexit.register(shutil.rmtree, tmp, ignore_errors=True)
        _FALLBACK_CACHES[kind] = tmp
        if not any(k != kind for k in _FALLBACK_CACHES):  # one line per process, not per kind
            log.warning("cannot use the cache folder under %s (%s); exporting to a temporary folder for this run "
                        "(set %s to a writable folder to keep exports between runs)", where, reason, CACHE_ENV)
        return tmp


def fingerprint(loaded: "LoadedModel", *extra: object) -> str:
    """sha256 (hex) of what an export depends on: the export format version, the checkpoint info
    (arch, arch_kwargs, heads, labels, input spec, format version ...), every weight's bytes, ``extra``.

    It hashes the weights in memory rather than the checkpoint file, so the key always describes the
    model actually exported - also when the file was rewritten after loading, or never existed.
    """
    h = hashlib.sha256()
    h.update(f"fer-desktop export v{EXPORT_VERSION}\n".encode())
    h.update(json.dumps(loaded.info.to_dict(), sort_keys=True).encode())
    for name, t in loaded.model.state_dict().items():
        t = t.detach().to("cpu").contiguous()
        h.update(f"\n{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    for e in extra:
        h.update(f"\n{e!r}".encode())
    return h.hexdigest()


def cached_onnx(loaded: "LoadedModel", opset: int | None = None) -> Path:
    """The ONNX export of ``loaded`` in the cache, exported now unless a matching file is there."""
    key = fingerprint(loaded, f"opset={opset}")
    path = writable_cache_dir("onnx") / f"{_safe(loaded.info.arch)}-{key[:24]}.onnx"
    if path.is_file():
        log.debug("reusing cached ONNX export %s", path)
        return path
    log.info("exporting %s to ONNX for the cache (%s)", loaded.info.arch, path)
    return export_onnx(loaded, path, opset)


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name) or "model"


# -------------------------------------------------------------------------------------- tensorrt

ENGINE_FORMAT = 1  # the sidecar's format: bump when what it records changes
PRECISIONS = ("fp16", "fp32")


def onnx_to_fp16(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Write an fp16 copy of the ONNX file ``src`` to ``dst`` (atomically): weights and activations in fp16, the
    input and outputs kept float32 (casts at both ends), the ops onnxruntime has no fp16 kernel for kept in fp32.
    TensorRT-RTX builds strongly typed networks (no fp16 builder flag): an engine runs in the precision of its
    graph, so this is how an fp16 engine is made. Conversion by onnxruntime's own converter
    (``onnxruntime.transformers.float16``)."""
    import onnx

    try:
        from onnxruntime.transformers.float16 import convert_float_to_float16
    except ImportError as exc:
        raise ExportError(f"an fp16 engine needs onnxruntime's fp16 converter ({exc}); pip install onnxruntime, "
                          "or build in fp32 (--fp32)") from None
    proto = onnx.load(str(src))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "values clipped to the fp16 range": reported by the comparison below
        half = convert_float_to_float16(proto, keep_io_types=True, disable_shape_infer=False)
    for entry in half.metadata_props:
        if entry.key == "fer_precision":
            entry.value = "fp16"
            break
    else:
        entry = half.metadata_props.add()
        entry.key, entry.value = "fer_precision", "fp16"
    atomic_write_bytes(Path(dst), half.SerializeToString())
    return Path(dst)


def parse_targets(value: str | Sequence[str] | None, t) -> tuple[str, ...]:
    """``"8.6,89,12.0"`` (or a sequence) -> ``("8.6", "8.9", "12.0")`` checked against what TensorRT-RTX ``t``
    targets; None / "default" -> its default set; "current" -> the GPU here. Full TensorRT: () (it builds for
    its GPU; asking for targets is an error)."""
    from .errors import InvalidValue

    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "default")):
        return t.default_targets()
    if not t.rtx:
        raise InvalidValue(f"--targets: {t.label} builds an engine for the GPU it runs on; compute-capability "
                           f"targets are a TensorRT-RTX option (pip install 'fer-desktop[tensorrt-rtx]')")
    items = [v.strip() for v in (value.split(",") if isinstance(value, str) else value) if str(v).strip()]
    if [v.lower() for v in items] == ["current"]:
        return ("current",)
    known = t.target_ccs()
    out = []
    for item in items:
        cc = item if "." in item else (f"{item[:-1]}.{item[-1]}" if item.isdigit() and len(item) >= 2 else item)
        if cc not in known:
            raise InvalidValue(f"--targets: {item!r} is not a compute capability {t.label} can build for; "
                               f"choose from {', '.join(known)}, or 'current' (the GPU here)")
        if cc not in out:
            out.append(cc)
    if not out:
        raise InvalidValue(f"--targets: no compute capability given; choose from {', '.join(known)}")
    return tuple(out)


def engine_key(loaded: "LoadedModel", t, *, precision: str, max_batch: int, opt_batch: int,
               targets: Sequence[str]) -> str:
    """What an engine depends on, hashed: the weights and checkpoint info (:func:`fingerprint`), the flavour and
    version of TensorRT, the target compute capabilities (full TensorRT: the GPU that builds it), precision and
    batch range. An engine whose recorded key differs is stale and is rebuilt."""
    where = tuple(targets)
    if not t.rtx or where == ("current",):
        from .trt import gpu_cc

        where = (*where, *(gpu_cc() or ("no GPU",)))
    return fingerprint(loaded, f"engine v{ENGINE_FORMAT}", t.flavour, t.version, where, precision,
                       int(max_batch), int(opt_batch))


def sidecar_path(engine_path: str | os.PathLike) -> Path:
    """``model.engine`` -> ``model.engine.json``: what the engine was built from and for (see :func:`check_engine`)."""
    p = Path(engine_path)
    return p.with_name(p.name + ".json")


def runtime_cache_path(engine_path: str | os.PathLike) -> Path:
    """``model.engine`` -> ``model.engine.rtcache``: TensorRT-RTX's compiled kernels for the GPU it ran on."""
    p = Path(engine_path)
    return p.with_name(p.name + ".rtcache")


def build_tensorrt_engine(
    onnx_path: str | os.PathLike,
    engine_path: str | os.PathLike,
    fp16: bool = True,
    max_batch: int = 16,
    *,
    opt_batch: int | None = None,
    workspace_mb: int | None = None,
    targets: str | Sequence[str] | None = None,
    progress=None,
    meta: dict | None = None,
    tensorrt=None,
) -> Path:
    """Build a serialized TensorRT engine from an ONNX file and write it, then its sidecar JSON
    (:func:`sidecar_path`: flavour, version, targets, precision, batch range, size and sha256 of the engine,
    plus ``meta``), atomically.

    Full TensorRT or TensorRT-RTX, whichever :func:`ferengine.trt.import_tensorrt` finds (TensorRT-RTX builds on
    a machine without a GPU). The network is strongly typed: ``fp16`` converts the graph to fp16 first
    (:func:`onnx_to_fp16`, input and outputs stay float32); otherwise it runs in fp32. One optimisation profile
    covers batches 1..``max_batch``, tuned for ``opt_batch`` (default ``min(4, max_batch)``: a frame rarely
    holds more faces). ``targets``: TensorRT-RTX's compute capabilities (:func:`parse_targets`). ``progress``:
    ``callback(fraction or None, message)`` from the builder's progress monitor. Raises
    :class:`BackendUnavailable` when no TensorRT can build here, :class:`ExportError` when the ONNX file does not
    parse or the build fails (with what TensorRT said)."""
    import tempfile

    from .trt import ProgressMonitor, TrtLogger, import_tensorrt, tensorrt_build_reason

    if tensorrt is None:
        reason = tensorrt_build_reason()
        if reason:
            raise BackendUnavailable(f"cannot build a TensorRT engine: {reason}")
    t = tensorrt or import_tensorrt("build")
    trt = t.module
    max_batch = check_int(max_batch, "max_batch", lo=1, hi=65536)
    opt = min(max(1, int(opt_batch or min(4, max_batch))), max_batch)
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not onnx_path.is_file():
        raise ExportError(f"{onnx_path}: no such ONNX file")
    ccs = parse_targets(targets, t)
    precision = "fp16" if fp16 else "fp32"
    if progress:
        progress(None, f"{t.label}: preparing the {precision} graph")

    logger = TrtLogger(t)
    with tempfile.TemporaryDirectory(prefix="fer-trt-") as tmp:
        src = onnx_to_fp16(onnx_path, Path(tmp) / "model-fp16.onnx") if fp16 else onnx_path
        builder = trt.Builder(logger)
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(network, logger)
        if not parser.parse(src.read_bytes()):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise ExportError(f"{onnx_path}: {t.label}'s ONNX parser failed: {errors or 'no details'}")
    if network.num_inputs != 1:
        raise ExportError(f"{onnx_path}: expected one input, the network has {network.num_inputs}")
    inp = network.get_input(0)
    shape = tuple(inp.shape)
    if len(shape) != 4 or any(d < 1 for d in shape[1:]):
        raise ExportError(f"{onnx_path}: input {inp.name!r} has shape {shape}, expected (batch, C, S, S)")
    chw = shape[1:]

    config = builder.create_builder_config()
    if workspace_mb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    if t.rtx:
        config.num_compute_capabilities = len(ccs)
        for i, cc in enumerate(ccs):
            member = "CURRENT" if cc == "current" else "SM" + cc.replace(".", "")
            if not config.set_compute_capability(getattr(trt.ComputeCapability, member), i):
                raise ExportError(f"{t.label} refused compute capability {cc} as a target")
    profile = builder.create_optimization_profile()
    profile.set_shape(inp.name, (1, *chw), (opt, *chw), (max_batch, *chw))
    config.add_optimization_profile(profile)
    if progress and hasattr(config, "progress_monitor"):
        config.progress_monitor = ProgressMonitor(t, progress)

    log.info("building a %s engine from %s (%s, batch 1..%d%s)", t.label, onnx_path, precision, max_batch,
             f", compute capability {' '.join(ccs)}" if ccs else "")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        said = "; ".join(logger.errors[-3:]) or "no details"
        raise ExportError(f"{onnx_path}: {t.label} could not build an engine: {said}")
    data = bytes(serialized)
    record = {
        "fer_engine": ENGINE_FORMAT, "flavour": t.flavour, "tensorrt": t.label, "version": t.version,
        "targets": list(ccs) or None, "precision": precision, "batch": [1, opt, max_batch],
        "input": list(chw), "size": len(data), "sha256": hashlib.sha256(data).hexdigest(), **(meta or {}),
    }
    if not t.rtx or ccs == ("current",):
        from .trt import gpu_cc

        record["gpu"] = list(gpu_cc() or ())
    atomic_write_bytes(engine_path, data)
    runtime_cache_path(engine_path).unlink(missing_ok=True)  # kernels of the engine this one replaces
    atomic_write_bytes(sidecar_path(engine_path), (json.dumps(record, indent=1, sort_keys=True) + "\n").encode())
    if progress:
        progress(1.0, f"{t.label}: engine built")
    return engine_path


class EngineError(ExportError):
    """An engine file that cannot be used as it is: missing, damaged, stale, foreign; the message says which."""


def check_engine(path: str | os.PathLike, t, *, key: str | None = None, probe: bool = True) -> dict:
    """Check the engine file ``path`` for TensorRT ``t`` without loading it, and return its sidecar record ({}
    when it has none). Raises :class:`EngineError` saying what is wrong:

    - no such file, an empty file, or a file that does not start with this TensorRT's engine header;
    - its size or sha256 differs from what the sidecar recorded when it was built (a truncated or damaged copy);
    - built by another TensorRT flavour or version, for other target compute capabilities, or from other
      weights (``key`` given and different from the recorded one): stale;
    - ``probe`` and a GPU here: TensorRT's own header check (``Runtime.get_engine_validity``, TensorRT-RTX) says
      it is invalid on this system, with its diagnostics.
    """
    path = Path(path)
    shown = show(path)
    try:
        head = path.read_bytes()
    except FileNotFoundError:
        raise EngineError(f"{shown}: no such engine file") from None
    except OSError as exc:
        raise EngineError(f"{shown}: cannot read the engine ({exc.strerror})") from None
    if not head:
        raise EngineError(f"{shown}: the engine file is empty")
    from .trt import ENGINE_MAGIC

    magic = ENGINE_MAGIC.get(t.flavour)
    if magic and not head.startswith(magic):
        raise EngineError(f"{shown}: not a {t.label} engine (it does not start with {magic!r}; an engine of full "
                          "TensorRT, or not an engine at all?); rebuild it with fer export --format tensorrt")
    record: dict = {}
    side = sidecar_path(path)
    if side.is_file():
        try:
            record = json.loads(side.read_text(encoding="utf-8"))
            if not isinstance(record, dict) or record.get("fer_engine") != ENGINE_FORMAT:
                raise ValueError("not a fer-desktop engine record of this version")
        except (ValueError, OSError) as exc:
            raise EngineError(f"{show(side)}: unreadable engine record ({exc}); rebuild the engine with fer export "
                              "--format tensorrt") from None
        if record.get("size") != len(head) or record.get("sha256") != hashlib.sha256(head).hexdigest():
            raise EngineError(f"{shown}: {len(head)} bytes that are not the {record.get('size')} bytes built "
                              f"(a truncated or damaged copy); rebuild it with fer export --format tensorrt")
        if record.get("flavour") != t.flavour or record.get("version") != t.version:
            raise EngineError(f"{shown}: built by {record.get('tensorrt')}, but {t.label} is installed (engines do "
                              "not carry over between TensorRT versions); rebuild it with fer export --format tensorrt")
        if key is not None and record.get("key") not in (None, key):
            raise EngineError(f"{shown}: built from other weights or with other options than asked for now "
                              "(stale); rebuild it with fer export --format tensorrt")
    if probe and t.rtx and cuda_reason() is None:
        validity, diagnostics = _validity(t, head)
        if validity == "INVALID":
            raise EngineError(f"{shown}: {t.label} says this engine is invalid here ({diagnostics}); rebuild it "
                              "with fer export --format tensorrt")
        if validity == "SUBOPTIMAL":
            log.warning("%s: %s says this engine may run slower here than one built for this GPU", shown, t.label)
    return record


def _validity(t, data: bytes) -> tuple[str, str]:
    from .trt import TrtLogger

    trt = t.module
    logger = TrtLogger(t)
    logger.quiet = True
    runtime = trt.Runtime(logger)
    validity, bits = runtime.get_engine_validity(data[: max(int(runtime.engine_header_size), 64)])
    flags = [name.lower().replace("_", " ") for name, member in trt.EngineInvalidityDiagnostics.__members__.items()
             if int(bits) & int(member)]  # the members are bit values (measured: 1, 2, 4 .. 64)
    return validity.name, ", ".join(flags) or "no diagnostics"


def tensorrt_engine(loaded: "LoadedModel", path: str | os.PathLike | None = None, *, fp16: bool = True,
                    max_batch: int = 16, opt_batch: int | None = None, targets=None, progress=None,
                    rebuild: bool = False, tensorrt=None, verify: bool = True) -> tuple[Path, bool]:
    """The engine of ``loaded`` at ``path`` (default: in ``cache_dir("tensorrt")``, named by :func:`engine_key`),
    built now unless a checked, up-to-date one is there: ``(path, built)``. A stale, damaged or foreign engine at
    ``path`` is rebuilt (with a logged line saying why), never loaded. ``tensorrt``: the
    :class:`ferengine.trt.TensorRT` to build with (default: the one that can build here). ``verify``: compare the
    ONNX export with torch first (:func:`export_onnx`)."""
    from .trt import import_tensorrt, tensorrt_build_reason

    if tensorrt is None:
        reason = tensorrt_build_reason()
        if reason:
            raise BackendUnavailable(f"cannot build a TensorRT engine: {reason}")
    t = tensorrt or import_tensorrt("build")
    max_batch = check_int(max_batch, "max_batch", lo=1, hi=65536)
    opt = min(max(1, int(opt_batch or min(4, max_batch))), max_batch)
    ccs = parse_targets(targets, t)
    precision = "fp16" if fp16 else "fp32"
    key = engine_key(loaded, t, precision=precision, max_batch=max_batch, opt_batch=opt, targets=ccs)
    if path is None:
        path = writable_cache_dir("tensorrt") / f"{_safe(loaded.info.arch)}-{key[:24]}.engine"
    path = Path(path)
    if path.exists() and not rebuild:
        try:
            record = check_engine(path, t, key=key)
            if record.get("key") == key:
                log.debug("reusing TensorRT engine %s", path)
                return path, False
            why = "it has no record of what it was built from"
        except EngineError as exc:
            why = str(exc).split(": ", 1)[-1].split("; rebuild it with", 1)[0]
        log.warning("rebuilding the TensorRT engine %s: %s", show(path), why)
    import tempfile

    with tempfile.TemporaryDirectory(prefix="fer-onnx-") as tmp:
        if progress:
            progress(None, f"exporting {loaded.info.arch} to ONNX")
        onnx_path = export_onnx(loaded, Path(tmp) / "model.onnx", verify=verify)
        build_tensorrt_engine(onnx_path, path, fp16=fp16, max_batch=max_batch, opt_batch=opt, targets=ccs,
                              progress=progress, tensorrt=t, meta={"key": key, "arch": loaded.info.arch,
                                                       "outputs": list(output_names(loaded.info.heads))})
    return path, True
