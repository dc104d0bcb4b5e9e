"""Axes that real users hit beyond the logits matrix (`llama-parity axes`).

- ``cast``: how the weights reach the dtype. ``load`` is from_pretrained in the dtype; ``to`` is
  from_pretrained in float32 then ``model.to(dtype)``; ``autocast`` keeps float32 weights and runs
  under ``torch.autocast``. Each is run at short and long lengths, and the logits error is cut into
  position buckets (edges in suites/axes.toml, plus max_position_embeddings), so an error that grows
  with position shows in the late buckets even when the whole-sequence figure looks fine.
- ``flags``: ``output_attentions`` / ``output_hidden_states`` change the code path some releases
  take (SDPA falls back to eager, or returns no weights); the logits under each flag, the attention
  probabilities and the hidden states they return are compared with the float64 oracle.

The subject (``--subject``, transformers by default) is any kind that offers its own torch module
("module" in harness/subjects), built through the registry at each cell. Every subject figure is judged by the usual rule (harness/tolerance.py), calibrated on the
reference at the same dtype, same input and same position bucket. Divergences that are understood
and cited live in suites/axes.toml as known deviations: still measured and shown, status info,
unless ``--strict``.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from harness.core import SUITES, compat, deviations, inputs, resources
from harness.core.cases import Shape, make_inputs
from harness.core.checkpoints import HFFolder, open_model
from harness.core.datafiles import read_toml
from harness.core.errors import InputError
from harness.core.faults import Fault, faults_for, get_fault
from harness.core.metrics import (GATED, PAIRED, POLICY_METRICS, RATES, PositionStats,
                                  beyond_rounding, paired_ratio, position_stats, summarize)
from harness.core.presets import long_positions_model
from harness.core.store import FAIL, INFO, NA, Row, fingerprint
from harness.core.subjects import DTYPES, ORACLE, reference
from harness.core.suite import Context, Part, Result, Suite
from harness.core.tolerance import Policy, load_policy
from harness.scale.capture import Capture
from harness.subjects import DEFAULT, Cannot, Source, Spec, add_offering, module_of, offering
from harness.subjects.common import source_of
from harness.suites.behaviour.hidden import _layer_names, _reference_hidden, _rel_l2
from reference_model.checkpoint import Checkpoint

# what this command needs of a subject (--subject): its own torch module, cast and called with the flags
AXES_NEEDS = "its own torch module, cast by each path (load, .to, autocast) and called with output flags"

AXES_FILE = SUITES / "axes.toml"
CASTS = {
    "load": "from_pretrained(..., dtype=D)",
    "to": "from_pretrained(..., dtype=float32).to(D)",
    "autocast": "float32 weights under torch.autocast(dtype=D)",
}
FLAGS = ("none", "attentions", "hidden_states")
SUITES_HERE = ("cast", "flags")


@dataclass
class AxesSpec:
    """suites/axes.toml: what is checked by default, and the deviations understood so far."""
    version: str
    path: Path
    defaults: dict
    edges: list[int]
    known: list[deviations.Deviation]


def load_spec(path: Path | None = None) -> AxesSpec:
    path = Path(path) if path else AXES_FILE
    data = read_toml(path, "--spec")
    defaults = data.get("defaults")
    if not isinstance(defaults, dict):
        raise InputError(f"{path}: missing table [defaults]")
    edges = defaults.get("position_edges", [])
    if not (isinstance(edges, list) and all(isinstance(e, int) and not isinstance(e, bool) and e > 0 for e in edges)):
        raise InputError(f"{path}: [defaults] position_edges must be a list of positive integers")
    return AxesSpec(data["version"], path, defaults, sorted(set(edges)), deviations.read(data, str(path)))


@dataclass
class AxesRun:
    dtypes: list[str]
    attns: list[str]
    casts: list[str]
    flags: list[str]
    lengths: list[int]
    spec: AxesSpec
    policy: Policy            # logits metrics (suites/tolerance.toml)
    behaviour_policy: Policy  # hidden_rel_l2, attn_probs_max_abs (suites/behaviour_tolerance.toml)
    device: str = "cpu"
    seed: int = 0
    fault: Fault | None = None
    strict: bool = False
    notes: list[str] = field(default_factory=list)
    subject: Spec = field(default_factory=lambda: Spec(DEFAULT))   # --subject: its kind offers "module"
    source: Source | None = None                                    # the weights it is built from

    @property
    def label(self) -> str:
        """The rows' subject: the spec as given."""
        return self.subject.label()


def parse_lengths(values: list[str]) -> list[int]:
    return sorted(inputs.positive_ints("--lengths", values, inputs.MAX_SEQ))


def buckets(length: int, edges: list[int], max_pos: int) -> list[tuple[int, int, str]]:
    """(start, end, region) position ranges covering 0..length-1; max_position_embeddings is
    always an edge so that 'beyond it' is a bucket of its own."""
    cuts = sorted({0, length, *[e for e in [*edges, max_pos] if 0 < e < length]})
    return [(a, b, "beyond max_position_embeddings" if a >= max_pos else "within")
            for a, b in zip(cuts, cuts[1:])]


def settle(rows: list[Row], run: AxesRun) -> list[Row]:
    """Failing subject rows that a known deviation explains become info rows (unless strict)."""
    return deviations.settle(rows, run.spec.known, run.strict, subjects=(run.label,))


def _na(run: AxesRun, suite: str, case: dict, why: str) -> Row:
    return Row(suite, dict(case), run.label, ORACLE, "all", None, status=NA, reason=why)


def _failed(run: AxesRun, suite: str, case: dict, e: Exception, what: str) -> Row:
    msg = str(e).splitlines()[0][:200] if str(e) else ""
    return Row(suite, dict(case), run.label, ORACLE, "all", None, status=FAIL,
               reason=f"{what} failed: {type(e).__name__}: {msg}")


def _load(run: AxesRun, dtype: str, attn: str, cast: str = "load"):
    """The subject's module at a cell, built through the registry in the dtype (cast "load") or in
    float32, then cast with .to(dtype) for "to". The fault is planted on the loaded model, before
    .to(dtype): as a user's port would have it."""
    return _load_cast(run, dtype, attn, cast)[0]


def _load_cast(run: AxesRun, dtype: str, attn: str, cast: str) -> tuple:
    """(module, its rotary buffers as loaded in float32 where ``.to(dtype)`` lowered them: {} for
    the other casts or when nothing was lowered)."""
    cell = {"attn": attn, **({"plant": run.fault} if run.fault else {})}
    model = module_of(run.subject, run.source, dtype if cast == "load" else "float32", run.device, cell)
    if cast != "to":
        return model, {}
    kept = {n: b.detach().clone() for n, b in model.named_buffers() if "rotary" in n and b.is_floating_point()}
    model = model.to(DTYPES[dtype])
    lowered = {n for n, b in model.named_buffers() if n in kept and b.dtype != kept[n].dtype}
    return model, {n: b for n, b in kept.items() if n in lowered}


@contextlib.contextmanager
def rotary_restored(model, kept: dict):
    """The rotary buffers back at their float32 values for the duration: the counterfactual that
    says whether a ``.to(dtype)`` cell's error is the lowered RoPE frequencies and nothing else."""
    lowered = {}
    for name, value in kept.items():
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner)
        lowered[name] = (module, leaf, module._buffers[leaf])
        module._buffers[leaf] = value
    try:
        yield
    finally:
        for module, leaf, value in lowered.values():
            module._buffers[leaf] = value


def _context(run: AxesRun, cast: str, dtype: str):
    if cast != "autocast":
        return contextlib.nullcontext()
    return torch.autocast(run.device.split(":")[0], dtype=DTYPES[dtype])


def rope_buffer_dtypes(model) -> str:
    """The dtypes of the rotary embedding's buffers: what ``.to(dtype)`` silently changes."""
    found = sorted({f"{n.rsplit('.', 1)[-1]}={str(b.dtype).removeprefix('torch.')}"
                    for n, b in model.named_buffers() if "rotary" in n})
    return ", ".join(found) or "none"


@torch.inference_mode()
def _forward(run: AxesRun, model, ids: torch.Tensor, **flags):
    kwargs = {"use_cache": False, **flags}
    if run.fault is not None:
        kwargs.update(run.fault.forward_kwargs(ids))
    return model(input_ids=ids.to(run.device), **kwargs)


# Judged as `logits` judges a cell: the near-tie rates are shown, the flips rounding cannot explain
# are gated, and kl_ratio_lo compares every position with the reference's same position. What axes
# hunts (a RoPE table or a cast that loses precision) worsens every position of a late bucket, which
# the paired ratio resolves however the bucket's single extreme falls.


def judge_logits(policy: Policy, dtype: str, st: PositionStats, ref: PositionStats | None) -> list[tuple]:
    """(metric, value, tolerance, status, reason) for one stretch of positions; ``ref`` None judges
    the reference itself against the policy's hard ceilings."""
    values, why = summarize(st)
    ref_values = summarize(ref)[0] if ref is not None else None
    lim = policy.limit(dtype, "max_abs")
    values.update(beyond_rounding(st, ref if ref is not None else st, lim.max_factor or lim.factor))
    paired = None
    if ref is not None:
        ref_values.update(beyond_rounding(ref, ref, lim.max_factor or lim.factor))
        if not why:
            paired = paired_ratio(st, ref)
            values["kl_ratio_lo"], ref_values["kl_ratio_lo"] = paired["kl_ratio_lo"], 1.0
    out = []
    for m in [*GATED, *PAIRED, *RATES]:
        if m not in values:
            continue
        tol, status, reason = policy.judge(dtype, m, values[m], None if ref_values is None else ref_values[m])
        if why:
            status, reason = FAIL, why
        elif m in RATES:
            status, reason = INFO, (f"a rate over {len(st)} positions; top1_flips/topk_misses gate the flips "
                                    "rounding cannot explain")
        elif m in PAIRED:
            reason = (f"{'' if status != FAIL else reason + ': '}KL {paired['gm']:.3g}x the reference's at the "
                      f"same positions (geometric mean over {paired['n']}; lower 3-sigma bound {values[m]:.3g})")
        out.append((m, values[m], tol, status, reason))
    return out


def _bucket_rows(suite, case, subject, logits, truth, spans, policy, dtype, ref_stats=None, extra=None):
    """All logits metrics per position bucket, each judged against the reference's same bucket
    (``ref_stats[(start, end)]``; None judges the reference itself). Returns the rows and the
    bucket's per-position statistics."""
    rows, stats = [], {}
    for a, b, region in spans:
        st = stats[(a, b)] = position_stats(logits[:, a:b], truth[:, a:b])
        c = {**case, "positions": f"{a}-{b - 1}", "region": region}
        ref = None if ref_stats is None else ref_stats[(a, b)]
        for m, v, tol, status, reason in judge_logits(policy, dtype, st, ref):
            rows.append(Row(suite, c, subject, ORACLE, m, v, tol, status, reason, dict(extra or {})))
    return rows, stats


def run_cast(run: AxesRun, ckpt: Checkpoint) -> list[Row]:
    suite, vocab, max_pos = "cast", ckpt.args.vocab_size, ckpt.args.max_seq_len
    inputs = {n: make_inputs(Shape(1, n), vocab, run.seed) for n in run.lengths}
    spans = {n: buckets(n, run.spec.edges, max_pos) for n in run.lengths}
    oracle = reference(ckpt, "float64", run.device)
    with torch.inference_mode():
        truth = {n: oracle(ids.to(run.device)).cpu() for n, ids in inputs.items()}
    del oracle
    rows: list[Row] = []
    for dtype in run.dtypes:
        model = reference(ckpt, dtype, run.device)
        ref_stats = {}
        for n, ids in inputs.items():
            with torch.inference_mode():
                logits = model(ids.to(run.device)).cpu()
            case = {"dtype": dtype, "cast": "-", "attn": "-", "length": n, "device": run.device}
            got, ref_stats[n] = _bucket_rows(suite, case, "reference", logits, truth[n], spans[n], run.policy, dtype)
            rows += got
        del model
        for cast in run.casts:
            for attn in run.attns:
                case = {"dtype": dtype, "cast": cast, "attn": attn, "device": run.device}
                why = compat.attn_reason(attn, run.device)
                if not why and dtype == "float32" and cast != "load":
                    why = "float32 is the dtype the weights load in: no cast to make"
                if why:
                    rows.append(_na(run, suite, case, why))
                    continue
                try:
                    model, kept = _load_cast(run, dtype, attn, cast)
                except InputError:
                    raise
                except Cannot as e:
                    rows.append(_na(run, suite, case, str(e)))
                    continue
                except Exception as e:   # a release that cannot build this cell fails it, naming the error
                    rows.append(_failed(run, suite, case, e, f"{run.subject.kind} load"))
                    continue
                buffers = rope_buffer_dtypes(model)
                for n, ids in inputs.items():
                    try:
                        with _context(run, cast, dtype):
                            logits = _forward(run, model, ids).logits.cpu()
                    except Exception as e:
                        rows.append(_failed(run, suite, {**case, "length": n}, e, f"{run.subject.kind} forward"))
                        continue
                    got = _bucket_rows(suite, {**case, "length": n}, run.label, logits, truth[n], spans[n],
                                       run.policy, dtype, ref_stats[n], {"rope_buffers": buffers})[0]
                    if kept:
                        _restored_evidence(run, model, kept, ids, got, (suite, case, n, truth[n], spans[n],
                                                                         dtype, ref_stats[n]))
                    rows += got
                del model
    return settle(rows, run)


def _restored_evidence(run: AxesRun, model, kept: dict, ids, rows: list[Row], where: tuple) -> None:
    """The same cell once more with the rotary buffers at float32: each bucket's rows record
    whether it then passes (``rope_restored``), the evidence the inv_freq known deviation asks for.
    A bucket that still fails has a second cause the deviation does not explain."""
    suite, case, n, truth, spans, dtype, ref = where
    try:
        with rotary_restored(model, kept):
            logits = _forward(run, model, ids).logits.cpu()
    except Exception as e:
        verdict = {r.case["positions"]: f"could not run: {type(e).__name__}" for r in rows}
    else:
        again = _bucket_rows(suite, {**case, "length": n}, run.label, logits, truth, spans, run.policy, dtype, ref)[0]
        verdict = {}
        for r in again:
            if r.status == FAIL or verdict.get(r.case["positions"]) is None:
                verdict[r.case["positions"]] = "fails" if r.status == FAIL else "passes"
    for r in rows:
        r.extra["rope_restored"] = verdict.get(r.case["positions"], "not run")


# --- flags ----------------------------------------------------------------------------------------

def _reference_attention(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """Each layer's attention probabilities (batch, heads, seq, seq), recomputed by the capture
    hooks from the reference's own post-RoPE q and k."""
    found: dict[int, torch.Tensor] = {}

    def sink(point, t):
        if point[1] == "attn_weights":
            found[point[0]] = t.double().cpu()

    with Capture(sink, fine=True).reference(model), torch.inference_mode():
        model(ids)
    return [found[i] for i in sorted(found)]


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double().cpu() - b.double().cpu()).abs().max().item()


def _flag_kwargs(flag: str) -> dict:
    return {"attentions": {"output_attentions": True},
            "hidden_states": {"output_hidden_states": True}}.get(flag, {})


def run_flags(run: AxesRun, ckpt: Checkpoint) -> list[Row]:
    suite = "flags"
    ids = make_inputs(Shape(2, 32), ckpt.args.vocab_size, run.seed).to(run.device)
    names = _layer_names(ckpt.args.n_layers)
    oracle = reference(ckpt, "float64", run.device)
    with torch.inference_mode():
        truth = oracle(ids).cpu()
    truth_attn, truth_hidden = _reference_attention(oracle, ids), _reference_hidden(oracle, ids)
    del oracle
    rows: list[Row] = []
    for dtype in run.dtypes:
        model = reference(ckpt, dtype, run.device)
        with torch.inference_mode():
            ref_st = position_stats(model(ids).cpu(), truth)
        ref_attn = [_max_abs(a, t) for a, t in zip(_reference_attention(model, ids), truth_attn)]
        ref_hidden = [_rel_l2(h, t) for h, t in zip(_reference_hidden(model, ids), truth_hidden)]
        del model
        rows += _reference_rows(run, suite, dtype, ref_st, ref_attn, ref_hidden, names)
        for attn in run.attns:
            base = {"dtype": dtype, "attn": attn, "device": run.device}
            why = compat.attn_reason(attn, run.device)
            if why:
                rows += [_na(run, suite, {**base, "flags": f}, why) for f in run.flags]
                continue
            try:
                model = _load(run, dtype, attn)
                plain = _forward(run, model, ids).logits.cpu()
            except InputError:
                raise
            except Cannot as e:
                rows += [_na(run, suite, {**base, "flags": f}, str(e)) for f in run.flags]
                continue
            except Exception as e:
                rows += [_failed(run, suite, {**base, "flags": f}, e, f"{run.subject.kind} load") for f in run.flags]
                continue
            for flag in run.flags:
                case = {**base, "flags": flag}
                try:
                    out = _forward(run, model, ids, **_flag_kwargs(flag))
                except Exception as e:
                    rows.append(_failed(run, suite, case, e, f"{run.subject.kind} forward"))
                    continue
                logits = out.logits.cpu()
                for m, v, tol, status, reason in judge_logits(run.policy, dtype, position_stats(logits, truth), ref_st):
                    rows.append(Row(suite, {**case, "layer": "logits"}, run.label, ORACLE, m, v, tol, status, reason))
                changed = _max_abs(logits, plain)
                rows.append(Row(suite, {**case, "layer": "logits"}, run.label, f"{run.label} flags=none",
                                "max_abs", changed, None, INFO,
                                "the flag changed the code path (logits differ from the same model without it)"
                                if changed else "same logits as without the flag"))
                if flag == "attentions":
                    rows += _attention_rows(run, suite, case, getattr(out, "attentions", None), truth_attn,
                                            ref_attn, names, dtype)
                elif flag == "hidden_states":
                    rows += _hidden_rows(run, suite, case, getattr(out, "hidden_states", None), truth_hidden,
                                         ref_hidden, names, dtype)
            del model
    return settle(rows, run)


def _reference_rows(run, suite, dtype, logits: PositionStats, attn: list, hidden: list, names) -> list[Row]:
    """The calibrators, shown and held to the policy's hard ceilings like any subject."""
    base = {"dtype": dtype, "attn": "-", "device": run.device, "flags": "-"}
    rows = [Row(suite, {**base, "layer": "logits"}, "reference", ORACLE, m, v, tol, status, why)
            for m, v, tol, status, why in judge_logits(run.policy, dtype, logits, None)]
    judged = [({**base, "layer": f"block{i}"}, "attn_probs_max_abs", v, run.behaviour_policy)
               for i, v in enumerate(attn)]
    judged += [({**base, "layer": n}, "hidden_rel_l2", v, run.behaviour_policy) for n, v in zip(names, hidden)]
    for case, metric, value, policy in judged:
        tol, status, why = policy.judge(dtype, metric, value, None)
        rows.append(Row(suite, case, "reference", ORACLE, metric, value, tol, status, why))
    return rows


def _returned(run, suite, case, got, want: int, what: str) -> Row | None:
    """A FAIL row when the subject did not return one tensor per layer for an output flag."""
    n = 0 if got is None else len(got)
    if n == want and all(torch.is_tensor(t) for t in got):
        return None
    shown = "None" if got is None else f"a tuple of {n} ({', '.join(type(t).__name__ for t in got[:3])})"
    return Row(suite, {**case, "layer": "-"}, run.label, ORACLE, f"{what}_returned", float(n), float(want),
               FAIL, f"asked for output_{what}=True: got {shown}, expected {want} tensors")


def _attention_rows(run, suite, case, got, truth, ref, names, dtype) -> list[Row]:
    missing = _returned(run, suite, case, got, len(truth), "attentions")
    if missing:
        return [missing]
    rows = []
    for i, (a, t, rv) in enumerate(zip(got, truth, ref)):
        if a.shape != t.shape:
            rows.append(Row(suite, {**case, "layer": f"block{i}"}, run.label, ORACLE, "attn_probs_max_abs",
                            None, None, FAIL, f"attention weights of shape {tuple(a.shape)}, expected {tuple(t.shape)}"))
            continue
        v = _max_abs(a, t)
        tol, status, why = run.behaviour_policy.judge(dtype, "attn_probs_max_abs", v, rv)
        rows.append(Row(suite, {**case, "layer": f"block{i}"}, run.label, ORACLE, "attn_probs_max_abs",
                        v, tol, status, why))
    return rows


def _hidden_rows(run, suite, case, got, truth, ref, names, dtype) -> list[Row]:
    missing = _returned(run, suite, case, got, len(truth), "hidden_states")
    if missing:
        return [missing]
    rows = []
    for name, h, t, rv in zip(names, got, truth, ref):
        v = _rel_l2(h, t)
        tol, status, why = run.behaviour_policy.judge(dtype, "hidden_rel_l2", v, rv)
        rows.append(Row(suite, {**case, "layer": name}, run.label, ORACLE, "hidden_rel_l2", v, tol, status, why))
    return rows


# --- the command ---------------------------------------------------------------------------------

class Axes(Suite):
    """`llama-parity axes --suite cast,flags`: one results folder per suite under --out."""
    name = "axes"
    help = "cast paths (load/to/autocast) with long positions, and output flags"

    def add_arguments(self, p) -> None:
        add_offering(p, self.name, AXES_NEEDS, own="attn, plant")
        p.add_argument("--suite", type=inputs.csv, help="comma list of cast,flags (default: both)")
        p.add_argument("--model", help="Meta or HF checkpoint; default: the long-hd128 preset (head_dim 128, "
                                       "max_position_embeddings 2048), generated into the cache")
        p.add_argument("--dtypes", type=inputs.csv,
                       help="comma list of float32,bfloat16,float16 (default: all three)")
        p.add_argument("--attn", type=inputs.csv,
                       help="comma list of attention implementations (default: eager,sdpa)")
        p.add_argument("--casts", type=inputs.csv, help="comma list of load,to,autocast (default: all three)")
        p.add_argument("--flags", type=inputs.csv,
                       help="comma list of none,attentions,hidden_states (default: all three)")
        p.add_argument("--lengths", type=inputs.csv,
                       help="comma list of sequence lengths for the cast suite (default: 16,3072)")
        p.add_argument("--spec", help="axes data file (default: suites/axes.toml)")
        p.add_argument("--policy", help="logits tolerance policy (default: suites/tolerance.toml)")
        p.add_argument("--plant", help=f"plant a known porting bug in the subject: "
                                       f"{', '.join(faults_for('axes'))}")
        p.add_argument("--strict", action="store_true", help="gate known deviations like any other row")
        deviations.add_argument(p)
        p.add_argument("--device", default="cpu")
        p.add_argument("--seed", default="0")

    def run(self, a, ctx: Context) -> Result:
        subject = offering(a.subject, self.name, "module", AXES_NEEDS, own=("attn", "plant"))
        from harness.suites.behaviour.common import DEFAULT_POLICY as BEHAVIOUR_POLICY
        spec = load_spec(a.spec)
        spec.known = deviations.merge(spec.known, deviations.user_deviations(a))
        d = spec.defaults
        suites = inputs.choices("--suite", a.suite if a.suite is not None else list(SUITES_HERE), SUITES_HERE)
        dtypes = inputs.choices("--dtypes", a.dtypes if a.dtypes is not None else d.get("dtypes", list(inputs.KNOWN_DTYPES)),
                                inputs.KNOWN_DTYPES)
        run = AxesRun(
            dtypes=dtypes,
            attns=inputs.choices("--attn", a.attn if a.attn is not None else d.get("attns", ["eager", "sdpa"]),
                                 inputs.KNOWN_ATTN),
            casts=inputs.choices("--casts", a.casts if a.casts is not None else d.get("casts", list(CASTS)), tuple(CASTS)),
            flags=inputs.choices("--flags", a.flags if a.flags is not None else d.get("flags", list(FLAGS)), FLAGS),
            lengths=parse_lengths(a.lengths if a.lengths is not None else [str(n) for n in d.get("lengths", [16])]),
            spec=spec, policy=load_policy(a.policy, metrics=POLICY_METRICS).require(dtypes, [*GATED, *PAIRED, *RATES]),
            behaviour_policy=load_policy(BEHAVIOUR_POLICY).require(dtypes, ["attn_probs_max_abs", "hidden_rel_l2"]),
            device=inputs.device(a.device), seed=inputs.seed(a.seed), fault=get_fault(a.plant, self.name),
            strict=a.strict, subject=subject)
        compat.usable_attns("--attn", run.attns, run.device)
        folder = open_model(a.model) if a.model else open_model(long_positions_model())
        ctx.check_memory(resources.logits_run(folder.args, dtypes, [Shape(1, n) for n in run.lengths] + [Shape(2, 32)],
                                              folder.stored_bytes), run.device)
        ckpt = folder.load()
        if run.fault is not None and run.fault.min_positions > max(run.lengths) and "cast" in suites:
            run.notes.append(f"note: --plant {run.fault.name} shows from about {run.fault.min_positions} positions; "
                             f"the longest length here is {max(run.lengths)}")
        parts = []
        with HFFolder(ckpt) as hf:
            run.source = source_of(folder, ckpt, hf_path=lambda: hf.path, find_tokenizer=False)
            for name in suites:
                rows = {"cast": run_cast, "flags": run_flags}[name](run, ckpt)
                extra = {"model": {"path": str(folder.path), "format": ckpt.source,
                                   "fingerprint": fingerprint(folder.fingerprint()),
                                   "max_position_embeddings": ckpt.args.max_seq_len},
                         "seed": run.seed, "plant": run.fault.name if run.fault else None, "strict": run.strict,
                         "spec": {"path": str(spec.path), "version": spec.version},
                         "policy": {"path": str(run.policy.path), "version": run.policy.version,
                                    **deviations.user_summary(spec.known)},
                         "behaviour_policy": {"path": str(run.behaviour_policy.path),
                                              "version": run.behaviour_policy.version}}
                if name == "cast":
                    extra["lengths"] = run.lengths
                parts.append(Part(name, rows, extra, folder=name, device=run.device))
        return Result(parts, run.notes)
