"""The tests' oracle for harness.core.metrics: the straightforward float64 implementation the harness
used before the chunked one (full float64 copies, several passes). Kept verbatim so that the fast
engine is checked against an independent, obviously correct computation.

Distances between a subject's logits and the truth's, on real (unmasked) positions only.

Every metric is "lower is better" so that one tolerance rule judges them all; agreement rates
are reported as disagreement (1 - agreement). Inputs are compared in float64 whatever the
subjects' dtypes, because logits dtype differs between transformers releases.
"""
from __future__ import annotations

import math

import torch

# The metric names and their meaning are shared with the engine; the computation below is not.
from harness.core.metrics import METRICS, TOP_K  # noqa: E402,F401


def flatten(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(batch, seq, vocab) -> (n_real_positions, vocab) in float64."""
    x = logits.detach().to("cpu", torch.float64)
    if mask is None:
        return x.reshape(-1, x.shape[-1])
    return x[mask.to("cpu").bool()]


def compare(subject: torch.Tensor, truth: torch.Tensor, mask: torch.Tensor | None = None,
            top_k: int = TOP_K) -> tuple[dict[str, float], str]:
    """All metrics of subject vs truth, plus a reason string when the subject is not finite."""
    a, b = flatten(subject, mask), flatten(truth, mask)
    if a.shape != b.shape:
        raise ValueError(f"logit shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    bad = (~torch.isfinite(a)).sum().item()
    if bad:
        kind = "NaN" if torch.isnan(a).any() else "Inf"
        return {m: math.nan for m in METRICS}, f"non-finite subject logits: {bad} values ({kind})"
    diff = a - b
    out = {
        "max_abs": diff.abs().max().item(),
        "rel_l2": (diff.norm() / b.norm()).item(),
        "nmse": (diff.pow(2).mean() / b.pow(2).mean()).item(),
    }
    la, lb = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
    kl = (lb.exp() * (lb - la)).sum(-1).clamp_min(0.0)
    out["kl_mean"] = kl.mean().item()
    out["kl_p99"] = torch.quantile(kl, 0.99).item()
    out["kl_max"] = kl.max().item()
    arg_a, arg_b = a.argmax(-1), b.argmax(-1)
    out["top1_disagree"] = (arg_a != arg_b).double().mean().item()
    k = min(top_k, a.shape[-1])
    in_a = (a.topk(k, -1).indices == arg_b[:, None]).any(-1)
    in_b = (b.topk(k, -1).indices == arg_a[:, None]).any(-1)
    out["topk_miss"] = (~(in_a & in_b)).double().mean().item()
    out["logprob_diff_max"] = (la.gather(-1, arg_b[:, None]) - lb.gather(-1, arg_b[:, None])).abs().max().item()
    return out, ""


def per_position(subject: torch.Tensor, truth: torch.Tensor) -> dict[str, list[float]]:
    """Error along the sequence (max over batch rows): errors that grow with position show here."""
    a = subject.detach().to("cpu", torch.float64)
    b = truth.detach().to("cpu", torch.float64)
    if not torch.isfinite(a).all():
        return {}
    err = (a - b).abs().amax(dim=-1).amax(dim=0)
    la, lb = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
    kl = (lb.exp() * (lb - la)).sum(-1).clamp_min(0.0).amax(dim=0)
    return {"per_position": [float(f"{v:.4g}") for v in err.tolist()],
            "kl_per_position": [float(f"{v:.4g}") for v in kl.tolist()]}
