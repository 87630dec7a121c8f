"""The catalogue of bad checkpoints: each way a checkpoint file can be wrong, built by modifying a real (trained)
one, run through the one validation layer (:func:`ferengine.checkpoint.load` and :func:`read_info`) AND the real
entry points (``fer info``, ``fer predict --checkpoint``): one CheckpointError / one line on stderr naming the
file and what is wrong, exit status 2, never a traceback, never a silently wrong model.

A row: case name -> a builder writing the bad file from the good checkpoint's metadata and tensors -> a fragment
the message must contain. A good checkpoint still loads, also from a path that is not valid UTF-8.
"""
from __future__ import annotations

import copy
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from ferengine import checkpoint as ck
from ferengine.cli import main

# ------------------------------------------------------------------------------------------- builders


def _write_st(path: Path, meta, state: dict[str, torch.Tensor]) -> Path:
    """A safetensors file with ``meta`` (any JSON value, or a raw string) as its fer-desktop metadata."""
    from safetensors.torch import save_file

    raw = meta if isinstance(meta, str) else json.dumps(meta)
    save_file({k: v.contiguous().clone() for k, v in state.items()}, str(path), metadata={ck.META_KEY: raw})
    return path


def _write_pt(path: Path, obj) -> Path:
    torch.save(obj, path)
    return path


def _meta(good, **changes):
    m = copy.deepcopy(good["meta"])
    for k, v in changes.items():
        if v is _DROP:
            m.pop(k, None)
        else:
            m[k] = v
    return m


def _input(good, **changes):
    return {**good["meta"]["input"], **changes}


def _state(good, name=None, fn=None, drop=None, add=None):
    s = {k: v.clone() for k, v in good["state"].items()}
    if name is not None:
        s[name] = fn(s[name])
    if drop is not None:
        del s[drop]
    if add is not None:
        s.update(add)
    return s


_DROP = object()
WEIGHT = "stages.1.0.weight"  # a conv weight of the fastcnn fixture


def _with_nan(t):
    t = t.clone()
    t.view(-1)[:3] = float("nan")
    return t


def _with_inf(t):
    t = t.clone()
    t.view(-1)[5] = float("inf")
    return t


class Evil:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def _truncated(suffix):
    def build(good, path):
        src = ck.save(path.with_name("full" + suffix), good["model"], good["info"])
        data = src.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        return path
    return build


def _st(meta_fn=None, state_fn=None):
    def build(good, path):
        return _write_st(path, meta_fn(good) if meta_fn else good["meta"], state_fn(good) if state_fn else good["state"])
    return build


def _width(w):
    def build(good, path):
        m = _meta(good, arch_kwargs={**good["meta"]["arch_kwargs"], "width": w})
        return _write_st(path, m, good["state"])
    return build


def _folder(good, path):
    path.mkdir()
    return path


def _missing(good, path):
    return path


def _empty(good, path):
    path.write_bytes(b"")
    return path


def _random(good, path):
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    return path


def _pickled_code(good, path):
    return _write_pt(path, {ck.META_KEY: good["meta"], "state_dict": good["state"], "payload": Evil()})


def _old_pickle(good, path):
    with open(path, "wb") as fh:
        pickle.dump({"fer_checkpoint": good["meta"], "state_dict": {}}, fh)
    return path


def _plain_state_dict(good, path):
    return _write_pt(path, good["state"])


def _no_metadata(good, path):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in good["state"].items()}, str(path))
    return path


# (case, file suffix, builder, fragment of the message)
CASES = [
    # the file
    ("missing file", ".safetensors", _missing, "no such file"),
    ("folder", ".safetensors", _folder, "is a folder"),
    ("empty file", ".safetensors", _empty, "empty file (0 bytes)"),
    ("truncated safetensors", ".safetensors", _truncated(".safetensors"), "damaged or truncated safetensors"),
    ("truncated pt", ".pt", _truncated(".pt"), "damaged or truncated PyTorch"),
    ("random bytes", ".safetensors", _random, "not a fer-desktop checkpoint"),
    ("pickled code in a .pt", ".pt", _pickled_code, "holds pickled Python objects, which fer-desktop never loads"),
    ("plain pickle", ".pt", _old_pickle, "holds pickled Python objects"),
    ("plain state dict .pt", ".pt", _plain_state_dict, "not a fer-desktop checkpoint"),
    ("safetensors without metadata", ".safetensors", _no_metadata, "without fer-desktop metadata"),
    ("metadata not JSON", ".safetensors", _st(lambda g: "{not json"), "metadata is not valid JSON"),
    ("metadata not an object", ".safetensors", _st(lambda g: [1, 2]), "not a fer-desktop-checkpoint document"),
    # the metadata: types
    ("format_version a string", ".safetensors", _st(lambda g: _meta(g, format_version="1")),
     "'format_version' must be an integer"),
    ("format_version newer", ".safetensors", _st(lambda g: _meta(g, format_version=99)), "newer than this fer-desktop"),
    ("input a string", ".safetensors", _st(lambda g: _meta(g, input="hello")),
     "the input spec must be an object of fields"),
    ("input missing", ".safetensors", _st(lambda g: _meta(g, input=_DROP)), "lacks the required field 'input'"),
    ("arch missing", ".safetensors", _st(lambda g: _meta(g, arch=_DROP)), "lacks the required field 'arch'"),
    ("arch a number", ".safetensors", _st(lambda g: _meta(g, arch=7)), "'arch' must be an architecture name"),
    ("arch unknown", ".safetensors", _st(lambda g: _meta(g, arch="no_such_net")), "unknown architecture 'no_such_net'"),
    ("arch_kwargs a list", ".safetensors", _st(lambda g: _meta(g, arch_kwargs=[1])), "'arch_kwargs' must be an object"),
    ("labels a string", ".safetensors", _st(lambda g: _meta(g, labels="happy")), "'labels' must be a list"),
    ("heads a string", ".safetensors", _st(lambda g: _meta(g, heads="expression")), "'heads' must be a list"),
    ("name a number", ".safetensors", _st(lambda g: _meta(g, name=3)), "'name' must be a string"),
    ("training a list", ".safetensors", _st(lambda g: _meta(g, training=[])), "'training' must be an object"),
    # the metadata: values
    ("seven labels all 'happy'", ".safetensors", _st(lambda g: _meta(g, labels=["happy"] * 7)),
     "name the same class"),
    ("labels differing in case and spaces", ".safetensors",
     _st(lambda g: _meta(g, labels=["Happy", " happy"] + g["meta"]["labels"][2:])), "name the same class"),
    ("labels that are aliases", ".safetensors",
     _st(lambda g: _meta(g, labels=["anger"] + g["meta"]["labels"][1:6] + ["angry"])), "name the same class"),
    ("an empty label", ".safetensors", _st(lambda g: _meta(g, labels=g["meta"]["labels"][:6] + ["  "])), "is empty"),
    ("a label not a string", ".safetensors", _st(lambda g: _meta(g, labels=g["meta"]["labels"][:6] + [3])),
     "must be a string"),
    ("a label 'score' (a result column)", ".safetensors",
     _st(lambda g: _meta(g, labels=g["meta"]["labels"][:6] + ["score"])), "rename the class"),
    ("a label 'Confidence' (a JSON key)", ".safetensors",
     _st(lambda g: _meta(g, labels=["Confidence"] + g["meta"]["labels"][1:])), "rename the class"),
    ("a label with a line break", ".safetensors",
     _st(lambda g: _meta(g, labels=g["meta"]["labels"][:6] + ["sad\nangry"])), "holds control characters"),
    ("5 labels for 7 outputs", ".safetensors", _st(lambda g: _meta(g, labels=g["meta"]["labels"][:5])),
     "5 labels for a 7-class model"),
    ("unknown head", ".safetensors", _st(lambda g: _meta(g, heads=["expression", "age"])), "'heads' must list"),
    ("a head the model lacks", ".safetensors", _st(lambda g: _meta(g, heads=["expression", "valence_arousal"])),
     "but the architecture has"),
    # the input spec
    ("input size NaN", ".safetensors", _st(lambda g: _meta(g, input=_input(g, size=float("nan")))),
     "InputSpec.size must be an integer"),
    ("input size 0", ".safetensors", _st(lambda g: _meta(g, input=_input(g, size=0))), "InputSpec.size"),
    ("input size a string", ".safetensors", _st(lambda g: _meta(g, input=_input(g, size="48"))),
     "InputSpec.size must be an integer from 8 to 1024, got '48' (str)"),
    ("input std negative", ".safetensors", _st(lambda g: _meta(g, input=_input(g, std=[-0.5]))),
     "InputSpec.std must be positive"),
    ("input std infinite", ".safetensors", _st(lambda g: _meta(g, input=_input(g, std=[float("inf")]))),
     "InputSpec.std must be finite"),
    ("input mean NaN", ".safetensors", _st(lambda g: _meta(g, input=_input(g, mean=[float("nan")]))),
     "InputSpec.mean must be finite"),
    ("input crop_margin NaN", ".safetensors", _st(lambda g: _meta(g, input=_input(g, crop_margin=float("nan")))),
     "InputSpec.crop_margin must be a finite number"),
    ("input channels 2", ".safetensors", _st(lambda g: _meta(g, input=_input(g, channels=2))), "InputSpec.channels"),
    ("input unknown field", ".safetensors", _st(lambda g: _meta(g, input=_input(g, colour="red"))),
     "unknown input-spec fields ['colour']"),
    ("input spec the model cannot run on", ".safetensors", _st(lambda g: _meta(g, input=_input(g, size=8))),
     "cannot run on the input its spec describes"),
    ("input RGB for a grey model", ".safetensors",
     _st(lambda g: _meta(g, input=_input(g, channels=3, mean=[0.5], std=[0.5]))), "cannot run on the input"),
    # the architecture against the stored tensors
    ("arch kwargs for 36 GB (width 1000)", ".safetensors", _width(1000), "more than fer-desktop loads"),
    ("arch kwargs of another size (width 0.5)", ".safetensors", _width(0.5),
     "wrong shape (first stages.0.0.weight: file (8, 1, 3, 3) vs model (16, 1, 3, 3)"),
    ("arch kwargs unusable", ".safetensors", _width("wide"), "cannot build architecture 'fastcnn'"),
    ("a tensor missing", ".safetensors", _st(state_fn=lambda g: _state(g, drop=WEIGHT)), f"1 missing (first {WEIGHT})"),
    ("a tensor too many", ".safetensors", _st(state_fn=lambda g: _state(g, add={"extra.weight": torch.zeros(2)})),
     "1 unexpected (first extra.weight)"),
    # the values
    ("NaN weights", ".safetensors", _st(state_fn=lambda g: _state(g, WEIGHT, _with_nan)),
     f"tensor {WEIGHT!r} holds 3 non-finite value(s)"),
    ("infinite weights", ".safetensors", _st(state_fn=lambda g: _state(g, WEIGHT, _with_inf)),
     f"tensor {WEIGHT!r} holds 1 non-finite value(s)"),
    ("NaN weights in a .pt", ".pt",
     lambda g, p: _write_pt(p, {ck.META_KEY: g["meta"], "state_dict": _state(g, "head.fc.bias", _with_nan)}),
     "tensor 'head.fc.bias' holds 3 non-finite"),
    ("integer weights", ".safetensors", _st(state_fn=lambda g: _state(g, WEIGHT, lambda t: (t * 100).long())),
     f"tensor {WEIGHT!r} is stored as int64, expected floating-point weights"),
    ("float64 weights beyond float32", ".safetensors",
     _st(state_fn=lambda g: _state(g, WEIGHT, lambda t: t.double().index_fill(0, torch.tensor([0]), 1e300))),
     "non-finite"),
]


# ------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def good(fastcnn_checkpoint):
    """The trained fixture: its model, info, metadata document and stored tensors."""
    loaded = ck.load(fastcnn_checkpoint)
    meta, state, _ = ck._read(fastcnn_checkpoint)
    return {"path": fastcnn_checkpoint, "model": loaded.model, "info": loaded.info, "meta": meta, "state": state}


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("img") / "face.png"
    cv2.imwrite(str(path), np.full((64, 64, 3), 128, np.uint8))
    return path


def _one_line_naming(text: str, path: Path, fragment: str) -> None:
    lines = text.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got {text!r}"
    assert "Traceback" not in text and "weights_only" not in text, text
    assert str(path) in lines[0], f"the message must name the file: {lines[0]!r}"
    assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"


@pytest.mark.parametrize("case,suffix,build,fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_checkpoint(case, suffix, build, fragment, good, image, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where the pickled payload would write PWNED
    path = build(good, tmp_path / f"bad{suffix}")
    with pytest.raises(ck.CheckpointError) as exc:
        ck.load(path)
    _one_line_naming(str(exc.value), path, fragment)
    with pytest.raises(ck.CheckpointError) as exc:
        ck.read_info(path)
    assert fragment in str(exc.value)
    capsys.readouterr()
    for argv in (["info", str(path)], ["predict", str(image), "--checkpoint", str(path)]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        _one_line_naming(err, path, fragment)
        assert err.startswith("fer: error: ")
    assert not (tmp_path / "PWNED").exists(), "code from the file ran"


def test_unreadable_file(good, image, tmp_path, capsys, monkeypatch):
    """chmod 000: refused with one line (as root, where chmod does not stop reading, the refusal of open() is
    simulated)."""
    path = ck.save(tmp_path / "locked.safetensors", good["model"], good["info"])
    path.chmod(0)
    if os.geteuid() == 0:
        real_open = os.open

        def refusing_open(p, *a, **kw):
            if os.fspath(p) == str(path):
                raise PermissionError(13, "Permission denied", str(p))
            return real_open(p, *a, **kw)

        monkeypatch.setattr(os, "open", refusing_open)
    try:
        with pytest.raises(ck.CheckpointError) as exc:
            ck.load(path)
        _one_line_naming(str(exc.value), path, "permission denied")
        for argv in (["info", str(path)], ["predict", str(image), "--checkpoint", str(path)]):
            assert main(argv) == 2
            _one_line_naming(capsys.readouterr().err, path, "permission denied")
    finally:
        path.chmod(0o644)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
def test_fifo_is_refused_without_blocking(tmp_path, image):
    """A FIFO given as the checkpoint: opening it to read would block until a writer comes; it is refused at once
    (run in a child process with a timeout, so a regression fails instead of hanging the suite)."""
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    code = ("import sys\nfrom ferengine import checkpoint as ck\nfrom ferengine.cli import main\n"
            "try:\n    ck.load(sys.argv[1])\nexcept ck.CheckpointError as e:\n    print('LOAD', e)\n"
            "sys.exit(main(['info', sys.argv[1]]) * 10 + main(['predict', sys.argv[2], '--checkpoint', sys.argv[1]]))\n")
    proc = subprocess.run([sys.executable, "-c", code, str(fifo), str(image)], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 22, proc.stderr
    assert proc.stdout.startswith("LOAD ") and "named pipe (FIFO)" in proc.stdout, proc.stdout
    err = proc.stderr.strip().splitlines()
    assert len(err) == 2 and all(str(fifo) in e and "named pipe (FIFO)" in e for e in err), proc.stderr


# ------------------------------------------------------------------------------------------- good files


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_good_checkpoint_on_a_non_utf8_path(suffix, good, tmp_path, capsys):
    """A good checkpoint whose name is not valid UTF-8 (byte 0xff) loads as on a plain path, with the very same
    outputs; given as bytes, as the str Python makes of it (surrogate escapes), or as a Path."""
    from conftest import patterns
    from ferengine.preprocess import to_model_input

    plain = ck.save(tmp_path / f"plain{suffix}", good["model"], good["info"])
    raw = os.path.join(os.fsencode(tmp_path), b"model-\xff\xfe" + suffix.encode())
    with open(raw, "wb") as fh:
        fh.write(plain.read_bytes())
    name = os.fsdecode(raw)
    ref = ck.load(plain)
    x = torch.from_numpy(to_model_input(patterns(12, 5).images.numpy(), ref.spec))
    with torch.no_grad():
        want = ref.model(x)["logits"]
        assert float((want.softmax(1) - want.softmax(1)[:1]).abs().max()) > 0.2, "outputs must depend on the input"
        for p in (raw, name, Path(name)):
            loaded = ck.load(p)
            assert torch.equal(loaded.model(x)["logits"], want)
            assert loaded.info == ref.info and ck.read_info(p) == ref.info
    assert main(["info", name]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["labels"] == list(ref.info.labels) and "Traceback" not in out.err


def test_good_checkpoint_loads(good, capsys):
    loaded = ck.load(good["path"])
    assert loaded.info == good["info"] and not loaded.model.training
    assert main(["info", str(good["path"])]) == 0
    assert json.loads(capsys.readouterr().out)["arch"] == "fastcnn"


def test_a_bad_file_on_a_non_utf8_path_is_named_printably(tmp_path):
    raw = os.path.join(os.fsencode(tmp_path), b"bad-\xff.safetensors")
    with open(raw, "wb") as fh:
        fh.write(b"")
    with pytest.raises(ck.CheckpointError, match=r"bad-\\xff\.safetensors: empty file") as exc:
        ck.load(raw)
    str(exc.value).encode("utf-8")  # printable on any UTF-8 terminal (no lone surrogates)


def test_reserved_class_names_are_the_result_fields():
    """The names a class may not have are exactly the per-face fields of the result rows (CSV columns and JSON
    keys), so a new result field cannot slip past the checkpoint check."""
    from ferengine.labels import RESERVED_CLASS_NAMES
    from ferengine.pipeline import FaceResult, FrameResult
    from ferengine.results import LEADING_COLUMNS, TRAILING_COLUMNS, frame_result_to_dicts

    face = FaceResult(face_id=0, box=(1.0, 2.0, 3.0, 4.0), score=0.9, keypoints=np.zeros((6, 2), np.float32),
                      probs=np.array([1.0], np.float32), label="c", confidence=1.0, valence=0.0, arousal=0.0,
                      av_source="estimated")
    (row,) = frame_result_to_dicts(FrameResult(0, 0.0, [face], {}, labels=("c",)))
    assert set(row) - {"c"} == RESERVED_CLASS_NAMES
    assert set(LEADING_COLUMNS) | set(TRAILING_COLUMNS) <= RESERVED_CLASS_NAMES


def test_save_refuses_metadata_load_would_refuse(good, tmp_path):
    import dataclasses

    info = dataclasses.replace(good["info"], labels=["happy"] * 7)
    with pytest.raises(ck.CheckpointError, match="name the same class"):
        ck.save(tmp_path / "dup.safetensors", good["model"], info)
    assert not (tmp_path / "dup.safetensors").exists()
