"""The checkpoint contract: round trip, and one clear error for each way a file can be wrong."""
from __future__ import annotations

import json
import pickle
import zipfile

import pytest
import torch

from ferengine import checkpoint as ck
from ferengine.labels import LABEL_SETS
from ferengine.models import create_model
from ferengine.preprocess import InputSpec

LABELS = list(LABEL_SETS["fer7"])


def _info(**kw) -> ck.CheckpointInfo:
    base = dict(arch="fastcnn", arch_kwargs={"width": 0.5}, labels=LABELS, input=InputSpec(size=48),
                name="test", training={"command": "pytest"}, metrics={"accuracy": 12.5})
    base.update(kw)
    return ck.CheckpointInfo(**base)


def _model():
    torch.manual_seed(0)
    return create_model("fastcnn", width=0.5).eval()


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_round_trip_identical_outputs(tmp_path, suffix):
    model = _model()
    path = ck.save(tmp_path / f"m{suffix}", model, _info())
    loaded = ck.load(path)
    x = torch.randn(4, 1, 48, 48)
    with torch.no_grad():
        assert torch.equal(model(x)["logits"], loaded.model(x)["logits"])
    assert not loaded.model.training
    assert loaded.info.labels == LABELS
    assert loaded.info.arch_kwargs == {"width": 0.5}
    assert loaded.spec == InputSpec(size=48)
    assert loaded.info.metrics == {"accuracy": 12.5}
    assert ck.read_info(path).name == "test"


def test_half_precision_is_smaller_and_close(tmp_path, fastcnn_checkpoint):
    from conftest import patterns
    from ferengine.preprocess import to_model_input

    trained = ck.load(fastcnn_checkpoint)  # a model trained for real: its outputs depend on the input
    model, info = trained.model, trained.info
    full = ck.save(tmp_path / "full.safetensors", model, info)
    half = ck.save(tmp_path / "half.safetensors", model, info, half=True)
    assert half.stat().st_size < 0.6 * full.stat().st_size
    assert ck.stored_dtypes(half) == ["float16"] and ck.stored_dtypes(full) == ["float32"]
    loaded = ck.load(half)
    assert next(loaded.model.parameters()).dtype == torch.float32
    x = torch.from_numpy(to_model_input(patterns(8, 7).images.numpy(), trained.spec))
    with torch.no_grad():
        p0 = model(x)["logits"].softmax(1)
        p1 = loaded.model(x)["logits"].softmax(1)
    assert (p0 - p0[:1]).abs().max() > 0.2, "a round trip of a model that ignores its input would prove nothing"
    assert (p0 - p1).abs().max() < 1e-2
    assert not torch.equal(p0, p1), "fp16 storage rounds the weights"


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path, monkeypatch):
    path = ck.save(tmp_path / "m.safetensors", _model(), _info())
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        ck.save(path, create_model("fastcnn", width=0.5), _info())
    assert path.read_bytes() == before  # the old file survived the failed write
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_truncated_file(tmp_path, suffix):
    path = ck.save(tmp_path / f"m{suffix}", _model(), _info())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ck.CheckpointError, match="damaged or truncated"):
        ck.load(path)


def test_file_of_another_format(tmp_path):
    path = tmp_path / "photo.safetensors"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 100)
    with pytest.raises(ck.CheckpointError, match="not a fer-desktop checkpoint"):
        ck.load(path)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(ck.CheckpointError, match="empty file"):
        ck.load(empty)


def test_plain_state_dict_is_explained(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save(_model().state_dict(), path)
    with pytest.raises(ck.CheckpointError, match="not a fer-desktop checkpoint.*state_dict"):
        ck.load(path)
    from safetensors.torch import save_file

    st = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in _model().state_dict().items()}, str(st))
    with pytest.raises(ck.CheckpointError, match="without fer-desktop metadata"):
        ck.load(st)


class Evil:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_pickled_code_is_never_executed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    torch.save({"fer_checkpoint": {}, "state_dict": {}, "payload": Evil()}, path)
    with pytest.raises(ck.CheckpointError, match="refused to load"):
        ck.load(path)
    assert not (tmp_path / "PWNED").exists()


def test_unknown_architecture(tmp_path):
    path = ck.save(tmp_path / "m.safetensors", _model(), _info(arch="no_such_net"))
    with pytest.raises(ck.CheckpointError, match="unknown architecture 'no_such_net'"):
        ck.load(path)


def test_weights_that_do_not_match(tmp_path):
    path = ck.save(tmp_path / "m.safetensors", _model(), _info(arch_kwargs={"width": 1.0}))
    with pytest.raises(ck.CheckpointError, match="weights do not match.*wrong shape"):
        ck.load(path)
    other = ck.save(tmp_path / "r.safetensors", create_model("resnet18"), _info(arch_kwargs={}))
    with pytest.raises(ck.CheckpointError, match="missing.*unexpected"):
        ck.load(other)


def test_label_count_and_heads_are_checked(tmp_path):
    path = ck.save(tmp_path / "m.safetensors", _model(), _info(labels=LABELS[:5]))
    with pytest.raises(ck.CheckpointError, match="5 labels for a 7-class model"):
        ck.load(path)
    path = ck.save(tmp_path / "h.safetensors", _model(), _info(heads=["expression", "valence_arousal"]))
    with pytest.raises(ck.CheckpointError, match="heads"):
        ck.load(path)


def test_bad_metadata(tmp_path):
    path = ck.save(tmp_path / "m.pt", _model(), _info())
    obj = torch.load(path, weights_only=True)
    obj["fer_checkpoint"]["format_version"] = 99
    torch.save(obj, path)
    with pytest.raises(ck.CheckpointError, match="newer than this fer-desktop"):
        ck.load(path)
    del obj["fer_checkpoint"]["input"]
    obj["fer_checkpoint"]["format_version"] = 1
    torch.save(obj, path)
    with pytest.raises(ck.CheckpointError, match="lacks the required field 'input'"):
        ck.load(path)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(ck.CheckpointError, match="no such file"):
        ck.load(tmp_path / "nope.safetensors")
    with pytest.raises(ck.CheckpointError, match="is a folder"):
        ck.load(tmp_path)


def test_default_checkpoint_missing_is_explained(tmp_path, monkeypatch):
    monkeypatch.setenv("FER_DESKTOP_ASSETS", str(tmp_path))
    with pytest.raises(ck.CheckpointError, match="no default model"):
        ck.default_checkpoint_path()


def test_crop_note_says_when_a_checkpoint_has_no_calibration(tmp_path, capsys):
    import dataclasses
    import json

    from conftest import make_checkpoint
    from ferengine.cli import main

    path = make_checkpoint(tmp_path / "m.safetensors")
    info = ck.read_info(path)
    assert "no crop calibration recorded" in ck.crop_note(info) and "margin 0.25" in ck.crop_note(info)
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr()
    d = json.loads(out.out)
    assert d["crop"]["calibrated"] is False and "no crop calibration" in out.err
    calibrated = dataclasses.replace(info, training={**info.training, "crop_calibration": {
        "crop_margin": 0.15, "crop_offset_y": -0.097, "how": "measured for fer2013"}})
    assert ck.crop_note(calibrated) is None
    assert ck.crop_note(ck.read_info(ck.default_checkpoint_path())) is None, "the shipped model is calibrated"
