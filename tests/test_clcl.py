"""Cross-layer contrastive learning (trainers/methods/clcl.py, trainers/losses/clcl.py, ferengine/models/clcl.py),
beyond the zoo-wide checks of test_methods.py / test_models.py:

- every loss piece against values written down by hand: the soft-argmax hash coding, K-means, the cosine
  assignment and the alignment cosine on a 2-cluster example, L_fm and L_bs with their weights;
- METHODS.md's faults of the official code are not here: (a) the CLFM loss has a gradient on block 2's
  parameters, equal to finite differences (the official top-k coding's is zero: shown too); (b) a face alone
  and inside a batch of 16 gets the same output from a trained checkpoint; (c) no clustering at evaluation:
  the exported network and its ONNX graph hold no CL head, and ``--eval-only`` never calls K-means;
- the flags: Table IV's --no-clfm/--no-clbs/--no-msr (all three: a plain resnet18), --alpha/--beta per block;
- ``--data ferplus`` end to end on a fixture in FER+'s on-disk format; the log and the card say "no pre-training".
"""
from __future__ import annotations

import csv
import gzip
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import write_fer2013
from ferengine import checkpoint as ck
from ferengine.graph import InferenceModule
from trainers.engine import Trainer, TrainError, parse_config
from trainers.losses.clcl import (assign_by_cosine, centre_alignment, clbs_loss, clfm_loss, cluster_means,
                                  cross_layer_alignment, hash_codes, hash_grid)
from trainers.methods import get_method, run
from trainers.modules import kmeans as kmeans_mod
from trainers.modules.kmeans import farthest_point_seeds, kmeans

FERPLUS_HEADER = ("Usage,Image name,neutral,happiness,surprise,sadness,anger,disgust,fear,contempt,unknown,NF")
FER_TO_FERPLUS = {0: 4, 1: 5, 2: 6, 3: 1, 4: 3, 5: 2, 6: 0}   # angry..neutral -> FER+'s vote columns
COMMON = ["--batch-size", "32", "--no-tensorboard", "--bench-batches", "0", "--workers", "0", "--device", "cpu",
          "--no-amp", "--width", "0.125", "--input-size", "32", "--fd-bs", "16", "--msr-dim", "16",
          "--cl-channels", "16", "--msr-channels", "8", "--kmeans-iters", "3"]


def write_ferplus(root: Path, n_train: int = 192, n_val: int = 64) -> Path:
    """fer2013.csv (conftest's learnable patterns) + ferplus/fer2013new.csv whose 10 votes make the majority
    label the FER2013 label's FER+ class (8 of 10 votes, 2 for neutral / happiness)."""
    write_fer2013(root / "fer2013", n_train=n_train, n_val=n_val)
    src = root / "fer2013" / "fer2013.csv"
    opener = gzip.open if src.suffix == ".gz" else open
    with opener(src, "rt") as f:
        rows = list(csv.DictReader(f))
    lines = [FERPLUS_HEADER]
    for i, r in enumerate(rows):
        votes = [0] * 10
        c = FER_TO_FERPLUS[int(r["emotion"])]
        votes[c] = 8
        votes[1 if c == 0 else 0] += 2
        lines.append(f"{r['Usage']},fer{i:07d}.png,{','.join(map(str, votes))}")
    (root / "ferplus").mkdir(parents=True, exist_ok=True)
    (root / "ferplus" / "fer2013new.csv").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_ferplus(tmp_path_factory.mktemp("clcl"))


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FER_DESKTOP_CACHE", str(tmp_path / "cache"))


def _argv(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--data", "ferplus", "--data-dir", str(data), "--out", str(out), *COMMON, *extra]


def _trainer(data: Path, out: Path, *extra: str) -> Trainer:
    cls = get_method("clcl")
    return Trainer(parse_config(cls, _argv(data, out, *extra)), cls)


# ------------------------------------------------------------------------------------------ hash coding (eq. 1)


def test_hash_grid():
    assert hash_grid(16) == (4, 2) and hash_grid(8) == (2, 2) and hash_grid(4) == (2, 1) and hash_grid(2) == (1, 1)
    for bad in (0, 1, 7):
        with pytest.raises(ValueError, match="even number"):
            hash_grid(bad)


def test_hash_code_by_hand():
    # one region (fd 2) of 1 x 2 pixels with responses 0 and ln 3 at T = 1: softmax (1/4, 3/4) over x = -1, +1
    x = torch.tensor([0.0, math.log(3.0)]).view(1, 1, 1, 2)
    torch.testing.assert_close(hash_codes(x, fd=2, temperature=1.0), torch.tensor([[[0.0, 0.5]]]))
    # a sharp peak at row 3, column 0 of a 4 x 4 map: the argmax's coordinates, y = +1 (bottom), x = -1 (left)
    m = torch.zeros(1, 1, 4, 4)
    m[0, 0, 3, 0] = 10.0
    torch.testing.assert_close(hash_codes(m, fd=2, temperature=0.01), torch.tensor([[[1.0, -1.0]]]))
    # fd 4: two regions, rows 0-1 and 2-3 (one column); peaks at (0, 3) and (3, 1); x in [-1, 1] over 4 columns
    m = torch.zeros(1, 1, 4, 4)
    m[0, 0, 0, 3] = 10.0
    m[0, 0, 3, 1] = 10.0
    torch.testing.assert_close(hash_codes(m, fd=4, temperature=0.01), torch.tensor([[[-1.0, 1.0, 1.0, -1 / 3]]]))
    # channels and faces are coded independently
    two = torch.stack([torch.zeros(4, 4), m[0, 0]]).unsqueeze(0)
    torch.testing.assert_close(hash_codes(two, fd=4, temperature=0.01)[0, 1], torch.tensor([-1.0, 1.0, 1.0, -1 / 3]))
    torch.testing.assert_close(hash_codes(two, fd=4, temperature=0.01)[0, 0], torch.zeros(4))  # flat: the centres


# ------------------------------------------------------------------------------------------ K-means, assignment


def test_kmeans_two_clusters_by_hand():
    pts = torch.tensor([[[1.0, 0.0], [1.2, 0.0], [0.0, 1.0], [0.0, 1.4]]])
    # seeds: farthest from the mean (0.55, 0.6) is (0, 1.4) (index 3); farthest from it is (1.2, 0) (index 1)
    assert farthest_point_seeds(pts, 2).tolist() == [[3, 1]]
    cent, assign = kmeans(pts, 2)
    assert assign.tolist() == [[1, 1, 0, 0]]
    torch.testing.assert_close(cent, torch.tensor([[[0.0, 1.2], [1.1, 0.0]]]))
    with pytest.raises(ValueError, match="at least k points"):
        kmeans(pts, 5)


def test_alignment_two_clusters_by_hand():
    deep = torch.tensor([[[1.0, 0.0], [1.2, 0.0], [0.0, 1.0], [0.0, 1.4]]])    # centroids (0, 1.2), (1.1, 0)
    shallow = torch.tensor([[[2.0, 0.1], [0.1, 3.0], [1.0, 1.2]]])
    cent, _ = kmeans(deep, 2)
    # cosines of (1, 1.2) to (0, 1.2) and (1.1, 0): 1.2 / 1.562 = 0.768 > 1 / 1.562 = 0.640 -> cluster 0
    assert assign_by_cosine(shallow, cent).tolist() == [[1, 0, 0]]
    centres = cluster_means(shallow, torch.tensor([[1, 0, 0]]), 2)
    torch.testing.assert_close(centres, torch.tensor([[[0.55, 2.1], [2.0, 0.1]]]))
    # cos(vec([[0.55, 2.1], [2, 0.1]]), vec([[0, 1.2], [1.1, 0]])) = (2.52 + 2.2) / (|.| |.|)
    want = (0.55 * 0 + 2.1 * 1.2 + 2.0 * 1.1 + 0.1 * 0) / (math.sqrt(0.55**2 + 2.1**2 + 2**2 + 0.1**2) *
                                                        math.sqrt(1.2**2 + 1.1**2))
    assert abs(want - 0.98175) < 1e-4
    torch.testing.assert_close(centre_alignment(centres, cent), torch.tensor([want]))
    torch.testing.assert_close(cross_layer_alignment(shallow, deep, 2), torch.tensor([want]))
    # an empty cluster's centre is 0: every shallow point near (1, 0)
    near = torch.tensor([[[2.0, 0.1], [3.0, 0.2]]])
    torch.testing.assert_close(cluster_means(near, assign_by_cosine(near, cent), 2),
                               torch.tensor([[[0.0, 0.0], [2.5, 0.15]]]))


def test_clfm_and_clbs_losses_are_minus_the_weighted_cosines():
    deep = torch.tensor([[[1.0, 0.0], [1.2, 0.0], [0.0, 1.0], [0.0, 1.4]]])
    shallow = torch.tensor([[[2.0, 0.1], [0.1, 3.0], [1.0, 1.2]]])
    c = float(cross_layer_alignment(shallow, deep, 2))
    # CLFM: per face (here 2 identical faces), the mean over faces, -alpha_j; two shallow blocks add up
    loss, cos = clfm_loss({1: shallow.repeat(2, 1, 1), 2: shallow.repeat(2, 1, 1)}, deep.repeat(2, 1, 1),
                          {1: 0.5, 2: 0.1}, k=2)
    assert abs(float(loss) + 0.6 * c) < 1e-6 and abs(float(cos[2]) - c) < 1e-6
    # CLBS: one set of faces: rows are faces
    loss, cos = clbs_loss({2: shallow[0]}, deep[0], {2: 0.1}, k=2)
    assert abs(float(loss) + 0.1 * c) < 1e-6


# ------------------------------------------------------------------------------------------ fault (a): gradient


def _tiny_net(data: Path, tmp: Path, *extra: str):
    t = _trainer(data, tmp, "--epochs", "1", *extra)
    return t, t.model.double().train()


def test_clfm_gradient_reaches_block_2_and_matches_finite_differences(data, tmp_path):
    t, net = _tiny_net(data, tmp_path / "g")
    x = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    method = t.method
    params = list(net.net.layer2.parameters())

    def l_fm() -> torch.Tensor:
        codes = net(x)["clfm"]
        return clfm_loss({2: codes[2]}, codes[4], {2: 0.1}, k=4, iters=3)[0]

    net.zero_grad()
    l_fm().backward()
    grads = [p.grad.clone() for p in params]
    assert sum(float(g.abs().sum()) for g in grads) > 0, "L_fm gives block 2 no gradient"
    g = torch.Generator().manual_seed(1)
    v = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params]
    analytic = sum(float((gr * d).sum()) for gr, d in zip(grads, v))
    eps = 1e-6
    with torch.no_grad():
        for p, d in zip(params, v):
            p.add_(eps * d)
        up = float(l_fm())
        for p, d in zip(params, v):
            p.sub_(2 * eps * d)
        down = float(l_fm())
        for p, d in zip(params, v):
            p.add_(eps * d)
    numeric = (up - down) / (2 * eps)
    assert abs(analytic) > 1e-8
    assert abs(numeric - analytic) <= 1e-5 * max(1.0, abs(analytic)), (numeric, analytic)
    assert method.alpha == {2: 0.1} and method.beta == {2: 0.1}

    # the official coding (each channel's top-k positions, integers) gives the same loss no gradient at all
    def topk_codes(f: torch.Tensor, k: int = 2) -> torch.Tensor:
        n, c, h, w = f.shape
        idx = f.flatten(2).topk(k, dim=2).indices
        return torch.cat([(idx // w).double(), (idx % w).double()], 2)

    net.zero_grad()
    feats = net.net.forward_features(x)
    s, d = (topk_codes(net.clfm[str(j)].pool(net.clfm[str(j)].conv(feats[f"layer{j}"]))) for j in (2, 4))
    assert not s.requires_grad and not d.requires_grad  # nothing to backpropagate: the released CLFM trains nothing


def test_clbs_gradient_reaches_block_2(data, tmp_path):
    t, net = _tiny_net(data, tmp_path / "g")
    x = torch.rand(16, 1, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    vecs = net(x)["clbs"]
    clbs_loss({2: vecs[2]}, vecs[4], {2: 0.1}, k=8, iters=3)[0].backward()
    assert sum(float(p.grad.abs().sum()) for p in net.net.layer2.parameters() if p.grad is not None) > 0
    # --no-deep-grad: block 4 takes no gradient from the alignment
    net.zero_grad()
    vecs = net(x)["clbs"]
    clbs_loss({2: vecs[2]}, vecs[4], {2: 0.1}, k=8, iters=3, deep_grad=False)[0].backward()
    assert all(p.grad is None or float(p.grad.abs().sum()) == 0 for p in net.clbs["4"].parameters())


# ------------------------------------------------------------------------------------------ one step = eq. 10


def test_one_step_is_ce_plus_fm_plus_bs(data, tmp_path):
    t = _trainer(data, tmp_path / "s", "--epochs", "1")
    batch = next(iter(t.make_batches(t.train_ds, augment=True, shuffle=True, seed=0)))
    torch.manual_seed(0)
    logs = t.method.training_step(batch)
    net = t.model
    out = net(batch.input)
    ce = torch.nn.functional.cross_entropy(out["logits"].float(), batch.label)
    fm = clfm_loss({2: out["clfm"][2]}, out["clfm"][4], {2: 0.1}, k=4, iters=3)[0]
    bs = clbs_loss({2: out["clbs"][2]}, out["clbs"][4], {2: 0.1}, k=8, iters=3)[0]
    torch.testing.assert_close(logs["loss"], ce + fm + bs, atol=1e-5, rtol=1e-5)
    assert -0.1 <= float(logs["fm"]) <= 0.1 and -0.1 <= float(logs["bs"]) <= 0.1
    assert set(logs) >= {"ce", "fm", "bs", "cos_fm2", "cos_bs2", "mu1", "mu4"}


# ------------------------------------------------------------------------------------------ faults (b), (c)


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("clcl-run") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FER_DESKTOP_CACHE", str(out.parent / "cache"))
        assert run("clcl", _argv(data, out, "--epochs", "10", "--lr", "0.003")) == 0
    return out


def test_trained_checkpoint_is_per_sample_and_holds_no_clustering(trained, data):
    """Fault (b): one face alone and inside a batch of 16 fixture faces give the same outputs (to 1e-5)."""
    loaded = ck.load(trained / "best.safetensors")
    assert loaded.info.arch == "clcl_resnet18" and loaded.info.labels[0] == "neutral"
    keys = set(loaded.model.state_dict())
    assert any(k.startswith("msr.") for k in keys) and not any("clfm" in k or "clbs" in k for k in keys)
    model = InferenceModule(loaded.model.eval())
    t = _trainer(data, trained.parent / "faces", "--epochs", "1")
    x = next(iter(t.make_batches(t.val_ds, augment=False, shuffle=False, seed=0))).input[:16].float()
    assert x.shape == (16, 1, 32, 32)
    with torch.no_grad():
        alone = model(x[5:6])
        batch = model(x)
    for a, b in zip(alone, batch):
        torch.testing.assert_close(b[5:6], a, atol=1e-5, rtol=0)
        assert float((b - b[:1]).abs().max()) > 1e-4, "the trained model's outputs ignore the input"
    # it learnt: the fixture's patterns are easy; chance is 1/8 (FER+ classes)
    rows = list(csv.DictReader(open(trained / "metrics.csv")))
    assert max(float(r["val_accuracy"]) for r in rows) > 40.0, rows[-1]
    notes = loaded.info.training["notes"]
    assert any("no pre-training" in n for n in notes) and any("CLFM alpha {2: 0.1}" in n for n in notes)


def test_onnx_graph_has_no_clustering(trained, tmp_path):
    onnx = pytest.importorskip("onnx")
    from ferengine.export import export_onnx

    loaded = ck.load(trained / "best.safetensors")
    export_onnx(loaded, tmp_path / "m.onnx")
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    ops = {n.op_type for n in graph.node}
    assert not ops & {"ArgMax", "ArgMin", "TopK", "OneHot", "Loop", "If"}, ops
    assert "DepthToSpace" in ops  # MSR's pixel shuffle is in the graph


def test_eval_only_never_clusters(trained, data, tmp_path, monkeypatch):
    calls = []
    real = kmeans_mod.kmeans

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    import trainers.losses.clcl as losses

    monkeypatch.setattr(losses, "kmeans", spy)
    monkeypatch.setattr(kmeans_mod, "kmeans", spy)
    assert run("clcl", _argv(data, tmp_path / "ev", "--eval-only", str(trained / "best.safetensors"))) == 0
    assert not calls


# ------------------------------------------------------------------------------------------ flags


def test_table_iv_flags(data, tmp_path):
    t = _trainer(data, tmp_path / "a", "--no-clfm", "--no-clbs", "--no-msr")
    assert t.method.arch == "resnet18" and not t.method.alpha and not t.method.beta
    assert len(t.model.clfm) == 0 and len(t.model.clbs) == 0
    t = _trainer(data, tmp_path / "b", "--no-clbs", "--alpha", "0.01", "0", "0.01")
    assert t.method.arch == "clcl_resnet18" and t.method.alpha == {1: 0.01, 3: 0.01} and not t.method.beta
    assert sorted(t.model.clfm) == ["1", "3", "4"] and len(t.model.clbs) == 0
    batch = next(iter(t.make_batches(t.train_ds, augment=False, shuffle=False, seed=0)))
    logs = t.method.training_step(batch)
    assert {"cos_fm1", "cos_fm3"} <= set(logs) and "bs" not in logs
    with pytest.raises(SystemExit):
        _trainer(data, tmp_path / "c", "--alpha", "0.1", "0.1")
    with pytest.raises(TrainError, match="fd-fm"):
        _trainer(data, tmp_path / "d", "--fd-fm", "15")


def test_baseline_run_exports_a_plain_resnet18_and_says_no_pretraining(data, tmp_path, caplog):
    out = tmp_path / "base"
    with caplog.at_level("WARNING"):
        assert run("clcl", _argv(data, out, "--epochs", "1", "--no-clfm", "--no-clbs", "--no-msr")) == 0
    assert "no pre-training" in caplog.text
    loaded = ck.load(out / "best.safetensors")
    assert loaded.info.arch == "resnet18" and loaded.info.input.size == 32 and loaded.info.input.channels == 1
    assert "no pre-training" in " ".join(loaded.info.training["notes"])


def test_paper_augmentation_is_resize_256_crop_224_flip_erase(data, tmp_path):
    t = _trainer(data, tmp_path / "a", "--epochs", "1")
    (aug,) = t.method.build_augment()
    c = aug.config
    assert c.scale == (256 / 224, 256 / 224) and c.translate == 3.0 and c.hflip == 0.5   # 16/256 of 48 px = 3 px
    assert c.erase == 0.5 and c.erase_area == (0.02, 0.33) and c.erase_value == 0.5 and c.rotate == 0
    with pytest.raises(TrainError, match="--augment"):
        _trainer(data, tmp_path / "b", "--augment", "bogus")


def test_init_loads_a_torchvision_trunk_into_the_msr_network(tmp_path):
    import torchvision

    from ferengine.models import create_model
    from trainers.modules.pretrained import load_resnet_trunk

    torch.manual_seed(1)
    sd = torchvision.models.resnet18().state_dict()
    torch.save(sd, tmp_path / "r18.pt")
    net = create_model("clcl_resnet18", num_classes=8, in_chans=1, stem="imagenet")
    report = load_resnet_trunk(net, tmp_path / "r18.pt", None)
    torch.testing.assert_close(net.layer2[0].conv1.weight, sd["layer2.0.conv1.weight"])
    torch.testing.assert_close(net.stem[0].weight, sd["conv1.weight"].mean(1, keepdim=True))  # RGB -> grey
    assert any(k.startswith("msr.") for k in report.skipped) and not report.classifier  # MSR starts fresh


def test_paper_settings_per_dataset():
    cls = get_method("clcl")
    c = parse_config(cls, ["--data", "ferplus"])
    assert (c.optimizer, c.lr, c.weight_decay, c.scheduler, c.gamma, c.epochs, c.input_size, c.batch_size) == (
        "adam", 1e-3, 1e-4, "exponential", 0.9, 100, 224, 256)
    assert tuple(c.extra.get("alpha", (0.0, 0.1, 0.0))) == (0.0, 0.1, 0.0)
    assert parse_config(cls, ["--data", "affectnet"]).data_opts == {"classes": 7}     # AffectNet-7, as the paper
    assert parse_config(cls, ["--data", "affectnet", "--data-opt", "classes=8"]).data_opts == {"classes": 8}
    for d in ("rafdb", "sfew"):
        assert parse_config(cls, ["--data", d]).out == f"runs/clcl_{d}"
