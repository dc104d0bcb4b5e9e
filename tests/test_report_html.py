"""The HTML and Markdown reports, rendered from stored results (no model run).

The result sets under tests/data/ are real runs (tests/data/baseline/README.md): `clean` passes,
`report/failing` is the same matrix with `--plant norm-eps`. Synthetic summaries below are written
through harness.store.write_results, the schema every suite uses, to exercise evidence that the
logits suite does not record (per-position and per-layer errors, tokenizer pieces, bench samples).
"""
from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from harness.cli import main
from harness.results import html as report_html
from harness.results import markdown
from harness.results import stored as report
from harness.core.store import FAIL, NA, PASS, Row, write_results

DATA = Path(__file__).parent / "data"
CLEAN = DATA / "baseline" / "clean"
FAILING = DATA / "report" / "failing"
HOSTILE = "<script>alert('x')</script>"


class Tags(HTMLParser):
    """Elements and text the way a browser's tokenizer sees them."""

    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def parse(page: str) -> Tags:
    t = Tags()
    t.feed(page)
    return t


def hostile_summary(tmp_path: Path) -> Path:
    """A tokenizer-like suite whose strings are markup, plus every kind of recorded evidence."""
    out = tmp_path / "hostile"
    rows = [
        Row("tokenizer", {"loader": "fast", "text": HOSTILE}, "transformers", "reference", "ids_differ", 1.0,
            0.0, FAIL, reason=f"first diverging piece {HOSTILE}",
            extra={"pieces": {"reference": ["▁a", HOSTILE, "&amp;"], "transformers": ["▁a", "<", "/b>"]},
                   "text": HOSTILE}),
        Row("tokenizer", {"loader": "slow", "text": "plain"}, "transformers", "reference", "ids_differ", 0.0, 0.0, PASS),
        Row("tokenizer", {"loader": "slow", "text": "n/a case"}, "transformers", "reference", "ids_differ", None,
            None, NA, reason="slow tokenizer removed in transformers 5"),
    ]
    write_results(out, "tokenizer", rows, {"torch": "x", "transformers": "<b>5</b>", "device": "cpu"},
                  {"seed": 0, "policy": {"path": "p", "version": "v<1>"}})
    return out


def test_report_command_writes_three_files_and_gates(tmp_path):
    assert main(["report", "--results", str(CLEAN), "--out", str(tmp_path / "ok")]) == 0
    assert {p.name for p in (tmp_path / "ok").iterdir()} == {"index.html", "report.md", "junit.xml"}
    # a failing result set gives exit 1 (CI may gate on the report step), and the files still
    assert main(["report", "--results", str(FAILING), "--out", str(tmp_path / "bad")]) == 1
    assert (tmp_path / "bad" / "index.html").is_file()


def test_verdict_and_environment_come_first(tmp_path):
    summary = report.load_summary(FAILING)
    page = report_html.render([summary], [FAILING])
    verdict_at = page.index('id="verdict"')
    env_at = page.index("<h2>Environment</h2>")
    suite_at = page.index('class="suite"')
    assert verdict_at < env_at < suite_at
    assert re.search(r'id="verdict">[^<]*<span class="fail">FAIL</span>', page)
    env = summary["environment"]
    for needed in (env["torch"], env["transformers"], env["harness_commit"], summary["policy"]["version"],
                   "dtype support"):
        assert needed in page[env_at:suite_at]


def test_failing_cells_first_with_their_numbers(tmp_path):
    summary = report.load_summary(FAILING)
    page = report_html.render([summary], [FAILING])
    table = page[page.index("<h3>Cells"):page.index("<h3>Evidence")]
    statuses = re.findall(r'<tr class="([^"]+)">', table)
    n_fail = statuses.count("fail")
    assert n_fail > 0 and statuses[:n_fail] == ["fail"] * n_fail
    # the first failing row shows the worst metric's value and tolerance as recorded
    first = table[table.index('<tr class="fail">'):]
    first = first[:first.index("</tr>")]
    failing = [c for c in summary["cells"] if c["status"] == "fail"]
    assert any(f"{c['value']:.3g}" in first and f"{c['tolerance']:.3g}" in first for c in failing)


def test_page_is_self_contained(tmp_path):
    page = report_html.render([report.load_summary(CLEAN)], [CLEAN])
    tags = parse(page).tags
    srcs = [a.get("src") for t, a in tags if "src" in a] + [a.get("href") for t, a in tags if "href" in a]
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert not [t for t, a in tags if t in ("link", "iframe", "object", "embed")]
    csp = [a["content"] for t, a in tags if t == "meta" and a.get("http-equiv") == "Content-Security-Policy"]
    assert csp == [report_html.CSP] and "default-src 'none'" in csp[0]
    assert [t for t, a in tags if t == "img"]  # the heatmap and distributions are drawn for logits


def test_every_string_from_results_is_escaped(tmp_path):
    out = hostile_summary(tmp_path)
    page = report_html.render([report.load_summary(out)], [out])
    parsed = parse(page)
    assert [t for t, _ in parsed.tags].count("script") == 1      # only the page's own marker script
    assert not [t for t, _ in parsed.tags if t == "b"]            # "<b>5</b>" from the environment stays text
    text = "".join(parsed.text)
    assert HOSTILE in text and "<b>5</b>" in text and "v<1>" in text
    assert "&amp;" in text                                         # a piece "&amp;" shows as typed
    # the diverging pieces are marked in the strip
    assert 'class="piece diff"' in page


def test_markdown_escapes_and_puts_failing_first(tmp_path):
    out = hostile_summary(tmp_path)
    md = markdown.markdown_report([report.load_summary(out)])
    assert "<script>" not in md and "&lt;script&gt;" in md
    assert md.startswith("# llama-parity: **FAIL**")
    md_fail = markdown.markdown_report([report.load_summary(FAILING)])
    rows = [line for line in md_fail.splitlines() if line.startswith("| float") or line.startswith("| bfloat")]
    statuses = [line.split("|")[8].strip() for line in rows]
    assert statuses[0] == "fail" and "fail" not in statuses[statuses.index("pass"):]


def test_evidence_plots_drawn_where_recorded(tmp_path):
    out = tmp_path / "curves"
    rows = [Row("logits", {"dtype": "bfloat16", "attn": "sdpa"}, "transformers", "oracle-fp64", "max_abs", 0.1, 0.4,
                PASS, extra={"per_position": [0.01 * (i + 1) for i in range(16)],
                             "per_layer": {"embed": 0.0, "layer0.attn": 0.01, "layer0.mlp": 0.02, "final": 0.05},
                             "kl_per_position": [1e-5 * (i + 1) for i in range(16)]}),
            Row("logits", {"dtype": "bfloat16", "attn": "sdpa"}, "transformers", "oracle-fp64", "kl_mean", 1e-4, 1e-3,
                PASS),
            Row("logits", {"dtype": "bfloat16", "attn": "sdpa"}, "transformers", "oracle-fp64", "top1_disagree",
                0.02, 0.2, PASS)]
    write_results(out, "logits", rows, {"device": "cpu"}, {"seed": 0})
    samples = out / "samples"
    samples.mkdir()
    for name, shift in (("reference", 0.0), ("hf", 0.01)):
        lines = [json.dumps({"doc_id": d, "resps": [[[-1.5 - d + shift, False]], [[-2.5 - d + shift, False]]]})
                 for d in range(5)]
        (samples / f"{name}.quartz.jsonl").write_text("\n".join(lines) + "\n")
    summary = report.load_summary(out)
    section = report_html.suite_section(summary, out)
    alts = [a["alt"] for t, a in parse(section).tags if t == "img"]
    assert any("error vs dtype x setting" in a or "worst value/tolerance" in a for a in alts)
    assert any("error vs position" in a for a in alts)
    assert any("per-layer error" in a for a in alts)
    assert any("KL and top-1" in a for a in alts)
    assert any("benchmark quartz" in a for a in alts)
    pairs = report_html._loglikelihoods(samples / "hf.quartz.jsonl")
    assert len(pairs) == 10 and pairs[(0, 0)] == pytest.approx(-1.49)


def test_bad_results_are_input_errors_naming_the_path(tmp_path, capsys):
    assert main(["report", "--results", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert str(tmp_path / "nope") in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "summary.json").write_text("{not json")
    assert main(["report", "--results", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert str(bad / "summary.json") in capsys.readouterr().err
    (bad / "summary.json").write_text(json.dumps({"suite": "x", "verdict": "pass"}))
    assert main(["report", "--results", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "missing key 'counts'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_folder_of_results_folders_is_one_report(tmp_path):
    root = tmp_path / "latest"
    hostile_summary(root)
    (root / "logits").mkdir(parents=True)
    (root / "logits" / "summary.json").write_text((CLEAN / "summary.json").read_text())
    assert main(["report", "--results", str(root), "--out", str(tmp_path / "r")]) == 1
    page = (tmp_path / "r" / "index.html").read_text()
    assert 'id="suite-logits"' in page and 'id="suite-tokenizer"' in page


def test_per_layer_curves_from_rows_with_a_layer(tmp_path):
    """The hidden-states and localise suites write one row per capture point (case key "layer")."""
    rows = [Row("hidden", {"dtype": "bfloat16", "attn": "eager", "layer": name}, "transformers", "oracle-fp64",
                "hidden_rel_l2", err, 1.0, PASS) for name, err in (("embedding", 1e-3), ("block0", 5e-3), ("final", 8e-3))]
    write_results(tmp_path, "hidden", rows, {"device": "cpu"}, {"seed": 0})
    section = report_html.suite_section(report.load_summary(tmp_path), tmp_path)
    alts = [a["alt"] for t, a in parse(section).tags if t == "img"]
    assert "hidden: per-layer error curves" in alts
    assert report_html.layer_curves(report.load_summary(CLEAN)) == ""   # logits rows have no layer


@pytest.fixture(scope="module")
def corpus_run(tmp_path_factory) -> Path:
    """A real corpus run on the embedded default model: two dtypes, 4 windows of 32 tokens."""
    out = tmp_path_factory.mktemp("corpus") / "logits"
    code = main(["logits", "--inputs", "corpus", "--dtypes", "float32,bfloat16", "--attn", "eager", "--tp", "1",
                 "--ctx", "32", "--max-tokens", "128", "--out", str(out), "--no-progress"])
    assert code == 0
    return out


def test_corpus_table_and_plots_follow_the_verdict_and_heatmap(corpus_run):
    summary = report.load_summary(corpus_run)
    page = report_html.render([summary], [corpus_run])
    at = {k: page.index(k) for k in ('class="suite"', "worst value/tolerance per dtype", "Corpus statistics",
                                     "corpus KL histogram and top-1 agreement by position", "Every row (")}
    assert list(at.values()) == sorted(at.values()), at
    # one line per corpus cell, with the numbers the run stored (mean KLD and same-top-p)
    cells = report_html._corpus_cells(summary)
    assert {(c["subject"], c["case"]["dtype"]) for c in cells} == {
        (s, d) for s in ("reference", "transformers") for d in ("float32", "bfloat16")}
    table = page[at["Corpus statistics"]:at["corpus KL histogram and top-1 agreement by position"]]
    for c in cells:
        st = c["extra"]["corpus"]
        assert f"{st['kl_mean']:.4g} ± {st['kl_mean_se']:.2g}" in table
        assert f"{100 * st['same_top1']:.3f} ± {100 * st['same_top1_se']:.3f} %" in table
        assert sum(c["extra"]["kl_log10_counts"]) == st["n"] == 128     # every position in the histogram
        assert len(c["extra"]["top1_by_position"]) == 32


def test_a_long_cells_table_is_folded_below_the_failing_cells(corpus_run, tmp_path):
    summary = report.load_summary(corpus_run)
    summary = json.loads(json.dumps(summary))
    # more distinct cells than FOLD_ROWS: the same rows under FOLD_ROWS values of one more setting
    summary["cells"] = [{**c, "case": {**c["case"], "copy": i}} for i in range(report_html.FOLD_ROWS)
                        for c in summary["cells"]]
    bad = next(c for c in summary["cells"] if c["metric"] == "max_abs")
    summary["cells"].append({**bad, "case": {**bad["case"], "attn": "sdpa"}, "status": FAIL, "value": 1.0})
    page = report_html.render([summary], [corpus_run])
    failing = page[page.index("<h3>Failing cells"):page.index("<details><summary>Every cell")]
    assert re.findall(r'<tr class="([^"]+)">', failing) == ["fail"]


def test_cells_that_measured_nothing_show_blank_but_a_failing_nan_shows(tmp_path):
    """An n/a cell's NaN value is not a number anyone measured: blank, not 'nan'. A failing cell whose
    subject produced NaN keeps 'nan' on the page: there it is the finding."""
    out = tmp_path / "nan"
    rows = [
        Row("logits", {"dtype": "float16", "input": "cached"}, "onnxruntime", "reference", "kl_max", None, None, NA,
            reason="the export has no KV cache"),
        Row("logits", {"dtype": "float16", "input": "random"}, "transformers", "reference", "kl_max",
            float("nan"), 1e-3, FAIL, reason="non-finite logits"),
    ]
    write_results(out, "logits", rows, {"torch": "x", "transformers": "5", "device": "cpu"},
                  {"seed": 0, "policy": {"path": "p", "version": "v"}})
    page = report_html.render([report.load_summary(out)], [out])
    na_rows = re.findall(r'<tr class="n/a">(.*?)</tr>', page)
    fail_rows = re.findall(r'<tr class="fail">(.*?)</tr>', page)
    assert na_rows and not any(">nan<" in r for r in na_rows)
    assert fail_rows and all(">nan<" in r for r in fail_rows)
    md = markdown.render(report.load_summary(out))
    na_md = [line for line in md.splitlines() if "| n/a |" in line]
    fail_md = [line for line in md.splitlines() if "| fail |" in line]
    assert na_md and not any("nan" in line for line in na_md)
    assert fail_md and all("| nan |" in line for line in fail_md)
