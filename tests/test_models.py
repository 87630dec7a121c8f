"""Every registered architecture: the contract its registry entry declares (heads, input, named features),
backward, batch independence, only inference parts in the deployed graph, checkpoint round trip, ONNX export.

Parametrised over ``list_models()`` and reading each entry's ``ModelCfg``, so a newly registered model is
covered without touching this file; an AV-only model registered for the test shows that a model with other
heads passes the same checks.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ferengine import checkpoint as ck
from ferengine.export import export_onnx
from ferengine.graph import InferenceModule
from ferengine.models import ModelCfg, create_model, list_models, model_cfg, register_model, unregister_model
from ferengine.preprocess import InputSpec

MODELS = list_models()
KNOWN_HEADS = {"expression", "valence_arousal"}


class _AVOnly(torch.nn.Module):
    """A valence/arousal-only model with fixed heads (as AVCE's will be): no num_classes, no av_head."""

    feature_names = ("conv",)

    def __init__(self, width: int = 4):
        super().__init__()
        self.conv = torch.nn.Sequential(torch.nn.Conv2d(1, width, 3, padding=1), torch.nn.BatchNorm2d(width),
                                        torch.nn.ReLU())
        self.fc = torch.nn.Linear(width, 2)
        self.heads = ("valence_arousal",)
        self.default_input = {"size": 24, "channels": 1}

    def forward_features(self, x):
        return {"conv": self.conv(x)}

    def forward_head(self, f):
        return {"va": torch.tanh(self.fc(f["conv"].mean((2, 3))))}

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


@pytest.fixture
def av_only_model():
    """``_test_av_only`` registered for one test."""
    def _test_av_only(width: int = 4):
        """AV-only test model."""
        return _AVOnly(width)

    register_model(_test_av_only, cfg=ModelCfg(heads=("valence_arousal",), input={"size": 24, "channels": 1},
                                               features=("conv",), head_kwargs=False, test_kwargs={"width": 3}))
    yield "_test_av_only"
    unregister_model("_test_av_only")


def _small(name: str, **kw):
    return create_model(name, **{**model_cfg(name).test_kwargs, **kw})


def _x(model, n: int, seed: int = 0) -> torch.Tensor:
    d = model.default_input
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d["channels"], d["size"], d["size"], generator=g)


def _head_kwargs(name: str, num_classes: int, av_head: bool) -> dict:
    """``num_classes``/``av_head`` for a model that takes them; nothing for one with fixed heads (AVCE's)."""
    return {"num_classes": num_classes, "av_head": av_head} if model_cfg(name).head_kwargs else {}


def _info(name: str, model, kwargs: dict) -> ck.CheckpointInfo:
    n = kwargs.get("num_classes", 0) if "expression" in model.heads else 0
    return ck.CheckpointInfo(
        arch=name, arch_kwargs=kwargs, labels=[f"class{i}" for i in range(n)], heads=list(model.heads),
        input=InputSpec(size=model.default_input["size"], channels=model.default_input["channels"]),
        name=f"test {name}",
    )


def _trained_stats(model, n: int = 4) -> None:
    """Give BatchNorm the running statistics of real activations (cumulative averages over a few batches), as
    training would: at initialisation a deep net's eval-mode signal shrinks ~30x per block against the default
    statistics (DAF-CNN's outputs would not depend on the input), and a round trip that drops buffers is caught."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        for seed in range(3):
            model(_x(model, n, seed=100 + seed) * 2 + 0.5)
    for m, mom in zip(bns, saved):
        m.momentum = mom
    model.eval()


def test_registry_is_not_empty():
    assert {"fastcnn", "resnet18", "daf_cnn"} <= set(MODELS)


def check_contract(name: str) -> None:
    """What the registry entry declares is what the model is and does."""
    cfg = model_cfg(name)
    torch.manual_seed(0)
    full = create_model(name)
    assert isinstance(full.heads, tuple) and full.heads == cfg.heads and set(cfg.heads) <= KNOWN_HEADS
    assert {k: full.default_input[k] for k in ("size", "channels")} == cfg.input
    model = _small(name).eval()
    d = model.default_input
    assert d["channels"] in (1, 3) and 8 <= d["size"] <= 1024
    x = _x(model, 2)
    with torch.no_grad():
        out = model(x)
        feats = model.forward_features(x)
        again = model.forward_head(feats)
    assert isinstance(out, dict) and isinstance(feats, dict)
    assert tuple(feats) == cfg.features, "forward_features returns the declared names, in order"
    assert all(f.shape[0] == 2 and torch.isfinite(f).all() for f in feats.values())
    for k in out:
        torch.testing.assert_close(again[k], out[k], msg=f"forward != forward_head(forward_features) for {k}")
    if "expression" in cfg.heads:
        key = "probs" if "probs" in out else "logits"
        assert out[key].ndim == 2 and out[key].shape[0] == 2 and out[key].dtype == torch.float32
        assert torch.isfinite(out[key]).all()
    else:
        assert "logits" not in out and "probs" not in out
    if "valence_arousal" in cfg.heads:
        assert out["va"].shape == (2, 2) and out["va"].abs().max() <= 1.0
    else:
        assert "va" not in out


def check_batch_independence(name: str) -> None:
    """In eval mode a face's outputs are the same whatever else is in its batch."""
    torch.manual_seed(0)
    model = _small(name)
    _trained_stats(model)
    x = _x(model, 5, seed=3)
    with torch.no_grad():
        alone = InferenceModule(model)(x[:1])
        batch = InferenceModule(model)(x)
        shuffled = InferenceModule(model)(x.flip(0))
    for a, b, c in zip(alone, batch, shuffled):
        torch.testing.assert_close(b[:1], a, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(c.flip(0), b, atol=1e-5, rtol=1e-4)


def check_only_inference_parts(name: str) -> None:
    """Every parameter of the model is used by the deployed outputs (so it holds no projection head, no
    clustering, no momentum copy), and eval mode is deterministic (no dropout at inference)."""
    torch.manual_seed(0)
    model = _small(name)
    _trained_stats(model)
    x = _x(model, 3, seed=5)
    outs = InferenceModule(model)(x)
    if any(o.requires_grad for o in outs):
        sum(o.float().pow(2).sum() for o in outs if o.requires_grad).backward()
    unused = [k for k, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not unused, f"parameters the deployed graph does not use: {unused[:5]}"
    with torch.no_grad():
        a, b = InferenceModule(model)(x), InferenceModule(model)(x)
    assert all(torch.equal(u, v) for u, v in zip(a, b)), "eval mode is not deterministic (dropout left on?)"
    assert any(float((o - o[:1]).abs().max()) > 1e-6 for o in a), "the outputs ignore the input"


@pytest.mark.parametrize("name", MODELS)
def test_forward_contract(name):
    check_contract(name)


@pytest.mark.parametrize("name", MODELS)
def test_batch_independence(name):
    check_batch_independence(name)


@pytest.mark.parametrize("name", MODELS)
def test_exported_network_holds_only_inference_parts(name):
    check_only_inference_parts(name)


def test_an_av_only_model_passes_the_same_checks(av_only_model):
    assert av_only_model in list_models()
    check_contract(av_only_model)
    check_batch_independence(av_only_model)
    check_only_inference_parts(av_only_model)


@pytest.mark.parametrize("name", MODELS)
def test_head_options(name):
    """``num_classes`` and ``av_head`` shape the outputs and ``heads`` says which are there."""
    if not model_cfg(name).head_kwargs:
        pytest.skip(f"{name} has fixed heads")
    torch.manual_seed(0)
    both = _small(name, num_classes=5, av_head=True).eval()
    assert both.heads == ("expression", "valence_arousal")
    with torch.no_grad():
        out = both(_x(both, 3) * 10)  # large inputs: tanh must still bound va
    assert out["probs" if "probs" in out else "logits"].shape == (3, 5)
    assert out["va"].shape == (3, 2) and out["va"].abs().max() <= 1.0
    if not model_cfg(name).av_only:
        with pytest.raises(ValueError):
            _small(name, num_classes=0, av_head=True)
        return

    av_only = _small(name, num_classes=0, av_head=True).eval()
    assert av_only.heads == ("valence_arousal",)
    with torch.no_grad():
        out = av_only(_x(av_only, 2))
    assert "logits" not in out and out["va"].shape == (2, 2)
    assert set(both.heads) <= KNOWN_HEADS
    with pytest.raises(ValueError):
        _small(name, num_classes=0, av_head=False)


@pytest.mark.parametrize("name", MODELS)
def test_backward_gives_finite_grads_everywhere(name):
    torch.manual_seed(0)
    model = _small(name, **({"av_head": True} if model_cfg(name).head_kwargs else {})).train()
    x = _x(model, 2)
    out = model(x)
    loss = sum(F.mse_loss(out["va"], torch.zeros(2, 2) + 0.3) if k == "va" else
               F.cross_entropy(out[k], torch.tensor([0, 3])) for k in ("logits", "va") if k in out)
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
    kwargs = {**model_cfg(name).test_kwargs, **_head_kwargs(name, 7, True)}
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
    keys = [k for k in ("logits", "va") if k in ref]
    assert keys
    for key in keys:
        assert torch.equal(got[key], ref[key]), f"{key} differs after a {suffix} round trip"


@pytest.mark.parametrize("av_head", [False, True], ids=["expr", "expr+av"])
@pytest.mark.parametrize("name", MODELS)
def test_onnx_export_matches_torch(name, av_head, tmp_path):
    import onnx
    import onnxruntime as ort

    if not model_cfg(name).head_kwargs and not av_head:
        pytest.skip(f"{name} has fixed heads ({', '.join(model_cfg(name).heads)}): the expr+av case covers it")
    torch.manual_seed(0)
    kwargs = {**model_cfg(name).test_kwargs, **_head_kwargs(name, 7, av_head)}
    model = create_model(name, **kwargs)
    _trained_stats(model)
    info = _info(name, model, kwargs)
    expr = "expression" in model.heads
    loaded = ck.load(ck.save(tmp_path / "m.safetensors", model, info))
    path = export_onnx(loaded, tmp_path / "m.onnx", verify=False)  # this test is the check

    proto = onnx.load(str(path))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["fer_checkpoint"]) == loaded.info.to_dict()
    names = (["probs"] if expr else []) + (["va"] if "valence_arousal" in model.heads else [])
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
        ref = ({"probs": (out["probs"] if "probs" in out else torch.softmax(out["logits"], 1)).numpy()}
               if expr else {})
        if "va" in names:
            ref["va"] = out["va"].numpy()
        got = dict(zip(names, sess.run(names, {"input": x.numpy()})))
        for k in names:
            assert got[k].shape == ref[k].shape
            diff = np.abs(got[k] - ref[k]).max()
            assert diff < 1e-4, f"{k} at batch {n}: max abs diff {diff:.2e}"
        if expr:
            np.testing.assert_allclose(got["probs"].sum(1), 1.0, atol=1e-5)
        else:
            assert float(np.abs(got["va"] - got["va"][:1]).max()) > 0 or n == 1, "va ignores the input"


class _Vote(torch.nn.Module):
    """Two heads whose class probabilities the model averages itself (as ESR's ensemble does)."""

    feature_names = ("conv",)

    def __init__(self, num_classes: int = 7, in_chans: int = 1, av_head: bool = False):
        super().__init__()
        self.conv = torch.nn.Sequential(torch.nn.Conv2d(in_chans, 4, 3, padding=1), torch.nn.ReLU())
        self.a, self.b = torch.nn.Linear(4, num_classes), torch.nn.Linear(4, num_classes)
        self.heads = ("expression",)
        self.default_input = {"size": 24, "channels": in_chans}

    def forward_features(self, x):
        return {"conv": self.conv(x)}

    def forward_head(self, f):
        v = f["conv"].mean((2, 3))
        la, lb = self.a(v), self.b(v)
        return {"logits_a": la, "logits_b": lb, "probs": (torch.softmax(la, 1) + torch.softmax(lb, 1)) / 2}

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def test_a_model_giving_its_own_probs_is_deployed_with_them(tmp_path):
    import onnxruntime as ort

    def _test_vote(num_classes: int = 7, in_chans: int = 1):
        """Vote test model."""
        return _Vote(num_classes, in_chans)

    register_model(_test_vote, cfg=ModelCfg(input={"size": 24, "channels": 1}, features=("conv",), head_kwargs=False))
    try:
        check_contract("_test_vote")
        check_batch_independence("_test_vote")
        check_only_inference_parts("_test_vote")
        torch.manual_seed(0)
        model = create_model("_test_vote").eval()
        info = ck.CheckpointInfo(arch="_test_vote", arch_kwargs={}, labels=[f"c{i}" for i in range(7)],
                                 heads=["expression"], input=InputSpec(size=24, channels=1))
        loaded = ck.load(ck.save(tmp_path / "v.safetensors", model, info))
        x = _x(model, 4, seed=1)
        with torch.no_grad():
            out = loaded.model(x)
            (probs,) = InferenceModule(loaded.model)(x)
        torch.testing.assert_close(probs, out["probs"])
        assert not torch.allclose(probs, torch.softmax(out["logits_a"], 1)), "the vote, not one head's softmax"
        sess = ort.InferenceSession(str(export_onnx(loaded, tmp_path / "v.onnx")), providers=["CPUExecutionProvider"])
        np.testing.assert_allclose(sess.run(["probs"], {"input": x.numpy()})[0], probs.numpy(), atol=1e-5)
    finally:
        unregister_model("_test_vote")
