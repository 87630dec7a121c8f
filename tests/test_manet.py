"""MA-Net (ferengine.models.manet, trainers.manet): the paper's size, the quadrants of the local branch, the
0.6 / 0.4 fusion, eq. 5's loss against a hand computation, and --init from a ResNet-18 state_dict."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ferengine.models import create_model
from trainers.engine import TrainError
from trainers.methods.manet import _init_manet, manet_loss


def _small(**kw):
    torch.manual_seed(0)
    return create_model("manet", width=0.0625, reduction=4, **kw)


def test_paper_size_and_shapes():
    full = create_model("manet")
    assert sum(p.numel() for p in full.parameters()) == pytest.approx(50.54e6, rel=1e-3)  # "50.54 M parameters"
    m = _small(num_classes=8).eval()
    with torch.no_grad():
        out = m(torch.rand(2, 3, 224, 224))
    assert m.forward_features(torch.rand(1, 3, 224, 224))["front"].shape[-2:] == (28, 28)
    assert out["patches"].shape == (2, 4, m.out_channels, 7, 7)
    assert out["logits"].shape == (2, 8) and out["feat_local"].shape == (2, m.out_channels)
    assert torch.allclose(out["logits"], 0.6 * out["logits_local"] + 0.4 * out["logits_global"], atol=1e-6)
    with pytest.raises(ValueError, match="multiple of 16"):
        m(torch.rand(1, 3, 72, 72))


def test_each_local_branch_sees_only_its_quadrant():
    m = _small().eval()
    with torch.no_grad():
        f = m.forward_features(torch.rand(1, 3, 64, 64))["front"]          # (1, C, 8, 8)
        a = m.forward_head({"front": f})
        g = f.clone()
        g[..., 4:, 4:] += torch.rand_like(g[..., 4:, 4:])                   # the bottom-right quadrant only
        b = m.forward_head({"front": g})
    assert not torch.allclose(a["patches"][:, 3], b["patches"][:, 3])
    for p in range(3):
        assert torch.equal(a["patches"][:, p], b["patches"][:, p])
    # the global branch sees the whole map
    assert not torch.allclose(a["logits_global"], b["logits_global"])


def _rbf_det(feats, gamma):
    n = len(feats)
    s = torch.empty(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            s[i, j] = torch.exp(-gamma * ((feats[i].double() - feats[j].double()) ** 2).sum(1)).mean()
    assert torch.allclose(torch.diagonal(s), torch.ones(n, dtype=torch.float64))
    return torch.linalg.det(s)


def test_loss_is_eq5():
    torch.manual_seed(1)
    n, c = 6, 5
    out = {"logits": torch.randn(n, 7), "logits_local": torch.randn(n, 7), "logits_global": torch.randn(n, 7),
           "patches": 0.3 * torch.rand(n, 4, c, 3, 3), "feat_local": 0.2 * torch.rand(n, c),
           "feat_global": 0.2 * torch.rand(n, c)}
    y = torch.randint(0, 7, (n,))
    got = manet_loss(out, y, None, lam=0.6, gamma=10.0, kinds=("branch", "channel", "spatial"))
    ce = 0.6 * F.cross_entropy(out["logits_local"], y) + 0.4 * F.cross_entropy(out["logits_global"], y)
    p = out["patches"]
    d_b = _rbf_det([out["feat_local"], out["feat_global"]], 10.0)
    d_ch = _rbf_det([p[:, i].mean((2, 3)) for i in range(4)], 10.0)
    d_sp = _rbf_det([p[:, i].mean(1).flatten(1) for i in range(4)], 10.0)
    assert float(got["loss"]) == pytest.approx(float(ce - d_b - d_ch - d_sp), abs=1e-5)
    assert 0 < float(d_ch) < 1 and 0 < float(d_sp) < 1          # not saturated at this scale: a real test
    plain = manet_loss(out, y, None, lam=0.6, gamma=10.0, kinds=())
    assert float(plain["loss"]) == pytest.approx(float(ce), abs=1e-6) and "d_branch" not in plain
    # gradients reach the patches through D_sp / D_ch
    q = out["patches"].clone().requires_grad_(True)
    manet_loss(dict(out, patches=q), y, None, lam=0.6, gamma=10.0, kinds=("spatial",))["loss"].backward()
    assert q.grad is not None and float(q.grad.abs().sum()) > 0


def test_init_from_a_resnet18_state_dict(tmp_path):
    import torchvision

    from safetensors.torch import save_file

    rn = torchvision.models.resnet18(num_classes=10)
    sd = {f"module.{k}": v.contiguous() for k, v in rn.state_dict().items()}     # DataParallel-prefixed
    path = tmp_path / "r18.safetensors"
    save_file(sd, str(path))
    m = create_model("manet", num_classes=7, in_chans=1)
    fc_before, ms_before = m.fc_1.weight.clone(), m.layer3_2[0].conv1.weight.clone()
    report = _init_manet(m, str(path), ["a"] * 7)
    assert "ResNet-18" in report
    w = rn.state_dict()
    assert torch.equal(m.conv1.weight, w["conv1.weight"].sum(1, keepdim=True))   # RGB stem summed for grey
    assert torch.equal(m.layer2[0].conv1.weight, w["layer2.0.conv1.weight"])
    for p in range(1, 5):                                                        # layer3/4 into every quadrant
        assert torch.equal(getattr(m, f"layer3_1_p{p}")[0].conv1.weight, w["layer3.0.conv1.weight"])
        assert torch.equal(getattr(m, f"layer4_1_p{p}")[1].bn2.running_var, w["layer4.1.bn2.running_var"])
    assert torch.equal(m.fc_1.weight, fc_before) and torch.equal(m.layer3_2[0].conv1.weight, ms_before)  # fresh
    bad = tmp_path / "junk.pt"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(TrainError, match="junk.pt"):
        _init_manet(create_model("manet"), str(bad), ["a"] * 7)
