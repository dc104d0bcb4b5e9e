"""Cache parity: incremental decoding through a KV cache vs one full forward over the same
tokens, per dtype, for the reference (its own cache) and transformers (dynamic and static cache).

Every position is compared: the prefill's logits and each decoded step's. A subject is judged
against its own full forward at the same dtype and attention implementation. The tolerance is
calibrated on rounding: the reference's full forward at that dtype against the float64 oracle
says how far rounding moves these logits, and a cache may move them at most a stated factor more
(the reference's own cache error is often exactly zero, a property of its kernels, not a budget).
"""
from __future__ import annotations

import torch

from harness.core.cases import Shape, make_inputs
from harness.core.metrics import compare
from harness.core.store import FAIL, NA, Row
from harness.core.subjects import reference_decode, transformers_decode
from harness.suites.behaviour.common import BehaviourRun, attn_reason, failed, judge, reference
from harness.subjects import DEFAULT as SUBJECT   # the implementation judged by default

SUITE = "cache"
GATED = ("max_abs", "kl_max", "top1_disagree")


def _reference_pair(model, ids, prefill: int):
    return model(ids), reference_decode(model, ids, prefill)


def _transformers_pair(model, ids, kind, prefill: int):
    with torch.inference_mode():
        full = model(input_ids=ids, use_cache=False).logits
    return full, transformers_decode(model, ids, prefill, kind)


def run(r: BehaviourRun) -> list[Row]:
    ckpt, cfg = r.ckpt, r.cases[SUITE]
    shape, prefill = Shape(cfg["batch"], cfg["length"]), cfg["prefill"]
    ids = make_inputs(shape, ckpt.args.vocab_size, r.seed)
    rows: list[Row] = []
    truth = reference(ckpt, "float64", r.device)(ids.to(r.device))
    for dtype in r.dtypes:
        base = {"dtype": dtype, "device": r.device, "shape": str(shape), "prefill": prefill}
        full, inc = _reference_pair(reference(ckpt, dtype, r.device), ids.to(r.device), prefill)
        ref_vals, _ = compare(full, truth)          # rounding at this dtype: the calibrator
        own, _ = compare(inc, full)
        case = {**base, "attn": "-", "cache": "reference"}
        rows += [judge(r.policy, SUITE, case, "reference", "reference-full-forward", f"cache_{m}", own[m], ref_vals[m])
                 for m in GATED]
        for attn in r.attns:
            for kind in ("dynamic", "static"):
                case = {**base, "attn": attn, "cache": kind}
                why = attn_reason(attn, r.device)
                if why:
                    rows.append(Row(SUITE, case, SUBJECT, "transformers-full-forward", "all", None,
                                    status=NA, reason=why))
                    continue
                try:
                    model = r.load("LlamaForCausalLM", dtype, attn)
                    full, inc = _transformers_pair(model, ids.to(r.device), kind, prefill)
                except NotImplementedError as e:
                    rows.append(Row(SUITE, case, SUBJECT, "transformers-full-forward", "all", None,
                                    status=NA, reason=str(e)))
                    continue
                except Exception as e:   # a release that cannot run this cell fails it, naming why
                    rows.append(failed(SUITE, case, SUBJECT, "transformers-full-forward", e, "cached decoding"))
                    continue
                vals, nonfinite = compare(inc, full)
                for m in GATED:
                    row = judge(r.policy, SUITE, case, SUBJECT, "transformers-full-forward",
                                f"cache_{m}", vals[m], ref_vals[m])
                    if nonfinite:
                        row.status, row.reason = FAIL, nonfinite
                    rows.append(row)
    return rows
