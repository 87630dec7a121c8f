"""trainers.esr (trainers/methods/esr.py): eq. 4's loss by hand (CE summed over the branches minus D_ch + D_sp
of eq. 1 with its diagonal of 1, D_ch from the *channel* attention, not the fork's spatial one; upstream ESR's AV
MSE per branch), the staged training (a branch per stage at --lr, the base and older branches at --old-lr, the
best ensemble of every stage kept), --plain and --no-cbam, and the majority and mean votes of the checkpoint.

Two tiny runs on a FER2013 fixture (96 training faces, 64 px, width 0.125) are shared by the tests below."""
from __future__ import annotations

import csv
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import write_fer2013
from ferengine import checkpoint as ck
from ferengine.graph import InferenceModule
from ferengine.models.esr import CBAM
from ferengine.preprocess import to_model_input
from trainers.engine import TrainError, Trainer, parse_config
from trainers.losses.ce import va_loss
from trainers.methods import run
from trainers.methods.esr import ESRMethod, esr_loss

COMMON = ["--workers", "0", "--no-tensorboard", "--bench-batches", "0"]
TINY = ["--width", "0.125", "--reduction", "4", "--input-size", "64", "--batch-size", "8", *COMMON]
GAMMA = 10.0


# ------------------------------------------------------------------------------------ eq. 4 by hand


def _ce(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean cross-entropy of one branch over the labelled faces (label >= 0)."""
    keep = labels >= 0
    z = logits[keep] - logits[keep].max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    return float(-logp[np.arange(keep.sum()), labels[keep]].mean())


def _det_similarity(att: np.ndarray, gamma: float) -> float:
    """det S of eq. 1 for (N, B, D) attention: S_lk = mean_i exp(-gamma ||a_il - a_ik||^2), S_ll = 1."""
    n, b, _ = att.shape
    s = np.ones((b, b))
    for l in range(b):
        for k in range(b):
            if l != k:
                s[l, k] = np.mean([math.exp(-gamma * float(((att[i, l] - att[i, k]) ** 2).sum())) for i in range(n)])
    return float(np.linalg.det(s))


def _out(n: int = 6, b: int = 3, k: int = 5, c: int = 9, hw: int = 9, seed: int = 0) -> dict[str, torch.Tensor]:
    """An ESR forward's training outputs: logits and attention maps close enough (0.5 +- 0.05) for gamma 10 to
    give S far from the identity."""
    g = torch.Generator().manual_seed(seed)
    return {"branch_logits": torch.randn(n, b, k, generator=g, dtype=torch.float64),
            "channel_attention": 0.5 + 0.05 * torch.randn(n, b, c, generator=g, dtype=torch.float64),
            "spatial_attention": 0.5 + 0.05 * torch.randn(n, b, hw, generator=g, dtype=torch.float64)}


LABELS = torch.tensor([0, 3, 1, -1, 4, 2])   # one unlabelled face (ignored by the CE)


def _hand(out, labels, kinds) -> tuple[float, float, float, float]:
    """(loss, sum of CEs, D_ch, D_sp) by hand."""
    lg, y = out["branch_logits"].numpy(), labels.numpy()
    ce = sum(_ce(lg[:, b], y) for b in range(lg.shape[1]))
    d_ch = _det_similarity(out["channel_attention"].numpy(), GAMMA) if lg.shape[1] > 1 else 0.0
    d_sp = _det_similarity(out["spatial_attention"].numpy(), GAMMA) if lg.shape[1] > 1 else 0.0
    loss = ce - ("channel" in kinds) * d_ch - ("spatial" in kinds) * d_sp
    return loss, ce, d_ch, d_sp


def test_esr_loss_is_eq4_by_hand():
    out = _out()
    loss, ce, d_ch, d_sp = _hand(out, LABELS, ("channel", "spatial"))
    assert 0.05 < d_ch < 0.95 and 0.05 < d_sp < 0.95 and abs(d_ch - d_sp) > 1e-3   # a non-trivial example
    got = esr_loss(out, LABELS, None, gamma=GAMMA, kinds=("channel", "spatial"))
    assert float(got["loss"]) == pytest.approx(loss, rel=1e-6)
    assert float(got["d_channel"]) == pytest.approx(d_ch, rel=1e-6)
    assert float(got["d_spatial"]) == pytest.approx(d_sp, rel=1e-6)
    assert float(got["ce"]) == pytest.approx(ce / 3, rel=1e-6)                      # logged per branch
    assert "va_mse" not in got

    # --diversity spatial: only D_sp is subtracted
    sp = esr_loss(out, LABELS, None, gamma=GAMMA, kinds=("spatial",))
    assert float(sp["loss"]) == pytest.approx(ce - d_sp, rel=1e-6) and "d_channel" not in sp
    # --no-diversity: the CEs alone
    none = esr_loss(out, LABELS, None, gamma=GAMMA, kinds=())
    assert float(none["loss"]) == pytest.approx(ce, rel=1e-6) and not any(k.startswith("d_") for k in none)

    # one branch: no diversity term, whatever kinds says
    one = {k: v[:, :1] for k, v in out.items()}
    l1, ce1, _, _ = _hand(one, LABELS, ())
    got1 = esr_loss(one, LABELS, None, gamma=GAMMA, kinds=("channel", "spatial"))
    assert float(got1["loss"]) == pytest.approx(ce1, rel=1e-6) == l1
    assert not any(k.startswith("d_") for k in got1)

    # the loss is differentiable through the attention (the diversity term reaches the branches)
    att = out["channel_attention"].clone().requires_grad_(True)
    esr_loss({**out, "channel_attention": att}, LABELS, None, gamma=GAMMA, kinds=("channel",))["loss"].backward()
    assert att.grad is not None and float(att.grad.abs().sum()) > 0


def test_channel_diversity_comes_from_the_channel_attention():
    """The fork's FER+ script computes the "channel" diversity from the spatial attention; ours must not."""
    out = _out()
    loss, ce, d_ch, d_sp = _hand(out, LABELS, ("channel", "spatial"))
    got = float(esr_loss(out, LABELS, None, gamma=GAMMA, kinds=("channel", "spatial"))["loss"])
    fork = ce - 2 * d_sp                                   # criterion_div(attn_sp, type='channel') + D_sp
    assert abs(loss - fork) > 1e-3
    assert got == pytest.approx(loss, rel=1e-6) and got != pytest.approx(fork, rel=1e-6)

    # changing only the channel attention changes the loss (by the change of D_ch, by hand)...
    moved = {**out, "channel_attention": 0.5 + 0.5 * (out["channel_attention"] - 0.5)}
    l2, _, d_ch2, _ = _hand(moved, LABELS, ("channel", "spatial"))
    got2 = float(esr_loss(moved, LABELS, None, gamma=GAMMA, kinds=("channel", "spatial"))["loss"])
    assert abs(got2 - got) > 1e-3 and got2 == pytest.approx(l2, rel=1e-6)
    # ... and with kinds=("channel",) the spatial attention does not count at all
    ch = esr_loss(out, LABELS, None, gamma=GAMMA, kinds=("channel",))
    ch_sp = esr_loss({**out, "spatial_attention": torch.rand_like(out["spatial_attention"])}, LABELS, None,
                     gamma=GAMMA, kinds=("channel",))
    assert float(ch["loss"]) == pytest.approx(ce - d_ch, rel=1e-6) == float(ch_sp["loss"])
    # swapping the spatial values into channel_attention gives another number: D_ch is read from channel_attention
    swapped = esr_loss({**out, "channel_attention": out["spatial_attention"]}, LABELS, None, gamma=GAMMA,
                       kinds=("channel",))
    assert float(swapped["loss"]) == pytest.approx(ce - d_sp, rel=1e-6)
    assert abs(float(swapped["loss"]) - float(ch["loss"])) > 1e-3


def test_diversity_without_attention_is_a_train_error():
    out = {"branch_logits": _out()["branch_logits"]}                    # --no-cbam: no attention maps
    with pytest.raises(TrainError, match="needs CBAM"):
        esr_loss(out, LABELS, None, gamma=GAMMA, kinds=("channel",))
    assert float(esr_loss(out, LABELS, None, gamma=GAMMA, kinds=())["loss"]) == pytest.approx(
        _hand(_out(), LABELS, ())[1], rel=1e-6)


def test_esr_loss_adds_the_av_mse_of_every_branch():
    """Upstream ESR's AV head: each branch's MSE to the valence/arousal targets (missing ones ignored), weighted."""
    out = _out()
    g = torch.Generator().manual_seed(1)
    out["branch_va"] = torch.tanh(torch.randn(6, 3, 2, generator=g, dtype=torch.float64))
    va = torch.tanh(torch.randn(6, 2, generator=g, dtype=torch.float64))
    va[2, 1] = float("nan")                                              # a face without arousal
    loss, _, _, _ = _hand(out, LABELS, ("channel", "spatial"))
    per_branch = [float(va_loss(out["branch_va"][:, b], va)) for b in range(3)]
    # va_loss by hand: the squared errors of the 11 finite targets, averaged
    ok = torch.isfinite(va)
    by_hand = [float(((out["branch_va"][:, b] - va)[ok] ** 2).sum() / ok.sum()) for b in range(3)]
    assert per_branch == pytest.approx(by_hand, rel=1e-6)
    assert len(set(np.round(per_branch, 6))) == 3                        # the branches differ: each one counts
    for w in (1.0, 0.25):
        got = esr_loss(out, LABELS, va, gamma=GAMMA, kinds=("channel", "spatial"), va_weight=w)
        assert float(got["loss"]) == pytest.approx(loss + w * sum(by_hand), rel=1e-6)
        assert float(got["va_mse"]) == pytest.approx(sum(by_hand) / 3, rel=1e-6)
    # no targets (data without AV): no AV term even though the model has the head
    assert float(esr_loss(out, LABELS, None, gamma=GAMMA, kinds=("channel", "spatial"))["loss"]) == \
        pytest.approx(loss, rel=1e-6)


# ------------------------------------------------------------------------------------ the options


def test_options_choose_cbam_and_diversity(tmp_path):
    def method(*extra):
        return ESRMethod(parse_config(ESRMethod, ["--data", "fer2013", "--out", str(tmp_path / "o"), *extra]))

    assert method().kinds == ("channel", "spatial") and method().opts.cbam
    assert method("--diversity", "spatial").kinds == ("spatial",)
    assert method("--no-diversity").kinds == () and method("--no-diversity").opts.cbam
    plain = method("--plain")
    assert plain.kinds == () and not plain.opts.cbam
    assert method("--no-cbam", "--no-diversity").kinds == ()
    with pytest.raises(TrainError, match="--no-cbam needs"):
        method("--no-cbam")
    with pytest.raises(TrainError, match="--diversity"):
        method("--diversity", "temporal")


def _esr_method(tmp_path, vote: str):
    """An ESRMethod (its real __init__ from the flags) around a random ESR-3 whose branches disagree: their fc
    biases centre their class scores on the test inputs, so that each branch's arg-max follows its own random
    projection of the input."""
    from types import SimpleNamespace

    from ferengine.models import create_model

    method = ESRMethod(parse_config(ESRMethod, ["--data", "fer2013", "--out", str(tmp_path / "o"), "--vote", vote]))
    torch.manual_seed(0)
    model = create_model("esr", num_classes=4, in_chans=1, branches=3, width=0.125, reduction=4, vote=vote)
    with torch.no_grad():
        model(_faces())                                                   # BN statistics of these inputs
        model.eval()
        lg = model(_faces())["branch_logits"]
        for k, b in enumerate(model.branches):                            # centre each branch's class scores
            b.fc.bias.sub_(lg[:, k].mean(0))
    method.trainer = SimpleNamespace(model=model)
    return method, model


def _faces(n: int = 48) -> torch.Tensor:
    """Inputs that differ in level and contrast face by face (random noise alone pools to the same features)."""
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, 1, 1, generator=g) + torch.rand(n, 1, 1, 1, generator=g) * torch.rand(
        n, 1, 64, 64, generator=g) * 4


@pytest.mark.parametrize("vote", ["majority", "mean"])
def test_eval_step_reports_the_vote_the_mean_and_every_branch(vote, tmp_path):
    from trainers.data.batches import Batch
    from trainers.evaluate import evaluate

    method, model = _esr_method(tmp_path, vote)
    x = _faces()
    with torch.no_grad():
        lg = model(x)["branch_logits"]
    votes = lg.argmax(-1)                                                 # (N, 3)
    assert (votes[:, 0] != votes[:, 1]).any() and (votes[:, 1] != votes[:, 2]).any()   # they do disagree
    counts = torch.stack([(votes == k).sum(1) for k in range(4)], 1).float()
    mean = torch.softmax(lg, -1).mean(1)
    with torch.no_grad():
        res = method.eval_step(Batch([x], torch.zeros(48, dtype=torch.long), torch.arange(48)))
    assert torch.allclose(res["logits_mean"], mean, atol=1e-6)
    for b in range(3):
        assert torch.equal(res[f"logits_b{b + 1}"], lg[:, b])
    assert torch.allclose(res["probs"], counts / 3 if vote == "majority" else mean, atol=1e-6)
    assert ("logits_majority" in res) == (vote == "mean")
    if vote == "mean":
        assert torch.equal(res["logits_majority"], counts / 3)

    # through trainers.evaluate: labels where the majority, the mean and the branches score differently
    y = torch.where(torch.arange(48) % 2 == 0, votes[:, 0], mean.argmax(1))
    m = evaluate(method.eval_step, [Batch([x], y, torch.arange(48))], ["a", "b", "c", "d"], quiet=True)
    acc = lambda pred: pytest.approx(100.0 * float((pred == y).double().mean()), abs=1e-6)  # noqa: E731
    hand = {"majority": counts.argmax(1), "mean": mean.argmax(1), **{f"b{b + 1}": votes[:, b] for b in range(3)}}
    assert len({float((p == y).float().mean()) for p in hand.values()}) >= 3   # the metrics can tell them apart
    assert m["accuracy"] == acc(hand[vote])
    for name in ("mean", "b1", "b2", "b3"):
        assert m[f"accuracy_{name}"] == acc(hand[name]), name
    if vote == "mean":
        assert m["accuracy_majority"] == acc(hand["majority"])


# ------------------------------------------------------------------------------------ training runs


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("esr")
    write_fer2013(tmp / "data" / "fer2013", n_train=96, n_val=32)
    return {"tmp": tmp, "data": tmp / "data", "cache": tmp / "cache"}


def _argv(env, out: Path, *extra: str) -> list[str]:
    return ["--data", "fer2013", "--data-dir", str(env["data"]), "--out", str(out), *TINY, *extra]


class GroupLog:
    """The main optimiser's groups (lr, lr_scale) and the model's branches at the first step of every epoch."""

    def __init__(self):
        self.epochs: dict[int, dict] = {}

    def on_step_end(self, trainer, epoch, step):
        if step == 1:
            opt = trainer.optimizers["main"]
            self.epochs[epoch] = {"groups": [(g["lr"], g["lr_scale"]) for g in opt.param_groups],
                                  "branches": len(trainer.model.branches),
                                  "last_is_newest": [id(p) for p in opt.param_groups[-1]["params"]] ==
                                                    [id(p) for p in trainer.model.branches[-1].parameters()]}


class _Messages(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def staged(env):
    """Diversified ESR-3 with the majority vote: 2 epochs of branch 1, then 1 epoch per added branch."""
    out = env["tmp"] / "staged"
    cb = GroupLog()
    messages = _Messages()
    esr_log = logging.getLogger("trainers.esr")
    level = esr_log.level
    esr_log.addHandler(messages)
    esr_log.setLevel(logging.INFO)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FER_DESKTOP_CACHE", str(env["cache"]))
        cfg = parse_config(ESRMethod, _argv(env, out, "--branches", "3", "--first-epochs", "2", "--branch-epochs",
                                            "1", "--vote", "majority"))
        tr = Trainer(cfg, ESRMethod, callbacks=[cb], argv=["pytest"])
        try:
            tr.fit()
        finally:
            esr_log.removeHandler(messages)
            esr_log.setLevel(level)
    with open(out / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    return {"out": out, "trainer": tr, "groups": cb.epochs, "rows": rows, "log": "\n".join(messages.lines)}


@pytest.fixture(scope="module")
def plain_mean(env):
    """Upstream (plain) ESR-2 with the mean vote, through the command line."""
    out = env["tmp"] / "plain"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FER_DESKTOP_CACHE", str(env["cache"]))
        assert run("esr", _argv(env, out, "--plain", "--branches", "2", "--first-epochs", "1", "--branch-epochs",
                                "1", "--vote", "mean")) == 0
    with open(out / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    return {"out": out, "rows": rows}


def test_staged_training_adds_a_branch_per_stage(staged):
    out, rows = staged["out"], staged["rows"]
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    assert [int(r["stage"]) for r in rows] == [0, 0, 1, 2]
    # best.safetensors: the whole ensemble (each stage selects its own best); the earlier stages' bests kept
    best = ck.load(out / "best.safetensors")
    assert best.info.arch == "esr" and best.info.arch_kwargs["branches"] == 3 and len(best.model.branches) == 3
    for k in (1, 2):
        kept = ck.load(out / f"best_esr{k}.safetensors")
        assert kept.info.arch_kwargs["branches"] == k and len(kept.model.branches) == k
    assert not (out / "best_esr3.safetensors").exists()
    # the diversity term is subtracted once there are two branches: loss = B x mean CE - D_ch - D_sp
    for r, b in zip(rows, (1, 1, 2, 3)):
        want = b * float(r["train_ce"]) - sum(float(r[f"train_d_{k}"] or 0) for k in ("channel", "spatial"))
        assert float(r["train_loss"]) == pytest.approx(want, rel=1e-4, abs=1e-5)
    assert all(not r["train_d_channel"] for r in rows[:2]) and all(r["train_d_spatial"] for r in rows[2:])


def test_new_branch_trains_at_lr_and_the_rest_at_old_lr(staged):
    rows, groups, tr = staged["rows"], staged["groups"], staged["trainer"]
    # metrics.csv's lr is group 0's (the base): --lr in stage 1, --old-lr afterwards
    assert [float(r["lr"]) for r in rows] == pytest.approx([0.1, 0.1, 0.01, 0.01])
    log = staged["log"]                                                  # trainers.esr's log lines
    assert "branch 2 added (lr 0.1; base and branches 1-1 at 0.01)" in log
    assert "branch 3 added (lr 0.1; base and branches 1-2 at 0.01)" in log
    # every epoch: base + one group per branch; the newest branch at 0.1 (scale 1), the others at 0.01
    want = {1: [0.1, 0.1], 2: [0.1, 0.1], 3: [0.01, 0.01, 0.1], 4: [0.01, 0.01, 0.01, 0.1]}
    for epoch, lrs in want.items():
        g = groups[epoch]
        assert g["branches"] == len(lrs) - 1 and g["last_is_newest"], epoch
        assert [lr for lr, _ in g["groups"]] == pytest.approx(lrs), epoch
    opt = tr.optimizers["main"]
    assert [g["lr_scale"] for g in opt.param_groups] == pytest.approx([0.1, 0.1, 0.1, 1.0])
    # every parameter of the model is trained, once
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in tr.model.parameters()}
    assert all(opt.param_groups[-1]["params"][i] is p for i, p in enumerate(tr.model.branches[-1].parameters()))


def _val_faces(env, spec):
    from trainers.data import load_dataset

    ds = load_dataset("fer2013", env["data"], "publictest")
    return torch.from_numpy(to_model_input(ds.images.numpy(), spec)), ds.labels.numpy()


def test_majority_vote_checkpoint_and_branch_metrics(staged, env):
    loaded = ck.load(staged["out"] / "last.safetensors")                 # epoch 4's ensemble
    assert loaded.model.vote == "majority" and loaded.info.arch_kwargs["vote"] == "majority"
    x, y = _val_faces(env, loaded.spec)
    with torch.no_grad():
        (probs,) = InferenceModule(loaded.model)(x)
        logits = loaded.model(x)["branch_logits"].numpy()                # (N, 3, K)
    votes = logits.argmax(-1)
    counts = np.stack([(votes == k).sum(1) for k in range(logits.shape[-1])], 1)
    assert np.array_equal(probs.numpy() * 3, counts)                     # vote fractions: multiples of 1/3
    assert np.allclose(probs.numpy().sum(1), 1)
    # validation: accuracy is the majority's, accuracy_mean the softmax mean's, accuracy_b<k> branch k's
    row = staged["rows"][-1]
    acc = lambda pred: pytest.approx(100.0 * float((pred == y).mean()), abs=1e-6)  # noqa: E731
    assert float(row["val_accuracy"]) == acc(counts.argmax(1))
    mean = torch.softmax(torch.from_numpy(logits), -1).mean(1).numpy()
    assert float(row["val_accuracy_mean"]) == acc(mean.argmax(1))
    for b in range(3):
        assert float(row[f"val_accuracy_b{b + 1}"]) == acc(votes[:, b])
    assert not staged["rows"][0]["val_accuracy_b2"] and staged["rows"][2]["val_accuracy_b2"]
    assert "val_accuracy_majority" not in row                            # the main accuracy already is


def test_mean_vote_checkpoint(plain_mean, env):
    rows = plain_mean["rows"]
    loaded = ck.load(plain_mean["out"] / "best.safetensors")
    assert loaded.model.vote == "mean" and len(loaded.model.branches) == 2
    x, y = _val_faces(env, loaded.spec)
    with torch.no_grad():
        (probs,) = InferenceModule(loaded.model)(x)
        logits = loaded.model(x)["branch_logits"]
    assert torch.allclose(probs, torch.softmax(logits, -1).mean(1), atol=1e-6)
    assert not torch.allclose(probs * 2, (probs * 2).round(), atol=1e-3)   # not vote fractions
    # with the mean vote, the majority's accuracy is reported beside it
    last = ck.load(plain_mean["out"] / "last.safetensors")
    with torch.no_grad():
        lg = last.model(x)["branch_logits"].numpy()
    mean = torch.softmax(torch.from_numpy(lg), -1).mean(1).numpy()
    assert float(rows[-1]["val_accuracy"]) == pytest.approx(100.0 * float((mean.argmax(1) == y).mean()), abs=1e-6)
    assert float(rows[-1]["val_accuracy_mean"]) == float(rows[-1]["val_accuracy"])
    assert rows[-1]["val_accuracy_majority"] and rows[-1]["val_accuracy_b1"] and rows[-1]["val_accuracy_b2"]


def test_plain_builds_no_cbam_and_subtracts_no_diversity(plain_mean):
    rows = plain_mean["rows"]
    loaded = ck.load(plain_mean["out"] / "best.safetensors")
    assert loaded.info.arch_kwargs["cbam"] is False
    assert not any(isinstance(m, CBAM) for m in loaded.model.modules())
    assert [int(r["stage"]) for r in rows] == [0, 1]
    assert not any(k.startswith("train_d_") for k in rows[0]), sorted(rows[0])
    for r, b in zip(rows, (1, 2)):                                       # the CEs of the branches, nothing else
        assert float(r["train_loss"]) == pytest.approx(b * float(r["train_ce"]), rel=1e-5)


def test_no_cbam_with_diversity_is_refused(env, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FER_DESKTOP_CACHE", str(env["cache"]))
    out = tmp_path / "nocbam"
    capsys.readouterr()
    assert run("esr", _argv(env, out, "--no-cbam", "--branches", "2", "--first-epochs", "1", "--branch-epochs",
                            "1")) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1 and "--no-cbam needs --no-diversity" in lines[0], err
    assert not (out / "best.safetensors").exists()
