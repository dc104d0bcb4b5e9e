"""`localise --subject` and the logits suite's localisation take any kind that offers "hooks" (its
own torch module): the registry decides, not a name. A kind outside the transformers module, with a
bug of its own in one layer, is localised on its own module at that layer, where the default subject
is clean; a lossy kind has its curve shown, not judged; a subject whose options take the hooks away
(a compiled forward) is not localised, with its reason."""
from __future__ import annotations

import json

import pytest

from harness.cli import main
from subjects_common import shaped_run, drifted, register_kind

LAYER = 2      # of the embedded model's 4: a middle layer, so that "layer 0" cannot pass by accident
FAST = ["--dtypes", "float32", "--attn", "eager", "--tp", "1", "--shapes", "1x8", "--inputs", "random",
        "--no-progress"]


@pytest.fixture
def kinds(monkeypatch):
    """Three kinds registered for the test: an exact one and a lossy one offering hooks, and one without."""
    register_kind(monkeypatch, "drifted", drifted("drifted", LAYER), ("attn", "tp"), ("hooks",))
    register_kind(monkeypatch, "drifted-lossy", drifted("drifted-lossy", LAYER, exact=False), ("attn", "tp"), ("hooks",))
    register_kind(monkeypatch, "drifted-unhooked", drifted("drifted-unhooked", LAYER), ("attn", "tp"))


def localise(tmp_path, *argv) -> tuple[int, dict | None]:
    return shaped_run("localise", tmp_path, *argv)


def test_a_registered_kind_is_localised_on_its_own_module(kinds, tmp_path):
    code, summary = localise(tmp_path, "--subject", "drifted")
    assert code == 1 and summary["subject"] == "drifted"
    found = summary["first_divergence"]
    assert (found["layer"], found["op"]) == (LAYER, "mlp"), found
    assert {c["subject"] for c in summary["cells"]} == {"reference", "drifted"}
    assert "First divergence of drifted" in (tmp_path / "out" / "report.md").read_text()


def test_the_default_subject_on_the_same_input_is_clean(tmp_path):
    """The control: what the drifted kind's run names is its own bug, not the model's."""
    code, summary = localise(tmp_path)
    assert code == 0 and summary["first_divergence"]["layer"] is None


def test_a_lossy_kind_is_shown_not_judged(kinds, tmp_path):
    code, summary = localise(tmp_path, "--subject", "drifted-lossy")
    rows = [c for c in summary["cells"] if c["subject"] == "drifted-lossy"]
    assert code == 0 and rows and {c["status"] for c in rows} == {"info"}
    assert (summary["first_divergence"]["layer"], summary["first_divergence"]["op"]) == (LAYER, "mlp")
    assert "lossy" in summary["first_divergence"]["rule"]


def test_a_kind_that_does_not_offer_hooks_is_exit_2_naming_those_that_do(kinds, tmp_path, capsys):
    code, summary = localise(tmp_path, "--subject", "drifted-unhooked")
    err = capsys.readouterr().err
    assert code == 2 and summary is None and "drifted-unhooked cannot give" in err
    assert "kinds that can:" in err and "drifted," in err and "transformers" in err


def test_a_compiled_subject_is_not_localised_through_its_eager_module(tmp_path, capsys):
    code, summary = localise(tmp_path, "--subject", "transformers:compile=1")
    err = capsys.readouterr().err
    assert code == 2 and summary is None and "torch.compile" in err and "per-layer captures" in err


def test_logits_localises_a_failing_registered_subject(kinds, tmp_path, capsys):
    out = tmp_path / "logits"
    code = main(["logits", "--out", str(out), *FAST, "--subject", "transformers", "--subject", "drifted",
                 "--subject", "drifted-unhooked"])
    summary = json.loads((out / "summary.json").read_text())
    assert code == 1
    found = {d["subject"]: d for d in summary["divergences"]}
    assert set(found) == {"drifted"}, found                     # transformers passes, the unhooked one is noted
    assert (found["drifted"]["layer"], found["drifted"]["op"]) == (LAYER, "mlp")
    notes = capsys.readouterr().err
    assert "drifted-unhooked fails and is not localised" in notes and "no per-layer hooks" in notes
