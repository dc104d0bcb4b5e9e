"""Tokenizer findings: each failing cell explained by a mechanism, known ones listed but not gating
(unless --strict), new ones failing the run. Subjects here are emulated (their behaviour planted
from the registry or built from the mechanism models), so the verdicts do not depend on which
transformers release is installed; no transformers tokenizer is loaded."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest

from harness.cli import finish
from harness.core import real_tokenizer as fixtures
from harness.core.faults import get_fault
from harness.core.findings import collect, key
from harness.core.store import FAIL, INFO, PASS
from harness.core.suite import Context, Part, Result
from harness.suites.tokenizer import checks
from harness.suites.tokenizer.catalogue import load_catalogue
from harness.suites.tokenizer.checks import Judge, Truth
from harness.suites.tokenizer.mechanisms import mechanism_table
from harness.suites.tokenizer.subjects import Subject


@pytest.fixture(scope="module")
def truth() -> Truth:
    cache = os.environ.get("LLAMA_PARITY_CACHE")
    return Truth(fixtures.ensure_tokenizer_model(Path(cache) / "tokenizer" if cache else None))


# --- the mechanism models reproduce what transformers was measured to give ------------------------
# (ids measured on transformers 5.24/5.25 and recorded in the issue and the museum, suites/history.toml)

def test_models_reproduce_the_measured_outputs(truth):
    m = truth.models
    assert m.why_encode(" Banana", [10765, 1648]) == ["prefix-space-fused"]
    assert m.why_encode("if x:\n    return", [565, 921, 29901, 13, 268, 2457]) == ["merges-by-id"]
    assert m.why_encode("<s>Hello", [1, 10994]) == ["special-aware"]
    assert m.why_encode("<s>Hello", [1, 15043]) == ["special-legacy"]
    assert m.why_encode_special("Hello world", [15043, 3186]) == ["no-bos"]
    assert m.why_encode("Hello world", [15043, 3186]) == []                   # equal needs nothing
    assert m.why_decode([0, 15043, 0], "Hello") == ["unk-skipped"]
    assert m.why_decode([243, 162, 15043, 195, 3, 258, 131, 131], "�� Hello�����") == ["byte-run-fffd"]
    assert m.why_decode([35], "") == ["byte-space-stripped"]
    assert m.why_decode([13, 15043], "<0x0A> Hello") == ["join-pieces"]
    assert m.why_decode_keep([18637, 2, 366], "Hey </s> you") == ["space-around-special"]
    assert m.why_decode_keep([18637, 2, 366], " Hey</s>you") == ["space-around-special"]   # 4.45.2's
    assert m.why_decode_keep([18637, 2, 366], "Hey</s>, you") is None
    assert m.why_decode([29871, 10765, 1648], "Banana") == ["leading-space-dropped"]         # 4.32-4.x slow
    assert m.why_encode("Hello world", [10994, 3186]) == ["no-dummy-prefix"]
    # what no model reproduces stays unexplained
    assert m.why_encode("Hello world", [15043]) is None
    assert m.why_decode([15043, 3186], "Hello  world") is None


# --- the gate ------------------------------------------------------------------------------------

def _emulated(truth, name="transformers.Emulated", loader="from_pretrained", flags="", **mech) -> Subject:
    """A transformers-like subject whose encode has the given mechanism(s) (Models.encode flags)."""
    m, sp = truth.models, truth.sp

    def encode(text):
        return m.encode(text, **mech, special="aware" if truth.has_special(text) else None)

    def decode_keep(ids):      # special tokens as text, the text after one keeps its leading space
        out = "".join(sp.id_to_piece(i) for i in ids).replace("▁", " ")
        return out[1:] if ids and ids[0] not in truth.specials.values() and out.startswith(" ") else out
    return Subject(name, loader, flags, encode=encode, encode_special=lambda t: [sp.bos_id()] + encode(t),
                   decode=truth.decode, decode_keep=decode_keep,
                   batch_encode=lambda texts: [encode(t) for t in texts],
                   batch_decode=lambda batch: [truth.decode(ids) for ids in batch],
                   pieces=lambda ids: [sp.id_to_piece(i) for i in ids])


CASES = ("hello-world", "prefix-space-banana-leading-space", "space-leading", "special-bos-then-text")


def _judge(truth, subject, release, strict=False, fault=None) -> Judge:
    cat = load_catalogue()
    j = Judge(cat, strict=strict, release=release)
    if fault is not None:
        get_fault(fault, "tokenizer").edit_tokenizer(subject, truth)
    for c in cat.encode:
        if c["name"] in CASES:
            checks.check_encode(j, truth, subject, c)
    for c in cat.decode:
        if c.get("keep_special"):
            checks.check_decode(j, truth, subject, c)
    return j


def _gate(j: Judge, tmp_path: Path) -> tuple[int, list[dict]]:
    """The exit code cli.finish gives these rows, and the findings it writes."""
    part = Part("tokenizer", j.rows, {}, calibrators=(), mechanisms=mechanism_table(j.rows, j.known_sources))
    a = argparse.Namespace(command="tokenizer", html=False, verbose=False)
    code = finish(Result([part]), Context(tmp_path, progress=False), a)
    return code, json.loads((tmp_path / "summary.json").read_text(encoding="utf-8"))["findings"]


def test_a_known_mechanism_is_listed_not_failed_unless_strict(truth, tmp_path):
    """prefix-space-fused is a cited deviation from 4.41 (suites/tokenizer.toml): listed as a known
    finding with its source and exit 0; --strict fails it; before 4.41 it is not known, so new."""
    j = _judge(truth, _emulated(truth, fused=True), "5.25.0")
    fused = [r for r in j.rows if r.extra.get("mechanism") == "prefix-space-fused"]
    assert fused and all(r.status == INFO for r in fused)
    code, found = _gate(j, tmp_path / "known")
    f = next(f for f in found if f["id"] == "tokenizer/prefix-space-fused")
    assert code == 0 and f["status"] == "known" and not f["gated"] and "28881" in f["source"]
    assert f["cells"] == len(fused) and "' Banana'" in f["reproduction"]

    strict = _judge(truth, _emulated(truth, fused=True), "5.25.0", strict=True)
    code, found = _gate(strict, tmp_path / "strict")
    f = next(f for f in found if f["id"] == "tokenizer/prefix-space-fused")
    assert code == 1 and f["status"] == "known" and f["gated"]

    old = _judge(truth, _emulated(truth, fused=True), "4.40.2")
    assert all(r.status == FAIL for r in old.rows if r.extra.get("mechanism") == "prefix-space-fused")
    code, found = _gate(old, tmp_path / "old")
    assert code == 1 and any(f["status"] == "new" and f["id"].startswith("tokenizer/prefix-space-fused")
                             for f in found)


def test_a_new_mechanism_fails_the_gate(truth, tmp_path):
    """merges-by-id has no upstream source: a new finding, exit 1, one finding for all its cells."""
    j = _judge(truth, _emulated(truth, by_id=True), "5.25.0")
    code, found = _gate(j, tmp_path)
    new = [f for f in found if f["status"] == "new"]
    assert code == 1 and [f["id"] for f in new] == ["tokenizer/merges-by-id"] and new[0]["gated"]


def test_a_correct_subject_has_no_findings(truth, tmp_path):
    code, found = _gate(_judge(truth, _emulated(truth), "5.25.0"), tmp_path)
    assert code == 0 and not any(f["status"] == "new" for f in found)


def test_a_planted_unexplained_bug_is_a_new_finding(truth, tmp_path):
    """encode losing its last id (registry fault): no model explains it, so it stays unexplained."""
    j = _judge(truth, _emulated(truth), "5.25.0", fault="tok-drop-last-id")
    bad = [r for r in j.rows if r.status == FAIL and r.metric == "encode"]
    assert bad and all(r.extra["mechanism"] == "unexplained" for r in bad)
    code, found = _gate(j, tmp_path)
    assert code == 1 and "tokenizer/unexplained-transformers.Emulated-encode" in {f["id"] for f in found}


def test_a_planted_known_mechanism_outside_its_scope_fails(truth, tmp_path):
    """A decode that drops the space after a special token (registry fault) is the spacing
    mechanism of the 4.31-4.48 slow tokenizer; on a 5.x subject it is a new finding and fails."""
    j = _judge(truth, _emulated(truth), "5.25.0", fault="tok-decode-drops-space")
    bad = [r for r in j.rows if r.status == FAIL]
    assert bad and all(r.extra["mechanism"] == "space-around-special" for r in bad)
    code, found = _gate(j, tmp_path)
    assert code == 1 and all(f["status"] == "new" for f in found if f["gated"])
    # on the slow tokenizer's own releases it is known only where a special token sits between text
    # pieces: the same lost space after '<s>' in text wrapped in <s>...</s> still fails there
    old = _judge(truth, _emulated(truth, name="transformers.LlamaTokenizer"), "4.45.2", fault="tok-decode-drops-space")
    wrapped = [r for r in old.rows if r.metric == "decode_keep_special" and r.case["kind"] == "encode"]
    assert wrapped and any(r.status == FAIL for r in wrapped)


def test_space_around_special_is_known_only_in_its_releases(truth, tmp_path):
    """issue 20's museum class: the slow tokenizer of 4.31-4.48 moves the space around a special
    token between text pieces (skip_special_tokens=False; 4.45.2: ' Hey</s>you'). Planted, it is caught by the default catalogue's
    keep-special decode cases: known under 4.45.2, a failure under 5.x where it was fixed."""
    slow = _emulated(truth, name="transformers.LlamaTokenizer")
    j = _judge(truth, slow, "4.45.2", fault="tok-space-before-special")
    kept = [r for r in j.rows if r.metric == "decode_keep_special" and r.case["case"].startswith("keep-")]
    assert kept and all(r.status == INFO and r.extra["mechanism"] == "space-around-special" for r in kept)
    code, found = _gate(j, tmp_path / "4452")
    assert code == 0 and any(f["id"] == "tokenizer/space-around-special" and f["status"] == "known" for f in found)

    j5 = _judge(truth, _emulated(truth, name="transformers.LlamaTokenizer"), "5.25.0", fault="tok-space-before-special")
    code, found = _gate(j5, tmp_path / "5x")
    assert code == 1 and any(f["status"] == "new" and f["id"].startswith("tokenizer/space-around-special")
                             for f in found)


def test_findings_key_is_public_and_groups_known_rows():
    from harness.core.store import Row
    r = Row("tokenizer", {"case": "x"}, "s", "sentencepiece", "encode", 1.0, 0.0, INFO, "",
            {"known": {"name": "d", "mechanism": "a cause", "source": "u", "reproduction": "f('x')"}})
    k, mech = key(r, {})
    assert k.startswith("known-") and mech.known and mech.reproduction == "f('x')"
    assert collect([r])[0]["reproduction"] == "f('x')"
    assert collect([Row("t", {}, "s", "x", "m", 0.0, 0.0, PASS)]) == []


def test_fuzz_seed_draws_another_fixed_list_and_is_validated(tmp_path, capsys):
    from harness.cli import main
    from harness.suites.tokenizer.checks import fuzz_texts
    assert fuzz_texts(20, 7) == fuzz_texts(20, 7) and fuzz_texts(20, 7) != fuzz_texts(20)
    assert main(["tokenizer", "--fuzz-seed", "x", "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "--fuzz-seed" in capsys.readouterr().err and not (tmp_path / "o").exists()


# --- the user's own accepted findings (--known FILE) ----------------------------------------------

def _user_known(path: Path, body: str) -> Path:
    path.write_text(body, encoding="utf-8")
    return path


MERGES_ACCEPTED = '''
[known.our-pipeline-ships-tokenizer-json]
where = { subject = "transformers.*" }
releases = ">=5.24,<5.26"
evidence = { mechanism = "merges-by-id" }
reason = "our CI loads the published folder's tokenizer.json, never a tokenizer.model-only folder"
source = "https://ci.example/tickets/42"
'''


def test_a_users_known_file_accepts_a_new_finding_and_says_so(truth, tmp_path):
    """merges-by-id is new (no upstream source): the run fails; the same run with the user's file
    accepting it passes, the finding listed as known and as the user's, with their source."""
    from harness.core import deviations
    j = _judge(truth, _emulated(truth, by_id=True), "5.25.0")
    code, found = _gate(j, tmp_path / "without")
    assert code == 1 and [f["id"] for f in found if f["status"] == "new"] == ["tokenizer/merges-by-id"]

    mine = deviations.read_user(_user_known(tmp_path / "known.toml", MERGES_ACCEPTED))
    cat = load_catalogue()
    cat.known = deviations.merge(cat.known, mine)
    j = Judge(cat, release="5.25.0")
    subject = _emulated(truth, by_id=True)
    for c in cat.encode:
        if c["name"] in CASES:
            checks.check_encode(j, truth, subject, c)
    code, found = _gate(j, tmp_path / "with")
    f = next(f for f in found if f["id"] == "tokenizer/merges-by-id")
    assert code == 0 and f["status"] == "known" and not f["gated"]
    assert f["accepted_by"] == str(tmp_path / "known.toml") and f["source"] == "https://ci.example/tickets/42"
    console = (tmp_path / "with" / "report.md").read_text(encoding="utf-8")
    assert "your " + str(tmp_path / "known.toml") in console
    # the project's own known findings stay the project's
    assert all(not g["accepted_by"] for g in found if g["id"] != "tokenizer/merges-by-id")
    assert j.used >= {"our-pipeline-ships-tokenizer-json"}
    assert deviations.user_summary(cat.known, j.used)["user_known"]["unused"] == []
    assert deviations.unused_note(deviations.user_summary(cat.known, set())) == [
        f"note: --known {tmp_path / 'known.toml'}: 1 entry excused no cell of this run: "
        "our-pipeline-ships-tokenizer-json"]
    # outside the user's release scope it is new again
    j = Judge(cat, release="5.26.0")
    for c in cat.encode:
        if c["name"] in CASES:
            checks.check_encode(j, truth, subject, c)
    assert _gate(j, tmp_path / "later")[0] == 1


@pytest.mark.parametrize("body, names", [
    (MERGES_ACCEPTED.replace('source = "https://ci.example/tickets/42"\n', ""),
     "[known.our-pipeline-ships-tokenizer-json]: needs a non-empty string 'source'"),
    (MERGES_ACCEPTED.replace('releases = ">=5.24,<5.26"\n', ""),
     "[known.our-pipeline-ships-tokenizer-json]: needs a non-empty string 'releases'"),
    (MERGES_ACCEPTED.replace('reason = "our', 'reason = ""  # "our'),
     "[known.our-pipeline-ships-tokenizer-json]: needs a non-empty string 'reason'"),
    (MERGES_ACCEPTED.replace('">=5.24,<5.26"', '"five"'), "releases 'five' is not a version specifier"),
    (MERGES_ACCEPTED.replace("[known.our-pipeline-ships-tokenizer-json]", "[known.prefix-space-fused]"),
     "[known.prefix-space-fused]: the project's catalogue already has an entry"),
    ("threshold = 3\n" + MERGES_ACCEPTED, "unknown top-level key(s) threshold"),
    (MERGES_ACCEPTED + "threshold = 3\n", "[known.our-pipeline-ships-tokenizer-json]: unknown key(s) threshold"),
    ("version = '1'\n", "no [known.NAME] table"),
    ("[known.x\n", "not valid TOML"),
])
def test_a_malformed_known_file_is_exit_2_naming_file_and_key(tmp_path, capsys, body, names):
    from harness.cli import main
    path = _user_known(tmp_path / "mine.toml", body)
    out = tmp_path / "o"
    assert main(["tokenizer", "--known", str(path), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and names in err and "Traceback" not in err and not out.exists()


def test_a_missing_known_file_is_exit_2(tmp_path, capsys):
    from harness.cli import main
    assert main(["tokenizer", "--known", str(tmp_path / "nope.toml"), "--out", str(tmp_path / "o"),
                 "--no-progress"]) == 2
    assert "--known" in capsys.readouterr().err
