"""Streaming comparison: oracle, reference and transformers run block by block, one block's
weights in memory at a time, so that peak memory is about one block (at float64 for the oracle,
plus one at the subjects' dtype) plus the embeddings and activations, never two whole models.

Weights come memory-mapped from the checkpoint itself: safetensors through ``safe_open``,
Meta shards and ``.bin`` through ``torch.load(mmap=True, weights_only=True)``. Each block is
read once in the file's own layout and cast once; the reference and transformers share those
tensors, and only q/k get a second copy in the other layout (the permute).

Each subject carries its own residual stream (``feed="own"``, the same numbers as the
full-model comparison), or every block of every subject is fed the oracle's input
(``feed="oracle"``: each block's error is then its own, nothing inherited).

``shared_reference`` is the full-model counterpart: a reference Transformer whose parameters are
transformers' own tensors wherever the layouts agree.
"""
from __future__ import annotations

import copy
import inspect
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from reference_model.checkpoint import (detect_format, hf_weight_files, load_meta_args,
                                        meta_shard_files, read_json, shard_dim, torch_load)
from reference_model.convert import (expected_meta_shapes, hf_config_to_args, meta_to_hf_key, permute,
                                     unpermute, args_to_hf_config)
from reference_model.errors import CheckpointError
from reference_model.model import RMSNorm, TransformerBlock, precompute_freqs_cis

from harness.scale.capture import Capture, Errors, Store, point_order
from harness.core.errors import InputError
from harness.core.metrics import compare
from harness.core.subjects import DTYPES, attn_implementations

_QK = ("attention.wq.weight", "attention.wk.weight")


class WeightSource:
    """Tensors of a Meta or HF checkpoint by Meta key, read one at a time from mapped files."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.format = detect_format(self.path)
        self._open: dict[Path, object] = {}
        if self.format == "meta":
            self.files = meta_shard_files(self.path)
            self.args = load_meta_args(self.path)
            if self.args.vocab_size == -1:
                self.args.vocab_size = self._file(self.files[0])["tok_embeddings.weight"].shape[0]
            self.hf_config = args_to_hf_config(self.args)
        else:
            self.hf_config = read_json(self.path / "config.json")
            self.args = hf_config_to_args(self.hf_config, str(self.path / "config.json"))
            files, _, _ = hf_weight_files(self.path)
            self._where: dict[str, Path] = {}
            for f in files:
                for key in self._keys(f):
                    self._where[key] = f
        self._close()
        self.shapes = expected_meta_shapes(self.args)

    # Files are mapped for one block at a time and closed after it: a mapping kept open would
    # keep every page read so far resident, and the peak would grow to the whole checkpoint.
    def _file(self, f: Path):
        if f not in self._open:
            if f.suffix == ".safetensors":
                from safetensors import safe_open
                self._open[f] = safe_open(str(f), framework="pt", device="cpu")
            else:
                self._open[f] = torch_load(f)     # mmap=True, weights_only=True
        return self._open[f]

    def _keys(self, f: Path) -> list[str]:
        handle = self._file(f)
        return list(handle.keys())

    def _close(self) -> None:
        self._open.clear()

    def _raw(self, meta_key: str) -> torch.Tensor:
        """The tensor in the file's own layout (HF: permuted q/k)."""
        if self.format == "meta":
            parts = []
            for f in self.files:
                shard = self._file(f)
                if meta_key not in shard:
                    raise CheckpointError(str(f), meta_key, "missing tensor")
                parts.append(shard[meta_key])
            dim = shard_dim(meta_key)
            w = parts[0] if dim is None or len(parts) == 1 else torch.cat(parts, dim=dim)
        else:
            hf_key = meta_to_hf_key(meta_key)
            if hf_key not in self._where:
                raise CheckpointError(str(self.path), hf_key, "missing tensor")
            handle = self._file(self._where[hf_key])
            w = handle.get_tensor(hf_key) if hasattr(handle, "get_tensor") else handle[hf_key]
        if tuple(w.shape) != self.shapes[meta_key]:
            raise CheckpointError(str(self.path), meta_key, f"shape {tuple(w.shape)}, expected {self.shapes[meta_key]}")
        return w

    def block(self, layer: int, dtype: torch.dtype, device: str) -> tuple[dict, dict]:
        """(Meta-layout state, HF-layout state) of one block, cast once; only q/k differ."""
        if not 0 <= layer < self.args.n_layers:
            raise InputError(f"layer {layer}: the checkpoint has {self.args.n_layers} layers")
        meta, hf = {}, {}
        for key in (k for k in self.shapes if k.startswith(f"layers.{layer}.")):
            w = self._raw(key).to(device=device, dtype=dtype)
            suffix = key.split(".", 2)[2]
            local_hf = meta_to_hf_key(key).split(f"layers.{layer}.", 1)[1]
            if suffix in _QK:
                n = self.args.n_heads if suffix == _QK[0] else self.args.kv_heads
                native, other = (w, permute(w, n)) if self.format == "meta" else (unpermute(w, n), w)
                meta[suffix], hf[local_hf] = native.contiguous(), other.contiguous()
            else:
                meta[suffix] = hf[local_hf] = w
        self._close()
        return meta, hf

    def tensor(self, meta_key: str) -> torch.Tensor:
        w = self._raw(meta_key)
        self._close()
        return w


# --- transformers pieces, built one block at a time ------------------------------------------
#
# Release adapters. Between 4.31 and 5.x the decoder layer's constructor (no layer_idx in 4.31),
# the arguments its forward takes (position_ids only in 4.31; cache_position; position_embeddings
# from 4.44), the causal mask (4D additive from _prepare_decoder_attention_mask in 4.31,
# _update_causal_mask in 4.38-4.4x, masking_utils in 5.x; SDPA sometimes None) and where RoPE's
# tables live (each attention module before 4.44, the model after) all changed. So none of that
# is rebuilt here: the installed release's own LlamaModel is run once, with a stand-in for its
# first layer that records the call, and every streamed layer is called the same way.

def _hf_config(source: WeightSource, attn: str):
    from transformers import LlamaConfig
    cfg = {k: v for k, v in source.hf_config.items() if not k.startswith("llama_parity")}
    config = LlamaConfig(**cfg)
    config._attn_implementation = attn
    return config


@contextmanager
def _parameters_on_meta():
    """Modules built inside get meta parameters (nothing allocated, loaded later with assign=True)
    but real buffers: RoPE's tables (and 4.38's causal-mask table) are computed as the release
    computes them, which building on the meta device would leave empty."""
    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None:
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


class _LayerCall(Exception):
    """Raised by the stand-in first layer with the arguments LlamaModel passed it."""

    def __init__(self, args, kwargs):
        super().__init__("recorded")
        self.args, self.kwargs = args, kwargs


class _Recorder(torch.nn.Module):
    def forward(self, *args, **kwargs):
        raise _LayerCall(args, kwargs)


def _layer_call(config, h: torch.Tensor) -> tuple[tuple, dict]:
    """(args after hidden_states, kwargs) the installed LlamaModel passes its decoder layers for
    inputs_embeds h: the mask, positions, RoPE tables, cache flags, in this release's format."""
    from transformers.models.llama.modeling_llama import LlamaModel
    one = copy.deepcopy(config)
    one.num_hidden_layers = 1
    with _parameters_on_meta():
        model = LlamaModel(one)
    model.layers[0] = _Recorder()
    for m in model.modules():       # the buffers (RoPE, mask tables) to h's device; parameters stay meta
        for name, b in m._buffers.items():
            if b is not None:
                m._buffers[name] = b.to(h.device)
    try:
        model.eval()(inputs_embeds=h, use_cache=False)
    except _LayerCall as call:
        args, kwargs = call.args, dict(call.kwargs)
        kwargs.pop("hidden_states", None)
        return args[1:], kwargs
    raise RuntimeError("transformers' LlamaModel never called its first decoder layer")


def _hf_layer(config, layer: int, state: dict, device: str):
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer
    # 4.31 takes no layer_idx (4.36 does).
    extra = (layer,) if "layer_idx" in inspect.signature(LlamaDecoderLayer.__init__).parameters else ()
    with _parameters_on_meta():
        module = LlamaDecoderLayer(config, *extra)
    module.load_state_dict(state, strict=False, assign=True)
    leftover = [n for n, p in module.named_parameters() if p.is_meta]
    if leftover:
        raise RuntimeError(f"transformers layer {layer}: parameters not loaded: {leftover}")
    return module.to(device).eval()


def _ref_block(args, layer: int, state: dict):
    with torch.device("meta"):
        block = TransformerBlock(layer, args)
    block.load_state_dict(state, strict=True, assign=True)
    return block.eval()


# --- the streamed run --------------------------------------------------------------------------

@dataclass
class StreamResult:
    order: list
    reference: dict                  # point -> rel L2 against the oracle
    transformers: dict
    logits: dict = field(default_factory=dict)      # subject -> float32 logits (CPU)
    metrics: dict = field(default_factory=dict)     # subject -> logits metrics against the oracle
    feed: str = "own"


@torch.inference_mode()
def stream_compare(path: str | Path, ids: torch.Tensor, dtype: str, device: str = "cpu", attn: str = "eager",
                   fine: bool = False, feed: str = "own", layer_hook=None, oracle: bool = True) -> StreamResult:
    """Oracle, reference and transformers over ids, block by block. ``layer_hook(layer, module)``
    may edit each transformers layer after loading (the tests plant faults through it).

    ``oracle=False`` leaves the float64 oracle out: transformers is then measured against the
    reference at the same dtype (``result.reference`` is empty), the two-subject side-by-side
    whose memory benchmarks/memory.py compares with two full models.
    """
    if feed not in ("own", "oracle"):
        raise InputError(f"--feed: {feed!r} is not 'own' or 'oracle'")
    if feed == "oracle" and not oracle:
        raise InputError("--feed oracle needs the oracle")
    if dtype not in DTYPES or dtype == "float64":
        raise InputError(f"--dtype: {dtype!r} is not float32, bfloat16 or float16")
    why = attn_implementations(device).get(attn, f"unknown attention implementation {attn!r}")
    if why:
        raise InputError(f"--attn {attn}: {why}")
    source = WeightSource(path)
    args = source.args
    if ids.max().item() >= args.vocab_size or ids.min().item() < 0:
        raise InputError(f"token ids must be in [0, {args.vocab_size}) for {path}")
    dt, f64 = DTYPES[dtype], torch.float64
    ids = ids.to(device)
    bsz, seq = ids.shape

    truth = Store()
    ref_err, tf_err = Errors(truth), Errors(truth)
    ref_sink = ref_err if oracle else truth     # without the oracle the reference is the truth
    config = _hf_config(source, attn)

    # Embeddings: look the rows up first, then cast (a cast is elementwise: same numbers).
    emb = source.tensor("tok_embeddings.weight")
    rows = emb[ids.cpu()].to(device)
    h_or, h_ref, h_tf = rows.to(f64) if oracle else None, rows.to(dt), rows.to(dt)
    del emb, rows
    if oracle:
        truth((None, "embed"), h_or)
    ref_sink((None, "embed"), h_ref)
    tf_err((None, "embed"), h_tf)

    freqs64 = precompute_freqs_cis(args.head_dim, seq, args.rope_theta, f64).to(device)
    freqs32 = precompute_freqs_cis(args.head_dim, seq, args.rope_theta, torch.float32).to(device)
    mask = torch.full((seq, seq), float("-inf"), device=device).triu(1) if seq > 1 else None
    call_args, call_kwargs = _layer_call(config, h_tf)

    for layer in range(args.n_layers):
        if oracle:
            meta64, _ = source.block(layer, f64, device)
            block = _ref_block(args, layer, meta64)
            with Capture(truth, fine).reference_block(block, layer):
                h_next = block(h_or, 0, freqs64, None if mask is None else mask.to(f64), False)
            del block, meta64
            if feed == "oracle":
                h_ref, h_tf = h_or.to(dt), h_or.to(dt)
            h_or = h_next

        meta, hf = source.block(layer, dt, device)
        block = _ref_block(args, layer, meta)
        with Capture(ref_sink, fine).reference_block(block, layer):
            h_ref = block(h_ref, 0, freqs32, None if mask is None else mask.to(dt), False)
        del block, meta

        module = _hf_layer(config, layer, hf, device)
        if layer_hook is not None:
            layer_hook(layer, module)
        with Capture(tf_err, fine).transformers_block(module, layer):
            out = module(h_tf, *call_args, **call_kwargs)
        h_tf = out[0] if isinstance(out, (tuple, list)) else out
        del module, hf
        truth.points = {p: t for p, t in truth.points.items() if p[0] is None}   # this block is done

    norm_w, out_w = source.tensor("norm.weight"), source.tensor("output.weight")
    logits = {}
    runs = [("oracle-fp64", h_or, f64, truth)] if oracle else []
    for name, h, d, sink in runs + [("reference", h_ref, dt, ref_sink)]:
        norm = RMSNorm(args.dim, args.norm_eps).to(device)
        norm.weight = torch.nn.Parameter(norm_w.to(device, d), requires_grad=False)
        x = norm(h)
        sink((None, "norm"), x)
        y = F.linear(x, out_w.to(device, d))
        sink((None, "head"), y)
        logits[name] = y.to(torch.promote_types(y.dtype, torch.float32)).cpu()
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    norm = LlamaRMSNorm(args.dim, eps=config.rms_norm_eps).to(device)
    norm.weight = torch.nn.Parameter(norm_w.to(device, dt), requires_grad=False)
    x = norm(h_tf)
    tf_err((None, "norm"), x)
    y = F.linear(x, out_w.to(device, dt))
    tf_err((None, "head"), y)
    logits["transformers"] = y.float().cpu()

    if oracle:
        metrics = {name: compare(logits[name], logits["oracle-fp64"]) for name in ("reference", "transformers")}
    else:
        metrics = {"transformers": compare(logits["transformers"], logits["reference"])}
    return StreamResult(point_order(args.n_layers, fine), ref_err.errors, tf_err.errors, logits, metrics, feed)


# --- full models, shared weights ----------------------------------------------------------------

def shared_reference(hf_model, args, rope_dtype: torch.dtype = torch.float32):
    """A reference Transformer on the tensors of a loaded transformers LlamaForCausalLM.

    Every tensor is transformers' own object except wq/wk (un-permuted copies): a side-by-side
    comparison then holds one model plus 2 * (q + k) of every block, not two models.
    """
    from reference_model.convert import hf_to_meta_key
    from reference_model.model import Transformer
    state = {}
    for name, p in hf_model.named_parameters():
        key = hf_to_meta_key(name)
        w = p.data
        if key.endswith("attention.wq.weight"):
            w = unpermute(w, args.n_heads).contiguous()
        elif key.endswith("attention.wk.weight"):
            w = unpermute(w, args.kv_heads).contiguous()
        state[key] = w
    with torch.device("meta"):
        model = Transformer(args, rope_dtype=rope_dtype)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()
