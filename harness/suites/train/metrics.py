"""How far a subject's loss and gradients are from the oracle's.

  loss_rel_err       |loss - loss*| / |loss*|
  grad_rel_l2        ||g - g*|| / ||g*|| over every parameter's gradient flattened into one vector
  grad_cos_dist      1 - cos(g, g*) of the same flattened vectors
  grad_rel_l2_max    the worst tensor's own ||g - g*|| / ||g*|| (an extreme: one draw per cell)

Aggregates by parameter kind (q, k, v, o, gate, up, down, the two norms, embedding, final norm,
lm_head) and by layer go into the row's evidence, with every tensor's value.
"""
from __future__ import annotations

import math
import re

import torch

GATED = ("loss_rel_err", "grad_rel_l2", "grad_cos_dist", "grad_rel_l2_max")
# one draw per cell: judged with max_factor. steps_drift too: in float32 it is set by the few parameters
# whose Adam update flips with rounding (gradient near 0), and the calibration campaign saw a correct
# transformers drift 0.7x to 3.6x the reference's over five runs (calibrate_train.py)
EXTREMES = ("grad_rel_l2_max", "loss_rel_err", "steps_loss_rel_err", "steps_drift")
INFO_METRICS = ("underflow_frac", "peak_abs_activation")

KIND = {"attention.wq.weight": "q", "attention.wk.weight": "k", "attention.wv.weight": "v",
        "attention.wo.weight": "o", "feed_forward.w1.weight": "gate", "feed_forward.w3.weight": "up",
        "feed_forward.w2.weight": "down", "attention_norm.weight": "attn_norm", "ffn_norm.weight": "ffn_norm",
        "tok_embeddings.weight": "embed", "norm.weight": "final_norm", "output.weight": "lm_head"}


def kind_of(name: str) -> tuple[str, str]:
    """(kind, layer) of a Meta parameter name; layer '-' outside the blocks."""
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    if m:
        return KIND.get(m.group(2), m.group(2)), m.group(1)
    return KIND.get(name, name), "-"


def compare(grads: dict[str, torch.Tensor], truth: dict[str, torch.Tensor], loss: float, true_loss: float) -> dict:
    """Every metric of one cell, with the per-tensor evidence."""
    num = den = dot = gg = 0.0
    per = {}
    for k, t in truth.items():
        g = grads[k]
        d2, t2 = float((g - t).pow(2).sum()), float(t.pow(2).sum())
        num, den, dot, gg = num + d2, den + t2, dot + float((g * t).sum()), gg + float(g.pow(2).sum())
        per[k] = math.sqrt(d2 / t2) if t2 > 0 else (0.0 if d2 == 0 else math.inf)
    worst = max(per, key=lambda k: per[k])
    cos = dot / math.sqrt(gg * den) if gg > 0 and den > 0 else 0.0
    values = {
        "loss_rel_err": abs(loss - true_loss) / abs(true_loss) if true_loss else abs(loss),
        "grad_rel_l2": math.sqrt(num / den) if den > 0 else math.inf,
        "grad_cos_dist": max(0.0, 1.0 - cos),
        "grad_rel_l2_max": per[worst],
    }
    if not all(math.isfinite(v) for v in (loss, *values.values())):
        values = {m: (v if math.isfinite(v) else math.nan) for m, v in values.items()}
    return {"values": values, "worst": worst, "per_tensor": per, "by_kind": _group(per, 0), "by_layer": _group(per, 1)}


def _group(per: dict[str, float], which: int) -> dict[str, float]:
    """The worst tensor's value per kind (which=0) or per layer (which=1)."""
    out: dict[str, float] = {}
    for k, v in per.items():
        key = kind_of(k)[which]
        out[key] = max(out.get(key, 0.0), v)
    return out


def loss_noise(terms: torch.Tensor | None, truth_terms: torch.Tensor | None, true_loss: float) -> float | None:
    """The scale of a loss error that is rounding noise: the spread of the per-token errors over the
    square root of their count (the standard error of their mean), relative to the true loss. One loss
    is one draw: where it lands against the oracle's is luck, so a limit of factor x the reference's
    one draw vanishes whenever the reference happens to land close; this scale does not."""
    if terms is None or truth_terms is None or terms.shape != truth_terms.shape or terms.numel() < 2 or not true_loss:
        return None
    d = terms - truth_terms
    v = float(d.std() / math.sqrt(d.numel()) / abs(true_loss))
    return v if math.isfinite(v) else None


def underflow(grads: dict[str, torch.Tensor], truth: dict[str, torch.Tensor]) -> float:
    """Share of the oracle's non-zero gradient entries that the subject flushed to exactly 0."""
    lost = total = 0
    for k, t in truth.items():
        nz = t != 0
        total += int(nz.sum())
        lost += int((nz & (grads[k] == 0)).sum())
    return lost / total if total else 0.0


def bitwise_diff(a, b) -> float:
    """max |a - b| over the loss and every gradient entry: 0 when checkpointing recomputes exactly."""
    worst = abs(a.loss - b.loss) if math.isfinite(a.loss) and math.isfinite(b.loss) else math.inf
    for k, g in a.grads.items():
        d = (g - b.grads[k]).abs()
        worst = max(worst, float(d.max()) if d.numel() else 0.0)
    return worst if math.isfinite(worst) else math.nan
