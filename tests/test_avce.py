"""AVCE (trainers.avce): exact sparsemax, each loss against hand-computed values, Algorithm 1's two passes and
their optimisers, the official code's faults kept out (dropout at inference, +0.15 in the demo), a fixture run in
AFEW-VA's real format that learns, and the errors a user can meet."""
from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch

from conftest import write_afew_va
from ferengine import checkpoint as ck
from ferengine.models import create_model
from trainers.engine import Trainer, parse_config
from trainers.engine.errors import TrainError
from trainers.losses.avce import CLIP_EPS, AVCELoss, AVLoss, DiscriminativeLoss, Similarity
from trainers.methods import get_method, run
from trainers.metrics import regression_report
from trainers.modules.sparsemax import sparsemax

COMMON = ["--batch-size", "32", "--no-tensorboard", "--bench-batches", "0", "--workers", "0", "--width", "0.125",
          "--hidden", "16", "--input-size", "64"]


# ------------------------------------------------------------------------------------------------ sparsemax
def _brute_projection(z: np.ndarray) -> np.ndarray:
    """argmin_{p in simplex} ||p - z||^2 by trying every support: on support S the minimiser of the affine
    problem is z_S - (sum z_S - 1)/|S|; the best feasible (non-negative) candidate is the projection."""
    d = z.shape[0]
    best, best_d = None, math.inf
    for k in range(1, d + 1):
        for s in itertools.combinations(range(d), k):
            p = np.zeros(d)
            idx = list(s)
            p[idx] = z[idx] - (z[idx].sum() - 1) / k
            if (p >= -1e-12).all():
                dist = float(((p - z) ** 2).sum())
                if dist < best_d:
                    best, best_d = p, dist
    return best


def test_sparsemax_by_hand_and_against_brute_force():
    p = sparsemax(torch.tensor([[1.0, 0.5, -1.0]], dtype=torch.float64))
    assert torch.allclose(p, torch.tensor([[0.75, 0.25, 0.0]], dtype=torch.float64))
    rng = np.random.default_rng(0)
    z = rng.normal(0, 1.5, (200, 6))
    z[:20] *= 0.01                                     # near-uniform rows: full support
    z[20:40, 0] += 12                                  # one dominant entry: a one-hot projection
    got = sparsemax(torch.from_numpy(z)).numpy()
    want = np.stack([_brute_projection(r) for r in z])
    assert np.abs(got - want).max() < 1e-10
    assert np.allclose(got.sum(1), 1) and (got >= 0).all()
    assert (got[20:40] == np.eye(6)[0]).all()
    assert ((got[:20] > 0).sum(1) == 6).all()
    # along another dim, and in half precision (computed in float32)
    t = torch.from_numpy(z[:8]).T.contiguous()
    assert torch.allclose(sparsemax(t, dim=0).T, torch.from_numpy(got[:8]))
    h = sparsemax(torch.from_numpy(z[:8]).half())
    assert h.dtype == torch.float16 and torch.allclose(h.double(), torch.from_numpy(got[:8]), atol=2e-3)


def test_sparsemax_jacobian():
    rng = np.random.default_rng(1)
    z = torch.from_numpy(rng.normal(0, 1, (5, 7))).requires_grad_(True)
    assert torch.autograd.gradcheck(sparsemax, (z,), eps=1e-6, atol=1e-8)
    for row in z.detach():
        p = sparsemax(row.unsqueeze(0))[0]
        s = (p > 0).double()
        want = torch.diag(s) - torch.outer(s, s) / s.sum()       # Martins & Astudillo, eq. 12
        jac = torch.autograd.functional.jacobian(lambda r: sparsemax(r.unsqueeze(0))[0], row)
        assert torch.allclose(jac, want, atol=1e-12)
        # and against finite differences of the brute-force projection
        eps = 1e-6
        fd = np.stack([(_brute_projection(row.numpy() + eps * e) - _brute_projection(row.numpy() - eps * e)) / (2 * eps)
                       for e in np.eye(7)], 1)
        assert np.abs(fd - want.numpy()).max() < 1e-5


# ------------------------------------------------------------------------------------------------ losses
def test_similarity_by_hand():
    x = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, 0.8]])
    y = torch.tensor([[0.0, 1.0], [-0.3, -0.4], [0.3, 0.4]])
    f_none = Similarity("f", clip="none")(x, y)
    # (1 - theta/pi) + 0.75 (1 - | ||x|| - ||y|| |): 90 deg, equal norms; opposite; same direction, norms 1 and .5
    assert torch.allclose(f_none, torch.tensor([0.5 + 0.75, 0.0 + 0.75 * 0.5, 1.0 + 0.75 * 0.5]), atol=1e-3)
    assert torch.allclose(Similarity("f")(x, y), torch.tensor([1.0, 0.375, 1.0]), atol=1e-3)        # clipped (0, 1]
    ang = Similarity("f", clip="angle")(x, y)
    assert torch.allclose(ang, torch.tensor([1.25, CLIP_EPS + 0.375, 1.375]), atol=1e-3)
    assert torch.allclose(Similarity("f1", clip="none")(x, y), torch.tensor([0.0, -0.5, 0.5]))
    # f2: -0.5 where the valences (column 0) differ in sign: rows 0 (1 vs 0) and 1 (0.6 vs -0.3)
    f2 = Similarity("f2", clip="none")(x, y)
    assert torch.allclose(f2, f_none + torch.tensor([-0.5, -0.5, 0.0]))
    assert float(Similarity("f2")(x, y)[1]) == pytest.approx(CLIP_EPS)                        # -0.125 -> clip
    with pytest.raises(ValueError, match="similarity"):
        Similarity("cos")


class _Fixed(torch.nn.Module):
    """A similarity returning given values for the positive and the negative pairs."""

    def __init__(self, pos, neg):
        super().__init__()
        self.pos, self.neg = torch.tensor(pos), torch.tensor(neg)

    def forward(self, x, y):
        return self.pos if y is self.ya else self.neg


def test_avce_loss_eq2_by_hand():
    fixed = _Fixed([1.0, 0.5], [0.25, 0.25])
    loss_fn = AVCELoss(fixed, alpha=0.5, beta=0.005, gamma=0.5)
    fixed.ya = ya = torch.zeros(2, 2)
    loss, fp, fn = loss_fn(torch.zeros(2, 2), ya, torch.ones(2, 2))
    # E_pos f - a E_neg f - b/2 E_pos f^2 - g/2 E_neg f^2 = .75 - .125 - .0025 * .625 - .25 * .0625
    assert float(loss) == pytest.approx(-(0.75 - 0.125 - 0.0025 * 0.625 - 0.25 * 0.0625))
    # its gradient pulls the positive view towards x and pushes the negative one away
    x = torch.tensor([[0.5, 0.5]])
    ya = torch.tensor([[0.4, -0.1]], requires_grad=True)
    yn = torch.tensor([[0.45, 0.4]], requires_grad=True)
    loss, fp, fn = AVCELoss(Similarity("f", clip="none"))(x, ya, yn)
    loss.backward()
    with torch.no_grad():
        l2, fp2, fn2 = AVCELoss(Similarity("f", clip="none"))(x, ya - 0.01 * ya.grad, yn - 0.01 * yn.grad)
    assert fp2 > fp and fn2 < fn and l2 < loss


def test_av_loss_by_hand():
    t = np.array([[0.5, -0.2], [-0.3, 0.4], [0.1, 0.1], [0.8, -0.6]])
    p = np.array([[0.4, -0.1], [-0.1, 0.2], [0.0, 0.3], [0.6, -0.2]])
    loss, parts = AVLoss()(torch.tensor(p), torch.tensor(t))
    rep = regression_report(t, p)
    rmse = (rep["valence"]["rmse"] + rep["arousal"]["rmse"]) / 2
    pcc = (rep["valence"]["pcc"] + rep["arousal"]["pcc"]) / 2
    ccc = (rep["valence"]["ccc"] + rep["arousal"]["ccc"]) / 2
    assert float(loss) == pytest.approx(rmse + ((1 - pcc) + (1 - ccc)) / 2, abs=1e-6)
    assert float(parts["ccc"]) == pytest.approx(ccc, abs=1e-6)
    # a row with a missing target is left out
    t2 = np.vstack([t, [[np.nan, np.nan]]])
    p2 = np.vstack([p, [[0.9, 0.9]]])
    assert float(AVLoss()(torch.tensor(p2), torch.tensor(t2))[0]) == pytest.approx(float(loss), abs=1e-6)


def test_discriminative_loss_eq8_by_hand():
    v = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    va = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    vn = torch.tensor([[0.0, -1.0], [1.0, 0.5]])
    loss, parts = DiscriminativeLoss(1.0, 0.8)(v, va, vn)
    push = [max(0.0, 1 - 4.0), 1 - 0.25]
    u = np.array([1, 0.5]) / np.linalg.norm([1, 0.5]) - np.array([1, 0])
    hold = [2 * abs(math.sqrt(2) - 0.8), abs(0 - 0.8) + abs(np.linalg.norm(u) - 0.8)]
    assert float(parts["push"]) == pytest.approx(np.mean(push), abs=1e-5)
    assert float(parts["hold"]) == pytest.approx(np.mean(hold), abs=1e-5)
    assert float(loss) == pytest.approx(np.mean(push) + np.mean(hold), abs=1e-5)
    lin, _ = DiscriminativeLoss(1.0, 0.8, hold="linear")(v, va, vn)
    assert float(lin) == pytest.approx(np.mean(push) + np.mean([2 * (math.sqrt(2) - 0.8),
                                                                (0 - 0.8) + (np.linalg.norm(u) - 0.8)]), abs=1e-5)

    # why "abs" is the default: eq. 8 as printed has the same gradient whatever delta2 is
    def grad(delta2, hold):
        w = vn.clone().requires_grad_(True)
        DiscriminativeLoss(1.0, delta2, hold)(v, va, w)[0].backward()
        return w.grad

    assert torch.allclose(grad(0.8, "linear"), grad(0.1, "linear"))
    assert not torch.allclose(grad(0.8, "abs"), grad(0.1, "abs"))


# ------------------------------------------------------------------------------------------------ the network
@pytest.mark.parametrize("arch", ["avce_alexnet", "avce_resnet18"])
def test_inference_is_deterministic_and_adds_nothing(arch):
    """The official regressor keeps dropout on at test time and its demo adds +0.15: neither here."""
    torch.manual_seed(0)
    net = create_model(arch, in_chans=1, width=0.125, hidden=16, dropout=0.5)
    x = torch.rand(6, 1, 64, 64)
    net.train()
    for _ in range(3):  # settle BN statistics a little so that eval mode is not degenerate
        net(x)
    with torch.no_grad():
        a, b = net(x)["va"], net(x)["va"]     # train mode: dropout on
        assert not torch.equal(a, b)
        net.eval()
        e1, e2 = net(x)["va"], net(x)["va"]
        assert torch.equal(e1, e2)
        ref = create_model(arch, in_chans=1, width=0.125, hidden=16, dropout=0.0).eval()
        ref.load_state_dict(net.state_dict())
        assert torch.equal(ref(x)["va"], e1)    # eval with dropout 0.5 = no dropout at all
        z = net.latent(net.forward_features(x))
        assert torch.equal(e1, torch.tanh(net.regressor(z)))   # R's output, nothing added
        assert (e1.abs() <= 1).all() and float((e1 - e1[:1]).abs().max()) > 0
    assert net.heads == ("valence_arousal",)


def test_alexnet_minimum_input():
    net = create_model("avce_alexnet", width=0.125, hidden=8).eval()
    assert net(torch.rand(1, 3, 63, 63))["va"].shape == (1, 2)
    with pytest.raises(RuntimeError):
        net(torch.rand(1, 3, 56, 56))


# ------------------------------------------------------------------------------------------------ training
@pytest.fixture(scope="module")
def afew(tmp_path_factory):
    root = tmp_path_factory.mktemp("afew")
    write_afew_va(root / "data")
    return root


@pytest.fixture(scope="module")
def trained(afew):
    """A tiny AVCE trained for real on the fixture (about a minute on 2 cores)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FER_DESKTOP_CACHE", str(afew / "cache"))
        out = afew / "run"
        assert run("avce", ["--data", "afew-va", "--data-dir", str(afew / "data"), "--out", str(out), *COMMON,
                            "--backbone", "resnet18", "--input-size", "32", "--iterations", "0", "--epochs", "12",
                            "--lr", "1e-3"]) == 0
    return out


def test_a_fixture_run_learns_and_exports_ecr_only(trained, afew, monkeypatch):
    import csv

    with open(trained / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    best = max(float(r["val_mean_ccc"]) for r in rows)
    assert best > 0.5, f"AVCE did not learn the fixture (best mean CCC {best:.3f})"
    for k in ("train_avce", "train_dis", "train_push", "train_hold", "train_f_pos", "train_f_neg", "lr_dis"):
        assert k in rows[0], k
    info = ck.read_info(trained / "best.safetensors")
    assert info.arch == "avce_resnet18" and list(info.heads) == ["valence_arousal"] and list(info.labels) == []
    assert any("no expression categories" in n for n in info.training.get("notes", []))
    loaded = ck.load(trained / "best.safetensors")
    names = [k for k, _ in loaded.model.named_parameters()]
    assert names and not any(k.startswith(("head.", "head1.", "net.")) for k in names)
    # --eval-only on the selection split reproduces the run's best mean CCC
    monkeypatch.setenv("FER_DESKTOP_CACHE", str(afew / "cache"))
    ev = afew / "ev"
    assert run("avce", ["--data", "afew-va", "--data-dir", str(afew / "data"), "--eval-only",
                        str(trained / "best.safetensors"), "--out", str(ev), *COMMON, "--backbone", "resnet18",
                        "--input-size", "32"]) == 0
    res = json.loads((ev / "eval.json").read_text())
    assert res["mean_ccc"] == pytest.approx(best, abs=1e-5)


def _trainer(afew, monkeypatch, *extra):
    monkeypatch.setenv("FER_DESKTOP_CACHE", str(afew / "cache"))
    cfg = parse_config(get_method("avce"), ["--data", "afew-va", "--data-dir", str(afew / "data"), "--out",
                                            str(afew / "t"), *COMMON, "--iterations", "0", "--epochs", "1",
                                            "--no-amp", *extra])
    return Trainer(cfg, get_method("avce"), argv=["pytest"])


def test_two_passes_update_what_algorithm_1_says(afew, monkeypatch):
    tr = _trainer(afew, monkeypatch)
    m = tr.model
    assert set(tr.optimizers) == {"main", "dis"}
    assert isinstance(tr.optimizers["main"], torch.optim.Adam) and tr.optimizers["main"].defaults["betas"] == (0.5, 0.9)
    assert tr.optimizers["main"].defaults["lr"] == pytest.approx(1e-4)
    assert isinstance(tr.optimizers["dis"], torch.optim.SGD) and tr.optimizers["dis"].defaults["lr"] == pytest.approx(1e-2)
    groups = {"E": m.net.encoder, "C": m.net.compress, "R": m.net.regressor, "H": m.head, "H1": m.head1}

    def snap():
        return {g: [p.detach().clone() for p in mod.parameters()] for g, mod in groups.items()}

    def changed(a, b):
        return {g for g in groups if any(not torch.equal(x, y) for x, y in zip(a[g], b[g]))}

    seen = []
    real_step = tr.step

    def spy(closure, *names):
        before = snap()
        out = real_step(closure, *names)
        seen.append((names, changed(before, snap())))
        return out

    tr.step = spy
    batch = next(iter(tr.train_batches))
    logs = tr.method.training_step(batch)
    assert [n for n, _ in seen] == [("main",), ("dis",)]
    assert seen[0][1] == {"E", "C", "R", "H"}          # L_main: E, C, R, H
    assert seen[1][1] == {"E", "C", "H1"}              # L_dis: E, C, H1
    assert all(torch.isfinite(v) for v in logs.values())
    # the schedule: x0.8 at the paper's iterations, on both optimisers
    s = tr.schedules["dis"]
    assert (s.kind, s.interval, s.gamma, tuple(s.milestones)) == ("multistep", "step", 0.8,
                                                                   (5000, 25000, 45000, 65000, 85000))


def test_ablation_flags(afew, monkeypatch):
    tr = _trainer(afew, monkeypatch, "--no-dis", "--no-avce")
    assert set(tr.optimizers) == {"main"}
    logs = tr.method.training_step(next(iter(tr.train_batches)))
    assert "avce" not in logs and "dis" not in logs and torch.isfinite(logs["loss"])


def test_iterations_set_the_run_length(afew, monkeypatch):
    monkeypatch.setenv("FER_DESKTOP_CACHE", str(afew / "cache"))
    cls = get_method("avce")
    cfg = parse_config(cls, ["--data", "afew-va", "--data-dir", str(afew / "data"), "--out", str(afew / "it"),
                             *COMMON, "--iterations", "10"])
    tr = Trainer(cfg, cls, argv=["pytest"])
    # 128 training frames in batches of 32: 4 steps per epoch, so 10 iterations take 3 epochs
    assert tr.steps_per_epoch == 4 and tr.plan.total == 3
    assert parse_config(cls, ["--data", "affwild2"]).extra["iterations"] == 100000
    assert parse_config(cls, ["--data", "affectnet"]).data_opts == {"task": "va"}
    assert parse_config(cls, ["--data", "afew-va"]).best_metric == "mean_ccc"
    assert parse_config(cls, ["--data", "afew-va", "--backbone", "resnet18"]).batch_size == 256  # before the method
    assert cls(parse_config(cls, ["--data", "afew-va", "--backbone", "resnet18"])).cfg.batch_size == 128


def test_clear_errors(afew, tmp_path, monkeypatch):
    from conftest import write_fer2013

    monkeypatch.setenv("FER_DESKTOP_CACHE", str(tmp_path / "cache"))
    write_fer2013(tmp_path / "fer" / "fer2013", n_train=64, n_val=32)
    cls = get_method("avce")
    cfg = parse_config(cls, ["--data", "fer2013", "--data-dir", str(tmp_path / "fer"), "--out", str(tmp_path / "o"),
                             *COMMON])
    with pytest.raises(TrainError, match="no valence/arousal targets"):
        Trainer(cfg, cls, argv=["pytest"])
    cfg = parse_config(cls, ["--data", "afew-va", "--data-dir", str(afew / "data"), "--out", str(tmp_path / "o2"),
                             *COMMON[:-2], "--input-size", "48"])
    with pytest.raises(TrainError, match="AlexNet needs --input-size >= 63"):
        Trainer(cfg, cls, argv=["pytest"])
    with pytest.raises(TrainError, match="--stem is a ResNet-18 setting"):
        cls(parse_config(cls, ["--stem", "small"]))


@pytest.mark.parametrize("data", ["affectnet", "affwild2"])
def test_end_to_end_on_the_other_readers_formats(data, tmp_path, monkeypatch):
    """AffectNet (its csv lists, the va task by default) and Aff-Wild2 (per-video VA text files): a run, its
    checkpoint and --eval-only, on fixtures in the readers' exact on-disk formats."""
    from test_data_affectnet import write_affectnet
    from test_data_affwild2 import write_affwild2

    monkeypatch.setenv("FER_DESKTOP_CACHE", str(tmp_path / "cache"))
    (write_affectnet if data == "affectnet" else write_affwild2)(tmp_path / "data")
    args = ["--data", data, "--data-dir", str(tmp_path / "data"), *COMMON, "--iterations", "2"]
    assert run("avce", [*args, "--out", str(tmp_path / "run")]) == 0
    info = ck.read_info(tmp_path / "run" / "best.safetensors")
    assert list(info.heads) == ["valence_arousal"] and info.training["data"]["name"] == data
    assert run("avce", [*args, "--eval-only", str(tmp_path / "run" / "best.safetensors"), "--out",
                        str(tmp_path / "ev")]) == 0
    res = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert res["va_n"] == (3 if data == "affectnet" else 2) and np.isfinite(res["valence_rmse"])


def test_release_card_of_an_av_only_model(trained, afew, tmp_path, monkeypatch, capsys):
    """trainers.release on an AVCE checkpoint: the AV table (whole split and no-copy part), no classes, no
    confusion matrix; the reader options default to the training run's; a failed release leaves --out alone."""
    import dataclasses

    from trainers.release import main as release_main

    monkeypatch.setenv("FER_DESKTOP_CACHE", str(afew / "cache"))
    loaded = ck.load(trained / "best.safetensors")
    t = dict(loaded.info.training)
    t["data"] = dict(t["data"], options={"fold": 1})      # as if trained with --data-opt fold=1
    src = tmp_path / "src.safetensors"
    ck.save(src, loaded.model, dataclasses.replace(loaded.info, training=t))
    out = tmp_path / "rel" / "avce.safetensors"
    out.parent.mkdir()
    assert release_main([str(src), "--out", str(out), "--name", "AVCE test", "--data", "afew-va", "--data-dir",
                         str(afew / "data"), "--split", "test", "--repeat", "2"]) == 0
    capsys.readouterr()
    ev = json.loads((tmp_path / "rel" / "avce.eval.json").read_text())
    assert ev["data_opts"] == {"fold": 1} and "confusion_matrix" not in ev
    from trainers.data import load_dataset

    assert ev["va_n"] == len(load_dataset("afew-va", afew / "data", "test", fold=1))
    card = (tmp_path / "rel" / "avce.md").read_text()
    assert "none: this model predicts valence and arousal only" in card
    assert "| afew-va test, whole split |" in card and f"**{ev['mean_ccc']:.4f}**" in card
    assert "Confusion matrix" not in card and "--data-opt fold=1" in card
    assert not (tmp_path / "rel" / "avce.confusion.png").exists()
    assert ck.read_info(out).metrics["afew-va_test_mean_ccc"] == pytest.approx(ev["mean_ccc"])
    # a release that fails (no such dataset there) leaves the shipped file as it was, and no temporary file
    before = out.read_bytes()
    assert release_main([str(src), "--out", str(out), "--name", "x", "--data", "fer2013", "--data-dir",
                         str(tmp_path / "nothing"), "--split", "publictest", "--repeat", "2"]) != 0
    assert "release: error:" in capsys.readouterr().err
    assert out.read_bytes() == before and sorted(p.name for p in out.parent.iterdir()) == [
        "avce.eval.json", "avce.md", "avce.safetensors"]


def test_the_proxy_task_says_so_in_the_log_and_the_checkpoint(tmp_path, monkeypatch):
    """--data ferplus (the row's va=anchors): FER+ faces with valence/arousal targets from their votes; the run's
    log, the checkpoint's notes (the model card prints them) name it a proxy task, and the checkpoint claims no
    classes although the data has FER+'s eight."""
    from test_av_proxy import ROWS, write_pair

    from trainers.methods.avce import PROXY_NOTE

    monkeypatch.setenv("FER_DESKTOP_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    rows = []
    for i in range(96):
        votes = [0] * 10
        for _ in range(10):
            votes[int(rng.integers(0, 8))] += 1
        rows.append(("Training" if i < 64 else "PublicTest", f"fer{i:07d}.png", votes, None, 0))
    write_pair(tmp_path / "data", rows, [rng.integers(0, 256, (48, 48), dtype=np.uint8) for _ in rows])
    assert ROWS  # the writer's own fixture rows are the reader tests'
    out = tmp_path / "run"
    assert run("avce", ["--data", "ferplus", "--data-dir", str(tmp_path / "data"), "--out", str(out), *COMMON,
                        "--backbone", "resnet18", "--input-size", "32", "--iterations", "2",
                        "--data-opt", "mode=distribution"]) == 0
    assert "PROXY TASK" in (out / "train.log").read_text()
    info = ck.read_info(out / "best.safetensors")
    assert info.training["data"]["options"] == {"va": "anchors", "mode": "distribution"}
    assert info.training["notes"][0] == PROXY_NOTE and list(info.labels) == [] and list(info.heads) == [
        "valence_arousal"]


def test_data_opts_add_to_the_rows():
    cls = get_method("avce")
    assert parse_config(cls, ["--data", "ferplus"]).data_opts == {"va": "anchors"}
    assert parse_config(cls, ["--data", "ferplus", "--data-opt", "mode=distribution"]).data_opts == {
        "va": "anchors", "mode": "distribution"}
    assert parse_config(cls, ["--data", "ferplus", "--data-opt", "va=none"]).data_opts == {"va": "none"}


def test_on_disk_faces_are_decoded_at_the_models_input_size(afew, monkeypatch):
    """A 224 px model trains on 224 px faces, not on the reader's 112 px default upsampled; an explicit
    image_size option and in-memory data are left as they are."""
    from trainers.data.splits import load_data

    monkeypatch.setenv("FER_DESKTOP_CACHE", str(afew / "cache"))
    tr, va, info = load_data("afew-va", str(afew / "data"), input_size=160)
    assert info.image_size == 160 and tr.image_size == 160 and va.image_size == 160
    assert tuple(tr[0]["image"].shape[:2]) == (160, 160)
    _, _, info = load_data("afew-va", str(afew / "data"), input_size=160, opts={"image_size": 96})
    assert info.image_size == 96
    _, _, info = load_data("afew-va", str(afew / "data"), input_size=64)
    assert info.image_size == 112                                   # the reader's default is enough
