"""The museum of real regressions (suites/history.toml, scripts/history.py): the catalogue is
valid and the verdict logic decides right, on synthetic rows. No model runs here; the runs
themselves are `tox -m history` (reports/history/)."""
from __future__ import annotations

import configparser
import copy
import importlib.util
import json
import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load_module():
    spec = importlib.util.spec_from_file_location("history", ROOT / "scripts" / "history.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


history = _load_module()
DATA = history.load()
IN_SCOPE = history.in_scope(DATA)


def row(status="fail", subject="transformers.LlamaTokenizer", metric="encode", reason="", **case):
    return {"suite": "tokenizer", "subject": subject, "against": "sentencepiece", "metric": metric,
            "status": status, "reason": reason, "case": case}


ENTRY = {"id": "x", "caught": {"subject": "transformers.LlamaTokenizer*", "loader": "from_pretrained",
                               "flags": "legacy=False", "case": "special-*", "metric": "encode", "status": "fail"}}


# --- the catalogue --------------------------------------------------------------------------------

def test_catalogue_is_valid():
    assert history.validate(DATA) == []
    assert DATA["version"]
    assert len(DATA["entry"]) == 20
    assert len({e["id"] for e in DATA["entry"]}) == len(DATA["entry"])


@pytest.mark.parametrize("e", DATA["entry"], ids=lambda e: e["id"])
def test_every_entry_has_its_fields(e):
    for k in history.REQUIRED:
        assert e.get(k), k
    assert e["source"] and all(re.fullmatch(r"[\w.-]+/[\w.-]+#\d+", s) for s in e["source"]), e["source"]
    if not e.get("in_scope", True):
        assert e["out_of_scope_reason"]
        assert "argv" not in e and "caught" not in e       # listed, never run
        return
    for k in history.REQUIRED_IN_SCOPE:
        assert k in e, k
    assert e["ok_kind"] in history.OK_KINDS
    assert e["bug_release"] != e["ok_release"]


@pytest.mark.parametrize("e", IN_SCOPE, ids=lambda e: e["id"])
def test_releases_sit_on_the_right_side_of_affected(e):
    """bug_release inside the affected specifier, ok_release outside it."""
    from packaging.specifiers import SpecifierSet
    spec = SpecifierSet(e["affected"])
    assert e["bug_release"] in spec
    assert e["ok_release"] not in spec


@pytest.mark.parametrize("e", IN_SCOPE, ids=lambda e: e["id"])
def test_patterns_parse_and_name_known_fields(e):
    assert history.pattern_problems(e["caught"]) == []
    for k, v in e["caught"].items():
        assert k in history.ROW_FIELDS + history.CASE_FIELDS
        re.compile(__import__("fnmatch").translate(v))
    assert e["caught"]["status"] == "fail"


@pytest.mark.parametrize("e", IN_SCOPE, ids=lambda e: e["id"])
def test_argv_placeholders_are_known_and_the_harness_parses_it(e):
    names = [n for a in e["argv"] for n in history.placeholders_in(a)]
    assert set(names) <= set(history.PLACEHOLDERS)
    argv = [re.sub(r"\{[^{}]*\}", "/nonexistent/fixture", a) for a in e["argv"]]
    from harness.cli import build_parser
    a = build_parser().parse_args(argv + ["--out", "/tmp/x"])
    assert a.command == e["argv"][0]


def _tokenizer_catalogue_names() -> set[str]:
    cat = tomllib.loads((ROOT / "suites" / "tokenizer.toml").read_text(encoding="utf-8"))
    return {c["name"] for kind in ("encode", "decode", "batch", "padding") for c in cat.get(kind, [])}


@pytest.mark.parametrize("e", [e for e in IN_SCOPE if e["argv"][0] == "tokenizer"], ids=lambda e: e["id"])
def test_tokenizer_patterns_name_catalogue_cases_and_selected_subjects(e):
    import fnmatch
    names = _tokenizer_catalogue_names()
    assert any(fnmatch.fnmatchcase(n, e["caught"]["case"]) for n in names), e["caught"]["case"]
    subjects = e["argv"][e["argv"].index("--subjects") + 1].split(",") if "--subjects" in e["argv"] else ["*"]
    p = e["caught"]
    label = "/".join(x for x in (p["subject"], p.get("loader", "*"), p.get("flags", "")) if x)
    # the subjects the run selects must be able to produce the pattern's rows
    assert any(fnmatch.fnmatchcase(s.replace("/", "|"), label.replace("/", "|")) or s == "*" for s in subjects), \
        (subjects, label)


@pytest.mark.parametrize("e", [e for e in IN_SCOPE if e["argv"][0] == "train"], ids=lambda e: e["id"])
def test_train_patterns_name_an_input_the_command_runs(e):
    """A train entry's pattern can only match rows of an input its command selects, and its --strict
    names only known deviations of the suite (a typo would gate nothing and exit 2)."""
    from harness.suites.train import INPUTS, strict_names
    from harness.suites.train.lora import ROW_INPUTS
    argv = e["argv"]
    selected = argv[argv.index("--inputs") + 1].split(",") if "--inputs" in argv else list(INPUTS)
    if "lora" in selected:     # the lora input writes rows of several settings
        selected += ROW_INPUTS
    assert e["caught"]["input"] in selected, (e["caught"]["input"], selected)
    if "--strict" in argv and argv.index("--strict") + 1 < len(argv) and not argv[argv.index("--strict") + 1].startswith("--"):
        assert strict_names(argv[argv.index("--strict") + 1])


def test_train_strict_names_are_checked():
    from harness.core.errors import InputError
    from harness.suites.train import strict_names
    from harness.suites.train.accumulate import KNOWN_NAMES
    assert strict_names(None) == frozenset()
    assert strict_names("all") == frozenset(KNOWN_NAMES)
    assert strict_names("grad-accum-per-micro-batch-mean") == {"grad-accum-per-micro-batch-mean"}
    with pytest.raises(InputError, match="--strict"):
        strict_names("grad-accum-typo")


def test_tox_has_one_env_per_release_with_that_pin():
    ini = configparser.ConfigParser(interpolation=None)
    ini.read(ROOT / "tox.ini")
    section = next(s for s in ini.sections() if s.startswith("testenv:history-{"))
    factors = re.search(r"\{(.*)\}", section).group(1).split(",")
    pins = dict(re.findall(r"(tf\d+): transformers==(\S+)", ini[section]["deps"]))
    assert "torch==2.13.0" in ini[section]["deps"]
    assert set(factors) == set(pins)
    assert sorted(pins.values()) == sorted(history.releases(DATA))
    for f, v in pins.items():
        assert f == "tf" + v.replace(".", ""), (f, v)
    assert "history" in ini["testenv:history"]["commands"] or "merge" in ini["testenv:history"]["commands"]
    assert {f"history-{f}" for f in factors} == set(ini["testenv:history"]["depends"].split())
    # an entry that pins peft beside a release: that release's env installs exactly that peft
    peft_pins = dict(re.findall(r"(tf\d+): peft==(\S+)", ini[section]["deps"]))
    wanted = {"tf" + e[f"{role}_release"].replace(".", ""): e[f"{role}_peft"]
              for e in IN_SCOPE for role in ("bug", "ok") if f"{role}_peft" in e}
    assert wanted and peft_pins == wanted


# --- validation catches a broken catalogue ------------------------------------------------------------

def _broken(**change):
    data = copy.deepcopy(DATA)
    e = next(x for x in data["entry"] if x.get("in_scope", True))
    for k, v in change.items():
        if v is None:
            e.pop(k, None)
        else:
            e[k] = v
    return history.validate(data)


@pytest.mark.parametrize("change, needle", [
    ({"ok_release": None}, "missing 'ok_release'"),
    ({"bug_release": "4.31"}, "not a release"),
    ({"ok_kind": "whatever"}, "ok_kind"),
    ({"argv": ["tokenizer", "--out", "x"]}, "--out"),
    ({"argv": ["tokenizer", "--model", "{nope}"]}, "unknown placeholder {nope}"),
    ({"argv": ["make-model"]}, "not a harness suite"),
    ({"caught": {"subject": "*", "metric": "*", "status": "pass"}}, "status' must be \"fail\""),
    ({"caught": {"subject": "*", "metric": "*", "colour": "red", "status": "fail"}}, "no row field"),
    ({"caught": {"metric": "*", "status": "fail"}}, "must name 'subject'"),
    ({"caught": {"subject": 3, "metric": "*", "status": "fail"}}, "string pattern"),
])
def test_validation_names_the_problem(change, needle):
    problems = _broken(**change)
    assert any(needle in p for p in problems), problems


def test_out_of_scope_entries_need_a_reason():
    data = copy.deepcopy(DATA)
    e = next(x for x in data["entry"] if not x.get("in_scope", True))
    e.pop("out_of_scope_reason")
    assert any("out_of_scope_reason" in p for p in history.validate(data))


# --- the verdict logic ------------------------------------------------------------------------------

def test_caught_on_a_matching_failing_row():
    cells = [row("pass", loader="from_pretrained", flags="legacy=False", case="special-eos-then-space-text"),
             row("fail", loader="from_pretrained", flags="legacy=False", case="special-eos-then-space-text",
                 reason="differs from sentencepiece")]
    d = history.decide(ENTRY, "bug", cells, 1)
    assert d["verdict"] == "caught" and d["ok"]
    assert d["rows"] == [cells[1]]


@pytest.mark.parametrize("cell", [
    row("info", loader="from_pretrained", flags="legacy=False", case="special-bos-then-text"),   # known, not gated
    row("fail", loader="from_pretrained", flags="legacy=True", case="special-bos-then-text"),    # other flags
    row("fail", loader="saved", flags="legacy=False", case="special-bos-then-text"),             # other loader
    row("fail", loader="from_pretrained", flags="legacy=False", case="space-leading"),           # other case
    row("fail", loader="from_pretrained", flags="legacy=False", case="special-x", metric="roundtrip"),
    row("fail", subject="reference", loader="from_pretrained", flags="legacy=False", case="special-x"),
])
def test_not_caught_when_no_failing_row_matches(cell):
    d = history.decide(ENTRY, "bug", [cell], 1)
    assert d["verdict"] == "not caught" and not d["ok"]
    assert d["rows"] == []


def test_not_caught_when_the_harness_wrote_nothing():
    d = history.decide(ENTRY, "bug", [], 3)
    assert d["verdict"] == "not caught" and "exited 3" in d["why"]


def test_a_missing_field_reads_as_empty():
    e = {"caught": {"subject": "transformers", "metric": "all", "flags": "", "status": "fail"}}
    logits_row = {"subject": "transformers", "metric": "all", "status": "fail", "case": {"tp": 2}}
    assert history.decide(e, "bug", [logits_row])["verdict"] == "caught"
    e["caught"]["flags"] = "legacy=*"
    assert history.decide(e, "bug", [logits_row])["verdict"] == "not caught"


def test_case_settings_match_as_strings():
    e = {"caught": {"subject": "transformers", "metric": "*", "tp": "2", "length": "4160", "status": "fail"}}
    assert history.decide(e, "bug", [{"subject": "transformers", "metric": "all", "status": "fail",
                                      "case": {"tp": 2, "length": 4160}}])["verdict"] == "caught"


def test_reason_pattern_picks_the_mechanism():
    e = {"caught": {"subject": "transformers", "metric": "*", "reason": "*IndexError*", "status": "fail"}}
    other = {"subject": "transformers", "metric": "kl_max", "status": "fail", "reason": "0.3 > 0.1", "case": {}}
    crash = {"subject": "transformers", "metric": "all", "status": "fail", "case": {},
             "reason": "transformers forward failed: IndexError: index 4096 is out of bounds"}
    assert history.decide(e, "bug", [other])["verdict"] == "not caught"
    assert history.decide(e, "bug", [other, crash])["rows"] == [crash]


def test_ok_release_passes_when_scope_rows_pass_or_are_known():
    cells = [row("pass", loader="from_pretrained", flags="legacy=False", case="special-bos-then-text"),
             row("info", loader="from_pretrained", flags="legacy=False", case="special-eos-then-space-text"),
             row("fail", loader="from_pretrained", flags="legacy=False", case="space-leading")]  # outside the pattern
    d = history.decide(ENTRY, "ok", cells, 1)
    assert d["verdict"] == "passes" and d["ok"]
    assert d["in_scope_counts"] == {"pass": 1, "fail": 0, "info": 1, "n/a": 0}


def test_ok_release_still_fails_whatever_the_reason():
    """Scope is the pattern without status and reason: a failing row for another reason still fails."""
    e = {"caught": {"subject": "transformers", "metric": "*", "reason": "*IndexError*", "status": "fail"}}
    cells = [{"subject": "transformers", "metric": "kl_max", "status": "fail", "reason": "0.3 > 0.1", "case": {}},
             {"subject": "transformers", "metric": "max_abs", "status": "pass", "reason": "", "case": {}}]
    d = history.decide(e, "ok", cells)
    assert d["verdict"] == "still fails" and not d["ok"]
    assert d["rows"] == [cells[0]]


@pytest.mark.parametrize("cells", [
    [],                                                                                     # nothing in scope
    [row("n/a", loader="from_pretrained", flags="legacy=False", case="special-x", reason="loading failed")],
    [row("pass", subject="reference", loader="from_pretrained", flags="legacy=False", case="special-x")],
])
def test_ok_release_not_measured_is_not_a_pass(cells):
    d = history.decide(ENTRY, "ok", cells)
    assert d["verdict"] == "not measured" and not d["ok"]


def test_ok_release_accepts_na_only_with_a_reason():
    e = dict(ENTRY, ok_accepts_na="the release ignores the setting")
    cells = [row("n/a", loader="from_pretrained", flags="legacy=False", case="special-x")]
    d = history.decide(e, "ok", cells)
    assert d["verdict"] == "passes" and "accepted" in d["why"]
    assert history.decide(e, "ok", cells + [row("fail", loader="from_pretrained", flags="legacy=False",
                                                    case="special-y")])["verdict"] == "still fails"


def test_checks_for_a_release_pick_both_roles():
    picked = {(e["id"], role) for e, role in history.checks_for(DATA, "4.46.3")}
    assert ("pretraining-tp-vocab-truncation", "bug") in picked and ("logits-dtype-contract", "bug") in picked
    assert history.checks_for(DATA, "9.9.9") == []
    assert all(e.get("in_scope", True) for e, _ in history.checks_for(DATA, "4.31.0"))


def test_peft_pins_pick_the_pairing():
    """An entry that pins peft runs only beside that peft; elsewhere it is named as waiting, not dropped."""
    e = next(x for x in IN_SCOPE if "bug_peft" in x)
    rel, peft = e["bug_release"], e["bug_peft"]
    assert (e["id"], "bug") in {(x["id"], r) for x, r in history.checks_for(DATA, rel, peft)}
    for other in (None, "9.9.9"):
        assert e["id"] not in {x["id"] for x, _ in history.checks_for(DATA, rel, other)}
        assert (e["id"], "bug") in {(x["id"], r) for x, r in history.waiting_for(DATA, rel, other)}
    # entries without a peft pin run whatever peft is installed
    assert history.checks_for(DATA, "4.46.3", "0.5.0") == history.checks_for(DATA, "4.46.3")
    assert history.pairing(e, "bug") == f"{rel} + peft {peft}"
    assert history.pairing(DATA["entry"][0], "bug") == DATA["entry"][0]["bug_release"]


@pytest.mark.parametrize("change, needle", [
    ({"bug_peft": "0.5.0"}, "go together"),
    ({"bug_peft": "0.5", "ok_peft": "0.5.0"}, "'bug_peft' = '0.5' is not a release"),
])
def test_peft_pins_are_validated(change, needle):
    assert any(needle in p for p in _broken(**change))


def test_read_cells_gathers_every_part(tmp_path):
    for part, status in (("cast", "fail"), ("flags", "pass")):
        (tmp_path / part).mkdir()
        (tmp_path / part / "summary.json").write_text(json.dumps(
            {"cells": [{"subject": "transformers", "metric": "all", "status": status, "case": {}}]}))
    cells = history.read_cells(tmp_path)
    assert sorted(c["part"] for c in cells) == ["cast", "flags"]


def test_prune_keeps_only_reports(tmp_path):
    (tmp_path / "cast").mkdir()
    for name in ("summary.json", "results.csv", "report.md", "cast/summary.json", "cast/report.md", "journal.jsonl"):
        (tmp_path / name).write_text("x")
    history.prune(tmp_path)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == \
        ["cast/report.md", "report.md"]


def test_merge_table_marks_missing_and_wrong_verdicts():
    e = IN_SCOPE[0]
    found = {(e["id"], e["bug_release"]): {
        "id": e["id"], "release": e["bug_release"], "role": "bug", "verdict": "caught", "ok": True,
        "why": "1 row(s) match", "first_row": "transformers [x] m: fail - r", "protobuf_shim": False,
        "seconds": 1.0, "environment": {"prefix": "/venv", "overlay": None}}}
    text, bad = history.render(DATA, found)
    assert f"| **{e['id']}**" in text and "caught" in text and "**not run**" in text
    assert bad == 2 * len(IN_SCOPE) - 1                # every other check is missing
    found[(e["id"], e["bug_release"])]["ok"] = False
    assert history.render(DATA, found)[1] == 2 * len(IN_SCOPE)
    for o in (x for x in DATA["entry"] if not x.get("in_scope", True)):
        assert o["id"] in text                          # listed, not run


def test_describe_is_one_readable_line():
    line = history.describe(row("fail", loader="from_pretrained", flags="legacy=False", kind="encode",
                                case="special-eos-then-space-text", reason="differs\nfrom sentencepiece"))
    assert line == ("transformers.LlamaTokenizer [special-eos-then-space-text, from_pretrained, legacy=False] "
                    "encode: fail - differs from sentencepiece")


def test_strongest_evidence_comes_first():
    weak = {"subject": "transformers", "metric": "nmse", "status": "fail", "value": 1.05, "tolerance": 1.0, "case": {}}
    strong = {"subject": "transformers", "metric": "kl_max", "status": "fail", "value": 3.0, "tolerance": 1.0, "case": {}}
    crash = {"subject": "transformers", "metric": "all", "status": "fail", "value": None, "tolerance": None, "case": {}}
    e = {"caught": {"subject": "transformers", "metric": "*", "status": "fail"}}
    assert history.decide(e, "bug", [weak, strong, crash])["rows"] == [crash, strong, weak]
    assert history.strength({"value": 1.0, "tolerance": 0.0}) == float("inf")      # tokenizer rows: any diff
    assert history.strength({"value": 0.0, "tolerance": 0.0}) == 0.0


def test_harness_tree_names_what_ran():
    tree = history.harness_tree()
    assert re.fullmatch(r"[0-9a-f]{64}", tree["tree_sha256"])
    assert tree["changed_files"] is None or all(not f.endswith("history.toml") for f in tree["changed_files"])
