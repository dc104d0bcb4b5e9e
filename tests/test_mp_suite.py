"""The mp suite end to end on a tiny model: rows, the claim table, n/a reasons and bad input."""
from __future__ import annotations

import json

import pytest

from harness.cli import main
from harness.core.compat import tp_honoured
from harness.core.errors import InputError


def mp(model, out, *argv) -> int:
    return main(["mp", "--model", str(model), "--out", str(out), *argv])


@pytest.fixture(scope="module")
def mp_run(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("mp")
    code = mp(models["tiny-mha/meta"], out, "--degrees", "1,2,4", "--dtypes", "float32,bfloat16", "--shapes", "1x9")
    return code, json.loads((out / "summary.json").read_text()), out


def _value(cells, **match):
    hits = [c for c in cells if all((c["case"].get(k) if k in ("dtype", "degree", "tp") else c[k]) == v
                                    for k, v in match.items())]
    assert len(hits) == 1, match
    return hits[0]["value"]


def test_every_degree_and_dtype_is_measured_against_both_truths(mp_run):
    code, summary, out = mp_run
    assert code == 0 and summary["suite"] == "mp"
    cells = summary["cells"]
    for k in (1, 2, 4):
        for dtype in ("float32", "bfloat16"):
            for against in ("mp-original", "oracle-fp64"):
                assert _value(cells, dtype=dtype, degree=k, tp=1, subject="transformers", against=against,
                              metric="rel_l2") > 0
            assert _value(cells, dtype=dtype, degree=k, tp="-", subject="mp-original", against="oracle-fp64",
                          metric="rel_l2") > 0
    assert (out / "results.csv").exists() and "Claim tested" in (out / "report.md").read_text()


def test_claim_rows_restate_the_measured_distances(mp_run):
    _, summary, _ = mp_run
    cells = summary["cells"]
    if not tp_honoured():
        assert summary["claims"] == []
        na = [c for c in cells if c["case"].get("tp") in (2, 4)]
        assert na and all(c["status"] == "n/a" and "no-op" in c["reason"] for c in na)
        return
    assert {(c["dtype"], c["degree"]) for c in summary["claims"]} == {
        (d, k) for d in ("float32", "bfloat16") for k in (2, 4)}
    for c in summary["claims"]:
        tp1 = _value(cells, dtype=c["dtype"], degree=c["degree"], tp=1, subject="transformers",
                     against="mp-original", metric="rel_l2")
        tpk = _value(cells, dtype=c["dtype"], degree=c["degree"], tp=c["degree"], subject="transformers",
                     against="mp-original", metric="rel_l2")
        assert (c["tp1_vs_original"], c["tpk_vs_original"]) == (tp1, tpk)
        assert c["holds"] == (tpk < tp1) and c["factor"] == pytest.approx(tp1 / tpk)
    # tp is live: slicing the row-parallel sums must change the bfloat16 logits.
    assert _value(cells, dtype="bfloat16", degree=2, tp=1, subject="transformers", against="oracle-fp64",
                  metric="max_abs") != _value(cells, dtype="bfloat16", degree=2, tp=2, subject="transformers",
                                              against="oracle-fp64", metric="max_abs")


def test_a_degree_that_splits_kv_heads_is_not_applicable(models, tmp_path, capsys):
    # every cell n/a: nothing was measured, so there is no verdict to give (exit 2, not a pass)
    assert mp(models["tiny-gqa/meta"], tmp_path, "--degrees", "4", "--dtypes", "float32", "--shapes", "1x5") == 2
    err = capsys.readouterr().err
    assert "nothing was measured" in err and "n_kv_heads = 2 does not split across model-parallel degree 4" in err
    assert not (tmp_path / "summary.json").exists()


def test_real_ranks_agree_with_the_emulation(models, tmp_path):
    assert mp(models["tiny-mha/meta"], tmp_path, "--degrees", "2", "--dtypes", "float32,float16", "--shapes", "1x6",
              "--ranks", "real") == 0
    checks = [c for c in json.loads((tmp_path / "summary.json").read_text())["cells"]
              if c["subject"] == "mp-real-ranks"]
    # within the reduction rounding bound (separate processes may block their matmuls differently)
    assert len(checks) == 2 and all(c["status"] == "pass" and c["value"] <= c["tolerance"] for c in checks)
    assert all(c["tolerance"] < 1e-4 for c in checks if c["case"]["dtype"] == "float32")


@pytest.mark.parametrize("argv, named", [
    (["--degrees", "0"], "--degrees"),
    (["--dtypes", "float8"], "--dtypes"),
    (["--model", "/nonexistent/model"], "--model"),
    (["--attn", "magic"], "--attn"),
])
def test_bad_input_exits_2_naming_the_argument(models, tmp_path, capsys, argv, named):
    base = ["mp", "--model", str(models["tiny-mha/meta"]), "--out", str(tmp_path / "o")]
    assert main(base + argv) == 2
    assert named in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# --- the matrix merge ------------------------------------------------------------------------------

def _fake_run(root, folder, release, rows):
    from harness.core.store import write_results
    return write_results(root / folder / "mp", "mp", rows, {"transformers": release})


def test_matrix_merges_releases_suites_and_cases(tmp_path):
    import pandas as pd

    from harness.results.matrix import merge
    from harness.core.store import Row
    case = {"dtype": "bfloat16", "degree": 2, "tp": 2}
    _fake_run(tmp_path, "b", "4.46.3", [Row("mp", case, "transformers", "mp-original", "rel_l2", 0.25, status="info")])
    _fake_run(tmp_path, "a", "4.31.0", [Row("mp", case, "transformers", "mp-original", "rel_l2", 0.5, status="info")])
    _fake_run(tmp_path, "c", "10.0.0", [Row("mp", case, "transformers", "mp-original", "all", None, status="n/a",
                                             reason="pretraining_tp is a no-op here")])
    (tmp_path / "c" / "pytest.xml").write_text(
        '<testsuites><testsuite><testcase classname="t" name="x"><skipped message="needs sdpa"/></testcase>'
        '<testcase classname="t" name="y"/></testsuite></testsuites>')
    frame = merge(tmp_path)
    assert len(frame) == 5 and set(frame.release) == {"4.31.0", "4.46.3", "10.0.0"}
    assert len(pd.read_csv(tmp_path / "matrix.csv")) == 5
    md = (tmp_path / "matrix.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| case"))
    assert header.index("4.31.0") < header.index("4.46.3") < header.index("10.0.0")   # by version, not text
    row = next(line for line in md.splitlines() if line.startswith("| dtype=bfloat16"))
    assert "| 0.5 | 0.25 | n/a |" in row
    assert "n/a at 10.0.0: pretraining_tp is a no-op here" in md
    assert "`t::x`" not in md   # one release only: nothing to contrast, but counted
    assert "| 10.0.0 | 1 | 0 | 1 |" in md


def test_matrix_refuses_an_empty_or_missing_root(tmp_path):
    from harness.results.matrix import main, merge
    with pytest.raises(InputError, match="--root"):
        merge(tmp_path / "absent")
    assert main(["--root", str(tmp_path)]) == 2


# --- --subject: any kind that takes the tp axis ---------------------------------------------------

@pytest.fixture
def off_kind(monkeypatch):
    """A kind registered for the test, taking the tp axis, whose layer 0 is 1% off (so its rows
    cannot be transformers' rows under another name); and the same without the axis."""
    from subjects_common import drifted, register_kind
    register_kind(monkeypatch, "mp-off", drifted("mp-off", 0), ("attn", "tp"))
    register_kind(monkeypatch, "mp-off-no-tp", drifted("mp-off-no-tp", 0), ("attn",))


def test_a_kind_that_takes_the_tp_axis_is_the_subject(models, tmp_path, off_kind):
    """The rows carry the kind's label and its own logits (not transformers'), the summary says who it
    was, and the claim is tested on it where pretraining_tp is live."""
    base, other = tmp_path / "base", tmp_path / "other"
    args = ("--degrees", "1,2", "--dtypes", "float32", "--shapes", "1x8")
    assert mp(models["tiny-mha/meta"], base, *args) == 0
    assert mp(models["tiny-mha/meta"], other, *args, "--subject", "mp-off") == 0
    a, b = (json.loads((d / "summary.json").read_text()) for d in (base, other))
    assert {c["subject"] for c in b["cells"]} == {"mp-original", "mp-off"}
    assert b["subject"]["label"] == "mp-off" and b["subject"]["settings"]["tp"] in (1, 2)
    kw = dict(dtype="float32", degree=1, tp=1, against="oracle-fp64", metric="max_abs")
    assert _value(b["cells"], subject="mp-off", **kw) > 10 * _value(a["cells"], subject="transformers", **kw)
    assert len(b["claims"]) == (1 if tp_honoured() else 0)


@pytest.mark.parametrize("spec, says", [("mp-off-no-tp", "kinds that can: "), ("mp-off:tp=2", "with its own flags")])
def test_a_kind_without_the_tp_axis_or_a_tp_option_is_exit_2(models, tmp_path, capsys, off_kind, spec, says):
    out = tmp_path / "out"
    assert mp(models["tiny-mha/meta"], out, "--subject", spec) == 2
    err = capsys.readouterr().err
    assert spec in err and says in err, err
    assert not out.exists()
