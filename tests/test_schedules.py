"""The engine's own lr schedules and stage plans: the same numbers as torch's schedulers where they overlap
(so runs from before the engine owned its schedules continue unchanged), per-group ``lr_scale``,
step-interval milestones, warm-up, re-timing, resume, and stages that a time budget shrinks in proportion."""
from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
from torch import nn

from trainers.engine import LRSchedule, Method, Stage, StagePlan, TrainConfig, Trainer, TrainError
from trainers.engine.optim import make_optimizer


def _opt(lr=0.1, groups=1):
    return torch.optim.SGD([{"params": [nn.Parameter(torch.zeros(1))]} for _ in range(groups)], lr=lr)


def test_cosine_matches_torch_lambdalr_bit_for_bit():
    def fn(t, w=3, total=40, floor=0.01):
        if t < w:
            return (t + 1) / w
        p = min(1.0, (t - w) / max(1, total - w))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p))

    a, b = _opt(), _opt()
    ref = torch.optim.lr_scheduler.LambdaLR(a, fn)
    ours = LRSchedule(b, "cosine", total_steps=40, warmup_steps=3, floor=0.01)
    for _ in range(45):
        assert b.param_groups[0]["lr"] == a.param_groups[0]["lr"]
        a.step(), ref.step()
        ours.step_update()


def test_plateau_drops_at_the_patience_th_flat_epoch():
    """DAF-CNN's rule: no gain of at least the threshold for 13 epochs -> the lr drops at the 13th flat epoch."""
    o = _opt(1e-3)
    s = LRSchedule(o, "plateau", patience=13, threshold=0.05, factor=0.2, min_lr=1e-5)
    s.step(50.0)  # the first epoch sets the best
    drops = [s.step(50.0 + 0.003 * i) for i in range(1, 14)]  # 13 epochs, none 0.05 above the best
    assert drops == [False] * 12 + [True] and o.param_groups[0]["lr"] == pytest.approx(2e-4)
    assert [s.step(50.2 + 0.06 * i) for i in range(1, 14)] == [False] * 13, "gains reset the count"


def test_plateau_matches_torch_reduce_on_plateau_one_epoch_earlier():
    rng = np.random.default_rng(0)
    metrics = np.cumsum(rng.normal(0.05, 0.3, 60))
    a, b = _opt(1e-3), _opt(1e-3)
    ref = torch.optim.lr_scheduler.ReduceLROnPlateau(a, mode="max", factor=0.2, patience=2, threshold=0.05,
                                                     threshold_mode="abs", min_lr=1e-5)
    ours = LRSchedule(b, "plateau", patience=3, threshold=0.05, factor=0.2, min_lr=1e-5, mode="max")
    drops = 0
    for m in metrics:
        ref.step(float(m))
        drops += ours.step(float(m))
        assert b.param_groups[0]["lr"] == a.param_groups[0]["lr"]
    assert drops >= 2 and b.param_groups[0]["lr"] < 1e-4


def test_epoch_and_step_intervals_and_warmup():
    o = _opt(1.0)
    s = LRSchedule(o, "multistep", milestones=(2, 4), gamma=0.5)
    lrs = []
    for _ in range(5):
        lrs.append(o.param_groups[0]["lr"])
        s.step()
    assert lrs == [1.0, 1.0, 0.5, 0.5, 0.25]
    o = _opt(1.0)
    s = LRSchedule(o, "multistep", milestones=(3, 5), gamma=0.8, interval="step")  # AVCE: "at 5k, 25k iterations"
    seen = []
    for _ in range(6):
        seen.append(o.param_groups[0]["lr"])
        s.step_update()
    assert seen == pytest.approx([1, 1, 1, 0.8, 0.8, 0.64])
    o = _opt(1.0)
    s = LRSchedule(o, "step", step_size=1, gamma=0.5, warmup_steps=4)
    ramp = []
    for _ in range(4):
        ramp.append(o.param_groups[0]["lr"])
        s.step_update()
    assert ramp == [0.25, 0.5, 0.75, 1.0] and o.param_groups[0]["lr"] == 1.0
    s.step()
    assert o.param_groups[0]["lr"] == 0.5


def test_per_group_lr_scale_and_groups_added_later():
    o = _opt(0.1, groups=2)
    o.param_groups[1]["lr_scale"] = 0.1  # ESR: old groups at a tenth of the new branch's rate
    s = LRSchedule(o, "step", step_size=1, gamma=0.5)
    assert [g["lr"] for g in o.param_groups] == pytest.approx([0.1, 0.01])
    s.step()
    o.add_param_group({"params": [nn.Parameter(torch.zeros(1))], "lr": 0.2})
    s._apply()
    assert [g["lr"] for g in o.param_groups] == pytest.approx([0.05, 0.005, 0.1])
    o.param_groups[0]["lr_scale"] = 0.5  # a method may rescale a group at any time
    s.step()
    assert [g["lr"] for g in o.param_groups] == pytest.approx([0.0125, 0.0025, 0.05])


def test_retime_restart_and_resume():
    o = _opt(1.0)
    s = LRSchedule(o, "cosine", total_steps=10)
    for _ in range(5):
        s.step_update()
    mid = o.param_groups[0]["lr"]
    s.retime(20)
    assert o.param_groups[0]["lr"] > mid, "a longer run is earlier on its cosine"
    state = s.state_dict()
    o2 = _opt(1.0)
    s2 = LRSchedule(o2, "cosine", total_steps=20)
    s2.load_state_dict(state)
    assert o2.param_groups[0]["lr"] == o.param_groups[0]["lr"]
    s.restart(10)
    assert o.param_groups[0]["lr"] == 1.0
    with pytest.raises(TrainError, match="scheduler"):
        LRSchedule(_opt(), "plateau").load_state_dict(state)
    with pytest.raises(TrainError, match="validation split"):
        LRSchedule(_opt(), "plateau").step(None)
    with pytest.raises(TrainError, match="unknown scheduler"):
        LRSchedule(_opt(), "linear")


def test_stage_plan_shrinks_stages_in_proportion():
    plan = StagePlan([Stage("base", 50), Stage("branch2", 20), Stage("branch3", 20)])
    assert plan.total == 90 and plan.starts() == [1, 51, 71] and plan.index_at(51) == 1
    assert plan.fit(10, 45) == 45
    assert plan.lengths()[0] >= 10 and all(n >= 1 for n in plan.lengths())
    assert plan.lengths() == [25, 10, 10]
    # too little time left for the stages to come: each still gets one epoch (no stage is cut off)
    plan2 = StagePlan([Stage("a", 4), Stage("b", 2), Stage("c", 2)])
    assert plan2.fit(3, 3) == 5 and plan2.lengths() == [3, 1, 1]
    # resume: stages begun keep their lengths, stages to come take the plan's
    plan3 = StagePlan([Stage("a", 4), Stage("b", 2), Stage("c", 2)])
    plan3.resumed([3, 1, 1], 4)
    assert plan3.lengths() == [3, 1, 2]
    with pytest.raises(TrainError, match="at least 1"):
        StagePlan([Stage("a", 0)])


# ------------------------------------------------------------------------------ a staged method, end to end


class Staged(Method):
    """Three stages, a new head each (ESR-like), the schedule restarting with each stage."""

    name = "staged"
    stage_epochs = (4, 2, 2)

    def build_model(self, data):
        from ferengine.models import create_model

        self.arch, self.arch_kwargs = "fastcnn", {"num_classes": data.num_classes, "width": 0.25}
        self.started: list[tuple[int, int]] = []
        return create_model(self.arch, **self.arch_kwargs)

    def stages(self):
        return [Stage(f"s{i}", n, restart_schedule=i > 0) for i, n in enumerate(self.stage_epochs)]

    def on_stage_start(self, index, stage):
        self.started.append((index, self.trainer.epoch + 1))
        for g in self.trainer.optimizers["main"].param_groups:
            g["lr_scale"] = 1.0 if index == 0 else 0.1
        self.trainer.schedules["main"]._apply()

    def training_step(self, batch):
        out = self.model(batch.input)
        return {"loss": nn.functional.cross_entropy(out["logits"], batch.label)}


def test_time_budget_shrinks_every_stage_instead_of_cutting_the_last(tmp_path, monkeypatch):
    from test_engine import patterns
    from trainers.engine import logs

    now = [0.0]
    monkeypatch.setattr(logs, "clock", lambda: now[0])

    class TenSeconds:
        def on_epoch_end(self, trainer, epoch, row):
            now[0] += 10.0

    cfg = TrainConfig(out=str(tmp_path / "run"), batch_size=16, lr=0.05, scheduler="cosine", tensorboard=False,
                      bench_batches=0, time_budget=45.0)
    tr = Trainer(cfg, Staged, datasets=(patterns(64, 0), patterns(32, 1)), callbacks=[TenSeconds()])
    tr.fit()
    rows = list(csv.DictReader((tmp_path / "run" / "metrics.csv").open()))
    assert len(rows) <= 6, "the budget (about 4-5 epochs of 10 s) was kept"
    assert [int(r["stage"]) for r in rows][-1] == 2, "the last stage still ran"
    assert [i for i, _ in tr.method.started] == [0, 1, 2]
    # each stage restarts its cosine at the stage's own lr (scaled 0.1 after the first)
    first = {int(r["stage"]): float(r["lr"]) for r in reversed(rows)}
    assert first[1] == pytest.approx(0.005) and first[2] == pytest.approx(0.005)
