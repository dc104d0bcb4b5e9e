"""The HTML report in a real browser engine: Debian's Chromium, headless.

Chromium prints every console message (console.* calls, uncaught errors, CSP violations such as
a blocked network asset) to stderr as `INFO:CONSOLE...` with --enable-logging=stderr; --dump-dom
prints the DOM after the page's scripts ran. The report's inline script sets
body[data-report-ready=yes], so the marker proves scripts ran and the page finished loading; our
page logs nothing, so any console line is an error. A control page with a deliberate console.error
and a blocked external image proves the check can see what it looks for.

Skipped only when chromium is absent and CI is unset; on CI (CI=true) a missing chromium fails.
Install: apt-get install -y --no-install-recommends chromium
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from harness.results import html as report_html
from harness.results import stored as report
from harness.core.store import FAIL, Row, write_results

DATA = Path(__file__).parent / "data"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

if CHROMIUM is None:
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail("CI is set but chromium is missing: apt-get install -y --no-install-recommends chromium",
                    pytrace=False)
    pytestmark = pytest.mark.skip(reason="chromium not installed (and CI unset)")


def load_in_browser(page: Path, tmp_path: Path) -> tuple[str, list[str]]:
    """(DOM after scripts ran, console lines) for a file opened in headless Chromium."""
    profile = tmp_path / f"profile-{page.stem}"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", "--dump-dom", page.resolve().as_uri()]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    return done.stdout, console


class Dom(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self._in_verdict = 0
        self.verdict = ""

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        if a.get("id") == "verdict":
            self._in_verdict = 1
        elif self._in_verdict:
            self._in_verdict += 1

    def handle_endtag(self, tag):
        if self._in_verdict:
            self._in_verdict -= 1

    def handle_data(self, data):
        self.text.append(data)
        if self._in_verdict:
            self.verdict += data


def dom(text: str) -> Dom:
    d = Dom()
    d.feed(text)
    return d


def test_console_check_sees_errors_and_blocked_assets(tmp_path):
    # The report's own policy, with the control script's hash added so that it may run: the
    # policy allows scripts by hash only, so an unlisted inline script would be blocked.
    script = 'console.error("control-error"); document.body.setAttribute("data-report-ready", "yes");'
    csp = report_html.CSP.replace("script-src ", f"script-src {report_html._sha256(script)} ", 1)
    control = tmp_path / "control.html"
    control.write_text(
        f'<!DOCTYPE html><html><head><meta http-equiv="Content-Security-Policy" content="{csp}">'
        f'</head><body><img src="http://example.invalid/x.png"><script>{script}</script>'
        "</body></html>")
    _, console = load_in_browser(control, tmp_path)
    assert any("control-error" in line for line in console)
    assert any("example.invalid" in line for line in console)   # the CSP blocked and reported it


@pytest.mark.parametrize("results", ["baseline/clean", "report/failing"])
def test_report_loads_without_console_errors_and_shows_verdict(results, tmp_path):
    summary = report.load_summary(DATA / results)
    page = tmp_path / "index.html"
    report_html.write_html(page, [summary], [DATA / results])
    text, console = load_in_browser(page, tmp_path)
    assert console == []
    d = dom(text)
    body = [a for t, a in d.tags if t == "body"][0]
    assert body.get("data-report-ready") == "yes"
    assert d.verdict.strip() == f"llama-parity: {summary['verdict'].upper()}"
    assert len([t for t, a in d.tags if t == "img"]) >= 2


def test_tokenizer_piece_renders_as_text_in_the_browser(tmp_path):
    hostile = "<script>document.title='pwned'</script>"
    rows = [Row("tokenizer", {"text": hostile}, "transformers", "reference", "ids_differ", 1.0, 0.0, FAIL,
                reason=hostile, extra={"pieces": {"reference": [hostile, "<img src=x onerror=alert(1)>"],
                                                  "transformers": ["▁", "<"]}})]
    write_results(tmp_path / "tok", "tokenizer", rows, {"device": "cpu"}, {"seed": 0})
    page = tmp_path / "index.html"
    report_html.write_html(page, [report.load_summary(tmp_path / "tok")], [tmp_path / "tok"])
    text, console = load_in_browser(page, tmp_path)
    assert console == []
    d = dom(text)
    assert [t for t, _ in d.tags].count("script") == 1
    assert not [a for t, a in d.tags if t == "img" and a.get("src") == "x"]
    assert hostile in "".join(d.text)
    assert re.search(r"<title>[^<]*FAIL</title>", text)   # the title was not rewritten by the piece


def test_a_failing_page_with_its_banner_divergence_and_findings(tmp_path):
    """What a reader sees first on a failing run under an untested release: the banner, where it
    diverged and its findings, all as text, with nothing logged to the console."""
    from harness.core.findings import Mechanism, collect
    rows = [Row("logits", {"dtype": "float32", "attn": "eager", "tp": 1}, "transformers", "oracle-fp64", "kl_max",
                0.2, 1e-11, FAIL, reason="0.2 > 1e-11", extra={"finding": "rope"})]
    found = collect(rows, {"rope": Mechanism("rope", "q and k not permuted for <rotate_half>")}, "logits", "9.0")
    divergence = {"case": {"dtype": "float32", "attn": "eager", "tp": 1}, "layer": 0, "op": "q",
                  "point": "layers.0.q", "ratio": 6.1e6, "certain": True, "located_at": "float32"}
    env = {"device": "cpu", "transformers": "9.0", "transformers_tested": False, "tested_releases": "5.25.0"}
    write_results(tmp_path / "r", "logits", rows, env,
                  {"seed": 0, "findings": found, "first_divergence": divergence, "divergences": [divergence]})
    page = tmp_path / "index.html"
    report_html.write_html(page, [report.load_summary(tmp_path / "r")], [tmp_path / "r"])
    text, console = load_in_browser(page, tmp_path)
    assert console == []
    shown = "".join(dom(text).text)
    assert "transformers 9.0 is not a release this harness was tested on (tested: 5.25.0)" in shown
    assert "first divergence" in shown and "layers.0.q (6.1e+06x the reference's error)" in shown
    assert "q and k not permuted for <rotate_half>" in shown                 # a finding's title stays text
