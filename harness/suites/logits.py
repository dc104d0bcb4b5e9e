"""The logits suite: every subject over the case matrix, measured against the float64 oracle,
judged with the tolerance policy.

Flow: checkpoint -> oracle logits per input shape -> reference at each dtype (the calibrator) ->
transformers per cell -> metrics -> verdict rows. Rows are journaled group by group (the
reference at a dtype; transformers at a dtype, attention and tp), so a rerun with the same --out
resumes: finished groups are read back, not rerun. Weights with NaN/Inf, or activations that
overflow a narrow dtype, fail the cells they spoil with the cause named; they never pass and
never stop the run.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from harness.core import compat, inputs, resources
from harness.core.cases import Case, Shape, make_inputs, matrix
from harness.core.checkpoints import HFFolder, ModelFolder, open_model
from harness.core.datafiles import suite_data
from harness.core.environment import environment
from harness.core.errors import InputError
from harness.core.faults import Fault, faults_for, get_fault
from harness.core.metrics import METRICS, compare, per_position
from harness.core.store import FAIL, NA, PASS, Row, fingerprint
from harness.core.subjects import DTYPES, ORACLE, TRUTH, ReferenceSubject, TransformersSubject
from harness.core.suite import Context, Part, Result, Suite
from harness.core.tolerance import Policy, load_policy
from reference_model import checkpoint
from reference_model.checkpoint import Checkpoint

SUITE = "logits"


class Logits(Suite):
    name = SUITE
    help = "reference vs transformers logits over a case matrix"

    def add_arguments(self, p) -> None:
        p.add_argument("--model", help="Meta (params.json + consolidated.*.pth) or HF folder; default: embedded model")
        p.add_argument("--dtypes", type=inputs.csv, help="comma list of float32,bfloat16,float16 (default: all three)")
        p.add_argument("--attn", type=inputs.csv, help="comma list of eager,sdpa,flash_attention_2,flex_attention")
        p.add_argument("--tp", type=inputs.csv, help="comma list of pretraining_tp values (default: 1,2)")
        p.add_argument("--shapes", type=inputs.csv, help="comma list of BATCHxSEQ (default: 1x16,2x64)")
        p.add_argument("--tokens", help="JSON file: a list of equal-length token-id lists to run instead of --shapes")
        p.add_argument("--tokenizer", help="SentencePiece tokenizer.model: the checkpoint's vocab_size must match it "
                                           "(fills params.json's -1)")
        p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
        p.add_argument("--seed", default="0", help="input seed (default 0)")
        p.add_argument("--policy", help="tolerance policy TOML (default: suites/tolerance.toml)")
        p.add_argument("--plant", help=f"plant a known porting bug in the transformers subject: "
                                       f"{', '.join(faults_for(SUITE))}")
        p.add_argument("--no-localise", action="store_true",
                       help="skip naming the first diverging layer/op of failing cells")
        p.add_argument("--no-resume", action="store_true", help="forget finished cells journaled in --out; rerun all")

    def run(self, a, ctx: Context) -> Result:
        plan = Plan.from_args(a, ctx)
        ctx.begin(resume=not a.no_resume)
        return Measure(plan, ctx).run()


@dataclass
class Plan:
    """Everything a run needs, validated before anything in --out changes."""
    folder: ModelFolder
    ckpt: Checkpoint
    dtypes: list[str]
    attns: list[str]
    tps: list[int]
    inputs: dict[Shape, torch.Tensor]
    device: str
    seed: int
    policy: Policy
    fault: Fault | None
    localise: bool
    tokens_path: Path | None
    tokenizer_vocab: int | None

    @classmethod
    def from_args(cls, a, ctx: Context) -> "Plan":
        d = suite_data(SUITE)["defaults"]
        if a.tokens and a.shapes:
            raise InputError("--tokens and --shapes: give one (the token file fixes the shape)")
        tokens = inputs.token_file(a.tokens) if a.tokens else None
        vocab = tokenizer_vocab(a.tokenizer) if a.tokenizer else None
        device = inputs.device(a.device)
        seed = inputs.seed(a.seed)
        dtypes = inputs.choices("--dtypes", a.dtypes if a.dtypes is not None else d["dtypes"], inputs.KNOWN_DTYPES)
        attns = inputs.choices("--attn", a.attn if a.attn is not None else d["attn"], inputs.KNOWN_ATTN)
        compat.usable_attns("--attn", attns, device)
        tps = inputs.positive_ints("--tp", a.tp if a.tp is not None else [str(t) for t in d["tp"]])
        if all(t > 1 for t in tps) and not compat.tp_honoured():
            raise InputError(f"--tp {','.join(map(str, tps))}: {compat.TP_NOOP}, so nothing would be measured")
        shapes = inputs.shapes("--shapes", a.shapes if a.shapes is not None else d["shapes"])
        policy = load_policy(a.policy, metrics=list(METRICS)).require(dtypes, METRICS)
        fault = get_fault(a.plant, SUITE)
        folder = open_model(a.model, vocab_size=vocab)
        shapes_run = shapes if tokens is None else [Shape(len(tokens), len(tokens[0]))]
        ctx.check_memory(resources.logits_run(folder.args, dtypes, shapes_run, folder.stored_bytes), device)
        ckpt = folder.load(vocab_size=vocab)
        if tokens is None:
            ids = {s: make_inputs(s, ckpt.args.vocab_size, seed) for s in shapes}
        else:
            inputs.token_ids_in_vocab(f"--tokens {a.tokens}", tokens, ckpt.args.vocab_size)
            t = torch.tensor(tokens, dtype=torch.long)
            ids = {Shape(*t.shape): t}
        return cls(folder, ckpt, dtypes, attns, tps, ids, device, seed, policy, fault, not a.no_localise,
                   Path(a.tokens) if a.tokens else None, vocab)


def tokenizer_vocab(path: str) -> int:
    """Number of pieces in a SentencePiece tokenizer.model: the vocabulary the checkpoint must have."""
    from reference_model.tokenizer import TokenizerFileError, read_model_file
    path = inputs.existing_file("--tokenizer", path)
    try:
        model = read_model_file(path)
    except TokenizerFileError as e:
        raise InputError(f"--tokenizer {e}") from None
    if not model.pieces:
        raise InputError(f"--tokenizer {path}: no pieces (not a SentencePiece model)")
    return len(model.pieces)


class Measure:
    """One run of the plan: the oracle's logits and the HF folder are made once, when first needed."""

    def __init__(self, plan: Plan, ctx: Context):
        self.plan, self.ctx = plan, ctx
        self.env = environment(plan.device)
        self.notes = weight_notes(plan.ckpt, plan.dtypes)
        self._truth: dict[Shape, torch.Tensor] | None = None
        self._hf: HFFolder | None = None
        self.settings = {   # everything that decides a group's rows; a journaled group is reused only if all match
            "suite": SUITE, "model": plan.folder.fingerprint(), "seed": plan.seed,
            "inputs": fingerprint([ids.tolist() for ids in plan.inputs.values()]),
            "policy": {"version": plan.policy.version,
                       "sha": fingerprint(plan.policy.path.read_text(encoding="utf-8"))},
            "plant": plan.fault.name if plan.fault else None,
            "environment": {k: self.env[k] for k in ("torch", "transformers", "device", "torch_threads",
                                                     "harness_commit", "harness_source_sha256")},
        }

    # -- shared, made once ----------------------------------------------------------------------
    def truth(self) -> dict[Shape, torch.Tensor]:
        if self._truth is None:
            oracle = ReferenceSubject(self.plan.ckpt, "float64", self.plan.device, oracle=True)
            self._truth = {s: oracle.logits(ids).cpu() for s, ids in self.plan.inputs.items()}
        return self._truth

    def hf_path(self) -> Path:
        if self._hf is None:
            self._hf = HFFolder(self.plan.ckpt)
        return self._hf.path

    def key(self, group: dict) -> str:
        return fingerprint({"run": self.settings, "group": group})

    def cached(self, group: dict, compute) -> list[Row]:
        """The group's rows from the journal, or computed now and journaled."""
        journal = self.ctx.journal()
        rows = journal.get(self.key(group))
        if rows is None:
            rows = compute()
            journal.append(self.key(group), group, rows)
        return rows

    # -- the run --------------------------------------------------------------------------------
    def run(self) -> Result:
        plan, started = self.plan, time.perf_counter()
        cells = matrix(plan.dtypes, plan.attns, plan.tps, list(plan.inputs), plan.device)
        support = self.env["dtype_support"]
        rows: list[Row] = []
        bar = _progress(len(plan.dtypes) * len(plan.inputs) + len(cells), self.ctx.progress)
        try:
            for dtype in plan.dtypes:
                dcells = [c for c in cells if c.dtype == dtype]
                if not support.get(dtype, False):
                    why = f"{dtype} does not run on {plan.device}"
                    rows += [_na(c, why) for c in dcells]
                    bar.update(len(plan.inputs) + len(dcells))
                else:
                    rows += self.dtype_rows(dtype, dcells, bar)
        finally:
            bar.close()
            if self._hf is not None:
                self._hf.close()
        journal = self.ctx.journal()
        if journal.reused:
            self.ctx.note(f"resumed: {len(journal.reused)} finished cell group(s) read from {journal.path}, not rerun")
        extra = self.summary_extra()
        if plan.localise:
            extra.update(localise_failures(plan, rows))
        timing = {"wall_seconds": round(time.perf_counter() - started, 3), "groups_resumed": len(journal.reused)}
        return Result([Part(SUITE, rows, extra, timing=timing, device=plan.device)], self.ctx.notes)

    def dtype_rows(self, dtype: str, dcells: list[Case], bar) -> list[Row]:
        """The reference at this dtype (journaled; it calibrates), then each transformers group."""
        ref_group = {"subject": "reference", "dtype": dtype}
        tf_groups = [{"subject": "transformers", "dtype": dtype, "attn": a, "tp": t}
                     for a, t in sorted({(c.attn, c.tp) for c in dcells}, key=str)]
        journal = self.ctx.journal()
        pending = any(journal.entries.get(self.key(g)) is None for g in [ref_group, *tf_groups])
        calibration = self.reference_pass(dtype) if pending else None
        rows = self.cached(ref_group, lambda: calibration[2])
        bar.update(len(self.plan.inputs))
        for g in tf_groups:
            group = [c for c in dcells if (c.attn, c.tp) == (g["attn"], g["tp"])]
            rows += self.cached(g, lambda: self.transformers_rows(dtype, g["attn"], g["tp"], group, calibration))
            bar.update(len(group))
        return rows

    def reference_pass(self, dtype: str):
        """(logits, metrics, rows) of the reference at dtype on every input shape."""
        reference = ReferenceSubject(self.plan.ckpt, dtype, self.plan.device)
        logits, metrics, rows = {}, {}, []
        for shape, ids in self.plan.inputs.items():
            logits[shape] = reference.logits(ids).cpu()
            values, why = judged_compare(logits[shape], self.truth()[shape], dtype, self.notes)
            metrics[shape] = values
            case = {"dtype": dtype, "attn": "-", "tp": "-", "shape": str(shape), "device": self.plan.device}
            rows += with_curves(judge(metric_rows(case, "reference", values, why), self.plan.policy, dtype, None),
                                logits[shape], self.truth()[shape])
        return logits, metrics, rows

    def transformers_rows(self, dtype: str, attn: str, tp: int, group: list[Case], calibration) -> list[Row]:
        """One (dtype, attn, tp) group; nothing loads for an n/a group."""
        plan = self.plan
        why_na = compat.attn_reason(attn, plan.device)
        if not why_na and tp > 1 and not compat.tp_honoured():
            why_na = compat.TP_NOOP
        if plan.fault is not None and dtype not in plan.fault.visible_at:
            self.ctx.note(f"note: --plant {plan.fault.name} changes nothing at {dtype}")
        if why_na:
            return [_na(c, why_na) for c in group]
        ref_logits, ref_metrics, _ = calibration
        try:
            subject = TransformersSubject(self.hf_path(), dtype, plan.device, attn, tp, plan.fault)
        except InputError:
            raise
        except Exception as e:  # a release that cannot build this cell fails it, naming the error
            return [_failed(c, f"transformers failed to load: {_first_line(e)}") for c in group]
        rows = []
        for case in group:
            try:
                logits = subject.logits(plan.inputs[case.shape]).cpu()
            except Exception as e:
                rows.append(_failed(case, f"transformers forward failed: {_first_line(e)}"))
                continue
            truth = self.truth()[case.shape]
            if logits.shape != truth.shape:
                rows.append(_failed(case, shape_mismatch(logits, truth, tp)))
                continue
            values, why = judged_compare(logits, truth, dtype, self.notes)
            rows += with_curves(judge(metric_rows(case.settings(), "transformers", values, why), plan.policy, dtype,
                                      ref_metrics[case.shape]), logits, truth)
            pair, why = compare(logits, ref_logits[case.shape])
            rows += [Row(SUITE, case.settings(), "transformers", "reference", m, pair[m], status="info",
                         reason=why or "informational: same dtype, no truth") for m in METRICS]
        return rows

    def summary_extra(self) -> dict:
        plan = self.plan
        return {
            "model": {"path": str(plan.folder.path), "format": plan.ckpt.source, "shards": plan.ckpt.n_shards,
                      "args": dict(vars(plan.ckpt.args))},
            "truth": TRUTH,
            "seed": plan.seed,
            "inputs": {"tokens": str(plan.tokens_path) if plan.tokens_path else None,
                       "shapes": [str(s) for s in plan.inputs], "sha": self.settings["inputs"]},
            "policy": {"path": str(plan.policy.path), "version": plan.policy.version},
            "plant": plan.fault.name if plan.fault else None,
            "tokenizer_vocab": plan.tokenizer_vocab,
            "weights": {d: n for d, n in self.notes.items() if n} or None,
        }


# --- rows ----------------------------------------------------------------------------------------

def metric_rows(case: dict, subject: str, values: dict, reason: str) -> list[Row]:
    return [Row(SUITE, case, subject, ORACLE, m, values[m], status=FAIL if reason else PASS, reason=reason)
            for m in METRICS]


def judge(rows: list[Row], policy: Policy, dtype: str, reference: dict | None) -> list[Row]:
    for r in rows:
        tol, status, why = policy.judge(dtype, r.metric, r.value, None if reference is None else reference[r.metric])
        r.tolerance = tol
        if r.status != FAIL:
            r.status, r.reason = status, why
    return rows


def with_curves(rows: list[Row], logits: torch.Tensor, truth: torch.Tensor) -> list[Row]:
    """Per-position curves ride on the max_abs and kl_max rows (for the report's plots)."""
    curves = per_position(logits, truth)
    for r in rows:
        if r.metric == "max_abs" and "per_position" in curves:
            r.extra["per_position"] = curves["per_position"]
        elif r.metric == "kl_max" and "kl_per_position" in curves:
            r.extra["kl_per_position"] = curves["kl_per_position"]
    return rows


def _na(case: Case, why: str) -> Row:
    return Row(SUITE, case.settings(), "transformers", ORACLE, "all", None, status=NA, reason=why)


def _failed(case: Case, why: str) -> Row:
    return Row(SUITE, case.settings(), "transformers", ORACLE, "all", None, status=FAIL, reason=why)


def shape_mismatch(logits: torch.Tensor, truth: torch.Tensor, tp: int) -> str:
    why = f"transformers returned logits of shape {tuple(logits.shape)}, the oracle {tuple(truth.shape)}"
    vocab = truth.shape[-1]
    if tp > 1 and vocab % tp and logits.shape[-1] == tp * (vocab // tp):
        why += (f": pretraining_tp={tp} slices lm_head into {vocab} // {tp} = {vocab // tp} rows and drops the "
                f"last {vocab % tp} vocabulary entries")
    return why


def _first_line(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


# --- non-finite logits: say why ------------------------------------------------------------------

def weight_notes(ckpt: Checkpoint, dtypes: list[str]) -> dict[str, str]:
    """dtype -> what in the weights spoils cells at that dtype ('' when nothing); float64 is the oracle."""
    notes = {}
    for dtype in ["float64", *dtypes]:
        bad = checkpoint.nonfinite_weights(ckpt.state, DTYPES[dtype])
        notes[dtype] = "; ".join(f"{k}: {v}" for k, v in list(bad.items())[:3]) + (
            f"; and {len(bad) - 3} more tensors" if len(bad) > 3 else "")
    return notes


def judged_compare(subject: torch.Tensor, truth: torch.Tensor, dtype: str, notes: dict[str, str]) -> tuple[dict, str]:
    """compare(), plus: a truth that is not finite fails the cell too (a subject that is finite
    where the oracle is not has not matched anything), and every non-finite reason says why:
    bad weights, or a dtype whose range the activations outgrew."""
    values, why = compare(subject, truth)
    truth_ok = bool(torch.isfinite(truth).all())
    if not truth_ok and not why:
        bad = int((~torch.isfinite(truth)).sum())
        why = f"non-finite float64 oracle logits: {bad} values ({'NaN' if torch.isnan(truth).any() else 'Inf'})"
    if why and (notes.get(dtype) or notes.get("float64")):
        why = f"{why}; the weights: {notes.get(dtype) or notes['float64']}"
    elif why and truth_ok and dtype in ("float16", "bfloat16"):
        top = torch.finfo(DTYPES[dtype]).max
        why = f"{why}; overflow: activations exceed {dtype}'s range (max {top:.6g}) while the float64 oracle stays finite"
    return values, why


# --- where failing cells diverge -----------------------------------------------------------------

def localise_failures(plan: Plan, rows: list[Row]) -> dict:
    """For each failing transformers group, name the first layer and op that diverge, on the
    group's first failing input; a localisation error is reported, never fatal."""
    from harness.scale.localise import first_divergence
    failing: dict[tuple, Row] = {}
    for r in rows:
        if r.subject == "transformers" and r.against == ORACLE and r.status == FAIL:
            failing.setdefault((r.case["dtype"], r.case["attn"], r.case["tp"]), r)
    if not failing:
        return {}
    by_name = {str(s): s for s in plan.inputs}
    found = []
    with HFFolder(plan.ckpt) as hf:
        for (dtype, attn, tp), r in failing.items():
            try:
                d = first_divergence(plan.ckpt, hf.path, plan.inputs[by_name[r.case["shape"]]], dtype, plan.device,
                                     attn, tp, plan.fault)
            except Exception as e:  # noqa: BLE001 - evidence gathering must not lose the verdict
                d = {"layer": None, "op": None, "error": _first_line(e)}
            found.append({"case": dict(r.case), **{k: v for k, v in d.items() if _jsonable(v)}})
    return {"first_divergence": found[0], "divergences": found}


def _jsonable(v) -> bool:
    return v is None or isinstance(v, (str, int, float, bool, list, dict))


def _progress(total: int, on: bool):
    from tqdm import tqdm
    return tqdm(total=total, desc=SUITE, unit="cell", disable=not on, file=sys.stderr)
