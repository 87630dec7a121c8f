"""trainers.studies.daf_tc: what it would train for each reading, resuming and skipping, and the table it
prints from a run's own metrics.csv and args.json."""
from __future__ import annotations

import csv
import json

from trainers.studies import daf_tc


def _run(folder, reduction, tc_start, rows):
    folder.mkdir(parents=True)
    (folder / "args.json").write_text(json.dumps({"config": {"batch_size": 128, "extra": {
        "tc_reduction": reduction, "tc_start": tc_start}}}))
    with open(folder / "metrics.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _row(epoch, acc, sep, tc=""):
    return {"epoch": epoch, "val_accuracy": acc, "val_no_copy_accuracy": acc - 1, "val_mean_class_accuracy": acc - 10,
            "val_no_copy_mean_class_accuracy": acc - 11, "val_sep_ratio": sep, "val_tc_hinge_met": "0.25" if tc else "",
            "train_tc": tc}


def test_table_reads_the_best_epoch_the_sep_ratio_before_tc_and_tc_per_item(tmp_path):
    _run(tmp_path / "ce_then_sum", "sum", 2, [_row(1, 40.0, 0.9), _row(2, 50.0, 0.6), _row(3, 55.0, 0.5, tc="1280"),
                                               _row(4, 52.0, 0.4, tc="1152")])
    table = daf_tc.table(tmp_path, ["ce_then_sum", "mean"])
    line = next(ln for ln in table.splitlines() if ln.startswith("| ce_then_sum"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[1:4] == ["4", "3", "55.00 / 54.00"], "epochs run, best epoch, its accuracy whole / no copy"
    assert cells[5] == "0.900 -> 0.600 -> 0.400", "epoch 1 -> the last CE epoch (tc_start 2) -> the last"
    assert cells[-1] == "9.00", "the summed TC of a batch of 128 given per item (1152 / 128)"
    assert "| mean | not run |" in table


def test_train_skips_finished_runs_and_resumes_others(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(daf_tc.subprocess, "call", lambda cmd: calls.append(cmd) or 0)
    _run(tmp_path / "ce", "sum", 0, [_row(e, 50.0, 0.5) for e in (1, 2)])
    assert daf_tc.train("ce", tmp_path, "DATA", 2, []) == 0 and calls == [], "finished: nothing to do"
    assert daf_tc.train("ce", tmp_path, "DATA", 3, []) == 0
    assert "--no-tc" in calls[-1] and "--resume" not in calls[-1], "no state.pt: a new run with the reading's flags"
    (tmp_path / "ce" / "state.pt").write_bytes(b"")
    daf_tc.train("ce", tmp_path, "DATA", 3, [])
    assert "--resume" in calls[-1] and "--no-tc" not in calls[-1], "a state.pt: resumed with the run's own settings"


def test_ecan_terms_measures_both_reductions_on_real_batches(tmp_path, monkeypatch):
    """trainers.studies.ecan_terms: the sum reading is the mean times the number of anchors (2N for ENSC over
    the two views, at least N for MVA), and every term's gradient reaches the encoder."""
    from conftest import write_fer2013
    from trainers.studies import ecan_terms

    monkeypatch.setenv("FER_DESKTOP_CACHE", str(tmp_path / "cache"))
    write_fer2013(tmp_path / "data" / "fer2013", n_train=96, n_val=16)
    argv = ["--data", "fer2013", "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--width",
            "0.125", "--batch-size", "32", "--bank-size", "64", "--workers", "0", "--no-tensorboard", "--device", "cpu",
            "--no-amp", "--bench-batches", "0"]
    r = ecan_terms.measure(argv, steps=2)
    assert set(r) == {"ce", "ensc_mean", "ensc_sum", "mva_mean", "mva_sum"} and r["ce"]["grad_vs_ce"] == 1.0
    assert abs(r["ensc_sum"]["value"] / r["ensc_mean"]["value"] - 64) < 1e-3
    # MVA: N times the mean, times a larger alpha (eq. 9's variance of summed group losses grows with N^2)
    assert r["mva_sum"]["value"] / r["mva_mean"]["value"] > 32 - 1e-3
    assert all(v["grad_norm"] > 0 and v["batches"] == 2 for v in r.values())


def test_avce_sparsemax_study_runs_and_writes_json(tmp_path, capsys):
    from trainers.studies import avce_sparsemax

    out = tmp_path / "s.json"
    assert avce_sparsemax.main(["--batch", "8", "--dim", "5", "--repeats", "2", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert (r["batch"], r["dim"], r["paper_cvxpy_s"]) == (8, 5, 1.3)
    assert r["sparsemax_forward_ms"] > 0 and 1 <= r["mean_support"] <= 5
    assert "1.3 s per mini-batch" in capsys.readouterr().out
