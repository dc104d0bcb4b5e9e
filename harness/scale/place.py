"""Placing a model's blocks across devices with accelerate's device maps (no scheduler of our own).

A device map says where each module lives: a GPU index, "cpu" or "disk". accelerate plans it
(``infer_auto_device_map``, whole ``TransformerBlock``s only) and executes it (``dispatch_model``):
hooks move each block's tensor arguments (hidden state, RoPE table, mask) to the block's device
before it runs and, for "cpu"/"disk" entries on a GPU machine, bring the weights in for the call.
On a machine without a GPU, "disk" entries still go through the same hooks: weights live in
``offload_dir`` and are read back for every forward, so CPU runs exercise the machinery for real.

Maps are written in the reference's (Meta) module names: ``tok_embeddings``, ``layers.N``,
``norm``, ``output``. ``to_transformers_map`` renames them for LlamaForCausalLM, so that both
subjects put the same block on the same device.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from harness.core.errors import InputError

NO_SPLIT_REFERENCE = ["TransformerBlock"]
STRATEGIES = ("auto", "balanced")
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KIB|MIB|GIB|TIB)?", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


# --- the user's spec -----------------------------------------------------------------------------

def parse_device(value, where: str):
    """A device-map value: a GPU index (int or "cuda:N"), "cpu" or "disk"."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        if value in ("cpu", "disk"):
            return value
        m = re.fullmatch(r"(?:cuda:)?(\d+)", value)
        if m:
            return int(m[1])
    raise InputError(f"{where}: {value!r} is not a device (a GPU index such as 0 or 'cuda:0', 'cpu' or 'disk')")


def parse_max_memory(spec: str | None) -> dict | None:
    """--max-memory "0=20GiB,1=20GiB,cpu=64GiB" -> {0: bytes, 1: bytes, "cpu": bytes}."""
    if spec is None:
        return None
    out: dict = {}
    for part in (p.strip() for p in spec.split(",")):
        key, sep, size = part.partition("=")
        if not sep:
            raise InputError(f"--max-memory: {part!r} is not DEVICE=SIZE (e.g. 0=20GiB,cpu=64GiB)")
        device = parse_device(key.strip(), f"--max-memory {part!r}")
        if device == "disk":
            raise InputError(f"--max-memory {part!r}: disk takes what does not fit elsewhere; it has no budget")
        m = _SIZE.fullmatch(size.strip())
        if not m:
            raise InputError(f"--max-memory {part!r}: {size.strip()!r} is not a size (e.g. 20GiB, 512MB, 1000000)")
        if device in out:
            raise InputError(f"--max-memory: device {key.strip()!r} given twice")
        out[device] = int(float(m[1]) * _UNITS[(m[2] or "b").lower()])
    return out


def read_device_map(path: str | Path) -> dict:
    """--device-map FILE: a JSON object {module name (Meta naming): device}."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--device-map {path}: not 'auto', 'balanced' or an existing JSON file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"--device-map {path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or not data:
        raise InputError(f"--device-map {path}: expected a non-empty JSON object {{module: device}}")
    return {str(k): parse_device(v, f"--device-map {path}: [{k!r}]") for k, v in data.items()}


def check_map(device_map: dict, model: torch.nn.Module, where: str = "--device-map") -> None:
    """Every parameter placed exactly once, by a name the model has; GPUs that exist here."""
    names = {n for n, _ in model.named_modules()}    # "" is the whole model
    for key in device_map:
        if key not in names:
            raise InputError(f"{where}: [{key!r}] is not a module of the reference model "
                             f"(names: tok_embeddings, layers.N, norm, output, finer ones, or "" for all of it)")
    for pname, _ in model.named_parameters():
        owners = [k for k in device_map if k == "" or pname.startswith(k + ".")]
        if len(owners) != 1:
            why = "no entry places it" if not owners else f"placed twice, by {owners}"
            raise InputError(f"{where}: parameter {pname}: {why}")
    gpus = sorted({d for d in device_map.values() if isinstance(d, int)})
    if gpus and gpus[-1] >= torch.cuda.device_count():
        raise InputError(f"{where}: places modules on GPU {gpus[-1]}, but this machine has "
                         f"{torch.cuda.device_count()} CUDA device(s)")


# --- planning ------------------------------------------------------------------------------------

def empty_reference(args, dtype: torch.dtype = torch.float32, rope_dtype: torch.dtype = torch.float32):
    """The reference Transformer with every tensor on the meta device: a 70B shape costs nothing."""
    from accelerate import init_empty_weights

    from reference_model.model import Transformer
    with init_empty_weights():
        model = Transformer(args, rope_dtype=rope_dtype)
    # Cast on meta (free): accelerate's dtype= only ever shrinks sizes, so a float64 plan needs float64 tensors.
    return model.to(dtype)


def plan(model: torch.nn.Module, max_memory: dict | None, dtype: torch.dtype, strategy: str = "auto") -> dict:
    """accelerate's device map for the reference: whole blocks, GPUs in index order, then cpu, then disk.

    ``strategy="balanced"`` first asks ``get_balanced_memory`` for budgets that spread blocks
    evenly over the GPUs (what ``from_pretrained(device_map="balanced")`` does).
    """
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory
    if strategy not in STRATEGIES:
        raise InputError(f"--device-map: unknown strategy {strategy!r} (auto, balanced, or a JSON file)")
    if strategy == "balanced":
        max_memory = get_balanced_memory(model, max_memory=max_memory, no_split_module_classes=NO_SPLIT_REFERENCE,
                                         dtype=dtype)
    return dict(infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=NO_SPLIT_REFERENCE,
                                      dtype=dtype))


def bytes_per_device(model: torch.nn.Module, device_map: dict, dtype: torch.dtype) -> dict:
    """Weight bytes each device holds under the map, counted from the shapes at ``dtype``."""
    size = torch.empty((), dtype=dtype).element_size()
    out: dict = {}
    for pname, p in model.named_parameters():
        owner = next(k for k in device_map if k == "" or pname.startswith(k + "."))
        out[device_map[owner]] = out.get(device_map[owner], 0) + p.numel() * size
    return out


def blocks_per_device(device_map: dict, n_layers: int) -> dict:
    """device -> the block numbers it holds, in order (accelerate may map all blocks as "layers" or "")."""
    out: dict = {}
    for i in range(n_layers):
        for name in (f"layers.{i}", "layers", ""):
            if name in device_map:
                out.setdefault(device_map[name], []).append(i)
                break
    return out


# --- executing -----------------------------------------------------------------------------------

def place_reference(model: torch.nn.Module, device_map: dict, offload_dir: str | Path | None = None):
    """Dispatch the reference over the map; "disk" entries are written to ``offload_dir``.

    model.py needs no change: it builds RoPE and the mask on the tokens' device, and the hooks
    move them, with the hidden state, onto each block's device; outputs come back to the input's.
    """
    from accelerate import dispatch_model
    check_map(device_map, model)
    if "" in device_map:   # accelerate plans "whole model on disk" as {"": "disk"} but cannot dispatch it
        device_map = {name: device_map[""] for name, _ in model.named_children()}
    if "disk" in device_map.values() and offload_dir is None:
        raise InputError("--offload-dir: the device map sends modules to disk; give a folder for them")
    return dispatch_model(model, device_map=device_map, offload_dir=str(offload_dir) if offload_dir else None)


_TF_NAMES = {"tok_embeddings": "model.embed_tokens", "layers": "model.layers", "norm": "model.norm",
             "output": "lm_head"}


def to_transformers_map(device_map: dict) -> dict:
    """The same placement in LlamaForCausalLM's names (block-level and coarser entries only).

    transformers' RoPE module holds no weights; it goes where the embedding goes.
    """
    if set(device_map) == {""}:
        return dict(device_map)
    out = {}
    for name, device in device_map.items():
        if name in _TF_NAMES:
            out[_TF_NAMES[name]] = device
        elif re.fullmatch(r"layers\.\d+", name):
            out[f"model.{name}"] = device
        else:
            raise InputError(f"--device-map: [{name!r}] splits a block or the head; transformers is placed "
                             "by whole blocks (tok_embeddings, layers.N, norm, output)")
    out["model.rotary_emb"] = device_map.get("tok_embeddings", "cpu")
    return out


def describe(device_map: dict) -> str:
    """'cpu: embed, layers 0-3; disk: layers 4-7, norm, output' (for the console and report.md)."""
    groups: dict = {}
    for name, device in device_map.items():
        groups.setdefault(str(device), []).append(name)
    return "; ".join(f"{d}: {', '.join(names)}" for d, names in groups.items())


# --- planted placement bugs (the suite's self-test) ----------------------------------------------

def _hooks():
    from accelerate.hooks import ModelHook

    class DropBlock(ModelHook):
        """The block's output is its input: a placement that loses a block on the way."""

        def pre_forward(self, module, *args, **kwargs):
            self.seen = args[0] if args else kwargs["hidden_states"]
            return args, kwargs

        def post_forward(self, module, output):
            return (self.seen, *output[1:]) if isinstance(output, tuple) else self.seen

    class HalfHop(ModelHook):
        """The hidden state reaches the block through float16: a transfer in the wrong dtype."""

        def pre_forward(self, module, *args, **kwargs):
            if args:
                args = (args[0].to(torch.float16).to(args[0].dtype), *args[1:])
            else:
                h = kwargs["hidden_states"]
                kwargs["hidden_states"] = h.to(torch.float16).to(h.dtype)
            return args, kwargs

    return {"drop-block": DropBlock, "half-hop": HalfHop}


PLANTS = {"drop-block": "the last block's output is replaced by its input",
          "half-hop": "the last block's input passes through float16 (visible at float32)"}


def plant(blocks: torch.nn.ModuleList, name: str) -> None:
    """Add a planted bug to the last block, on top of accelerate's own hook there."""
    from accelerate.hooks import add_hook_to_module
    if name not in PLANTS:
        raise InputError(f"--plant: unknown placement bug {name!r} (known: {', '.join(PLANTS)})")
    add_hook_to_module(blocks[-1], _hooks()[name](), append=True)
