"""The pytest plugin: `pytest --llama-parity-model PATH` gives one test per parity cell.

Each check runs a separate pytest process in an empty folder (as a user's project would), writes
its JUnit XML, and counts what came back against the summary the run wrote. The plugin is loaded
by its `pytest11` entry point when the package is installed with it, else with -p.
"""
from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
from lxml import etree

from harness.results import stored as report
from harness.core.presets import write_preset

DATA = Path(__file__).parent / "data"
REGISTERED = any(ep.value == "harness.pytest_plugin" for ep in entry_points(group="pytest11"))


def run_pytest(tmp_path: Path, *args: str) -> tuple[int, etree._Element | None, str]:
    xml = tmp_path / "junit.xml"
    load = [] if REGISTERED else ["-p", "harness.pytest_plugin"]
    done = subprocess.run([sys.executable, "-m", "pytest", *load, "-p", "no:cacheprovider", "-q",
                           f"--junitxml={xml}", *args], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    doc = etree.parse(str(xml)).getroot() if xml.exists() else None
    return done.returncode, doc, done.stdout + done.stderr


def counts(doc) -> dict[str, int]:
    cases = doc.findall(".//testcase")
    return {"tests": len(cases), "fail": sum(c.find("failure") is not None for c in cases),
            "skip": sum(c.find("skipped") is not None for c in cases)}


@pytest.mark.parametrize("results", ["baseline/clean", "report/failing"])
def test_stored_results_one_test_per_cell(results, tmp_path):
    summary = report.load_summary(DATA / results)
    code, doc, out = run_pytest(tmp_path, "--llama-parity-results", str(DATA / results))
    c = summary["counts"]
    assert counts(doc) == {"tests": c["pass"] + c["fail"] + c["n/a"], "fail": c["fail"], "skip": c["n/a"]}, out
    assert code == (1 if c["fail"] else 0)
    if c["fail"]:
        cell = next(x for x in summary["cells"] if x["status"] == "fail")
        assert f"{cell['metric']} = {cell['value']:.6g}, tolerance {cell['tolerance']:.6g}" in out


def test_model_run_one_test_per_cell_and_gate(tmp_path):
    model = write_preset("tiny-mha", tmp_path / "model", fmt="meta")
    matrix = ["--llama-parity-dtypes", "float32", "--llama-parity-attn", "eager", "--llama-parity-tp", "1",
              "--llama-parity-shapes", "1x8"]
    (tmp_path / "ok").mkdir()
    code, doc, out = run_pytest(tmp_path / "ok", "--llama-parity-model", str(model), *matrix,
                                "--llama-parity-out", str(tmp_path / "ok-results"))
    summary = report.load_summary(tmp_path / "ok-results")
    assert code == 0, out
    assert counts(doc) == {"tests": summary["counts"]["pass"], "fail": 0, "skip": 0} and summary["counts"]["pass"] > 0
    (tmp_path / "bad").mkdir()
    code, doc, out = run_pytest(tmp_path / "bad", "--llama-parity-model", str(model), *matrix,
                                "--llama-parity-plant", "no-permute", "--llama-parity-out", str(tmp_path / "bad-results"))
    summary = report.load_summary(tmp_path / "bad-results")
    assert code == 1 and summary["plant"] == "no-permute"
    assert counts(doc)["fail"] == summary["counts"]["fail"] > 0
    # each failure says where its group diverged first and which finding explains it
    point = summary["first_divergence"]["point"]
    messages = [f.get("message") for f in doc.iter("failure")]
    assert all(f"first divergence: {point}" in m and "finding logits/" in m for m in messages), messages[:1]
    assert f"first divergence: {point}" in out


def test_bad_model_path_is_a_usage_error(tmp_path):
    code, _, out = run_pytest(tmp_path, "--llama-parity-model", str(tmp_path / "missing"))
    assert code == 4 and str(tmp_path / "missing") in out   # pytest's exit code for usage errors
