"""torchao and optimum-quanto: each quantised subject within its per-type budget on real text
(suites/subjects_tolerance.toml), its provenance counting what was quantised, and the error split:
the oracle on the subject's own dequantised weights takes the quantisation's share, and for
weight-only quantisation what is left (the runtime) must pass the exact logits rule. A planted
quantiser bug breaks the budget and lands in the weights' share."""
from __future__ import annotations

import pytest

from harness.core.errors import InputError
from harness.subjects import KINDS
from harness.subjects.common import dequantised_checkpoint
from harness.subjects.fidelity import budget, over_budget
from subjects_common import embedded, exact_failures, lossy_failures, needs, oracle, split, text

TORCHAO, QUANTO = needs("torchao", "torchao"), needs("optimum.quanto", "quanto")
CASES = [pytest.param("torchao", {"quant": "int8wo"}, "int8wo", True, marks=TORCHAO, id="torchao-int8wo"),
         pytest.param("torchao", {"quant": "int8dyn"}, "int8dyn", False, marks=TORCHAO, id="torchao-int8dyn"),
         pytest.param("quanto", {"weights": "int8"}, "int8", True, marks=QUANTO, id="quanto-int8"),
         pytest.param("quanto", {"weights": "int4"}, "int4", True, marks=QUANTO, id="quanto-int4")]


def make(kind: str, options: dict):
    from harness.subjects import quanto, torchao  # noqa: F401  (registers the kinds)
    return KINDS[kind](embedded(), "float32", "cpu", dict(options))


@pytest.mark.parametrize("kind, options, type_, weight_only", CASES)
def test_quantised_subject_within_budget_with_split_and_provenance(kind, options, type_, weight_only):
    subject = make(kind, options)
    broken, stats = lossy_failures(subject)
    assert broken == {}, broken
    assert stats["kl_mean"] > 1e-7      # quantisation is visible: not silently the float model
    prov = subject.provenance()
    q = prov["quantisation"]
    layers = embedded().ckpt.args.n_layers
    assert q["quantised"] == 7 * layers and q["kept_float"] == ["lm_head"] and q["fell_back"] == []
    assert prov["torchao" if kind == "torchao" else "optimum-quanto"]
    assert "hooks" not in subject.cannot()      # localise hooks the quantised module itself
    quant, runtime = split(subject)
    assert over_budget({"weights_kl_mean": quant, "runtime_kl_mean": runtime}, budget(kind, {"quant": type_})) == {}
    if weight_only:    # float activations: against its own dequantised weights it is float32-exact
        ids, _, _ = text()
        own = oracle(dequantised_checkpoint(embedded().ckpt, subject.dequantised())).logits(ids)
        assert exact_failures(subject.forward(ids), ids, own) == {}
    else:
        assert runtime > quant          # int8 activations: the runtime's share is the larger
    subject.close()


@pytest.mark.parametrize("kind, options, fault", [
    pytest.param("torchao", {"quant": "int8wo"}, "torchao-scale-row0", marks=TORCHAO),
    pytest.param("quanto", {"weights": "int8"}, "quanto-scale-row0", marks=QUANTO),
])
def test_a_planted_quantiser_bug_breaks_the_budget_in_the_weights_share(kind, options, fault):
    subject = make(kind, {**options, "plant": fault})
    broken, _ = lossy_failures(subject)
    assert {"kl_mean", "kl_p99", "rms_dp"} <= set(broken)
    quant, _ = split(subject)
    assert quant > budget(kind, subject.settings())["weights_kl_mean"]


def test_budgets_are_read_with_their_reasons(tmp_path):
    """The torch kinds' budgets are [[budget]] entries of the one tolerance file, as llama.cpp's are."""
    for kind, settings in (("torchao", {"quant": "int8wo"}), ("torchao", {"quant": "int8dyn"}),
                           ("quanto", {"quant": "int8"}), ("quanto", {"quant": "int4"}),
                           ("onnxruntime-genai", {"precision": "int4"})):
        assert budget(kind, {"dtype": "float32", **settings})["kl_mean"] > 0
    bad = tmp_path / "b.toml"
    bad.write_text('version = "x"\n[[budget]]\nkind = "torchao"\nmatch = { quant = "int8wo" }\nkl_mean = 1e-4\n')
    with pytest.raises(InputError, match=r"\[\[budget\]\] #1: needs a reason"):
        budget("torchao", {"quant": "int8wo"}, bad)
    bad.write_text('version = "x"\n[[budget]]\nkind = "torchao"\nmatch = { quant = "int8wo" }\nreason = "r"\n'
                   'kl_man = 1e-4\n')
    with pytest.raises(InputError, match="unknown metric 'kl_man'"):
        budget("torchao", {"quant": "int8wo"}, bad)
    with pytest.raises(InputError, match="no \\[\\[budget\\]\\] for quanto matching quant=int2"):
        budget("quanto", {"quant": "int2"})
