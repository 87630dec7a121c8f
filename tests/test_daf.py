"""DAF-CNN: the architecture (block depths, BN, widths, attention order, the NOatt ablation, [0,1] input) and
``python -m trainers.daf`` end to end on tiny fixtures in the real formats (fer2013.csv, SFEW folders):
paper defaults per dataset, a training run whose checkpoint opens in ``fer eval``/``fer predict``, the
centres saved and restored on resume, ``--eval-only``, ``--no-tc``, SFEW fine-tuning with ``--init``."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from conftest import write_fer2013
from ferengine import checkpoint as ck
from ferengine.labels import LABEL_SETS
from ferengine.models import create_model
from ferengine.models.daf import Attention3D, ChannelAttention, SpatialAttention
from trainers.daf import DAF
from trainers.engine import Trainer, parse_config
from trainers.methods import run


def main(argv):
    return run("daf", argv)


ROOT = Path(__file__).resolve().parents[1]
# a tiny DAF-CNN: widths 8-16-32-64-64, 32 px input (2x2 map at the attention), 32-d embedding
TINY = ["--input-size", "32", "--width", "0.125", "--embedding-dim", "32", "--no-tensorboard", "--bench-batches", "0"]


# ------------------------------------------------------------------------------------------ model


def test_architecture_as_the_paper_describes():
    m = create_model("daf_cnn")
    assert m.default_input == {"size": 96, "channels": 1, "mean": (0.0,), "std": (1.0,)}, "96x96 grey in [0, 1]"
    convs = [[l for l in b if isinstance(l, nn.Conv2d)] for b in m.blocks]
    assert [len(c) for c in convs] == [3, 3, 4, 4, 4]
    assert [c[0].out_channels for c in convs] == [64, 128, 256, 512, 512]
    for b in m.blocks:  # every conv is followed by BN (+ReLU)
        layers = list(b)
        for i, l in enumerate(layers):
            if isinstance(l, nn.Conv2d):
                assert isinstance(layers[i + 1], nn.BatchNorm2d) and isinstance(layers[i + 2], nn.ReLU)
    pools = [isinstance(list(b)[-1], nn.MaxPool2d) for b in m.blocks]
    assert pools == [True, True, True, True, False], "pooling between the five blocks"
    att = m.attention
    assert isinstance(att, Attention3D)
    assert (att.channel.fc1.in_features, att.channel.fc1.out_features) == (512, 64), "reduction r = 8"
    assert att.spatial.conv.kernel_size == (7, 7) and att.spatial.conv.in_channels == 2
    assert m.fc1[1].in_features == 512 * 6 * 6 and m.feature_dim == 512
    assert isinstance(m.fc1[0], nn.Dropout) and m.fc1[0].p == 0.5 and m.head.dropout.p == 0.5
    n = sum(p.numel() for p in m.parameters())
    assert 29_000_000 < n < 30_500_000


def test_attention_is_channel_then_spatial():
    torch.manual_seed(0)
    att = Attention3D(16, reduction=8, kernel_size=7).eval()
    x = torch.randn(3, 16, 6, 6)
    with torch.no_grad():
        ac = att.channel(x)
        assert ac.shape == (3, 16, 1, 1) and bool(((ac > 0) & (ac < 1)).all())
        m1 = ac * x                                        # eq. 4
        as_ = att.spatial(m1)
        assert as_.shape == (3, 1, 6, 6)
        expected = as_ * m1                                # eq. 5
        torch.testing.assert_close(att(x), expected)
        reverse = att.channel(att.spatial(x) * x) * (att.spatial(x) * x)
        assert not torch.allclose(att(x), reverse), "the order matters, and it is channel first"
        # eq. 1: avg- and max-pooled vectors through ONE shared MLP, summed, sigmoid
        ch = att.channel
        torch.testing.assert_close(ac[:, :, 0, 0], torch.sigmoid(ch.fc2(torch.relu(ch.fc1(x.mean((2, 3)))))
                                                                  + ch.fc2(torch.relu(ch.fc1(x.amax((2, 3)))))))
        # eq. 3: channel-wise mean and max maps -> 7x7 conv -> sigmoid
        maps = torch.cat([m1.mean(1, keepdim=True), m1.amax(1, keepdim=True)], 1)
        torch.testing.assert_close(as_, torch.sigmoid(att.spatial.conv(maps)))


def test_model_applies_attention_between_backbone_and_fc():
    torch.manual_seed(0)
    m = create_model("daf_cnn", width=0.125, input_size=32, embedding_dim=16).eval()
    seen = {}
    m.attention.channel.register_forward_hook(lambda mod, inp, out: seen.update(att_in=inp[0]))
    m.fc1.register_forward_hook(lambda mod, inp, out: seen.update(fc_in=inp[0], emb_pre=out))
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        out = m(x)
        f = m.forward_features(x)
        torch.testing.assert_close(seen["att_in"], f["block5"])
        torch.testing.assert_close(f["refined"], m.attention(f["block5"]), msg="refined = Attention3D(block5)")
        torch.testing.assert_close(f["attention_channel"], m.attention.channel(f["block5"]))
    torch.testing.assert_close(seen["fc_in"], f["refined"].flatten(1))
    torch.testing.assert_close(out["embedding"], torch.relu(seen["emb_pre"]), msg="embedding = FC_1 output")
    assert out["logits"].shape == (2, 7) and out["embedding"].shape == (2, 16)


def test_no_attention_removes_the_module():
    with_att = create_model("daf_cnn", width=0.125, input_size=32)
    without = create_model("daf_cnn", width=0.125, input_size=32, attention=False)
    assert isinstance(without.attention, nn.Identity)
    assert not any(k.startswith("attention.") for k in without.state_dict())
    n_att = sum(p.numel() for p in with_att.attention.parameters())
    assert n_att > 0
    assert sum(p.numel() for p in with_att.parameters()) - sum(p.numel() for p in without.parameters()) == n_att
    for mod in without.modules():
        assert not isinstance(mod, (ChannelAttention, SpatialAttention))
    seen = {}
    without.fc1.register_forward_hook(lambda mod, inp, out: seen.update(fc_in=inp[0]))
    x = torch.rand(2, 1, 32, 32)
    without.eval()
    with torch.no_grad():
        without(x)
        torch.testing.assert_close(seen["fc_in"], without.forward_features(x)["block5"].flatten(1))


def test_model_options():
    m = create_model("daf_cnn", width=0.125, input_size=32, head_pool="avg", embedding_relu=False,
                     attention_mlp_act="none").eval()
    assert m.fc1[1].in_features == 64 and isinstance(m.attention.channel.act, nn.Identity)
    with torch.no_grad():
        out = m(torch.rand(2, 1, 32, 32))
    assert (out["embedding"] < 0).any(), "embedding before the ReLU"
    with pytest.raises(ValueError):
        create_model("daf_cnn", head_pool="max")
    with pytest.raises(ValueError):
        create_model("daf_cnn", input_size=8)


# --------------------------------------------------------------------------------------- fixtures


def write_sfew(folder: Path, per_class: int = 2, seed: int = 1) -> Path:
    """SFEW 2.0 layout: Train/<Emotion>/*.png and Val/<Emotion>/*.png (RGB faces)."""
    rng = np.random.default_rng(seed)
    root = folder / "SFEW_2.0"
    for split in ("Train", "Val"):
        for emo in ("Angry", "Disgust", "Fear", "Happy", "Neutral", "Sad", "Surprise"):
            d = root / split / emo
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                cv2.imwrite(str(d / f"{emo}_{i}.png"), rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    return folder


@pytest.fixture
def fer_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FER_DESKTOP_CACHE", str(tmp_path / "cache"))
    write_fer2013(tmp_path / "data", n_train=96, n_private=16)
    return tmp_path / "data"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two epochs of ``python -m trainers.daf --data fer2013`` at a tiny size (shared by several tests), long
    enough (48 steps of 8) that the model's outputs depend on its input (asserted where it matters)."""
    tmp = tmp_path_factory.mktemp("daf")
    data = write_fer2013(tmp / "data", n_train=192, n_private=16).parent
    out = tmp / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FER_DESKTOP_CACHE", str(tmp / "cache"))
        argv = ["--data", "fer2013", "--data-dir", str(data), "--epochs", "2", "--batch-size", "8",
                "--tc-start", "1", "--out", str(out), *TINY]  # the default recipe, CE then TC, shortened
        assert main(argv) == 0
    return {"out": out, "data": data, "argv": argv, "cache": tmp / "cache"}


# -------------------------------------------------------------------------------------------- CLI


def _cfg(argv):
    return parse_config(DAF, argv)


def test_paper_defaults_per_dataset():
    c = _cfg([])
    assert (c.optimizer, c.lr, c.min_lr, c.scheduler) == ("adam", 1e-3, 1e-5, "plateau")
    assert (c.plateau_patience, c.plateau_threshold, c.plateau_factor, c.reload_best) == (13, 0.05, 0.2, True)
    assert (c.batch_size, c.extra["margin"], c.extra["lam"], c.extra["stage"]) == (128, 11.0, 0.007, "tc")
    assert c.extra["centre_init_std"] == 0.01 and c.label_smoothing == 0.0 and c.best_metric == "accuracy"
    # the default reading of TC (trainers/methods/daf.py, docs/daf-reproduction.md): 8 epochs of CE, then
    # eq. 9 as printed (the sum) with the centres at the class means; the other readings stay options
    assert (c.extra["tc_reduction"], c.extra["tc_start"], c.extra["centre_init"]) == ("sum", 8.0, "means")
    assert _cfg(["--tc-reduction", "mean"]).extra["tc_reduction"] == "mean"
    assert _cfg(["--tc-start", "0", "--centre-init", "normal"]).extra["centre_init"] == "normal"
    s = _cfg(["--data", "sfew"])
    assert (s.batch_size, s.extra["margin"], s.extra["lam"]) == (32, 13.0, 0.013)
    assert s.extra["tc_start"] == 0.0, "SFEW fine-tunes a pre-trained --init model: TC from the start"
    assert _cfg(["--data", "sfew", "--tc-start", "2"]).extra["tc_start"] == 2.0
    assert (s.optimizer, s.lr, s.plateau_patience) == ("adam", 1e-3, 13)
    assert _cfg(["--data", "sfew", "--batch-size", "64", "--margin", "5"]).batch_size == 64
    assert _cfg(["--data", "SFEW2", "--margin", "5"]).extra["margin"] == 5.0
    assert _cfg(["--no-tc"]).extra["stage"] == "ce" and _cfg(["--stage", "ce"]).extra["stage"] == "ce"
    assert _cfg(["--no-attention"]).extra["attention"] is False and _cfg([]).extra["attention"] is None


def test_help_lists_the_method_flags():
    r = subprocess.run([sys.executable, "-m", "trainers.daf", "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    for flag in ("--no-attention", "--no-tc", "--stage", "--init", "--margin", "--lam", "--centre-lr",
                 "--eval-only", "--data", "--epochs", "--resume"):
        assert flag in r.stdout


def test_training_run_writes_a_checkpoint_the_app_loads(trained, capsys, monkeypatch):
    out = trained["out"]
    loaded = ck.load(out / "best.safetensors")
    assert loaded.info.arch == "daf_cnn" and loaded.info.labels == list(LABEL_SETS["fer7"])
    assert loaded.info.arch_kwargs["attention"] is True and loaded.info.arch_kwargs["input_size"] == 32
    spec = loaded.spec
    assert (spec.size, spec.channels, spec.mean, spec.std) == (32, 1, (0.0,), (1.0,))
    assert "trainers.daf" in loaded.info.training["command"]
    # the checkpoint's network is the training network (best_state.pt, with its centres beside it)
    best = torch.load(out / "best_state.pt", weights_only=True)
    assert best["method"]["centres"].shape == (7, 32)
    net = create_model("daf_cnn", **loaded.info.arch_kwargs).eval()
    net.load_state_dict(best["model"])
    x = torch.rand(5, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(net(x)["logits"], loaded.model(x)["logits"])
    assert not any("centres" in k for k in loaded.model.state_dict()), "centres are training-only state"
    # what the training run measured is what `fer eval` measures with the checkpoint alone
    from ferengine.cli import main as fer

    monkeypatch.setenv("FER_DESKTOP_CACHE", str(trained["cache"]))
    js = out.parent / "fer_eval.json"
    assert fer(["eval", "--data", "fer2013", "--data-dir", str(trained["data"]), "--split", "publictest",
                "-c", str(out / "best.safetensors"), "--backend", "torch", "--json", str(js), "-q"]) == 0
    with open(out / "metrics.csv", newline="") as fh:
        row = next(r for r in csv.DictReader(fh) if int(r["epoch"]) == loaded.info.training["epoch"])
    res = json.loads(js.read_text())
    assert res["accuracy"] == pytest.approx(float(row["val_accuracy"]), abs=1e-9)
    assert res["loss"] == pytest.approx(float(row["val_loss"]), rel=1e-6)
    # and the app's preprocessing (numpy faces, 48 px resized to the model's 32) with the checkpoint's input
    # spec gives the training run's validation loss: one arithmetic
    from ferengine.preprocess import to_model_input
    from trainers.data import load_dataset

    ds = load_dataset("fer2013", trained["data"], "publictest")
    with torch.no_grad():
        logits = loaded.model(torch.from_numpy(to_model_input(ds.images.numpy(), spec)))["logits"]
    assert float(logits.std(0).max()) > 1e-2, "a model whose logits ignore the input proves nothing here"
    assert len(set(logits.argmax(1).tolist())) > 1
    ce = torch.nn.functional.cross_entropy(logits, ds.labels).item()
    assert ce == pytest.approx(float(row["val_loss"]), rel=1e-5)
    with open(out / "metrics.csv", newline="") as fh:
        first, last = list(csv.DictReader(fh))
    assert not first["train_tc"], "epoch 1: cross-entropy alone (--tc-start 1)"
    assert float(last["train_tc"]) > 0 and 0 <= float(last["train_tc_active"]) <= 1
    capsys.readouterr()


def test_fer_predict_opens_the_checkpoint(trained, tmp_path, capsys):
    from skimage.data import astronaut

    from ferengine.cli import main as fer

    img = tmp_path / "astronaut.png"
    cv2.imwrite(str(img), cv2.resize(cv2.cvtColor(astronaut(), cv2.COLOR_RGB2BGR), (1024, 1024)))
    assert fer(["predict", str(img), "-c", str(trained["out"] / "best.safetensors"), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    (face,) = res["images"][0]["faces"]
    assert sum(face[k] for k in LABEL_SETS["fer7"]) == pytest.approx(1.0, abs=1e-3)


def test_eval_only(trained, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FER_DESKTOP_CACHE", str(trained["cache"]))
    ev = tmp_path / "ev"
    assert main(["--data", "fer2013", "--data-dir", str(trained["data"]), "--eval-only",
                 str(trained["out"] / "best.safetensors"), "--val-split", "privatetest", "--out", str(ev)]) == 0
    assert "macro F1" in capsys.readouterr().out
    res = json.loads((ev / "eval.json").read_text())
    assert res["split"] == "privatetest" and res["n"] == 16


def test_eval_only_measures_what_the_training_run_measured(trained, tmp_path, capsys, monkeypatch):
    """--eval-only on the selection split gives the run's own numbers for its best checkpoint, also where the
    CPU trains in bf16 (evaluation stays fp32 on a CPU in both paths)."""
    import trainers.engine.runtime as runtime

    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setenv("FER_DESKTOP_CACHE", str(trained["cache"]))
    ev = tmp_path / "ev"
    assert main(["--data", "fer2013", "--data-dir", str(trained["data"]), "--eval-only",
                 str(trained["out"] / "best.safetensors"), "--out", str(ev)]) == 0
    capsys.readouterr()
    res = json.loads((ev / "eval.json").read_text())
    with open(trained["out"] / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    best = max(rows, key=lambda r: float(r["val_accuracy"]))
    assert res["split"] == "publictest"
    assert res["accuracy"] == pytest.approx(float(best["val_accuracy"]), abs=1e-6)
    assert res["loss"] == pytest.approx(float(best["val_loss"]), rel=1e-5)


def test_centres_move_and_are_restored_on_resume(fer_dir, tmp_path):
    """2 epochs straight == 1 epoch + --resume to 2 (weights and centres), and the resumed trainer starts
    from the saved centres, not fresh ones."""
    base = ["--data", "fer2013", "--data-dir", str(fer_dir), "--batch-size", "32", "--tc-start", "0",
            "--centre-init", "normal", *TINY]
    a, b = tmp_path / "a", tmp_path / "b"
    assert main([*base, "--epochs", "2", "--out", str(a)]) == 0
    assert main([*base, "--epochs", "1", "--out", str(b)]) == 0
    saved = torch.load(b / "state.pt", weights_only=True)["method"]["centres"]
    fresh = torch.Generator().manual_seed(0 + 104729)
    init = torch.randn(7, 32, generator=fresh) * 0.01
    assert not torch.allclose(saved, init), "eq. 12 moved the centres during epoch 1"
    assert float(saved.norm(dim=1).mean()) > 0.05

    cfg = parse_config(DAF, ["--out", str(b), "--resume", "--epochs", "2", *base])
    tr = Trainer(cfg, DAF, argv=["pytest"])
    assert tr.method.tc.reduction == "sum"
    assert torch.equal(tr.method.tc.centres.cpu(), saved)
    # an lr drop's "reload the best model" brings back the best epoch's centres with its weights
    best = torch.load(b / "best_state.pt", weights_only=True)
    tr.method.tc.centres.add_(1.0)
    tr.reload_best()
    assert torch.equal(tr.method.tc.centres.cpu(), best["method"]["centres"])
    del tr
    assert main(["--out", str(b), "--resume", "--epochs", "2"]) == 0  # only --out: the saved settings
    sa, sb = (torch.load(d / "state.pt", weights_only=True) for d in (a, b))
    assert sb["epoch"] == 2 and sb["config"]["extra"]["margin"] == 11.0
    assert torch.equal(sa["method"]["centres"], sb["method"]["centres"])
    diff = [k for k in sa["model"] if not torch.equal(sa["model"][k], sb["model"][k])]
    assert not diff, f"resumed run differs from the straight one: {diff[:3]}"


def test_no_tc_no_attention_ablation(fer_dir, tmp_path):
    out = tmp_path / "abl"
    assert main(["--data", "fer2013", "--data-dir", str(fer_dir), "--batch-size", "32", "--epochs", "1",
                 "--no-tc", "--no-attention", "--out", str(out), *TINY]) == 0
    s = torch.load(out / "state.pt", weights_only=True)
    assert s["method"] == {} and s["config"]["extra"]["stage"] == "ce"
    with open(out / "metrics.csv", newline="") as fh:
        row = next(csv.DictReader(fh))
    assert "train_tc" not in row and float(row["train_loss"]) == pytest.approx(float(row["train_ce"]))
    loaded = ck.load(out / "best.safetensors")
    assert loaded.info.arch_kwargs["attention"] is False and isinstance(loaded.model.attention, nn.Identity)


def test_sfew_fine_tuning_from_a_fer2013_checkpoint(trained, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FER_DESKTOP_CACHE", str(tmp_path / "cache"))
    sfew = write_sfew(tmp_path / "data")
    init = trained["out"] / "best.safetensors"
    out = tmp_path / "ft"
    assert main(["--data", "sfew", "--data-dir", str(sfew), "--init", str(init), "--epochs", "1", "--workers", "0",
                 "--out", str(out), "--no-tensorboard", "--bench-batches", "0"]) == 0
    args = json.loads((out / "args.json").read_text())
    c = args["config"]
    assert (c["batch_size"], c["extra"]["margin"], c["extra"]["lam"], c["extra"]["stage"]) == (32, 13.0, 0.013, "tc")
    loaded = ck.load(out / "best.safetensors")
    assert loaded.info.arch_kwargs == {**ck.load(init).info.arch_kwargs}, "the architecture of --init"
    assert (loaded.spec.size, loaded.spec.channels) == (32, 1), "grey like the FER2013 model, not SFEW's RGB"
    assert loaded.info.training["data"]["name"] == "sfew"
    # the weights started from --init: one epoch of fine-tuning moves them a little, a fresh start is unrelated
    w = lambda m: m.blocks[2][0].weight.detach().flatten()  # noqa: E731 - block 3 first conv
    cos = torch.nn.functional.cosine_similarity
    start, tuned = ck.load(init).model, loaded.model
    fresh = create_model("daf_cnn", **loaded.info.arch_kwargs)
    assert float(cos(w(tuned), w(start), dim=0)) > 0.9
    assert float(cos(w(tuned), w(fresh), dim=0)) < 0.2
    assert not torch.equal(w(tuned), w(start)), "and it did fine-tune"
    # an architecture flag that contradicts the checkpoint is a clear error
    capsys.readouterr()
    assert main(["--data", "sfew", "--data-dir", str(sfew), "--init", str(init), "--no-attention",
                 "--out", str(tmp_path / "bad"), "--workers", "0"]) == 2
    assert "attention=False given, checkpoint has True" in capsys.readouterr().err


def test_tc_start_with_centres_at_the_class_means_and_lambda_warmup(fer_dir, tmp_path):
    """--tc-start 1 --centre-init means: epoch 1 trains with cross-entropy alone, then the centres are the class
    means of the training embeddings and TC joins; --lam-warmup 1 ramps lambda over the next epoch."""
    argv = ["--data", "fer2013", "--data-dir", str(fer_dir), "--batch-size", "32", "--epochs", "2", "--tc-start", "1",
            "--centre-init", "means", "--lam-warmup", "1", "--out", str(tmp_path / "r"), *TINY]
    cfg = parse_config(DAF, argv)
    seen = {}

    class Watch:
        def on_step_end(self, trainer, epoch, step):
            if epoch == 2 and step == 1:
                seen["centres"] = trainer.method.tc.centres.clone()

    tr = Trainer(cfg, DAF, callbacks=[Watch()], argv=["pytest"])
    from ferengine.preprocess import to_model_input
    from trainers.data import load_dataset

    ds = load_dataset("fer2013", fer_dir, "train")
    ref = {}
    method, measure = tr.method, tr.method._centres_from_means

    def measured_independently():
        measure()
        model = tr.model
        was = model.training
        model.eval()
        with torch.no_grad():  # the class means of the training embeddings, by another path (numpy faces)
            emb = model(torch.from_numpy(to_model_input(ds.images.numpy(), tr.spec)))["embedding"]
        model.train(was)
        ref["means"] = torch.stack([emb[ds.labels == k].mean(0) if (ds.labels == k).any()
                                    else method.tc.centres[k] for k in range(7)])
        ref["centres"] = method.tc.centres.clone()

    method._centres_from_means = measured_independently
    tr.fit()
    with open(tmp_path / "r" / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows[0]["train_tc"] == "" and float(rows[1]["train_tc"]) > 0, "TC only from epoch 2"
    lam = float(rows[1]["train_lam"])
    assert 0 < lam < 0.007, "lambda still ramping during epoch 2 (its mean over the epoch)"
    torch.testing.assert_close(ref["centres"], ref["means"], atol=1e-4, rtol=1e-4)
    assert float(ref["means"].norm(dim=1).max()) > 0.1, "real means, not the N(0, 0.01) start"
    assert "centres" in seen and not torch.equal(seen["centres"], ref["centres"]), "eq. 12 moved them after the start"
    assert float(rows[1]["val_sep_ratio"]) > 0 and 0 <= float(rows[1]["val_tc_hinge_met"]) <= 1
