"""Greedy generation parity: the same prompts through the reference (its own KV-cache decoding,
reference_model/generate.py) and transformers' ``generate``, both against the float64 oracle's
greedy tokens.

For each subject and prompt: the first step whose token differs from the oracle's, and the
oracle's margin between its top two logits at that step. A divergence where the truth itself
was a near tie is rounding; one where the truth had a clear winner is a bug: the margin is what
the policy gates. The step logits, up to and including the first divergence (the steps computed
from the same prefix), are compared with the oracle's as well.
"""
from __future__ import annotations

import torch

from reference_model.generate import greedy, top2_margin

from harness.core.compat import has_output_logits
from harness.core.store import NA, Row
from harness.suites.behaviour.common import ORACLE, BehaviourRun, attn_reason, failed, info, judge, reference
from harness.subjects import DEFAULT as SUBJECT   # the implementation judged by default

SUITE = "generate"


def prompts(vocab: int, seed: int, lengths: list[int]) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed * 104729 + 3)
    out = []
    for n in lengths:
        ids = torch.randint(3, vocab, (n,), generator=gen)
        ids[0] = 1
        out.append(ids.tolist())
    return out


def first_divergence(tokens: list[int], truth: list[int]) -> int | None:
    """First step where the sequences differ (one stopping early counts), None when identical."""
    for i in range(max(len(tokens), len(truth))):
        if i >= len(tokens) or i >= len(truth) or tokens[i] != truth[i]:
            return i
    return None


def hf_greedy(model, prompt: list[int], device: str, new_tokens: int, eos_id: int) -> tuple[list[int], torch.Tensor]:
    ids = torch.tensor([prompt], device=device)
    # Raw logits per step: output_logits (in 4.38, not in 4.31). Without it, the scores: greedy search with no
    # penalty, length or forced-token setting runs no logits processor, so they are the logits.
    raw = has_output_logits()
    g = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                       eos_token_id=eos_id, pad_token_id=eos_id, return_dict_in_generate=True,
                       num_beams=1, top_k=None, top_p=None, temperature=None,
                       **({"output_logits": True} if raw else {"output_scores": True}))
    tokens = g.sequences[0, len(prompt):].tolist()
    return tokens, torch.stack([x[0].double().cpu() for x in (g.logits if raw else g.scores)])


def _measure(tokens, logits, truth_tokens, truth_logits) -> dict:
    d = first_divergence(tokens, truth_tokens)
    upto = len(truth_tokens) if d is None else min(d + 1, len(tokens), len(truth_tokens))
    step_err = (logits[:upto].double() - truth_logits[:upto].double()).abs().max().item() if upto else 0.0
    margin = 0.0
    own = None
    if d is not None and d < len(truth_tokens):
        margin = top2_margin(truth_logits[d])
        own = top2_margin(logits[d]) if d < len(logits) else None
    return {"divergence": d, "margin": margin, "own_margin": own, "step_max_abs": step_err}


def _rows(r, case, subject, m, ref_m) -> list[Row]:
    d = m["divergence"]
    extra = {"first_divergence_step": d, "subject_margin": m["own_margin"]}
    rows = [info(SUITE, case, subject, ORACLE, "gen_first_divergence", None if d is None else float(d),
                 "no divergence" if d is None else f"first differing token at step {d}")]
    rows.append(judge(r.policy, SUITE, case, subject, ORACLE, "gen_divergence_margin", m["margin"],
                      None if ref_m is None else ref_m["margin"], extra))
    rows.append(judge(r.policy, SUITE, case, subject, ORACLE, "gen_step_max_abs", m["step_max_abs"],
                      None if ref_m is None else ref_m["step_max_abs"]))
    return rows


def run(r: BehaviourRun) -> list[Row]:
    ckpt, cfg = r.ckpt, r.cases[SUITE]
    new, eos = cfg["new_tokens"], cfg["eos_id"]
    ps = prompts(ckpt.args.vocab_size, r.seed, cfg["prompt_lengths"])
    oracle = reference(ckpt, "float64", r.device)
    truth = [greedy(oracle, p, new, eos) for p in ps]
    del oracle
    out: list[Row] = []
    for dtype in r.dtypes:
        model = reference(ckpt, dtype, r.device)
        ref_m = []
        for i, (p, t) in enumerate(zip(ps, truth)):
            g = greedy(model, p, new, eos)
            ref_m.append(_measure(g.tokens, g.logits, t.tokens, t.logits))
            case = {"dtype": dtype, "device": r.device, "attn": "-", "prompt": f"{i}:len{len(p)}"}
            out += _rows(r, case, "reference", ref_m[-1], None)
        del model
        for attn in r.attns:
            why = attn_reason(attn, r.device)
            if why:
                out.append(Row(SUITE, {"dtype": dtype, "device": r.device, "attn": attn}, SUBJECT, ORACLE,
                               "all", None, status=NA, reason=why))
                continue
            try:
                hf = r.load("LlamaForCausalLM", dtype, attn)
            except Exception as e:
                out.append(failed(SUITE, {"dtype": dtype, "device": r.device, "attn": attn}, SUBJECT,
                                  ORACLE, e, "loading"))
                continue
            for i, (p, t) in enumerate(zip(ps, truth)):
                case = {"dtype": dtype, "device": r.device, "attn": attn, "prompt": f"{i}:len{len(p)}"}
                try:
                    tokens, logits = hf_greedy(hf, p, r.device, new, eos)
                except Exception as e:
                    out.append(failed(SUITE, case, SUBJECT, ORACLE, e, "generate"))
                    continue
                out += _rows(r, case, SUBJECT, _measure(tokens, logits, t.tokens, t.logits), ref_m[i])
    return out
