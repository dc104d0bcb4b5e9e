"""Cache parity: incremental decoding through a KV cache vs one full forward over the same
tokens, per dtype, for the reference (its own cache) and each subject (--subject; transformers by
default, at each cache kind it takes: dynamic and static). A subject without its own cache is n/a
with its reason.

Every position is compared: the prefill's logits and each decoded step's. A subject is judged
against its own full forward at the same dtype and attention implementation. The tolerance is
calibrated on rounding: the reference's full forward at that dtype against the float64 oracle
says how far rounding moves these logits, and a cache may move them at most a stated factor more
(the reference's own cache error is often exactly zero, a property of its kernels, not a budget).
"""
from __future__ import annotations

from harness.core.cases import Shape, make_inputs
from harness.core.errors import InputError
from harness.core.metrics import compare
from harness.core.store import FAIL, NA, Row
from harness.core.subjects import reference_decode
from harness.suites.behaviour.common import BehaviourRun, NotBuilt, attn_reason, failed, judge, reference

SUITE = "cache"
GATED = ("max_abs", "kl_max", "top1_disagree")
CACHES = ["dynamic", "static"]      # the cache kinds a subject taking the "cache" axis runs with


def _reference_pair(model, ids, prefill: int):
    return model(ids), reference_decode(model, ids, prefill)


def _subject_pair(subject, ids, prefill: int):
    why = subject.cannot().get("decode")
    if why:
        raise NotImplementedError(f"{subject.name} cannot decode through a cache: {why}")
    return subject.forward(ids), subject.decode(ids, prefill)


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
        for spec in r.subjects:
            label = spec.label()
            against = f"{label}-full-forward"
            for attn in r.axis(spec, "attn", r.attns):
                for kind in r.axis(spec, "cache", CACHES):
                    case = {**base, "attn": attn, "cache": kind}
                    why = attn_reason(attn, r.device) if attn != "-" else ""
                    if why:
                        rows.append(Row(SUITE, case, label, against, "all", None, status=NA, reason=why))
                        continue
                    subject = None
                    try:
                        subject = r.subject(spec, dtype, attn=attn, cache=kind)
                        full, inc = _subject_pair(subject, ids.to(r.device), prefill)
                    except (NotBuilt, NotImplementedError) as e:
                        rows.append(Row(SUITE, case, label, against, "all", None, status=NA, reason=str(e)))
                        continue
                    except InputError:
                        raise
                    except Exception as e:   # a release that cannot run this cell fails it, naming why
                        rows.append(failed(SUITE, case, label, against, e, "cached decoding"))
                        continue
                    finally:
                        if subject is not None:
                            subject.close()
                    vals, nonfinite = compare(inc, full)
                    for m in GATED:
                        row = judge(r.policy, SUITE, case, label, against, f"cache_{m}", vals[m], ref_vals[m])
                        if nonfinite:
                            row.status, row.reason = FAIL, nonfinite
                        rows.append(row)
    return rows
