"""The HTML report: one self-contained page rendered from stored results (no model run).

Reading order: the verdict, the untested-release banner, the counts, where each failing suite
diverged first and the findings (harness.results.headline), the environment, then per suite the
headroom heatmap and a table of cells (failing first, with metric, value, tolerance and margin),
then the evidence (plots, piece strips, every row).
Everything that came from a result file goes through `esc` -- tokenizer pieces, task text and
reasons included -- so a piece such as "<script>" shows as text. Plots are matplotlib PNGs inlined
as data: URIs, and a Content-Security-Policy forbids any other load: the page opens from a file
with no network, and a stray external asset would show up as a console error (tested in a real
browser, tests/test_report_html_browser.py).

Evidence is drawn when the results hold it:
  - headroom heatmap (worst value/tolerance per dtype x setting): any suite whose cases have a "dtype";
  - KL and top-1 agreement distributions: cells with kl_mean / top1_disagree metrics, plus the
    per-position KL of a row's extra["kl_per_position"] where a suite records it;
  - error vs position: extra["per_position"] (list of floats, one per position);
  - per-layer error curves: rows whose case has a "layer" (the hidden-states and localise
    suites), or extra["per_layer"] ({capture point: error}, in forward order);
  - tokenizer divergences: extra["pieces"] ({subject: [piece, ...]}), drawn as piece strips;
  - benchmark scatter: samples/<subject>.<task>.jsonl beside summary.json (lm-eval responses).
"""
from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")   # no display on CI machines; Figure objects below never touch pyplot's state
from matplotlib.figure import Figure  # noqa: E402

from harness.results import headline  # noqa: E402
from harness.results.markdown import margin as _margin, worst_cells  # noqa: E402
from harness.results.stored import environment_items, policy_version  # noqa: E402
from harness.core.inputs import printable  # noqa: E402
from harness.core.store import atomic_write_text  # noqa: E402

READY_SCRIPT = "document.body.setAttribute('data-report-ready', 'yes');"
STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:1.5em auto;max-width:1200px;padding:0 1em;color:#222}
h1 .pass,.st-pass{color:#137333} h1 .fail,.st-fail{color:#b3261e} .st-na,.st-info{color:#666}
table{border-collapse:collapse;margin:.5em 0;font-size:13px;display:block;max-width:100%;overflow-x:auto} td,th{border:1px solid #ccc;padding:2px 6px;
text-align:left;vertical-align:top} th{background:#f3f3f3} tr.fail td{background:#fdecea}
td.num{text-align:right;font-family:ui-monospace,monospace} img{max-width:100%}
.strip{display:flex;flex-wrap:wrap;gap:2px;margin:2px 0} .piece{font-family:ui-monospace,monospace;
border:1px solid #999;padding:0 3px;white-space:pre;background:#f8f8f8} .piece.diff{background:#fde2b8}
.subj{display:inline-block;min-width:9em;font-weight:600} details{margin:.6em 0}
.banner{background:#fff4e5;border:1px solid #e8a33d;padding:.4em .8em;font-weight:600}
.diverge{background:#fdecea;border-left:4px solid #b3261e;padding:.4em .8em;margin:.4em 0}
tr.new td:first-child{font-weight:600}
"""


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii") + "'"


# Our own style and script only, by hash: nothing injected into the page can run or restyle it,
# and nothing is fetched (images are data: URIs).
CSP = (f"default-src 'none'; img-src data:; style-src {_sha256(STYLE)}; script-src {_sha256(READY_SCRIPT)}; "
       "base-uri 'none'; form-action 'none'")


def esc(x) -> str:
    """Escape anything for HTML text or a quoted attribute."""
    return html.escape("" if x is None else str(x), quote=True)


def _num(x) -> str:
    if x is None:
        return ""
    if isinstance(x, str):
        return esc(x)
    if isinstance(x, float):
        return f"{x + 0.0:.3g}"       # + 0.0: a -0.0 shows as 0
    return esc(x)


def _png(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _img(fig: Figure, alt: str) -> str:
    return f'<figure><img alt="{esc(alt)}" src="{_png(fig)}"><figcaption>{esc(alt)}</figcaption></figure>'


def _legend(ax, title: str = "", below: bool = False) -> None:
    """A legend outside the axes (beside them, or below where panels stand side by side), never
    over the curves; its entries plain text (a '$' in a case value stays a '$': only the harness's
    own axis labels are math text, the log ticks' 10^-4)."""
    handles, labels = ax.get_legend_handles_labels()
    if not handles:
        return
    where = (dict(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=min(2, len(handles))) if below
             else dict(loc="upper left", bbox_to_anchor=(1.01, 1.0)))
    leg = ax.legend(fontsize=6, borderaxespad=0.0, title=title or None, title_fontsize=6, **where)
    for t in [*leg.get_texts(), leg.get_title()]:
        t.set_parse_math(False)


def _finite(x) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


# --- plots -------------------------------------------------------------------------------------

# Heatmap colours by headroom, value / tolerance: greens pass (darker: more headroom), reds fail.
HEADROOM = ((0.01, "#1a7f37"), (0.1, "#4dac26"), (0.5, "#8fd18a"), (1.0, "#d4f0c8"), (10.0, "#e8685a"),
            (math.inf, "#a50f15"))


def headroom_colour(ratio: float) -> str:
    """The heatmap's colour for a cell's value / tolerance: green below 1, red at or above 1."""
    return next(colour for upper, colour in HEADROOM if ratio < upper or upper == math.inf)


def _short_labels(cases: list[dict]) -> list[str]:
    """The settings that differ between these cases, values only ('sdpa / tp=2 / 1x16'): a bare
    number keeps its key, which alone would not say what it counts."""
    keys = [k for k in dict.fromkeys(k for c in cases for k in c) if len({str(c.get(k, "")) for c in cases}) > 1]
    out = []
    for c in cases:
        vals = [f"{k}={c[k]}" if str(c[k]).replace(".", "", 1).isdigit() else str(c[k])
                for k in keys if str(c.get(k, "")) not in ("", "-", "None")]     # '-': the setting does not apply
        out.append(" / ".join(vals) or "all")
    return out


def heatmap_grid(summary: dict) -> tuple[list[str], list[dict], list[list[float]]]:
    """(dtypes, columns, worst value / tolerance per dtype x column) of the gated cells with a dtype.
    A column is a subject and its other settings, ``{"subject": ..., setting: value, ...}``."""
    cells = [c for c in summary["cells"] if c["status"] in ("pass", "fail") and "dtype" in c["case"]]
    grid: dict[tuple[str, str], float] = {}
    columns: dict[str, dict] = {}
    for c in cells:
        col = {"subject": c["subject"], **{k: v for k, v in c["case"].items() if k not in ("dtype", "device")}}
        ratio = _margin(c["value"], c["tolerance"])
        ratio = math.inf if ratio is None and c["status"] == "fail" else ratio
        if ratio is None:
            continue
        key = json.dumps(col, sort_keys=True, default=str)
        columns[key] = col
        grid[(str(c["case"]["dtype"]), key)] = max(grid.get((str(c["case"]["dtype"]), key), 0.0), ratio)
    rows = sorted({k[0] for k in grid})
    keys = sorted(columns)
    return rows, [columns[k] for k in keys], [[grid.get((r, k), math.nan) for k in keys] for r in rows]


def heatmap_figure(summary: dict) -> tuple[Figure, list[dict], list[str]] | None:
    from matplotlib.colors import BoundaryNorm, ListedColormap
    rows, cols, data = heatmap_grid(summary)
    if not cols:
        return None
    labels = _short_labels(cols)
    shown = [[min(v, 999.0) if v == v else math.nan for v in line] for line in data]
    cmap = ListedColormap([colour for _, colour in HEADROOM])
    cmap.set_bad("#eeeeee")
    norm = BoundaryNorm([0.0] + [u for u, _ in HEADROOM[:-1]] + [1e3], cmap.N)
    fig = Figure(figsize=(max(6.0, 0.5 * len(cols) + 2.5), 0.55 * len(rows) + 2.4))
    ax = fig.subplots()
    im = ax.imshow(shown, cmap=cmap, norm=norm, aspect="auto")
    ax.set_xticks(range(len(cols)), labels, rotation=60, ha="right", fontsize=7, parse_math=False)
    ax.set_yticks(range(len(rows)), rows, parse_math=False)
    for i, line in enumerate(data):
        for j, v in enumerate(line):
            if v == v:
                dark = v < 0.1 or v >= 10
                ax.text(j, i, "inf" if v == math.inf else f"{v:.2g}", ha="center", va="center", fontsize=7,
                        color="white" if dark else "black")
    bar = fig.colorbar(im, ax=ax, ticks=[0.01, 0.1, 0.5, 1, 10])
    bar.set_label("value / tolerance, worst metric\n(green passes, red fails)", fontsize=8)
    ax.set_title(f"{summary['suite']}: headroom per dtype and setting", parse_math=False)
    return fig, cols, labels


def heatmap(summary: dict) -> str:
    """Worst value/tolerance per (dtype, other settings): green below 1 (darker, more headroom), red
    at or above; short column labels, and the settings of each column in a table below."""
    drawn = heatmap_figure(summary)
    if drawn is None:
        return ""
    fig, cols, labels = drawn
    keys = list(dict.fromkeys(k for c in cols for k in c))
    legend = _table(["column", *keys], [[label, *(c.get(k, "") for k in keys)] for label, c in zip(labels, cols)])
    return (_img(fig, f"{summary['suite']}: worst value/tolerance per dtype and setting")
            + f"<details><summary>Heatmap columns: their settings ({len(cols)})</summary>{legend}</details>")


def distributions(summary: dict) -> str:
    """KL and top-1 agreement over cells (and over positions where a suite recorded them)."""
    cells = [c for c in summary["cells"] if c["status"] in ("pass", "fail", "info")]
    kl = {}
    agree = {}
    per_pos = []
    for c in cells:
        label = f"{c['subject']} vs {c['against']}"
        v = _finite(c["value"])
        if c["metric"] == "kl_mean" and v is not None:
            kl.setdefault(label, []).append(max(v, 1e-16))
        if c["metric"] == "top1_disagree" and v is not None:
            agree.setdefault(label, []).append(1.0 - v)
        pos = (c.get("extra") or {}).get("kl_per_position")
        if isinstance(pos, list):
            per_pos += [max(x, 1e-16) for x in map(_finite, pos) if x is not None]
    if not kl and not agree and not per_pos:
        return ""
    panels = [p for p in (kl, agree, per_pos) if p]
    fig = Figure(figsize=(5 * len(panels), 3.6))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    i = 0
    if kl:
        ax = axes[i]
        i += 1
        for label, vals in sorted(kl.items()):
            ax.hist([math.log10(v) for v in vals], bins=20, alpha=0.5, label=label)
        ax.set_xlabel("log10 mean KL (nats), one count per cell")
        ax.set_title("KL(truth || subject), mean over positions")
        _legend(ax, below=True)
    if agree:
        ax = axes[i]
        i += 1
        for label, vals in sorted(agree.items()):
            ax.hist(vals, bins=20, range=(min(min(vals), 0.9), 1.0), alpha=0.5, label=label)
        ax.set_xlabel("top-1 agreement, one count per cell")
        ax.set_title("top-1 agreement")
        _legend(ax, below=True)
    if per_pos:
        ax = axes[i]
        ax.hist([math.log10(v) for v in per_pos], bins=30)
        ax.set_xlabel("log10 KL per position")
        ax.set_title("KL over positions")
    return _img(fig, f"{summary['suite']}: KL and top-1 agreement distributions")


def _series_labels(idents: list[dict]) -> tuple[list[str], str]:
    """Legend entries that say only what differs between the lines, and what they all share (the
    legend's title, shortened)."""
    labels = _short_labels(idents)
    shared = " ".join(f"{k}={v}" for k, v in idents[0].items()
                      if all(str(i.get(k)) == str(v) for i in idents)) if idents else ""
    return labels, (shared if len(shared) <= 90 else shared[:87] + "...")


def _log_lines(ax, series: list[tuple[dict, list[str], list[float | None]]]) -> None:
    labels, shared = _series_labels([ident for ident, _, _ in series])
    for label, (_, _, ys) in zip(labels, series):
        ax.plot(range(len(ys)), [y if y is not None and y > 0 else math.nan for y in ys], marker=".", label=label)
    ax.set_yscale("log")      # its tick labels are math text ('10^-4'): drawn as such, never shown raw
    ax.set_ylabel("error")
    _legend(ax, shared)


def curves(summary: dict, key: str, xlabel: str, title: str) -> str:
    """One line per row that recorded extra[key] (per_position list or per_layer mapping)."""
    series = []
    for c in summary["cells"]:
        data = (c.get("extra") or {}).get(key)
        if isinstance(data, dict):
            names, ys = list(map(str, data)), [_finite(v) for v in data.values()]
        elif isinstance(data, list):
            names, ys = [str(i) for i in range(len(data))], [_finite(v) for v in data]
        else:
            continue
        ident = {**c["case"], "subject": c["subject"], "metric": c["metric"]}
        if any(y is not None and y > 0 for y in ys):    # a log axis needs one positive value to draw
            series.append((ident, names, ys))
    if not series:
        return ""
    fig = Figure(figsize=(8, 4))
    ax = fig.subplots()
    _log_lines(ax, series[:12])
    names = series[0][1]
    if key == "per_layer" and len(names) <= 40:
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7, parse_math=False)
    ax.set_xlabel(xlabel)
    ax.set_title(title + (f" (first 12 of {len(series)})" if len(series) > 12 else ""), parse_math=False)
    return _img(fig, f"{summary['suite']}: {title}")


def layer_curves(summary: dict) -> str:
    """Per-layer error curves from suites that record one row per capture point.

    Rows whose case has a "layer" (and maybe an "op") are points along the forward pass, in the
    order the suite wrote them (harness/hidden_states.py, harness/localise.py); one line per
    (other settings, subject, against, metric).
    """
    lines: dict[str, tuple[dict, list[str], list[float | None]]] = {}
    for c in summary["cells"]:
        case = c["case"]
        if "layer" not in case or c["status"] == "n/a":
            continue
        point = str(case["layer"]) + (f".{case['op']}" if case.get("op") not in (None, "", "-") else "")
        ident = {**{k: v for k, v in case.items() if k not in ("layer", "op", "device")},
                 "subject": c["subject"], "against": c["against"], "metric": c["metric"]}
        _, names, ys = lines.setdefault(json.dumps(ident, sort_keys=True, default=str), (ident, [], []))
        names.append(point)
        ys.append(_finite(c["value"]))
    series = [v for v in lines.values()     # a log axis needs one positive value to draw
              if len(v[1]) > 1 and any(y is not None and y > 0 for y in v[2])]
    if not series:
        return ""
    fig = Figure(figsize=(9, 4.2))
    ax = fig.subplots()
    _log_lines(ax, series[:12])
    longest = max((names for _, names, _ in series[:12]), key=len)
    if len(longest) <= 40:
        ax.set_xticks(range(len(longest)), longest, rotation=60, ha="right", fontsize=7, parse_math=False)
    ax.set_xlabel("capture point (forward order)")
    more = f" (first 12 of {len(series)})" if len(series) > 12 else ""
    ax.set_title(f"{summary['suite']}: per-layer error{more}", parse_math=False)
    return _img(fig, f"{summary['suite']}: per-layer error curves")


def bench_scatter(results_dir: Path | None) -> str:
    """Per-sample loglikelihood, reference vs transformers, from lm-eval's stored responses."""
    if results_dir is None or not (Path(results_dir) / "samples").is_dir():
        return ""
    out = []
    samples = Path(results_dir) / "samples"
    for ref_file in sorted(samples.glob("reference.*.jsonl")):
        task = ref_file.name[len("reference."):-len(".jsonl")]
        hf_file = samples / f"hf.{task}.jsonl"
        if not hf_file.is_file():
            continue
        ref, hf = _loglikelihoods(ref_file), _loglikelihoods(hf_file)
        pairs = [(ref[k], hf[k]) for k in ref if k in hf]
        if not pairs:
            continue
        fig = Figure(figsize=(4.5, 4.5))
        ax = fig.subplots()
        xs, ys = zip(*pairs)
        ax.scatter(xs, ys, s=6)
        lo, hi = min(xs + ys), max(xs + ys)
        ax.plot([lo, hi], [lo, hi], lw=0.8, color="grey")
        ax.set_xlabel("reference loglikelihood")
        ax.set_ylabel("transformers loglikelihood")
        ax.set_title(f"{task}: {len(pairs)} requests", parse_math=False)
        out.append(_img(fig, f"benchmark {task}: per-request loglikelihood, reference vs transformers"))
    return "".join(out)


def _loglikelihoods(path: Path) -> dict[tuple, float]:
    """(doc_id, choice index) -> loglikelihood, from lm-eval's resps ([[ll, is_greedy]] per request)."""
    out = {}
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return out
    for line in text.splitlines():
        try:
            d = json.loads(line)
        except (ValueError, RecursionError):
            continue
        resps = d.get("resps") if isinstance(d, dict) else None
        if not isinstance(resps, list):
            continue
        doc = d.get("doc_id")
        doc = doc if isinstance(doc, (str, int, float, bool)) or doc is None else json.dumps(doc, default=str)
        for i, resp in enumerate(resps):
            first = resp[0] if isinstance(resp, list) and resp else resp
            val = first[0] if isinstance(first, list) and first else first
            v = _finite(val)
            if v is not None:
                out[(doc, i)] = v
    return out


# --- text evidence -----------------------------------------------------------------------------

def piece_strips(summary: dict) -> str:
    """Tokenizer divergences side by side, one strip of pieces per subject; differing pieces marked."""
    blocks = []
    for c in summary["cells"]:
        pieces = (c.get("extra") or {}).get("pieces")
        if not isinstance(pieces, dict) or not pieces:
            continue
        lists = {str(k): [str(p) for p in v] for k, v in pieces.items() if isinstance(v, list)}
        longest = max((len(v) for v in lists.values()), default=0)
        strips = []
        for subject, seq in lists.items():
            others = [v for k, v in lists.items() if k != subject]
            spans = "".join(
                f'<span class="piece{" diff" if any(i >= len(o) or o[i] != p for o in others) else ""}">{esc(p)}</span>'
                for i, p in enumerate(seq))
            strips.append(f'<div class="strip"><span class="subj">{esc(subject)}</span>{spans}</div>')
        head = ", ".join(f"{k}={v}" for k, v in c["case"].items())
        text = (c.get("extra") or {}).get("text")
        blocks.append(f"<div><strong>{esc(head)}</strong> ({esc(c['status'])}, {longest} pieces)"
                      + (f"<br>input: <code>{esc(text)}</code>" if text is not None else "")
                      + "".join(strips) + "</div>")
    if not blocks:
        return ""
    return "<h4>Tokenizer divergences</h4>" + "".join(blocks)


def _corpus_cells(summary: dict) -> list[dict]:
    """The corpus cells' kl_max rows: the ones that carry the corpus statistics and plots."""
    return [c for c in summary["cells"] if c["metric"] == "kl_max"
            and isinstance((c.get("extra") or {}).get("corpus"), dict)]


def _label(c: dict) -> str:
    return " ".join([c["subject"], *(str(c["case"][k]) for k in ("dtype", "attn", "tp") if k in c["case"])])


def corpus_table(summary: dict) -> str:
    """llama.cpp's perplexity --kl-divergence layout, one line per subject x setting, sorted by mean
    KL, with the error split of lossy subjects; then who each subject is (its provenance)."""
    cells = _corpus_cells(summary)
    if not cells:
        return ""

    def num(c: dict, k: str, scale: float = 1.0, fmt: str = ".4g") -> str:
        v = _finite(c.get(k))
        return "-" if v is None else format(scale * v, fmt)
    rows = []
    for cell in sorted(cells, key=lambda cell: _finite(cell["extra"]["corpus"].get("kl_mean")) or float("inf")):
        c, sp = cell["extra"]["corpus"], cell["extra"].get("split") or {}
        rows.append([cell["subject"], *(str(cell["case"].get(k, "-")) for k in ("dtype", "attn", "tp")),
                     f"{num(c, 'kl_mean')} ± {num(c, 'kl_mean_se', fmt='.2g')}", num(c, "kl_median"),
                     num(c, "kl_p99"), num(c, "kl_p99_9"), num(c, "kl_max"),
                     f"{num(c, 'same_top1', 100, '.3f')} ± {num(c, 'same_top1_se', 100, '.3f')} %",
                     f"{num(c, 'rms_dp', 100)} ± {num(c, 'rms_dp_se', 100, '.2g')} %",
                     f"{num(c, 'ppl_ratio', fmt='.6f')} ± {num(c, 'ppl_ratio_se', fmt='.2g')}",
                     num(c, "topk_both", 100, ".3f") + " %", num(c, "lp_at_t_absdiff_mean"),
                     num(sp, "weights_kl_mean", fmt=".3g"), num(sp, "runtime_kl_mean", fmt=".3g")])
    n = _finite(cells[0]["extra"]["corpus"].get("n"))
    return ("<h3>Corpus statistics (llama.cpp's perplexity --kl-divergence layout)</h3>"
            + _table(["subject", "dtype", "attn", "tp", "Mean KLD", "Median KLD", "99% KLD", "99.9% KLD", "Max KLD",
                      "Same top p", "RMS Δp", "PPL ratio", "top-5 both", "mean |Δ log p(t*)|",
                      "KLD weights", "KLD runtime"], rows)
            + f"<p>{esc(int(n) if n else '?')} positions per cell; ± is one standard error; "
              "truth: the float64 oracle; sorted by mean KL. KLD weights: the oracle on a lossy subject's "
              "own dequantised weights; KLD runtime: the subject against that.</p>"
            + provenance_table(summary))


def provenance_table(summary: dict) -> str:
    """Each subject's settings, provenance and what it cannot do (the logits suite's summary)."""
    subjects = summary.get("subjects")
    if not isinstance(subjects, dict) or not subjects:
        return ""
    rows = []
    for label, d in sorted(subjects.items()):
        prov = d.get("provenance") or {}
        rows.append([label, "exact: the logits rule" if d.get("exact") else "lossy: its budget",
                     ", ".join(f"{k}={v}" for k, v in (d.get("settings") or {}).items()),
                     "; ".join(f"{k}={v if isinstance(v, str) else json.dumps(v, default=str)}" for k, v in prov.items()),
                     "; ".join(f"{k}: {v}" for k, v in sorted((d.get("cannot") or {}).items())) or "-"])
    return "<h3>Subjects and their provenance</h3>" + _table(["subject", "judged", "settings", "provenance", "cannot"], rows)


def corpus_plots(summary: dict) -> str:
    """KL histogram over the corpus's positions and top-1 agreement along the window."""
    cells = _corpus_cells(summary)
    hists = [(c, (c["extra"].get("kl_log10_edges"), c["extra"].get("kl_log10_counts"))) for c in cells]
    hists = [(c, e, n) for c, (e, n) in hists if isinstance(e, list) and isinstance(n, list) and len(e) == len(n) + 1]
    tops = [(c, c["extra"].get("top1_by_position")) for c in cells]
    tops = [(c, t) for c, t in tops if isinstance(t, list) and t]
    if not hists and not tops:
        return ""
    fig = Figure(figsize=(12, 4))
    ax1, ax2 = fig.subplots(1, 2)
    for c, edges, counts in hists[:12]:
        xs = [_finite(e) for e in edges]
        ys = [_finite(v) or 0.0 for v in counts]
        if None in xs:
            continue
        ax1.stairs(ys, xs, label=_label(c))
    ax1.set_xlabel("log10 KL(truth || subject) per position (nats)")
    ax1.set_ylabel("positions")
    ax1.set_title("KL over the corpus")
    _legend(ax1, below=True)
    for c, t in tops[:12]:
        ys = [_finite(v) for v in t]
        ax2.plot(range(len(ys)), [math.nan if y is None else y for y in ys], label=_label(c), lw=0.8)
    ax2.set_xlabel("position in window")
    ax2.set_ylabel("top-1 agreement with the truth")
    ax2.set_title("top-1 agreement along the window (mean over windows)")
    _legend(ax2, below=True)
    return _img(fig, f"{summary['suite']}: corpus KL histogram and top-1 agreement by position")


def _table(headers: list[str], rows: list[list], status_col: int | None = None) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = []
    for r in rows:
        cls = f' class="{esc(r[status_col])}"' if status_col is not None else ""
        failing = status_col is not None and r[status_col] == "fail"
        # A cell that measured nothing (n/a, skipped) has NaN for its value: shown blank, not "nan".
        # A failing cell's NaN or inf is the finding itself and stays visible.
        shown = [None if isinstance(v, float) and not math.isfinite(v) and not failing else v for v in r]
        tds = "".join(f'<td class="num">{_num(v)}</td>' if isinstance(v, float) else f"<td>{_num(v)}</td>"
                      for v in shown)
        body.append(f"<tr{cls}>{tds}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def cells_table(summary: dict, only_failing: bool = False) -> str:
    """Every gated cell's worst metric, failing first, with value, tolerance and margin."""
    df = worst_cells(summary)
    if df.empty:
        return "<p>(no cells)</p>"
    df = df[df["status"] == "fail"] if only_failing else df[df["status"] != "info"]
    headers = [c for c in df.columns if c != "value/tol"] + ["value/tol", "margin (tol - value)"]
    rows = []
    for rec in df.to_dict("records"):
        v, t = _finite(rec["value"]), _finite(rec["tolerance"])
        margin = (t - v) if v is not None and t is not None else None
        rows.append([rec[h] for h in headers[:-2]] + [rec["value/tol"] if rec["value/tol"] == rec["value/tol"]
                                                       else None, margin])
    return _table(headers, rows, status_col=headers.index("status"))


def all_rows_table(summary: dict) -> str:
    keys: list[str] = []
    for c in summary["cells"]:
        keys += [k for k in c["case"] if k not in keys]
    headers = keys + ["subject", "against", "metric", "value", "tolerance", "value/tol", "status", "reason"]
    rows = []
    for c in summary["cells"]:
        ratio = _margin(c["value"], c["tolerance"])
        rows.append([c["case"].get(k, "") for k in keys] +
                    [c["subject"], c["against"], c["metric"], _finite(c["value"]) if _finite(c["value"]) is not None
                     else c["value"], _finite(c["tolerance"]), ratio, c["status"], c.get("reason", "")])
    return _table(headers, rows, status_col=headers.index("status"))


# --- the page ----------------------------------------------------------------------------------

FOLD_ROWS = 20     # a cells table longer than this is folded below the evidence
FOLD_FINDINGS = 12     # findings past these (new come first) are folded: the first screen stays readable


def train_gradients(summary: dict) -> str:
    from harness.results.train import gradient_heatmap
    return gradient_heatmap(summary)


def suite_section(summary: dict, results_dir: Path | None) -> str:
    """Verdict and heatmap first, then failing cells, the corpus table and plots; long tables folded."""
    s = summary
    evidence = "".join(x for x in (
        corpus_plots(s),
        curves(s, "per_position", "position", "error vs position"),
        curves(s, "per_layer", "capture point (forward order)", "per-layer error"),
        layer_curves(s),
        distributions(s),
        piece_strips(s),
        bench_scatter(results_dir),
        train_gradients(s),
    ) if x)
    facts = [("verdict", s["verdict"].upper()), ("tolerance policy", policy_version(s))]
    for key in ("truth", "model", "plant", "seed"):
        if key in s:
            val = s[key]
            if isinstance(val, dict):
                val = val.get("path", json.dumps(val, default=str))
            facts.append((key, val))
    if results_dir is not None:
        facts.append(("results", str(results_dir)))
    anchor = esc(f"suite-{s['suite']}")
    n_cells = len(worst_cells(s).query("status != 'info'")) if s["cells"] else 0
    failing = [c for c in s["cells"] if c["status"] == "fail"]
    cells = ("<h3>Cells (failing first; worst metric of each)</h3>" + cells_table(s)) if n_cells <= FOLD_ROWS else (
        (("<h3>Failing cells (worst metric of each)</h3>" + cells_table(s, only_failing=True)) if failing else "")
        + f"<details><summary>Every cell, worst metric of each ({n_cells})</summary>{cells_table(s)}</details>")
    return (f'<section class="suite" id="{anchor}"><h2>{esc(s["suite"])}: '
            f'<span class="st-{esc(s["verdict"])}">{esc(s["verdict"].upper())}</span></h2>'
            f"<p>{esc(headline.counts_line([s]))} (rows are case x subject x metric; skipped: n/a, not run).</p>"
            + heatmap(s)
            + _table(["", ""], [list(f) for f in facts])
            + cells
            + divergence_table(s)
            + na_table(s)
            + corpus_table(s)
            + "<h3>Evidence</h3>" + (evidence or "<p>No plots: these results hold no plottable evidence.</p>")
            + f"<details><summary>Every row ({len(s['cells'])})</summary>{all_rows_table(s)}</details></section>")


def divergence_table(summary: dict) -> str:
    """Where each failing cell group first diverges (one row per dtype x attn x tp group)."""
    found = headline.divergences(summary)
    if not found:
        return ""
    rows = [[" ".join(f"{k}={v}" for k, v in (d.get("case") or {}).items() if k != "device"),
             headline.divergence_point(d), headline.divergence_detail(d)] for d in found]
    return ("<h3>Where each failing group diverges first</h3>"
            + _table(["group (the input it was localised on)", "first divergence", "evidence"], rows))


def na_table(summary: dict) -> str:
    reasons = headline.na_reasons(summary)
    if not reasons:
        return ""
    return (f"<details><summary>Skipped: {sum(n for _, n in reasons)} rows not run (n/a), by reason</summary>"
            + _table(["rows", "reason"], [[n, r] for r, n in reasons]) + "</details>")


def headline_html(summaries: list[dict]) -> str:
    """Under the verdict: the untested-release banner, the counts, where each failing suite diverged
    first, and every finding (new first)."""
    out = [f'<p class="banner" role="alert">Warning: {esc(b)}</p>' for b in headline.banners(summaries)]
    out += [f"<p><strong>{esc(line)}</strong></p>" for s in summaries for line in headline.upgrade(s)]
    per_suite = "; ".join(f"{s['suite']} {s['verdict'].upper()}" for s in summaries)
    out.append(f"<p>{esc(headline.counts_line(summaries))}. {esc(per_suite)}.</p>")
    for s in summaries:
        found = headline.divergences(s)
        if found:
            more = f" ({len(found)} failing groups: each in the {s['suite']} section)" if len(found) > 1 else ""
            out.append(f'<p class="diverge" id="{esc("divergence-" + s["suite"])}"><strong>{esc(s["suite"])}: '
                       f"first divergence</strong> {esc(headline.divergence_line(found[0]))}{esc(more)}</p>")
    found = [f for s in summaries for f in headline.findings(s)]
    if found:
        new = sum(f.get("status") == "new" for f in found)
        gated = sum(bool(f.get("gated")) for f in found)
        rows = [[f.get("status"), "yes" if f.get("gated") else "no", f.get("id"), f.get("title"), f.get("cells"),
                 f.get("releases") or "-", f.get("seen_on") or "-", f.get("differs") or "",
                 f.get("reproduction") or "", (f.get("source") or "")
                 + (f" (accepted by your {f['accepted_by']})" if f.get("accepted_by") else "")] for f in found]
        heads = ["status", "fails the run", "finding", "what", "cells", "releases", "seen on", "differs",
                 "reproduction", "source"]
        more = (f"<details><summary>{len(rows) - FOLD_FINDINGS} more findings</summary>"
                + _table(heads, rows[FOLD_FINDINGS:], status_col=0) + "</details>") if len(rows) > FOLD_FINDINGS else ""
        out.append(f'<h2 id="findings">Findings ({len(found)}: {new} new, {len(found) - new} known; '
                   f"{gated} fail the run)</h2>" + _table(heads, rows[:FOLD_FINDINGS], status_col=0) + more)
    return "".join(out)


def render(summaries: list[dict], results_dirs: list[Path | None] | None = None, title: str = "llama-parity") -> str:
    """The whole page as a string."""
    dirs = results_dirs or [None] * len(summaries)
    overall = "fail" if any(s["verdict"] == "fail" for s in summaries) else "pass"
    env_rows = [list(kv) for kv in environment_items(summaries[0])]
    envs = {json.dumps(s.get("environment"), sort_keys=True, default=str) for s in summaries}
    env_note = "" if len(envs) == 1 else "<p>The suites ran in different environments: each is in its own results.</p>"
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        f"<title>{esc(title)}: {esc(overall.upper())}</title><style>{STYLE}</style></head>"
        f'<body data-verdict="{esc(overall)}">'
        f'<h1 id="verdict">{esc(title)}: <span class="{esc(overall)}">{esc(overall.upper())}</span></h1>'
        + headline_html(summaries)
        + "<h2>Environment</h2>" + _table(["", ""], env_rows) + env_note
        + "".join(suite_section(s, d) for s, d in zip(summaries, dirs))
        + f"<script>{READY_SCRIPT}</script></body></html>\n"
    )


def write_html(path: Path, summaries: list[dict], results_dirs: list[Path | None] | None = None,
               title: str = "llama-parity") -> None:
    # Text from results is drawn with parse_math=False artist by artist (_legend, tick labels,
    # titles): a '$' in a case value stays a '$', while the log axes' own '10^-4' stays math text.
    page = render(summaries, results_dirs, title)
    # A title or results path from the command line may hold bytes that are not UTF-8 (surrogates).
    atomic_write_text(Path(path), printable(page))
