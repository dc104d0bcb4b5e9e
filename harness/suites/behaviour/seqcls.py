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

from harness.suites.behaviour.common import ORACLE, BehaviourRun, attn_reason, failed, info, judge, load_hf, plant, reference
from harness.suites.behaviour.padding import PAD_ID, pad_batch, rows_of_tokens
from harness.core.store import NA, Row

SUITE = "seqcls"
N_LABELS = 3


def score_weight(dim: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed * 31 + 5)
    return torch.randn(N_LABELS, dim, generator=gen, dtype=torch.float64) / dim ** 0.5


EOS_ID = 2
PADDINGS = ("left", "right", "none", "eos-inside")


def pad_id_for(padding: str) -> int | None:
    return {"none": None, "eos-inside": EOS_ID}.get(padding, PAD_ID)


def _inputs(vocab: int, seed: int, padding: str):
    toks = rows_of_tokens(vocab, seed)
    if padding == "none":
        ids = toks[0][None]
        return ids, torch.ones_like(ids), None
    if padding == "eos-inside":
        toks[0] = toks[0].clone()
        toks[0][len(toks[0]) // 2] = EOS_ID      # a real eos, attended, mid-row
        return pad_batch(toks, "right", 0, EOS_ID)
    return pad_batch(toks, padding, 0, PAD_ID)


def _classifier(ckpt, dtype, device, pad_id, weight):
    clf = SequenceClassifier(reference(ckpt, dtype, device), N_LABELS, pad_id)
    clf.score.weight.data = weight.to(clf.score.weight.dtype).to(device)
    return clf


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double().cpu() - b.double().cpu()).abs().max().item()


def run(r: BehaviourRun, ckpt, hf_path) -> list[Row]:
    vocab, weight = ckpt.args.vocab_size, score_weight(ckpt.args.dim, r.seed)
    out: list[Row] = []
    paddings = PADDINGS
    truth = {}
    for padding in paddings:
        ids, mask, positions = _inputs(vocab, r.seed, padding)
        pad_id = pad_id_for(padding)
        oracle = _classifier(ckpt, "float64", r.device, pad_id, weight)
        truth[padding] = oracle(ids.to(r.device), key_mask=mask.to(r.device),
                                positions=None if positions is None else positions.to(r.device)).cpu()
    for dtype in r.dtypes:
        ref_err, ref_scores = {}, {}
        for padding in paddings:
            ids, mask, positions = _inputs(vocab, r.seed, padding)
            pad_id = pad_id_for(padding)
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
                    out.append(Row(SUITE, case, "transformers", ORACLE, "all", None, status=NA, reason=why))
                    continue
                ids, mask, _ = _inputs(vocab, r.seed, padding)
                try:
                    hf = load_hf("LlamaForSequenceClassification", hf_path, dtype, r.device, attn,
                                 num_labels=N_LABELS, pad_token_id=pad_id_for(padding))
                    hf.score.weight.data = weight.to(hf.score.weight.dtype).to(r.device)
                    plant(hf, r.plant)
                    with torch.inference_mode():
                        scores = hf(input_ids=ids.to(r.device), attention_mask=mask.to(r.device)).logits.cpu()
                except Exception as e:
                    out.append(failed(SUITE, case, "transformers", ORACLE, e, "classification"))
                    continue
                out.append(judge(r.policy, SUITE, case, "transformers", ORACLE, "seqcls_max_abs",
                                 _max_abs(scores, truth[padding]), ref_err[padding]))
                out.append(info(SUITE, case, "transformers", "reference", "seqcls_max_abs",
                                _max_abs(scores, ref_scores[padding]), "informational: same dtype, no truth"))
    return out
