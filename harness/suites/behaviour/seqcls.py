"""Sequence classification: transformers' LlamaForSequenceClassification vs the reference with
the same score head and pooling rule (reference_model/classify.py), both against the float64
oracle classifier.

Classification cases: left and right padding with a pad token configured (rows of different
lengths, attention mask given, no position ids, as a user calls it), no pad token configured
(batch of one), and "eos-inside": the common ``pad_token = eos_token`` with right padding and
one row holding a real eos mid-sentence, where "the last non-pad token" and "the token before
the first pad id" are different tokens. The score head is drawn from a seeded generator and set on both sides.
"""
from __future__ import annotations

import torch

from reference_model.classify import SequenceClassifier

from harness.core.store import NA, Row
from harness.suites.behaviour.common import ORACLE, BehaviourRun, attn_reason, failed, info, judge, reference
from harness.suites.behaviour.padding import pad_batch, rows_of_tokens
from harness.subjects import DEFAULT as SUBJECT   # the implementation judged by default

SUITE = "seqcls"


def score_weight(dim: int, seed: int, labels: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed * 31 + 5)
    return torch.randn(labels, dim, generator=gen, dtype=torch.float64) / dim ** 0.5


class Cases:
    """suites/behaviour.toml [seqcls], with the padding suite's rows and pad id."""

    def __init__(self, cases: dict):
        cfg, pad = cases[SUITE], cases["padding"]
        self.labels, self.paddings, self.eos_id = cfg["labels"], cfg["paddings"], cfg["eos_id"]
        self.pad_id, self.lengths = pad["pad_id"], pad["lengths"]

    def pad_id_for(self, padding: str) -> int | None:
        return {"none": None, "eos-inside": self.eos_id}.get(padding, self.pad_id)


def _inputs(vocab: int, seed: int, padding: str, c: Cases):
    toks = rows_of_tokens(vocab, seed, c.lengths)
    if padding == "none":
        ids = toks[0][None]
        return ids, torch.ones_like(ids), None
    if padding == "eos-inside":
        toks[0] = toks[0].clone()
        toks[0][len(toks[0]) // 2] = c.eos_id      # a real eos, attended, mid-row
        return pad_batch(toks, "right", 0, c.eos_id)
    return pad_batch(toks, padding, 0, c.pad_id)


def _classifier(ckpt, dtype, device, pad_id, weight):
    clf = SequenceClassifier(reference(ckpt, dtype, device), weight.shape[0], pad_id)
    clf.score.weight.data = weight.to(clf.score.weight.dtype).to(device)
    return clf


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double().cpu() - b.double().cpu()).abs().max().item()


def run(r: BehaviourRun) -> list[Row]:
    ckpt, c = r.ckpt, Cases(r.cases)
    vocab, weight = ckpt.args.vocab_size, score_weight(ckpt.args.dim, r.seed, c.labels)
    out: list[Row] = []
    paddings = c.paddings
    truth = {}
    for padding in paddings:
        ids, mask, positions = _inputs(vocab, r.seed, padding, c)
        pad_id = c.pad_id_for(padding)
        oracle = _classifier(ckpt, "float64", r.device, pad_id, weight)
        truth[padding] = oracle(ids.to(r.device), key_mask=mask.to(r.device),
                                positions=None if positions is None else positions.to(r.device)).cpu()
    for dtype in r.dtypes:
        ref_err, ref_scores = {}, {}
        for padding in paddings:
            ids, mask, positions = _inputs(vocab, r.seed, padding, c)
            pad_id = c.pad_id_for(padding)
            clf = _classifier(ckpt, dtype, r.device, pad_id, weight)
            ref_scores[padding] = clf(ids.to(r.device), key_mask=mask.to(r.device),
                                      positions=None if positions is None else positions.to(r.device)).cpu()
            ref_err[padding] = _max_abs(ref_scores[padding], truth[padding])
            case = {"dtype": dtype, "device": r.device, "attn": "-", "padding": padding}
            out.append(judge(r.policy, SUITE, case, "reference", ORACLE, "seqcls_max_abs", ref_err[padding], None))
        for attn in r.attns:
            for padding in paddings:
                case = {"dtype": dtype, "device": r.device, "attn": attn, "padding": padding}
                why = attn_reason(attn, r.device)
                if why:
                    out.append(Row(SUITE, case, SUBJECT, ORACLE, "all", None, status=NA, reason=why))
                    continue
                ids, mask, _ = _inputs(vocab, r.seed, padding, c)
                try:
                    hf = r.load("LlamaForSequenceClassification", dtype, attn, num_labels=c.labels,
                                pad_token_id=c.pad_id_for(padding))
                    hf.score.weight.data = weight.to(hf.score.weight.dtype).to(r.device)
                    with torch.inference_mode():
                        scores = hf(input_ids=ids.to(r.device), attention_mask=mask.to(r.device)).logits.cpu()
                except Exception as e:
                    out.append(failed(SUITE, case, SUBJECT, ORACLE, e, "classification"))
                    continue
                out.append(judge(r.policy, SUITE, case, SUBJECT, ORACLE, "seqcls_max_abs",
                                 _max_abs(scores, truth[padding]), ref_err[padding]))
                out.append(info(SUITE, case, SUBJECT, "reference", "seqcls_max_abs",
                                _max_abs(scores, ref_scores[padding]), "informational: same dtype, no truth"))
    return out
