"""The model-parallel suite: does ``pretraining_tp = k`` bring transformers closer to the original
logits that Meta's code computed at model-parallel degree k?

transformers' docs: "Setting this to a value different than 1 will activate the more accurate
but slower computation of the linear layers, which should better match the original logits."

For each dtype and degree k the suite computes
- the *original logits*: the weights re-sharded into k ``consolidated.NN.pth`` files and run by
  ``reference_model.parallel`` (emulated ranks by default, real gloo/NCCL ranks with ``--ranks real``),
- the subject (transformers by default; ``--subject`` any kind that takes the tp axis, e.g.
  ``transformers:gguf=F32``) with ``pretraining_tp = 1`` and ``pretraining_tp = k``,
- the float64 oracle (exact math),
and measures every subject against both truths. The claim holds at a cell when tp=k is nearer the
original than tp=1 (by rel_l2); ``factor`` = rel_l2(tp=1) / rel_l2(tp=k) says by how much.
Rows are ``info`` (findings, not gates), except the emulation-vs-real check, which is judged.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from harness.core import compat, inputs, resources
from harness.core.cases import Shape, make_inputs
from harness.core.checkpoints import HFFolder, open_model
from harness.core.datafiles import suite_data
from harness.core.errors import InputError
from harness.core.metrics import METRICS, compare
from harness.core.store import FAIL, INFO, NA, PASS, Row
from harness.core.subjects import DTYPES, ORACLE, ReferenceSubject
from harness.core.suite import Context, Part, Result, Suite
from harness.results.markdown import md_escape
from reference_model import checkpoint
from reference_model.checkpoint import Checkpoint
from reference_model.errors import CheckpointError
from reference_model.parallel import check_degree, distributed_logits, emulated_logits
from harness.subjects import DEFAULT as SUBJECT   # the implementation judged by default
from harness.subjects import NotInstalledError, Spec, add_offering, factory, offering
from harness.subjects.common import source_of

# what this command needs of a subject (--subject): a kind that takes the tp axis, pretraining_tp
MP_NEEDS = "the tp axis (pretraining_tp on its model's config)"

SUITE = "mp"
KEY_METRIC = "rel_l2"
CLAIM = ("pretraining_tp > 1 activates the more accurate but slower computation of the linear layers, "
         "which should better match the original logits (transformers' LlamaConfig docs)")


class MP(Suite):
    name = SUITE
    help = "pretraining_tp vs the original model-parallel logits"

    def add_arguments(self, p) -> None:
        add_offering(p, self.name, MP_NEEDS, own="attn and tp")
        p.add_argument("--model", help="Meta or HF folder; default: embedded model")
        p.add_argument("--degrees", type=inputs.csv, help="model-parallel degrees (default 1,2,4,8)")
        p.add_argument("--dtypes", type=inputs.csv, help="comma list of float32,bfloat16,float16 (default: all three)")
        p.add_argument("--shapes", type=inputs.csv, help="BATCHxSEQ list (default 1x64)")
        p.add_argument("--attn", default="eager", help="transformers attention implementation (default: eager)")
        p.add_argument("--ranks", default="emulated", choices=("emulated", "real"),
                       help="original logits from the in-process emulation or real torch.distributed ranks")
        p.add_argument("--device", default="cpu")
        p.add_argument("--seed", default="0")

    def run(self, a, ctx: Context) -> Result:
        spec = offering(a.subject, self.name, "tp", MP_NEEDS, own=("attn", "tp"))
        d = suite_data(SUITE)["defaults"]
        device = inputs.device(a.device)
        attn = inputs.choice("--attn", a.attn, inputs.KNOWN_ATTN)
        why = compat.attn_reason(attn, device)
        if why:
            raise InputError(f"--attn {attn}: {why}")
        folder = open_model(a.model)
        dtypes = inputs.choices("--dtypes", a.dtypes if a.dtypes is not None else d["dtypes"], inputs.KNOWN_DTYPES)
        shapes = inputs.shapes("--shapes", a.shapes if a.shapes is not None else d["shapes"])
        ctx.check_memory(resources.logits_run(folder.args, dtypes, shapes, folder.stored_bytes), device)
        run = MPRun(ckpt=folder.load(),
                    degrees=inputs.positive_ints("--degrees", a.degrees if a.degrees is not None
                                                 else [str(k) for k in d["degrees"]], 64),
                    dtypes=dtypes, shapes=shapes,
                    attn=attn, ranks=a.ranks, device=device, seed=inputs.seed(a.seed), folder=folder, subject=spec)
        return run_mp(run)


@dataclass
class MPRun:
    ckpt: Checkpoint
    degrees: list[int]
    dtypes: list[str]
    shapes: list[Shape]
    attn: str = "eager"
    ranks: str = "emulated"          # or "real": torch.distributed ranks, one process per shard
    device: str = "cpu"
    seed: int = 0
    notes: list[str] = field(default_factory=list)
    folder: Any = None                # harness.core.checkpoints.ModelFolder: the subject's Source
    subject: Spec = field(default_factory=lambda: Spec(SUBJECT))


def _rows(case: dict, subject: str, against: str, values: dict, why: str) -> list[Row]:
    return [Row(SUITE, case, subject, against, m, values[m], status=INFO, reason=why) for m in METRICS]


def _original(run: MPRun, mp_path: Path, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    if run.ranks == "real":
        return distributed_logits(mp_path, ids, [DTYPES[d] for d in run.dtypes], device=run.device)
    return {d: emulated_logits(mp_path, ids, DTYPES[d], run.device) for d in run.dtypes}


def _rank_check(run: MPRun, mp_path: Path, k: int, ids: torch.Tensor, real: dict, shape: Shape) -> list[Row]:
    """Real ranks vs the emulation: at most twice the rounding of the emulation itself (its distance
    from the same sharded forward in float64). Not bit-identical even at k = 2, where a two-term
    sum has no order: each rank is its own process, and its matmul kernels may block the partial
    products differently (seen: 2.1e-06 at float32 on a 2-core machine)."""
    rows = []
    for dtype in run.dtypes:
        emu = emulated_logits(mp_path, ids, DTYPES[dtype], run.device)
        gap = (real[dtype] - emu).abs().max().item()
        tol = 2 * (emu.double() - emulated_logits(mp_path, ids, torch.float64, run.device)).abs().max().item()
        case = {"dtype": dtype, "degree": k, "tp": "-", "shape": str(shape), "attn": "-"}
        status = PASS if gap <= tol else FAIL
        rows.append(Row(SUITE, case, "mp-real-ranks", "mp-emulated", "max_abs", gap, tolerance=tol, status=status,
                        reason="" if status == PASS else "real ranks and emulation disagree beyond reduction rounding"))
    return rows


class Unmeasured(Exception):
    """The subject gave no logits at this (dtype, tp): its cells get ``status`` with this reason."""

    def __init__(self, status: str, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


class _HF:
    """The subject's logits per (dtype, tp), each model built once through the registry; ``who``:
    the first built subject's settings and provenance, for the summary."""

    def __init__(self, run: MPRun, source, inputs: dict):
        self.run, self.source, self.inputs, self.done = run, source, inputs, {}
        self.who: dict = {}

    def __call__(self, dtype: str, tp: int) -> dict[Shape, torch.Tensor]:
        if (dtype, tp) not in self.done:
            self.done[(dtype, tp)] = self._measure(dtype, tp)
        got = self.done[(dtype, tp)]
        if isinstance(got, Unmeasured):
            raise got
        return got

    def _measure(self, dtype: str, tp: int):
        spec = self.run.subject
        options = {**spec.options, "attn": self.run.attn, "tp": str(tp)}
        try:
            subject = factory(spec)(self.source, dtype, self.run.device, options)
        except NotInstalledError as e:
            return Unmeasured(NA, str(e))
        except InputError:
            raise
        except Exception as e:   # a kind that cannot run at this tp fails its cells, naming the error
            return Unmeasured(FAIL, f"{spec.label()} failed to load at tp={tp}: {type(e).__name__}: {e}")
        try:
            self.who = self.who or {"label": spec.label(), "settings": subject.settings(),
                                    "provenance": subject.provenance()}
            return {s: subject.forward(ids).float().cpu() for s, ids in self.inputs.items()}
        except Exception as e:
            return Unmeasured(FAIL, f"{spec.label()} failed at tp={tp}: {type(e).__name__}: {e}")
        finally:
            subject.close()


def run_mp(run: MPRun) -> Result:
    ckpt, tp_live, started = run.ckpt, compat.tp_honoured(), time.perf_counter()
    inputs_ = {s: make_inputs(s, ckpt.args.vocab_size, run.seed) for s in run.shapes}
    oracle = ReferenceSubject(ckpt, "float64", run.device, oracle=True)
    truth = {s: oracle.logits(ids).cpu() for s, ids in inputs_.items()}
    del oracle
    rows: list[Row] = []
    claims: list[dict] = []
    with HFFolder(ckpt) as hf, tempfile.TemporaryDirectory(prefix="llama-parity-mp-") as tmp:
        hf_logits = _HF(run, source_of(run.folder, ckpt, hf_path=lambda: hf.path), inputs_)
        for k in run.degrees:
            try:
                check_degree(ckpt.args, k, str(ckpt.path))
            except CheckpointError as e:
                rows += [Row(SUITE, {"dtype": d, "degree": k, "tp": "-", "shape": str(s), "attn": run.attn},
                             run.subject.label(), against, "all", None, status=NA, reason=f"degree {k}: {e.key} = {e.problem}")
                         for d in run.dtypes for s in run.shapes for against in ("mp-original", ORACLE)]
                continue
            mp_path = checkpoint.save_meta(Path(tmp) / f"mp{k}", ckpt.args, ckpt.state, n_shards=k)
            for shape, ids in inputs_.items():
                original = _original(run, mp_path, ids)
                if run.ranks == "real":
                    rows += _rank_check(run, mp_path, k, ids, original, shape)
                for dtype in run.dtypes:
                    got, claim = _degree_rows(run, k, shape, dtype, original[dtype], truth[shape], hf_logits, tp_live)
                    rows += got
                    claims += claim
    extra = {
        "model": {"path": str(ckpt.path), "format": ckpt.source, "args": dict(vars(ckpt.args))},
        "claim": CLAIM, "key_metric": KEY_METRIC, "ranks": run.ranks, "attn": run.attn, "seed": run.seed,
        "pretraining_tp_live": tp_live, "claims": claims, "subject": hf_logits.who or {"label": run.subject.label()},
    }
    part = Part(SUITE, rows, extra, sections=[("Claim", claim_markdown(extra, rows))], device=run.device,
                timing={"wall_seconds": round(time.perf_counter() - started, 1)})
    return Result([part], run.notes)


def _degree_rows(run: MPRun, k: int, shape: Shape, dtype: str, original, truth, hf_logits, tp_live: bool):
    """The original logits and the subject at tp = 1 and tp = k, each against both truths."""
    case = {"dtype": dtype, "degree": k, "tp": "-", "shape": str(shape), "attn": "-"}
    values, why = compare(original, truth)
    rows = _rows(case, "mp-original", ORACLE, values, why)
    dist = {}
    for tp in dict.fromkeys((1, k)):
        case = {"dtype": dtype, "degree": k, "tp": tp, "shape": str(shape), "attn": run.attn}
        label = run.subject.label()
        if tp > 1 and not tp_live:
            rows += [Row(SUITE, case, label, against, "all", None, status=NA, reason=compat.TP_NOOP)
                     for against in ("mp-original", ORACLE)]
            continue
        try:
            logits = hf_logits(dtype, tp)[shape]
        except Unmeasured as e:
            rows += [Row(SUITE, case, label, against, "all", None, status=e.status, reason=e.reason)
                     for against in ("mp-original", ORACLE)]
            continue
        v_orig, why = compare(logits, original)
        v_truth, why_t = compare(logits, truth)
        rows += _rows(case, label, "mp-original", v_orig, why)
        rows += _rows(case, label, ORACLE, v_truth, why_t)
        dist[tp] = (v_orig[KEY_METRIC], v_truth[KEY_METRIC])
    claims = [_claim(dtype, k, shape, dist[1], dist[k])] if k > 1 and len(dist) == 2 else []
    return rows, claims


def _claim(dtype: str, k: int, shape: Shape, tp1: tuple[float, float], tpk: tuple[float, float]) -> dict:
    (o1, t1), (ok, tk) = tp1, tpk
    return {
        "dtype": dtype, "degree": k, "shape": str(shape),
        "tp1_vs_original": o1, "tpk_vs_original": ok,
        "tp1_vs_oracle": t1, "tpk_vs_oracle": tk,
        "holds": ok < o1,
        # > 1: tp=k is that many times nearer the original logits; inf when it reproduces them exactly
        "factor": (o1 / ok) if ok > 0 else float("inf"),
        "more_accurate": tk < t1,
    }


def _fmt(x: float) -> str:
    return "inf" if x == float("inf") else f"{x:.3g}"


def claim_markdown(summary: dict, rows: list[Row]) -> str:
    """The claim, the per-cell table of distances and the real-ranks check, for report.md."""
    lines = [
        f"Claim tested: *{summary['claim']}*.",
        "",
        f"Original logits: Meta's model-parallel forward ({summary['ranks']} ranks). Distances are "
        f"`{summary['key_metric']}` of the logits; attention `{summary['attn']}`; "
        f"`pretraining_tp` live in this release: **{summary['pretraining_tp_live']}**. "
        f"Subject: `{md_escape(summary.get('subject', {}).get('label', SUBJECT))}`.",
        "",
    ]
    if summary["claims"]:
        lines += ["| dtype | degree | shape | tp=1 vs original | tp=k vs original | holds | factor | "
                  "tp=1 vs oracle | tp=k vs oracle |", "|---|---|---|---|---|---|---|---|---|"]
        for c in summary["claims"]:
            lines.append(f"| {c['dtype']} | {c['degree']} | {c['shape']} | {_fmt(c['tp1_vs_original'])} | "
                         f"{_fmt(c['tpk_vs_original'])} | {'yes' if c['holds'] else 'no'} | {_fmt(c['factor'])} | "
                         f"{_fmt(c['tp1_vs_oracle'])} | {_fmt(c['tpk_vs_oracle'])} |")
    else:
        lines.append("No cell could test the claim here (pretraining_tp is not live, or no degree > 1 applies).")
    na = sorted({r.reason for r in rows if r.status == NA})
    if na:
        lines += ["", "Not applicable:"] + [f"- {md_escape(r)}" for r in na]
    checks = [r for r in rows if r.subject == "mp-real-ranks"]
    if checks:
        lines += ["", "Real ranks vs emulation (max |dlogit|):"]
        lines += [f"- {r.case['dtype']} degree {r.case['degree']}: {r.value:.3g} "
                  f"(tolerance {r.tolerance:.3g}, {r.status})" for r in checks]
    return "\n".join(lines) + "\n"
