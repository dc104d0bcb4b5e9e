"""The regression gate between two committed result sets (tests/data/baseline/README.md)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from harness.cli import main
from harness.results import regression as baseline
from harness.results import stored as report
from harness.core.errors import InputError

DATA = Path(__file__).parent / "data" / "baseline"


def _cells(name: str) -> list[dict]:
    return report.load_summary(DATA / name)["cells"]


def planted() -> tuple[dict, dict]:
    """(baseline cell, current cell) of the one value that differs between the committed sets."""
    diffs = [(b, c) for b, c in zip(_cells("clean"), _cells("regressed")) if b != c]
    assert len(diffs) == 1, "the regressed set must differ from the clean one in exactly one cell"
    return diffs[0]


def test_the_planted_regression_is_under_its_absolute_tolerance():
    b, c = planted()
    assert c["value"] > 2 * b["value"]                       # doubled: a real move
    assert c["value"] <= c["tolerance"] and c["status"] == "pass"   # the threshold gate lets it through
    assert report.load_summary(DATA / "regressed")["verdict"] == "pass"


def test_compare_flags_exactly_the_planted_cell(tmp_path, capsys):
    code = main(["compare", "--baseline", str(DATA / "clean"), "--current", str(DATA / "regressed"),
                            "--out", str(tmp_path)])
    assert code == 1
    out = json.loads((tmp_path / "summary.json").read_text())
    assert out["verdict"] == "fail" and out["counts"]["fail"] == 1
    assert out["policy"]["version"] == baseline.load_regression_policy().version
    failed = [c for c in out["cells"] if c["status"] == "fail"]
    b, c = planted()
    assert failed[0]["metric"] == c["metric"] and failed[0]["subject"] == c["subject"]
    assert {k: failed[0]["case"][k] for k in c["case"]} == c["case"]
    assert failed[0]["value"] == c["value"] and failed[0]["extra"]["baseline"] == b["value"]
    assert "regressed" in failed[0]["reason"]
    assert c["metric"] in capsys.readouterr().out


def test_same_results_do_not_move(tmp_path):
    code = main(["compare", "--baseline", str(DATA / "clean"), "--current", str(DATA / "clean"),
                            "--out", str(tmp_path)])
    out = json.loads((tmp_path / "summary.json").read_text())
    gated = [c for c in _cells("clean") if c["status"] in ("pass", "fail")]
    assert code == 0 and out["counts"]["pass"] == len(gated) and out["counts"]["fail"] == 0


def _one(value, status="pass", metric="kl_mean", tol=1.0):
    return {"suite": "logits", "cells": [{"suite": "logits", "case": {"dtype": "bfloat16"}, "subject": "transformers",
                                          "against": "oracle-fp64", "metric": metric, "value": value,
                                          "tolerance": tol, "status": status, "reason": ""}]}


@pytest.mark.parametrize("base,cur,expect", [
    (1e-4, 1.9e-4, "pass"),      # within factor 2
    (1e-4, 2.1e-4, "fail"),      # beyond it, though far under tolerance 1.0
    (1e-4, 1e-5, "pass"),        # improved
    (1e-4, "nan", "fail"),       # became non-finite
    (0.0, 1e-30, "fail"),        # from exactly 0, default slack is 0
])
def test_rule(base, cur, expect):
    rows = baseline.compare([_one(base)], [_one(cur)], baseline.load_regression_policy())
    assert [r.status for r in rows] == [expect]


def test_rate_metrics_get_one_position_of_slack():
    pol = baseline.load_regression_policy()
    slack = pol.for_metric("top1_disagree").slack
    ok = baseline.compare([_one(0.0, metric="top1_disagree")], [_one(slack, metric="top1_disagree")], pol)
    bad = baseline.compare([_one(0.0, metric="top1_disagree")], [_one(2 * slack, metric="top1_disagree")], pol)
    assert ok[0].status == "pass" and bad[0].status == "fail"


def test_newly_failing_and_missing_cells():
    pol = baseline.load_regression_policy()
    rows = baseline.compare([_one(0.5)], [_one(0.6, status="fail", tol=0.55)], pol)
    assert rows[0].status == "fail" and "newly fails" in rows[0].reason
    gone = {"suite": "logits", "cells": []}
    assert [r.status for r in baseline.compare([_one(0.5)], [gone], pol)] == ["fail"]
    assert [r.status for r in baseline.compare([_one(0.5)], [gone], pol, allow_missing=True)] == ["info"]
    assert [r.status for r in baseline.compare([gone], [_one(0.5)], pol)] == ["info"]   # new cell


def test_bad_regression_policy_names_file_and_key(tmp_path):
    p = tmp_path / "r.toml"
    p.write_text('version = "x"\n[default]\nfactor = 0.5\nslack = 0\nreason = "r"\n')
    with pytest.raises(InputError, match=r"r\.toml: \[default\]: factor = 0\.5 must be a finite number >= 1"):
        baseline.load_regression_policy(p)
    p.write_text('version = "x"\n[default]\nfactor = 2\nslack = 0\nreason = "r"\n[metric.kl_mean]\nslack = "a"\n')
    with pytest.raises(InputError, match=r"\[metric\.kl_mean\]"):
        baseline.load_regression_policy(p)
    code = main(["compare", "--baseline", str(DATA / "clean"), "--current", str(DATA / "clean"),
                            "--regression-policy", str(tmp_path / "none.toml"), "--out", str(tmp_path / "o")])
    assert code == 2 and not (tmp_path / "o").exists()


def test_policy_file_is_versioned_with_reasons():
    pol = baseline.load_regression_policy()
    assert pol.version and pol.default.reason and all(a.reason for a in pol.metrics.values())
    assert math.isclose(pol.for_metric("max_abs").factor, pol.default.factor)
