"""TensorRT engines on a machine without a GPU: TensorRT-RTX builds them ahead of time (CI installs
``.[tensorrt-rtx]``). Every registered model builds; the fp16 graph an engine is built from agrees with the fp32 one
under onnxruntime; engines are cached by what they depend on; truncated, foreign and stale engine files are found
out and rebuilt or refused with the reason; the backend and ``fer backends`` say what GPU running one needs and what
they found. Running engines needs an RTX-class GPU: those tests are in test_backends (skipped here)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ferengine import checkpoint as ck
from ferengine import export
from ferengine import trt as trtmod
from ferengine.backends import BackendUnavailable, available_backends, create_backend
from ferengine.cli import main
from ferengine.models import create_model, list_models, model_cfg
from ferengine.preprocess import to_model_input

from conftest import patterns
from test_models import _head_kwargs, _info, _trained_stats

CAN_BUILD = trtmod.tensorrt_build_reason() is None
HAS_CUDA = torch.cuda.is_available()
needs_builder = pytest.mark.skipif(not CAN_BUILD, reason=f"no TensorRT builder here: {trtmod.tensorrt_build_reason()}")


def _faces(loaded, n: int = 16, seed: int = 3) -> np.ndarray:
    """Real inputs of the kind the trained fixtures learnt (the patterns), preprocessed as inference does."""
    ds = patterns(n, seed, size=loaded.spec.size)
    return to_model_input([ds.images[i] for i in range(n)], loaded.spec)


def _ort(path, x):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"input": x})))


# ------------------------------------------------------------------------------------------- fp16


@pytest.mark.parametrize("fixture", ["fastcnn_checkpoint", "fastcnn_av_checkpoint"])
def test_fp16_graph_agrees_with_fp32_under_onnxruntime(fixture, request, tmp_path):
    import onnx

    loaded = ck.load(request.getfixturevalue(fixture))
    f32 = export.export_onnx(loaded, tmp_path / "m32.onnx")
    f16 = export.onnx_to_fp16(f32, tmp_path / "m16.onnx")
    proto = onnx.load(str(f16))
    kinds = {init.data_type for init in proto.graph.initializer if len(init.dims)}
    assert onnx.TensorProto.FLOAT16 in kinds and onnx.TensorProto.FLOAT not in kinds, "weights were not converted"
    io = [v.type.tensor_type.elem_type for v in (*proto.graph.input, *proto.graph.output)]
    assert set(io) == {onnx.TensorProto.FLOAT}, "the engine's input and outputs must stay float32"
    assert {p.key: p.value for p in proto.metadata_props}["fer_precision"] == "fp16"

    x = _faces(loaded)
    a, b = _ort(f32, x), _ort(f16, x)
    assert set(a) == set(b) == set(export.output_names(loaded.info.heads))
    for k in a:
        assert a[k].dtype == b[k].dtype == np.float32
        diff = float(np.abs(a[k] - b[k]).max())
        assert diff < 1e-2, f"{k}: fp16 and fp32 graphs differ by {diff:.2e}"
        spread = float(np.abs(a[k] - a[k][:1]).max())
        assert spread > 0.2, f"{k}: the model's outputs do not depend on its input (spread {spread:.3f})"
        assert diff < spread / 20


# ---------------------------------------------------------------------------------------- builds


def _small_loaded(name: str, tmp_path):
    torch.manual_seed(0)
    kwargs = {**model_cfg(name).test_kwargs, **_head_kwargs(name, 7, False)}
    model = create_model(name, **kwargs)
    _trained_stats(model)
    return ck.load(ck.save(tmp_path / f"{name}.safetensors", model, _info(name, model, kwargs)))


@needs_builder
@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_builds_an_engine(name, tmp_path):
    loaded = _small_loaded(name, tmp_path)
    t = trtmod.import_tensorrt("build")
    # verify=False: test_models checks every model's ONNX export against torch; this test is about the build
    path, built = export.tensorrt_engine(loaded, tmp_path / f"{name}.engine", max_batch=4, verify=False)
    assert built and path.stat().st_size > 0
    record = json.loads(export.sidecar_path(path).read_text())
    assert record["flavour"] == t.flavour and record["version"] == t.version and record["precision"] == "fp16"
    assert record["batch"] == [1, 4, 4] and record["input"] == [loaded.spec.channels, loaded.spec.size, loaded.spec.size]
    assert record["outputs"] == list(export.output_names(loaded.info.heads))
    if t.rtx:
        assert record["targets"] == list(t.default_targets()) and "7.5" not in record["targets"]
    key = export.engine_key(loaded, t, precision="fp16", max_batch=4, opt_batch=4, targets=t.default_targets())
    assert record["key"] == key
    export.check_engine(path, t, key=key)  # a fresh build passes its own checks
    assert export.tensorrt_engine(loaded, path, max_batch=4) == (path, False), "an up-to-date engine was rebuilt"


@needs_builder
def test_build_reports_progress_to_the_end(fastcnn_checkpoint, tmp_path):
    loaded = ck.load(fastcnn_checkpoint)
    seen = []
    export.tensorrt_engine(loaded, tmp_path / "m.engine", progress=lambda f, m: seen.append((f, m)))
    fractions = [f for f, _ in seen if f is not None]
    assert len(seen) > 5 and fractions == sorted(fractions) and fractions[-1] == 1.0
    assert all(isinstance(m, str) and m for _, m in seen)
    assert any("ONNX" in m for _, m in seen) and any("/" in m for _, m in seen)  # a builder phase "k/n"


@needs_builder
def test_engine_cache_key_follows_weights_precision_batch_and_targets(fastcnn_checkpoint, tmp_path):
    loaded = ck.load(fastcnn_checkpoint)
    t = trtmod.import_tensorrt("build")
    base = dict(precision="fp16", max_batch=16, opt_batch=4, targets=t.default_targets())
    k = export.engine_key(loaded, t, **base)
    assert k == export.engine_key(loaded, t, **base)
    assert k != export.engine_key(loaded, t, **{**base, "precision": "fp32"})
    assert k != export.engine_key(loaded, t, **{**base, "max_batch": 32})
    if t.rtx:
        assert k != export.engine_key(loaded, t, **{**base, "targets": ("8.6",)})
    other = ck.load(fastcnn_checkpoint)
    with torch.no_grad():
        next(other.model.parameters()).add_(1e-3)
    assert k != export.engine_key(other, t, **base)


# ------------------------------------------------------------------------------ bad engine files


@pytest.fixture()
def engine(fastcnn_checkpoint, tmp_path):
    if not CAN_BUILD:
        pytest.skip(f"no TensorRT builder here: {trtmod.tensorrt_build_reason()}")
    loaded = ck.load(fastcnn_checkpoint)
    path, _ = export.tensorrt_engine(loaded, tmp_path / "m.engine")
    return loaded, path


def test_truncated_engine_is_found_out_and_rebuilt(engine):
    loaded, path = engine
    t = trtmod.import_tensorrt("build")
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 3])
    with pytest.raises(export.EngineError, match="truncated or damaged"):
        export.check_engine(path, t)
    again, built = export.tensorrt_engine(loaded, path)
    assert built and path.read_bytes()[:4] == good[:4] and len(path.read_bytes()) == len(good)
    export.check_engine(path, t)


def test_foreign_empty_and_stale_engines_say_why(engine, tmp_path):
    loaded, path = engine
    t = trtmod.import_tensorrt("build")
    if t.rtx:
        junk = tmp_path / "full.engine"
        junk.write_bytes(b"ftrt" + bytes(4096))
        with pytest.raises(export.EngineError, match=f"not a {t.label} engine"):
            export.check_engine(junk, t)
    empty = tmp_path / "empty.engine"
    empty.write_bytes(b"")
    with pytest.raises(export.EngineError, match="empty"):
        export.check_engine(empty, t)
    with pytest.raises(export.EngineError, match="no such engine file"):
        export.check_engine(tmp_path / "none.engine", t)
    side = export.sidecar_path(path)
    record = json.loads(side.read_text())
    side.write_text(json.dumps({**record, "version": "0.9.0", "tensorrt": "TensorRT-RTX 0.9.0"}))
    with pytest.raises(export.EngineError, match="built by TensorRT-RTX 0.9.0"):
        export.check_engine(path, t)
    side.write_text(json.dumps(record))
    with pytest.raises(export.EngineError, match="stale"):
        export.check_engine(path, t, key="0" * 64)
    side.write_text("{not json")
    with pytest.raises(export.EngineError, match="unreadable engine record"):
        export.check_engine(path, t)
    _, built = export.tensorrt_engine(loaded, path)  # a broken record: rebuilt, not trusted
    assert built and json.loads(side.read_text())["key"] == record["key"]


@needs_builder
def test_validity_diagnostics_are_decoded_from_their_bits():
    """TensorRT-RTX's own header check answers with bit flags; a file that is not an engine is malformed."""
    t = trtmod.import_tensorrt("build")
    if not t.rtx:
        pytest.skip("get_engine_validity is a TensorRT-RTX API")
    validity, diagnostics = export._validity(t, bytes(4096))
    assert validity == "INVALID" and diagnostics == "malformed engine"


def test_engine_of_other_weights_is_rebuilt_not_loaded(engine, fastcnn_av_checkpoint):
    loaded, path = engine
    other = ck.load(fastcnn_av_checkpoint)
    before = json.loads(export.sidecar_path(path).read_text())["key"]
    _, built = export.tensorrt_engine(other, path)
    after = json.loads(export.sidecar_path(path).read_text())
    assert built and after["key"] != before and after["outputs"] == ["probs", "va"]


# ---------------------------------------------------------------------------------- what it needs


@pytest.mark.skipif(HAS_CUDA, reason="a GPU is present")
def test_backend_says_running_needs_a_gpu_and_what_it_found(fastcnn_checkpoint):
    reason = available_backends()["tensorrt"]
    assert reason
    with pytest.raises(BackendUnavailable) as err:
        create_backend("tensorrt", ck.load(fastcnn_checkpoint))
    msg = str(err.value)
    assert reason in msg and "found: no CUDA GPU" in msg
    if CAN_BUILD:
        t = trtmod.import_tensorrt("build")
        assert t.label in msg and ("RTX-class GPU" in msg if t.rtx else "NVIDIA GPU" in msg)


def test_tensorrt_rtx_refuses_a_gpu_it_does_not_target(monkeypatch):
    """TensorRT-RTX's runtime does not target Hopper: on an H200 the backend must say so and point to full
    TensorRT or torch, not try and fail."""
    try:
        t = trtmod._try_import("tensorrt-rtx")
    except Exception:  # pragma: no cover
        t = None
    if not isinstance(t, trtmod.TensorRT):
        pytest.skip("TensorRT-RTX is not installed")
    monkeypatch.setattr(trtmod, "cuda_reason", lambda: None)
    monkeypatch.setattr(trtmod, "gpu_cc", lambda device=None: ("NVIDIA H200", "9.0"))
    msg = trtmod._run_reason(t)
    assert "NVIDIA H200" in msg and "9.0" in msg and "does not target" in msg and "fer-desktop[tensorrt]" in msg
    monkeypatch.setattr(trtmod, "gpu_cc", lambda device=None: ("NVIDIA GeForce RTX 4090", "8.9"))
    assert trtmod._run_reason(t) is None


def test_flavour_can_be_forced_and_a_bad_choice_is_named(monkeypatch):
    monkeypatch.setenv(trtmod.FLAVOUR_ENV, "cuda-magic")
    with pytest.raises(BackendUnavailable, match="FER_TENSORRT='cuda-magic'"):
        trtmod.import_tensorrt()
    for flavour in trtmod.FLAVOURS:
        monkeypatch.setenv(trtmod.FLAVOUR_ENV, flavour)
        found = trtmod._try_import(flavour)
        if isinstance(found, trtmod.TensorRT):
            assert trtmod.import_tensorrt().flavour == flavour
        else:
            with pytest.raises(BackendUnavailable):
                trtmod.import_tensorrt()


@needs_builder
def test_targets_are_parsed_and_checked():
    from ferengine.errors import InvalidValue

    t = trtmod.import_tensorrt("build")
    if not t.rtx:
        pytest.skip("compute-capability targets are a TensorRT-RTX option")
    assert export.parse_targets("86, 8.9,89", t) == ("8.6", "8.9")
    assert export.parse_targets(None, t) == t.default_targets()
    assert export.parse_targets("current", t) == ("current",)
    with pytest.raises(InvalidValue, match="'9.0' is not a compute capability"):
        export.parse_targets("9.0", t)


# ------------------------------------------------------------------------------------------- CLI


@needs_builder
def test_fer_export_tensorrt_builds_keeps_and_rebuilds(fastcnn_checkpoint, tmp_path, capsys):
    out = tmp_path / "m.engine"
    args = ["export", "--format", "tensorrt", "-c", str(fastcnn_checkpoint), "-o", str(out), "--max-batch", "8"]
    assert main(args) == 0
    err = capsys.readouterr().err
    t = trtmod.import_tensorrt("build")
    assert f"wrote {out}" in err and t.label in err and "fp16" in err and "batch 1..8" in err
    assert main(args) == 0
    assert "up to date, kept" in capsys.readouterr().err
    assert main([*args, "--fp32"]) == 0
    assert json.loads(export.sidecar_path(out).read_text())["precision"] == "fp32"
    capsys.readouterr()
    if t.rtx:
        assert main([*args, "--targets", "9.0"]) == 2
        assert "'9.0' is not a compute capability" in capsys.readouterr().err


def test_fer_backends_names_the_flavour(capsys):
    assert main(["backends"]) == 0
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("tensorrt")][0]
    if CAN_BUILD:
        t = trtmod.import_tensorrt("build")
        assert t.label in line
        if not HAS_CUDA and t.rtx:
            assert "can build engines here" in line and "needs an NVIDIA RTX-class GPU" in line
    else:
        assert "unavailable" in line
