"""ESR (ferengine.models.esr): the shared base and branches at upstream ESR's sizes, CBAM's attention maps, the
majority vote and the mean of probabilities, upstream's AV head on the class scores, adding branches, and the
majority vote through ONNX."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ferengine import checkpoint as ck
from ferengine.export import export_onnx
from ferengine.models import create_model
from ferengine.models.esr import CBAM
from ferengine.preprocess import InputSpec


def _settled(model, x):
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(x)
    return model.eval()


def _small_esr(branches: int, n: int):
    """A small ESR with BN statistics of its input, and that input (n faces)."""
    torch.manual_seed(0)
    m = create_model("esr", branches=branches, width=0.125, reduction=4)
    x = torch.rand(n, 3, 96, 96)
    return _settled(m, x), x


def test_sizes_attention_and_heads():
    torch.manual_seed(0)
    m = create_model("esr", branches=2, width=0.25, av_head=True)
    x = torch.rand(4, 3, 96, 96)
    assert m.base(x).shape == (4, 32, 20, 20)            # 96 -> 92 -> 90 -> 45 -> 43 -> 41 -> 20 (no padding)
    out = _settled(m, x)(x)
    assert out["branch_logits"].shape == (4, 2, 8) and out["probs"].shape == (4, 8)
    assert out["channel_attention"].shape == (4, 2, 128) and out["spatial_attention"].shape == (4, 2, 36)  # 6 x 6
    assert ((out["spatial_attention"] > 0) & (out["spatial_attention"] < 1)).all()
    # upstream ESR's AV: fc 8 -> 2 on the ReLU of the class scores, per branch; the ensemble's is their mean
    b = m.branches[0]
    want = torch.tanh(b.fc_dimensional(torch.relu(out["branch_logits"][:, 0])))
    assert torch.allclose(out["branch_va"][:, 0], want, atol=1e-6)
    assert torch.allclose(out["va"], out["branch_va"].mean(1))
    assert create_model("esr").heads == ("expression",) and m.heads == ("expression", "valence_arousal")
    plain = create_model("esr", branches=2, cbam=False)
    assert not any(isinstance(mod, CBAM) for mod in plain.modules()) and "channel_attention" not in plain(x)
    with pytest.raises(ValueError):
        create_model("esr", vote="median")
    with pytest.raises(ValueError):
        create_model("esr", num_classes=0, av_head=True)


def test_majority_vote_and_mean():
    m, x = _small_esr(5, 16)
    with torch.no_grad():
        out = m(x)
        votes = out["branch_logits"].argmax(-1)                                     # (N, B)
        counts = torch.stack([(votes == k).sum(1) for k in range(8)], 1).float()
        assert torch.equal(out["probs"], counts / 5)
        assert torch.equal(out["probs"].argmax(1), counts.argmax(1))                # the majority's class
        m.vote = "mean"
        mean = m(x)["probs"]
        assert torch.allclose(mean, torch.softmax(out["branch_logits"], -1).mean(1))
        assert torch.allclose(mean.sum(1), torch.ones(16))


def test_add_branch_keeps_the_others():
    m, x = _small_esr(1, 4)
    with torch.no_grad():
        first = m(x)["branch_logits"][:, 0].clone()
        m.add_branch()
        m.eval()
        out = m(x)
    assert len(m.branches) == 2 and out["branch_logits"].shape[1] == 2
    assert torch.equal(out["branch_logits"][:, 0], first)


def test_majority_vote_exports_to_onnx(tmp_path):
    import onnxruntime as ort

    torch.manual_seed(0)
    kwargs = {"num_classes": 8, "branches": 3, "width": 0.125, "reduction": 4, "av_head": True}
    m = create_model("esr", **kwargs)
    x = torch.rand(8, 3, 96, 96)
    _settled(m, x)
    info = ck.CheckpointInfo(arch="esr", arch_kwargs=kwargs, labels=[f"c{i}" for i in range(8)],
                             heads=list(m.heads), input=InputSpec(size=96, channels=3), name="esr test")
    loaded = ck.load(ck.save(tmp_path / "esr.safetensors", m, info))
    path = export_onnx(loaded, tmp_path / "esr.onnx", verify=False)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = dict(zip(["probs", "va"], sess.run(["probs", "va"], {"input": x.numpy()})))
    with torch.no_grad():
        ref = loaded.model(x)
    assert np.array_equal(got["probs"], ref["probs"].numpy())
    assert np.abs(got["va"] - ref["va"].numpy()).max() < 1e-4
    assert float(np.abs(ref["va"].numpy() - ref["va"].numpy()[:1]).max()) > 0
