"""`fer eval`: metrics on a dataset split through the checkpoint's own preprocessing, label mapping by name,
shared-class evaluation, one-line errors. On a tiny fer2013.csv in the real Kaggle format."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_checkpoint
from ferengine import checkpoint as ck
from ferengine.cli import main
from ferengine.labels import LABEL_SETS
from ferengine.preprocess import to_model_input

FER7 = list(LABEL_SETS["fer7"])
N_PER_CLASS_TEST = (5, 3, 4, 6, 5, 4, 5)  # PublicTest items per fer2013 class (32 in all)


def _face(rng: np.random.Generator, k: int) -> np.ndarray:
    """A 48x48 grey image that differs by class in brightness, gradient and texture, so that even a
    randomly initialised model does not predict one class for everything."""
    yy, xx = np.mgrid[0:48, 0:48] / 47.0
    base = 30 + 25 * k + 60 * (xx if k % 2 else yy) * (1 if k % 3 else -1)
    img = base + rng.normal(0, 10 + 6 * k, (48, 48))
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FER_DESKTOP_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def fer_dir(tmp_path_factory) -> Path:
    """``fer2013/fer2013.csv`` in Kaggle's format: header emotion,pixels,Usage; Training + PublicTest rows."""
    rng = np.random.default_rng(0)
    lines = ["emotion,pixels,Usage"]
    for usage, counts in (("Training", (2,) * 7), ("PublicTest", N_PER_CLASS_TEST)):
        for k, n in enumerate(counts):
            for _ in range(n):
                lines.append(f"{k},{' '.join(map(str, _face(rng, k).ravel()))},{usage}")
    rng.shuffle(lines[1:])  # classes interleaved, as in the real file
    d = tmp_path_factory.mktemp("data")
    (d / "fer2013").mkdir()
    (d / "fer2013" / "fer2013.csv").write_text("\r\n".join(lines) + "\r\n")
    return d


def _publictest(fer_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    from trainers.data import load_dataset

    ds = load_dataset("fer2013", fer_dir, "publictest")
    return ds.images.numpy(), ds.labels.numpy()


def _probs(path: Path, images: np.ndarray) -> tuple[np.ndarray, list[str]]:
    loaded = ck.load(path)
    with torch.no_grad():
        logits = loaded.model(torch.from_numpy(to_model_input(images, loaded.spec)))["logits"]
    return torch.softmax(logits, 1).numpy(), list(loaded.info.labels)


def _eval(argv: list[str], capsys) -> tuple[int, str, str]:
    rc = main(["eval", *argv, "--backend", "torch", "-q"])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _sklearn(y: np.ndarray, p: np.ndarray, k: int) -> dict:
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score

    return {"accuracy": 100 * accuracy_score(y, p), "mean_class_accuracy": 100 * balanced_accuracy_score(y, p),
            "macro_f1": 100 * f1_score(y, p, average="macro"), "n": len(y),
            "confusion_matrix": confusion_matrix(y, p, labels=list(range(k))).tolist()}


def _check(result: dict, ref: dict) -> None:
    for key in ("accuracy", "mean_class_accuracy", "macro_f1"):
        assert result[key] == pytest.approx(ref[key], abs=1e-3), key
    assert result["n"] == ref["n"]
    assert result["confusion_matrix"] == ref["confusion_matrix"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, fer_dir) -> Path:
    """A random fastcnn with a nearest-class-mean head fitted on the fixture's Training rows, so that its
    predictions depend on the input (a random init alone predicts one class for everything) while not
    being perfect."""
    from trainers.data import load_dataset

    path = make_checkpoint(tmp_path_factory.mktemp("ck") / "fer7.safetensors", seed=3)
    loaded = ck.load(path)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FER_DESKTOP_CACHE", str(tmp_path_factory.mktemp("cache")))
        train = load_dataset("fer2013", fer_dir, "train")
    with torch.no_grad():
        emb = loaded.model(torch.from_numpy(to_model_input(train.images.numpy(), loaded.spec)))["embedding"]
        mu = torch.stack([emb[train.labels == k].mean(0) for k in range(7)])
        loaded.model.head.fc.weight.copy_(mu)
        loaded.model.head.fc.bias.copy_(-0.5 * (mu * mu).sum(1))
    return ck.save(path, loaded.model, loaded.info)


def test_eval_json_matches_sklearn(fer_dir, ckpt, tmp_path, capsys):
    out_json = tmp_path / "res" / "eval.json"
    rc, out, err = _eval(["-c", str(ckpt), "--data", "fer2013", "--data-dir", str(fer_dir), "--split", "PublicTest",
                          "--json", str(out_json), "--confusion-png", str(tmp_path / "cm.png")], capsys)
    assert rc == 0, err
    res = json.loads(out_json.read_text())
    assert {"accuracy", "mean_class_accuracy", "macro_f1", "n", "confusion_matrix", "labels", "checkpoint",
            "data", "split"} <= set(res)
    assert res["labels"] == FER7 and res["split"] == "publictest" and res["data"] == "fer2013"
    assert res["checkpoint"] == str(ckpt)
    images, y = _publictest(fer_dir)
    probs, _ = _probs(ckpt, images)
    pred = probs.argmax(1)
    assert len(set(pred.tolist())) > 1, "fixture too easy: the model predicts one class for everything"
    _check(res, _sklearn(y, pred, 7))
    assert res["n"] == sum(N_PER_CLASS_TEST)
    # written atomically: nothing but the file itself in its folder
    assert [p.name for p in out_json.parent.iterdir()] == ["eval.json"]
    assert (tmp_path / "cm.png").stat().st_size > 1000
    # printed: the three numbers and the confusion matrix with class names
    assert f"accuracy            {res['accuracy']:6.2f} %" in out
    assert "macro F1" in out and "mean class accuracy" in out
    cm_head = next(line for line in out.splitlines() if "true \\ predicted" in line)
    head = out.splitlines()[out.splitlines().index(cm_head) + 1].split()
    assert head == FER7


def _permuted_checkpoint(src: Path, dst: Path, order: list[int]) -> Path:
    """The same classifier with its output classes in another order (head rows permuted with the names)."""
    loaded = ck.load(src)
    model = loaded.model
    with torch.no_grad():
        fc = model.head.fc
        fc.weight.copy_(fc.weight[order].clone())
        fc.bias.copy_(fc.bias[order].clone())
    info = loaded.info
    info.labels = [info.labels[i] for i in order]
    return ck.save(dst, model, info)


def test_eval_maps_reordered_labels_by_name(fer_dir, ckpt, tmp_path, capsys):
    order = [6, 3, 0, 5, 1, 4, 2]
    perm = _permuted_checkpoint(ckpt, tmp_path / "perm.safetensors", order)
    assert ck.read_info(perm).labels != FER7
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    common = ["--data", "fer2013", "--data-dir", str(fer_dir), "--split", "publictest"]
    assert _eval(["-c", str(ckpt), *common, "--json", str(a)], capsys)[0] == 0
    rc, _, err = _eval(["-c", str(perm), *common, "--json", str(b)], capsys)
    assert rc == 0
    assert "matched by name" in err
    ra, rb = json.loads(a.read_text()), json.loads(b.read_text())
    for key in ("accuracy", "mean_class_accuracy", "macro_f1", "n", "confusion_matrix", "labels"):
        assert ra[key] == rb[key], key


def test_eval_on_shared_classes_only(fer_dir, tmp_path, capsys):
    # the model lacks 'disgust': those items are dropped and said so
    six = [c for c in FER7 if c != "disgust"]
    path = make_checkpoint(tmp_path / "six.safetensors", num_classes=6, labels=tuple(six), seed=1)
    out_json = tmp_path / "six.json"
    rc, _, err = _eval(["-c", str(path), "--data", "fer2013", "--data-dir", str(fer_dir), "--split", "publictest",
                        "--json", str(out_json)], capsys)
    assert rc == 0, err
    assert "['disgust']" in err and f"{N_PER_CLASS_TEST[1]} items are left out" in err
    res = json.loads(out_json.read_text())
    assert res["labels"] == six
    assert res["dropped"]["classes_not_in_checkpoint"] == {"disgust": N_PER_CLASS_TEST[1]}
    images, y = _publictest(fer_dir)
    keep = y != FER7.index("disgust")
    probs, labels = _probs(path, images[keep])
    pred = probs.argmax(1)  # model order == six
    y_shared = np.array([six.index(FER7[v]) for v in y[keep]])
    _check(res, _sklearn(y_shared, pred, 6))

    # the model has a class the dataset lacks ('contempt', FER+ order): predictions among the shared classes
    path8 = make_checkpoint(tmp_path / "ferplus.safetensors", num_classes=8, seed=2)
    rc, _, err = _eval(["-c", str(path8), "--data", "fer2013", "--data-dir", str(fer_dir), "--split", "publictest",
                        "--json", str(out_json)], capsys)
    assert rc == 0 and "['contempt']" in err
    res = json.loads(out_json.read_text())
    assert res["labels"] == FER7 and res["n"] == len(y)
    probs, labels = _probs(path8, images)
    cols = [labels.index(c) for c in FER7]
    _check(res, _sklearn(y, probs[:, cols].argmax(1), 7))


def test_eval_without_shared_classes_is_a_clear_error(fer_dir, tmp_path, capsys):
    path = make_checkpoint(tmp_path / "ab.safetensors", num_classes=2, labels=("cat", "dog"))
    rc, out, err = _eval(["-c", str(path), "--data", "fer2013", "--data-dir", str(fer_dir), "--split", "publictest"],
                         capsys)
    assert rc == 2 and out == ""
    assert err.startswith("fer: error:") and "no class in common" in err and err.count("\n") == 1


@pytest.mark.parametrize("case", ["missing dataset", "bad split", "bad checkpoint", "unknown dataset"])
def test_eval_errors_are_one_line(case, fer_dir, ckpt, tmp_path, capsys):
    args = {"data": "fer2013", "data-dir": str(fer_dir), "split": "publictest", "checkpoint": str(ckpt)}
    if case == "missing dataset":
        args["data-dir"] = str(tmp_path / "nothing here")
    elif case == "bad split":
        args["split"] = "Validation2"
    elif case == "bad checkpoint":
        bad = tmp_path / "bad.safetensors"
        bad.write_text("not a checkpoint")
        args["checkpoint"] = str(bad)
    else:
        args["data"] = "imagenet"
    rc, out, err = _eval([x for k, v in args.items() for x in (f"--{k}", v)], capsys)
    assert rc == 2, err
    assert err.startswith("fer: error:") and err.count("\n") == 1 and "Traceback" not in err
    key = {"missing dataset": "fer2013.csv", "bad split": "Validation2", "bad checkpoint": "bad.safetensors",
           "unknown dataset": "imagenet"}[case]
    assert key in err


def test_eval_uses_the_default_checkpoint(fer_dir, ckpt, monkeypatch, capsys):
    monkeypatch.setattr(ck, "default_checkpoint_path", lambda: ckpt)
    rc, out, err = _eval(["--data", "fer2013", "--data-dir", str(fer_dir), "--split", "publictest"], capsys)
    assert rc == 0, err
    assert out.startswith(str(ckpt))


def test_eval_onnxruntime_agrees_with_torch(fer_dir, ckpt, tmp_path, capsys):
    from ferengine.backends import available_backends

    reason = available_backends()["onnxruntime"]
    if reason:
        pytest.skip(reason)
    common = ["-c", str(ckpt), "--data", "fer2013", "--data-dir", str(fer_dir), "--split", "publictest", "-q"]
    assert main(["eval", *common, "--backend", "torch", "--json", str(tmp_path / "t.json")]) == 0
    assert main(["eval", *common, "--backend", "onnxruntime", "--batch-size", "7",
                 "--json", str(tmp_path / "o.json")]) == 0
    capsys.readouterr()
    t, o = (json.loads((tmp_path / f).read_text()) for f in ("t.json", "o.json"))
    assert o["backend"] == "onnxruntime"
    assert t["confusion_matrix"] == o["confusion_matrix"] and t["accuracy"] == o["accuracy"]


def test_ferengine_does_not_need_trainers(tmp_path):
    """ferengine (and the CLI) import without trainers; `fer eval` then says what is missing."""
    code = (
        "import sys; sys.modules['trainers'] = None\n"
        "import ferengine, ferengine.cli\n"
        "ferengine.cli.build_parser()\n"
        "assert not any(m.startswith('trainers') for m in sys.modules if sys.modules[m] is not None)\n"
        "sys.exit(ferengine.cli.main(['eval', '--data', 'fer2013', '--split', 'publictest', '-c', 'x.safetensors']))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("fer: error: fer eval needs the trainers package")
