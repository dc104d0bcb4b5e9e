"""API contracts of transformers' LlamaForCausalLM that users' code relies on, beyond the numbers.

- ``logits_dtype``: the logits come back in float32 (Meta's model returns float32 logits at every
  dtype, and code that takes a log-softmax of them relies on it).
- ``logits_to_keep`` / ``num_logits_to_keep``: asked for the last position only, the model returns
  only that position, with the same numbers as the full forward's last position. A release that
  does not know the argument must refuse it (TypeError: the row is n/a); one that accepts it and
  returns every position has silently ignored it.
- ``gc_default_cache``: a training step with gradient checkpointing on, called as Trainer calls the
  model (``model(**batch)``: no ``use_cache``, so the config's ``use_cache=True``), runs and gives the
  gradients of the same step without checkpointing, bit for bit (the recomputed forward is the same
  arithmetic). 4.36.0 kept a cache object alive under checkpointing and the recomputation appended
  to it (transformers #28056).

Contracts a release changed on purpose are known deviations scoped to those releases
(suites/behaviour.toml): still shown, not gated, unless --strict.
"""
from __future__ import annotations

import torch

from harness.core import compat
from harness.core.cases import Shape, make_inputs
from harness.core.store import FAIL, NA, PASS, Row
from harness.suites.behaviour.common import BehaviourRun, attn_reason, failed
from harness.subjects import DEFAULT as SUBJECT   # the implementation judged by default

SUITE = "api"
KEEP_ARGS = ("logits_to_keep", "num_logits_to_keep")


def run(r: BehaviourRun) -> list[Row]:
    ids = make_inputs(Shape(1, r.cases[SUITE]["length"]), r.ckpt.args.vocab_size, r.seed).to(r.device)
    rows: list[Row] = []
    for dtype in r.dtypes:
        for attn in r.attns:
            case = {"dtype": dtype, "device": r.device, "attn": attn}
            why = attn_reason(attn, r.device)
            if why:
                rows.append(Row(SUITE, case, SUBJECT, "contract", "all", None, status=NA, reason=why))
                continue
            try:
                model = r.load("LlamaForCausalLM", dtype, attn)
                with torch.inference_mode():
                    full = model(input_ids=ids, use_cache=False).logits
            except Exception as e:   # a release that cannot build this cell fails it, naming why
                rows.append(failed(SUITE, case, SUBJECT, "contract", e, "forward"))
                continue
            rows.append(_dtype_row(case, full))
            rows += [_keep_row(case, model, ids, full, name) for name in KEEP_ARGS]
            rows.append(_gc_cache_row(case, model, ids))
    return rows


def _gc_cache_row(case: dict, model, ids: torch.Tensor) -> Row:
    if not getattr(model.config, "use_cache", False):
        return Row(SUITE, case, SUBJECT, "contract", "gc_default_cache", None, status=NA,
                   reason="the checkpoint's config has use_cache=false: the default-cache path is not taken")
    grads = []
    try:
        for gc in (False, True):
            model.train()
            model.zero_grad(set_to_none=True)
            if gc:
                compat.checkpointing_enable(model)        # the release's default (reentrant before 5.x)
            with torch.enable_grad():
                model(input_ids=ids, labels=ids).loss.float().backward()
            grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})
    except Exception as e:   # noqa: BLE001 - the bug this row exists for is a crash in backward
        return Row(SUITE, case, SUBJECT, "contract", "gc_default_cache", None, None, FAIL,
                   f"a checkpointed training step with the default use_cache failed: {type(e).__name__}: "
                   f"{str(e).splitlines()[0][:200] if str(e) else ''}")
    finally:
        if compat.checkpointing_on(model):
            compat.checkpointing_off(model)
        model.zero_grad(set_to_none=True)
        model.eval()
    plain, ckpt = grads
    if plain.keys() != ckpt.keys():
        missing = sorted(plain.keys() - ckpt.keys())[:3]
        return Row(SUITE, case, SUBJECT, "contract", "gc_default_cache", float(len(plain.keys() ^ ckpt.keys())), 0.0,
                   FAIL, f"checkpointing changed which parameters get a gradient (e.g. {', '.join(missing)})")
    diff = max((a.double() - ckpt[n].double()).abs().max().item() for n, a in plain.items())
    return Row(SUITE, case, SUBJECT, "contract", "gc_default_cache", diff, 0.0, PASS if diff == 0 else FAIL,
               "" if diff == 0 else f"checkpointed gradients differ from the plain step's by up to {diff:.3g}",
               {"parameters": len(plain)})


def _dtype_row(case: dict, logits: torch.Tensor) -> Row:
    bits = torch.finfo(logits.dtype).bits
    name = str(logits.dtype).removeprefix("torch.")
    ok = logits.dtype == torch.float32
    return Row(SUITE, case, SUBJECT, "contract", "logits_dtype", float(bits), 32.0, PASS if ok else FAIL,
               "" if ok else f"logits come back as {name}, not float32, for a {case['dtype']} model",
               {"logits_dtype": name})


def _keep_row(case: dict, model, ids: torch.Tensor, full: torch.Tensor, name: str) -> Row:
    try:
        with torch.inference_mode():
            kept = model(input_ids=ids, use_cache=False, **{name: 1}).logits
    except TypeError as e:
        return Row(SUITE, case, SUBJECT, "contract", name, None, status=NA,
                   reason=f"this release does not take {name} ({str(e).splitlines()[0][:120]})")
    positions = kept.shape[1]
    if positions != 1:
        return Row(SUITE, case, SUBJECT, "contract", name, float(positions), 1.0, FAIL,
                   f"{name}=1 was accepted and {positions} positions came back: the argument was ignored")
    # The head multiplies one row instead of all: the same numbers up to that matmul's rounding.
    a, b = kept[:, -1].double(), full[:, -1].double()
    gap, allowed = (a - b).abs().max().item(), 64 * torch.finfo(full.dtype).eps * b.abs().max().item()
    return Row(SUITE, case, SUBJECT, "contract", name, 1.0, 1.0, PASS if gap <= allowed else FAIL,
               "" if gap <= allowed else f"the kept position's logits differ from the full forward's by {gap:.3g}",
               {"max_abs_vs_full_forward": gap})
