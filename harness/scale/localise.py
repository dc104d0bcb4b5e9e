"""Where does a subject start to diverge? Per-point error curves and the first-divergence rule.

Every point (``harness.scale.capture``) of a subject is measured against the float64 oracle as a
relative L2 error. A correct implementation at a low dtype drifts too, so each error is read
against the drift of the reference at the same dtype and point (the same calibration the
tolerance policy uses for logits):

    ratio(p) = err_subject(p) / max(err_reference(p), floor(dtype))

``floor`` is the dtype's machine epsilon: below it both errors are rounding of one value.

**The rule.** Detection and attribution use two thresholds, as a hysteresis:

1. *Detection*: transformers diverges when some point has ``ratio > ratio_limit`` (or is not
   finite). The first such point is where the divergence is certain (``confirmed_at``).
2. *Attribution*: walking back from there, the run of consecutive points with
   ``ratio > onset`` that ends at it starts at the first divergence. Every point before that
   run is within onset of what a correct implementation drifts there, so the excess is not
   inherited from the layers before: that point's own computation added it.

Why two: a fault can start small and grow downstream. Measured: RMSNorm eps 1e-6 instead of
1e-5 in one layer raises that norm's output error 7.6x over the reference's and the next op's
(the MLP) 8.5x; one threshold would blame the MLP, the hysteresis names the norm.

The numbers and why they are what they are: suites/localise.toml. The record also gives the
*jump* at the first divergence (its ratio over the largest ratio before it), so a reader can tell
a sharp fault from a slow creep.

``llama-parity localise`` runs the three full models one at a time on one input and writes the
curve; ``llama-parity logits`` calls ``first_divergence`` for each failing cell group. The subject
is transformers by default, or any kind that offers "hooks" (``--subject``): its own torch module
is hooked at the same points. A lossy subject (quantised weights) has its curve shown, not judged:
where its error first stands out of rounding is where the quantisation enters, not a bug.
"""
from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path
from typing import Callable, Optional

import torch

from harness.core import compat, inputs, resources
from harness.core.datafiles import suite_data
from harness.core.errors import InputError
from harness.core.faults import faults_for, get_fault
from harness.core.store import FAIL, INFO, NA, PASS, Row
from harness.core.subjects import ORACLE, ReferenceSubject, TransformersSubject
from harness.core.suite import Context, Part, Result, Suite
from harness.scale.capture import GROUP, Capture, Errors, Point, Store, point_name, point_order
from harness.subjects import DEFAULT as SUBJECT   # the implementation judged by default
from harness.subjects import Cannot, Spec, add_offering, built, is_exact, offering

# what this command needs of a subject (--subject): a torch module of its own to hook
LOCALISE_NEEDS = "per-layer and per-op hooks (harness.scale.capture) on its own torch module"
# A subject built at a dtype, offering hooks (its ``module()`` is hooked, its ``forward`` run).
Maker = Callable[[str], object]

FLOOR = {"float32": torch.finfo(torch.float32).eps, "bfloat16": torch.finfo(torch.bfloat16).eps,
         "float16": torch.finfo(torch.float16).eps, "float64": torch.finfo(torch.float64).eps}


@lru_cache(maxsize=None)
def thresholds() -> tuple[float, float]:
    """(ratio_limit, onset) from suites/localise.toml: detection and attribution."""
    data = suite_data("localise")
    limit, onset = data.get("ratio_limit"), data.get("onset")
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and x >= 1 for x in (limit, onset)) \
            or onset > limit:
        raise InputError("suites/localise.toml: ratio_limit and onset must be numbers >= 1, onset <= ratio_limit")
    return float(limit), float(onset)


def ratios(subject: dict[Point, float], reference: dict[Point, float], dtype: str) -> dict[Point, float]:
    floor = FLOOR[dtype]
    return {p: subject[p] / max(reference.get(p, 0.0), floor) for p in subject}


def locate(order: list[Point], subject: dict[Point, float], reference: dict[Point, float], dtype: str,
           limit: float | None = None, onset: float | None = None, failed: bool = False) -> dict:
    """The first-divergence record: layer/op (both None when no point breaks the rule) and why.

    ``failed``: the logits gate has already failed this cell, so the divergence is known to exist
    even when no point clears ``limit`` (the gate reads a distribution of logits; one rel L2 per
    point is blunter). Then the largest ratio stands in for the detection and the record says
    ``certain: False``; it still names a layer and op.
    """
    limit = thresholds()[0] if limit is None else limit
    onset = thresholds()[1] if onset is None else onset
    r = ratios(subject, reference, dtype)
    points = [p for p in order if p in r]
    bad = [not math.isfinite(subject[p]) or not (r[p] <= limit) for p in points]
    rule = f"detect: a point's error more than {limit:g}x the reference's at {dtype}; attribute: the start of the " \
           f"run of points above {onset:g}x that leads there"
    certain = any(bad)
    if not certain and not (failed and points):
        worst = max(points, key=lambda p: r[p]) if points else None
        return {"layer": None, "op": None, "group": None, "point": None, "rule": rule,
                "largest_ratio": None if worst is None else r[worst],
                "largest_at": None if worst is None else point_name(worst)}
    if certain:
        confirmed = bad.index(True)
    else:
        confirmed = max(range(len(points)), key=lambda i: r[points[i]])
        rule = (f"the gate failed but no point's error is more than {limit:g}x the reference's at {dtype}: "
                f"attributed to the start of the run of points above {onset:g}x that leads to the largest ratio")
    start = confirmed
    while start > 0 and not (r[points[start - 1]] <= onset):
        start -= 1
    p = points[start]
    worst_before = max((r[q] for q in points[:start]), default=1.0)
    layer, op = p
    return {"layer": layer, "op": op, "group": GROUP[op], "point": point_name(p),
            "subject_error": subject[p], "reference_error": reference.get(p), "ratio": r[p],
            "jump": r[p] / max(worst_before, 1.0), "confirmed_at": point_name(points[confirmed]),
            "certain": certain, "located_at": dtype, "rule": rule}


# --- full-model capture of the three runs -----------------------------------------------------

def capture_full(ckpt, hf_path: Path, ids: torch.Tensor, dtype: str, device: str = "cpu",
                 attn: str = "eager", tp: int = 1, fault=None, fine: bool = True, subject: Maker | None = None):
    """Oracle, reference at dtype and the subject at dtype over ids, one model at a time.

    The subject is transformers at attn, tp and fault, or what ``subject(dtype)`` builds (a
    registry subject offering hooks). Returns (order, reference errors, subject errors); errors are
    point -> rel L2 against the oracle. Only the oracle's activations are kept; the subjects are
    measured as they run.
    """
    why = compat.attn_reason(attn, device)
    if why:     # checked before three model loads, not after two
        raise InputError(f"--attn {attn}: {why}")
    oracle = ReferenceSubject(ckpt, "float64", device, oracle=True)
    truth = Store()
    with Capture(truth, fine).reference(oracle.model):
        oracle.logits(ids)
    del oracle

    reference = ReferenceSubject(ckpt, dtype, device)
    ref_err = Errors(truth)
    with Capture(ref_err, fine).reference(reference.model):
        reference.logits(ids)
    del reference

    tf_err = Errors(truth)
    if subject is None:
        plain = TransformersSubject(hf_path, dtype, device, attn, tp, fault)
        with Capture(tf_err, fine).transformers(plain.model):
            plain.logits(ids)
        del plain
    else:
        own = subject(dtype)
        try:
            with Capture(tf_err, fine).transformers(own.module()):
                own.forward(ids)
        finally:
            own.close()
    return point_order(ckpt.args.n_layers, fine), ref_err.errors, tf_err.errors


def first_divergence(ckpt, hf_path: Path, ids: torch.Tensor, dtype: str, device: str = "cpu",
                     attn: str = "eager", tp: int = 1, fault=None, fine: bool = True, failed: bool = False,
                     subject: Maker | None = None) -> dict:
    """``{"layer": ..., "op": ..., ...}`` for transformers at this cell, or for ``subject`` (a maker,
    as in ``capture_full``) (see ``locate``).

    ckpt: a reference_model.checkpoint.Checkpoint; hf_path: the HF folder transformers loads
    (``HFFolder(ckpt).path``); ids: the cell's token ids (batch, seq); the rest as in the cell.
    ``failed``: the gate failed the cell, so a point is always named. When no point at a low
    dtype clears the rule, the same run at float32 is asked first: a bug that changes the
    computation stands out more where rounding is finer (measured: bfloat16 residual rounding
    planted at float16 gives 1.6x at its own point, 6000x at float32).
    """
    order, ref, tf = capture_full(ckpt, hf_path, ids, dtype, device, attn, tp, fault, fine, subject)
    found = locate(order, tf, ref, dtype)
    if found["op"] is not None or not failed:
        return found
    if dtype != "float32":
        order32, ref32, tf32 = capture_full(ckpt, hf_path, ids, "float32", device, attn, tp, fault, fine, subject)
        at32 = locate(order32, tf32, ref32, "float32")
        if at32["op"] is not None:
            at32["rule"] = (f"no point's error stands out of {dtype}'s rounding by the rule's margin (largest: "
                            f"{found['largest_ratio']:.3g}x at {found['largest_at']}), so the same input was "
                            f"localised at float32: {at32['rule']}")
            return at32
    return locate(order, tf, ref, dtype, failed=True)


def curve_rows(suite: str, case: dict, order: list[Point], curves: dict[str, dict[Point, float]],
               reference: dict[Point, float], dtype: str, limit: float | None = None, shown: tuple[str, ...] = ()):
    """Rows of the common schema: the reference's curve as info, each other subject's judged (the
    ``shown`` ones, lossy subjects, as info with their ratio)."""
    limit = thresholds()[0] if limit is None else limit
    rows = []
    for name, errors in curves.items():
        r = ratios(errors, reference, dtype)
        for p in order:
            if p not in errors:
                continue
            layer, op = p
            pcase = {**case, "layer": "-" if layer is None else layer, "op": op}
            if name == "reference":
                rows.append(Row(suite, pcase, name, ORACLE, "rel_l2", errors[p], status=INFO,
                                reason="calibration: the reference's own drift at this dtype"))
            elif name in shown:
                rows.append(Row(suite, pcase, name, ORACLE, "rel_l2", errors[p], status=INFO,
                                reason=f"lossy subject, shown not judged: {r[p]:.3g}x the reference's error"))
            else:
                bad = not math.isfinite(errors[p]) or r[p] > limit
                tol = limit * max(reference.get(p, 0.0), FLOOR[dtype])
                rows.append(Row(suite, pcase, name, ORACLE, "rel_l2", errors[p], tolerance=tol,
                                status=FAIL if bad else PASS,
                                reason=f"{r[p]:.3g}x the reference's error" if bad else ""))
    return rows


def curve_markdown(order: list[Point], curves: dict[str, dict[Point, float]], reference: dict[Point, float],
                   dtype: str, found: dict) -> str:
    """The per-layer error curve of each subject as a table, first divergence marked (point names
    and numbers are the harness's own: nothing here needs escaping)."""
    names = list(curves)
    head = "| point | " + " | ".join(f"{n} rel L2" for n in names) + " | ratio |\n"
    head += "|---|" + "---|" * (len(names) + 1) + "\n"
    lines = []
    subject = next((n for n in names if n != "reference"), None)
    r = ratios(curves[subject], reference, dtype) if subject else {}
    for p in order:
        if not any(p in c for c in curves.values()):
            continue
        mark = " **<- first divergence**" if found.get("point") == point_name(p) else ""
        cells = " | ".join(_fmt(c.get(p)) for c in curves.values())
        lines.append(f"| {point_name(p)} | {cells} | {_fmt(r.get(p))}{mark} |")
    return head + "\n".join(lines) + "\n"


def _fmt(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.3g}"


# --- the localise and stream commands ------------------------------------------------------------

def where(found: dict) -> str:
    if found["layer"] is None and found["op"] is None:
        return "none: every point is within the rule"
    at = f" at {found['located_at']}" if found.get("located_at") else ""
    return (f"layer {found['layer']}, op {found['op']} ({found['point']}; {found['ratio']:.3g}x "
            f"the reference's error{at}, a {found['jump']:.3g}x jump{'' if found.get('certain', True) else '; uncertain'})")


def curve_part(suite: str, rows: list[Row], found: dict, extra: dict, device: str, table: str,
               subject: str = SUBJECT) -> Result:
    """The results of a localisation (full or streamed): rows, the record and the curve."""
    from harness.results.markdown import md_escape
    text = (f"First divergence of {md_escape(subject)}: **{md_escape(where(found))}**\n\n"
            f"Rule: {md_escape(found['rule'])}. Errors are relative L2 against the float64 oracle.\n\n"
            f"Settings: {md_escape(', '.join(f'{k}={v}' for k, v in extra['case'].items()))}\n\n{table}")
    part = Part(suite, rows, {"first_divergence": found, **extra}, sections=[("Error curve per subject", text)],
                device=device)
    return Result([part], [f"first divergence: {where(found)}"])


def add_common_arguments(p) -> None:
    p.add_argument("--model", help="Meta or HF folder; default: the embedded model")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 (default float32)")
    p.add_argument("--attn", default="eager", help="attention implementation (default eager)")
    p.add_argument("--shape", default="1x16", help="BATCHxSEQ of the input (default 1x16)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--seed", default="0", help="input seed (default 0)")
    p.add_argument("--coarse", action="store_true", help="skip the per-op points (q, k, v, attention weights)")


def common_inputs(a) -> tuple[str, str, object, str, int]:
    """(dtype, attn, shape, device, seed), validated."""
    dtype = inputs.choice("--dtype", a.dtype, inputs.KNOWN_DTYPES)
    attn = inputs.choice("--attn", a.attn, inputs.KNOWN_ATTN)
    device = inputs.device(a.device)
    why = compat.attn_reason(attn, device)
    if why:
        raise InputError(f"--attn {attn}: {why}")
    return dtype, attn, inputs.shape("--shape", a.shape), device, inputs.seed(a.seed)


class Localise(Suite):
    name = "localise"
    help = "name the first layer and op where transformers (or another --subject) diverges"

    def add_arguments(self, p) -> None:
        add_offering(p, self.name, "hooks on its own torch module", own="attn, tp and plant")
        add_common_arguments(p)
        p.add_argument("--tp", default="1", help="pretraining_tp (default 1)")
        p.add_argument("--plant", help=f"plant a known porting bug in the subject: "
                                       f"{', '.join(faults_for('localise'))}")

    def run(self, a, ctx: Context) -> Result:
        spec = offering(a.subject, self.name, "hooks", LOCALISE_NEEDS, own=("attn", "tp", "plant"))
        from harness.core.cases import make_inputs
        from harness.core.checkpoints import HFFolder, open_model
        dtype, attn, shape, device, seed = common_inputs(a)
        tp = inputs.integer("--tp", a.tp, 1, 4096)
        fault = get_fault(a.plant, "localise")
        folder = open_model(a.model)
        ctx.check_memory(resources.logits_run(folder.args, [dtype], [shape], folder.stored_bytes), device)
        ckpt = folder.load()
        ids = make_inputs(shape, ckpt.args.vocab_size, seed)
        case = {"dtype": dtype, "attn": attn, "tp": tp, "shape": str(shape), "device": device}
        extra = {"case": case, "model": str(folder.path), "seed": seed, "plant": a.plant,
                 "truth": "oracle-fp64 (the reference entirely in float64)"}
        label = spec.label()
        with HFFolder(ckpt) as hf:
            make, lossy = None, False
            if spec != Spec(SUBJECT):      # the default keeps its own path, bit for bit
                make, lossy, why = registry_maker(spec, folder, ckpt, hf.path, device, attn, tp, fault, dtype)
                if why:
                    row = Row("localise", {**case, "layer": "-", "op": "-"}, label, ORACLE, "all", None,
                              status=NA, reason=why)
                    part = Part("localise", [row], {"first_divergence": None, "subject": label, **extra},
                                device=device)
                    return Result([part], [f"{label}: n/a: {why}"])
            order, ref, tf = capture_full(ckpt, hf.path, ids, dtype, device, attn, tp, fault,
                                          fine=not a.coarse, subject=make)
        found = locate(order, tf, ref, dtype)
        curves = {"reference": ref, label: tf}
        rows = curve_rows("localise", case, order, curves, ref, dtype, shown=(label,) if lossy else ())
        if lossy:
            found["rule"] = (f"{label} is lossy (quantised weights): its curve is shown, not judged, and the point "
                             f"named is where its error first stands out of rounding. {found['rule']}")
        extra["subject"] = label
        return curve_part("localise", rows, found, extra, device, curve_markdown(order, curves, ref, dtype, found),
                          subject=label)


def registry_maker(spec: Spec, folder, ckpt, hf_path: Path, device: str, attn: str, tp: int, fault,
                   dtype: str) -> tuple[Maker | None, bool, str]:
    """(maker, lossy, why not): ``spec`` built through the registry at the command's attn, tp and
    plant. Built once here to ask what it is at these options (hooks, exact), then closed: the
    capture builds it again after the oracle, so that two models are never held at once."""
    from harness.subjects.common import source_of
    source = source_of(folder, ckpt, hf_path=lambda: hf_path, find_tokenizer=False)
    cell = {"attn": attn, "tp": str(tp), **({"plant": fault} if fault is not None else {})}
    try:
        probe = built(spec, source, dtype, device, cell, "hooks")
    except Cannot as e:
        return None, False, str(e)
    lossy = not is_exact(probe)
    probe.close()
    return (lambda dt: built(spec, source, dt, device, cell, "hooks")), lossy, ""
