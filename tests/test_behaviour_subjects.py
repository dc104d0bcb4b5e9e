"""`behaviour --subject KIND[:key=value,...]`: the cache and padding suites judge any subject
through the Subject protocol (its own forward, decode and padding mask); what a subject cannot do
is n/a with its reason; the suites that drive transformers' own API say so for any other subject."""
from __future__ import annotations

import json

import pytest

from harness.cli import main
from harness.subjects import KINDS, register
from harness.subjects.transformers import TransformersLM


class NoCacheNoMask(TransformersLM):
    """transformers saying it has neither a KV cache nor a padding mask (as ONNX Runtime's export and
    onnxruntime-genai say), so that the n/a path runs without their packages."""
    name = "no-cache-no-mask"

    def cannot(self):
        return {"decode": "planted: no KV cache", "padding": "planted: no mask"}


def _kind():
    if "no-cache-no-mask" not in KINDS:
        register("no-cache-no-mask")(lambda source, dtype, device, options: NoCacheNoMask(source, dtype, device))


def test_cache_and_padding_judge_every_subject_or_say_why_not(models, tmp_path):
    _kind()
    code = main(["behaviour", "--model", str(models["tiny-gqa/meta"]), "--suite", "cache,padding,hidden",
                 "--dtypes", "float32", "--attn", "eager,sdpa", "--subject", "transformers:attn=eager",
                 "--subject", "no-cache-no-mask", "--out", str(tmp_path)])
    assert code == 0
    cells = {s: json.loads((tmp_path / s / "summary.json").read_text())["cells"] for s in ("cache", "padding", "hidden")}
    tf = "transformers:attn=eager"
    cache = [c for c in cells["cache"] if c["subject"] == tf]
    assert {(c["case"]["attn"], c["case"]["cache"]) for c in cache} == {("eager", "dynamic"), ("eager", "static")}
    # a release without a StaticCache outside generate() (4.31-4.40) says so; everything measured passes
    measured = [c for c in cache if c["status"] != "n/a"]
    assert ("eager", "dynamic") in {(c["case"]["attn"], c["case"]["cache"]) for c in measured}
    assert all(c["status"] == "pass" and c["against"] == f"{tf}-full-forward" for c in measured)
    assert all("StaticCache" in c["reason"] for c in cache if c["status"] == "n/a")
    padded = [c for c in cells["padding"] if c["subject"] == tf]
    assert padded and all(c["status"] == "pass" for c in padded)
    assert {c["case"].get("positions") for c in padded} >= {"explicit", "implicit"}
    for suite, why in (("cache", "planted: no KV cache"), ("padding", "planted: no mask")):
        (na,) = [c for c in cells[suite] if c["subject"] == "no-cache-no-mask"]
        assert na["status"] == "n/a" and why in na["reason"] and na["case"]["attn"] == "-"
    # hidden drives output_hidden_states: n/a for each subject given, nothing of transformers run
    assert {c["subject"] for c in cells["hidden"] if c["status"] == "n/a" and "output_hidden_states" in c["reason"]} \
        == {tf, "no-cache-no-mask"}
    assert not [c for c in cells["hidden"] if c["subject"] == "transformers"]


@pytest.mark.parametrize("spec", ["nope", "transformers:bogus=1"])
def test_an_unknown_subject_or_option_is_exit_2_before_anything_runs(models, tmp_path, capsys, spec):
    out = tmp_path / "out"
    code = main(["behaviour", "--model", str(models["tiny-gqa/meta"]), "--suite", "cache", "--subject", spec,
                 "--out", str(out)])
    assert code == 2 and spec in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("command", ["axes", "mp", "localise", "stream", "place"])
@pytest.mark.parametrize("spec, says", [("onnxruntime", "onnxruntime cannot give"),
                                        ("transformers:attn=sdpa", "with its own flags"),
                                        ("nope", "unknown kind 'nope'")])
def test_commands_of_one_implementation_refuse_another_naming_what_they_need(command, spec, says, tmp_path, capsys):
    """Commands that drive an implementation's own modules (hooks, placement, its config) refuse a
    kind that cannot give what they need: exit 2 naming it and what it cannot give."""
    out = tmp_path / "out"
    assert main([command, "--subject", spec, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--subject" in err and spec in err and says in err, err
    assert not out.exists()
