"""What the train suite costs beside the bare forward+backward passes it needs, and its peak memory
beside the model's weight bytes.

    python benchmarks/train_cost.py                                   # tiny-gqa, float32 + bfloat16
    python benchmarks/train_cost.py --model models/tiny-llama2 --dtypes float32,bfloat16 --ctx 128 \
        --long-ctx 1024 --attn eager,sdpa                     # the embedded model's default cells

The suite runs once (timing.json's wall time); then the same passes run bare: every model built the
way the suite builds it, and for every batch the forward and backward the suite needs (the oracle's
rows in float64, the reference at each dtype and cast, transformers at each cell and checkpointing
mode), with no comparison, journal or report. Target: suite / bare <= 1.5. Peak memory is the
process's maximum resident set (ru_maxrss) after the suite, against the weights' float32 bytes.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from harness.cli import main as cli  # noqa: E402
from harness.core.checkpoints import HFFolder  # noqa: E402
from harness.core.presets import cached  # noqa: E402
from harness.core.subjects import DTYPES, load_transformers  # noqa: E402
from harness.suites.train import grads as G  # noqa: E402
from harness.suites.train.batches import naive_left_labels  # noqa: E402
from reference_model.checkpoint import build_model  # noqa: E402


def bare(plan) -> float:
    """Seconds of the passes alone, in the order the suite runs them."""
    t0 = time.perf_counter()
    oracle = build_model(plan.ckpt, torch.float64, "cpu", rope_dtype=torch.float64)
    for b in plan.batches:
        G.oracle_grads(oracle, b, "cpu")
    with HFFolder(plan.ckpt) as hf:
        for dtype in plan.dtypes:
            for cast in plan.casts:
                if cast == "autocast" and dtype == "float32":
                    continue
                auto = dtype if cast == "autocast" else None
                ref = build_model(plan.ckpt, DTYPES["float32" if auto else dtype], "cpu")
                for b in plan.batches:
                    G.reference_grads(ref, b, "cpu", auto, scaled=dtype == "float16")
                    if dtype == "float16" and cast == "load" and b is plan.batches[0]:
                        G.reference_grads(ref, b, "cpu")
                for attn in plan.attns:
                    for tp in plan.tps:
                        m = load_transformers("LlamaForCausalLM", hf.path, "float32" if auto else dtype, "cpu", attn,
                                              pretraining_tp=tp)
                        for b in plan.batches:
                            G.transformers_grads(m, b, "cpu", auto, dtype == "float16")
                            if dtype != "float32" and b is plan.batches[0]:      # the peak-activation forward
                                with torch.no_grad(), G.autocast(auto, "cpu"):
                                    m(input_ids=b.ids, attention_mask=b.mask, use_cache=False)
                            if dtype == "float16" and cast == "load" and b is plan.batches[0]:   # unscaled row
                                G.transformers_grads(m, b, "cpu")
                            if b.kind == "left":
                                G.transformers_grads(m, b, "cpu", auto, dtype == "float16", labels=naive_left_labels(b))
                        for gc in plan.checkpointing:
                            if gc != "off":
                                m.gradient_checkpointing_enable(
                                    gradient_checkpointing_kwargs={"use_reentrant": gc == "reentrant"})
                                G.transformers_grads(m, plan.batches[0], "cpu", auto, dtype == "float16")
                                m.gradient_checkpointing_disable()
    return time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model folder (default: the tiny-gqa preset)")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--ctx", default="32")
    p.add_argument("--long-ctx", default="320")
    p.add_argument("--inputs", default="corpus,long,right,left,sft")
    p.add_argument("--attn", default="eager")
    a = p.parse_args()
    model = a.model or str(cached("tiny-gqa"))
    args = ["--model", model, "--dtypes", a.dtypes, "--ctx", a.ctx, "--long-ctx", a.long_ctx, "--attn", a.attn,
            "--tp", "1", "--inputs", a.inputs, "--no-resume"]
    with tempfile.TemporaryDirectory(prefix="train-cost-") as tmp:
        cpu0 = time.process_time()
        code = cli(["train", "--out", f"{tmp}/out", *args])
        suite_cpu = time.process_time() - cpu0
        timing = json.loads(Path(f"{tmp}/out/timing.json").read_text())
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        from types import SimpleNamespace

        from harness.core.suite import Context
        from harness.suites.train import Plan
        parsed = SimpleNamespace(model=model, dtypes=a.dtypes.split(","), attn=a.attn.split(","), tp=["1"], casts=None,
                                 checkpointing=None, inputs=a.inputs.split(","), corpus=None, text=None, tokenizer=None,
                                 device="cpu", seed="0", policy=None, plant=None, ctx=a.ctx, long_ctx=a.long_ctx)
        plan = Plan.from_args(parsed, Context(Path(tmp) / "plan"))
    cpu0 = time.process_time()
    seconds = bare(plan)
    bare_cpu = time.process_time() - cpu0
    weights = sum(t.numel() * 4 for t in plan.ckpt.state.values())
    suite = timing["wall_seconds"]
    print(f"model {model}; dtypes {a.dtypes}; inputs {a.inputs}; --ctx {a.ctx} --long-ctx {a.long_ctx}; exit {code}")
    print(f"suite wall {suite:.1f} s (oracle {timing['oracle_seconds']:.1f} s); bare forward+backward passes "
          f"{seconds:.1f} s; ratio {suite / seconds:.2f} (target <= 1.5)")
    print(f"CPU time (both cores, robust to a loaded machine): suite {suite_cpu:.1f} s, bare {bare_cpu:.1f} s; "
          f"ratio {suite_cpu / bare_cpu:.2f}")
    print(f"peak resident memory {peak / 2**20:.0f} MiB; float32 weights {weights / 2**20:.1f} MiB; "
          f"ratio {peak / weights:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
