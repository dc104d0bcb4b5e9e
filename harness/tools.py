"""Commands that are not suites: they make or convert checkpoints and build fixtures."""
from __future__ import annotations

from pathlib import Path

from harness.core import inputs
from harness.core.errors import InputError
from harness.core.suite import Command


class MakeModel(Command):
    name = "make-model"
    help = "write a deterministic synthetic checkpoint"

    def add_arguments(self, p) -> None:
        from harness.core.presets import PRESETS
        p.add_argument("--preset", required=True, help=f"model shape to write: {', '.join(PRESETS)}")
        p.add_argument("--format", default="meta", choices=("meta", "hf"),
                       help="meta (params.json + consolidated.NN.pth) or hf (config.json + safetensors)")
        p.add_argument("--shards", default="1", help="model-parallel shards (Meta format)")
        p.add_argument("--seed", default="0", help="seed of the random weights")
        p.add_argument("--vocab-size", help="override the preset's vocabulary (e.g. 32001: not divisible by "
                                            "pretraining_tp; default: the preset's)")
        p.add_argument("--out", required=True, help="folder to write (new, or holding no checkpoint)")

    def run(self, a, ctx=None) -> int:
        from harness.core.presets import preset_args, write_preset
        shards, seed = inputs.integer("--shards", a.shards, 1, 64), inputs.seed(a.seed)
        vocab = None if a.vocab_size is None else inputs.integer("--vocab-size", a.vocab_size, 4, 1 << 20)
        preset_args(a.preset)
        out = _empty_target(a.out)
        path = write_preset(a.preset, out, fmt=a.format, shards=shards, seed=seed, vocab_size=vocab)
        print(inputs.printable(f"wrote {a.preset} ({a.format}, {shards} shard(s), seed {seed}) to {path}"))
        return 0


class Convert(Command):
    name = "convert"
    help = "convert a checkpoint between Meta and HF layouts"

    def add_arguments(self, p) -> None:
        p.add_argument("--model", required=True, help="Meta or HF folder to read")
        p.add_argument("--to", required=True, choices=("meta", "hf"), help="layout to write")
        p.add_argument("--shards", default="1", help="model-parallel shards (--to meta)")
        p.add_argument("--out", required=True, help="folder to write (new, or holding no checkpoint)")

    def run(self, a, ctx=None) -> int:
        from harness.core.checkpoints import open_model
        from reference_model import checkpoint
        shards = inputs.integer("--shards", a.shards, 1, 64)
        out = _empty_target(a.out)
        ckpt = open_model(a.model).load()
        if a.to == "hf":
            checkpoint.save_hf(out, ckpt.args, ckpt.state)
        else:
            checkpoint.save_meta(out, ckpt.args, ckpt.state, n_shards=shards)
        print(inputs.printable(f"converted {a.model} ({ckpt.source}) to {a.to} at {out}"))
        return 0


def _empty_target(value: str) -> Path:
    """A folder to write a checkpoint into: it must not hold one already (two weight sets in one
    folder would have the reference and transformers read different weights)."""
    from harness.core.checkpoints import weight_sets
    out = inputs.out_dir(value)
    if out.is_dir():
        held = weight_sets(out) + [n for n in ("params.json", "config.json") if (out / n).exists()]
        if held:
            raise InputError(f"--out: {out} already holds a checkpoint ({', '.join(held)}); choose an empty folder")
    return out


class Fixtures(Command):
    name = "fixtures"
    help = "build (or find) the cached real Llama 2 tokenizer.model"

    def add_arguments(self, p) -> None:
        p.add_argument("--cache-dir", help="folder for tokenizer.model + vectors + PROVENANCE.json "
                                           "(default: $LLAMA_PARITY_CACHE/tokenizer or ~/.cache/llama-parity/tokenizer)")

    def run(self, a, ctx=None) -> int:
        from harness.core.real_tokenizer import main_fixtures
        return main_fixtures(a)
