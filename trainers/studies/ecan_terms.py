"""How much each term of ECAN's eq. 11 pulls on the encoder, for the two readings of eqs. 4-8 (mean over the
anchors, or the sum the paper prints), measured on real batches at the start of training.

    python -m trainers.studies.ecan_terms --data-dir ../shared/data [--width 0.25] [--steps 5] [--json out.json]

For ``--steps`` training batches (batch 256, the strong Table 1 augmentation, the bank filled by the
frozen pass, a freshly initialised network), it computes each weighted term of eq. 11 --
(1 - l1) CE, l1 ENSC, l2 MVA -- with ``mean`` and with ``sum`` reductions, and the L2 norm of each term's
gradient over the query encoder's parameters. The table gives the values and gradient norms (means over
the batches) and each term's gradient norm relative to CE's: the number that decides whether eq. 11 read
with sums leaves the classifier any say (docs/ecan-reproduction.md).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def measure(argv: list[str], steps: int) -> dict[str, dict[str, float]]:
    from trainers.engine import Trainer, parse_config
    from trainers.losses.affinity import mva_loss
    from trainers.losses.ce import masked_cross_entropy
    from trainers.losses.supcon import supcon_loss
    from trainers.methods import get_method

    cls = get_method("ecan")
    t = Trainer(parse_config(cls, argv), cls)
    m, model = t.method, t.model
    o = m.opts
    m.before_training()
    params = [p for p in model.net.parameters() if p.requires_grad]
    rows: dict[str, list[tuple[float, float]]] = {}
    for i, batch in enumerate(t.train_batches):
        if i >= steps:
            break
        out = model(batch.inputs[0])
        zk = model.key(batch.inputs[1])
        y = batch.label
        bank, bank_y = m.bank.get()
        past = m.bank.recent_groups(o.mva_groups - 1)
        terms = {"ce": (1 - o.lambda1) * masked_cross_entropy(out["logits"], y)}
        for red in ("mean", "sum"):
            terms[f"ensc_{red}"] = o.lambda1 * supcon_loss(
                torch.cat([out["z"], zk]), torch.cat([y, y]), temperature=o.temperature, mode="ensc", bank=bank,
                bank_labels=bank_y, reduction=red)
            terms[f"mva_{red}"] = o.lambda2 * mva_loss(out["z"], y, model.centres, past, reduction=red)[0]
        for name, value in terms.items():
            grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
            norm = torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None))
            rows.setdefault(name, []).append((float(value), float(norm)))
        m._push(zk, y)
    ce_norm = sum(n for _, n in rows["ce"]) / len(rows["ce"])
    return {name: {"value": sum(v for v, _ in r) / len(r), "grad_norm": sum(n for _, n in r) / len(r),
                   "grad_vs_ce": (sum(n for _, n in r) / len(r)) / ce_norm, "batches": len(r)}
            for name, r in rows.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainers.studies.ecan_terms", description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--width", default="0.25", help="ResNet-18 width multiplier (default 0.25, the CPU scale)")
    p.add_argument("--steps", type=int, default=5, help="batches to average over")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    p.add_argument("--device", default="auto")
    a = p.parse_args(argv)
    from ferengine.fileio import atomic_write_text

    flags = ["--data", "fer2013", "--out", "/tmp/ecan-terms-unused", "--width", a.width, "--workers", "0",
             "--no-tensorboard", "--device", a.device, "--no-amp", "--bench-batches", "0"]
    if a.data_dir:
        flags += ["--data-dir", a.data_dir]
    res = measure(flags, a.steps)
    print(f"{'term (weighted as in eq. 11)':32s} {'value':>10s} {'grad norm':>10s} {'vs CE':>8s}")
    for name, r in res.items():
        print(f"{name:32s} {r['value']:10.4g} {r['grad_norm']:10.4g} {r['grad_vs_ce']:8.3g}")
    if a.json:
        atomic_write_text(a.json, json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    from trainers.engine.boundary import guard

    sys.exit(guard("python -m trainers.studies.ecan_terms", lambda: main()))
