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

import re
from pathlib import Path

import torch

from harness.core import inputs
from harness.core.errors import InputError
from harness.core.suite import Part, Result, Suite
from harness.subjects.common import source_of
from harness.subjects import DEFAULT as SUBJECT, Cannot, add_offering, built, offering

# what this command needs of a subject (--subject): a kind that offers "place"
PLACE_NEEDS = "a load placed by accelerate's device_map (its own modules across devices)"
OWN = ("attn", "plant", "device_map", "offload_folder")     # set by this command's own flags

NO_SPLIT_REFERENCE = ["TransformerBlock"]
STRATEGIES = ("auto", "balanced")


# --- the user's spec -----------------------------------------------------------------------------

def parse_device(value, where: str):
    """A device-map value: a GPU index (int or "cuda:N"), "cpu" or "disk"."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        if value in ("cpu", "disk"):
            return value
        m = re.fullmatch(r"(?:cuda:)?([0-9]{1,6})", value)   # ASCII digits: "\\d" matches any script's
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
        if device in out:
            raise InputError(f"--max-memory: device {key.strip()!r} given twice")
        out[device] = inputs.size(f"--max-memory {part!r}", size)
    return out


def read_device_map(path: str | Path) -> dict:
    """--device-map FILE: a JSON object {module name (Meta naming): device}."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--device-map {path}: not 'auto', 'balanced' or an existing JSON file")
    data = inputs.read_json("--device-map", path)
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




# --- the place command ---------------------------------------------------------------------------

class Place(Suite):
    """One comparison with every subject placed across devices by a device map.

    The float64 oracle, the reference at --dtype and the subject at --dtype (transformers by
    default; any kind that offers "place") are each dispatched by accelerate: on several GPUs their
    blocks spread over cuda:0..N, on a machine without one over "cpu" and "disk". The reference and
    the subject get the same map (the subject's in transformers' module names); the oracle is
    planned at float64, which is 2-4x larger. Rows are the logits suite's: 0 pass, 1 the subject
    breaks the policy, 2 bad input.
    """
    name = "place"
    help = "compare the subjects with their blocks placed across devices (accelerate)"

    def add_arguments(self, p) -> None:
        add_offering(p, self.name, PLACE_NEEDS, own="attn and plant")
        from harness.core.faults import faults_for
        p.add_argument("--model", help="Meta or HF folder; default: the embedded model")
        p.add_argument("--device-map", default="auto",
                       help="auto (accelerate fills GPUs in order, then cpu, then disk), balanced (even over the "
                            "GPUs), or a JSON file {module: device} in the reference's names "
                            "(tok_embeddings, layers.N, norm, output; device 0, 'cuda:1', 'cpu' or 'disk')")
        p.add_argument("--max-memory", help="budgets for auto/balanced, e.g. 0=20GiB,1=20GiB,cpu=64GiB "
                                                 "(default: what each device has free)")
        p.add_argument("--offload-dir", help="folder for weights placed on disk (default: a temporary folder)")
        p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 (default float32)")
        p.add_argument("--attn", default="eager", help="attention implementation (default eager)")
        p.add_argument("--shape", default="1x16", help="BATCHxSEQ of the input (default 1x16)")
        p.add_argument("--seed", default="0", help="input seed (default 0)")
        p.add_argument("--policy", help="tolerance policy TOML (default: suites/tolerance.toml)")
        p.add_argument("--plant", help=f"plant a placement bug in transformers' last block: "
                                       f"{', '.join(faults_for('place'))}")

    def run(self, a, ctx):
        spec = offering(a.subject, self.name, "place", PLACE_NEEDS, own=OWN)
        import tempfile

        from harness.core import compat
        from harness.core.cases import make_inputs
        from harness.core.checkpoints import HFFolder, open_model
        from harness.core.faults import get_fault
        from harness.core.metrics import METRICS, POLICY_METRICS
        from harness.core.tolerance import load_policy

        dtype = inputs.choice("--dtype", a.dtype, inputs.KNOWN_DTYPES)
        attn = inputs.choice("--attn", a.attn, inputs.KNOWN_ATTN)
        why = compat.attn_reason(attn, "cuda" if torch.cuda.is_available() else "cpu")
        if why:
            raise InputError(f"--attn {attn}: {why}")
        fault = get_fault(a.plant, "place")
        shape, seed = inputs.shape("--shape", a.shape), inputs.seed(a.seed)
        policy = load_policy(a.policy, metrics=POLICY_METRICS).require([dtype], METRICS)
        folder = open_model(a.model)
        from harness.core import resources
        ctx.check_memory([resources.position_tables(folder.args), resources.Need("the checkpoint as stored", folder.stored_bytes),
                          resources.Need("the largest forward (float64)",
                                         resources.forward_bytes(folder.args, shape.batch, shape.seq, "float64"))], "cpu")
        ckpt = folder.load()
        work_map, oracle_map = _maps(a, ckpt.args, dtype)
        probe = empty_reference(ckpt.args)
        check_map(work_map, probe)       # every input error before anything loads or is written
        check_map(oracle_map, probe)
        tf_map = to_transformers_map(work_map)
        ids = make_inputs(shape, ckpt.args.vocab_size, seed)
        label = spec.label()
        with tempfile.TemporaryDirectory(prefix="llama-parity-offload-") as scratch, HFFolder(ckpt) as hf:
            offload = Path(a.offload_dir) if a.offload_dir else Path(scratch)
            source = source_of(folder, ckpt, hf_path=lambda: hf.path, find_tokenizer=False)
            truth, ref_logits, tf_logits, tf_placed, who = _placed_logits(
                ckpt, spec, source, ids, dtype, {"attn": attn, "plant": fault}, work_map, oracle_map, tf_map, offload)
        case = {"dtype": dtype, "attn": attn, "shape": str(shape), "device_map": a.device_map}
        rows = judged_rows("place", case, truth, ref_logits, tf_logits, policy, dtype, label)
        placement = {"oracle-fp64": {k: str(v) for k, v in oracle_map.items()},
                     "reference": {k: str(v) for k, v in work_map.items()},
                     label: {k: str(v) for k, v in tf_placed.items()},
                     "blocks_per_device": {str(d): b for d, b in blocks_per_device(work_map, ckpt.args.n_layers).items()}}
        extra = {"model": str(folder.path), "truth": "oracle-fp64 (the reference entirely in float64)", "seed": seed,
                 "policy": {"path": str(policy.path), "version": policy.version}, "plant": a.plant,
                 "placement": placement, "subject": who}
        on_gpu = any(isinstance(d, int) for d in (*work_map.values(), *oracle_map.values()))
        from harness.results.markdown import md_escape
        section = "".join(f"- **{k}**: {md_escape(describe(v))}\n" for k, v in
                          (("oracle-fp64", oracle_map), ("reference", work_map), (label, tf_placed)))
        return Result([Part("place", rows, extra, sections=[("Placement (accelerate device maps)", section)],
                            device="cuda" if on_gpu else "cpu")],
                      [f"placement (reference, {label}): {describe(work_map)}"])


def _maps(a, args, dtype: str) -> tuple[dict, dict]:
    """(map for the working dtype, map for the float64 oracle), both in Meta names."""
    from harness.core.subjects import DTYPES
    max_memory = parse_max_memory(a.max_memory)
    if a.device_map in STRATEGIES:
        return tuple(plan(empty_reference(args, DTYPES[d]), max_memory, DTYPES[d], a.device_map)
                     for d in (dtype, "float64"))
    if max_memory is not None:
        raise InputError("--max-memory: only with --device-map auto or balanced "
                         "(a map file says where everything goes)")
    fixed = read_device_map(a.device_map)
    return fixed, fixed


def _placed_logits(ckpt, spec, source, ids, dtype, own: dict, work_map, oracle_map, tf_map, offload: Path):
    """The oracle, the reference and the subject one after the other, each placed by its map: their
    logits on the CPU, where the subject's blocks went, and who it was (settings, provenance)."""
    from harness.core.subjects import reference

    def placed_reference(at: str, device_map: dict):
        # Built on the CPU, then accelerate moves each block where the map says.
        model = place_reference(reference(ckpt, at, "cpu"), device_map, offload / ("oracle" if at == "float64"
                                                                                   else "reference"))
        return model(ids).cpu()

    truth = placed_reference("float64", oracle_map)
    ref_logits = placed_reference(dtype, work_map)
    cell = {**own, "device_map": tf_map, "offload_folder": offload / "subject"}
    try:
        subject = built(spec, source, dtype, "cpu", cell, "place")
    except Cannot as e:
        raise InputError(f"--subject {spec.label()}: nothing was measured: {e}") from None
    try:
        tf_placed = dict(getattr(getattr(subject, "model", None), "hf_device_map", None) or tf_map)
        who = {"label": spec.label(), "settings": subject.settings(), "provenance": subject.provenance()}
        return truth, ref_logits, subject.forward(ids).float().cpu(), tf_placed, who
    finally:
        subject.close()


def judged_rows(suite: str, case: dict, truth, ref_logits, tf_logits, policy, dtype: str,
                subject: str = SUBJECT) -> list:
    """The reference and the subject against the oracle (the subject calibrated on the reference),
    and the subject against the reference as info."""
    from harness.core.metrics import METRICS, compare
    from harness.core.store import FAIL, INFO, Row
    from harness.core.subjects import ORACLE
    ref_values, ref_why = compare(ref_logits, truth)
    tf_values, tf_why = compare(tf_logits, truth)
    pair, pair_why = compare(tf_logits, ref_logits)
    rows = []
    for subject, values, why, calib in (("reference", ref_values, ref_why, None),
                                        (subject, tf_values, tf_why, ref_values)):
        for m in METRICS:
            tol, status, reason = policy.judge(dtype, m, values[m], None if calib is None else calib[m])
            rows.append(Row(suite, case, subject, ORACLE, m, values[m], tol, FAIL if why else status, why or reason))
    rows += [Row(suite, case, subject, "reference", m, pair[m], status=INFO,
                 reason=pair_why or "informational: same dtype, no truth") for m in METRICS]
    return rows
