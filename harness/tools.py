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
    help = "convert a checkpoint between Meta and HF layouts (with its tokenizer)"

    def add_arguments(self, p) -> None:
        p.add_argument("--model", required=True, help="Meta or HF folder to convert")
        p.add_argument("--to", required=True, choices=("meta", "hf"), help="layout to write")
        p.add_argument("--shards", default="1", help="model-parallel shards of a Meta checkpoint (default: 1)")
        p.add_argument("--tokenizer", help="tokenizer.model to ship with the weights (default: the model "
                                           "folder's, or its parent's as Meta's download has it, or the "
                                           "built Llama 2 tokenizer for a 32000-entry vocabulary)")
        p.add_argument("--out", required=True, help="an empty folder to write into")

    def run(self, a, ctx=None) -> int:
        from harness.core.checkpoints import open_model
        from reference_model import checkpoint
        shards = inputs.integer("--shards", a.shards, 1, 64)
        out = _empty_target(a.out)
        folder = open_model(a.model)
        tokenizer = _tokenizer_for(folder.path, folder.args.vocab_size, a.tokenizer)   # refused before writing
        ckpt = folder.load()
        if a.to == "hf":
            checkpoint.save_hf(out, ckpt.args, ckpt.state)
            write_hf_extras(out, ckpt.args, tokenizer)
        else:
            checkpoint.save_meta(out, ckpt.args, ckpt.state, n_shards=shards)
            if tokenizer is not None:
                _copy(tokenizer, out / "tokenizer.model")
        said = f"tokenizer {tokenizer}" if tokenizer else "no tokenizer (none beside the weights; --tokenizer adds one)"
        print(inputs.printable(f"converted {a.model} ({ckpt.source}) to {a.to} at {out}; {said}"))
        return 0


# What a Llama 2 user downloads beside the weights of meta-llama/Llama-2-7b-hf (facts of that
# folder; written as plain strings and without tokenizer.json, which every release from 4.31 on
# reads: a tokenizer.json written by tokenizers >= 0.20 does not load in transformers <= 4.40).
SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def write_hf_extras(out: Path, args, tokenizer: Path | None) -> None:
    """generation_config.json always; tokenizer.model, tokenizer_config.json and
    special_tokens_map.json when there is a tokenizer, so that AutoTokenizer loads the folder."""
    import json
    from reference_model.checkpoint import _atomic
    # Meta's sampling defaults (temperature 0.6, top_p 0.9), as the published folder carries them.
    gen = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "do_sample": True, "temperature": 0.6,
           "top_p": 0.9, "max_length": args.max_seq_len}
    files = {"generation_config.json": gen}
    if tokenizer is not None:
        _copy(tokenizer, out / "tokenizer.model")
        files["special_tokens_map.json"] = dict(SPECIAL_TOKENS)
        files["tokenizer_config.json"] = {
            **SPECIAL_TOKENS, "add_bos_token": True, "add_eos_token": False, "pad_token": None,
            "clean_up_tokenization_spaces": False, "legacy": False, "model_max_length": args.max_seq_len,
            "padding_side": "right", "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer"}
    for name, data in files.items():
        _atomic(out / name, lambda tmp, d=data: Path(tmp).write_text(json.dumps(d, indent=2) + "\n"))


def _tokenizer_for(model: Path, vocab: int, given: str | None) -> Path | None:
    """The tokenizer.model to ship, checked to be a sentencepiece model of the model's vocabulary."""
    if given is not None:
        path = inputs.existing_file("--tokenizer", given)
    else:
        found = [p for p in (model / "tokenizer.model", model.parent / "tokenizer.model") if p.is_file()]
        if found:
            path, given = found[0], str(found[0])
        elif vocab == 32000:
            from harness.core.real_tokenizer import ensure_tokenizer_model
            path, given = ensure_tokenizer_model(), "the built Llama 2 tokenizer"
        else:
            return None
    import sentencepiece as spm
    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except Exception as e:  # noqa: BLE001 - sentencepiece raises RuntimeError/OSError for a bad file
        raise InputError(f"--tokenizer: {given}: not a sentencepiece model ({type(e).__name__})") from None
    if sp.get_piece_size() != vocab:
        raise InputError(f"--tokenizer: {given}: {sp.get_piece_size()} pieces, the model's vocabulary {vocab}")
    return Path(path)


def _copy(src: Path, dst: Path) -> None:
    from reference_model.checkpoint import _atomic
    data = Path(src).read_bytes()
    _atomic(dst, lambda tmp: Path(tmp).write_bytes(data))


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
