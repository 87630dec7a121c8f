"""ECAN (trainers/methods/ecan.py) as the paper describes it, beyond the zoo-wide checks of test_methods.py:

- one step is eq. 11 exactly: (1 - l1) CE(z_q's logits) + l1 ENSC(z_q + z_k, bank) + l2 MVA(z_q, bank groups),
  recomputed here from the loss functions; the classifier sees view 1 (z_q) only; the key encoder takes no
  gradient and follows eq. 1 (EMA); after the step the bank holds z_k and its labels as its newest group;
- the bank is filled by a frozen pass before training and is never larger than the training set (METHODS.md:
  a MoCo-sized queue on a small set holds stale repeats), a whole number of global batches;
- ``--loss ce`` / ``center`` are one-view runs without key encoder or bank;
- the checkpoint is encoder + linear classifier only, opens with ferengine, and carries the run's notes
  (trained from scratch / initialised from FILE) that the model card prints;
- ``--init`` takes torchvision/timm ResNet-18 state_dicts (safetensors, weights-only .pt, wrapped, prefixed)
  and our own checkpoints, and refuses other files with a message.
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from conftest import write_fer2013
from ferengine import checkpoint as ck
from ferengine.models import create_model
from trainers.engine import Trainer, TrainError, parse_config
from trainers.losses.affinity import mva_loss
from trainers.losses.ce import masked_cross_entropy
from trainers.losses.supcon import supcon_loss
from trainers.methods import get_method, run
from trainers.modules.pretrained import load_resnet_trunk

COMMON = ["--batch-size", "32", "--no-tensorboard", "--bench-batches", "0", "--workers", "0", "--width", "0.125",
          "--device", "cpu", "--no-amp"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ecan")
    write_fer2013(root / "fer2013", n_train=192, n_val=64)
    return root


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FER_DESKTOP_CACHE", str(tmp_path / "cache"))


def _trainer(data: Path, out: Path, *extra: str) -> Trainer:
    cls = get_method("ecan")
    cfg = parse_config(cls, ["--data", "fer2013", "--data-dir", str(data), "--out", str(out), *COMMON, *extra])
    return Trainer(cfg, cls)


# ------------------------------------------------------------------------------------------ one step


def test_one_step_is_eq_11_and_updates_key_encoder_and_bank(data, tmp_path):
    t = _trainer(data, tmp_path / "run", "--bank-size", "64")
    m = t.method
    assert m.views == 2 and m.bank is not None and m.bank.size == 64
    m.before_training()
    assert m.bank.full and m.bank.pushes == 2 and (m.bank.labels >= 0).all()
    batch = next(iter(t.train_batches))
    assert not torch.equal(batch.inputs[0], batch.inputs[1])  # two augmented views
    net, model = t.model.net, t.model
    k_before = [p.detach().clone() for p in model.net_k.parameters()]
    bank_before = m.bank.get()[0].clone(), m.bank.get()[1].clone()
    past = [(f.clone(), y.clone()) for f, y in m.bank.recent_groups(4)]
    centres = model.centres.detach().clone()

    torch.manual_seed(0)
    logs = m.training_step(batch)
    # recompute eq. 11 from the parts (same weights; BN in train mode, so recompute under the same seed)
    with torch.no_grad():
        out = net(batch.inputs[0])
        zq = torch.nn.functional.normalize(model.proj(out["embedding"]).float(), dim=1)
        zk = model.key(batch.inputs[1])
        y = batch.label
        ce = masked_cross_entropy(out["logits"], y)
        ensc = supcon_loss(torch.cat([zq, zk]), torch.cat([y, y]), temperature=0.07, mode="ensc",
                           bank=bank_before[0], bank_labels=bank_before[1])
        mva, alpha = mva_loss(zq, y, centres, past)
    assert torch.allclose(logs["ce"], ce, atol=1e-5)
    assert torch.allclose(logs["ensc"], ensc, atol=1e-5)
    assert torch.allclose(logs["mva"], mva, atol=1e-5) and torch.allclose(logs["alpha"], alpha)
    assert torch.allclose(logs["loss"].detach(), 0.8 * ce + 0.2 * ensc + 0.7 * mva, atol=1e-5)
    assert alpha > 1.0  # the groups' affinity losses differ: eq. 9 raises the weight

    # backward: gradient reaches the query encoder, projection and centres, never the key encoder
    t.optimizers["main"].zero_grad()
    logs["loss"].backward()
    assert all(p.grad is None for p in model.net_k.parameters())
    assert all(p.grad is None for p in model.proj_k.parameters())
    assert model.centres.grad is not None and model.centres.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.proj.parameters())
    q_before = [p.detach().clone() for p in net.parameters()]
    t.optimizers["main"].step()
    t.momentum.update(1)
    for kb, qa, ka in zip(k_before, net.parameters(), model.net_k.parameters()):  # eq. 1, m = 0.999
        assert torch.allclose(ka, 0.999 * kb + 0.001 * qa.detach(), atol=1e-6)
    assert any(not torch.equal(a, b.detach()) for a, b in zip(q_before, net.parameters()))
    m.after_step(batch, logs)
    newest_f, newest_y = m.bank.recent_groups(1)[0]
    assert torch.equal(newest_y, batch.label) and m.bank.pushes == 3
    assert torch.allclose(newest_f, zk, atol=1e-6)  # the step's keys, pushed (the oldest group dropped)


def test_classifier_sees_view_one_only(data, tmp_path):
    t = _trainer(data, tmp_path / "run", "--bank-size", "64")
    t.method.before_training()
    batch = next(iter(t.train_batches))
    t.model.eval()  # BN from running stats: the two calls see the same network
    a = t.method.training_step(batch)
    batch.inputs[1] = torch.flip(batch.inputs[1], dims=[0])  # view 2 of other images
    b = t.method.training_step(batch)
    assert torch.equal(a["ce"], b["ce"])
    assert not torch.allclose(a["ensc"], b["ensc"])


def test_ce_and_center_are_one_view_without_key_encoder(data, tmp_path):
    for loss in ("ce", "center"):
        t = _trainer(data, tmp_path / loss, "--loss", loss)
        assert t.method.views == 1 and t.method.bank is None and t.model.net_k is None and t.momentum is None
        logs = t.method.training_step(next(iter(t.train_batches)))
        assert set(logs) >= {"ce", "loss"}
        if loss == "center":
            assert t.model.centres.shape == (7, t.model.net.feature_dim) and logs["center"] > 0
    t = _trainer(data, tmp_path / "supcon", "--loss", "supcon")
    assert t.method.views == 2 and t.method.bank is None and t.model.net_k is not None


def test_bank_is_whole_batches_and_no_larger_than_the_training_set(data, tmp_path):
    t = _trainer(data, tmp_path / "run")  # default 16384 on 192 training images, batch 32
    assert t.method.bank.size == 192
    t = _trainer(data, tmp_path / "run2", "--bank-size", "100")
    assert t.method.bank.size == 96


def test_projection_none_is_the_encoder_features(data, tmp_path):
    t = _trainer(data, tmp_path / "run", "--proj-dims", "none", "--bank-size", "64")
    assert t.model.z_dim == t.model.net.feature_dim and t.method.bank.dim == t.model.net.feature_dim
    assert t.model.centres.shape[1] == t.model.net.feature_dim
    with pytest.raises(TrainError, match="proj-dims"):
        _trainer(data, tmp_path / "bad", "--proj-dims", "512,x")


def test_augment_level_is_table_1(data, tmp_path):
    with pytest.raises(TrainError, match="none, weak and strong"):
        _trainer(data, tmp_path / "run", "--augment", "standard")
    t = _trainer(data, tmp_path / "run2", "--augment", "strong")
    cfg = t.train_batches.augments[0].config
    assert cfg.fivecrop > 0 and cfg.affine_p > 0
    t = _trainer(data, tmp_path / "run3", "--augment", "weak")
    cfg = t.train_batches.augments[0].config
    assert cfg.fivecrop == 0 and cfg.affine_p == 0 and cfg.hflip > 0


# ------------------------------------------------------------------------------------------ checkpoint


def test_checkpoint_is_encoder_and_classifier_with_notes(data, tmp_path):
    out = tmp_path / "run"
    argv = ["--data", "fer2013", "--data-dir", str(data), "--out", str(out), *COMMON, "--epochs", "1",
            "--bank-size", "64"]
    assert run("ecan", argv) == 0
    loaded = ck.load(out / "best.safetensors")
    assert loaded.info.arch == "resnet18" and loaded.info.arch_kwargs["width"] == 0.125
    keys = set(loaded.model.state_dict())
    assert keys == set(create_model("resnet18", **loaded.info.arch_kwargs).state_dict())
    assert not any(k.startswith(("proj", "net_k", "centres")) for k in keys)
    notes = loaded.info.training["notes"]
    assert any("trained from scratch" in n for n in notes)
    state = torch.load(out / "state.pt", weights_only=True)
    assert "bank" in state["method"] and any(k.startswith("net_k.") for k in state["model"])

    # a run started from it (--init, one of our checkpoints) says so; the classifier comes along (same classes)
    out2 = tmp_path / "run2"
    assert run("ecan", ["--data", "fer2013", "--data-dir", str(data), "--out", str(out2), *COMMON, "--epochs", "1",
                        "--bank-size", "64", "--init", str(out / "best.safetensors"), "--lr", "0"]) == 0
    notes2 = ck.load(out2 / "last.safetensors").info.training["notes"]
    assert any("initialised from" in n and "classifier loaded" in n for n in notes2)
    a, b = ck.load(out / "best.safetensors").model.state_dict(), ck.load(out2 / "last.safetensors").model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if not k.endswith("num_batches_tracked") and "running" not in k)
    # (the model card prints training.notes: tests/test_release.py)


# ------------------------------------------------------------------------------------------ --init files


def _tv_state(in_chans: int = 3) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return torchvision.models.resnet18().state_dict()


@pytest.mark.parametrize("fmt", ["pt", "pt-wrapped", "safetensors-module"])
def test_init_from_torchvision_state_dict(tmp_path, fmt):
    sd = _tv_state()
    if fmt == "pt":
        path = tmp_path / "r18.pt"
        torch.save(sd, path)
    elif fmt == "pt-wrapped":
        path = tmp_path / "r18.pth"
        torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}, "epoch": 3}, path)
    else:
        path = tmp_path / "r18.safetensors"
        save_file({"module." + k: v.contiguous() for k, v in sd.items()}, str(path))
    net = create_model("resnet18", in_chans=3, stem="imagenet")
    r = load_resnet_trunk(net, path)
    got = net.state_dict()
    assert torch.equal(got["stem.0.weight"], sd["conv1.weight"]) and torch.equal(got["layer4.1.bn2.weight"],
                                                                              sd["layer4.1.bn2.weight"])
    assert r.loaded == r.total and not r.skipped and not r.classifier
    assert "fc.weight" in r.ignored

    grey_small = create_model("resnet18", in_chans=1, stem="small")
    r = load_resnet_trunk(grey_small, path)  # FER2013's stem: 3x3 stride 1, grey: conv1 cannot load
    assert any(s.startswith("stem.0.weight") for s in r.skipped) and r.loaded == r.total - 1
    grey_big = create_model("resnet18", in_chans=1, stem="imagenet")
    r = load_resnet_trunk(grey_big, path)
    assert torch.allclose(grey_big.state_dict()["stem.0.weight"], sd["conv1.weight"].mean(1, keepdim=True))
    assert r.adapted and r.loaded == r.total


class _Evil:
    def __reduce__(self):
        return (print, ("executed",))


def test_init_refuses_other_files(tmp_path):
    net = create_model("resnet18", in_chans=3, stem="imagenet")
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"conv1.weight": _Evil()}))
    with pytest.raises(TrainError, match="weights-only"):
        load_resnet_trunk(net, evil)
    other = tmp_path / "r34.pt"
    torch.save(torchvision.models.resnet34().state_dict(), other)
    with pytest.raises(TrainError, match="not a ResNet-18|shape"):
        load_resnet_trunk(net, other)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(TrainError, match="cannot read"):
        load_resnet_trunk(net, junk)
    with pytest.raises(TrainError, match="no such file"):
        load_resnet_trunk(net, tmp_path / "missing.pt")
    notdict = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], notdict)
    with pytest.raises(TrainError, match="expected a state_dict"):
        load_resnet_trunk(net, notdict)


def test_width_resnet_names_match_torchvision():
    tv = torchvision.models.resnet18().state_dict()
    ours = create_model("resnet18", in_chans=3, stem="imagenet").state_dict()
    mapped = {("stem.0." + k[6:]) if k.startswith("conv1.") else ("stem.1." + k[4:]) if k.startswith("bn1.") else k
              for k in tv if not k.startswith("fc.")}
    assert mapped == {k for k in ours if not k.startswith("head.")}
    small = create_model("resnet18", width=0.25)
    assert small.feature_dim == 128 and small(torch.rand(2, 1, 48, 48))["logits"].shape == (2, 7)
    with pytest.raises(ValueError, match="width"):
        create_model("resnet18", width=0)
    assert json.dumps({"width": 0.25})  # arch_kwargs stay JSON


def test_rafdb_without_pretraining_says_so(tmp_path, caplog):
    import cv2
    import numpy as np

    basic = tmp_path / "rafdb" / "basic"
    (basic / "EmoLabel").mkdir(parents=True)
    (basic / "Image" / "aligned").mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = [f"train_{i:05d}.jpg {1 + i % 7}" for i in range(1, 17)] + [f"test_{i:04d}.jpg {1 + i % 7}" for i in range(1, 9)]
    (basic / "EmoLabel" / "list_patition_label.txt").write_text("\n".join(lines) + "\n")
    for line in lines:
        name = line.split()[0].replace(".jpg", "_aligned.jpg")
        cv2.imwrite(str(basic / "Image" / "aligned" / name), rng.integers(0, 256, (100, 100, 3), dtype=np.uint8))
    cls = get_method("ecan")
    argv = ["--data", "rafdb", "--data-dir", str(tmp_path / "rafdb"), "--out", str(tmp_path / "run"), "--batch-size",
            "8", "--no-tensorboard", "--bench-batches", "0", "--workers", "0", "--width", "0.125", "--device", "cpu"]
    with caplog.at_level("WARNING"):
        t = Trainer(parse_config(cls, argv), cls)
    assert any("without pre-training" in r.getMessage() and "--init" in r.getMessage() for r in caplog.records)
    assert any("no pre-training" in n for n in t.method.training_notes())
    assert t.cfg.epochs == 40 and t.cfg.batch_size == 8 and t.cfg.lr == 0.1  # the RAF-DB row of the table
    assert t.spec.size == 224 and t.spec.channels == 3 and tuple(t.spec.mean) == (0.485, 0.456, 0.406)
    assert t.method.arch_kwargs["stem"] == "imagenet"
    aug = t.train_batches.augments[0].config  # RAF-DB strong: blur and colour jitter, no FiveCrop/affine
    assert aug.blur_p > 0 and aug.saturation > 0 and aug.fivecrop == 0 and aug.affine_p == 0
    assert t.method.bank.size == 16  # the 16 training images: the bank never holds repeats
