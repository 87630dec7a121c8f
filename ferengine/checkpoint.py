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

import json
import os
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError, UnknownModelError
from .fileio import atomic_write
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
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise CheckpointError(f"{source}: metadata is not a {FORMAT} document")
        version = d.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise CheckpointError(
                f"{source}: checkpoint format version {version!r} is newer than this fer-desktop "
                f"understands ({FORMAT_VERSION}); upgrade fer-desktop"
            )
        try:
            info = cls(
                arch=str(d["arch"]),
                arch_kwargs=dict(d.get("arch_kwargs") or {}),
                labels=[str(x) for x in d.get("labels") or []],
                heads=[str(x) for x in d.get("heads") or ["expression"]],
                input=InputSpec.from_dict(d["input"]),
                name=str(d.get("name") or ""),
                training=dict(d.get("training") or {}),
                metrics=dict(d.get("metrics") or {}),
                format_version=version,
            )
        except KeyError as exc:
            raise CheckpointError(f"{source}: metadata lacks the required field {exc}") from None
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{source}: bad metadata: {exc}") from None
        bad = [h for h in info.heads if h not in KNOWN_HEADS]
        if bad:
            raise CheckpointError(f"{source}: unknown heads {bad}; expected some of {list(KNOWN_HEADS)}")
        if "expression" in info.heads and not info.labels:
            raise CheckpointError(f"{source}: an expression head needs its label names")
        return info


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
    ``.pt``/``.pth`` paths get the PyTorch zip format, anything else safetensors.
    """
    path = Path(path)
    state = {}
    for k, v in model.state_dict().items():
        v = v.detach().cpu()
        if half and v.is_floating_point():
            v = v.half()
        state[k] = v.contiguous().clone()  # clone: safetensors refuses shared storage
    meta = info.to_dict()
    if path.suffix in (".pt", ".pth"):
        atomic_write(path, lambda tmp: torch.save({META_KEY: meta, "state_dict": state}, tmp))
    else:
        from safetensors.torch import save_file

        atomic_write(path, lambda tmp: save_file(state, tmp, metadata={META_KEY: json.dumps(meta)}))
    return path


# ------------------------------------------------------------------------------------------- load


def _kind(path: Path) -> str:
    with open(path, "rb") as fh:
        head = fh.read(9)
    if head[:4] == b"PK\x03\x04":
        return "torch"
    if len(head) >= 9:
        (n,) = struct.unpack("<Q", head[:8])
        if head[8:9] == b"{" and 0 < n <= 100_000_000:
            return "safetensors"
    return "unknown"


def _read(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None, bool]:
    """Return (metadata dict, state dict or None, weights_read)."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, expected a checkpoint file (.safetensors or .pt)")
    kind = _kind(path)
    if kind == "unknown":
        raise CheckpointError(
            f"{path}: not a fer-desktop checkpoint (expected a safetensors file or a PyTorch .pt zip "
            "written by fer-desktop's trainers)"
        )
    if kind == "safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as fh:
                raw = (fh.metadata() or {}).get(META_KEY)
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{path}: damaged or truncated safetensors file ({exc})") from None
        if raw is None:
            raise CheckpointError(
                f"{path}: a safetensors file without fer-desktop metadata (key {META_KEY!r}); "
                "plain weight files need to be wrapped with ferengine.checkpoint.save"
            )
        try:
            meta = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{path}: metadata is not valid JSON ({exc})") from None
        return meta, state, True
    # torch zip
    try:
        if not zipfile.is_zipfile(path):
            raise zipfile.BadZipFile("bad central directory")
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (zipfile.BadZipFile, RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(f"{path}: damaged or truncated PyTorch file ({exc})") from None
    except Exception as exc:  # weights_only unpickler refusing a global, etc.
        raise CheckpointError(
            f"{path}: refused to load: the file holds objects other than tensors and plain data "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from None
    if not isinstance(obj, dict) or META_KEY not in obj or "state_dict" not in obj:
        keys = list(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(
            f"{path}: a PyTorch file but not a fer-desktop checkpoint (expected keys {META_KEY!r} and "
            f"'state_dict', found {keys})"
        )
    state = obj["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: 'state_dict' is not a mapping of names to tensors")
    return obj[META_KEY], state, True


def read_info(path: str | os.PathLike) -> CheckpointInfo:
    """The metadata of a checkpoint, validated (weights are read for .pt files only)."""
    path = Path(path)
    if path.exists() and path.is_file() and _kind(path) == "safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as fh:
                raw = (fh.metadata() or {}).get(META_KEY)
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: damaged or truncated safetensors file ({exc})") from None
        if raw is None:
            raise CheckpointError(f"{path}: a safetensors file without fer-desktop metadata")
        try:
            return CheckpointInfo.from_dict(json.loads(raw), str(path))
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{path}: metadata is not valid JSON ({exc})") from None
    meta, _, _ = _read(path)
    return CheckpointInfo.from_dict(meta, str(path))


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
    _, state, _ = _read(Path(path))
    return sorted({str(v.dtype).replace("torch.", "") for v in state.values() if v.is_floating_point()})


def build_model(info: CheckpointInfo, source: str = "checkpoint") -> nn.Module:
    """A randomly initialised model of the architecture ``info`` names."""
    kwargs = dict(info.arch_kwargs)
    kwargs.pop("pretrained", None)  # never download when rebuilding a trained model
    try:
        return create_model(info.arch, **kwargs)
    except UnknownModelError as exc:
        raise CheckpointError(f"{source}: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{source}: cannot build architecture {info.arch!r}: {exc}") from None


def load(path: str | os.PathLike, device: str | torch.device = "cpu") -> LoadedModel:
    """Load a checkpoint into a ready model (eval mode, fp32, on ``device``)."""
    path = Path(path)
    meta, state, _ = _read(path)
    info = CheckpointInfo.from_dict(meta, str(path))
    model = build_model(info, str(path))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if mismatched:
            parts.append(f"{len(mismatched)} of the wrong shape (e.g. {'; '.join(mismatched[:3])})")
        raise CheckpointError(
            f"{path}: weights do not match architecture {info.arch!r} {info.arch_kwargs}: " + ", ".join(parts)
        )
    heads = list(getattr(model, "heads", ()))
    if heads and sorted(heads) != sorted(info.heads):
        raise CheckpointError(f"{path}: metadata says heads {info.heads} but the architecture has {heads}")
    n_out = getattr(getattr(getattr(model, "head", None), "fc", None), "out_features", None)
    if n_out is not None and n_out != len(info.labels):
        raise CheckpointError(f"{path}: {len(info.labels)} labels for a {n_out}-class model")
    state = {k: v.to(expected[k].dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True)
    model.eval()
    return LoadedModel(model.to(device), info, path)


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
