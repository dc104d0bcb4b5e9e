"""The logits suite: run every subject over the case matrix, measure against the float64 oracle,
judge with the tolerance policy, write results.

Flow: checkpoint -> oracle logits per input shape -> reference at each dtype (the calibrator) ->
transformers per cell -> metrics -> verdict rows -> results.csv / summary.json / report.md.

Rows are journaled group by group (the reference at a dtype; transformers at a dtype, attention
and tp), so a rerun with the same --out resumes: finished groups are read back, not rerun.
Weights with NaN/Inf, or activations that overflow a narrow dtype, fail the cells they spoil with
the cause named; they never pass and never stop the run.
"""
from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from reference_model import checkpoint

from harness.results import markdown as report
from harness.core.cases import Case, Shape, make_inputs, matrix
from harness.core.environment import environment
from harness.core.errors import InputError
from harness.core.faults import Fault
from harness.core.metrics import METRICS, compare, per_position
from harness.core.store import FAIL, JOURNAL, NA, PASS, Journal, Row, clear_results, exit_code, fingerprint, write_results
from harness.core.subjects import DTYPES, HFFolder, ReferenceSubject, TransformersSubject, attn_implementations, tp_honoured
from harness.core.tolerance import Policy

SUITE = "logits"
TRUTH = ("oracle-fp64: the reference run entirely in float64, RoPE angles included "
         "(exact math; Meta's own code and transformers compute the angles in float32)")


@dataclass
class LogitsRun:
    model: Path
    dtypes: list[str]
    attns: list[str]
    tps: list[int]
    shapes: list[Shape]
    device: str = "cpu"
    seed: int = 0
    policy: Policy | None = None
    fault: Fault | None = None
    out: Path = Path("reports/latest/logits")
    progress: bool = True
    tokens: list[list[int]] | None = None   # --tokens: the user's own ids, instead of shapes
    tokens_path: Path | None = None
    resume: bool = True   # False: forget the journal in --out and run every cell
    localise: bool = True  # name the first diverging layer/op of each failing group
    tokenizer_vocab: int | None = None   # --tokenizer: the checkpoint's vocab_size must equal it
    log: list[str] = field(default_factory=list)


def check_device(device: str) -> None:
    if device == "cpu":
        return
    m = re.fullmatch(r"cuda(?::(\d+))?", device)
    if m:
        if not torch.cuda.is_available():
            raise InputError(f"--device {device}: no CUDA device is available on this machine")
        index = int(m[1] or 0)
        if index >= torch.cuda.device_count():
            raise InputError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s)")
        return
    raise InputError(f"--device: unknown device {device!r} (cpu, cuda or cuda:N)")


def _metric_rows(case: dict, subject: str, against: str, values: dict, reason: str) -> list[Row]:
    return [Row(SUITE, case, subject, against, m, values[m], status=FAIL if reason else PASS, reason=reason)
            for m in METRICS]


def _judge(rows: list[Row], policy: Policy, dtype: str, reference: dict | None) -> list[Row]:
    for r in rows:
        tol, status, why = policy.judge(dtype, r.metric, r.value, None if reference is None else reference[r.metric])
        r.tolerance = tol
        if r.status != FAIL:
            r.status, r.reason = status, why
    return rows


def read_tokens(path: str | Path) -> list[list[int]]:
    """--tokens FILE: a JSON list of equal-length, non-empty lists of token ids (no padding in this
    suite). Ranges are checked against the model's vocabulary once the checkpoint is read."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--tokens {path}: file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"--tokens {path}: not valid JSON ({e})") from None
    if not isinstance(data, list) or not data:
        raise InputError(f"--tokens {path}: expected a non-empty JSON list of token-id lists")
    for i, row in enumerate(data):
        if not isinstance(row, list) or not row:
            raise InputError(f"--tokens {path}: [{i}]: expected a non-empty list of token ids")
        if len(row) != len(data[0]):
            raise InputError(f"--tokens {path}: [{i}]: {len(row)} ids, but [0] has {len(data[0])} "
                             f"(rows must have equal length)")
        for j, t in enumerate(row):
            if not isinstance(t, int) or isinstance(t, bool):
                raise InputError(f"--tokens {path}: [{i}][{j}]: {t!r} is not an integer token id")
    return data


def model_fingerprint(path: Path) -> list:
    """Name, size and mtime of each file in the checkpoint folder: cheap (no hashing of gigabytes)
    and changed by any rewrite, which is what deciding whether journaled rows still hold needs."""
    path = Path(path)
    return sorted([f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in path.iterdir() if f.is_file())


def _inputs(run: LogitsRun, vocab: int) -> dict[Shape, torch.Tensor]:
    if run.tokens is None:
        return {s: make_inputs(s, vocab, run.seed) for s in run.shapes}
    for i, row in enumerate(run.tokens):
        for j, t in enumerate(row):
            if not 0 <= t < vocab:
                raise InputError(f"--tokens {run.tokens_path}: [{i}][{j}]: token id {t} is out of range "
                                 f"(the model's vocabulary is 0..{vocab - 1})")
    ids = torch.tensor(run.tokens, dtype=torch.long)
    return {Shape(*ids.shape): ids}


def _weight_notes(ckpt, dtypes: list[str]) -> dict[str, str]:
    """dtype -> what in the weights spoils cells at that dtype ('' when nothing); float64 is the oracle."""
    notes = {}
    for dtype in ["float64", *dtypes]:
        bad = checkpoint.nonfinite_weights(ckpt.state, DTYPES[dtype])
        notes[dtype] = "; ".join(f"{k}: {v}" for k, v in list(bad.items())[:3]) + (
            f"; and {len(bad) - 3} more tensors" if len(bad) > 3 else "")
    return notes


def _explain(why: str, dtype: str, truth_ok: bool, notes: dict[str, str]) -> str:
    """Say why logits are not finite: bad weights, or a dtype whose range the activations outgrew."""
    if not why:
        return why
    if notes.get(dtype) or notes.get("float64"):
        return f"{why}; the weights: {notes.get(dtype) or notes['float64']}"
    if truth_ok and dtype in ("float16", "bfloat16"):
        top = torch.finfo(DTYPES[dtype]).max
        return f"{why}; overflow: activations exceed {dtype}'s range (max {top:.6g}) while the float64 oracle stays finite"
    return why


def _compare(subject: torch.Tensor, truth: torch.Tensor, dtype: str, notes: dict[str, str]) -> tuple[dict, str]:
    """compare(), plus: a truth that is not finite fails the cell too (a subject that is finite
    where the oracle is not has not matched anything), and every non-finite reason says why."""
    values, why = compare(subject, truth)
    truth_ok = bool(torch.isfinite(truth).all())
    if not truth_ok and not why:
        bad = int((~torch.isfinite(truth)).sum())
        why = f"non-finite float64 oracle logits: {bad} values ({'NaN' if torch.isnan(truth).any() else 'Inf'})"
    return values, _explain(why, dtype, truth_ok, notes)


def run_logits(run: LogitsRun) -> int:
    check_device(run.device)
    ckpt = checkpoint.load(run.model, vocab_size=run.tokenizer_vocab)
    policy = run.policy
    env = environment(run.device)
    support = env["dtype_support"]
    inputs = _inputs(run, ckpt.args.vocab_size)   # bad token ids are input errors: before any write
    shapes = list(inputs)
    notes = _weight_notes(ckpt, run.dtypes)
    cells = matrix(run.dtypes, run.attns, run.tps, shapes, run.device)

    # Everything that decides a group's rows; a journaled group is reused only when all of it matches.
    settings = {
        "suite": SUITE, "model": model_fingerprint(run.model), "seed": run.seed,
        "inputs": fingerprint([inputs[s].tolist() for s in shapes]),
        "policy": {"version": policy.version, "sha": fingerprint(policy.path.read_text(encoding="utf-8"))},
        "plant": run.fault.name if run.fault else None,
        "environment": {k: env[k] for k in ("torch", "transformers", "device", "torch_threads", "harness_commit")},
    }
    clear_results(run.out)
    if not run.resume and (run.out / JOURNAL).exists():
        (run.out / JOURNAL).unlink()
    journal = Journal.open(run.out)
    if journal.dropped:
        run.log.append(f"note: {journal.dropped} unreadable line(s) in {journal.path} dropped; their groups run again")

    started = time.perf_counter()
    state = {"truth": None, "hf": None}

    def truth() -> dict[Shape, torch.Tensor]:
        if state["truth"] is None:
            oracle = ReferenceSubject(ckpt, "float64", run.device, oracle=True)
            state["truth"] = {s: oracle.logits(ids).cpu() for s, ids in inputs.items()}
        return state["truth"]

    def hf() -> HFFolder:
        if state["hf"] is None:
            state["hf"] = HFFolder(ckpt)
        return state["hf"]

    def key_of(group: dict) -> str:
        return fingerprint({"run": settings, "group": group})

    rows: list[Row] = []
    bar = tqdm(total=len(run.dtypes) * len(shapes) + len(cells), desc="logits", unit="cell",
               disable=not run.progress, file=sys.stderr)
    try:
        for dtype in run.dtypes:
            dcells = [c for c in cells if c.dtype == dtype]
            if not support.get(dtype, False):
                why = f"{dtype} does not run on {run.device}"
                rows += [Row(SUITE, c.settings(), "transformers", "oracle-fp64", "all", None, status=NA, reason=why)
                         for c in dcells]
                bar.update(len(shapes) + len(dcells))
                continue
            ref_group = {"subject": "reference", "dtype": dtype}
            tf_groups = [{"subject": "transformers", "dtype": dtype, "attn": a, "tp": t}
                         for a, t in sorted({(c.attn, c.tp) for c in dcells}, key=str)]
            done = {key_of(g): journal.get(key_of(g)) for g in [ref_group, *tf_groups]}
            ref_logits: dict[Shape, torch.Tensor] = {}
            ref_metrics: dict[Shape, dict] = {}
            if any(v is None for v in done.values()):   # something to compute: the reference calibrates it
                reference = ReferenceSubject(ckpt, dtype, run.device)
                ref_rows = []
                for shape in shapes:
                    ref_logits[shape] = reference.logits(inputs[shape]).cpu()
                    values, why = _compare(ref_logits[shape], truth()[shape], dtype, notes)
                    ref_metrics[shape] = values
                    case = {"dtype": dtype, "attn": "-", "tp": "-", "shape": str(shape), "device": run.device}
                    ref_rows += _attach_positions(
                        _judge(_metric_rows(case, "reference", "oracle-fp64", values, why), policy, dtype, None),
                        ref_logits[shape], truth()[shape])
                del reference
                if done[key_of(ref_group)] is None:
                    journal.append(key_of(ref_group), ref_group, ref_rows)
                    done[key_of(ref_group)] = ref_rows
            rows += done[key_of(ref_group)]
            bar.update(len(shapes))
            for g in tf_groups:
                group = [c for c in dcells if (c.attn, c.tp) == (g["attn"], g["tp"])]
                if done[key_of(g)] is None:
                    got = _run_transformers(run, hf, dtype, g["attn"], g["tp"], group, inputs, truth,
                                            ref_logits, ref_metrics, policy, notes)
                    journal.append(key_of(g), g, got)
                    done[key_of(g)] = got
                rows += done[key_of(g)]
                bar.update(len(group))
    finally:
        bar.close()
        if state["hf"] is not None:
            state["hf"].close()

    if journal.reused:
        run.log.append(f"resumed: {len(journal.reused)} finished cell group(s) read from {journal.path}, not rerun")
    summary_extra = {
        "model": {"path": str(run.model), "format": ckpt.source, "shards": ckpt.n_shards,
                  "args": {k: v for k, v in vars(ckpt.args).items()}},
        "truth": TRUTH,
        "seed": run.seed,
        "inputs": {"tokens": str(run.tokens_path) if run.tokens_path else None,
                   "shapes": [str(s) for s in shapes], "sha": settings["inputs"]},
        "policy": {"path": str(policy.path), "version": policy.version},
        "plant": run.fault.name if run.fault else None,
        "tokenizer_vocab": run.tokenizer_vocab,
        "weights": {d: n for d, n in notes.items() if n} or None,
    }
    if run.localise:
        summary_extra.update(_localise_failures(run, ckpt, rows, inputs))
    timing = {"wall_seconds": round(time.perf_counter() - started, 3),
              "groups_resumed": len(journal.reused)}
    summary = write_results(run.out, SUITE, rows, env, summary_extra, timing=timing)
    report.write_markdown(run.out / "report.md", summary)
    report.print_console(summary)
    return exit_code(rows)


def _attach_positions(rows: list[Row], logits: torch.Tensor, truth: torch.Tensor) -> list[Row]:
    """Per-position curves ride on the max_abs and kl_max rows (for the report's plots)."""
    curves = per_position(logits, truth)
    for r in rows:
        if r.metric == "max_abs" and "per_position" in curves:
            r.extra["per_position"] = curves["per_position"]
        elif r.metric == "kl_max" and "kl_per_position" in curves:
            r.extra["kl_per_position"] = curves["kl_per_position"]
    return rows


def _localise_failures(run: LogitsRun, ckpt, rows: list[Row], inputs: dict) -> dict:
    """For each failing transformers group, name the first layer and op that diverge (issue: "where?").

    Runs on the group's smallest failing input; a localisation error is reported, never fatal.
    """
    from harness.scale.localise import first_divergence
    failing: dict[tuple, Row] = {}
    for r in rows:
        if r.subject == "transformers" and r.against == "oracle-fp64" and r.status == FAIL:
            key = (r.case["dtype"], r.case["attn"], r.case["tp"])
            failing.setdefault(key, r)
    if not failing:
        return {}
    found = []
    by_name = {str(s): s for s in inputs}
    hf = HFFolder(ckpt)
    try:
        for (dtype, attn, tp), r in failing.items():
            try:
                d = first_divergence(ckpt, hf.path, inputs[by_name[r.case["shape"]]], dtype, run.device,
                                     attn, tp, run.fault)
            except Exception as e:  # noqa: BLE001 - evidence gathering must not lose the verdict
                d = {"layer": None, "op": None, "error": f"{type(e).__name__}: {e}"}
            found.append({"case": dict(r.case), **{k: v for k, v in d.items() if _jsonable(v)}})
    finally:
        hf.close()
    return {"first_divergence": found[0], "divergences": found}


def _jsonable(v) -> bool:
    return v is None or isinstance(v, (str, int, float, bool, list, dict))


def _run_transformers(run, hf, dtype, attn, tp, group: list[Case], inputs, truth, ref_logits, ref_metrics,
                      policy, notes):
    """One (dtype, attn, tp) group: hf and truth are callables, so nothing loads for an n/a group."""
    rows = []
    why_na = attn_implementations(run.device).get(attn, f"unknown attention implementation {attn}")
    if not why_na and tp > 1 and not tp_honoured():
        why_na = "pretraining_tp is a no-op in this transformers release (live only in 4.31-4.46)"
    if run.fault is not None and dtype not in run.fault.visible_at:
        run.log.append(f"note: --plant {run.fault.name} changes nothing at {dtype}")
    if why_na:
        return [Row(SUITE, c.settings(), "transformers", "oracle-fp64", "all", None, status=NA, reason=why_na)
                for c in group]
    try:
        subject = TransformersSubject(hf().path, dtype, run.device, attn, tp, run.fault)
    except InputError:
        raise
    except Exception as e:  # a release that cannot build this cell fails it, naming the error
        why = f"transformers failed to load: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
        return [Row(SUITE, c.settings(), "transformers", "oracle-fp64", "all", None, status=FAIL, reason=why)
                for c in group]
    for case in group:
        try:
            logits = subject.logits(inputs[case.shape]).cpu()
        except Exception as e:
            why = f"transformers forward failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
            rows.append(Row(SUITE, case.settings(), "transformers", "oracle-fp64", "all", None, status=FAIL, reason=why))
            continue
        values, why = _compare(logits, truth()[case.shape], dtype, notes)
        rows += _attach_positions(_judge(_metric_rows(case.settings(), "transformers", "oracle-fp64", values, why),
                                         policy, dtype, ref_metrics[case.shape]), logits, truth()[case.shape])
        pair, why = compare(logits, ref_logits[case.shape])
        for m in METRICS:
            rows.append(Row(SUITE, case.settings(), "transformers", "reference", m, pair[m], status="info",
                            reason=why or "informational: same dtype, no truth"))
    return rows
