"""Every view of a run says the same things: where a failing run diverged first, its findings, the
untested-release banner, the counts and the verdict (console, report.md, the HTML page, JUnit).

The failing run is real: the embedded-shape tiny model with a planted missing RoPE permute, whose
first divergence the logits suite localises (layers.0.q). Findings with a known deviation are built
through harness.core.findings.collect, the function every run calls, from rows a suite would write.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from lxml import etree
from matplotlib.backends.backend_agg import FigureCanvasAgg

from harness.cli import main
from harness.core.findings import Mechanism, collect
from harness.core.store import FAIL, INFO, NA, PASS, Row, write_results
from harness.results import headline, html, junit, markdown
from harness.results.stored import load_summary

DATA = Path(__file__).parent / "data"
SCHEMA = etree.XMLSchema(etree.parse(str(DATA / "junit-10.xsd")))
COUNTS = re.compile(r"^(\d+) passed, (\d+) failed, (\d+) skipped(; (\d+) info \(measured, not gated\))?$")


def run_cli(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = main(argv)
    return code, out.getvalue()


@pytest.fixture(scope="module")
def failing(tmp_path_factory, models_module) -> tuple[int, Path, str]:
    out = tmp_path_factory.mktemp("views") / "logits"
    code, printed = run_cli(["logits", "--model", str(models_module), "--plant", "no-permute", "--dtypes", "float32",
                             "--attn", "eager", "--tp", "1", "--inputs", "random", "--shapes", "1x8",
                             "--no-progress", "--html", "--out", str(out)])
    return code, out, printed


@pytest.fixture(scope="module")
def models_module(tmp_path_factory) -> Path:
    from harness.core.presets import write_preset
    return write_preset("tiny-gqa", tmp_path_factory.mktemp("model") / "tiny-gqa", fmt="meta")


def with_known_finding(tmp_path: Path, env: dict | None = None) -> Path:
    """A tokenizer-like run: one new failing mechanism, one known deviation (not gated), n/a rows."""
    known = {"name": "legacy-prefix-space", "mechanism": "legacy=False drops the prefix space",
             "source": "https://example.org/llama-2-page", "releases": ">=4.36"}
    rows = [Row("tokenizer", {"loader": "fast", "text": f"t{i}"}, "transformers", "sentencepiece", "ids_differ",
                1.0, 0.0, FAIL, reason="expected [1], got []", extra={"finding": "vocab-file"}) for i in range(3)]
    rows += [Row("tokenizer", {"loader": "auto", "text": "Banana"}, "transformers", "sentencepiece", "ids_differ",
                 1.0, None, INFO, reason="known deviation", extra={"known": known})]
    rows += [Row("tokenizer", {"loader": "slow", "text": f"n{i}"}, "transformers", "sentencepiece", "ids_differ",
                 None, None, NA, reason="the slow tokenizer is gone in 5.x") for i in range(30)]
    rows += [Row("tokenizer", {"loader": "fast", "text": "ok"}, "transformers", "sentencepiece", "ids_differ",
                 0.0, 0.0, PASS)]
    mechanisms = {"vocab-file": Mechanism("vocab-file", "LlamaTokenizer(vocab_file=...) ignores vocab_file",
                                          reproduction="LlamaTokenizer(vocab_file=p).encode('Hello world') -> []")}
    found = collect(rows, mechanisms, "tokenizer", "5.25.0")
    write_results(tmp_path, "tokenizer", rows, env or {"device": "cpu", "transformers": "5.25.0"},
                  {"seed": 0, "findings": found})
    return tmp_path


# --- the first divergence, in every view of a real failing run ------------------------------------

def test_the_failing_run_names_its_first_divergence_in_every_view(failing):
    code, out, printed = failing
    assert code == 1
    summary = load_summary(out)
    point = summary["first_divergence"]["point"]
    assert point == "layers.0.q"                      # the planted bug's own projection
    # console
    lines = printed.splitlines()
    at = lines.index("first divergence:")
    assert point in lines[at + 1] and "the reference's error" in lines[at + 1]
    # report.md: above every table
    md = (out / "report.md").read_text()
    assert md.index(point) < md.index("## Environment") and "**First divergence**" in md
    # the HTML page: between the verdict and the environment
    page = (out / "report" / "index.html").read_text()
    assert page.index('id="verdict"') < page.index(point) < page.index("<h2>Environment</h2>")
    # JUnit: every failing transformers cell says it, and the file fails
    doc = etree.fromstring((out / "report" / "junit.xml").read_bytes())
    SCHEMA.assertValid(doc)
    assert int(doc.get("failures")) >= summary["counts"]["fail"] > 0
    cell_failures = [f.get("message") for tc in doc.iter("testcase") if tc.get("classname").endswith("oracle-fp64")
                     for f in tc.findall("failure")]
    assert len(cell_failures) == summary["counts"]["fail"]
    assert all(f"first divergence: {point}" in m for m in cell_failures)
    props = {p.get("name"): p.get("value") for p in doc.iter("property")}
    assert point in props["first_divergence"]


def test_one_report_md_per_run(failing):
    _, out, _ = failing
    assert (out / "report.md").is_file() and not (out / "report" / "report.md").exists()
    assert sorted(p.name for p in (out / "report").iterdir()) == ["index.html", "junit.xml"]


def test_the_console_ends_with_the_verdict_then_the_counts(failing):
    _, out, printed = failing
    summary = load_summary(out)
    lines = printed.rstrip("\n").splitlines()
    m = COUNTS.match(lines[-1])
    assert m, lines[-1]
    c = summary["counts"]
    assert (int(m.group(1)), int(m.group(2)), int(m.group(3))) == (c["pass"], c["fail"], c["n/a"])
    assert int(m.group(5) or 0) == c["info"]
    assert lines[-2].startswith("verdict: FAIL: ")
    assert "{'pass'" not in printed                   # no Python dict where a sentence belongs
    assert "FAILING cells (1;" in printed             # the fuzzer and users look for the failing cells
    # passing rows are not listed without --verbose (the one passing cell is the reference's)
    assert not [ln for ln in lines if " reference " in ln and " pass " in ln]


# --- findings, in every view ----------------------------------------------------------------------

def test_findings_in_every_view(tmp_path, capsys):
    summary = load_summary(with_known_finding(tmp_path / "tok"))
    found = summary["findings"]
    assert [(f["status"], f["gated"], f["cells"]) for f in found] == [("new", True, 3), ("known", False, 1)]
    new, known = found
    # console: one line each, the new one first
    markdown.print_console(summary)
    printed = capsys.readouterr().out
    lines = [ln for ln in printed.splitlines() if ln.startswith("  [")]
    assert [new["id"] in lines[0], known["id"] in lines[1]] == [True, True] and len(lines) == 2
    assert "NEW, fails the run" in lines[0] and "known, not gated" in lines[1]
    # report.md
    md = markdown.render(summary)
    assert "## Findings (2: 1 new, 1 known; 1 fail the run)" in md
    assert md.index(new["id"]) < md.index(known["id"]) < md.index("## Environment")
    assert markdown.md_escape(new["reproduction"]) in md and known["source"] in md
    # the HTML page: after the verdict, before the environment
    page = html.render([summary], [tmp_path / "tok"])
    assert page.index('id="verdict"') < page.index('id="findings"') < page.index("<h2>Environment</h2>")
    top = page[page.index('id="findings"'):page.index("<h2>Environment</h2>")]
    assert new["id"] in top and known["id"] in top and html.esc(new["reproduction"]) in top
    # JUnit: the gated finding fails, the known one is visible and skipped, never failing
    doc = etree.fromstring(junit.junit_xml([summary]).encode("utf-8"))
    SCHEMA.assertValid(doc)
    cases = {tc.get("name"): tc for tc in doc.iter("testcase") if tc.get("classname").endswith(".findings")}
    assert cases[f"{new['id']} [new]"].find("failure") is not None
    assert new["title"] in cases[f"{new['id']} [new]"].find("failure").get("message")
    skipped = cases[f"{known['id']} [known]"]
    assert skipped.find("failure") is None and known["source"] in skipped.find("skipped").get("message")
    # and each failing cell names the finding that explains it (written by the run: extra.finding_id)
    cell = next(c for c in summary["cells"] if c["status"] == "fail")
    cell = {**cell, "extra": {**cell.get("extra", {}), "finding_id": new["id"]}}
    assert f"finding {new['id']} [new]" in junit.failure_text(cell, summary)


def test_a_run_links_each_failing_cell_to_its_finding(failing):
    _, out, _ = failing
    summary = load_summary(out)
    ids = {f["id"] for f in summary["findings"]}
    failing_cells = [c for c in summary["cells"] if c["status"] == "fail"]
    assert failing_cells and all(c["extra"]["finding_id"] in ids for c in failing_cells)


def test_na_rows_are_said_once_by_reason_and_verbose_lists_every_row(tmp_path, capsys):
    summary = load_summary(with_known_finding(tmp_path / "tok"))
    markdown.print_console(summary)
    quiet = capsys.readouterr().out
    assert quiet.count("the slow tokenizer is gone in 5.x") == 1
    assert "30 x the slow tokenizer is gone in 5.x" in quiet
    assert "text=ok" not in quiet and " ok " not in quiet          # the passing row is counted, not listed
    markdown.print_console(summary, verbose=True)
    loud = capsys.readouterr().out
    assert loud.count("the slow tokenizer is gone in 5.x") == 30
    assert re.search(r"\bok\b.*\bpass\b", loud)


def test_stored_findings_are_checked_field_by_field(tmp_path, capsys):
    src = with_known_finding(tmp_path / "tok")
    good = json.loads((src / "summary.json").read_text())
    for change, needle in ((lambda s: s.update(findings={"a": 1}), "'findings' must be a list"),
                           (lambda s: s["findings"][0].pop("gated"), "findings[0] lacks gated"),
                           (lambda s: s["findings"][1].update(status="maybe"), "findings[1].status 'maybe'"),
                           (lambda s: s["findings"][0].update(cells="3"), "findings[0].cells must be a int"),
                           (lambda s: s["findings"][0].update(examples=[1]), "findings[0].examples must be a list")):
        bad = json.loads(json.dumps(good))
        change(bad)
        (src / "summary.json").write_text(json.dumps(bad))
        assert main(["report", "--results", str(src), "--out", str(tmp_path / "r")]) == 2
        assert needle in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


# --- the untested-release banner --------------------------------------------------------------------

def test_an_untested_release_is_said_at_the_top_of_every_view(tmp_path, capsys):
    env = {"device": "cpu", "transformers": "5.99.0", "transformers_tested": False,
           "tested_releases": "4.31.0, 4.46.3, 5.24.0, 5.25.0"}
    summary = load_summary(with_known_finding(tmp_path / "tok", env))
    words = "transformers 5.99.0 is not a release this harness was tested on (tested: 4.31.0, 4.46.3, 5.24.0, 5.25.0)"
    markdown.print_console(summary)
    printed = capsys.readouterr().out.splitlines()
    assert printed[1] == f"WARNING: {words}"          # under the suite's verdict line, above everything else
    md = markdown.render(summary)
    assert md.splitlines()[2] == f"> **Warning**: {markdown.md_escape(words)}"
    assert markdown.markdown_report([summary]).index(markdown.md_escape(words)) < 200
    page = html.render([summary], [tmp_path / "tok"])
    assert page.index("</h1>") < page.index('class="banner"') < page.index('id="findings"')
    assert html.esc(words) in page
    # tested, or a summary written before the keys existed: no banner
    for env in ({"transformers": "5.25.0", "transformers_tested": True}, {"transformers": "5.25.0"}):
        assert headline.banner({"environment": env}) == ""


# --- the heatmap and the plots ----------------------------------------------------------------------

def heatmap_summary(tmp_path: Path) -> dict:
    rows = [Row("logits", {"dtype": "bfloat16", "attn": "sdpa"}, "transformers", "oracle-fp64", "kl_max", 0.3, 1.0,
                PASS),
            Row("logits", {"dtype": "bfloat16", "attn": "eager"}, "transformers", "oracle-fp64", "kl_max", 2.0, 1.0,
                FAIL, reason="2 > 1")]
    write_results(tmp_path, "logits", rows, {"device": "cpu"}, {"seed": 0})
    return load_summary(tmp_path)


def _rgb(hex_colour: str) -> tuple[int, int, int]:
    return tuple(int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))


def test_heatmap_colour_is_green_with_headroom_and_red_at_the_limit(tmp_path):
    for ratio in (0.0, 0.005, 0.3, 0.5, 0.99):
        r, g, b = _rgb(html.headroom_colour(ratio))
        assert g > r, ratio
    for ratio in (1.0, 1.01, 50.0, math.inf):
        r, g, b = _rgb(html.headroom_colour(ratio))
        assert r > g, ratio
    # the drawn figure: sample each cell's pixels (beside its number) and compare
    fig, cols, labels = html.heatmap_figure(heatmap_summary(tmp_path))
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    pixels = np.asarray(canvas.buffer_rgba())
    height = canvas.get_width_height()[1]
    ax = fig.axes[0]
    colour = {}
    for j, col in enumerate(cols):
        x, y = ax.transData.transform((j + 0.35, 0.35))
        r, g, b, _ = pixels[int(height - y), int(x)]
        colour[col["attn"]] = (int(r), int(g), int(b))
    assert colour["sdpa"] == _rgb(html.headroom_colour(0.3))           # passing, 0.3 of its tolerance
    assert colour["eager"] == _rgb(html.headroom_colour(2.0))          # failing, 2x its tolerance
    assert labels == ["eager", "sdpa"]                                  # only what differs, short


def test_log_axes_keep_math_text_while_result_text_stays_plain(tmp_path, monkeypatch):
    hostile = r"$\frac{a$"                       # not valid math text: parsing it would raise
    rows = [Row("logits", {"dtype": "bfloat16", "attn": hostile}, "transformers", "oracle-fp64", "max_abs", 0.1, 0.4,
                PASS, extra={"per_position": [10.0 ** -(i % 5) for i in range(16)]}),
            Row("logits", {"dtype": "bfloat16", "attn": "sdpa"}, "transformers", "oracle-fp64", "max_abs", 0.1, 0.4,
                PASS, extra={"per_position": [10.0 ** -(i % 3) for i in range(16)]})]
    write_results(tmp_path, "logits", rows, {"device": "cpu"}, {"seed": 0})
    summary = load_summary(tmp_path)
    html.write_html(tmp_path / "index.html", [summary], [tmp_path])     # the whole page: nothing raises
    drawn = {}
    monkeypatch.setattr(html, "_img", lambda fig, alt: drawn.setdefault(alt, fig) and "")   # keep the figure
    html.curves(summary, "per_position", "position", "error vs position")
    fig = drawn["logits: error vs position"]
    FigureCanvasAgg(fig).draw()
    ax = fig.axes[0]
    ticks = [t for t in ax.get_yticklabels() if t.get_text()]
    assert ticks and all(t.get_text().startswith(r"$\mathdefault{10^{") and t.get_parse_math() for t in ticks)
    legend = ax.get_legend()
    texts = [t.get_text() for t in legend.get_texts()]
    assert hostile in texts and all(not t.get_parse_math() for t in legend.get_texts())
    # the legend stands beside the axes, not over the curves
    box, area = legend.get_window_extent(), ax.get_window_extent()
    assert box.x0 >= area.x1
