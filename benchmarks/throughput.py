"""Forward throughput of the reference vs transformers, and the harness's own overhead.

    python benchmarks/throughput.py                 # both parts, CPU
    python benchmarks/throughput.py --device cuda --part forward

forward:  the reference and transformers (eager, sdpa) at each dtype on one model and input, in
          one process; rounds interleave the three so that a noisy neighbour hits all alike.
          ratio = reference time / transformers time (above 1: the reference is the slower).
overhead: one `llama-parity logits` matrix (--model default or a preset such as slice-7b, a
          one-layer model of Llama 2 7B's width and vocabulary); its wall time against the sum of
          the forward passes it must do and of the model loads, timed by wrapping the suite's
          forward functions and the subjects' constructors (the harness itself is not edited).

    python benchmarks/throughput.py --part overhead --model slice-7b --dtypes float32,bfloat16
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


def overhead_part(device: str, model: str, dtypes: list[str], shapes: str, inputs: str) -> None:
    from harness.cli import main
    from harness.core import subjects as subj
    from harness.suites import logits as suite

    from harness.core import checkpoints

    spent = {"forward": 0.0, "load": 0.0, "passes": 0}
    depth = [0]                 # a timed call inside a timed call counts once, in the outer one

    def timed(fn, key):
        def wrapper(*a, **k):
            if depth[0]:
                return fn(*a, **k)
            depth[0] += 1
            _sync(device)
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                _sync(device)
                depth[0] -= 1
                spent[key] += time.perf_counter() - t0
                spent["passes"] += key == "forward"
        return wrapper

    # Every forward the suite runs: the short inputs (plain, padded, cached) go through these three
    # functions, the corpus windows through the subjects' logits().
    for name in ("reference_logits", "transformers_logits", "oracle_logits"):
        setattr(suite, name, timed(getattr(suite, name), "forward"))
    for cls in (subj.ReferenceSubject, subj.TransformersSubject):
        cls.logits = timed(cls.logits, "forward")
        cls.__init__ = timed(cls.__init__, "load")
    # A Meta checkpoint is written once as an HF folder for transformers: model I/O, like a load.
    checkpoints.HFFolder.__init__ = timed(checkpoints.HFFolder.__init__, "load")
    attns = ["eager", "sdpa"]
    with tempfile.TemporaryDirectory() as out:
        folder = []
        if model != "default":
            from harness.core.presets import write_preset
            folder = ["--model", str(write_preset(model, Path(out) / "model", fmt="meta"))]
        from transformers import LlamaForCausalLM  # noqa: F401  (a fixed start-up cost, not the matrix's)
        t0 = time.perf_counter()
        code = main(["logits", *folder, "--dtypes", ",".join(dtypes), "--attn", ",".join(attns), "--tp", "1",
                     "--shapes", shapes, "--inputs", inputs, "--device", device, "--out", str(Path(out) / "run"),
                     "--no-progress", "--no-resume"])
        wall = time.perf_counter() - t0
    other = wall - spent["forward"] - spent["load"]
    print(f"matrix: {model} model, dtypes {dtypes}, attn {attns}, tp 1, shapes {shapes}, inputs {inputs} "
          f"(exit {code})")
    print(f"wall {wall:.2f} s = forward passes {spent['forward']:.2f} s ({spent['passes']} passes) "
          f"+ model loads {spent['load']:.2f} s + the rest {other:.2f} s "
          f"(wall / forward = {wall / spent['forward']:.2f}x; wall / (forward + loads) = "
          f"{wall / (spent['forward'] + spent['load']):.2f}x; rest = {100 * other / wall:.0f}% of wall)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--part", choices=("forward", "overhead", "both"), default="both")
    p.add_argument("--shape", default="1x128")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--dtypes", default="float32,bfloat16,float16")
    p.add_argument("--model", default="default", help="overhead: a preset name (e.g. slice-7b) or 'default'")
    p.add_argument("--shapes", default="1x16,2x64", help="overhead: the matrix's random-id shapes")
    p.add_argument("--inputs", default="random", help="overhead: the matrix's inputs (random,padded,cached,corpus)")
    a = p.parse_args()
    dev = torch.cuda.get_device_name(0) if a.device.startswith("cuda") else platform.processor() or platform.machine()
    print(f"machine: {dev}, {os.cpu_count()} cores, torch {torch.__version__}, threads {torch.get_num_threads()}")
    if a.part in ("forward", "both"):
        forward_part(a.device, a.shape, a.rounds, a.dtypes.split(","))
    if a.part in ("overhead", "both"):
        overhead_part(a.device, a.model, a.dtypes.split(","), a.shapes, a.inputs)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
