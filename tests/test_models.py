"""Every registered architecture: forward/heads contract, backward, checkpoint round trip, ONNX export.

Parametrised over ``list_models()``, so a newly registered model is covered without touching this file.
Models run at their own ``default_input`` (48 px grey for fastcnn and resnet18's small stem), batch <= 5.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ferengine import checkpoint as ck
from ferengine.export import export_onnx
from ferengine.models import create_model, list_models
from ferengine.preprocess import InputSpec

MODELS = list_models()
KNOWN_HEADS = {"expression", "valence_arousal"}


def _x(model, n: int, seed: int = 0) -> torch.Tensor:
    d = model.default_input
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d["channels"], d["size"], d["size"], generator=g)


def _info(name: str, model, kwargs: dict) -> ck.CheckpointInfo:
    n = kwargs["num_classes"]
    return ck.CheckpointInfo(
        arch=name, arch_kwargs=kwargs, labels=[f"class{i}" for i in range(n)], heads=list(model.heads),
        input=InputSpec(size=model.default_input["size"], channels=model.default_input["channels"]),
        name=f"test {name}",
    )


def _trained_stats(model, n: int = 4) -> None:
    """Move BatchNorm running statistics away from their initial values (so a round trip that drops
    buffers is caught)."""
    model.train()
    with torch.no_grad():
        for seed in range(2):
            model(_x(model, n, seed=100 + seed) * 2 + 0.5)
    model.eval()


def test_registry_is_not_empty():
    assert {"fastcnn", "resnet18"} <= set(MODELS)


@pytest.mark.parametrize("name", MODELS)
def test_forward_contract(name):
    torch.manual_seed(0)
    model = create_model(name).eval()
    assert isinstance(model.heads, tuple) and model.heads == ("expression",)
    d = model.default_input
    assert d["channels"] in (1, 3) and 8 <= d["size"] <= 1024
    x = _x(model, 2)
    with torch.no_grad():
        out = model(x)
        blocks = model.forward_blocks(x)
    assert isinstance(out, dict)
    assert out["logits"].shape == (2, 7) and out["logits"].dtype == torch.float32
    assert "va" not in out
    assert torch.isfinite(out["logits"]).all()
    assert len(blocks) >= 1 and all(b.ndim == 4 and b.shape[0] == 2 for b in blocks)


@pytest.mark.parametrize("name", MODELS)
def test_head_options(name):
    """``num_classes`` and ``av_head`` shape the outputs and ``heads`` says which are there."""
    torch.manual_seed(0)
    both = create_model(name, num_classes=5, av_head=True).eval()
    assert both.heads == ("expression", "valence_arousal")
    with torch.no_grad():
        out = both(_x(both, 3) * 10)  # large inputs: tanh must still bound va
    assert out["logits"].shape == (3, 5)
    assert out["va"].shape == (3, 2) and out["va"].abs().max() <= 1.0

    av_only = create_model(name, num_classes=0, av_head=True).eval()
    assert av_only.heads == ("valence_arousal",)
    with torch.no_grad():
        out = av_only(_x(av_only, 2))
    assert "logits" not in out and out["va"].shape == (2, 2)
    assert set(both.heads) <= KNOWN_HEADS
    with pytest.raises(ValueError):
        create_model(name, num_classes=0, av_head=False)


@pytest.mark.parametrize("name", MODELS)
def test_backward_gives_finite_grads_everywhere(name):
    torch.manual_seed(0)
    model = create_model(name, av_head=True).train()
    x = _x(model, 2)
    out = model(x)
    loss = F.cross_entropy(out["logits"], torch.tensor([0, 3])) + F.mse_loss(out["va"], torch.zeros(2, 2) + 0.3)
    loss.backward()
    params = dict(model.named_parameters())
    no_grad = [k for k, p in params.items() if p.requires_grad and p.grad is None]
    assert not no_grad, f"parameters without a gradient: {no_grad[:5]}"
    bad = [k for k, p in params.items() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradients: {bad[:5]}"
    assert sum(float(p.grad.abs().sum()) for p in params.values() if p.grad is not None) > 0


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize("name", MODELS)
def test_checkpoint_round_trip_is_exact(name, suffix, tmp_path):
    torch.manual_seed(0)
    kwargs = {"num_classes": 7, "av_head": True}
    model = create_model(name, **kwargs)
    _trained_stats(model)
    x = _x(model, 3, seed=7)
    with torch.no_grad():
        ref = model(x)
    path = ck.save(tmp_path / f"m{suffix}", model, _info(name, model, kwargs))
    loaded = ck.load(path)
    assert loaded.info.arch == name and not loaded.model.training
    with torch.no_grad():
        got = loaded.model(x)
    for key in ("logits", "va"):
        assert torch.equal(got[key], ref[key]), f"{key} differs after a {suffix} round trip"


@pytest.mark.parametrize("av_head", [False, True], ids=["expr", "expr+av"])
@pytest.mark.parametrize("name", MODELS)
def test_onnx_export_matches_torch(name, av_head, tmp_path):
    import onnx
    import onnxruntime as ort

    torch.manual_seed(0)
    kwargs = {"num_classes": 7, "av_head": av_head}
    model = create_model(name, **kwargs)
    _trained_stats(model)
    info = _info(name, model, kwargs)
    loaded = ck.load(ck.save(tmp_path / "m.safetensors", model, info))
    path = export_onnx(loaded, tmp_path / "m.onnx", verify=False)  # this test is the check

    proto = onnx.load(str(path))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["fer_checkpoint"]) == loaded.info.to_dict()
    names = ["probs", "va"] if av_head else ["probs"]
    assert [o.name for o in proto.graph.output] == names
    assert not list(tmp_path.glob(".*.tmp")), "a temp file was left behind"
    assert meta["fer_exporter"] == "dynamo", (
        "the dynamo exporter failed on this model and export_onnx fell back to the TorchScript one "
        "(see the logged warning): make the model torch.export-able")

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["input"]
    assert isinstance(sess.get_inputs()[0].shape[0], str), "batch axis is not dynamic"
    for n in (1, 5):
        x = _x(model, n, seed=n)
        with torch.no_grad():
            out = loaded.model(x)
        ref = {"probs": torch.softmax(out["logits"], 1).numpy()}
        if av_head:
            ref["va"] = out["va"].numpy()
        got = dict(zip(names, sess.run(names, {"input": x.numpy()})))
        for k in names:
            assert got[k].shape == ref[k].shape
            diff = np.abs(got[k] - ref[k]).max()
            assert diff < 1e-4, f"{k} at batch {n}: max abs diff {diff:.2e}"
        np.testing.assert_allclose(got["probs"].sum(1), 1.0, atol=1e-5)
