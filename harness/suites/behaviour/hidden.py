"""Hidden states: transformers' LlamaModel ``output_hidden_states`` compared layer by layer with
the reference's residual stream, both against the float64 oracle; the reference at the same
dtype calibrates each layer's tolerance. A bug shows as the first layer whose error jumps.
"""
from __future__ import annotations

import torch

from harness.core.cases import Shape, make_inputs
from harness.core.store import FAIL, NA, Row
from harness.suites.behaviour.common import ORACLE, BehaviourRun, attn_reason, failed, judge, reference
from harness.subjects import DEFAULT as SUBJECT   # the implementation judged by default

HIDDEN_SUITE = "hidden"


def _layer_names(n_layers: int) -> list[str]:
    return ["embedding"] + [f"block{i}" for i in range(n_layers - 1)] + [f"block{n_layers - 1}+norm"]


def _reference_hidden(model, ids) -> list[torch.Tensor]:
    """The residual stream after the embedding and each block; the last one after the final norm,
    because transformers' hidden_states end with the normed output (measured on 4.46 and 5.24)."""
    _, hidden = model(ids, return_hidden=True)
    hidden = list(hidden)
    hidden[-1] = model.norm(hidden[-1])
    return [h.double().cpu() for h in hidden]


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm()).item()


def run(r: BehaviourRun) -> list[Row]:
    ckpt, cfg = r.ckpt, r.cases[HIDDEN_SUITE]
    ids = make_inputs(Shape(cfg["batch"], cfg["length"]), ckpt.args.vocab_size, r.seed).to(r.device)
    names = _layer_names(ckpt.args.n_layers)
    truth = _reference_hidden(reference(ckpt, "float64", r.device), ids)
    out: list[Row] = []
    for dtype in r.dtypes:
        ref = [_rel_l2(h, t) for h, t in zip(_reference_hidden(reference(ckpt, dtype, r.device), ids), truth)]
        for name, v in zip(names, ref):
            case = {"dtype": dtype, "device": r.device, "attn": "-", "layer": name}
            out.append(judge(r.policy, HIDDEN_SUITE, case, "reference", ORACLE, "hidden_rel_l2", v, None))
        for attn in r.attns:
            why = attn_reason(attn, r.device)
            if why:
                out.append(Row(HIDDEN_SUITE, {"dtype": dtype, "device": r.device, "attn": attn}, SUBJECT,
                               ORACLE, "all", None, status=NA, reason=why))
                continue
            try:
                hf = r.load("LlamaModel", dtype, attn)
                with torch.inference_mode():
                    hidden = hf(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
            except Exception as e:
                out.append(failed(HIDDEN_SUITE, {"dtype": dtype, "device": r.device, "attn": attn},
                                  SUBJECT, ORACLE, e, "LlamaModel forward"))
                continue
            if len(hidden) != len(truth):
                out.append(Row(HIDDEN_SUITE, {"dtype": dtype, "device": r.device, "attn": attn}, SUBJECT,
                               ORACLE, "hidden_count", float(len(hidden)), float(len(truth)), FAIL,
                               f"{len(hidden)} hidden states, the reference has {len(truth)}"))
                continue
            for name, h, t, rv in zip(names, hidden, truth, ref):
                case = {"dtype": dtype, "device": r.device, "attn": attn, "layer": name}
                out.append(judge(r.policy, HIDDEN_SUITE, case, SUBJECT, ORACLE, "hidden_rel_l2",
                                 _rel_l2(h, t), rv))
    return out
