"""Peak memory of a side-by-side comparison, as a ratio of one model's weight bytes.

    python benchmarks/memory.py                      # 7B-shaped, 2 and 4 layers; one 70B-shaped block
    python benchmarks/memory.py --only 7b --layers 2

Modes, each measured in a fresh subprocess (ru_maxrss: the peak resident set, which sees
torch's allocations and touched mapped pages, unlike tracemalloc):

- naive:    the reference and transformers both fully loaded (two models), one forward each
- shared:   transformers loaded, the reference built on its tensors (``shared_reference``)
- streamed: ``stream_compare(oracle=False)``: reference and transformers block by block
- streamed+oracle: the same with the float64 oracle too (what ``llama-parity stream`` runs)

Two figures per mode: peak RSS - RSS after imports, and peak anonymous memory (RssAnon sampled
every 3 ms) - its value after imports, each / (the model's weight bytes at the dtype), where
the weight bytes are counted from the tensor shapes, not measured. Weights are memory-mapped,
so pages a forward never touches (most embedding rows) are not resident: a ratio can be below 1;
and pages it has read stay in the RSS as mapped file pages (reclaimable page cache, not
allocations) until unmapped, which is why the anonymous peak is the figure for streaming.
The float64 oracle costs 4x a bfloat16 block and its own head; the logits runner loads it alone
before the subjects, so naive and shared leave it out. Checkpoints are written once into --work (HF
safetensors, stored at the run dtype) and removed afterwards unless --keep.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {
    # Llama-2-7B hidden sizes (head_dim 128, FFN 11008, vocab 32000), few layers
    "7b": dict(dim=4096, n_heads=32, vocab_size=32000, multiple_of=256, norm_eps=1e-5),
    # one Llama-2-70B block: dim 8192, 64 heads, 8 kv heads, FFN 28672
    "70b": dict(dim=8192, n_heads=64, n_kv_heads=8, vocab_size=32000, multiple_of=4096,
                ffn_dim_multiplier=1.3, norm_eps=1e-5),
}


def _rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # Linux reports KiB


def _anon() -> int:
    """Anonymous resident memory now (Linux): allocations, without mapped file pages."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


class AnonPeak(threading.Thread):
    """Samples RssAnon every few ms; torch kernels release the GIL, so it keeps sampling."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self._done = _anon(), threading.Event()

    def run(self):
        while not self._done.wait(0.003):
            self.peak = max(self.peak, _anon())

    def stop(self) -> int:
        self._done.set()
        self.join()
        return max(self.peak, _anon())


def child(mode: str, path: Path, dtype: str, shape: str) -> dict:
    """One measurement; runs in its own process so that its peak is its own."""
    from harness.core.cases import make_inputs
    from harness.core.checkpoints import open_model
    from harness.core.inputs import shape as parse_shape
    from harness.scale.stream import shared_reference, stream_compare
    from harness.core.subjects import DTYPES, TransformersSubject
    from reference_model import checkpoint
    # transformers' Llama modules imported before the baseline, in every mode alike
    importlib.import_module("transformers.models.llama.modeling_llama")

    args = open_model(path).args
    ids = make_inputs(parse_shape("--shape", shape), args.vocab_size, 0)
    base, base_anon = _rss(), _anon()
    sampler = AnonPeak()
    sampler.start()
    t0 = time.perf_counter()
    if mode == "naive":
        ref = checkpoint.build_model(checkpoint.load(path), DTYPES[dtype])
        tf = TransformersSubject(path, dtype, "cpu")
        ref(ids), tf.logits(ids)
    elif mode == "shared":
        tf = TransformersSubject(path, dtype, "cpu")
        ref = shared_reference(tf.model, args)
        ref(ids), tf.logits(ids)
    elif mode == "streamed":
        stream_compare(path, ids, dtype, oracle=False)
    elif mode == "streamed+oracle":
        stream_compare(path, ids, dtype)
    else:
        raise SystemExit(f"unknown mode {mode}")
    anon = sampler.stop() - base_anon
    return {"peak_bytes": _rss() - base, "anon_peak_bytes": anon, "baseline_bytes": base,
            "seconds": time.perf_counter() - t0}


def weight_bytes(params: dict, dtype: str) -> int:
    import torch

    from reference_model.convert import expected_meta_shapes
    from reference_model.model import ModelArgs
    size = torch.finfo(getattr(torch, dtype)).bits // 8
    return sum(torch.Size(s).numel() for s in expected_meta_shapes(ModelArgs.from_params(params)).values()) * size


def write_model(params: dict, path: Path, dtype: str) -> None:
    """In a subprocess too, so the parent stays small while the children measure."""
    code = ("import sys, json, torch; from pathlib import Path;"
            "from harness.core.presets import random_state; from reference_model.checkpoint import save_hf;"
            "from reference_model.model import ModelArgs;"
            "a = ModelArgs.from_params(json.loads(sys.argv[1]));"
            "save_hf(Path(sys.argv[2]), a, random_state(a, 0, getattr(torch, sys.argv[3])))")
    subprocess.run([sys.executable, "-c", code, json.dumps(params), str(path), dtype], check=True, cwd=ROOT)


def measure(mode: str, path: Path, dtype: str, shape: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", mode, "--model", str(path), "--dtype", dtype,
                          "--shape", shape], capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=("7b", "70b"))
    p.add_argument("--layers", default="2,4", help="7B-shaped model depths (default 2,4)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--shape", default="1x16")
    p.add_argument("--modes", default="naive,shared,streamed,streamed+oracle")
    p.add_argument("--work", default=None, help="folder for the generated checkpoints (default: a temp dir)")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(a.child, Path(a.model), a.dtype, a.shape)))
        return

    import torch
    work = Path(a.work or tempfile.mkdtemp(prefix="llama-parity-mem-"))
    plans = []
    if a.only in (None, "7b"):
        plans += [("7b", int(n)) for n in a.layers.split(",")]
    if a.only in (None, "70b"):
        plans.append(("70b", 1))
    mem_total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {mem_total / 2**30:.0f} GiB RAM, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}; dtype {a.dtype}, input {a.shape}")
    print("each mode: peak RSS (mapped file pages included) / peak anonymous memory (allocations only), "
          "in GiB and as x one model's weight bytes")
    print(f"{'model':<22}{'weights GiB':>12}" + "".join(f"{m:>34}" for m in a.modes.split(",")))
    try:
        for shape, layers in plans:
            params = {**SHAPES[shape], "n_layers": layers}
            path = work / f"{shape}-{layers}"
            if not (path / "config.json").exists():
                write_model(params, path, a.dtype)
            wb = weight_bytes(params, a.dtype)
            line = f"{shape}-shaped, {layers} layer(s)"
            line = f"{line:<22}{wb / 2**30:>12.2f}"
            for mode in a.modes.split(","):
                r = measure(mode, path, a.dtype, a.shape)
                cell = (f"{r['peak_bytes'] / 2**30:.2f} ({r['peak_bytes'] / wb:.2f}x) / "
                        f"{r['anon_peak_bytes'] / 2**30:.2f} ({r['anon_peak_bytes'] / wb:.2f}x)")
                line += f"{cell:>34}"
            print(line, flush=True)
            if not a.keep:
                shutil.rmtree(path)
    finally:
        if not a.keep and not a.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
