"""Memory soak of ``fer-desktop``: run the real application for a while and sample its resident memory.

    QT_QPA_PLATFORM=offscreen python -m app.soak --seconds 600 --every 10 --csv rss.csv -- \\
        --video clip.mp4 --loop

runs ``fer-desktop <the arguments after -->`` in screenshot mode for ``--seconds`` (``--screenshot`` into a
temporary folder with ``--timeout`` set to the duration and more ``--frames`` than it can reach, so the
window, the worker and the model run exactly as in a session, then the window is saved and it exits), at the
lowest CPU priority (``nice -n 19``), reads ``VmRSS`` of the process every ``--every`` seconds (psutil is not
needed: ``/proc/PID/status``; Linux only) and prints start / after warm-up / end / max and the growth after
warm-up. Exit status 1 when the growth after warm-up exceeds ``--max-growth-mib``, 2 on a bad option or when
fer-desktop itself fails.

A measurement tool, not a unit test: it takes as long as it is told to.
"""
from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ferengine.validate import argtype, check_float


def rss_mib(pid: int) -> float | None:
    """Resident set size of ``pid`` in MiB (``VmRSS``), or None once the process is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m app.soak",
                                description="Run fer-desktop for a while and sample its resident memory.")
    p.add_argument("--seconds", type=argtype(check_float, name="--seconds", lo=10.0, hi=86400.0), default=600.0,
                   help="how long fer-desktop runs (600)")
    p.add_argument("--every", type=argtype(check_float, name="--every", lo=0.5, hi=3600.0), default=10.0,
                   help="seconds between samples (10)")
    p.add_argument("--warmup", type=argtype(check_float, name="--warmup", lo=0.0, hi=86400.0), default=60.0,
                   help="seconds after which memory must stay flat (60)")
    p.add_argument("--max-growth-mib", type=argtype(check_float, name="--max-growth-mib", lo=0.0), default=20.0,
                   help="the most growth after warm-up that counts as flat (20 MiB)")
    p.add_argument("--csv", metavar="FILE", help="write the samples (t_s, rss_mib) here")
    p.add_argument("args", nargs=argparse.REMAINDER, help="-- then fer-desktop's arguments")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    extra = a.args[1:] if a.args[:1] == ["--"] else a.args
    if any(x in ("--screenshot", "--frames", "--timeout") for x in extra):
        p.error("--screenshot, --frames and --timeout are set by the soak itself: leave them out")
    if not sys.platform.startswith("linux"):
        p.error("the soak reads /proc/PID/status: it runs on Linux only")
    with tempfile.TemporaryDirectory(prefix="fer-soak-") as tmp:
        cmd = ["nice", "-n", "19", sys.executable, "-m", "app", *extra,
               "--screenshot", str(Path(tmp) / "end.png"), "--frames", str(10 ** 9),
               "--timeout", f"{a.seconds:g}"]
        env = {**os.environ, "FER_DESKTOP_SETTINGS": str(Path(tmp) / "settings.ini")}
        print("soak:", " ".join(cmd), file=sys.stderr)
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        samples: list[tuple[float, float]] = []
        try:
            while proc.poll() is None:
                rss = rss_mib(proc.pid)
                if rss is not None:
                    samples.append((time.monotonic() - t0, rss))
                    print(f"soak: {samples[-1][0]:7.1f} s  {rss:8.1f} MiB", file=sys.stderr, flush=True)
                try:
                    proc.wait(timeout=a.every)
                except subprocess.TimeoutExpired:
                    pass
                if time.monotonic() - t0 > a.seconds + 120:
                    proc.terminate()
                    print("soak: fer-desktop did not end 120 s after its timeout; stopped it", file=sys.stderr)
                    proc.wait(30)
                    break
        except KeyboardInterrupt:
            proc.terminate()
            proc.wait(30)
            print("soak: interrupted", file=sys.stderr)
            return 130
        err = proc.stderr.read() if proc.stderr else ""
    if a.csv:
        with open(a.csv, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["t_s", "rss_mib"])
            w.writerows((f"{t:.1f}", f"{r:.1f}") for t, r in samples)
    if proc.returncode != 0 or not samples:
        tail = err.strip().splitlines()[-1:] or ["(no message)"]
        print(f"soak: error: fer-desktop exited with status {proc.returncode}: {tail[0]}", file=sys.stderr)
        return 2
    samples = [(t, r) for t, r in samples if r >= 50.0] or samples  # not the `nice` before its exec
    last = err.strip().splitlines()[-1:]
    if last:
        print(f"soak: fer-desktop said: {last[0]}", file=sys.stderr)
    after = [r for t, r in samples if t >= a.warmup] or [samples[-1][1]]
    start, warm, end, peak = samples[0][1], after[0], samples[-1][1], max(r for _, r in samples)
    growth = max(after) - warm
    print(f"soak: {len(samples)} samples over {samples[-1][0]:.0f} s: start {start:.1f} MiB, after warm-up "
          f"({a.warmup:g} s) {warm:.1f} MiB, end {end:.1f} MiB, max {peak:.1f} MiB, growth after warm-up "
          f"{growth:+.1f} MiB ({'flat' if growth <= a.max_growth_mib else 'GROWING'})")
    return 0 if growth <= a.max_growth_mib else 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
