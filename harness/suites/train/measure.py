"""One run of the train suite: the oracle's gradients once per batch, then per dtype and cast the
reference (the calibrator) and every group of the subject, judged cell by cell."""
from __future__ import annotations

import json
import math
import time

import torch

from harness.core import compat, deviations
from harness.core.checkpoints import HFFolder
from harness.core.environment import environment
from harness.core.errors import InputError
from harness.core.findings import Mechanism
from harness.core.store import FAIL, INFO, NA, PASS, Row, fingerprint
from harness.core.subjects import DTYPES, ORACLE, TRUTH
from harness.core.suite import Context, Part, Result
from harness.subjects import Cannot, module_of
from harness.subjects.common import source_of
from harness.suites.train import SUITE, Plan
from harness.suites.train import grads as G
from harness.suites.train.batches import Batch, naive_left_labels
from harness.suites.train.lora import LORA_GC
from harness.suites.train.metrics import EXTREMES, GATED, bitwise_diff, compare, loss_noise, underflow
from reference_model.checkpoint import build_model

LEFT_HAZARD = Mechanism(
    "left-pad-label-hazard",
    "left-padded rows whose labels mask only the pads ask the last pad to predict the first real token: "
    "a loss term the per-row truth does not have (fix: labels -100 on the first real token too)",
    reproduction="labels = input_ids.masked_fill(attention_mask == 0, -100) on a left-padded batch",
    known=True)


def judge(policy, dtype: str, metric: str, value: float, ref: float | None,
          noise: float | None = None) -> tuple[float, str, str]:
    """value <= min(abs, max(floor, f x ref, noise_factor x noise)); f is max_factor for one-draw values,
    factor for means; noise (the loss only) is the reference's own noise scale, see metrics.loss_noise."""
    lim = policy.limit(dtype, metric)
    f = lim.max_factor if metric in EXTREMES and lim.max_factor is not None else lim.factor
    tol = lim.abs if ref is None or not math.isfinite(ref) else min(lim.abs, max(lim.floor, f * ref))
    if ref is not None and noise is not None and lim.noise_factor is not None and math.isfinite(noise):
        tol = min(lim.abs, max(tol, lim.noise_factor * noise))
    if value is None or not math.isfinite(value):
        return tol, FAIL, "non-finite value"
    return (tol, PASS, "") if value <= tol else (tol, FAIL, f"{value:.3g} > {tol:.3g}")


class Measure:
    def __init__(self, plan: Plan, ctx: Context):
        self.plan, self.ctx = plan, ctx
        self.env = environment(plan.device)
        self._oracle = None
        self._truth: dict[str, G.Grads] = {}
        self.oracle_seconds = 0.0
        self._hf: HFFolder | None = None
        self._source = None                      # harness.subjects.Source, made on first use
        self.seconds: dict[str, float] = {}     # group -> wall seconds (timing.json; the cost benchmark)
        self.label = plan.subject.label()        # the rows' subject: the spec as given
        self.settings = {
            "suite": SUITE, "model": plan.folder.fingerprint(), "seed": plan.seed,
            "inputs": fingerprint([[b.key(), b.ids.tolist(), b.mask.tolist(), b.labels.tolist()]
                                   for b in plan.batches]),
            "policy": {"version": plan.policy.version,
                       "sha": fingerprint(plan.policy.path.read_text(encoding="utf-8"))},
            "plant": plan.fault.name if plan.fault else None,
            "environment": {k: self.env[k] for k in ("torch", "transformers", "device", "torch_threads",
                                                     "harness_commit", "harness_source_sha256")},
        }

    # -- shared ---------------------------------------------------------------------------------
    def truth(self, batch: Batch) -> G.Grads:
        if batch.key() not in self._truth:
            if self._oracle is None:
                self._oracle = build_model(self.plan.ckpt, torch.float64, self.plan.device, rope_dtype=torch.float64)
            t = time.perf_counter()
            self._truth[batch.key()] = G.oracle_grads(self._oracle, batch, self.plan.device)
            self.oracle_seconds += time.perf_counter() - t
        return self._truth[batch.key()]

    def hf_path(self):
        if self._hf is None:
            self._hf = HFFolder(self.plan.ckpt)
        return self._hf.path

    def module(self, dtype: str, attn: str = "eager", tp: int = 1):
        """The subject's torch module at a cell, built through the registry (harness.subjects) with the
        cell's attention, pretraining_tp and --plant; Cannot(why) where it cannot train at its options."""
        plan = self.plan
        if self._source is None:    # hashes the weights once
            self._source = source_of(plan.folder, plan.ckpt, hf_path=self.hf_path, find_tokenizer=False)
        cell = {"attn": attn, "tp": str(tp), **({"plant": plan.fault} if plan.fault else {})}
        return module_of(plan.subject, self._source, dtype, plan.device, cell, "train")

    def key(self, group: dict) -> str:
        return fingerprint({"run": self.settings, "group": group})

    def cached(self, group: dict, compute) -> list[Row]:
        journal = self.ctx.journal()
        rows = journal.get(self.key(group))
        if rows is None:
            t = time.perf_counter()
            rows = compute()
            self.seconds[json.dumps(group, sort_keys=True, default=str)] = round(time.perf_counter() - t, 3)
            journal.append(self.key(group), group, rows)
        return rows

    def case(self, dtype, cast, attn, tp, gc, batch: Batch | str, shape: str = "") -> dict:
        name, shape = (batch, shape) if isinstance(batch, str) else (batch.name, batch.shape)
        return {"dtype": dtype, "cast": cast, "attn": attn, "tp": tp, "checkpointing": gc, "input": name,
                "shape": shape, "device": self.plan.device}

    # -- the run ----------------------------------------------------------------------------------
    def run(self) -> Result:
        plan, started = self.plan, time.perf_counter()
        support = self.env["dtype_support"]
        rows: list[Row] = []
        cells = [(d, c) for d in plan.dtypes for c in plan.casts if not (c == "autocast" and d == "float32")]
        groups = [(a, t) for a in plan.attns for t in plan.tps]
        try:
            for dtype, cast in cells:
                if not support.get(dtype, False):
                    rows += [self.na(self.case(dtype, cast, a, t, "off", b), f"{dtype} does not run on {plan.device}")
                             for a, t in groups for b in plan.batches]
                    continue
                ref_group = {"subject": "reference", "dtype": dtype, "cast": cast}
                ref_rows = self.cached(ref_group, lambda: self.reference_rows(dtype, cast))
                rows += ref_rows
                calib = {(r.case["input"], r.metric): r.value for r in ref_rows if r.status != INFO}
                calib.update({(r.case["input"], "loss_noise"): r.extra["loss_noise"] for r in ref_rows
                              if r.metric == "loss_rel_err" and r.extra.get("loss_noise") is not None})
                for attn, tp in groups:
                    g = {"subject": self.label, "dtype": dtype, "cast": cast, "attn": attn, "tp": tp,
                         "checkpointing": plan.checkpointing}
                    rows += self.cached(g, lambda: self.subject_rows(dtype, cast, attn, tp, calib))
            if plan.accum:
                from harness.suites.train.accumulate import accumulation_rows
                g = {"subject": "trainer", "accum": plan.data["accum"]}
                rows += self.cached(g, lambda: accumulation_rows(self))
            if plan.steps:
                from harness.suites.train.steps import steps_rows
                g = {"subject": "steps", "steps": plan.data["steps"], "dtypes": plan.dtypes}
                rows += self.cached(g, lambda: steps_rows(self))
            if plan.lora:
                from harness.suites.train.lora import lora_rows, peft_missing
                g = {"subject": "peft", "lora": plan.data["lora"], "dtypes": plan.dtypes,
                     "checkpointing": plan.checkpointing, "peft": peft_missing() or _peft_release()}
                rows += self.cached(g, lambda: lora_rows(self))
        finally:
            if self._hf is not None:
                self._hf.close()
        journal = self.ctx.journal()
        if journal.reused:
            self.ctx.note(f"resumed: {len(journal.reused)} finished group(s) read from {journal.path}, not rerun")
        from harness.suites.train.report import sections
        # the user's --known entries settle what they accept; a bare --strict (every known name) gates them too
        from harness.suites.train.accumulate import KNOWN_NAMES
        rows = deviations.settle(rows, plan.known, strict=plan.strict >= frozenset(KNOWN_NAMES))
        used = {r.extra["known"]["name"] for r in rows if isinstance(r.extra, dict) and "known" in r.extra}
        extra = self.summary_extra()
        extra["policy"].update(deviations.user_summary(plan.known, used))
        timing = {"wall_seconds": round(time.perf_counter() - started, 3), "groups_resumed": len(journal.reused),
                  "oracle_seconds": round(self.oracle_seconds, 3), "groups": self.seconds}
        return Result([Part(SUITE, rows, extra, sections=sections(rows), timing=timing, device=plan.device,
                            mechanisms={LEFT_HAZARD.key: LEFT_HAZARD, LORA_GC.key: LORA_GC})], plan.notes + self.ctx.notes)

    # -- the reference at the working dtype: the calibrator ------------------------------------------
    def reference_rows(self, dtype: str, cast: str) -> list[Row]:
        plan = self.plan
        model = build_model(plan.ckpt, DTYPES["float32" if cast == "autocast" else dtype], plan.device)
        rows = []
        for b in plan.batches:
            truth = self.truth(b)
            got = G.reference_grads(model, b, plan.device, dtype if cast == "autocast" else None,
                                    scaled=dtype == "float16")
            rows += self.judged(self.case(dtype, cast, "-", "-", "off", b), "reference", got, truth, dtype, None)
            if dtype == "float16" and cast == "load" and b is plan.batches[0]:
                rows += self.unscaled_rows(self.case(dtype, cast, "-", "-", "off", b), "reference",
                                           G.reference_grads(model, b, plan.device), truth)
        return rows

    # -- the subject --------------------------------------------------------------------------------
    def not_applicable(self, attn: str, tp: int) -> str:
        why = compat.attn_reason(attn, self.plan.device)
        if not why and tp > 1 and not compat.tp_honoured():
            why = compat.TP_NOOP
        return why

    def subject_rows(self, dtype: str, cast: str, attn: str, tp: int, calib: dict) -> list[Row]:
        plan = self.plan
        why = self.not_applicable(attn, tp)
        if why:
            return [self.na(self.case(dtype, cast, attn, tp, "off", b), why) for b in plan.batches]
        try:
            model = self.module("float32" if cast == "autocast" else dtype, attn, tp)
        except InputError:
            raise
        except Cannot as e:
            return [self.na(self.case(dtype, cast, attn, tp, "off", b), str(e)) for b in plan.batches]
        except Exception as e:   # a release that cannot build this cell fails it, naming the error
            return [self.failed(self.case(dtype, cast, attn, tp, "off", b),
                                f"{plan.subject.kind} failed to load: {_first(e)}") for b in plan.batches]
        autocast = dtype if cast == "autocast" else None
        scaled = dtype == "float16"
        rows, plain = [], {}
        for b in plan.batches:
            case = self.case(dtype, cast, attn, tp, "off", b)
            try:
                got = G.transformers_grads(model, b, plan.device, autocast, scaled, plan.fault)
            except Exception as e:
                rows.append(self.failed(case, f"{plan.subject.kind} backward failed: {_first(e)}"))
                continue
            plain[b.key()] = got
            rows += self.judged(case, self.label, got, self.truth(b), dtype, calib, b)
            if b.kind == "left":
                rows += self.left_hazard(model, b, case, autocast, scaled)
            if dtype == "float16" and cast == "load" and b is plan.batches[0]:
                rows += self.unscaled_rows(case, self.label, G.transformers_grads(model, b, plan.device,
                                                                                  fault=plan.fault), self.truth(b))
            if dtype != "float32" and b is plan.batches[0]:
                rows.append(self.peak_row(model, b, case, autocast, got))
        for gc in plan.checkpointing:
            if gc != "off":
                rows += self.checkpointed(model, gc, dtype, cast, attn, tp, autocast, scaled, plain, calib)
        return rows

    def checkpointed(self, model, gc, dtype, cast, attn, tp, autocast, scaled, plain, calib) -> list[Row]:
        """The first batch with gradient checkpointing on: the same arithmetic recomputed, so the loss and
        every gradient must equal the unchecked cell's bit for bit; judged against the oracle too."""
        plan = self.plan
        b = plan.batches[0]
        case = self.case(dtype, cast, attn, tp, gc, b)
        why = enable_checkpointing(model, gc)
        if why:
            return [self.na(case, why)]
        try:
            got = G.transformers_grads(model, b, plan.device, autocast, scaled, plan.fault)
        except Exception as e:
            return [self.failed(case, f"{plan.subject.kind} backward with {gc} checkpointing failed: {_first(e)}")]
        finally:
            compat.checkpointing_off(model)
        rows = self.judged(case, self.label, got, self.truth(b), dtype, calib, b)
        if b.key() in plain:
            d = bitwise_diff(got, plain[b.key()])
            tol, status, reason = judge(plan.policy, dtype, "gc_bitwise_diff", d, None)
            rows.append(Row(SUITE, case, self.label, f"{self.label} checkpointing=off", "gc_bitwise_diff", d, tol,
                            status, reason or "loss and every gradient equal the cell without checkpointing"))
        return rows

    def left_hazard(self, model, b: Batch, case: dict, autocast, scaled) -> list[Row]:
        """The naive labels of a left-padded batch (only the pads masked), against the per-row truth:
        measured and reported as a recipe hazard, not gated."""
        got = G.transformers_grads(model, b, self.plan.device, autocast, scaled, self.plan.fault,
                                   labels=naive_left_labels(b))
        c = compare(got.grads, self.truth(b).grads, got.loss, self.truth(b).loss)
        case = {**case, "input": "left-naive-labels"}
        known = {"name": LEFT_HAZARD.key, "mechanism": LEFT_HAZARD.title, "source": "", "releases": ""}
        reason = (f"labels mask only the pads: the last pad predicts the first real token; loss off by "
                  f"{c['values']['loss_rel_err']:.3g}, gradients by {c['values']['grad_rel_l2']:.3g} (relative L2); "
                  "labels -100 on the first real token too fix it (the gated 'left' cell)")
        return [Row(SUITE, case, self.label, ORACLE, m, c["values"][m], None, INFO, reason,
                    {"known": known, "worst_tensor": c["worst"], "by_kind": c["by_kind"]} if m == "grad_rel_l2" else {})
                for m in ("loss_rel_err", "grad_rel_l2")]

    def peak_row(self, model, b: Batch, case: dict, autocast, got: G.Grads) -> Row:
        """The largest |output| of any module in the forward, against the dtype's largest finite value:
        whether the forward overflows (float16's 65504 against bfloat16's 3.4e38), as info."""
        peak, bad = 0.0, 0

        def hook(module, args, out):
            nonlocal peak, bad
            for t in (out if isinstance(out, tuple) else (out,)):
                if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel():
                    t = t.detach()
                    fin = torch.isfinite(t)
                    bad += int((~fin).sum())
                    if bool(fin.any()):
                        peak = max(peak, float(t[fin].abs().max()))
        handles = [m.register_forward_hook(hook) for m in model.modules()]
        try:
            with torch.no_grad(), G.autocast(autocast, self.plan.device):
                model(input_ids=b.ids.to(self.plan.device), attention_mask=b.mask.to(self.plan.device),
                      use_cache=False)
        finally:
            for h in handles:
                h.remove()
        dtype = case["dtype"]
        top = torch.finfo(G.DTYPES[dtype]).max
        why = (f"largest |module output| in the forward, {peak:.4g}, is {peak / top:.2g} of {dtype}'s largest finite "
               f"value ({top:.4g}); {bad} non-finite output entries")
        if got.scale is not None:
            why += f"; loss scale after GradScaler's backoff: {got.scale:g} (starts at {G.INIT_SCALE:g})"
        return Row(SUITE, {**case, "input": f"{case['input']}-peak"}, self.label, ORACLE, "peak_abs_activation",
                   peak, None, INFO, why, {"nonfinite_outputs": bad, "dtype_max": top, "loss_scale": got.scale})

    def unscaled_rows(self, case: dict, subject: str, got: G.Grads, truth: G.Grads) -> list[Row]:
        """float16 without a loss scale, as info: how much of the gradient underflows to 0."""
        case = {**case, "input": f"{case['input']}-unscaled"}
        frac = underflow(got.grads, truth.grads)
        c = compare(got.grads, truth.grads, got.loss, truth.loss)
        why = "float16 without a loss scale (GradScaler off): share of the oracle's non-zero gradient entries flushed to 0"
        return [Row(SUITE, case, subject, ORACLE, "underflow_frac", frac, None, INFO, why),
                Row(SUITE, case, subject, ORACLE, "grad_rel_l2", c["values"]["grad_rel_l2"], None, INFO,
                    got.nonfinite or "float16 without a loss scale: measured, not gated (the gated cell is scaled)")]

    # -- judging --------------------------------------------------------------------------------------
    def judged(self, case: dict, subject: str, got: G.Grads, truth: G.Grads, dtype: str, calib: dict | None,
               b: Batch | None = None) -> list[Row]:
        c = compare(got.grads, truth.grads, got.loss, truth.loss)
        why = got.nonfinite or truth.nonfinite
        if why and dtype in ("float16", "bfloat16") and not truth.nonfinite:
            why += f"; overflow: activations or gradients exceed {dtype}'s range while the float64 oracle stays finite"
        rows = []
        for m in GATED:
            ref = None if calib is None else calib.get((case["input"], m))
            noise = calib.get((case["input"], "loss_noise")) if calib and m == "loss_rel_err" else None
            tol, status, reason = judge(self.plan.policy, dtype, m, c["values"][m], ref, noise)
            if why:
                status, reason = FAIL, why
            rows.append(Row(SUITE, case, subject, ORACLE, m, c["values"][m], tol, status, reason))
        ev = {"worst_tensor": c["worst"], "by_kind": c["by_kind"], "by_layer": c["by_layer"],
              "per_tensor": c["per_tensor"], "loss": got.loss, "oracle_loss": truth.loss}
        if got.scale is not None:
            ev["loss_scale"] = got.scale
        rows[1].extra.update(ev)
        noise = loss_noise(got.extra.get("token_losses"), truth.extra.get("token_losses"), truth.loss)
        if noise is not None:
            rows[0].extra["loss_noise"] = noise
        if "loss_of_logits" in got.extra:
            rows.append(self.loss_of_logits_row(case, subject, got, dtype, why))
        rows[3].extra["worst_tensor"] = c["worst"]
        if rows[3].status == PASS or why:
            pass
        else:
            rows[3].reason += f" (worst tensor {c['worst']})"
        return rows

    def loss_of_logits_row(self, case: dict, subject: str, got: G.Grads, dtype: str, why: str) -> Row:
        """The loss transformers returns against the per-token mean cross entropy of the logits it returned,
        recomputed in float64: the loss function alone, isolated from the forward's rounding (a loss taken
        without a float32 upcast lands on the dtype's grid, ~1e-3 off in bfloat16; a correct one ~1e-7)."""
        own = got.extra["loss_of_logits"]
        v = abs(got.loss - own) / abs(own) if own else abs(got.loss)
        if not math.isfinite(v):
            v = math.nan
        tol, status, reason = judge(self.plan.policy, dtype, "loss_of_logits_rel_err", v, None)
        if why:
            status, reason = FAIL, why
        return Row(SUITE, case, subject, "its own logits (float64 cross entropy)", "loss_of_logits_rel_err", v, tol,
                   status, reason or "outputs.loss equals the cross entropy of outputs.logits", {"loss_of_logits": own})

    def summary_extra(self) -> dict:
        plan = self.plan
        return {"model": {"path": str(plan.folder.path), "format": plan.ckpt.source,
                          "args": dict(vars(plan.ckpt.args))},
                "truth": TRUTH + "; gradients by autograd through the reference, per-row, per-token mean",
                "seed": plan.seed, "text": plan.text,
                "inputs": {"cells": [b.describe() for b in plan.batches], "sha": self.settings["inputs"]},
                "policy": {"path": str(plan.policy.path), "version": plan.policy.version},
                "plant": plan.fault.name if plan.fault else None}

    def na(self, case: dict, why: str) -> Row:
        return Row(SUITE, case, self.label, ORACLE, "all", None, status=NA, reason=why)

    def failed(self, case: dict, why: str) -> Row:
        return Row(SUITE, case, self.label, ORACLE, "all", None, status=FAIL, reason=why)


def enable_checkpointing(model, gc: str) -> str:
    """Turn gradient checkpointing on as a user does; '' or why this release cannot."""
    if compat.checkpointing_enable(model, reentrant=gc == "reentrant"):
        return ""
    if gc == "non-reentrant":
        return (f"transformers {compat.transformers_release()} has no gradient_checkpointing_kwargs: "
                "only reentrant checkpointing")
    compat.checkpointing_enable(model)      # reentrant: the only kind this release has
    return ""


def _peft_release() -> str:
    from importlib.metadata import version
    return version("peft")


def _first(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"

