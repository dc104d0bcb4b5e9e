"""Deterministic synthetic Llama 2 checkpoints: tiny configs for tests, shaped slices for numerics.

Weights are drawn from a seeded CPU generator, so the same preset and seed give the same bytes
on every machine with the same torch build. The init keeps activations O(1) at every depth
(std 1/sqrt(fan_in)) and gives the norms non-trivial weights (1 + noise): a port that ignored a
norm weight must not get away with it because every weight was 1.
"""
from __future__ import annotations

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


def preset_args(name: str, **overrides) -> ModelArgs:
    if name not in PRESETS:
        raise InputError(f"--preset: unknown preset {name!r} (known: {', '.join(PRESETS)})")
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
