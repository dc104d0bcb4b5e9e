"""Reading and writing Llama 2 checkpoints: Meta's sharded .pth and Hugging Face folders.

Meta format: ``params.json`` + ``consolidated.00.pth`` ... one file per model-parallel rank.
HF format: ``config.json`` + ``model.safetensors`` (or shards with an index; ``.bin`` read too).

Every reader is strict: each expected tensor must be found exactly once with its shape, and an
unknown tensor is an error; every error names the file and the key. ``torch.load`` always runs
with ``weights_only=True``, so a checkpoint that carries pickled code is refused, never run.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .convert import (_META_TYPES, HF_IGNORED, META_IGNORED, args_to_hf_config, check_state, check_tensor, check_types,
                      check_vocab, expected_meta_shapes, hf_config_to_args, hf_to_meta_key, hf_to_meta_state,
                      meta_params, meta_to_hf_key, meta_to_hf_state, nonfinite_weights, validate_args)
from .errors import CheckpointError
from .model import ModelArgs

# How each tensor is split across model-parallel ranks in Meta's code (fairscale layers):
# ColumnParallelLinear splits the output rows (dim 0), RowParallelLinear the input columns
# (dim 1), ParallelEmbedding the embedding dimension (dim 1). Norms are replicated (None).
SHARD_DIM: list[tuple[re.Pattern, int | None]] = [
    (re.compile(r"^tok_embeddings\.weight$"), 1),
    (re.compile(r"^output\.weight$"), 0),
    (re.compile(r"^layers\.\d+\.attention\.w[qkv]\.weight$"), 0),
    (re.compile(r"^layers\.\d+\.attention\.wo\.weight$"), 1),
    (re.compile(r"^layers\.\d+\.feed_forward\.w[13]\.weight$"), 0),
    (re.compile(r"^layers\.\d+\.feed_forward\.w2\.weight$"), 1),
    (re.compile(r"^(layers\.\d+\.(attention|ffn)_norm\.weight|norm\.weight|rope\.freqs)$"), None),
]

META_SHARD = re.compile(r"^consolidated\.(\d+)\.pth$")


def shard_dim(key: str) -> int | None:
    for pattern, dim in SHARD_DIM:
        if pattern.match(key):
            return dim
    raise KeyError(key)


@dataclass
class Checkpoint:
    """A checkpoint in Meta's layout, whatever format it was read from."""
    args: ModelArgs
    state: dict[str, torch.Tensor]
    source: str            # "meta" or "hf"
    path: Path
    n_shards: int = 1


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(str(path), None, "file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:   # deep nesting recurses
        raise CheckpointError(str(path), None, f"not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(str(path), None, "expected a JSON object")
    return data


def torch_load(path: Path) -> dict[str, torch.Tensor]:
    """Load a .pth/.bin of tensors only; pickled callables are refused by weights_only."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # UnpicklingError for code, RuntimeError/EOFError for truncation
        kind = "refused: it holds objects other than tensors" if "weights_only" in str(e) else "unreadable"
        first = re.sub(r"\x1b\[[0-9;]*m", "", str(e).splitlines()[0] if str(e) else "")[:200]   # no ANSI colour
        raise CheckpointError(str(path), None, f"{kind} ({type(e).__name__}: {first})") from None
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise CheckpointError(str(path), None, "expected a flat dict of name -> tensor")
    return obj


def detect_format(path: Path) -> str:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(str(path), None, "not a checkpoint folder (expected params.json or config.json inside)")
    if (path / "params.json").exists():
        return "meta"
    if (path / "config.json").exists():
        return "hf"
    raise CheckpointError(str(path), None, "neither params.json (Meta) nor config.json (Hugging Face) found")


def load(path: str | Path, vocab_size: int | None = None) -> Checkpoint:
    """Read a Meta or HF checkpoint. vocab_size: the tokenizer's, when one goes with the weights
    (fills params.json's -1, and any other value must match it)."""
    path = Path(path)
    if detect_format(path) == "meta":
        return load_meta(path, vocab_size)
    ckpt = load_hf(path)
    check_vocab(ckpt.args, vocab_size, str(path / "config.json"))
    return ckpt


__all__ = ["Checkpoint", "load", "load_meta", "load_hf", "save_meta", "save_hf", "build_model",
           "nonfinite_weights", "read_json", "torch_load"]


# --- Meta format -------------------------------------------------------------------------------

def meta_shard_files(path: Path) -> list[Path]:
    files = sorted((p for p in path.iterdir() if META_SHARD.match(p.name)), key=lambda p: int(META_SHARD.match(p.name)[1]))
    if not files:
        raise CheckpointError(str(path), None, "no consolidated.NN.pth shard found")
    for i, f in enumerate(files):
        if int(META_SHARD.match(f.name)[1]) != i:
            raise CheckpointError(str(path / f"consolidated.{i:02d}.pth"), None,
                                  f"missing shard: found {[p.name for p in files]}")
    return files


def load_meta_args(path: Path, vocab_size: int | None = None) -> ModelArgs:
    params_path = path / "params.json"
    params = read_json(params_path)
    for key in ("dim", "n_layers", "n_heads", "norm_eps"):
        if key not in params:
            raise CheckpointError(str(params_path), key, "missing field")
    check_types(params, _META_TYPES, str(params_path))
    try:
        args = ModelArgs.from_params(params)
    except (KeyError, TypeError) as e:
        raise CheckpointError(str(params_path), None, str(e).strip("'\"")) from None
    if args.vocab_size == -1 and vocab_size:
        args.vocab_size = vocab_size
    check_vocab(args, vocab_size, str(params_path))
    return args


def merge_shards(shards: list[dict[str, torch.Tensor]], files: list[Path]) -> dict[str, torch.Tensor]:
    """Concatenate column/row-parallel tensors; check replicated ones agree across ranks."""
    keys = set(shards[0])
    for f, s in zip(files[1:], shards[1:]):
        for key in sorted(keys - set(s)):
            raise CheckpointError(str(f), key, f"missing in this shard but present in {files[0].name}")
        for key in sorted(set(s) - keys):
            raise CheckpointError(str(f), key, f"present in this shard but not in {files[0].name}")
    merged = {}
    for key in sorted(keys):
        try:
            dim = shard_dim(key)
        except KeyError:
            raise CheckpointError(str(files[0]), key, "unexpected tensor (not part of a Llama 2 checkpoint)") from None
        parts = [s[key] for s in shards]
        for f, p in zip(files, parts):      # sparse, meta, quantized: refused before torch.equal/cat see them
            if not META_IGNORED.match(key):
                check_tensor(str(f), key, p)
            elif p.layout != torch.strided or p.is_meta:
                raise CheckpointError(str(f), key, f"{p.layout}{' meta' if p.is_meta else ''} tensor: only dense "
                                                   "tensors can be read")
        for f, p in zip(files[1:], parts[1:]):
            if p.dtype != parts[0].dtype:   # torch.cat would promote silently
                raise CheckpointError(str(f), key, f"dtype {p.dtype} differs from shard 0's {parts[0].dtype}")
        if dim is None:
            for f, p in zip(files[1:], parts[1:]):
                if p.shape != parts[0].shape or not torch.equal(p, parts[0]):
                    raise CheckpointError(str(f), key, "replicated tensor differs from shard 0")
            merged[key] = parts[0]
        else:
            other = [d for d in range(parts[0].dim()) if d != dim]
            for f, p in zip(files[1:], parts[1:]):
                if p.dim() != parts[0].dim() or [p.shape[d] for d in other] != [parts[0].shape[d] for d in other]:
                    raise CheckpointError(str(f), key, f"shard shape {tuple(p.shape)} does not fit shard 0's "
                                                       f"{tuple(parts[0].shape)} (concatenated on dim {dim})")
            merged[key] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)
    return merged


def load_meta(path: Path, vocab_size: int | None = None) -> Checkpoint:
    args = load_meta_args(path, vocab_size)
    files = meta_shard_files(path)
    state = merge_shards([torch_load(f) for f in files], files)
    if args.vocab_size == -1 and "tok_embeddings.weight" in state:
        args.vocab_size = state["tok_embeddings.weight"].shape[0]
    validate_args(args, str(path / "params.json"))
    _check_vocab_rows(args, state, "tok_embeddings.weight", path / "params.json", files[0])
    _check_shard_count(args, state, files)
    state = check_state(state, expected_meta_shapes(args), str(files[0] if len(files) == 1 else path), META_IGNORED)
    return Checkpoint(args, state, "meta", path, len(files))


def _check_vocab_rows(args: ModelArgs, state: dict, key: str, config: Path, file: Path) -> None:
    """A vocab_size that disagrees with the embedding is the config's fault: name both."""
    w = state.get(key)
    if w is not None and w.dim() == 2 and w.shape[0] != args.vocab_size and w.shape[1] == args.dim:
        raise CheckpointError(str(config), "vocab_size", f"{args.vocab_size}, but {file.name} [{key}] has "
                                                         f"{w.shape[0]} rows")


def _check_shard_count(args: ModelArgs, state: dict, files: list[Path]) -> None:
    """Shards that concatenate to a multiple or fraction of the expected size: one too many or few."""
    expected = expected_meta_shapes(args)
    for key, w in state.items():
        if key not in expected or shard_dim(key) is None or w.dim() != len(expected[key]):
            continue
        d = shard_dim(key)
        per = w.shape[d] // len(files)
        if w.shape[d] != expected[key][d] and per and expected[key][d] % per == 0:
            found = (f"{len(files)} shards ({files[0].name} .. {files[-1].name}) concatenate to"
                     if len(files) > 1 else "the only shard holds")
            raise CheckpointError(str(files[-1]), key, f"{found} {tuple(w.shape)}, expected {expected[key]}: "
                                  f"{expected[key][d] // per} shard(s) of this size would fit")


def split_shards(state: dict[str, torch.Tensor], n: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    for key, w in state.items():
        dim = shard_dim(key)
        if dim is not None and w.shape[dim] % n:
            raise CheckpointError(key, key, f"size {w.shape[dim]} on dim {dim} does not split into {n} shards")
        parts = [w] * n if dim is None else list(torch.chunk(w, n, dim=dim))
        for shard, part in zip(shards, parts):
            shard[key] = part.clone()   # clone: torch.save of a view would store the whole tensor
    return shards


def save_meta(path: str | Path, args: ModelArgs, state: dict[str, torch.Tensor], n_shards: int = 1) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for i, shard in enumerate(split_shards(state, n_shards)):
        _atomic(path / f"consolidated.{i:02d}.pth", lambda tmp, s=shard: torch.save(s, tmp))
    _atomic(path / "params.json", lambda tmp: Path(tmp).write_text(json.dumps(meta_params(args), indent=2) + "\n"))
    return path


# --- Hugging Face format -----------------------------------------------------------------------

def _read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    try:
        return load_file(str(file))
    except Exception as e:
        raise CheckpointError(str(file), None, f"unreadable safetensors ({type(e).__name__}: {e})") from None


def _read_weight_file(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise CheckpointError(str(file), None, "file not found")
    return _read_safetensors(file) if file.suffix == ".safetensors" else torch_load(file)


def hf_weight_files(path: Path) -> tuple[list[Path], dict[str, str] | None, Path | None]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index_path = path / index_name
        if index_path.exists():
            index = read_json(index_path)
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(str(index_path), "weight_map", "missing, empty or not an object")
            for key, fname in weight_map.items():
                # A bare file name in this folder: an index must not point the reader elsewhere.
                if not isinstance(fname, str) or not fname or "/" in fname or "\\" in fname or fname in (".", ".."):
                    raise CheckpointError(str(index_path), f"weight_map.{key}", f"{fname!r} is not a file name in this folder")
            files = sorted({path / f for f in weight_map.values()})
            return files, weight_map, index_path
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).exists():
            return [path / name], None, None
    raise CheckpointError(str(path), None, "no model.safetensors, pytorch_model.bin or index found")


def load_hf(path: Path) -> Checkpoint:
    config_path = path / "config.json"
    config = read_json(config_path)
    args = hf_config_to_args(config, str(config_path))
    if isinstance(config.get("llama_parity_meta_params"), dict):   # written by save_hf: exact Meta params
        where = f"{config_path} [llama_parity_meta_params]"
        check_types(config["llama_parity_meta_params"], _META_TYPES, where)
        try:
            meta = ModelArgs.from_params(config["llama_parity_meta_params"])
            same = meta.ffn_hidden == args.ffn_hidden and meta.dim == args.dim
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
            raise CheckpointError(where, None, str(e).strip("'\"")) from None
        if same:
            args.multiple_of, args.ffn_dim_multiplier = meta.multiple_of, meta.ffn_dim_multiplier
    files, weight_map, index_path = hf_weight_files(path)
    state: dict[str, torch.Tensor] = {}
    for file in files:
        part = _read_weight_file(file)
        for key, w in part.items():
            if key in state:
                raise CheckpointError(str(file), key, "tensor appears in more than one file")
            if weight_map is not None and weight_map.get(key) != file.name and not HF_IGNORED.match(key):
                raise CheckpointError(str(file), key, f"not listed for this file in {index_path.name}")
            state[key] = w
    if weight_map is not None:
        for key, fname in weight_map.items():
            if key not in state:
                raise CheckpointError(str(path / fname), key, f"listed in {index_path.name} but missing")
    hf_state = {k: w for k, w in state.items() if not HF_IGNORED.match(k)}
    shapes = {}
    for key, w in hf_state.items():
        try:
            shapes[hf_to_meta_key(key)] = tuple(w.shape)
        except KeyError:
            raise CheckpointError(str(files[0] if len(files) == 1 else path), key,
                                  "unexpected tensor (not part of a Llama 2 checkpoint)") from None
    emb = hf_state.get("model.embed_tokens.weight")
    if emb is not None and emb.dim() == 2 and emb.shape[0] != args.vocab_size and emb.shape[1] == args.dim:
        raise CheckpointError(str(config_path), "vocab_size", f"{args.vocab_size}, but [model.embed_tokens.weight] "
                                                              f"has {emb.shape[0]} rows")
    # Shapes are checked in Meta names but reported in the HF names the user's file holds.
    for key, shape in expected_meta_shapes(args).items():
        if key not in shapes:
            raise CheckpointError(str(path), meta_to_hf_key(key), "missing tensor")
        if shapes[key] != shape:
            raise CheckpointError(str(path), meta_to_hf_key(key), f"shape {shapes[key]}, expected {shape}")
        check_tensor(str(path), meta_to_hf_key(key), hf_state[meta_to_hf_key(key)])
    return Checkpoint(args, hf_to_meta_state(hf_state, args), "hf", path, len(files))


def save_hf(path: str | Path, args: ModelArgs, state: dict[str, torch.Tensor],
            max_shard_tensors: int | None = None, dtype_name: str | None = None) -> Path:
    """Write an HF folder from a Meta-layout state (permuting q/k); optionally sharded with an index."""
    from safetensors.torch import save_file
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    hf_state = meta_to_hf_state(state, args)
    dtype_name = dtype_name or str(next(iter(hf_state.values())).dtype).removeprefix("torch.")
    config = args_to_hf_config(args, dtype_name)
    config["llama_parity_meta_params"] = meta_params(args)
    keys = list(hf_state)
    if max_shard_tensors is None or max_shard_tensors >= len(keys):
        _atomic(path / "model.safetensors", lambda tmp: save_file(hf_state, tmp, metadata={"format": "pt"}))
    else:
        groups = [keys[i:i + max_shard_tensors] for i in range(0, len(keys), max_shard_tensors)]
        weight_map = {}
        for i, group in enumerate(groups):
            name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
            part = {k: hf_state[k] for k in group}
            _atomic(path / name, lambda tmp, p=part: save_file(p, tmp, metadata={"format": "pt"}))
            weight_map.update({k: name for k in group})
        total = sum(t.numel() * t.element_size() for t in hf_state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        _atomic(path / "model.safetensors.index.json", lambda tmp: Path(tmp).write_text(json.dumps(index, indent=2)))
    _atomic(path / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + "\n"))
    return path


def build_model(ckpt: Checkpoint, dtype: torch.dtype = torch.float32, device: str = "cpu",
                rope_dtype: torch.dtype = torch.float32):
    """The reference Transformer holding the checkpoint's weights, cast to dtype."""
    from .model import Transformer
    with torch.device("meta"):
        model = Transformer(ckpt.args, rope_dtype=rope_dtype)
    state = {k: v.to(device=device, dtype=dtype) for k, v in ckpt.state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def _atomic(target: Path, write) -> None:
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        write(str(tmp))
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
