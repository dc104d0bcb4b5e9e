"""JUnit XML: valid against the common junit-10.xsd, one test case per gated cell, failures with numbers."""
from __future__ import annotations

from pathlib import Path

import pytest
from lxml import etree

from harness.results import junit
from harness.results import stored as report
from harness.core.store import FAIL, PASS, Row, write_results

DATA = Path(__file__).parent / "data"
SCHEMA = etree.XMLSchema(etree.parse(str(DATA / "junit-10.xsd")))


def validated(text: str) -> etree._Element:
    doc = etree.fromstring(text.encode("utf-8"))
    SCHEMA.assertValid(doc)
    return doc


@pytest.mark.parametrize("results", ["baseline/clean", "report/failing"])
def test_valid_and_one_case_per_gated_cell(results):
    summary = report.load_summary(DATA / results)
    doc = validated(junit.junit_xml([summary]))
    cells = doc.find("./testsuite[@name='llama-parity.logits']")      # findings, if any, are a suite apart
    cases = cells.findall("testcase")
    gated = [c for c in summary["cells"] if c["status"] in ("pass", "fail", "n/a")]
    assert len(cases) == len(gated) == int(cells.get("tests"))
    assert len(cells.findall("testcase/failure")) == summary["counts"]["fail"] == int(cells.get("failures"))
    assert len(cells.findall("testcase/skipped")) == summary["counts"]["n/a"]
    assert int(doc.get("failures")) == sum(int(t.get("failures")) for t in doc.findall("testsuite"))
    props = {p.get("name"): p.get("value") for p in doc.findall(".//property")}
    assert props["tolerance_policy"] == summary["policy"]["version"]
    assert props["verdict"] == summary["verdict"]


def test_failing_cell_is_a_failure_with_its_numbers():
    summary = report.load_summary(DATA / "report" / "failing")
    doc = validated(junit.junit_xml([summary]))
    by_name = {(c.get("classname"), c.get("name")): c for c in doc.findall(".//testcase")}
    failing = [c for c in summary["cells"] if c["status"] == "fail"]
    assert failing
    for cell in failing:
        tc = by_name[(f"llama_parity.logits.{cell['subject']}_vs_{cell['against']}", junit.case_name(cell))]
        failure = tc.find("failure")
        assert failure is not None
        msg = failure.get("message")
        assert f"{cell['value']:.6g}" in msg and f"{cell['tolerance']:.6g}" in msg and cell["metric"] in msg
    passing = [c for c in summary["cells"] if c["status"] == "pass"][0]
    tc = by_name[(f"llama_parity.logits.{passing['subject']}_vs_{passing['against']}", junit.case_name(passing))]
    assert len(tc) == 0


def test_markup_and_control_characters_stay_valid_xml(tmp_path):
    piece = "<script>\x01\x1b&\"'"
    rows = [Row("tokenizer", {"text": piece}, "transformers", "reference", "ids_differ", 1.0, 0.0, FAIL, reason=piece),
            Row("tokenizer", {"text": "ok"}, "transformers", "reference", "ids_differ", 0.0, 0.0, PASS)]
    write_results(tmp_path, "tokenizer", rows, {"device": "cpu"})
    doc = validated(junit.junit_xml([report.load_summary(tmp_path)]))
    failure = doc.find(".//failure")
    assert "<script>\\x01\\x1b&\"'" in failure.get("message")


def test_schema_rejects_what_ci_systems_would():
    # a testsuite without its required counts: proves the schema check is live, not vacuous
    assert not SCHEMA.validate(etree.fromstring(b'<testsuites><testsuite name="x"/></testsuites>'))
