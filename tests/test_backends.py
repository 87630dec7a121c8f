"""Backends: availability reasons, "auto" resolution, the ONNX cache, agreement with torch, bad input."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import ferengine.backends as backends
from ferengine import checkpoint as ck
from ferengine import export
from ferengine.backends import BACKENDS, BackendUnavailable, available_backends, create_backend
from ferengine.models import create_model
from ferengine.preprocess import InputSpec

LABELS = ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"]
HAS_CUDA = torch.cuda.is_available()
from ferengine.trt import installed, tensorrt_build_reason  # noqa: E402

HAS_TRT = bool(installed())  # full TensorRT or TensorRT-RTX
needs_gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("shared_cache")


@pytest.fixture(autouse=True)
def _isolated_cache(shared_cache, monkeypatch):
    """Exports go to a cache of this module's own (never ~/.cache), shared by its tests: the same
    random checkpoint is exported once."""
    monkeypatch.setenv("FER_DESKTOP_CACHE", str(shared_cache))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache for the tests about the cache itself."""
    root = tmp_path / "cache"
    monkeypatch.setenv("FER_DESKTOP_CACHE", str(root))
    return root


def _save(path, *, seed: int = 0, av_head: bool = True):
    torch.manual_seed(seed)
    kwargs = {"num_classes": 7, "width": 0.5, "av_head": av_head}
    model = create_model("fastcnn", **kwargs)
    model.train()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        model(torch.randn(4, 1, 48, 48) + 0.3)
    model.eval()
    heads = ["expression"] + (["valence_arousal"] if av_head else [])
    info = ck.CheckpointInfo(arch="fastcnn", arch_kwargs=kwargs, labels=LABELS, heads=heads,
                             input=InputSpec(size=48, channels=1), name="random fastcnn")
    return ck.save(path, model, info)


@pytest.fixture
def loaded(fastcnn_av_checkpoint):
    """A tiny fastcnn trained for real, with both heads (fresh object per test: tests may alter it)."""
    return ck.load(fastcnn_av_checkpoint)


def _batch(n: int, seed: int = 0) -> np.ndarray:
    """Preprocessed faces the tiny model tells apart (the patterns it was trained on)."""
    from conftest import patterns
    from ferengine.preprocess import to_model_input

    return to_model_input(patterns(n, 1000 + seed).images.numpy(), InputSpec(size=48, channels=1))


# ------------------------------------------------------------------------------------- availability


def test_available_backends_lists_every_backend():
    avail = available_backends()
    assert tuple(avail) == BACKENDS
    assert avail["torch"] is None
    assert avail["onnxruntime"] is None  # a hard dependency, installed with the tests


@pytest.mark.skipif(HAS_TRT and HAS_CUDA, reason="TensorRT is usable here")
def test_tensorrt_reported_unavailable_with_reason():
    reason = available_backends()["tensorrt"]
    assert isinstance(reason, str) and reason
    if not HAS_TRT:
        assert "TensorRT is not installed" in reason and "pip install 'fer-desktop[tensorrt]'" in reason
        assert "fer-desktop[tensorrt-rtx]" in reason
    elif not HAS_CUDA:
        assert "running an engine needs an NVIDIA" in reason and "found: no CUDA GPU" in reason


@pytest.mark.skipif(HAS_TRT and HAS_CUDA, reason="TensorRT is usable here")
def test_create_tensorrt_raises_with_that_reason(loaded):
    reason = available_backends()["tensorrt"]
    with pytest.raises(BackendUnavailable) as err:
        create_backend("tensorrt", loaded)
    assert reason in str(err.value)
    if tensorrt_build_reason() is None:  # TensorRT-RTX builds without a GPU
        with pytest.raises(export.ExportError, match="missing.onnx: no such ONNX file"):
            export.build_tensorrt_engine("missing.onnx", "missing.engine")
    else:
        with pytest.raises(BackendUnavailable, match="cannot build a TensorRT engine"):
            export.build_tensorrt_engine("missing.onnx", "missing.engine")


def test_importing_ferengine_imports_no_optional_runtime():
    code = ("import sys, ferengine, ferengine.backends, ferengine.export, ferengine.backends.tensorrt_backend; "
            "print(sorted(m for m in ('tensorrt', 'tensorrt_rtx', 'tensorrt_rtx_bindings', 'onnxruntime', 'onnx') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_unknown_backend_name(loaded):
    with pytest.raises(ValueError, match="unknown backend"):
        create_backend("openvino", loaded)


# ------------------------------------------------------------------------------------------- auto


@pytest.mark.skipif(HAS_CUDA, reason="a GPU is present")
def test_auto_on_cpu_is_onnxruntime(loaded):
    assert backends.auto_order("auto") == ["onnxruntime", "torch"]
    with create_backend("auto", loaded) as be:
        assert be.name == "onnxruntime" and be.device == "CPUExecutionProvider"


def test_auto_prefers_tensorrt_then_torch_on_a_gpu():
    assert backends.auto_order("cuda") == ["tensorrt", "torch"]
    assert backends.auto_order("cpu") == ["onnxruntime", "torch"]


def test_auto_falls_back_to_torch_without_onnxruntime(loaded, monkeypatch):
    monkeypatch.setattr(backends, "_onnxruntime_reason", lambda: "onnxruntime is not installed (test)")
    with create_backend("auto", loaded, device="cpu") as be:
        assert be.name == "torch" and be.device == "cpu"
    with pytest.raises(BackendUnavailable, match=r"not installed \(test\)"):
        create_backend("onnxruntime", loaded)


def test_auto_falls_back_to_torch_when_export_fails(loaded, cache, monkeypatch):
    def broken(*a, **k):
        raise export.ExportError("cannot export (test)")

    monkeypatch.setattr(export, "export_onnx", broken)
    with create_backend("auto", loaded, device="cpu") as be:
        assert be.name == "torch"


# ------------------------------------------------------------------------------------------ cache


def test_onnx_cache_is_reused_and_keyed_by_the_checkpoint(tmp_path, cache, monkeypatch):
    ckpt = _save(tmp_path / "model.safetensors", seed=0)
    first = create_backend("onnxruntime", ck.load(ckpt))
    path = first.onnx_path
    assert path.parent == cache / "onnx" and path.is_file()
    stamp = path.stat().st_mtime_ns
    first.close()

    real_export = export.export_onnx

    def no_export(*a, **k):
        raise AssertionError("exported again although the cache holds this checkpoint")

    monkeypatch.setattr(export, "export_onnx", no_export)
    again = create_backend("onnxruntime", ck.load(ckpt))  # a fresh load of the same file
    assert again.onnx_path == path and path.stat().st_mtime_ns == stamp
    again.close()

    monkeypatch.setattr(export, "export_onnx", real_export)
    _save(ckpt, seed=1)  # the same file name and metadata, new weights
    changed = ck.load(ckpt)
    other = create_backend("onnxruntime", changed)
    assert other.onnx_path != path and other.onnx_path.is_file() and path.is_file()
    x = _batch(3)
    ref = create_backend("torch", changed).run(x)
    np.testing.assert_allclose(other.run(x)["probs"], ref["probs"], atol=1e-4)
    assert not list((cache / "onnx").glob(".*.tmp"))


def test_damaged_cache_entry_is_exported_again(loaded, cache):
    path = create_backend("onnxruntime", loaded).onnx_path
    path.write_bytes(b"not an onnx file")
    be = create_backend("onnxruntime", loaded)
    assert be.onnx_path == path and path.stat().st_size > 1000
    assert be.run(_batch(1))["probs"].shape == (1, 7)


# ------------------------------------------------------------------------------------- agreement


@pytest.mark.parametrize("n", [1, 7])
def test_torch_and_onnxruntime_agree(loaded, n):
    x = _batch(n, seed=n)
    with create_backend("torch", loaded, device="cpu") as tb, create_backend("onnxruntime", loaded, device="cpu") as ob:
        a, b = tb.run(x), ob.run(x)
    assert set(a) == set(b) == {"probs", "va"}
    for k in a:
        assert a[k].shape == b[k].shape == (n, 7 if k == "probs" else 2) and b[k].dtype == np.float32
        diff = np.abs(a[k] - b[k]).max()
        assert diff < 1e-4, f"{k}: max abs diff {diff:.2e}"
    np.testing.assert_allclose(b["probs"].sum(1), 1.0, atol=1e-5)
    assert np.abs(b["va"]).max() <= 1.0
    if n > 1:  # agreement of a model whose outputs do not depend on the input would prove nothing
        assert np.abs(a["probs"] - a["probs"][:1]).max() > 0.2 and np.abs(a["va"] - a["va"][:1]).max() > 0.1


def test_expression_only_checkpoint_gives_probs_only(tmp_path):
    loaded = ck.load(_save(tmp_path / "e.safetensors", av_head=False))
    for name in ("torch", "onnxruntime"):
        with create_backend(name, loaded) as be:
            assert set(be.run(_batch(2))) == {"probs"}


def test_backends_leave_the_loaded_model_alone(loaded):
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    loaded.model.train()
    for name in ("torch", "onnxruntime"):
        create_backend(name, loaded).close()
    assert loaded.model.training  # nobody switched it to eval behind our back
    after = loaded.model.state_dict()
    assert all(torch.equal(before[k], after[k]) and after[k].device.type == "cpu" for k in before)


def test_export_metadata_and_prebuilt_onnx_path(loaded, tmp_path):
    path = export.export_onnx(loaded, tmp_path / "out" / "model.onnx")
    info = export.read_onnx_info(path)
    assert info.to_dict() == loaded.info.to_dict()
    with create_backend("onnxruntime", loaded, onnx_path=path) as be:
        assert be.onnx_path == path
        np.testing.assert_allclose(be.run(_batch(2))["probs"], create_backend("torch", loaded).run(_batch(2))["probs"],
                                   atol=1e-4)
    other = ck.LoadedModel(loaded.model, ck.CheckpointInfo.from_dict(
        {**loaded.info.to_dict(), "labels": list(reversed(LABELS))}), loaded.path)
    with pytest.raises(ValueError, match="labels"):
        create_backend("onnxruntime", other, onnx_path=path)


def test_torchscript_exporter_and_auto_fallback(loaded, tmp_path, monkeypatch):
    import onnx

    ts = export.export_onnx(loaded, tmp_path / "ts.onnx", exporter="torchscript")
    meta = {p.key: p.value for p in onnx.load(str(ts)).metadata_props}
    assert meta["fer_exporter"] == "torchscript" and json.loads(meta["fer_checkpoint"])["arch"] == "fastcnn"

    def fail(*a, **k):
        raise RuntimeError("dynamo broke (test)")

    monkeypatch.setattr(export, "_export_dynamo", fail)
    fb = export.export_onnx(loaded, tmp_path / "fb.onnx")
    assert {p.key: p.value for p in onnx.load(str(fb)).metadata_props}["fer_exporter"] == "torchscript"
    with pytest.raises(export.ExportError, match="dynamo broke"):
        export.export_onnx(loaded, tmp_path / "no.onnx", exporter="dynamo")
    assert not (tmp_path / "no.onnx").exists()


def test_export_rejects_a_wrong_graph(loaded, tmp_path, monkeypatch):
    """The export's own comparison with torch catches a graph that computes something else."""
    real = export._export_torchscript

    def tampered(*a, **k):
        proto = real(*a, **k)
        for node in proto.graph.node:
            if node.op_type == "Softmax":
                node.op_type = "LogSoftmax"
        return proto

    monkeypatch.setattr(export, "_export_torchscript", tampered)
    with pytest.raises(export.ExportError, match="differ on probs"):
        export.export_onnx(loaded, tmp_path / "bad.onnx", exporter="torchscript")
    assert not (tmp_path / "bad.onnx").exists()


# ------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("name", ["torch", "onnxruntime"])
def test_bad_input_gives_a_clear_value_error(loaded, name):
    with create_backend(name, loaded, device="cpu") as be:
        for bad in (np.zeros((2, 3, 48, 48), np.float32), np.zeros((1, 48, 48), np.float32),
                    np.zeros((1, 1, 64, 64), np.float32)):
            with pytest.raises(ValueError, match=r"\(N, 1, 48, 48\)"):
                be.run(bad)
        with pytest.raises(ValueError, match="to_model_input"):
            be.run(np.zeros((1, 1, 48, 48), np.uint8))
        empty = be.run(np.zeros((0, 1, 48, 48), np.float32))
        assert empty["probs"].shape == (0, 7) and empty["va"].shape == (0, 2)
        ok = be.run(_batch(2).astype(np.float64))  # other float types are converted
        assert ok["probs"].dtype == np.float32
    with pytest.raises(RuntimeError, match="closed"):
        be.run(_batch(1))


@pytest.mark.skipif(HAS_CUDA, reason="a GPU is present")
def test_gpu_devices_without_a_gpu(loaded):
    with pytest.raises(BackendUnavailable, match="no CUDA GPU"):
        create_backend("torch", loaded, device="cuda")
    with pytest.raises(BackendUnavailable, match="onnxruntime-gpu"):
        create_backend("onnxruntime", loaded, device="cuda")
    with pytest.raises(ValueError, match="fp16"):
        create_backend("torch", loaded, device="cpu", precision="fp16")


# ----------------------------------------------------------------------------------- GPU (if any)


@needs_gpu
@pytest.mark.parametrize("precision,atol", [("fp32", 1e-3), ("fp16", 1e-2), ("bf16", 2e-2)])
def test_torch_cuda_agrees_with_cpu(loaded, precision, atol):
    # fp32 on CUDA may use TF32 convolutions (PyTorch's default for cuDNN), hence 1e-3
    x = _batch(5)
    ref = create_backend("torch", loaded, device="cpu").run(x)
    with create_backend("torch", loaded, device="cuda", precision=precision) as be:
        assert be.device.startswith("cuda")
        got = be.run(x)
    for k in ref:
        assert np.abs(got[k] - ref[k]).max() < atol


@needs_gpu
@pytest.mark.skipif(not HAS_TRT, reason="TensorRT is not installed")
def test_tensorrt_agrees_with_torch(loaded):
    x = _batch(20)  # more than max_batch=16: runs in chunks
    ref = create_backend("torch", loaded, device="cpu").run(x)
    with create_backend("tensorrt", loaded) as be:
        got = be.run(x)
        assert be.max_batch == 16
    for k in ref:
        assert got[k].shape == ref[k].shape and np.abs(got[k] - ref[k]).max() < 1e-2
