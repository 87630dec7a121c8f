"""Start a ResNet-18 trunk from a file a user has: one of our checkpoints, or a torchvision / timm ResNet-18
``state_dict`` (``.safetensors``, or a weights-only ``.pt``/``.pth``, possibly wrapped as ``{"state_dict": ...}``
or ``{"model": ...}`` and prefixed ``module.``), e.g. an MS-Celeb-1M face-recognition ResNet-18 (ECAN's
RAF-DB pre-training, which cannot be downloaded here).

Nothing in the file is executed (``torch.load(weights_only=True)`` / safetensors); a file that is not a
ResNet-18 of the right widths fails with a message naming what differs. The fully connected layer of a
torchvision/timm file (1000 ImageNet or 8631 identity classes) is never loaded: the expression classifier
starts fresh. Returned is what was loaded, for the run's log and model card.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..engine.errors import TrainError

__all__ = ["InitReport", "load_resnet_trunk", "read_state_dict"]

RESNET18_ARCHS = ("resnet18", "clcl_resnet18")  # registered networks whose trunk is a FaceResNet ResNet-18
_WRAPPERS = ("state_dict", "model_state_dict", "model", "net", "backbone", "encoder")
_PREFIXES = ("module.", "model.", "backbone.", "encoder_q.", "encoder.", "net.")


@dataclass
class InitReport:
    path: str
    source: str                      # "fer-desktop checkpoint" | "state_dict"
    loaded: int = 0                  # trunk tensors loaded
    total: int = 0                   # trunk tensors of the network
    adapted: list[str] = field(default_factory=list)   # loaded after a change (RGB stem -> grey)
    skipped: list[str] = field(default_factory=list)   # the network's tensors left at their initialisation
    ignored: list[str] = field(default_factory=list)   # the file's tensors not used
    classifier: bool = False         # the expression classifier was loaded too (same classes)

    def summary(self) -> str:
        s = f"{self.loaded}/{self.total} trunk tensors from {self.path} ({self.source})"
        if self.adapted:
            s += f"; adapted: {', '.join(self.adapted)}"
        if self.skipped:
            s += f"; left at initialisation: {', '.join(self.skipped[:6])}{' ...' if len(self.skipped) > 6 else ''}"
        s += "; classifier " + ("loaded (same classes)" if self.classifier else "fresh")
        return s


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors or weights-only torch file, unwrapped and without DataParallel prefixes."""
    p = Path(path)
    if not p.is_file():
        raise TrainError(f"--init {p}: no such file")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd: Any = load_file(str(p), device="cpu")
        else:
            sd = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt, truncated, pickled code (refused by weights_only), not a torch file
        raise TrainError(f"--init {p}: cannot read it as safetensors or a weights-only torch file "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else 'no detail'})") from None
    for _ in range(3):
        if isinstance(sd, dict) and not any(isinstance(v, torch.Tensor) for v in sd.values()):
            inner = next((sd[k] for k in _WRAPPERS if isinstance(sd.get(k), dict)), None)
            if inner is None:
                break
            sd = inner
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise TrainError(f"--init {p}: expected a state_dict (names -> tensors), possibly under "
                         f"{'/'.join(_WRAPPERS)}; found {type(sd).__name__}"
                         + (f" with keys {sorted(map(str, sd))[:8]}" if isinstance(sd, dict) else ""))
    out = {}
    for k, v in sd.items():
        for pre in _PREFIXES:
            if k.startswith(pre):
                k = k[len(pre):]
                break
        out[k] = v
    return out


def _from_torchvision_names(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision/timm ResNet names (conv1, bn1, layerN, fc) -> FaceResNet's (stem.0, stem.1, layerN)."""
    out = {}
    for k, v in sd.items():
        if k.startswith("conv1."):
            out["stem.0." + k[len("conv1."):]] = v
        elif k.startswith("bn1."):
            out["stem.1." + k[len("bn1."):]] = v
        else:
            out[k] = v
    return out


def load_resnet_trunk(net: nn.Module, path: str | Path, labels: list[str] | None = None) -> InitReport:
    """Load the stem and the four stages of ``net`` (a ``ferengine.models.resnet.FaceResNet``) from ``path``;
    an own checkpoint with the same classes (``labels``) gives the classifier as well."""
    from ferengine import checkpoint as ck

    p = str(path)
    own_head: dict[str, torch.Tensor] = {}
    if p.endswith(".safetensors") and _is_own_checkpoint(p):
        try:
            loaded = ck.load(p)
        except ck.CheckpointError as exc:
            raise TrainError(f"--init: {exc}") from None
        if loaded.info.arch not in RESNET18_ARCHS:
            raise TrainError(f"--init {p}: a {loaded.info.arch!r} checkpoint; its trunk is not a ResNet-18 "
                             f"(expected one of {', '.join(RESNET18_ARCHS)})")
        sd = loaded.model.state_dict()
        report = InitReport(p, "fer-desktop checkpoint")
        if labels is not None and [s.lower() for s in loaded.info.labels] == [s.lower() for s in labels]:
            own_head = {k: v for k, v in sd.items() if k.startswith("head.")}
    else:
        sd = _from_torchvision_names(read_state_dict(p))
        report = InitReport(p, "state_dict")
    target = net.state_dict()
    trunk = [k for k in target if not k.startswith("head.")]
    report.total = len(trunk)
    new: dict[str, torch.Tensor] = {}
    for k in trunk:
        if k not in sd:
            report.skipped.append(k)
            continue
        v, want = sd[k], target[k]
        if v.shape == want.shape:
            new[k] = v.to(want.dtype)
        elif k == "stem.0.weight" and v.ndim == 4 and v.shape[0] == want.shape[0] and v.shape[2:] == want.shape[2:] \
                and want.shape[1] == 1:
            new[k] = v.float().mean(dim=1, keepdim=True).to(want.dtype)  # RGB filters -> grey: their mean
            report.adapted.append(f"{k} (RGB -> grey: channel mean)")
        elif k == "stem.0.weight":
            report.skipped.append(f"{k} (file {tuple(v.shape)}, network {tuple(want.shape)}: a different stem)")
        else:
            raise TrainError(f"--init {p}: tensor {k} has shape {tuple(v.shape)}, the network's is "
                             f"{tuple(want.shape)} (a ResNet-18 of other widths?)")
    stages = [k for k in trunk if k.startswith("layer")]
    missing_stages = [k for k in stages if k not in new]
    if missing_stages:
        raise TrainError(f"--init {p}: not a ResNet-18 state_dict: {len(missing_stages)} of the {len(stages)} "
                         f"tensors of layer1-4 are missing (e.g. {missing_stages[0]}); its tensors include "
                         f"{sorted(sd)[:6]}")
    extra = sorted(k for k in sd if k.startswith("layer") and k not in target)
    if extra:
        raise TrainError(f"--init {p}: not a ResNet-18 state_dict: it has {len(extra)} stage tensors the network "
                         f"lacks (e.g. {extra[0]}: a deeper ResNet such as ResNet-34?)")
    if own_head and any(k not in target or v.shape != target[k].shape for k, v in own_head.items()):
        own_head = {}  # the same classes, another head (e.g. resnet18's 512-d classifier for an MSR network)
    new.update(own_head)
    report.classifier = bool(own_head)
    report.loaded = len([k for k in new if not k.startswith("head.")])
    report.ignored = sorted(k for k in sd if k not in target or (k.startswith("head.") and not own_head))
    missing, unexpected = net.load_state_dict(new, strict=False)
    assert not unexpected, unexpected
    return report


def _is_own_checkpoint(path: str) -> bool:
    """A safetensors file with fer-desktop's checkpoint metadata (else: a plain state_dict file)."""
    from ferengine import checkpoint as ck

    try:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:
        return False  # read_state_dict / ck.load give the message
    return ck.META_KEY in meta
