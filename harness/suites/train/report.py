"""The train section of report.md: loss and gradient error per dtype and setting against the oracle,
beside the reference's own (the calibrator), the worst tensor, and the error by parameter kind and
by layer."""
from __future__ import annotations

from harness.core.store import INFO, Row
from harness.suites.train.metrics import KIND

KINDS = list(dict.fromkeys(KIND.values()))


def _cell(r: Row) -> tuple:
    c = r.case
    return (r.subject, c["dtype"], c["cast"], c["attn"], c["tp"], c["checkpointing"], c["input"])


def sections(rows: list[Row]) -> list[tuple[str, str]]:
    from harness.results.markdown import md_escape, table
    by = {}
    for r in rows:
        if r.metric in ("loss_rel_err", "grad_rel_l2", "grad_cos_dist", "grad_rel_l2_max") and "cast" in r.case:
            by.setdefault(_cell(r), {})[r.metric] = r
    if not by:
        return []
    ref = {(k[1], k[2], k[6]): v for k, v in by.items() if k[0] == "reference"}
    lines = []
    for key, ms in by.items():
        g = ms.get("grad_rel_l2")
        if g is None or g.value is None:
            continue
        rv = ref.get((key[1], key[2], key[6]), {}).get("grad_rel_l2")
        ratio = f"{g.value / rv.value:.2f}x" if rv is not None and rv.value and key[0] != "reference" else "-"
        lines.append([*key, _f(ms.get("loss_rel_err")), _f(g), ratio, _f(ms.get("grad_cos_dist")),
                      _f(ms.get("grad_rel_l2_max")), g.extra.get("worst_tensor", "-"),
                      "info" if g.status == INFO else g.status])
    main = table(["subject", "dtype", "cast", "attn", "tp", "checkpointing", "input", "loss rel err",
                  "grad rel L2", "vs reference", "1 - cos", "worst tensor rel L2", "worst tensor", "status"], lines)
    kinds = []
    layers = set()
    for key, ms in by.items():
        g = ms.get("grad_rel_l2")
        if g is None or not g.extra.get("by_kind") or key[5] != "off":
            continue
        kinds.append([*key[:5], key[6], *(_g(g.extra["by_kind"].get(k)) for k in KINDS)])
        layers |= set(g.extra.get("by_layer", {}))
    layer_names = sorted(layers, key=lambda x: (x == "-", int(x) if x.isdigit() else 0))
    per_layer = [[*key[:5], key[6], *(_g(ms["grad_rel_l2"].extra["by_layer"].get(n)) for n in layer_names)]
                 for key, ms in by.items() if ms.get("grad_rel_l2") is not None
                 and ms["grad_rel_l2"].extra.get("by_layer") and key[5] == "off"]
    other = [[md_escape(r.subject), r.case.get("dtype"), r.case.get("input"), r.metric, _g(r.value), r.reason]
             for r in rows if r.status == INFO and r.metric in ("underflow_frac", "grad_rel_l2", "train_loss")
             and r.case.get("input", "").endswith(("-unscaled", "naive-labels", "accum"))]
    accum = [[r.subject, r.case.get("input"), r.metric, _g(r.value), _g(r.tolerance), r.status, r.reason]
             for r in rows if r.metric.startswith("accum_")]
    head = ["subject", "dtype", "cast", "attn", "tp", "input"]
    out = [("Training: loss and gradients against the float64 oracle", main +
            "\nrel L2 over every parameter's gradient flattened; 'vs reference': the same against the reference "
            "at the cell's dtype and cast (the calibrator). float16 cells are loss-scaled as GradScaler does.\n"),
           ("Training: gradient error by parameter kind (worst tensor of each kind, relative L2)",
            table(head + KINDS, kinds)),
           ("Training: gradient error by layer (worst tensor of each layer; '-' outside the blocks)",
            table(head + [f"layer {n}" for n in layer_names], per_layer))]
    if accum:
        out.append(("Training: gradient accumulation (Trainer) and num_items_in_batch",
                    table(["subject", "input", "metric", "value", "tolerance", "status", "reason"], accum)))
    if other:
        out.append(("Training: measured, not gated (unscaled float16, naive left-pad labels, Trainer's loss)",
                    table(["subject", "dtype", "input", "metric", "value", "why"], other)))
    return out


def _f(r: Row | None) -> str:
    return "-" if r is None or r.value is None else f"{r.value:.3g}"


def _g(v) -> str:
    return "-" if v is None else f"{v:.3g}"
