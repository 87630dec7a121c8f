"""The torch backend's GPU path: CUDA-graph buckets, padding and chunking (pure functions and the replay loop,
on the CPU), GPU-style preprocessing (parity with to_model_input on CPU tensors), the CPU rejection of the
CUDA-only options, the bench's GPU rows (with a stand-in backend) and, with a CUDA GPU only, graphs against
eager and fp16/bf16 against fp32 on a really trained tiny model."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from conftest import patterns
from ferengine import bench
from ferengine import checkpoint as ck
from ferengine.backends import BackendUnavailable, create_backend
from ferengine.backends.torch_backend import TorchBackend, bucket_for, chunk_plan, graph_buckets
from ferengine.graph import InferenceModule
from ferengine.preprocess import InputSpec, to_device_input, to_model_input

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")

# On CPU tensors to_device_input runs the very same torch ops, in the same memory layout, as to_model_input,
# so they agree bitwise (observed: 0.0). The bound leaves room for one float32 rounding step only.
CPU_PARITY_ATOL = 1e-6
# On CUDA the bilinear/antialiased resize and the grey conversion's sum run other kernels (other summation
# order, FMA): about 1e-6 in normalised units; 1e-4 is far below one grey level (1/255/0.5 = 7.8e-3).
CUDA_PARITY_ATOL = 1e-4


@pytest.fixture(scope="module")
def loaded(fastcnn_checkpoint):
    return ck.load(fastcnn_checkpoint)


def _faces(n: int, seed: int = 3) -> np.ndarray:
    return patterns(n, seed).images.numpy()  # uint8 (n, 48, 48): the classes the fixture model learnt


# ------------------------------------------------------------------------------------ buckets and chunks


def test_graph_buckets():
    assert graph_buckets(64) == (1, 2, 4, 8, 16, 32, 64)
    assert graph_buckets(24) == (1, 2, 4, 8, 16, 24)
    assert graph_buckets(1) == (1,)
    assert graph_buckets(2) == (1, 2)
    assert graph_buckets(np.int64(8)) == (1, 2, 4, 8)
    for bad in (0, -1, 5000, 2.5, "8", True, None):
        with pytest.raises(ValueError, match="max_batch"):
            graph_buckets(bad)


def test_bucket_for():
    b = graph_buckets(64)
    assert [bucket_for(n, b) for n in (1, 2, 3, 5, 8, 9, 33, 64)] == [1, 2, 4, 8, 8, 16, 64, 64]
    assert bucket_for(65, b) is None
    with pytest.raises(ValueError):
        bucket_for(0, b)


@pytest.mark.parametrize("max_batch", [1, 3, 16, 24, 64])
def test_chunk_plan_covers_every_row_once(max_batch):
    buckets = graph_buckets(max_batch)
    assert chunk_plan(0, buckets) == []
    for n in range(1, 3 * max_batch + 7):
        plan = chunk_plan(n, buckets)
        assert plan[0][0] == 0 and plan[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(plan, plan[1:]))  # contiguous, in order
        for start, stop, bucket in plan:
            assert bucket in buckets and 0 < stop - start <= bucket
            assert bucket == bucket_for(stop - start, buckets)  # the smallest bucket that holds the chunk
        assert all(stop - start == max_batch for start, stop, _ in plan[:-1])  # only the last chunk is partial
    assert chunk_plan(70, graph_buckets(64)) == [(0, 64, 64), (64, 70, 8)]
    assert chunk_plan(5, graph_buckets(64)) == [(0, 5, 8)]
    with pytest.raises(ValueError):
        chunk_plan(-1, buckets)


class _FakeGraph:
    """Stands in for a captured torch.cuda.CUDAGraph on the CPU: replay() recomputes the module on the
    static input INTO the static outputs, as a real replay does."""

    def __init__(self, module, static_in, static_out):
        self.module, self.static_in, self.static_out = module, static_in, static_out
        self.replays = 0

    def replay(self):
        self.replays += 1
        with torch.inference_mode():
            for buf, v in zip(self.static_out, self.module(self.static_in)):
                buf.copy_(v.float())


def _fake_graphs(be: TorchBackend, max_batch: int) -> dict:
    graphs = {}
    with torch.inference_mode():
        for b in graph_buckets(max_batch):
            static_in = be._static_input(b)
            static_out = tuple(torch.full((b, be._width(k)), float("nan")) for k in be.outputs)
            graphs[b] = (_FakeGraph(be._module, static_in, static_out), static_in, static_out)
    be._graphs, be.buckets = graphs, graph_buckets(max_batch)
    return graphs


@pytest.mark.parametrize("n", [1, 3, 8, 16, 37])
def test_replay_pads_chunks_and_copies_out(loaded, n):
    """The replay loop (copy in, zero the padding, replay, copy the real rows out, chunk past the largest
    bucket) on the CPU with stand-in graphs: the same outputs as eager, fresh tensors."""
    eager = TorchBackend(loaded, "cpu")
    x = torch.from_numpy(to_model_input(_faces(n), loaded.spec))
    ref = eager.run_tensor(x)
    be = TorchBackend(loaded, "cpu")
    graphs = _fake_graphs(be, 16)
    with torch.inference_mode():  # as run/run_tensor call it
        got = be._replay(x)
    assert set(got) == set(ref) == {"probs"}
    for k in ref:
        assert got[k].shape == ref[k].shape and got[k].dtype == torch.float32
        assert torch.allclose(got[k], ref[k], atol=1e-5), float((got[k] - ref[k]).abs().max())
    assert n == 1 or float((ref["probs"] - ref["probs"][:1]).abs().max()) > 0.2  # input-dependent outputs
    used = [b for b in graphs if graphs[b][0].replays]
    assert sum(graphs[b][0].replays for b in graphs) == len(chunk_plan(n, be.buckets))
    last = chunk_plan(n, be.buckets)[-1]
    static_in = graphs[last[2]][1]
    assert torch.count_nonzero(static_in[last[1] - last[0]:]) == 0  # padding rows zeroed
    assert used
    with torch.inference_mode():
        for _, _, static_out in graphs.values():  # outputs are not views of the graph buffers
            for buf in static_out:
                buf.fill_(-1.0)
    assert torch.allclose(got["probs"], ref["probs"], atol=1e-5)


# ------------------------------------------------------------------------------- preprocessing on device


@pytest.mark.parametrize("case", ["grey same size", "grey upsample", "grey shrink", "rgb to grey", "rgb to rgb",
                                  "grey to rgb", "torch NHWC"])
def test_device_preprocessing_matches_to_model_input_on_cpu(case):
    rng = np.random.default_rng(0)
    grey48 = rng.integers(0, 256, (5, 48, 48), np.uint8)
    faces, spec = {
        "grey same size": (grey48, InputSpec(size=48, channels=1)),
        "grey upsample": (grey48, InputSpec(size=96, channels=1, source_size=48)),
        "grey shrink": (rng.integers(0, 256, (5, 120, 120), np.uint8), InputSpec(size=48, channels=1)),
        "rgb to grey": (rng.integers(0, 256, (5, 64, 64, 3), np.uint8), InputSpec(size=48, channels=1)),
        "rgb to rgb": (rng.integers(0, 256, (5, 40, 40, 3), np.uint8),
                       InputSpec(size=56, channels=3, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))),
        "grey to rgb": (grey48, InputSpec(size=48, channels=3)),
        "torch NHWC": (torch.from_numpy(rng.integers(0, 256, (5, 64, 64, 3), np.uint8)), InputSpec(size=48)),
    }[case]
    ref = to_model_input(faces, spec)
    got = to_device_input(faces, spec, "cpu")
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float32 and got.device.type == "cpu"
    ref = ref.numpy() if isinstance(ref, torch.Tensor) else ref
    assert got.shape == ref.shape == (5, spec.channels, spec.size, spec.size)
    assert float(np.abs(got.numpy() - ref).max()) <= CPU_PARITY_ATOL


def test_device_preprocessing_rejects_bad_shapes():
    with pytest.raises(ValueError, match="expected faces"):
        to_device_input(np.zeros((2, 8, 8, 5), np.uint8), InputSpec(size=8), "cpu")


def test_run_tensor_matches_run_on_cpu(loaded):
    with TorchBackend(loaded, "cpu") as be:
        faces = _faces(6)
        ref = be.run(to_model_input(faces, be.spec))
        x = be.prepare(faces)
        assert x.device.type == "cpu" and x.shape == (6, 1, 48, 48)
        got = be.run_tensor(x)
        assert set(got) == set(ref)
        for k in ref:
            assert isinstance(got[k], torch.Tensor) and got[k].dtype == torch.float32
            np.testing.assert_array_equal(got[k].numpy(), ref[k])
        empty = be.run_tensor(x[:0])
        assert empty["probs"].shape == (0, 7)
        with pytest.raises(ValueError, match="shape"):
            be.run_tensor(x[:, :, :24])
        with pytest.raises(ValueError, match="float"):
            be.run_tensor(torch.zeros((1, 1, 48, 48), dtype=torch.uint8))
        with pytest.raises(ValueError, match="torch tensor"):
            be.run_tensor(np.zeros((1, 1, 48, 48), np.float32))
    with pytest.raises(RuntimeError, match="closed"):
        be.run_tensor(x)


# ------------------------------------------------------------------------------------- the CPU, unchanged


def test_cuda_only_options_are_rejected_on_the_cpu(loaded):
    for opts, word in (({"precision": "fp16"}, "fp16"), ({"precision": "bf16"}, "bf16"),
                       ({"channels_last": True}, "channels_last"), ({"cuda_graphs": True}, "cuda_graphs"),
                       ({"channels_last": True, "cuda_graphs": True}, "channels_last and cuda_graphs")):
        with pytest.raises(ValueError, match=word) as info:
            create_backend("torch", loaded, "cpu", **opts)
        assert "CUDA" in str(info.value)
    with pytest.raises(ValueError, match="max_batch"):
        create_backend("torch", loaded, "cpu", max_batch=0)
    with pytest.raises(ValueError, match="cuda_graphs must be true or false"):
        create_backend("torch", loaded, "cpu", cuda_graphs="yes")
    with pytest.raises(ValueError, match="precision"):
        create_backend("torch", loaded, "cpu", precision="int8")


def test_cpu_backend_is_plain_eager_fp32(loaded):
    """The CPU path computes exactly what the checkpoint's module computes (bitwise), without graphs."""
    x = to_model_input(_faces(9), loaded.spec)
    with create_backend("torch", loaded, "cpu", channels_last=False, cuda_graphs=False, max_batch=8) as be:
        assert (be.precision, be.channels_last, be.cuda_graphs, be.buckets) == ("fp32", False, False, ())
        got = be.run(x)
    with torch.inference_mode():
        ref = InferenceModule(loaded.model.eval(), loaded.info.heads)(torch.from_numpy(x))
    np.testing.assert_array_equal(got["probs"], ref[0].numpy())


def test_failed_capture_falls_back_to_eager_with_one_warning(loaded, caplog):
    """Capture cannot work on the CPU, so calling it there exercises the fallback: one warning, no graphs,
    eager results."""
    be = TorchBackend(loaded, "cpu")
    x = to_model_input(_faces(3), loaded.spec)
    ref = be.run(x)
    with caplog.at_level(logging.WARNING, logger="ferengine.backends"):
        be._capture(graph_buckets(4))
    warnings = [r for r in caplog.records if "CUDA graph capture failed" in r.getMessage()]
    assert len(warnings) == 1 and "running eagerly" in warnings[0].getMessage()
    assert be.cuda_graphs is False and be.buckets == () and be._graphs == {}
    np.testing.assert_array_equal(be.run(x)["probs"], ref["probs"])


@pytest.mark.skipif(HAS_CUDA, reason="a GPU is present")
def test_cuda_device_without_a_gpu_says_so(loaded):
    with pytest.raises(BackendUnavailable, match="no CUDA GPU"):
        create_backend("torch", loaded, "cuda", cuda_graphs=True)


# ------------------------------------------------------------------------------------------ the bench


class _StandIn:
    """A stand-in for a CUDA backend in the bench's plumbing: instant, records what it was asked."""

    device = "cuda:0"

    def __init__(self, opts):
        self.cuda_graphs = bool(opts.get("cuda_graphs"))
        self.buckets = graph_buckets(opts["max_batch"]) if self.cuda_graphs else ()
        self.calls = []
        self.closed = False

    def run(self, x):
        self.calls.append(("run", x.shape[0]))
        return {"probs": np.zeros((x.shape[0], 7), np.float32)}

    def prepare(self, faces):
        return torch.zeros((len(faces), 1, 48, 48))

    def run_tensor(self, x):
        self.calls.append(("run_tensor", x.shape[0]))
        return {"probs": torch.zeros((x.shape[0], 7))}

    def close(self):
        self.closed = True


def test_bench_gpu_rows_with_a_stand_in_backend(loaded):
    """The GPU rows' plumbing (configurations, warm-up, batches, device-resident timing, failures) with
    stand-in backends and no synchronisation."""
    made = []

    def make(name, ld, device, **opts):
        if name == "tensorrt":
            raise BackendUnavailable("no TensorRT here")
        made.append((name, device, dict(opts), _StandIn(opts)))
        return made[-1][-1]

    rows = bench._gpu_rows(loaded, 3, (1, 4), None, None, "clip", make=make, sync=lambda: None)
    torch_labels = [c[0] for c in bench.GPU_CONFIGS if c[1] == "torch"]
    for label in torch_labels:
        mine = [r for r in rows if r["stage"] == f"gpu {label}"]
        assert [r["metric"] for r in mine] == ["warm-up s (create+1st run)", "faces/s batch 1 (host)",
                                              "faces/s batch 4 (host)"]
        assert all(r["value"] > 0 for r in mine) and "device->device" in mine[1]["note"]
    assert [o for _, _, o, _ in made] == [{**c[2], "max_batch": 4} for c in bench.GPU_CONFIGS if c[1] == "torch"]
    assert all(d == "cuda" and be.closed and ("run", 4) in be.calls and ("run_tensor", 1) in be.calls
               for _, d, _, be in made)
    graph_rows = [r for r in rows if "cuda-graphs" in r["stage"] and r["metric"].startswith("warm-up")]
    assert graph_rows and all("graphs for batches 1,2,4" in r["note"] for r in graph_rows)
    trt = [r for r in rows if r["stage"] == "gpu tensorrt fp16"]
    assert len(trt) == 1 and trt[0]["value"] is None and trt[0]["note"]
    assert rows[-1]["stage"] == "gpu pipeline" and rows[-1]["value"] is None
    only = bench._gpu_rows(loaded, 2, (2,), ["tensorrt"], None, "clip", make=make, sync=lambda: None)
    assert all("torch" not in r["stage"] for r in only)
    print(bench.format_table(rows))


def test_mosaic_makes_a_multi_face_frame():
    frames = [np.full((480, 640, 3), i, np.uint8) for i in range(50)]
    out = bench._mosaic(frames)
    assert len(out) == 50 and out[0].shape == (480, 640, 3)
    assert {int(out[0][0, 0, 0]), int(out[0][0, 320, 0]), int(out[0][240, 0, 0]), int(out[0][240, 320, 0])} == \
        {0, 37, 74 % 50, 111 % 50}


@pytest.mark.skipif(HAS_CUDA, reason="a GPU is present")
def test_bench_says_the_gpu_rows_need_a_gpu(tmp_path, monkeypatch, capsys):
    video = tmp_path / "v.mp4"
    video.write_bytes(b"")
    seen = {}

    def fake_run(*args, **kwargs):
        seen.update(kwargs)
        return [{"stage": "process", "metric": "peak RSS MB", "value": 1.0, "note": ""}]

    monkeypatch.setattr(bench, "run", fake_run)
    assert bench.main(["--video", str(video)]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "GPU rows" in ln]
    assert len(lines) == 1 and "need a CUDA GPU" in lines[0] and "found no CUDA GPU" in lines[0]
    assert seen["gpu"] is True and seen["gpu_batches"] == (1, 16, 64)


# ------------------------------------------------------------------------------------------ CUDA only


def _cuda_batch(n: int, spec) -> np.ndarray:
    return to_model_input(_faces(n, seed=11), spec)


@needs_cuda
@pytest.mark.parametrize("precision,atol", [("fp32", 1e-4), ("fp16", 5e-3), ("bf16", 2e-2)])
def test_cuda_graphs_equal_eager(loaded, precision, atol):
    """Replayed graphs give eager's outputs (same precision) for sizes below, at and above the buckets.
    The same kernels would agree bitwise; the tolerance allows cuDNN picking another kernel for the padded
    batch size, i.e. a logit moving by a unit in the last place (fp16: 8e-3 at 10, bf16: 6e-2), which moves
    a probability by a quarter of that at most."""
    with create_backend("torch", loaded, "cuda", precision=precision) as eager, \
            create_backend("torch", loaded, "cuda", precision=precision, cuda_graphs=True, max_batch=16) as graphs:
        assert graphs.cuda_graphs and graphs.buckets == (1, 2, 4, 8, 16)
        for n in (1, 3, 16, 37):
            x = _cuda_batch(n, loaded.spec)
            ref, got = eager.run(x), graphs.run(x)
            assert n == 1 or np.abs(ref["probs"] - ref["probs"][:1]).max() > 0.2  # input-dependent outputs
            for k in ref:
                assert got[k].shape == ref[k].shape and got[k].dtype == np.float32
                assert np.abs(got[k] - ref[k]).max() < atol, (n, k, np.abs(got[k] - ref[k]).max())


@needs_cuda
@pytest.mark.parametrize("precision,atol", [("fp16", 1e-2), ("bf16", 2e-2)])
@pytest.mark.parametrize("graphs", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_half_precisions_close_to_fp32(loaded, precision, atol, graphs, channels_last):
    x = _cuda_batch(20, loaded.spec)
    with create_backend("torch", loaded, "cuda") as ref_be:
        ref = ref_be.run(x)
    with create_backend("torch", loaded, "cuda", precision=precision, cuda_graphs=graphs,
                        channels_last=channels_last) as be:
        got = be.run(x)
    for k in ref:
        assert got[k].dtype == np.float32 and np.abs(got[k] - ref[k]).max() < atol


@needs_cuda
def test_cuda_run_tensor_stays_on_the_device(loaded):
    faces = _faces(10, seed=5)
    with create_backend("torch", loaded, "cuda", cuda_graphs=True, max_batch=8) as be:
        x = be.prepare(faces)
        assert x.is_cuda and x.dtype == torch.float32
        ref_x = torch.from_numpy(to_model_input(faces, loaded.spec))
        assert float((x.cpu() - ref_x).abs().max()) <= CUDA_PARITY_ATOL
        first = be.run_tensor(x)
        assert all(v.is_cuda and v.dtype == torch.float32 for v in first.values())
        kept = {k: v.clone() for k, v in first.items()}
        be.run_tensor(be.prepare(_faces(10, seed=6)))  # a later replay must not overwrite earlier results
        for k in kept:
            assert torch.equal(first[k], kept[k])
        host = be.run(to_model_input(faces, loaded.spec))
        for k in host:
            assert np.abs(first[k].cpu().numpy() - host[k]).max() < 1e-4


@needs_cuda
def test_cuda_capture_failure_falls_back(loaded, monkeypatch, caplog):
    def broken(*a, **k):
        raise RuntimeError("capture refused (test)")

    monkeypatch.setattr(torch.cuda, "CUDAGraph", broken)
    with caplog.at_level(logging.WARNING, logger="ferengine.backends"):
        be = create_backend("torch", loaded, "cuda", cuda_graphs=True)
    assert not be.cuda_graphs and sum("capture failed" in r.getMessage() for r in caplog.records) == 1
    out = be.run(_cuda_batch(3, loaded.spec))
    assert out["probs"].shape == (3, 7)
    be.close()
