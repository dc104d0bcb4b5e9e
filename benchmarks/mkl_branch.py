"""MKL's code branch: what it costs in speed, and whether a `train` run beside another job moves.

    python benchmarks/mkl_branch.py                       # float32 matmul speed on each branch
    python benchmarks/mkl_branch.py --campaign 20 --branch COMPATIBLE --out /tmp/mklc
    python benchmarks/mkl_branch.py --campaign 20 --branch OFF --out /tmp/mkloff

Speed: each branch in a fresh process (MKL takes its branch once), single-threaded, on the shapes of
the embedded model's head (512x128 @ 128x32000), a 7B projection (512x4096 @ 4096x4096) and a small
one, printing ms and GFLOP/s.

Campaign (issue 21, harness/core/mkl.py): N times, the default `llama-parity train` on the embedded
model is run while a `llama-parity logits --shapes 2x64` runs beside it (the condition that moved
the first float32 cell), with MKL_CBWR set to --branch for the train run (OFF: MKL's default, the
variable set empty). Prints each run's exit code and the count of failing runs; a failing run's
first failing cells are printed from its summary.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SHAPES = [(512, 128, 32000), (512, 4096, 4096), (512, 128, 384)]
SPEED = """
import time, torch
torch.set_num_threads(1)
for m, k, n in {shapes}:
    a, b = torch.randn(m, k), torch.randn(k, n)
    a @ b
    t = time.perf_counter()
    for _ in range(5):
        a @ b
    dt = (time.perf_counter() - t) / 5
    print(f"{{m}}x{{k}} @ {{k}}x{{n}}: {{dt * 1e3:8.2f}} ms  {{2 * m * k * n / dt / 1e9:6.1f}} GFLOP/s")
"""


def env_for(branch: str) -> dict:
    """MKL_CBWR for a child: OFF is the variable set empty (MKL's default; unset, `train` pins COMPATIBLE)."""
    return {**os.environ, "MKL_CBWR": "" if branch == "OFF" else branch}


def speed(branches: list[str]) -> None:
    for branch in branches:
        print(f"MKL_CBWR={branch}")
        subprocess.run([sys.executable, "-c", SPEED.format(shapes=SHAPES)], env=env_for(branch), check=True)


def campaign(n: int, branch: str, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    failed = 0
    for i in range(1, n + 1):
        hog = subprocess.Popen([sys.executable, "-m", "harness", "logits", "--shapes", "2x64", "--no-resume",
                                "--out", str(out / f"hog{i}")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env=env_for("OFF"))
        started = time.time()
        run = out / f"train{i}"
        code = subprocess.run([sys.executable, "-m", "harness", "train", "--no-resume", "--out", str(run)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env_for(branch)).returncode
        hog.terminate()
        hog.wait()
        failed += code != 0
        print(f"run {i}: exit {code} ({time.time() - started:.0f} s)", flush=True)
        if code == 1:
            cells = json.loads((run / "summary.json").read_text())["cells"]
            for c in [c for c in cells if c["status"] == "fail"][:3]:
                print(f"  {c['subject']} {c['case']} {c['metric']} {c['value']:.3g} > {c['tolerance']:.3g}")
    print(f"MKL_CBWR={branch}: {failed} of {n} runs failed")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--branches", default="OFF,AUTO,AVX2,COMPATIBLE", help="branches whose speed is measured")
    p.add_argument("--campaign", type=int, default=0, help="runs of the default train beside a logits run")
    p.add_argument("--branch", default="COMPATIBLE", help="MKL_CBWR of the campaign's train runs (OFF: unset)")
    p.add_argument("--out", default="/tmp/mkl-campaign", help="where the campaign's runs are written")
    a = p.parse_args()
    if a.campaign:
        campaign(a.campaign, a.branch, Path(a.out))
    else:
        speed(a.branches.split(","))
    return 0


if __name__ == "__main__":
    sys.exit(main())
