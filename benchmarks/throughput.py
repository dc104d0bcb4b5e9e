"""Forward throughput of the reference vs transformers, and the harness's own overhead.

    python benchmarks/throughput.py                 # both parts, CPU
    python benchmarks/throughput.py --device cuda --part forward

forward:  the reference and transformers (eager, sdpa) at each dtype on one model and input, in
          one process; rounds interleave the three so that a noisy neighbour hits all alike.
          ratio = reference time / transformers time (above 1: the reference is the slower).
overhead: one `llama-parity logits` matrix on the embedded default model; its wall time against
          the sum of the forward passes it must do and of the model loads, timed by wrapping
          the subjects' methods (the harness itself is not edited).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
MODEL = dict(dim=1024, n_layers=4, n_heads=16, vocab_size=32000, multiple_of=256, norm_eps=1e-5)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _time(fn, device: str) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def forward_part(device: str, shape: str, rounds: int, dtypes: list[str]) -> None:
    from harness.core.cases import make_inputs
    from harness.core.inputs import shape as parse_shape
    from harness.core.presets import random_state
    from harness.core.subjects import ReferenceSubject, TransformersSubject
    from reference_model.checkpoint import Checkpoint, save_hf
    from reference_model.model import ModelArgs

    args = ModelArgs.from_params(MODEL)
    ckpt = Checkpoint(args, random_state(args, 0), "meta", Path("(generated)"))
    ids = make_inputs(parse_shape("--shape", shape), args.vocab_size, 0)
    print(f"model: dim {args.dim}, {args.n_layers} layers, {args.n_heads} heads, FFN {args.ffn_hidden}, "
          f"vocab {args.vocab_size}; input {shape}; median of {rounds} rounds after one warm-up")
    print(f"{'dtype':<10}{'reference ms':>14}{'eager ms':>10}{'sdpa ms':>10}{'ref/eager':>11}{'ref/sdpa':>10}")
    with tempfile.TemporaryDirectory() as tmp:
        hf = save_hf(Path(tmp) / "hf", args, ckpt.state)
        for dtype in dtypes:
            subjects = {"reference": ReferenceSubject(ckpt, dtype, device),
                        "eager": TransformersSubject(hf, dtype, device, "eager"),
                        "sdpa": TransformersSubject(hf, dtype, device, "sdpa")}
            times: dict[str, list[float]] = {k: [] for k in subjects}
            for name, s in subjects.items():
                s.logits(ids)                                   # warm-up
            for _ in range(rounds):
                for name, s in subjects.items():
                    times[name].append(_time(lambda: s.logits(ids), device))
            med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            print(f"{dtype:<10}{med['reference']:>14.1f}{med['eager']:>10.1f}{med['sdpa']:>10.1f}"
                  f"{med['reference'] / med['eager']:>11.2f}{med['reference'] / med['sdpa']:>10.2f}", flush=True)
            del subjects


def overhead_part(device: str) -> None:
    from harness.cli import main
    from harness.core import subjects as subj

    spent = {"forward": 0.0, "load": 0.0, "passes": 0}

    def timed(fn, key):
        def wrapper(*a, **k):
            _sync(device)
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                _sync(device)
                spent[key] += time.perf_counter() - t0
                spent["passes"] += key == "forward"
        return wrapper

    for cls in (subj.ReferenceSubject, subj.TransformersSubject):
        cls.logits = timed(cls.logits, "forward")
        cls.__init__ = timed(cls.__init__, "load")
    dtypes, attns, shapes = ["float32", "bfloat16"], ["eager", "sdpa"], ["1x16", "2x64"]
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        main(["logits", "--dtypes", ",".join(dtypes), "--attn", ",".join(attns), "--tp", "1",
              "--shapes", ",".join(shapes), "--device", device, "--out", out, "--no-progress", "--no-resume"])
        wall = time.perf_counter() - t0
    other = wall - spent["forward"] - spent["load"]
    print(f"matrix: default model, dtypes {dtypes}, attn {attns}, tp 1, shapes {shapes}")
    print(f"wall {wall:.2f} s = forward passes {spent['forward']:.2f} s ({spent['passes']} passes) "
          f"+ model loads {spent['load']:.2f} s + the rest {other:.2f} s "
          f"(wall / forward = {wall / spent['forward']:.1f}x; rest = {100 * other / wall:.0f}% of wall)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--part", choices=("forward", "overhead", "both"), default="both")
    p.add_argument("--shape", default="1x128")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--dtypes", default="float32,bfloat16,float16")
    a = p.parse_args()
    dev = torch.cuda.get_device_name(0) if a.device.startswith("cuda") else platform.processor() or platform.machine()
    print(f"machine: {dev}, {os.cpu_count()} cores, torch {torch.__version__}, threads {torch.get_num_threads()}")
    if a.part in ("forward", "both"):
        forward_part(a.device, a.shape, a.rounds, a.dtypes.split(","))
    if a.part in ("overhead", "both"):
        overhead_part(a.device)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
