"""Time of AVCE's feature transformations, sparsemax and softmax, per mini-batch on this CPU, against the paper's
1.3 s per mini-batch (CVXPY/ECOS, one solve per sample, Xeon E5-1650; section 3.5).

    python -m trainers.studies.avce_sparsemax [--batch 256] [--dim 32] [--repeats 200] [--threads N] [--json F]

It times, on random latents ``z`` of shape (batch, dim) drawn like a trained compressor's (ReLU of a normal, so
about half the entries are 0): the closed-form sparsemax forward (``trainers.modules.sparsemax``), its forward +
backward, and softmax's forward, each as the median over ``--repeats`` runs after warm-up, and checks that every
row of the sparsemax output lies on the simplex. Results go to the terminal (and ``--json``); nothing is timed
inside the test suite.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

PAPER_SECONDS = 1.3


def _median_ms(fn: Callable[[], Any], repeats: int) -> float:
    for _ in range(10):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def measure(batch: int = 256, dim: int = 32, repeats: int = 200, seed: int = 0) -> dict[str, Any]:
    from trainers.modules.sparsemax import sparsemax

    g = torch.Generator().manual_seed(seed)
    z = torch.relu(torch.randn(batch, dim, generator=g) * 2)
    p = sparsemax(z)
    if not (torch.allclose(p.sum(-1), torch.ones(batch)) and bool((p >= 0).all())):
        raise AssertionError("sparsemax left the simplex")
    zg = z.clone().requires_grad_(True)

    def fwd_bwd() -> None:
        zg.grad = None
        sparsemax(zg).pow(2).sum().backward()

    with torch.no_grad():
        sp = _median_ms(lambda: sparsemax(z), repeats)
        sm = _median_ms(lambda: torch.softmax(z, -1), repeats)
    spb = _median_ms(fwd_bwd, repeats)
    return {"batch": batch, "dim": dim, "repeats": repeats, "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
            "sparsemax_forward_ms": sp, "sparsemax_forward_backward_ms": spb, "softmax_forward_ms": sm,
            "mean_support": float((p > 0).sum(-1).float().mean()), "paper_cvxpy_s": PAPER_SECONDS,
            "speedup_vs_paper": PAPER_SECONDS * 1e3 / sp}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m trainers.studies.avce_sparsemax", description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    if a.batch < 1 or a.dim < 1 or a.repeats < 1:
        ap.error("--batch, --dim and --repeats must be >= 1")
    if a.threads:
        torch.set_num_threads(a.threads)
    r = measure(a.batch, a.dim, a.repeats)
    print(f"sparsemax on {r['batch']} x {r['dim']} ({r['threads']} threads, {r['cpu']}, torch {r['torch']}), "
          f"median of {r['repeats']}:")
    print(f"  forward             {r['sparsemax_forward_ms']:8.3f} ms   (mean support {r['mean_support']:.1f} of {r['dim']})")
    print(f"  forward + backward  {r['sparsemax_forward_backward_ms']:8.3f} ms")
    print(f"  softmax forward     {r['softmax_forward_ms']:8.3f} ms")
    print(f"  paper (CVXPY/ECOS per sample): {PAPER_SECONDS:.1f} s per mini-batch -> {r['speedup_vs_paper']:,.0f}x")
    if a.json:
        from ferengine.fileio import atomic_write_text

        atomic_write_text(a.json, json.dumps(r, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
