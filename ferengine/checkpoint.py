"""The checkpoint contract: one file holding the weights and everything needed to run them.

Files are safetensors (``.safetensors``, the default) whose header metadata key ``fer_checkpoint`` holds
a JSON document, or PyTorch zip files (``.pt``/``.pth``) holding ``{"fer_checkpoint": <same dict>,
"state_dict": {...}}``, read with ``torch.load(weights_only=True)``. Neither path can execute code.

The JSON document (``CheckpointInfo``)::

    format: "fer-desktop-checkpoint", format_version: 1,
    arch: registry name, arch_kwargs: constructor arguments,
    labels: class names in output order, heads: ["expression"] and/or ["valence_arousal"],
    input: InputSpec fields, name: display name,
    training: {"command": ..., "data": ..., ...}, metrics: {"publictest_accuracy": ..., ...}

``load(path)`` returns a ready ``nn.Module`` in eval mode plus the info, or raises
:class:`CheckpointError` with one message saying what is wrong with which file.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import stat
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .device import resolve_device
from .errors import CheckpointError, UnknownModelError
from .fileio import atomic_write
from .labels import check_class_names
from .models import create_model
from .preprocess import InputSpec

FORMAT = "fer-desktop-checkpoint"
FORMAT_VERSION = 1
META_KEY = "fer_checkpoint"
KNOWN_HEADS = ("expression", "valence_arousal")


@dataclass
class CheckpointInfo:
    arch: str
    labels: list[str]
    input: InputSpec
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    heads: list[str] = field(default_factory=lambda: ["expression"])
    name: str = ""
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def has_av_head(self) -> bool:
        return "valence_arousal" in self.heads

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": self.format_version,
            "name": self.name,
            "arch": self.arch,
            "arch_kwargs": self.arch_kwargs,
            "labels": list(self.labels),
            "heads": list(self.heads),
            "input": self.input.to_dict(),
            "training": self.training,
            "metrics": self.metrics,
        }

    @classmethod
    def from_dict(cls, d: Any, source: str = "checkpoint") -> "CheckpointInfo":
        """The metadata document, validated: every field of the right JSON type, known heads, class names that
        are unique, non-empty and no result field (:func:`ferengine.labels.check_class_names`), a valid
        :class:`InputSpec`. Raises :class:`CheckpointError` with one sentence naming ``source`` and the field."""
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            found = f"format {d.get('format')!r}" if isinstance(d, dict) else _json_type(d)
            raise CheckpointError(f"{source}: the metadata is not a {FORMAT} document ({found}); "
                                  "write checkpoints with ferengine.checkpoint.save (the trainers do)")

        def bad(key: str, expected: str) -> CheckpointError:
            return CheckpointError(f"{source}: metadata field {key!r} must be {expected}, got {_json_value(d[key])}; "
                                   "the file was not written by fer-desktop or was edited")

        if "format_version" not in d:
            raise CheckpointError(f"{source}: the metadata lacks the required field 'format_version'")
        version = d["format_version"]
        if isinstance(version, bool) or not isinstance(version, int):
            raise bad("format_version", f"an integer (this fer-desktop writes {FORMAT_VERSION})")
        if version < 1:
            raise bad("format_version", "an integer >= 1")
        if version > FORMAT_VERSION:
            raise CheckpointError(
                f"{source}: checkpoint format version {version} is newer than this fer-desktop "
                f"understands ({FORMAT_VERSION}); upgrade fer-desktop"
            )
        for key in ("arch", "input"):
            if key not in d:
                raise CheckpointError(f"{source}: metadata lacks the required field {key!r}")
        arch = d["arch"]
        if not isinstance(arch, str) or not arch.strip():
            raise bad("arch", "an architecture name (a string such as 'fastcnn')")

        def optional(key: str, kind: type, default: Any, expected: str) -> Any:
            v = d.get(key)
            if v is None:
                return default
            if not isinstance(v, kind):
                raise bad(key, expected)
            return v

        arch_kwargs = optional("arch_kwargs", dict, {}, "an object of constructor arguments")
        if not all(isinstance(k, str) for k in arch_kwargs):
            raise bad("arch_kwargs", "an object whose keys are argument names")
        labels = optional("labels", list, [], "a list of class names (strings)")
        if len(labels) > MAX_LABELS:
            raise CheckpointError(f"{source}: {len(labels)} class names, more than fer-desktop supports ({MAX_LABELS})")
        try:
            labels = check_class_names(labels)
        except ValueError as exc:
            raise CheckpointError(f"{source}: metadata field 'labels': {exc}") from None
        heads = optional("heads", list, ["expression"], f"a list of head names (some of {list(KNOWN_HEADS)})")
        unknown = [h for h in heads if h not in KNOWN_HEADS]
        if unknown or not heads or len(set(heads)) != len(heads):
            raise CheckpointError(f"{source}: metadata field 'heads' must list each of its heads once, drawn from "
                                  f"{list(KNOWN_HEADS)}, got {_json_value(heads)}")
        name = optional("name", str, "", "a string")
        training = optional("training", dict, {}, "an object")
        metrics = optional("metrics", dict, {}, "an object")
        try:
            spec = InputSpec.from_dict(d["input"])
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{source}: metadata field 'input': {exc}") from None
        if "expression" in heads and not labels:
            raise CheckpointError(f"{source}: an expression head needs its class names (metadata field 'labels')")
        return cls(arch=arch, arch_kwargs=dict(arch_kwargs), labels=labels, heads=list(heads), input=spec,
                   name=name, training=dict(training), metrics=dict(metrics), format_version=version)


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (int, float)):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, (list, tuple)):
        return "a list"
    if isinstance(v, dict):
        return "an object"
    return f"a {type(v).__name__}"


def _json_value(v: Any) -> str:
    """``v`` for a message: its JSON type and a short repr (``the string '1'``)."""
    text = repr(v)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{_json_type(v)} {text}" if v is not None else "null"


@dataclass
class LoadedModel:
    model: nn.Module
    info: CheckpointInfo
    path: Path

    @property
    def spec(self) -> InputSpec:
        return self.info.input


# ------------------------------------------------------------------------------------------- save


def save(path: str | os.PathLike, model: nn.Module, info: CheckpointInfo, *, half: bool = False) -> Path:
    """Write ``model``'s weights and ``info`` atomically (temp file + rename).

    ``half=True`` stores floating-point tensors as fp16 (half the size; they load back as fp32).
    ``.pt``/``.pth`` paths get the PyTorch zip format, anything else safetensors. ``info`` is validated as
    :func:`load` will read it (:meth:`CheckpointInfo.from_dict`), so no file is written that cannot be loaded
    for its metadata.
    """
    path = _as_path(path)
    meta = info.to_dict()
    CheckpointInfo.from_dict(json.loads(json.dumps(meta)), f"{_shown(path)} (not written)")
    state = {}
    for k, v in model.state_dict().items():
        v = v.detach().cpu()
        if half and v.is_floating_point():
            v = v.half()
        state[k] = v.contiguous().clone()  # clone: safetensors refuses shared storage
    if path.suffix in (".pt", ".pth"):
        atomic_write(path, lambda tmp: torch.save({META_KEY: meta, "state_dict": state}, tmp))
    else:
        from safetensors.torch import save_file

        atomic_write(path, lambda tmp: save_file(state, tmp, metadata={META_KEY: json.dumps(meta)}))
    return path


# ------------------------------------------------------------------------------------------- load
#
# One validation layer, in this order, before a single weight is allocated for the model:
#   the file: a readable regular file (never a FIFO, device or folder: opened without blocking and checked with
#             fstat), not empty, not absurdly large, read with Python's own open() (any path the OS accepts,
#             non-UTF-8 names included) and parsed from the bytes;
#   its format: a safetensors file (header parsed and checked against the file size) or a PyTorch zip read
#             with weights_only=True; pickled Python objects are refused, never run;
#   the metadata: CheckpointInfo.from_dict (types, heads, class names, InputSpec);
#   the architecture: built on the meta device (no memory), its parameter count bounded, every parameter and
#             buffer compared by name, shape and kind of dtype with the tensors the file stores, and one
#             forward pass on meta tensors of the input spec's size: the outputs must fit the class names;
#   the values: every floating-point tensor finite after conversion to the model's dtype.
# Only then is the real model built and the weights copied in. read_info runs the same checks.

MAX_FILE_BYTES = 2 << 30  # 2 GiB: ~500M fp32 parameters; fer-desktop's largest model is ~45 MB
MAX_HEADER_BYTES = 100_000_000
MAX_PARAMETERS = 300_000_000  # ResNet-18 has 11M, DAF-CNN at width 1 ~30M
MAX_LABELS = 1000
RESAVE_HINT = "re-save the model as a fer-desktop checkpoint with trainers.release or ferengine.checkpoint.save"
PICKLE_MESSAGE = ("refused to load: it holds pickled Python objects, which fer-desktop never loads (unpickling can "
                  f"run code); {RESAVE_HINT}")
REFETCH_HINT = "copy or download it again"

_ST_DTYPES = {  # safetensors dtype -> (kind, torch name)
    "F64": ("float", "float64"), "F32": ("float", "float32"), "F16": ("float", "float16"),
    "BF16": ("float", "bfloat16"), "F8_E4M3": ("float", "float8_e4m3fn"), "F8_E5M2": ("float", "float8_e5m2"),
    "I64": ("int", "int64"), "I32": ("int", "int32"), "I16": ("int", "int16"), "I8": ("int", "int8"),
    "U8": ("int", "uint8"), "U16": ("int", "uint16"), "U32": ("int", "uint32"), "U64": ("int", "uint64"),
    "BOOL": ("bool", "bool"),
}


def _as_path(path: Any) -> Path:
    if isinstance(path, (bytes, bytearray)):
        path = os.fsdecode(bytes(path))
    try:
        return Path(path)
    except TypeError:
        raise CheckpointError(f"{path!r} is not a file path (expected a string or os.PathLike)") from None


def _shown(path: Any) -> str:
    """A path for a message, printable on any terminal (undecodable bytes of a non-UTF-8 name as ``\\xff``)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _dtype_kind(dtype: torch.dtype) -> str:
    if dtype.is_floating_point:
        return "float"
    if dtype == torch.bool:
        return "bool"
    if dtype.is_complex:
        return "complex"
    return "int"


@dataclass
class _Stored:
    """What a checkpoint file holds, before its metadata is trusted: the metadata document (as parsed), each
    tensor's (kind of dtype, dtype name, shape), and a way to get the tensors."""

    path: Path
    shown: str
    meta: Any
    tensors: dict[str, tuple[str, str, tuple[int, ...]]]
    _load: Any

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._load()


def _read_bytes(path: Path, shown: str) -> bytes:
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)  # O_NONBLOCK: a FIFO opens at once (and is refused below) instead of hanging
    except (FileNotFoundError, NotADirectoryError):
        raise CheckpointError(f"{shown}: no such file; check the path") from None
    except IsADirectoryError:
        raise CheckpointError(f"{shown}: is a folder, expected a checkpoint file (.safetensors or .pt)") from None
    except PermissionError:
        raise CheckpointError(f"{shown}: cannot read the checkpoint: permission denied; make it readable "
                              "(chmod u+r) or copy it to a place you can read") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{shown}: cannot open the checkpoint ({_reason(exc)})") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise CheckpointError(f"{shown}: is a folder, expected a checkpoint file (.safetensors or .pt)")
        if not stat.S_ISREG(st.st_mode):
            what = ("a named pipe (FIFO)" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode)
                    else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "not a regular file")
            raise CheckpointError(f"{shown}: is {what}, not a checkpoint file; give the path of a .safetensors or "
                                  ".pt file")
        if st.st_size == 0:
            raise CheckpointError(f"{shown}: empty file (0 bytes), not a checkpoint; it was probably cut off while "
                                  f"being written or copied: {REFETCH_HINT}")
        if st.st_size > MAX_FILE_BYTES:
            raise CheckpointError(f"{shown}: {st.st_size / 2**30:.1f} GiB, larger than any fer-desktop checkpoint "
                                  f"(at most {MAX_FILE_BYTES / 2**30:.0f} GiB); is this the right file?")
        chunks, left = [], st.st_size + 1  # one byte more: a file that grew meanwhile is noticed
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 24))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
    except OSError as exc:
        raise CheckpointError(f"{shown}: cannot read the checkpoint ({_reason(exc)})") from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) != st.st_size:
        raise CheckpointError(f"{shown}: the file changed size while it was read; wait until it is fully written")
    return data


def _reason(exc: BaseException) -> str:
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__


def _parse(path: Any) -> _Stored:
    """The file, read and parsed (file and format checks; nothing of the metadata is trusted yet)."""
    path = _as_path(path)
    shown = _shown(path)
    data = _read_bytes(path, shown)
    if data[:4] == b"PK\x03\x04":
        return _parse_torch(path, shown, data)
    if len(data) >= 9 and data[8:9] == b"{":
        return _parse_safetensors(path, shown, data)
    if len(data) >= 2 and data[0] == 0x80 and 2 <= data[1] <= 5:  # a pickle (the old torch.save format, pickle.dump)
        raise CheckpointError(f"{shown}: {PICKLE_MESSAGE}")
    raise CheckpointError(
        f"{shown}: not a fer-desktop checkpoint (expected a safetensors file or a PyTorch .pt zip "
        "written by fer-desktop's trainers)"
    )


def _damaged(shown: str, kind: str, why: str) -> CheckpointError:
    return CheckpointError(f"{shown}: damaged or truncated {kind} file ({why}); {REFETCH_HINT}")


def _parse_safetensors(path: Path, shown: str, data: bytes) -> _Stored:
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8 or n > MAX_HEADER_BYTES:
        raise _damaged(shown, "safetensors", f"its header claims {n} bytes, the file has {len(data) - 8} after the "
                                             "length field")
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _damaged(shown, "safetensors", f"its header is not valid JSON: {_reason(exc)}") from None
    if not isinstance(header, dict):
        raise _damaged(shown, "safetensors", "its header is not a JSON object")
    extra = header.pop("__metadata__", None)
    tensors: dict[str, tuple[str, str, tuple[int, ...]]] = {}
    end = 0
    for name, entry in header.items():
        ok = (isinstance(entry, dict) and entry.get("dtype") in _ST_DTYPES and isinstance(entry.get("shape"), list)
              and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in entry["shape"])
              and isinstance(entry.get("data_offsets"), list) and len(entry["data_offsets"]) == 2
              and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in entry["data_offsets"]))
        if not ok:
            raise _damaged(shown, "safetensors", f"the header entry of tensor {name!r} is malformed")
        kind, dtype = _ST_DTYPES[entry["dtype"]]
        tensors[name] = (kind, dtype, tuple(entry["shape"]))
        end = max(end, entry["data_offsets"][1])
    if 8 + n + end != len(data):
        raise _damaged(shown, "safetensors", f"the header describes {8 + n + end} bytes, the file has {len(data)}")
    raw = extra.get(META_KEY) if isinstance(extra, dict) else None
    if raw is None:
        raise CheckpointError(
            f"{shown}: a safetensors file without fer-desktop metadata (key {META_KEY!r}); "
            "plain weight files need to be wrapped with ferengine.checkpoint.save"
        )
    try:
        meta = json.loads(raw) if isinstance(raw, str) else None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{shown}: metadata is not valid JSON ({exc})") from None

    def load_tensors() -> dict[str, torch.Tensor]:
        from safetensors import SafetensorError
        from safetensors.torch import load as load_bytes

        try:
            return load_bytes(data)
        except (SafetensorError, ValueError, RuntimeError, OverflowError) as exc:
            raise _damaged(shown, "safetensors", _reason(exc)) from None

    return _Stored(path, shown, meta, tensors, load_tensors)


def _parse_torch(path: Path, shown: str, data: bytes) -> _Stored:
    buf = io.BytesIO(data)
    if not zipfile.is_zipfile(buf):
        raise _damaged(shown, "PyTorch", "its zip directory is missing")
    buf.seek(0)
    try:
        obj = torch.load(buf, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # weights_only refused a global: pickled objects other than tensors and data
        raise CheckpointError(f"{shown}: {PICKLE_MESSAGE}") from None
    except Exception as exc:  # noqa: BLE001 - zip, record and storage errors of a damaged file, as one message
        raise _damaged(shown, "PyTorch", f"{type(exc).__name__}: {_reason(exc)}") from None
    if not isinstance(obj, dict) or META_KEY not in obj or "state_dict" not in obj:
        keys = list(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(
            f"{shown}: a PyTorch file but not a fer-desktop checkpoint (expected keys {META_KEY!r} and "
            f"'state_dict', found {keys}); {RESAVE_HINT}"
        )
    state = obj["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise CheckpointError(f"{shown}: 'state_dict' is not a mapping of names to tensors; {RESAVE_HINT}")
    tensors = {k: (_dtype_kind(v.dtype), str(v.dtype).replace("torch.", ""), tuple(v.shape)) for k, v in state.items()}
    return _Stored(path, shown, obj[META_KEY], tensors, lambda: state)


def _read(path: str | os.PathLike) -> tuple[Any, dict[str, torch.Tensor], bool]:
    """(metadata as parsed, the stored tensors as they are, True): the file and format checks only."""
    stored = _parse(path)
    return stored.meta, stored.state_dict(), True


def _build(info: CheckpointInfo, source: str, device: str | torch.device) -> nn.Module:
    kwargs = dict(info.arch_kwargs)
    kwargs.pop("pretrained", None)  # never download when rebuilding a trained model
    try:
        with torch.device(device):
            return create_model(info.arch, **kwargs)
    except UnknownModelError as exc:
        raise CheckpointError(f"{source}: {exc}") from None
    except (TypeError, ValueError, RuntimeError, ArithmeticError, OverflowError, MemoryError) as exc:
        raise CheckpointError(f"{source}: cannot build architecture {info.arch!r} with arch_kwargs "
                              f"{info.arch_kwargs}: {_reason(exc)}") from None


def build_model(info: CheckpointInfo, source: str = "checkpoint") -> nn.Module:
    """A randomly initialised model of the architecture ``info`` names."""
    return _build(info, source, "cpu")


def _check_structure(model: nn.Module, info: CheckpointInfo, stored: _Stored) -> None:
    """``model`` (on the meta device) against the metadata and the stored tensors."""
    shown = stored.shown
    expected = model.state_dict()
    n_params = sum(v.numel() for v in expected.values())
    if n_params > MAX_PARAMETERS:
        raise CheckpointError(
            f"{shown}: architecture {info.arch!r} with arch_kwargs {info.arch_kwargs} would have "
            f"{n_params:,} weights ({n_params * 4 / 1e9:.1f} GB), more than fer-desktop loads ({MAX_PARAMETERS:,}); "
            "the metadata is wrong or the file is not a fer-desktop checkpoint"
        )
    heads = list(getattr(model, "heads", ()))
    if heads and sorted(heads) != sorted(info.heads):
        raise CheckpointError(f"{shown}: metadata says heads {info.heads} but the architecture has {heads}")
    state = stored.tensors
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: file {tuple(state[k][2])} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k][2]) != tuple(v.shape)
    ]
    if missing or unexpected or mismatched:
        parts = []
        if mismatched:
            parts.append(f"{len(mismatched)} of the wrong shape (first {'; '.join(mismatched[:3])})")
        if missing:
            parts.append(f"{len(missing)} missing (first {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (first {', '.join(unexpected[:3])})")
        raise CheckpointError(
            f"{shown}: weights do not match architecture {info.arch!r} {info.arch_kwargs}: " + ", ".join(parts)
        )
    for k, v in expected.items():
        kind, dtype, _ = state[k]
        want = _dtype_kind(v.dtype)
        if kind != want:
            raise CheckpointError(
                f"{shown}: tensor {k!r} is stored as {dtype}, expected "
                f"{'floating-point weights (float32, float16 or bfloat16)' if want == 'float' else want + ' values'}; "
                f"{RESAVE_HINT}"
            )
    _check_outputs(model, info, shown)


def _check_outputs(model: nn.Module, info: CheckpointInfo, shown: str) -> None:
    """One forward pass on meta tensors shaped as the input spec says: the model must run on its input, and
    its outputs must have one column per class name (two for valence/arousal)."""
    spec = info.input
    x = torch.empty(2, spec.channels, spec.size, spec.size, device="meta")
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    except NotImplementedError:  # an operation without a meta kernel: the classifier's size is checked instead
        out = None
    except Exception as exc:  # noqa: BLE001 - shape errors of a spec that does not fit the architecture
        raise CheckpointError(
            f"{shown}: architecture {info.arch!r} {info.arch_kwargs} cannot run on the input its spec describes "
            f"({spec.size}x{spec.size} px, {spec.channels} channel(s)): {_reason(exc)}; the metadata's 'input' "
            "and 'arch_kwargs' do not fit each other"
        ) from None
    n_out = None
    if isinstance(out, dict):
        scores = out.get("probs", out.get("logits"))
        if "expression" in info.heads:
            if not isinstance(scores, torch.Tensor) or scores.ndim != 2 or scores.shape[0] != 2:
                raise CheckpointError(f"{shown}: architecture {info.arch!r} gives no (N, classes) logits for its "
                                      "expression head")
            n_out = int(scores.shape[1])
        va = out.get("va")
        if info.has_av_head and (not isinstance(va, torch.Tensor) or tuple(va.shape) != (2, 2)):
            raise CheckpointError(f"{shown}: architecture {info.arch!r} gives no (N, 2) valence/arousal output")
    elif out is None:
        n_out = getattr(getattr(getattr(model, "head", None), "fc", None), "out_features", None)
    else:
        raise CheckpointError(f"{shown}: architecture {info.arch!r} returns {type(out).__name__}, not a dict of outputs")
    if n_out is not None and "expression" in info.heads and n_out != len(info.labels):
        raise CheckpointError(f"{shown}: {len(info.labels)} labels for a {n_out}-class model; the metadata's "
                              "'labels' must name each output class once")


def _check_values(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], shown: str
                  ) -> dict[str, torch.Tensor]:
    """The stored tensors converted to the model's dtypes, each floating-point one finite."""
    out = {}
    for k, v in state.items():
        v = v.to(expected[k].dtype)
        if v.is_floating_point():
            bad = int((~torch.isfinite(v)).sum())
            if bad:
                raise CheckpointError(
                    f"{shown}: tensor {k!r} holds {bad} non-finite value(s) (NaN or infinity) of {v.numel()}; the "
                    "weights are damaged or the training diverged: use another checkpoint or retrain"
                )
        out[k] = v
    return out


def _validated(path: Any) -> tuple[_Stored, CheckpointInfo, dict[str, torch.Tensor]]:
    """Every check of the contract (see above); the weights converted to the model's dtypes."""
    stored = _parse(path)
    info = CheckpointInfo.from_dict(stored.meta, stored.shown)
    skeleton = _build(info, stored.shown, "meta")
    _check_structure(skeleton, info, stored)
    state = _check_values(stored.state_dict(), skeleton.state_dict(), stored.shown)
    return stored, info, state


def read_info(path: str | os.PathLike) -> CheckpointInfo:
    """The metadata of a checkpoint after the very checks :func:`load` makes (the file, its metadata, the
    architecture against the stored tensors, finite weights); only the model itself is not built."""
    return _validated(path)[1]


def crop_note(info: CheckpointInfo) -> str | None:
    """None when the checkpoint records how its face crop was chosen (a calibration measured on its training
    data, or crop flags given to the trainer), else a sentence saying that it does not."""
    t = info.training or {}
    if t.get("crop_calibration"):
        return None
    s = info.input
    return (f"{info.name or info.arch}: no crop calibration recorded; faces are cut with margin {s.crop_margin:.2f} "
            f"and offset {s.crop_offset_y:+.2f}, which may frame them unlike its training data "
            "(python -m trainers.calibrate --apply sets a measured crop)")


def stored_dtypes(path: str | os.PathLike) -> list[str]:
    """The dtypes the file stores its floating-point weights in (e.g. ``["float16"]`` for a half checkpoint;
    ``load`` always gives a float32 model)."""
    stored = _parse(path)
    return sorted({dtype for kind, dtype, _ in stored.tensors.values() if kind == "float"})


def load(path: str | os.PathLike, device: str | torch.device = "cpu") -> LoadedModel:
    """Load a checkpoint into a ready model (eval mode, fp32, on ``device``), or raise :class:`CheckpointError`
    with one sentence naming the file and what is wrong (see the checks above); never runs code from the file."""
    stored, info, state = _validated(path)
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    model = _build(info, stored.shown, "cpu")
    model.load_state_dict(state, strict=True)
    model.eval()
    return LoadedModel(model.to(dev), info, stored.path)


DEFAULT_MODEL = "models/default.safetensors"


def default_checkpoint_path() -> Path:
    """The model ``fer`` and ``fer-desktop`` use when no checkpoint is given."""
    from .assets import asset_path

    path = asset_path(DEFAULT_MODEL)
    if not path.is_file():
        raise CheckpointError(
            f"no default model is shipped at {path}; pass a checkpoint (--checkpoint FILE, or "
            "File > Open checkpoint in the app); train one with `python -m trainers.baseline --data fer2013`"
        )
    return path
