"""Print accelerate's device maps for Llama-2 7B/13B/70B shapes on 1, 2, 4 and 8 GPUs of 80 GiB.

Planning only: the models are built on the meta device (harness.scale.place.empty_reference), so no
weight is allocated and no GPU is needed (accelerate warns that the GPUs are absent). Each row:
blocks per device and weight GiB per device, in float16, under `--device-map auto` and `balanced`.

    python benchmarks/placement.py [--gib 80] [--cpu-gib 256]
"""
from __future__ import annotations

import argparse
import logging

import torch

from harness.scale.place import blocks_per_device, bytes_per_device, empty_reference, plan
from reference_model.model import ModelArgs

# Meta's params.json for each size (vocab 32000).
SHAPES = {
    "7B": dict(dim=4096, n_layers=32, n_heads=32, multiple_of=256, vocab_size=32000),
    "13B": dict(dim=5120, n_layers=40, n_heads=40, multiple_of=256, vocab_size=32000),
    "70B": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.3, multiple_of=4096,
                vocab_size=32000),
}


def _span(blocks: list[int]) -> str:
    return f"{blocks[0]}-{blocks[-1]} ({len(blocks)})" if blocks else "-"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gib", type=float, default=80.0, help="memory per GPU (GiB)")
    p.add_argument("--cpu-gib", type=float, default=256.0, help="CPU memory for what does not fit (GiB)")
    a = p.parse_args()
    logging.getLogger("accelerate").setLevel(logging.ERROR)   # "Device N is not available": planning only
    print(f"float16, {a.gib:g} GiB per GPU, {a.cpu_gib:g} GiB CPU; "
          "blocks 'first-last (count)' and weight GiB per device")
    for name, params in SHAPES.items():
        args = ModelArgs.from_params(params)
        model = empty_reference(args, torch.float16)
        total = sum(p.numel() for p in model.parameters()) * 2 / 2**30
        print(f"\n{name}: {args.n_layers} blocks, {total:.1f} GiB of float16 weights")
        for gpus in (1, 2, 4, 8):
            budget = {**{i: int(a.gib * 2**30) for i in range(gpus)}, "cpu": int(a.cpu_gib * 2**30)}
            for strategy in ("auto", "balanced"):
                if gpus == 1 and strategy == "balanced":
                    continue   # one GPU: nothing to balance
                device_map = plan(model, dict(budget), torch.float16, strategy)
                blocks = blocks_per_device(device_map, args.n_layers)
                used = bytes_per_device(model, device_map, torch.float16)
                cells = [f"{d}: {_span(blocks.get(d, []))} {used.get(d, 0) / 2**30:.1f} GiB"
                         for d in [*range(gpus), "cpu", "disk"] if d in used]
                print(f"  {gpus} GPU {strategy:>8}: " + "; ".join(cells))


if __name__ == "__main__":
    main()
