"""Streaming comparison: oracle, reference and the subject (transformers by default; any kind that
offers "stream", harness/subjects/layers.py) run block by block, one block's weights in memory at a
time, so that peak memory is about one block (at float64 for the oracle, plus one at the subjects'
dtype) plus the embeddings and activations, never two whole models.

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

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from harness.core import compat, resources
from harness.core.checkpoints import open_model
from harness.core.errors import InputError
from harness.core.faults import faults_for, get_fault
from harness.core.metrics import METRICS, compare
from harness.core.store import INFO, Row
from harness.core.subjects import DTYPES, ORACLE
from harness.core.suite import Context, Result, Suite
from harness.scale.capture import Capture, Errors, Store, point_order
from reference_model.convert import unpermute
from reference_model.model import RMSNorm, TransformerBlock, precompute_freqs_cis
from harness.subjects import DEFAULT as SUBJECT   # the implementation judged by default
from harness.subjects import LAYERS, Spec, add_offering, factory, offering

# what this command needs of a subject (--subject): a kind that offers "stream"
STREAM_NEEDS = "its decoder layers built one block's weights at a time, each captured"


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
    transformers: dict               # the subject's curve (transformers by default)
    logits: dict = field(default_factory=dict)      # subject -> float32 logits (CPU)
    metrics: dict = field(default_factory=dict)     # subject -> logits metrics against the oracle
    feed: str = "own"
    subject: str = SUBJECT           # the subject's label, its key in logits and metrics
    exact: bool = True               # False: a lossy kind (quantised layers), its curve shown, not judged
    who: dict = field(default_factory=dict)         # its settings and provenance


@torch.inference_mode()
def stream_compare(path: str | Path, ids: torch.Tensor, dtype: str, device: str = "cpu", attn: str = "eager",
                   fine: bool = False, feed: str = "own", layer_hook=None, oracle: bool = True,
                   fault=None, subject: Spec | None = None) -> StreamResult:
    """Oracle, reference and the subject (``subject``: a kind that offers "stream"; transformers by
    default) over ids, block by block. ``layer_hook(layer, module)`` may edit each of its layers
    after loading; a planted ``fault`` edits its config and each layer (only faults inside a decoder
    layer can be streamed: harness.core.faults.LAYER_SUITES).

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
    why = compat.attn_reason(attn, device)
    if why:
        raise InputError(f"--attn {attn}: {why}")
    source = open_model(path).lazy()
    args = source.args
    if ids.max().item() >= args.vocab_size or ids.min().item() < 0:
        raise InputError(f"token ids must be in [0, {args.vocab_size}) for {path}")
    dt, f64 = DTYPES[dtype], torch.float64
    ids = ids.to(device)
    bsz, seq = ids.shape

    truth = Store()
    ref_err, tf_err = Errors(truth), Errors(truth)
    ref_sink = ref_err if oracle else truth     # without the oracle the reference is the truth
    spec = subject or Spec(SUBJECT)
    factory(spec)                                # registers the kind (LAYERS)
    layers = LAYERS[spec.kind](source, dtype, device, {**spec.options, "attn": attn,
                                                       **({"plant": fault} if fault is not None else {})})
    label = spec.label()

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
    call_args, call_kwargs = layers.call(h_tf)

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

        module = layers.layer(layer, hf)
        if layer_hook is not None:
            layer_hook(layer, module)
        with Capture(tf_err, fine).transformers_block(module, layer):
            out = module(h_tf, *call_args, **call_kwargs)
        h_tf = out[0] if isinstance(out, (tuple, list)) else out
        del module, hf
        truth.points = {p: t for p, t in truth.points.items() if p[0] is None}   # this block is done

    norm_w, out_w = source.tensor("norm.weight"), source.tensor("output.weight")
    logits = {}
    runs = [(ORACLE, h_or, f64, truth)] if oracle else []
    for name, h, d, sink in runs + [("reference", h_ref, dt, ref_sink)]:
        norm = RMSNorm(args.dim, args.norm_eps).to(device)
        norm.weight = torch.nn.Parameter(norm_w.to(device, d), requires_grad=False)
        x = norm(h)
        sink((None, "norm"), x)
        y = F.linear(x, out_w.to(device, d))
        sink((None, "head"), y)
        logits[name] = y.to(torch.promote_types(y.dtype, torch.float32)).cpu()
    x = layers.norm(norm_w)(h_tf)
    tf_err((None, "norm"), x)
    y = F.linear(x, out_w.to(device, dt))
    tf_err((None, "head"), y)
    logits[label] = y.float().cpu()

    if oracle:
        metrics = {name: compare(logits[name], logits[ORACLE]) for name in ("reference", label)}
    else:
        metrics = {label: compare(logits[label], logits["reference"])}
    who = {"label": label, "settings": layers.settings(), "provenance": layers.provenance()}
    return StreamResult(point_order(args.n_layers, fine), ref_err.errors, tf_err.errors, logits, metrics, feed,
                        label, layers.exact, who)


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


class Stream(Suite):
    name = "stream"
    help = "block-by-block comparison: peak memory about one block"

    def add_arguments(self, p) -> None:
        add_offering(p, self.name, STREAM_NEEDS, own="attn and plant")
        from harness.scale.localise import add_common_arguments
        add_common_arguments(p)
        p.add_argument("--feed", default="own",
                       help="own: each subject carries its own stream; oracle: every block gets the oracle's input")
        p.add_argument("--plant", help=f"plant a porting bug in each streamed layer of the subject: "
                                       f"{', '.join(faults_for('stream'))}")

    def run(self, a, ctx: Context) -> Result:
        spec = offering(a.subject, self.name, "stream", STREAM_NEEDS, own=("attn", "plant"))
        from harness.core.cases import make_inputs
        from harness.scale.localise import common_inputs, curve_markdown, curve_part, curve_rows, locate
        dtype, attn, shape, device, seed = common_inputs(a)
        fault = get_fault(a.plant, "stream")
        folder = open_model(a.model)
        args = folder.args
        ctx.check_memory([resources.position_tables(args), resources.Need("the largest forward (float64)", resources.forward_bytes(
            args, shape.batch, shape.seq, "float64")), resources.Need("the embedding and head at float64",
                                                                        4 * args.vocab_size * args.dim * 8)], device)
        ids = make_inputs(shape, folder.args.vocab_size, seed)
        result = stream_compare(folder.path, ids, dtype, device, attn, fine=not a.coarse, feed=a.feed, fault=fault,
                                subject=spec)
        label = result.subject
        found = locate(result.order, result.transformers, result.reference, dtype)
        case = {"dtype": dtype, "attn": attn, "shape": str(shape), "device": device, "feed": a.feed}
        curves = {"reference": result.reference, label: result.transformers}
        lossy = not result.exact
        rows = curve_rows("stream", case, result.order, curves, result.reference, dtype, shown=(label,) if lossy else ())
        if lossy:
            found["rule"] = (f"{label} is lossy (quantised layers): its curve is shown, not judged, and the point "
                             f"named is where its error first stands out of rounding. {found['rule']}")
        for subject, (values, why) in result.metrics.items():
            rows += [Row("stream", {**case, "layer": "-", "op": "logits"}, subject, ORACLE, m, values[m],
                         status=INFO, reason=why or "logits metric; judged by `llama-parity logits`") for m in METRICS]
        extra = {"case": case, "model": str(folder.path), "seed": seed, "plant": a.plant,
                 "truth": "oracle-fp64 (the reference entirely in float64)", "subject": result.who}
        return curve_part("stream", rows, found, extra, device,
                          curve_markdown(result.order, curves, result.reference, dtype, found), subject=label)
