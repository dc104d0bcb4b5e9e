"""Deterministic synthetic Llama 2 checkpoints: tiny configs for tests, shaped slices for numerics.

Weights are drawn from a seeded CPU generator, so the same preset and seed give the same bytes
on every machine with the same torch build. The init keeps activations O(1) at every depth
(std 1/sqrt(fan_in)) and gives the norms non-trivial weights (1 + noise): a port that ignored a
norm weight must not get away with it because every weight was 1.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from harness.core import ROOT, cache_dir
import torch

from reference_model.checkpoint import save_hf, save_meta
from reference_model.convert import expected_meta_shapes
from reference_model.model import ModelArgs

from harness.core.errors import InputError

PRESETS: dict[str, dict] = {
    # name: params.json as Meta would write it (+ the tests' notes)
    "tiny-mha": dict(dim=64, n_layers=2, n_heads=4, vocab_size=512, multiple_of=32, norm_eps=1e-5),
    "tiny-gqa": dict(dim=128, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=512, multiple_of=64,
                     norm_eps=1e-5),
    # FFN through ffn_dim_multiplier and an odd multiple_of: int(1.3 * int(8*96/3)) = 332 -> 336
    "tiny-ffnmult": dict(dim=96, n_layers=3, n_heads=6, n_kv_heads=3, vocab_size=700, multiple_of=48,
                         ffn_dim_multiplier=1.3, norm_eps=1e-5),
    # Like tiny-gqa, but a few embedding channels carry "massive activations" (hundreds), as
    # Llama 2's residual stream does: float16 squares of them overflow unless norms run in float32.
    "tiny-outliers": dict(dim=128, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=512, multiple_of=64,
                          norm_eps=1e-5),
    # The embedded default: real 32000 vocab, GQA, head_dim 64.
    "default": dict(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=32000, multiple_of=64,
                    norm_eps=1e-5),
    # Long positions on Llama 2's head_dim (128: RoPE frequencies down to 10000^(-126/128)) with a
    # short max_position_embeddings (2048, Llama 1's), so `axes` can also run beyond it cheaply.
    # HF format only: Meta's params.json has no place for max_seq_len.
    "long-hd128": dict(dim=256, n_layers=2, n_heads=2, vocab_size=1024, multiple_of=64, norm_eps=1e-5,
                       max_seq_len=2048),
    # Real Llama-2-7B shapes (head_dim 128, FFN 11008, vocab 32000), one layer.
    "slice-7b": dict(dim=4096, n_layers=1, n_heads=32, vocab_size=32000, multiple_of=256, norm_eps=1e-5),
    # One Llama-2-70B block: GQA 64/8, FFN 28672.
    "slice-70b": dict(dim=8192, n_layers=1, n_heads=64, n_kv_heads=8, vocab_size=32000, multiple_of=4096,
                      ffn_dim_multiplier=1.3, norm_eps=1e-5),
}


# Presets made from the embedded model rather than drawn (HF format: what save_pretrained writes).
DERIVED = {"embedded-pad": "the embedded model with <pad> added and the embeddings resized to 32001"}


def preset_args(name: str, **overrides) -> ModelArgs:
    if name not in PRESETS:
        raise InputError(f"--preset: unknown preset {name!r} (known: {', '.join([*PRESETS, *DERIVED])})")
    return ModelArgs.from_params({**PRESETS[name], **overrides})


def random_state(args: ModelArgs, seed: int = 0, dtype: torch.dtype = torch.float32,
                 outliers: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in expected_meta_shapes(args).items():
        if key.endswith("norm.weight"):
            w = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif key == "tok_embeddings.weight":
            w = torch.randn(shape, generator=gen)
        elif key == "output.weight":
            w = torch.randn(shape, generator=gen) * (2.0 / shape[1] ** 0.5)   # logits std ~2: peaked
        else:
            w = torch.randn(shape, generator=gen) / shape[1] ** 0.5
        state[key] = w.to(dtype)
    if outliers:
        state["tok_embeddings.weight"][:, :outliers] *= 300.0
    return state


def write_preset(name: str, out: Path, fmt: str = "meta", shards: int = 1, seed: int = 0,
                 dtype: torch.dtype = torch.float32, hf_shard_tensors: int | None = None,
                 vocab_size: int | None = None) -> Path:
    args = preset_args(name, **({} if vocab_size is None else {"vocab_size": vocab_size}))
    state = random_state(args, seed, dtype, outliers=4 if name == "tiny-outliers" else 0)
    if fmt == "meta":
        return save_meta(out, args, state, n_shards=shards)
    if fmt == "hf":
        return save_hf(out, args, state, max_shard_tensors=hf_shard_tensors)
    raise InputError(f"--format: unknown checkpoint format {fmt!r} (meta or hf)")


EMBEDDED = ROOT / "models" / "tiny-llama2"


def default_model() -> Path:
    """The embedded default: the small trained Llama 2 committed in models/tiny-llama2."""
    if not (EMBEDDED / "params.json").exists():
        raise InputError(f"--model: the embedded model {EMBEDDED} is missing (a non-editable install does "
                         "not carry it); pass --model PATH")
    return EMBEDDED


def cached(name: str, fmt: str = "meta", seed: int = 0) -> Path:
    """A preset generated on first use into the cache (the same bytes every time)."""
    path = cache_dir() / "models" / (f"{name}-seed{seed}" + ("" if fmt == "meta" else f"-{fmt}"))
    if not (path / ("params.json" if fmt == "meta" else "config.json")).exists():
        write_preset(name, path, fmt=fmt, seed=seed)
    return path


def long_positions_model() -> Path:
    """The `long-hd128` preset (HF only: Meta's params.json cannot hold max_seq_len)."""
    return cached("long-hd128", fmt="hf")


def random_default_model() -> Path:
    """The random-weight `default` preset (real vocab size)."""
    return cached("default")


# --- the model the Llama 2 page tells users to make: <pad> added, embeddings resized --------------

PAD_PIECE = "<pad>"


def write_padded_model(out: Path, source: Path | None = None, seed: int = 0) -> Path:
    """An HF folder as ``tokenizer.add_special_tokens({"pad_token": "<pad>"})`` then
    ``model.resize_token_embeddings(len(tokenizer))`` and ``save_pretrained`` leave it: vocabulary
    32001, the 32000-piece tokenizer.model unchanged, ``<pad>`` (id 32000) in added_tokens.json,
    tokenizer_config.json's added_tokens_decoder and special_tokens_map.json. The new embedding and
    output rows are the mean of the old ones plus seeded noise (what transformers' mean resizing
    draws), so id 32000 computes something definite. ``source``: the embedded model by default."""
    import json

    from reference_model.checkpoint import load
    from harness.core.real_tokenizer import ensure_tokenizer_model
    ckpt = load(source or default_model())
    args, state = ckpt.args, dict(ckpt.state)
    gen = torch.Generator().manual_seed(seed)
    for key in ("tok_embeddings.weight", "output.weight"):
        w = state[key].to(torch.float32)
        row = w.mean(0, keepdim=True) + 0.02 * w.std() * torch.randn(1, w.shape[1], generator=gen)
        state[key] = torch.cat([w, row]).to(state[key].dtype)
    pad_id = args.vocab_size
    args = dataclasses.replace(args, vocab_size=pad_id + 1)
    out = Path(out)
    save_hf(out, args, state)
    config = json.loads((out / "config.json").read_text())
    config["pad_token_id"] = pad_id
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "tokenizer.model").write_bytes(ensure_tokenizer_model().read_bytes())
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": PAD_PIECE}
    decoder = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                        "single_word": False, "special": True}
               for i, t in enumerate(("<unk>", "<s>", "</s>"))}
    decoder[str(pad_id)] = {**decoder["0"], "content": PAD_PIECE}
    files = {
        "added_tokens.json": {PAD_PIECE: pad_id},
        "special_tokens_map.json": special,
        "tokenizer_config.json": {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True,
                                  "add_eos_token": False, "legacy": False, "model_max_length": args.max_seq_len,
                                  "added_tokens_decoder": decoder, **special},
    }
    for name, data in files.items():
        (out / name).write_text(json.dumps(data, indent=2) + "\n")
    return out
