"""Which TensorRT is installed, what it can do here, and why not: imported by the TensorRT backend and by the
engine builder in :mod:`ferengine.export`, never when :mod:`ferengine` is imported.

Two flavours share one core API (``Builder``, ``OnnxParser``, ``Runtime``, ``execute_async_v3``):

- **full TensorRT** (``tensorrt``, >= 10; NVIDIA's index, ``pip install 'fer-desktop[tensorrt]'``): data-centre and
  workstation GPUs (Turing .. Hopper, Blackwell). It builds an engine on, and for, the GPU it runs on.
- **TensorRT-RTX** (``tensorrt_rtx``, or ``tensorrt_rtx_bindings`` as the PyPI wheels
  ``tensorrt-rtx-cu12-bindings`` + ``-libs`` name it; ``pip install 'fer-desktop[tensorrt-rtx]'``): GeForce/RTX
  GPUs. Its builder needs no GPU: it compiles a portable engine ahead of time for a list of compute capabilities
  (:meth:`TensorRT.target_ccs`), and the engine is specialised just in time on the user's GPU, with a runtime
  cache of the compiled kernels. Hopper (9.0) and data-centre Blackwell (10.x) are not among its targets.

``FER_TENSORRT=tensorrt`` or ``=tensorrt-rtx`` picks one flavour when both are installed (default: full
TensorRT where it can do the job, else TensorRT-RTX).
"""
from __future__ import annotations

import importlib
import logging
import os
import threading
from dataclasses import dataclass
from typing import Any, Callable

from .device import cuda_reason
from .errors import BackendUnavailable

__all__ = ["TENSORRT_INSTALL_HINT", "RTX_INSTALL_HINT", "MIN_MAJOR", "FLAVOURS", "FLAVOUR_ENV", "TensorRT",
           "import_tensorrt", "installed", "tensorrt_reason", "tensorrt_build_reason", "tensorrt_summary", "TrtLogger",
           "ProgressMonitor", "gpu_cc"]

log = logging.getLogger("ferengine.tensorrt")

TENSORRT_INSTALL_HINT = ("pip install 'fer-desktop[tensorrt]' (full TensorRT, from NVIDIA's index: data-centre GPUs) "
                         "or 'fer-desktop[tensorrt-rtx]' (TensorRT-RTX, from PyPI: GeForce/RTX GPUs)")
RTX_INSTALL_HINT = "pip install 'fer-desktop[tensorrt-rtx]'"
MIN_MAJOR = 10  # full TensorRT
RTX_MIN = (1, 1)  # TensorRT-RTX: IRuntime.get_engine_validity came in 1.1
FLAVOURS = ("tensorrt", "tensorrt-rtx")
FLAVOUR_ENV = "FER_TENSORRT"
_MODULES = {"tensorrt": ("tensorrt", "tensorrt_bindings"), "tensorrt-rtx": ("tensorrt_rtx", "tensorrt_rtx_bindings")}
_NAMES = {"tensorrt": "TensorRT", "tensorrt-rtx": "TensorRT-RTX"}
ENGINE_MAGIC = {"tensorrt-rtx": b"vtrt"}  # the first bytes of a serialized engine (measured: TensorRT-RTX 1.7)


@dataclass(frozen=True)
class TensorRT:
    """An importable TensorRT: ``module`` (use it as ``trt``), ``flavour`` (``"tensorrt"`` or ``"tensorrt-rtx"``),
    ``version``."""

    module: Any
    flavour: str
    version: str

    @property
    def label(self) -> str:
        """``"TensorRT 10.13.0"`` / ``"TensorRT-RTX 1.7.1.116"``: what the CLI and the app show."""
        return f"{_NAMES[self.flavour]} {self.version}"

    @property
    def rtx(self) -> bool:
        return self.flavour == "tensorrt-rtx"

    def target_ccs(self) -> tuple[str, ...]:
        """TensorRT-RTX: the compute capabilities its builder can target (``"7.5"``, ``"8.0"`` ...), read from its
        ``ComputeCapability`` enum; full TensorRT: () (it builds for the GPU it runs on)."""
        if not self.rtx:
            return ()
        out = []
        for name in self.module.ComputeCapability.__members__:
            if name.startswith("SM") and name[2:].isdigit():
                digits = name[2:]
                out.append(f"{digits[:-1]}.{digits[-1]}")
        return tuple(sorted(out, key=lambda s: tuple(int(p) for p in s.split("."))))

    def default_targets(self) -> tuple[str, ...]:
        """What an engine is built for unless told: every compute capability this TensorRT-RTX knows except 7.5
        (Turing, opt-in as in TensorRT-RTX itself: ``--targets 7.5,...``); full TensorRT: ()."""
        return tuple(cc for cc in self.target_ccs() if cc != "7.5")


_CACHE: dict[str, Any] = {}  # flavour -> TensorRT or the reason it cannot be imported
_LOCK = threading.Lock()


def _try_import(flavour: str) -> "TensorRT | str":
    with _LOCK:
        if flavour in _CACHE:
            return _CACHE[flavour]
        result: TensorRT | str = f"{_NAMES[flavour]} is not installed"
        for mod in _MODULES[flavour]:
            try:
                module = importlib.import_module(mod)
            except ModuleNotFoundError as exc:
                if exc.name and exc.name.split(".")[0] == mod:
                    continue
                result = f"{_NAMES[flavour]} is installed but cannot be loaded ({exc})"
                break
            except Exception as exc:  # noqa: BLE001 - a missing libnvinfer, a CUDA mismatch ...
                result = f"{_NAMES[flavour]} is installed but cannot be loaded ({type(exc).__name__}: {exc})"
                break
            version = str(getattr(module, "__version__", "0"))
            parts = tuple(int(p) if p.isdigit() else 0 for p in version.split(".")[:2])
            need = RTX_MIN if flavour == "tensorrt-rtx" else (MIN_MAJOR,)
            if parts[:len(need)] < need:
                result = (f"{_NAMES[flavour]} {version} is too old, fer-desktop needs >= "
                          f"{'.'.join(map(str, need))}")
            else:
                result = TensorRT(module, flavour, version)
            break
        _CACHE[flavour] = result
        return result


def installed() -> list[TensorRT]:
    """Every TensorRT flavour importable here (whatever ``$FER_TENSORRT`` says)."""
    return [t for t in (_try_import(f) for f in FLAVOURS) if isinstance(t, TensorRT)]


def _forced() -> str | None:
    value = os.environ.get(FLAVOUR_ENV, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value not in FLAVOURS:
        raise BackendUnavailable(f"{FLAVOUR_ENV}={os.environ[FLAVOUR_ENV]!r}: expected auto, tensorrt or tensorrt-rtx")
    return value


def import_tensorrt(purpose: str = "run") -> TensorRT:
    """The TensorRT to use for ``purpose`` (``"run"`` an engine here, or ``"build"`` one), or
    :class:`BackendUnavailable` saying why none can be imported.

    Both flavours installed: full TensorRT when it can do the job here (a build needs a GPU for it), else
    TensorRT-RTX; ``$FER_TENSORRT`` overrides."""
    forced = _forced()
    found = [t for t in (_try_import(f) for f in ((forced,) if forced else FLAVOURS)) if isinstance(t, TensorRT)]
    if not found:
        reasons = [_try_import(f) for f in ((forced,) if forced else FLAVOURS)]
        installed = [r for r in reasons if "is not installed" not in r]
        if installed:
            raise BackendUnavailable("; ".join(installed))
        raise BackendUnavailable(f"TensorRT is not installed ({TENSORRT_INSTALL_HINT})")
    for t in found:
        if (_build_reason(t) if purpose == "build" else _run_reason(t)) is None:
            return t
    return found[0]


def gpu_cc(device: Any = None) -> tuple[str, str] | None:
    """(GPU name, compute capability "8.9") of ``device`` (default: the current CUDA device), None without one."""
    if cuda_reason() is not None:
        return None
    import torch

    props = torch.cuda.get_device_properties(device if device is not None else torch.cuda.current_device())
    return props.name, f"{props.major}.{props.minor}"


def _run_reason(t: TensorRT, device: Any = None) -> str | None:
    cuda = cuda_reason()
    if t.rtx:
        where = f"an NVIDIA RTX-class GPU (compute capability {', '.join(t.target_ccs())})"
        if cuda:
            return f"{t.label} is installed, but running an engine needs {where}; found: {cuda}"
        name, cc = gpu_cc(device)
        if cc not in t.target_ccs():
            return (f"{t.label} runs on {where}; found {name} (compute capability {cc}), which it does not target: "
                    "install full TensorRT (pip install 'fer-desktop[tensorrt]', NVIDIA's index) or use the torch "
                    "backend on this GPU")
        return None
    if cuda:
        return f"{t.label} is installed, but running an engine needs an NVIDIA GPU; found: {cuda}"
    return None


def _build_reason(t: TensorRT) -> str | None:
    if t.rtx:
        return None  # ahead-of-time compilation on the CPU
    cuda = cuda_reason()
    if cuda:
        return (f"{t.label} builds an engine on the GPU it is for, and there is none: {cuda}; TensorRT-RTX "
                f"({RTX_INSTALL_HINT}) builds portable engines without a GPU")
    return None


def tensorrt_reason(device: Any = None) -> str | None:
    """None when the TensorRT backend can run here, else why not (what is installed, what GPU it needs, what GPU
    was found)."""
    try:
        t = import_tensorrt("run")
    except BackendUnavailable as exc:
        return str(exc)
    return _run_reason(t, device)


def tensorrt_build_reason() -> str | None:
    """None when an engine can be built here (``fer export --format tensorrt``), else why not."""
    try:
        t = import_tensorrt("build")
    except BackendUnavailable as exc:
        return str(exc)
    return _build_reason(t)


def tensorrt_summary() -> str:
    """One line for ``fer backends`` and the app: the flavour, and what it can and cannot do here."""
    try:
        t = import_tensorrt("run")
    except BackendUnavailable as exc:
        return f"unavailable: {exc}"
    run = _run_reason(t)
    if run is None:
        name, cc = gpu_cc()
        return f"available: {t.label} on {name} (compute capability {cc})"
    build = _build_reason(t)
    can_build = (f"; it can build engines here (fer export --format tensorrt, for compute capability "
                 f"{', '.join(t.default_targets())})" if build is None else "")
    return f"unavailable: {run}{can_build}"


# ------------------------------------------------------------------------------- logging, progress


def TrtLogger(t: TensorRT, level: int = logging.WARNING):
    """A ``trt.ILogger`` that sends TensorRT's messages to the ``ferengine.tensorrt`` logger (not stderr) and
    keeps the errors in ``.errors``, so a failure can say what TensorRT said."""
    trt = t.module
    sev = trt.ILogger.Severity

    class _Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []
            self.quiet = False  # validity probes without a GPU log fatal-looking lines: keep them at debug

        def log(self, severity, msg):  # noqa: D401 - TensorRT's callback
            if severity in (sev.INTERNAL_ERROR, sev.ERROR):
                self.errors.append(str(msg))
                log.log(logging.DEBUG if self.quiet else logging.ERROR, "%s: %s", t.label, msg)
            elif severity == sev.WARNING:
                log.log(logging.DEBUG if self.quiet else logging.WARNING, "%s: %s", t.label, msg)
            elif severity == sev.INFO and level <= logging.INFO:
                log.info("%s: %s", t.label, msg)
            elif level <= logging.DEBUG:
                log.debug("%s: %s", t.label, msg)

    return _Logger()


def ProgressMonitor(t: TensorRT, callback: Callable[[float | None, str], Any]):
    """A ``trt.IProgressMonitor`` turning the builder's nested phases into ``callback(fraction, message)``:
    ``fraction`` in [0, 1] from the outermost phase's steps, ``message`` the innermost phase."""
    trt = t.module

    class _Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.phases: list[list] = []  # [name, steps, done]

        def _report(self):
            if not self.phases:
                return
            name, steps, done = self.phases[-1]
            top = self.phases[0]
            frac = min(1.0, top[2] / top[1]) if top[1] else None
            try:
                callback(frac, f"{name} {min(done + 1, steps)}/{steps}")
            except Exception:  # noqa: BLE001 - a progress display must not break the build
                log.debug("TensorRT progress callback failed", exc_info=True)

        def phase_start(self, phase_name, parent_phase, num_steps):
            self.phases.append([phase_name, int(num_steps), 0])
            self._report()

        def step_complete(self, phase_name, step):
            for p in self.phases:
                if p[0] == phase_name:
                    p[2] = int(step) + 1
            self._report()
            return True

        def phase_finish(self, phase_name):
            while self.phases and self.phases[-1][0] != phase_name:
                self.phases.pop()
            if self.phases:
                self.phases.pop()
            self._report()

    return _Monitor()
