"""How fast the logit metrics are, in nanoseconds per logit, beside a plain memory copy.

    python benchmarks/metrics_speed.py                   # 1x512x32000 and 4x512x32000, float32 and bfloat16
    python benchmarks/metrics_speed.py --threads 1 --no-old
    python benchmarks/metrics_speed.py --device cuda     # on a GPU machine

Rows, each measured in a fresh subprocess so that its peak memory can be read (VmHWM after the
inputs are built, minus VmRSS before the call):

- new:    ``harness.core.metrics.compare`` (the chunked engine the suites use)
- old:    ``tests/metrics_reference.compare`` (the full-float64-copy implementation it replaced);
          one call, it takes seconds
- copy:   ``subject.clone()`` and ``truth.clone()``: what reading and writing the inputs once costs

Times are the best of --reps calls. The target is a few copies' worth: the metrics should cost
what the memory they read costs, not dominate a GPU run. On a shared machine torch's OpenMP
threads wait for each other at every barrier; ``--threads 1`` or OMP_WAIT_POLICY=PASSIVE gives
figures that do not depend on the neighbours.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def child(spec: dict) -> dict:
    import torch
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    from harness.core import metrics
    b, s, v = spec["shape"]
    dev = torch.device(spec["device"])
    g = torch.Generator().manual_seed(0)
    head = torch.randn(v, 256, dtype=torch.float64, generator=g)
    truth = torch.empty(b, s, v, dtype=torch.float64)
    for i in range(b):                                  # peaked logits like a model's (std ~3)
        torch.matmul(torch.randn(s, 256, dtype=torch.float64, generator=g) * 0.2, head.T, out=truth[i])
    truth = truth.to(dev)
    subject = truth.to(getattr(torch, spec["dtype"]))
    del head
    what = spec["what"]
    if what == "old":
        import metrics_reference
        fn = lambda: metrics_reference.compare(subject, truth)   # noqa: E731
    elif what == "new":
        fn = lambda: metrics.compare(subject, truth)             # noqa: E731
    elif what == "copy-subject":
        fn = subject.clone
    else:
        fn = truth.clone
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    rss0 = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")          # reset the high-water mark
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    best = float("inf")
    for _ in range(1 if what == "old" else spec["reps"]):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() - base) if dev.type == "cuda" else (_status_kb("VmHWM") - rss0) * 1024
    return {"ns_per_logit": best * 1e9 / (b * s * v), "seconds": best, "peak_extra_mb": peak / 2**20,
            "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="1x512x32000,4x512x32000")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-old", action="store_true", help="skip the old implementation (slow, ~3.5 GB at 4x512)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(child(json.loads(a.child))))
        return 0
    whats = ["new"] + ([] if a.no_old else ["old"]) + ["copy-subject", "copy-truth"]
    print(f"load average {os.getloadavg()[0]:.1f}; device {a.device}; threads {a.threads or 'default'}")
    print(f"{'shape':<14} {'dtype':<9} {'what':<13} {'ns/logit':>9} {'seconds':>8} {'peak MB':>8}")
    for shape in a.shapes.split(","):
        for dtype in a.dtypes.split(","):
            for what in whats:
                spec = {"shape": [int(x) for x in shape.split("x")], "dtype": dtype, "what": what,
                        "threads": a.threads, "reps": a.reps, "device": a.device}
                out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)],
                                     capture_output=True, text=True, check=True).stdout
                r = json.loads(out.strip().splitlines()[-1])
                print(f"{shape:<14} {dtype:<9} {what:<13} {r['ns_per_logit']:>9.1f} {r['seconds']:>8.3f} "
                      f"{r['peak_extra_mb']:>8.0f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
