"""The training engine: batched augmentation, exact resume after a kill, state/checkpoint files, the
method hooks (two views, EMA encoder + queue, two optimisers, own-rule parameters, branches added during
training, block features, plateau with reload-best), and a tiny run that learns."""
from __future__ import annotations

import argparse
import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ferengine import checkpoint as ck
from ferengine.models import create_model
from ferengine.preprocess import to_model_input
from trainers.augment import AUGMENT_PRESETS, AugmentConfig, BatchAugment, augment_config
from trainers.baseline import Baseline
from trainers.engine import Method, TrainConfig, Trainer, TrainError
from trainers.modules import LabelledQueue, MomentumPairs, frozen_copy

from conftest import Kill, KillAt, deep_diff

from conftest import LABELS, patterns


def tiny_cfg(out: Path, **kw) -> TrainConfig:
    base = dict(out=str(out), epochs=3, batch_size=16, lr=0.05, optimizer="sgd", nesterov=True, scheduler="cosine",
                warmup_epochs=0.5, weight_decay=5e-4, label_smoothing=0.1, augment="standard", tensorboard=False,
                bench_batches=0, extra={"arch": "fastcnn", "arch_kwargs": {"width": 0.25}})
    base.update(kw)
    return TrainConfig(**base)


def state_equal(a: dict, b: dict) -> list[str]:
    """Names of tensors that differ (bitwise)."""
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


# --------------------------------------------------------------------------------------- augmentation


@pytest.mark.parametrize("rgb", [False, True])
def test_augment_deterministic_and_shapes(rgb):
    rng = np.random.default_rng(0)
    shape = (6, 40, 40, 3) if rgb else (6, 40, 40)
    x = torch.from_numpy(rng.integers(0, 256, shape, dtype=np.uint8))
    aug = BatchAugment(AUGMENT_PRESETS["strong"])
    a = aug(x, torch.Generator().manual_seed(1))
    b = aug(x, torch.Generator().manual_seed(1))
    c = aug(x, torch.Generator().manual_seed(2))
    assert a.shape == (6, 3 if rgb else 1, 40, 40) and a.dtype == torch.float32
    assert torch.equal(a, b), "same seed must give the same augmentation"
    assert not torch.equal(a, c), "another seed must give another augmentation"
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    # the generator advances: two calls in a row differ
    g = torch.Generator().manual_seed(1)
    assert not torch.equal(aug(x, g), aug(x, g))


def test_augment_steps_are_exact():
    x = torch.arange(2 * 8 * 8, dtype=torch.float32).reshape(2, 8, 8).remainder(256).to(torch.uint8)
    ref = x.float().unsqueeze(1) * (1.0 / 255.0)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(BatchAugment(AugmentConfig())(x, g), ref)
    # no augmentation + to_model_input == to_model_input on the uint8 faces (training == inference arithmetic)
    spec = ck.InputSpec(size=8, channels=1)
    assert torch.equal(to_model_input(BatchAugment(AugmentConfig())(x, g), spec), to_model_input(x, spec))
    flipped = BatchAugment(AugmentConfig(hflip=1.0))(x, g)
    assert torch.allclose(flipped, ref.flip(-1), atol=1e-5)
    # whole-pixel shifts with zero fill = a crop of the zero-padded image
    shifted = BatchAugment(AugmentConfig(translate=2))(x, torch.Generator().manual_seed(3))
    found = False
    for dy in range(-2, 3):
        for dx in range(-2, 3):
            pad = F.pad(ref, (2, 2, 2, 2))
            crop = pad[..., 2 - dy:10 - dy, 2 - dx:10 - dx]
            if torch.allclose(shifted[0], crop[0], atol=1e-5):
                found = True
    assert found, "a translate-only augmentation must equal a crop of the zero-padded image"
    erased = BatchAugment(AugmentConfig(erase=1.0, erase_area=(0.2, 0.2)))(torch.zeros(4, 16, 16, dtype=torch.uint8),
                                                                           torch.Generator().manual_seed(0))
    frac = (erased != 0).float().mean((1, 2, 3))
    assert torch.all(frac > 0.1) and torch.all(frac < 0.35)


def test_augment_config_errors():
    with pytest.raises(ValueError, match="unknown augmentation option"):
        augment_config("standard", {"rotat": 3})
    with pytest.raises(ValueError, match="probability"):
        AugmentConfig(hflip=2)
    assert augment_config("standard", {"rotate": 30}).rotate == 30


# ------------------------------------------------------------------------------------ learning, files


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny baseline run (fastcnn width 0.25, 48x48 patterns, 3 epochs), shared by several tests."""
    out = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    cfg = tiny_cfg(out, tensorboard=True, bench_batches=3)
    tr = Trainer(cfg, Baseline, datasets=(patterns(384, 0), patterns(128, 1)))
    row = tr.fit()
    return tr, row, out


def test_tiny_run_beats_chance(trained):
    tr, row, out = trained
    assert row["val_accuracy"] > 60.0, f"4 classes: chance is 25%, got {row['val_accuracy']:.1f}%"
    assert row["val_macro_f1"] > 50.0
    assert row["train_ips"] > 0 and row["data_ips"] > 0 and tr.data_ips > 0
    assert (out / "tb").is_dir() and any((out / "tb").iterdir())
    args = json.loads((out / "args.json").read_text())
    assert args["config"]["epochs"] == 3 and args["resolved"]["input"]["size"] == 48
    hw = ck.read_info(out / "best.safetensors").training["hardware"]
    assert hw["device"] == "cpu" and hw["torch"] == torch.__version__ and hw["cpus"] >= 1


def test_checkpoint_loads_and_matches_model(trained):
    tr, row, out = trained
    loaded = ck.load(out / "last.safetensors")
    assert loaded.info.arch == "fastcnn" and loaded.info.labels == list(LABELS)
    assert loaded.spec.size == 48 and loaded.spec.channels == 1
    # the patterns stand in for --data fer2013 (the default): its measured crop goes into the checkpoint
    assert (loaded.spec.crop_margin, loaded.spec.crop_offset_y) == (0.15, -0.097)
    assert loaded.info.training["crop_calibration"]["how"].startswith("measured for fer2013")
    t = loaded.info.training
    assert t["epoch"] == 3 and t["seed"] == 0 and t["split_sizes"] == {"train": 384, "val": 128}
    assert "command" in t and t["data"]["name"] == "fer2013"
    assert loaded.info.metrics["val_accuracy"] == pytest.approx(row["val_accuracy"])
    x = torch.randn(5, 1, 48, 48)
    tr.model.eval()
    with torch.no_grad():
        a, b = tr.model(x)["logits"], loaded.model(x)["logits"]
    # same weights; the trainer's copy is channels-last, which picks other conv kernels (float rounding only)
    assert torch.allclose(a, b, rtol=0, atol=1e-5)
    best = ck.load(out / "best.safetensors")
    assert best.info.metrics["val_accuracy"] == pytest.approx(tr.best_value)


def test_state_file_is_weights_only(trained):
    _, _, out = trained
    s = torch.load(out / "state.pt", weights_only=True)
    assert s["epoch"] == 3 and s["format"] == "fer-desktop-train-state"
    assert {"model", "optimizers", "schedulers", "scaler", "rng", "batches", "method", "extra"} <= set(s)
    assert isinstance(s["rng"]["numpy"]["keys"], torch.Tensor)


def test_refuses_to_overwrite_a_run(trained):
    _, _, out = trained
    with pytest.raises(TrainError, match="--resume"):
        Trainer(tiny_cfg(out), Baseline, datasets=(patterns(32, 0), patterns(16, 1)))


# ------------------------------------------------------------------------------- resume after a kill


def _run(out, method, kill=None, resume=False, **kw):
    cfg = tiny_cfg(out, resume=resume, input_size=32, **kw)
    tr = Trainer(cfg, method, datasets=(patterns(96, 0, size=32), patterns(32, 1, size=32)),
                 callbacks=[kill] if kill else [])
    if kill is None:
        tr.fit()
    else:
        with pytest.raises(Kill):
            tr.fit()
    return tr


def _csv_epochs(out: Path) -> list[int]:
    with open(out / "metrics.csv", newline="") as fh:
        return [int(r["epoch"]) for r in csv.DictReader(fh)]


def _check_identical(a_out: Path, b_out: Path):
    sa = torch.load(a_out / "state.pt", weights_only=True)
    sb = torch.load(b_out / "state.pt", weights_only=True)
    assert sa["epoch"] == sb["epoch"] == 3
    assert state_equal(sa["model"], sb["model"]) == [], "resumed weights differ from the uninterrupted run"
    # everything else too: optimiser moments and lrs, schedulers, RNGs, generators, method and extra state
    for k in ("config",):
        sa.pop(k), sb.pop(k)
    assert deep_diff(sa, sb) == []
    wa = ck.load(a_out / "last.safetensors").model.state_dict()
    wb = ck.load(b_out / "last.safetensors").model.state_dict()
    assert state_equal(wa, wb) == []
    return sa, sb


def test_resume_after_kill_mid_epoch_is_exact(tmp_path):
    straight = _run(tmp_path / "a", Baseline)
    _run(tmp_path / "b", Baseline, kill=KillAt(epoch=2, step=3))
    assert torch.load(tmp_path / "b" / "state.pt", weights_only=True)["epoch"] == 1
    resumed = _run(tmp_path / "b", Baseline, resume=True)
    assert resumed.resumed
    _check_identical(tmp_path / "a", tmp_path / "b")
    assert _csv_epochs(tmp_path / "b") == [1, 2, 3]
    assert straight.best_value == resumed.best_value


def test_resume_after_kill_between_log_and_state(tmp_path):
    """Killed after epoch 2's csv row but before its state.pt: the rerun of epoch 2 must not duplicate it."""
    _run(tmp_path / "a", Baseline)
    _run(tmp_path / "b", Baseline, kill=KillAt(epoch=2))
    assert _csv_epochs(tmp_path / "b") == [1, 2]
    _run(tmp_path / "b", Baseline, resume=True)
    _check_identical(tmp_path / "a", tmp_path / "b")
    assert _csv_epochs(tmp_path / "b") == [1, 2, 3]
    ra = list(csv.DictReader(open(tmp_path / "a" / "metrics.csv")))
    rb = list(csv.DictReader(open(tmp_path / "b" / "metrics.csv")))
    for x, y in zip(ra, rb):
        assert x["val_accuracy"] == y["val_accuracy"] and x["train_loss"] == y["train_loss"]


# ---------------------------------------------------------------------------- every hook, with resume


class ToyNet(nn.Module):
    def __init__(self, net: nn.Module, k: int):
        super().__init__()
        self.net = net
        self.net_k = frozen_copy(net)  # momentum target
        self.aux = nn.Linear(net.feature_dim, 8)
        self.branches = nn.ModuleList()
        self.k = k

    def add_branch(self) -> nn.Module:
        b = nn.Linear(self.net.feature_dim, self.k).to(self.aux.weight.device)
        self.branches.append(b)
        return b


class KitchenSink(Method):
    """Uses every extension point: 2 views (ECAN), momentum pairs + labelled queue filled by a frozen pass
    (ECAN), own-rule centres (DAF-CNN), a branch added during training (ESR), block features (CLCL /
    diversity), plateau with reload-best (DAF-CNN); the manual variant: two optimisers, two passes (AVCE)."""

    name = "kitchen"
    views = 2
    momentum = (0.9, None)

    def build_model(self, data):
        self.arch, self.arch_kwargs = "fastcnn", {"num_classes": data.num_classes, "in_chans": 1, "width": 0.25}
        return ToyNet(create_model(self.arch, **self.arch_kwargs), data.num_classes)

    def export_model(self):
        return self.model.net

    def param_groups(self):
        m = self.model
        return [{"params": list(m.net.parameters()) + list(m.aux.parameters())}]

    def momentum_pairs(self):
        return [(self.model.net, self.model.net_k)]

    def setup(self):
        t = self.trainer
        fd = self.model.net.feature_dim
        self.queue = t.register_state("queue", LabelledQueue(48, fd))
        self.centres = torch.zeros(t.data.num_classes, fd)
        self.fills = 0

    def before_training(self):
        with torch.no_grad():
            for b in self.trainer.make_batches(self.trainer.train_ds, augment=True):
                self.queue.push(self.model.net_k(b.input)["embedding"], b.label, step=-1)
                self.fills += 1

    def on_epoch_start(self, epoch):
        if epoch == 2 and len(self.model.branches) == 0:
            self._add_branch()

    def _add_branch(self):
        b = self.model.add_branch()
        self.trainer.add_param_group("main", {"params": list(b.parameters()), "lr": 0.01})

    def _losses(self, batch):
        net = self.model.net
        out = []
        for x in batch.inputs:
            f = net.forward_features(x)
            o = dict(net.forward_head(f))
            o["blocks"] = list(f.values())
            out.append(o)
        ce = sum(F.cross_entropy(o["logits"], batch.label) for o in out) / 2
        emb = out[0]["embedding"]
        qf, ql = self.queue.get()
        neg = (emb @ qf.T)[:, :].mean() if len(qf) else emb.sum() * 0
        centre = ((emb - self.centres[batch.label]) ** 2).sum(1).mean()
        blocks = out[0]["blocks"][0].pow(2).mean()
        for br in self.model.branches:
            ce = ce + F.cross_entropy(br(emb), batch.label)
        self._emb = emb.detach()
        main = ce + 1e-3 * centre + 1e-3 * blocks + 1e-3 * neg
        aux = self.model.aux(out[1]["embedding"]).pow(2).mean()
        return main, aux

    def training_step(self, batch):
        main, aux = self._losses(batch)
        return {"loss": main + aux, "main": main, "aux": aux}

    def after_step(self, batch, logs):
        with torch.no_grad():
            self.queue.push(self.model.net_k(batch.input)["embedding"], batch.label, step=self.trainer.global_step)
            self.centres.index_add_(0, batch.label, 0.05 * (self._emb - self.centres[batch.label]))

    def eval_step(self, batch):
        out = dict(self.model.net(batch.input))
        for i, br in enumerate(self.model.branches):
            out[f"logits_branch{i}"] = br(out["embedding"])
        return out

    def state_dict(self):
        return {"centres": self.centres, "branches": len(self.model.branches), "fills": self.fills}

    def load_state_dict(self, s):
        while len(self.model.branches) < s["branches"]:
            self._add_branch()
        self.centres.copy_(s["centres"])
        self.fills = s["fills"]


class KitchenSinkManual(KitchenSink):
    manual_optimization = True

    def build_optimizers(self):
        m = self.model
        aux_params = list(m.aux.parameters()) + list(m.net.stages[-1].parameters())  # shares the last stage
        return {"main": torch.optim.SGD(m.net.parameters(), lr=self.cfg.lr, momentum=0.9),
                "aux": torch.optim.Adam(aux_params, lr=1e-3)}

    def training_step(self, batch):
        main = self.trainer.step(lambda: self._losses(batch)[0], "main")
        aux = self.trainer.step(lambda: self._losses(batch)[1], "aux")  # a second pass with the updated weights
        return {"loss": main.detach(), "aux": aux.detach()}


@pytest.mark.parametrize("method", [KitchenSink, KitchenSinkManual])
def test_every_hook_survives_a_kill(tmp_path, method):
    kw = dict(scheduler="plateau", plateau_patience=1, plateau_threshold=200.0, plateau_factor=0.5, reload_best=True,
              extra={})
    a = _run(tmp_path / "a", method, **kw)
    _run(tmp_path / "b", method, kill=KillAt(epoch=3, step=2), **kw)
    b = _run(tmp_path / "b", method, resume=True, **kw)
    sa, sb = _check_identical(tmp_path / "a", tmp_path / "b")
    # the branch added at epoch 2 was re-created on resume, with its param group
    assert len(b.model.branches) == 1 and len(b.optimizers["main"].param_groups) == 2
    assert torch.equal(sa["method"]["centres"], sb["method"]["centres"]) and sa["method"]["centres"].abs().sum() > 0
    assert torch.equal(sa["extra"]["queue"]["features"], sb["extra"]["queue"]["features"])
    assert torch.equal(sa["extra"]["queue"]["groups"], sb["extra"]["queue"]["groups"])
    # the momentum target moved away from its copy of the initial weights, towards the online network
    w = "net_k.stages.0.0.weight"
    assert not torch.equal(sa["model"][w], sa["model"]["net.stages.0.0.weight"])
    assert sa["method"]["fills"] == a.method.fills > 0  # frozen pass ran once, not again on resume
    # plateau never sees a gain of 200 points: the lr halves every epoch and the best weights are reloaded
    # (epoch 1 is an improvement over nothing; epochs 2 and 3 are not)
    assert a.lr("main") == pytest.approx(0.05 * 0.5 ** 2)
    best = torch.load(tmp_path / "a" / "best_state.pt", weights_only=True)
    assert state_equal(best["model"], a.model.state_dict()) == []
    assert any(k.startswith("val_accuracy_branch0") for k in a.history[-1])


def test_several_optimisers_need_manual_optimisation(tmp_path):
    class TwoOptimisers(KitchenSink):
        build_optimizers = KitchenSinkManual.build_optimizers

    with pytest.raises(TrainError, match="manual_optimization"):
        _run(tmp_path / "x", TwoOptimisers, extra={})


def test_labelled_queue_keeps_steps_and_whole_groups():
    q = LabelledQueue(5, 2)
    assert q.push(torch.ones(3, 2), torch.tensor([0, 1, 2]), step=7) == 0
    assert q.get()[0].shape == (3, 2) and not q.full
    assert q.steps[:3].tolist() == [7, 7, 7] and q.groups[:3].tolist() == [0, 0, 0]
    q.push(2 * torch.ones(2, 2), torch.tensor([3, 4]), step=8)
    groups = q.recent_groups(5)
    assert [g[1].tolist() for g in groups] == [[3, 4], [0, 1, 2]], "newest first, whole groups"
    q.push(3 * torch.ones(2, 2), torch.tensor([5, 6]), step=9)  # overwrites two entries of group 0
    f, lab = q.get()
    assert q.full and f.shape == (5, 2) and sorted(lab.tolist()) == [2, 3, 4, 5, 6]
    groups = q.recent_groups(5)
    assert [g[1].tolist() for g in groups] == [[5, 6], [3, 4]], "a partly overwritten group is not a group"
    q2 = LabelledQueue(5, 2)
    q2.load_state_dict(q.state_dict())
    assert [g[1].tolist() for g in q2.recent_groups(2)] == [[5, 6], [3, 4]]
    with pytest.raises(ValueError, match="shape"):
        q.push(torch.ones(2, 3), torch.tensor([0, 1]))


def test_momentum_pairs():
    a, b = nn.Linear(2, 1), nn.Linear(3, 1)
    lin = nn.Linear(2, 1)
    target = frozen_copy(lin)
    ema = MomentumPairs([(lin, target)], 0.75)
    with torch.no_grad():
        old = target.weight.clone()
        lin.weight.add_(1.0)
    ema.update()
    assert torch.allclose(target.weight, 0.75 * old + 0.25 * lin.weight)
    assert not any(p.requires_grad for p in target.parameters())
    rising = MomentumPairs([(lin, target)], 0.99, 1.0, total_steps=10)
    assert rising.momentum_at(0) == pytest.approx(0.99) and rising.momentum_at(10) == pytest.approx(1.0)
    assert 0.99 < rising.momentum_at(5) < 1.0
    with pytest.raises(ValueError, match="do not match"):
        MomentumPairs([(a, b)])


# --------------------------------------------------------------------------------------- time budget


def test_duration_argument():
    from trainers.engine import duration

    assert duration("600") == 600 and duration("90s") == 90 and duration("45m") == 2700
    assert duration("1.5h") == 5400 and duration(" 2H ") == 7200
    for bad in ("soon", "10d", "-5", "m", "nan"):
        with pytest.raises(argparse.ArgumentTypeError):
            duration(bad)


def test_time_budget_shortens_the_run_and_ends_the_cosine(tmp_path, monkeypatch):
    """Each epoch takes 10 s on a fake clock; a 35 s budget fits 3 of the 10 epochs asked, and the cosine is
    re-timed so that the last step of epoch 3 reaches the floor."""
    from trainers.engine import logs

    now = [0.0]
    monkeypatch.setattr(logs, "clock", lambda: now[0])

    class TenSeconds:
        def on_epoch_end(self, trainer, epoch, row):
            now[0] += 10.0

    cfg = tiny_cfg(tmp_path / "run", epochs=10, time_budget=35.0, min_lr=0.0)
    tr = Trainer(cfg, Baseline, datasets=(patterns(64, 0), patterns(32, 1)), callbacks=[TenSeconds()])
    tr.fit()
    rows = list(csv.DictReader((tmp_path / "run" / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert tr.cfg.epochs == 3
    assert tr.optimizers["main"].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-9)
    assert float(rows[2]["lr"]) < 0.05 * 0.5, "epoch 3 starts late in a re-timed 3-epoch cosine (10 epochs: ~0.95 lr)"


def test_long_epochs_log_their_progress_without_a_terminal(tmp_path, monkeypatch, caplog):
    """Under nohup or a log file tqdm is silent; an epoch that runs past PROGRESS_EVERY_S logs where it is
    (step, losses, speed, time left). The fake clock advances 25 s per step, 5 steps per epoch: the first line
    comes when 60 s have passed, and none at the last step (the epoch's own line follows)."""
    from trainers.engine import logs

    now = [0.0]
    monkeypatch.setattr(logs, "clock", lambda: now[0])

    class Slow:
        def on_step_end(self, trainer, epoch, step):
            now[0] += 25.0

    cfg = tiny_cfg(tmp_path / "run", epochs=1)
    tr = Trainer(cfg, Baseline, datasets=(patterns(80, 0), patterns(16, 1)), callbacks=[Slow()])
    with caplog.at_level(logging.INFO, logger="trainers.engine"):
        tr.fit()
    lines = [r.getMessage() for r in caplog.records if ": step " in r.getMessage()]
    assert len(lines) == 1, lines  # the clock reads 75 s (>= 60) at step 4's check, 100 s at the last step's
    assert lines[0].startswith("epoch 1/1: step 4/5 (80%), loss 1.") and ", ce 1." in lines[0] and "img/s, training ends in " in lines[0]


def test_hms():
    from trainers.engine.logs import hms

    assert [hms(x) for x in (0, 59.4, 75, 3599, 4000, float("nan"))] == ["0s", "59s", "1m15s", "59m59s", "1h06m", "?"]
