"""A few optimizer steps: the same AdamW on the oracle, the reference at the cell's dtype and
the subject, on the corpus batch, so that an error that compounds over steps shows.

  steps_loss_rel_err   the largest |loss - loss*| / loss* along the loss curve
  steps_drift          ||theta - theta*|| / ||theta* - theta_0|| after the last step: how far the
                       subject's parameters are from the oracle's, against how far the oracle moved

float32 and bfloat16, loaded in the dtype, no loss scale (float16 training needs GradScaler's step
skipping, which this does not model: its cells are n/a with that reason).
"""
from __future__ import annotations

import math

import torch

from harness.core.subjects import DTYPES, ORACLE
from harness.subjects import Cannot
from harness.core.store import FAIL, NA, Row
from harness.suites.train import SUITE
from harness.suites.train import grads as G
from reference_model.checkpoint import build_model

METRICS = ("steps_loss_rel_err", "steps_drift")


def _adamw(params, lr: float):
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)


def reference_curve(model, batch, n: int, lr: float, device: str, oracle: bool) -> tuple[list[float], dict]:
    for p in model.parameters():     # build_model may share storage with the checkpoint (same dtype): own it
        p.data = p.data.clone()
    opt = _adamw(model.parameters(), lr)
    losses = []
    for _ in range(n):
        got = G.oracle_grads(model, batch, device) if oracle else G.reference_grads(model, batch, device)
        losses.append(got.loss)
        _restore_grads(model, got.grads)
        opt.step()
    return losses, {k: p.detach().to("cpu", torch.float64).clone() for k, p in model.named_parameters()}


def _restore_grads(model, grads: dict) -> None:
    """The step uses the gradient just measured (grads are read back as float64 copies, so the
    parameters' own .grad, still set by the backward, is what AdamW reads; nothing to do unless the
    collector cleared it)."""
    for k, p in model.named_parameters():
        if p.grad is None:
            p.grad = grads[k].to(p.dtype)


def transformers_curve(model, batch, n: int, lr: float, device: str) -> tuple[list[float], dict]:
    model.train()
    opt = _adamw(model.parameters(), lr)
    ids, mask, labels = batch.ids.to(device), batch.mask.to(device), batch.labels.to(device)
    losses = []
    for _ in range(n):
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
        loss.backward()
        losses.append(float(loss.detach()))
        opt.step()
    return losses, G.hf_tensors(model, lambda p: p.detach())


def compare(losses, params, truth_losses, truth_params, start) -> dict:
    loss_err = max(abs(a - b) / abs(b) for a, b in zip(losses, truth_losses))
    num = sum(float((params[k] - truth_params[k]).pow(2).sum()) for k in truth_params)
    den = sum(float((truth_params[k] - start[k]).pow(2).sum()) for k in truth_params)
    drift = math.sqrt(num / den) if den > 0 else math.inf
    if not all(math.isfinite(x) for x in losses):
        loss_err = drift = math.nan
    return {"steps_loss_rel_err": loss_err, "steps_drift": drift}


def steps_rows(measure) -> list[Row]:
    from harness.suites.train.measure import judge
    plan = measure.plan
    cfg = plan.data["steps"]
    n, lr = int(cfg["steps"]), float(cfg["lr"])
    batch = next((b for b in plan.batches if b.kind == "corpus"), plan.batches[0] if plan.batches else None)
    rows: list[Row] = []

    def case(dtype, subject_attn):
        return {"dtype": dtype, "cast": "load", "attn": subject_attn, "tp": 1, "checkpointing": "off",
                "input": f"steps:{batch.kind if batch else '-'}", "shape": batch.shape if batch else "-",
                "device": plan.device}
    if batch is None:
        return [Row(SUITE, case("float32", "eager"), measure.label, ORACLE, "all", None, None, NA,
                    "needs an input batch")]
    start = {k: v.detach().to(torch.float64).clone() for k, v in plan.ckpt.state.items()}
    oracle = build_model(plan.ckpt, torch.float64, plan.device, rope_dtype=torch.float64)
    truth_losses, truth_params = reference_curve(oracle, batch, n, lr, plan.device, oracle=True)
    del oracle
    for dtype in plan.dtypes:
        if dtype == "float16":
            rows.append(Row(SUITE, case(dtype, "eager"), measure.label, ORACLE, "all", None, None, NA,
                            "float16 steps need GradScaler's step skipping, which this cell does not model"))
            continue
        ref = build_model(plan.ckpt, DTYPES[dtype], plan.device)
        rl, rp = reference_curve(ref, batch, n, lr, plan.device, oracle=False)
        rv = compare(rl, rp, truth_losses, truth_params, start)
        for m in METRICS:
            tol, status, reason = judge(plan.policy, dtype, m, rv[m], None)
            rows.append(Row(SUITE, case(dtype, "-"), "reference", ORACLE, m, rv[m], tol, status, reason,
                            {"losses": rl, "oracle_losses": truth_losses} if m == "steps_loss_rel_err" else {}))
        attn = "eager" if "eager" in plan.attns else plan.attns[0]
        try:
            model = measure.module(dtype, attn)
            tl, tp_ = transformers_curve(model, batch, n, lr, plan.device)
        except Cannot as e:
            rows.append(Row(SUITE, case(dtype, attn), measure.label, ORACLE, "all", None, None, NA, str(e)))
            continue
        except Exception as e:   # noqa: BLE001 - a cell that cannot train fails, naming why
            rows.append(Row(SUITE, case(dtype, attn), measure.label, ORACLE, "all", None, None, FAIL,
                            f"{plan.subject.kind} training steps failed: {type(e).__name__}: {str(e)[:200]}"))
            continue
        tv = compare(tl, tp_, truth_losses, truth_params, start)
        for m in METRICS:
            tol, status, reason = judge(plan.policy, dtype, m, tv[m], rv[m])
            rows.append(Row(SUITE, case(dtype, attn), measure.label, ORACLE, m, tv[m], tol, status,
                            reason or f"{n} AdamW steps (lr {lr:g}) on the {batch.kind} batch",
                            {"losses": tl, "oracle_losses": truth_losses} if m == "steps_loss_rel_err" else {}))
    return rows
