"""Meta <-> Hugging Face layout: the q/k permute, the key names and the config fields.

This is the one place where the permute formula lives. transformers' RoPE rotates the two
*halves* of each head (``rotate_half``) while Meta's rotates *interleaved* pairs, so HF
checkpoints store wq/wk with each head's rows reordered: Meta rows (0,1),(2,3),... become
rows (0, d/2), (1, d/2+1), ... . Everything else is a rename.
"""
from __future__ import annotations

import math
import re

import torch

from .errors import CheckpointError
from .model import ModelArgs


def permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta -> HF row order of a q or k projection (n_heads = kv heads for k)."""
    d1, d2 = w.shape
    return w.view(n_heads, d1 // n_heads // 2, 2, d2).transpose(1, 2).reshape(d1, d2)


def unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF -> Meta row order; the exact inverse of ``permute``."""
    d1, d2 = w.shape
    return w.view(n_heads, 2, d1 // n_heads // 2, d2).transpose(1, 2).reshape(d1, d2)


# Per-layer names: Meta suffix -> HF suffix.
_LAYER_KEYS = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP_KEYS = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# Buffers some published checkpoints carry; they are recomputed, never used.
META_IGNORED = re.compile(r"^rope\.freqs$")
HF_IGNORED = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")


def expected_meta_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every tensor a Meta checkpoint of these args must hold, with its full (merged) shape."""
    hd, kv, ffn = args.head_dim, args.kv_heads, args.ffn_hidden
    shapes = {
        "tok_embeddings.weight": (args.vocab_size, args.dim),
        "norm.weight": (args.dim,),
        "output.weight": (args.vocab_size, args.dim),
    }
    per_layer = {
        "attention.wq.weight": (args.n_heads * hd, args.dim),
        "attention.wk.weight": (kv * hd, args.dim),
        "attention.wv.weight": (kv * hd, args.dim),
        "attention.wo.weight": (args.dim, args.n_heads * hd),
        "feed_forward.w1.weight": (ffn, args.dim),
        "feed_forward.w2.weight": (args.dim, ffn),
        "feed_forward.w3.weight": (ffn, args.dim),
        "attention_norm.weight": (args.dim,),
        "ffn_norm.weight": (args.dim,),
    }
    for i in range(args.n_layers):
        shapes.update({f"layers.{i}.{k}": s for k, s in per_layer.items()})
    return shapes


def check_state(state: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]],
                where: str, ignored: re.Pattern) -> dict[str, torch.Tensor]:
    """Strict key mapping: every expected tensor present with its shape, nothing unknown."""
    for key in sorted(state):
        if key not in expected and not ignored.match(key):
            raise CheckpointError(where, key, "unexpected tensor (not part of a Llama 2 checkpoint of this config)")
    for key, shape in expected.items():
        if key not in state:
            raise CheckpointError(where, key, "missing tensor")
        if tuple(state[key].shape) != tuple(shape):
            raise CheckpointError(where, key, f"shape {tuple(state[key].shape)}, expected {tuple(shape)}")
        check_tensor(where, key, state[key])
    return {k: state[k] for k in expected}


# Weights a float64 oracle can be compared with: real floating point, stored densely. Anything
# else would be cast silently (integers, float8, quantized) or cannot be read at all (meta).
WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_tensor(where: str, key: str, w: torch.Tensor) -> None:
    if w.layout != torch.strided:
        raise CheckpointError(where, key, f"{w.layout} tensor: only dense weights are compared")
    if w.is_meta:
        raise CheckpointError(where, key, "a meta tensor holds no values")
    if w.is_quantized:
        raise CheckpointError(where, key, f"quantized ({w.dtype}): the harness compares unquantized weights")
    if w.dtype not in WEIGHT_DTYPES:
        raise CheckpointError(where, key, f"dtype {str(w.dtype).removeprefix('torch.')}: weights must be "
                                          "float32, bfloat16, float16 or float64")


def meta_to_hf_key(key: str) -> str:
    if key in _TOP_KEYS:
        return _TOP_KEYS[key]
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", key)
    if m and m.group(2) in _LAYER_KEYS:
        return f"model.layers.{m.group(1)}.{_LAYER_KEYS[m.group(2)]}"
    raise KeyError(key)


def hf_to_meta_key(key: str) -> str:
    inverse_top = {v: k for k, v in _TOP_KEYS.items()}
    if key in inverse_top:
        return inverse_top[key]
    inverse_layer = {v: k for k, v in _LAYER_KEYS.items()}
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", key)
    if m and m.group(2) in inverse_layer:
        return f"layers.{m.group(1)}.{inverse_layer[m.group(2)]}"
    raise KeyError(key)


def meta_to_hf_state(state: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    out = {}
    for key, w in state.items():
        if key.endswith("attention.wq.weight"):
            w = permute(w, args.n_heads)
        elif key.endswith("attention.wk.weight"):
            w = permute(w, args.kv_heads)
        out[meta_to_hf_key(key)] = w.contiguous()
    return out


def hf_to_meta_state(state: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    out = {}
    for key, w in state.items():
        meta_key = hf_to_meta_key(key)
        if meta_key.endswith("attention.wq.weight"):
            w = unpermute(w, args.n_heads)
        elif meta_key.endswith("attention.wk.weight"):
            w = unpermute(w, args.kv_heads)
        out[meta_key] = w.contiguous()
    return out


def args_to_hf_config(args: ModelArgs, torch_dtype: str = "float32") -> dict:
    """A LlamaConfig dict that every transformers release from 4.31 reads the same way."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.dim,
        "intermediate_size": args.ffn_hidden,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.kv_heads,
        "vocab_size": args.vocab_size,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        # Old releases read rope_theta, 5.x reads rope_parameters; give both the same number.
        "rope_parameters": {"rope_type": "default", "rope_theta": args.rope_theta},
        "rope_scaling": None,
        "max_position_embeddings": args.max_seq_len,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": None,
        "use_cache": True,
        "torch_dtype": torch_dtype,
    }


_HF_REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "vocab_size", "rms_norm_eps")


# The JSON type each config field must have: a string where a number belongs must be refused
# here, naming the key, not crash later inside arithmetic. bool is excluded from int on purpose.
_META_TYPES = {"dim": int, "n_layers": int, "n_heads": int, "n_kv_heads": (int, type(None)),
               "vocab_size": int, "multiple_of": int, "ffn_dim_multiplier": (int, float, type(None)),
               "norm_eps": (int, float), "rope_theta": (int, float), "max_batch_size": int, "max_seq_len": int}
_HF_TYPES = {"hidden_size": int, "intermediate_size": int, "num_hidden_layers": int,
             "num_attention_heads": int, "num_key_value_heads": (int, type(None)), "vocab_size": int,
             "rms_norm_eps": (int, float), "rope_theta": (int, float), "max_position_embeddings": int,
             "rope_parameters": (dict, type(None))}


def check_types(config: dict, types: dict, where: str) -> None:
    """Every present field of a known name has its JSON type (finite numbers; no bools as ints)."""
    for key, want in types.items():
        if key not in config:
            continue
        v = config[key]
        ok = isinstance(v, want) and not isinstance(v, bool)
        if ok and isinstance(v, float) and not math.isfinite(v):
            ok = False
        if not ok:
            names = want.__name__ if isinstance(want, type) else " or ".join(
                "null" if t is type(None) else t.__name__ for t in want)
            raise CheckpointError(where, key, f"{v!r} is not a finite {names}")


def hf_config_to_args(config: dict, where: str) -> ModelArgs:
    """Meta args for an HF config; the FFN size must be reachable by Meta's sizing rule."""
    for key in _HF_REQUIRED:
        if key not in config:
            raise CheckpointError(where, key, "missing field")
    check_types(config, _HF_TYPES, where)
    rope = config.get("rope_parameters") or {}
    check_types(rope, {"rope_theta": (int, float)}, f"{where} [rope_parameters]")
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    scaling = config.get("rope_scaling")
    if scaling or rope.get("rope_type", "default") != "default":
        raise CheckpointError(where, "rope_scaling", "RoPE scaling is not part of Llama 2")
    if config.get("tie_word_embeddings"):
        raise CheckpointError(where, "tie_word_embeddings", "Llama 2 does not tie embeddings")
    _check_llama2(config, where)
    kv = config.get("num_key_value_heads")
    args = ModelArgs(
        dim=config["hidden_size"], n_layers=config["num_hidden_layers"],
        n_heads=config["num_attention_heads"],
        n_kv_heads=config["num_attention_heads"] if kv is None else kv,
        vocab_size=config["vocab_size"], norm_eps=config["rms_norm_eps"], rope_theta=float(theta),
        max_seq_len=config.get("max_position_embeddings", 4096),
    )
    validate_args(args, where)   # sizes sane before the FFN search does arithmetic on them
    if not 0 < config["intermediate_size"] < _MAX_SIZE:
        raise CheckpointError(where, "intermediate_size", f"{config['intermediate_size']} must be positive")
    args = _with_ffn(args, config["intermediate_size"], where)
    validate_args(args, where)
    return args


# Fields of an HF config that, set otherwise, describe a model that is not Llama 2: comparing it
# with the Llama 2 reference would blame transformers for a different architecture.
_LLAMA2_FIXED = {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "model_type": "llama"}
_DTYPE_NAMES = ("float32", "float16", "bfloat16", "float64", "auto")


def _check_llama2(config: dict, where: str) -> None:
    for key, want in _LLAMA2_FIXED.items():
        if key in config and config[key] != want:
            raise CheckpointError(where, key, f"{config[key]!r}: Llama 2 has {want!r}")
    heads, dim = config.get("num_attention_heads"), config.get("hidden_size")
    head_dim = config.get("head_dim")
    if head_dim is not None and (isinstance(head_dim, bool) or not isinstance(head_dim, int)
                                 or not heads or head_dim * heads != dim):
        raise CheckpointError(where, "head_dim", f"{head_dim!r}, but hidden_size / num_attention_heads = "
                                                 f"{dim} / {heads}: Llama 2 has no separate head_dim")
    for key in ("torch_dtype", "dtype"):
        if key in config and config[key] is not None and config[key] not in _DTYPE_NAMES:
            raise CheckpointError(where, key, f"{config[key]!r} is not a dtype ({', '.join(_DTYPE_NAMES)})")
    if "num_key_value_heads" in config and config["num_key_value_heads"] is not None \
            and config["num_key_value_heads"] <= 0:
        raise CheckpointError(where, "num_key_value_heads", f"{config['num_key_value_heads']} must be positive")
    if config.get("sliding_window") not in (None, False):
        raise CheckpointError(where, "sliding_window", "Llama 2 attends to every earlier position")


def _with_ffn(args: ModelArgs, hidden: int, where: str) -> ModelArgs:
    """Find multiple_of / ffn_dim_multiplier giving Meta's rule the HF intermediate_size."""
    base = int(2 * 4 * args.dim / 3)
    for multiple_of in (4096, 1024, 256, 128, 64, 32, 16, 8, 4, 2, 1):
        for mult in (None, 1.3, 1.5, 2.0, 1.0, 4.0, 0.5):
            args.multiple_of, args.ffn_dim_multiplier = multiple_of, mult
            if args.ffn_hidden == hidden:
                return args
    # Not reachable by a known rule: express it exactly as a multiplier on the base size.
    args.multiple_of, args.ffn_dim_multiplier = 1, hidden / base
    if args.ffn_hidden != hidden:
        raise CheckpointError(where, "intermediate_size", f"{hidden} is not reachable by Meta's FFN sizing")
    return args


def meta_params(args: ModelArgs) -> dict:
    """params.json as Meta writes it (n_kv_heads and ffn_dim_multiplier only when set)."""
    params = {"dim": args.dim, "multiple_of": args.multiple_of, "n_heads": args.n_heads,
              "n_layers": args.n_layers, "norm_eps": args.norm_eps, "vocab_size": args.vocab_size}
    if args.n_kv_heads is not None and args.n_kv_heads != args.n_heads:
        params["n_kv_heads"] = args.n_kv_heads
    if args.ffn_dim_multiplier is not None:
        params["ffn_dim_multiplier"] = args.ffn_dim_multiplier
    if args.rope_theta != 10000.0:
        params["rope_theta"] = args.rope_theta
    return params


_MAX_SIZE = 2 ** 31   # far above any Llama; stops arithmetic on absurd sizes from overflowing floats


_MAX_LAYERS = 4096   # 80 in Llama 2 70B


def validate_args(args: ModelArgs, where: str) -> None:
    for key in ("dim", "n_heads", "n_layers", "vocab_size", "multiple_of", "max_seq_len"):
        if abs(getattr(args, key)) >= _MAX_SIZE:
            raise CheckpointError(where, key, f"{getattr(args, key)} is too large")
    if args.n_layers > _MAX_LAYERS:
        raise CheckpointError(where, "n_layers", f"{args.n_layers} layers: more than the {_MAX_LAYERS} any Llama could have")
    if args.dim <= 0 or args.n_heads <= 0 or args.n_layers < 0:
        raise CheckpointError(where, "dim/n_heads/n_layers", "must be positive")
    if args.multiple_of <= 0:
        raise CheckpointError(where, "multiple_of", f"{args.multiple_of} must be positive")
    if args.ffn_dim_multiplier is not None and not 0 < args.ffn_dim_multiplier <= 1000:
        raise CheckpointError(where, "ffn_dim_multiplier", f"{args.ffn_dim_multiplier} must be in (0, 1000]")
    if args.max_seq_len <= 0:
        raise CheckpointError(where, "max_seq_len", f"{args.max_seq_len} must be positive")
    if args.dim % args.n_heads:
        raise CheckpointError(where, "n_heads", f"{args.n_heads} heads do not divide dim {args.dim}")
    if args.head_dim % 2:
        raise CheckpointError(where, "n_heads", f"head_dim {args.head_dim} is odd; RoPE needs pairs")
    if args.kv_heads <= 0 or args.n_heads % args.kv_heads:
        raise CheckpointError(where, "n_kv_heads", f"{args.kv_heads} kv heads do not divide {args.n_heads} heads")
    if args.vocab_size <= 0:
        raise CheckpointError(where, "vocab_size", f"{args.vocab_size}: set it (or give a tokenizer)")
    if not args.norm_eps > 0:
        raise CheckpointError(where, "norm_eps", f"{args.norm_eps} must be > 0")
    if not (math.isfinite(args.rope_theta) and args.rope_theta > 0):
        raise CheckpointError(where, "rope_theta", f"{args.rope_theta} must be a finite number > 0")
    if args.ffn_hidden <= 0:
        raise CheckpointError(where, "multiple_of/ffn_dim_multiplier", f"FFN size {args.ffn_hidden} must be positive")


def check_vocab(args: ModelArgs, tokenizer_vocab: int | None, where: str) -> None:
    """The checkpoint's vocabulary must be the tokenizer's: ids past either end would index garbage."""
    if tokenizer_vocab is not None and args.vocab_size != tokenizer_vocab:
        raise CheckpointError(where, "vocab_size", f"{args.vocab_size}, but the tokenizer has {tokenizer_vocab} pieces")


def nonfinite_weights(state: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> dict[str, str]:
    """Tensor name -> what is wrong with it: NaN or Inf as stored, or (given a narrower dtype)
    values past that dtype's range, which become Inf when cast. Empty when every weight is fine.

    Not an input error: a run over such weights goes on, and the cells they spoil fail with this
    named as the reason (a gate must report, not crash).
    """
    out = {}
    big = torch.finfo(dtype).max if dtype is not None and dtype.is_floating_point else None
    for key, w in state.items():
        if not w.is_floating_point():
            continue
        nan = int(torch.isnan(w).sum())
        inf = int(torch.isinf(w).sum())
        parts = [f"{n} {what}" for n, what in ((nan, "NaN"), (inf, "Inf")) if n]
        if big is not None and torch.finfo(w.dtype).max > big:
            over = int((w.abs() > big).sum()) - inf
            if over > 0:
                parts.append(f"{over} beyond {str(dtype).removeprefix('torch.')} range (overflow to Inf)")
        if parts:
            out[key] = ", ".join(parts)
    return out
