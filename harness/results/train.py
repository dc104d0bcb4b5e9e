"""The train suite's evidence on the HTML page: gradient error against the float64 oracle by parameter
kind (a heatmap of log10 relative L2, one row per cell), drawn from the grad_rel_l2 rows' evidence."""
from __future__ import annotations

import math

KINDS = ("embed", "q", "k", "v", "o", "attn_norm", "gate", "up", "down", "ffn_norm", "final_norm", "lm_head")


def grid(summary: dict) -> tuple[list[str], list[list[float]]]:
    labels, data = [], []
    for c in summary.get("cells", []):
        by_kind = (c.get("extra") or {}).get("by_kind")
        if c.get("metric") != "grad_rel_l2" or not isinstance(by_kind, dict):
            continue
        case = c["case"]
        labels.append(" / ".join(str(x) for x in (c["subject"], case.get("dtype"), case.get("cast"), case.get("attn"),
                                                 case.get("checkpointing"), case.get("input"))))
        data.append([_log(by_kind.get(k)) for k in KINDS])
    return labels, data


def _log(v) -> float:
    return math.log10(v) if isinstance(v, (int, float)) and v > 0 and math.isfinite(v) else math.nan


def gradient_heatmap(summary: dict) -> str:
    """'' unless the summary is the train suite's."""
    if summary.get("suite") != "train":
        return ""
    from matplotlib.figure import Figure

    from harness.results.html import _img
    labels, data = grid(summary)
    if not labels:
        return ""
    fig = Figure(figsize=(8, 0.22 * len(labels) + 1.8))
    ax = fig.subplots()
    im = ax.imshow(data, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(KINDS)), KINDS, rotation=45, ha="right", fontsize=7, parse_math=False)
    ax.set_yticks(range(len(labels)), labels, fontsize=6, parse_math=False)
    fig.colorbar(im, ax=ax).set_label("log10 relative L2 vs the float64 oracle (worst tensor of the kind)", fontsize=7)
    ax.set_title("train: gradient error by parameter kind", parse_math=False)
    fig.tight_layout()
    return _img(fig, "train: gradient error by parameter kind and cell")
