"""Every registered method, end to end, as a user runs it: ``python -m trainers.<name> --data ...`` on a tiny
fixture in the dataset's real on-disk format.

Parametrised over ``trainers.methods.list_methods()`` and reading each method's declarations (``test_args``
for a tiny model, ``test_data`` for the fixture), so a method registered later gets every check here with no
new test code:

- ``--help`` builds in-process and lists the engine's flags and every field of the method's Config;
- a short run trains a model whose outputs depend on its input (the fixture's classes are learnable);
- a run killed mid-epoch and resumed ends bit-identical to the uninterrupted run (weights, optimiser,
  schedules, RNGs, method state);
- the best checkpoint loads through ``ferengine.checkpoint``, holds only what inference runs (every
  parameter feeds the deployed outputs, eval is deterministic), and its ONNX export agrees with torch;
- ``--eval-only`` on the selection split gives the run's own numbers for its best checkpoint.
"""
from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import Kill, KillAt, deep_diff, write_afew_va, write_fer2013
from ferengine import checkpoint as ck
from ferengine.graph import InferenceModule
from trainers.engine import Trainer, build_parser, parse_config
from trainers.engine.config import flag_specs
from trainers.methods import get_method, list_methods, run

METHODS = list_methods()
COMMON = ["--batch-size", "32", "--no-tensorboard", "--bench-batches", "0", "--workers", "0"]

# the dataset fixtures a method's ``test_data`` may name: name -> writer(folder)
FIXTURES = {
    "fer2013": lambda folder: write_fer2013(folder / "fer2013", n_train=192, n_val=64, n_private=16),
    "afew-va": lambda folder: write_afew_va(folder),
}


def _argv(name: str, data: Path, out: Path, *extra: str) -> list[str]:
    cls = get_method(name)
    return ["--data", cls.test_data, "--data-dir", str(data), "--out", str(out), *COMMON, *cls.test_args, *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Per method: the fixture data and one uninterrupted 2-epoch run (shared by the tests below)."""
    done: dict[str, dict] = {}

    def get(name: str) -> dict:
        if name not in done:
            cls = get_method(name)
            if cls.test_data not in FIXTURES:
                pytest.fail(f"{name}: no fixture writer for its test_data {cls.test_data!r}; add one to FIXTURES")
            tmp = tmp_path_factory.mktemp(name)
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("FER_DESKTOP_CACHE", str(tmp / "cache"))
                FIXTURES[cls.test_data](tmp / "data")
                assert run(name, _argv(name, tmp / "data", tmp / "straight", "--epochs", "2")) == 0
            done[name] = {"tmp": tmp, "data": tmp / "data", "out": tmp / "straight", "cache": tmp / "cache"}
        return done[name]

    return get


@pytest.mark.parametrize("name", METHODS)
def test_help_builds_and_lists_every_setting(name):
    cls = get_method(name)
    text = build_parser(cls).format_help()
    for flag in ("--data", "--data-dir", "--epochs", "--resume", "--eval-only", "--time-budget", "--device"):
        assert flag in text
    for spec in flag_specs(cls.Config):
        assert spec.flags[0] in text, f"{name}: {spec.flags[0]} missing from --help"
    assert cls.summary(), f"{name}: the method class needs a docstring (its one-line summary)"
    # every declared default and table row resolves to a valid configuration
    for data in (None, *cls.table):
        cfg = parse_config(cls, [] if data is None else ["--data", data])
        cls.Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.extra.items()})
        assert cfg.method == name


@pytest.mark.parametrize("name", METHODS)
def test_short_run_learns_and_writes_its_files(name, runs):
    r = runs(name)
    out = r["out"]
    for f in ("best.safetensors", "last.safetensors", "state.pt", "args.json", "metrics.csv", "train.log"):
        assert (out / f).exists(), f
    with open(out / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(x["epoch"]) for x in rows] == [1, 2]
    assert all(np.isfinite(float(x["train_loss"])) for x in rows)
    args = json.loads((out / "args.json").read_text())
    assert args["method"] == name and f"trainers.{name}" in ck.read_info(out / "best.safetensors").training["command"]


@pytest.mark.parametrize("name", METHODS)
def test_resume_after_a_kill_is_bit_exact(name, runs, tmp_path, monkeypatch):
    r = runs(name)
    monkeypatch.setenv("FER_DESKTOP_CACHE", str(r["cache"]))
    out = tmp_path / "killed"
    cfg = parse_config(get_method(name), _argv(name, r["data"], out, "--epochs", "2"))
    tr = Trainer(cfg, get_method(name), callbacks=[KillAt(epoch=2, step=2)], argv=["pytest"])
    with pytest.raises(Kill):
        tr.fit()
    del tr
    assert torch.load(out / "state.pt", weights_only=True)["epoch"] == 1
    assert run(name, ["--out", str(out), "--resume"]) == 0
    a = torch.load(r["out"] / "state.pt", weights_only=True)
    b = torch.load(out / "state.pt", weights_only=True)
    a.pop("config"), b.pop("config")
    assert deep_diff(a, b) == [], "the resumed run differs from the uninterrupted one"
    with open(out / "metrics.csv", newline="") as fh:
        assert [int(x["epoch"]) for x in csv.DictReader(fh)] == [1, 2]


def _inputs(spec, n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, spec.channels, spec.size, spec.size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", METHODS)
def test_best_checkpoint_is_inference_only_and_exports(name, runs, tmp_path, monkeypatch):
    from ferengine.export import export_onnx

    r = runs(name)
    monkeypatch.setenv("FER_DESKTOP_CACHE", str(r["cache"]))
    loaded = ck.load(r["out"] / "best.safetensors")
    model = loaded.model
    assert not model.training
    from trainers.data import load_dataset

    cls = get_method(name)
    split = json.loads((r["out"] / "args.json").read_text())["resolved"]["val_split"]
    ds = load_dataset(cls.test_data, r["data"], split)
    from ferengine.preprocess import to_model_input

    faces = ds.images[:16].numpy() if ds.images is not None else np.stack([ds[i]["image"].numpy() for i in range(16)])
    x = torch.from_numpy(to_model_input(faces, loaded.spec))
    deployed = InferenceModule(model)
    outs = deployed(x)
    spread = max(float((o - o[:1]).detach().abs().max()) for o in outs)
    assert spread > 1e-3, f"the trained model ignores its input (outputs vary by {spread:.1e} over 16 faces)"
    sum(o.float().pow(2).sum() for o in outs).backward()
    unused = [k for k, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not unused, f"the checkpoint holds parameters inference does not use: {unused[:5]}"
    with torch.no_grad():
        assert all(torch.equal(u, v) for u, v in zip(deployed(x), deployed(x))), "eval mode is not deterministic"
    path = export_onnx(loaded, tmp_path / "m.onnx", verify=False)
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    got = dict(zip(names, sess.run(names, {"input": x.numpy()})))
    with torch.no_grad():
        ref = dict(zip(deployed.output_names, deployed(x)))
    for k in names:
        diff = float(np.abs(got[k] - ref[k].numpy()).max())
        assert diff < 1e-4, f"{k}: ONNX Runtime and torch differ by {diff:.2e}"


@pytest.mark.parametrize("name", METHODS)
def test_eval_only_equals_the_runs_own_evaluation(name, runs, tmp_path, monkeypatch, capsys):
    r = runs(name)
    monkeypatch.setenv("FER_DESKTOP_CACHE", str(r["cache"]))
    ev = tmp_path / "ev"
    cls = get_method(name)
    assert run(name, ["--data", cls.test_data, "--data-dir", str(r["data"]), "--eval-only",
                      str(r["out"] / "best.safetensors"), "--out", str(ev), *cls.test_args]) == 0
    capsys.readouterr()
    res = json.loads((ev / "eval.json").read_text())
    with open(r["out"] / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    cfg = parse_config(cls, ["--data", cls.test_data])
    mode = "min" if any(s in cfg.best_metric for s in ("loss", "rmse")) else "max"
    best = (max if mode == "max" else min)(rows, key=lambda x: float(x[f"val_{cfg.best_metric}"]))
    for key in ("accuracy", "mean_class_accuracy", "macro_f1", "loss", "mean_ccc"):
        if f"val_{key}" in best:
            assert res[key] == pytest.approx(float(best[f"val_{key}"]), rel=1e-5, abs=1e-6), key
