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


# --- every suite, both environments, what moved (issues 19 and 20) ---------------------------------

def _write(folder: Path, summary: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def _summary(cells: list[dict], transformers: str = "5.24.0", suite: str = "logits", **extra) -> dict:
    failing = sum(c["status"] == "fail" for c in cells)
    counts = {s: sum(c["status"] == s for c in cells) for s in ("pass", "fail", "n/a", "info")}
    env = {"transformers": transformers, "torch": "2.13.0+cpu", "tokenizers": "0.23.3", "device": "cpu",
           "harness_commit": "abc", "lm_eval": "0.4.13"}
    return {"suite": suite, "verdict": "fail" if failing else "pass", "counts": counts,
            "model": {"path": "/m", "fingerprint": "f00d"}, "seed": 0, "policy": {"version": "p1"},
            **extra, "environment": env, "cells": cells}


def _cell(metric, value, status="pass", tol=1.0, suite="logits", reason=""):
    return {"suite": suite, "case": {"dtype": "float32"}, "subject": "transformers", "against": "oracle-fp64",
            "metric": metric, "value": value, "tolerance": tol, "status": status, "reason": reason}


def test_every_output_names_both_releases(tmp_path, capsys):
    """5.24.0 -> 5.25.0 in the console, report.md, the HTML page and JUnit, pass or fail."""
    b = _write(tmp_path / "b", _summary([_cell("kl_mean", 1e-4)]))
    c = _write(tmp_path / "c", _summary([_cell("kl_mean", 1.1e-4)], transformers="5.25.0"))
    code = main(["compare", "--baseline", str(b), "--current", str(c), "--out", str(tmp_path / "o"), "--html"])
    assert code == 0
    said = capsys.readouterr()
    assert "transformers 5.24.0 -> 5.25.0" in said.out
    for f in ("report.md", "report/junit.xml", "report/index.html", "summary.json"):
        assert "5.24.0 -&gt; 5.25.0" in (tmp_path / "o" / f).read_text() or \
            "5.24.0 -> 5.25.0" in (tmp_path / "o" / f).read_text(), f
    out = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert out["baseline"]["environment"]["transformers"] == "5.24.0"
    assert out["current"]["environment"]["transformers"] == "5.25.0"
    assert out["current"]["environment"]["lm_eval"] == "0.4.13"


def test_reason_is_the_metric_it_names(tmp_path):
    """One cell, two metrics: the one that newly fails is shown with its own reason, not beside a
    passing metric closer to its regression limit (the issue's mislabelled reason column)."""
    b = _write(tmp_path / "b", _summary([_cell("kl_mean", 1e-4), _cell("max_abs", 0.5, tol=1.0)]))
    c = _write(tmp_path / "c", _summary([_cell("kl_mean", 1.05e-4, status="fail", tol=1e-4, reason="1.05e-4 > 1e-4"),
                                         _cell("max_abs", 0.95, tol=1.0)], transformers="5.25.0"))
    assert main(["compare", "--baseline", str(b), "--current", str(c), "--out", str(tmp_path / "o")]) == 1
    report = (tmp_path / "o" / "report.md").read_text()
    failing = [ln for ln in report.splitlines() if "| fail |" in ln]
    assert len(failing) == 1 and "| kl_mean |" in failing[0] and "kl_mean newly fails" in failing[0]
    assert "max_abs" not in failing[0]


def test_status_only_cells_and_higher_is_better(tmp_path):
    """A tokenizer check (no number) and bench's McNemar p (larger is better) move only by status."""
    pol = baseline.load_regression_policy()
    tok = lambda status: {"suite": "tokenizer", "cells": [_cell("ids_match", None, status, None, "tokenizer")]}
    assert [r.status for r in baseline.compare([tok("pass")], [tok("fail")], pol)] == ["fail"]
    assert [r.status for r in baseline.compare([tok("fail")], [tok("fail")], pol)] == ["pass"]
    p = lambda v, status="pass": {"suite": "bench", "cells": [_cell("mcnemar_p", v, status, 0.05, "bench")]}
    assert [r.status for r in baseline.compare([p(1.0)], [p(0.2)], pol)] == ["pass"]       # not a regression by size
    assert [r.status for r in baseline.compare([p(1.0)], [p(0.01, "fail")], pol)] == ["fail"]


def test_incomplete_baseline_is_refused_naming_the_field(tmp_path, capsys):
    s = _summary([_cell("kl_mean", 1e-4)])
    del s["cells"][0]["suite"]
    b = _write(tmp_path / "b", s)
    c = _write(tmp_path / "c", _summary([_cell("kl_mean", 1e-4)]))
    assert main(["compare", "--baseline", str(b), "--current", str(c), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "--baseline" in err and "cells[0]" in err and "'suite'" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("what,edit", [
    ("model", lambda s: s["model"].update(fingerprint="beef")),
    ("inputs", lambda s: s.update(seed=3)),
    ("tolerance policy", lambda s: s.update(policy={"version": "p2"})),
])
def test_different_model_inputs_or_policy_refused_or_warned(tmp_path, capsys, what, edit):
    b = _write(tmp_path / "b", _summary([_cell("kl_mean", 1e-4)]))
    cur = _summary([_cell("kl_mean", 1e-5)], transformers="5.25.0")
    edit(cur)
    c = _write(tmp_path / "c", cur)
    assert main(["compare", "--baseline", str(b), "--current", str(c), "--out", str(tmp_path / "o")]) == 2
    assert f"different {what}" in capsys.readouterr().err and not (tmp_path / "o").exists()
    # compared anyway on request, with the warning at the top of every output (an "improved" cell
    # of another model must not read as good news)
    assert main(["compare", "--baseline", str(b), "--current", str(c), "--out", str(tmp_path / "o"),
                 "--allow-mismatch", "--html"]) == 0
    assert f"WARNING: baseline and current differ: logits: different {what}" in capsys.readouterr().out
    for f in ("report.md", "report/junit.xml"):
        assert f"different {what}" in (tmp_path / "o" / f).read_text()
