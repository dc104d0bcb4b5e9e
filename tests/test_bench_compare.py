"""Paired statistics, the benchmark policy and QuaRTz conversion: no model, no lm-eval run."""
from __future__ import annotations

import json
import math

import pytest
from scipy.stats import binomtest

from harness.suites.bench.paired import (binomial_above_chance, compare_runs, drift_rows, load_bench_policy,
                                   mcnemar_exact, paired_task)
from harness.suites.bench.data import convert, convert_item
from harness.core.errors import InputError


@pytest.mark.parametrize("a,b", [([1, 1, 1, 0, 0, 1, 1, 1], [0, 0, 1, 0, 1, 0, 0, 1]),
                                 ([1] * 30 + [0] * 5, [0] * 12 + [1] * 18 + [1] * 2 + [0] * 3)])
def test_mcnemar_matches_binomial_test_on_discordant_pairs(a, b):
    a, b = [bool(x) for x in a], [bool(x) for x in b]
    p, nb, nc = mcnemar_exact(a, b)
    assert nb == sum(x and not y for x, y in zip(a, b)) and nc == sum(y and not x for x, y in zip(a, b))
    assert p == pytest.approx(binomtest(nb, nb + nc, 0.5).pvalue, rel=1e-12)


def test_mcnemar_without_discordant_pairs_is_one():
    assert mcnemar_exact([True, False], [True, False]) == (1.0, 0, 0)


@pytest.mark.parametrize("successes, n, chance", [(30, 60, 0.25), (0, 60, 0.25), (60, 60, 0.25),
                                                  (1990, 3860, 0.5), (1000, 3860, 0.25), (1100, 3860, 0.25)])
def test_above_chance_matches_scipy(successes, n, chance):
    """Large n included: QuaRTz's 3860 documents, near chance, where C(n, i) exceeds a float."""
    assert binomial_above_chance(successes, n, chance) == pytest.approx(
        binomtest(successes, n, chance, alternative="greater").pvalue, rel=1e-9, abs=1e-300)


def test_mcnemar_holds_at_thousands_of_discordant_pairs():
    a = [True] * 1700 + [False] * 1500
    b = [False] * 1700 + [True] * 1500
    p, nb, nc = mcnemar_exact(a, b)
    assert (nb, nc) == (1700, 1500) and p == pytest.approx(binomtest(1700, 3200, 0.5).pvalue, rel=1e-9)


def _mc(doc_id, lls, acc, choices=("a", "bb", "ccc")):
    return {"doc_id": doc_id, "filtered_resps": [(x, False) for x in lls], "acc": float(acc),
            "arguments": [("ctx", " " + c) for c in choices]}


def test_multiple_choice_pairing_counts_flips_and_largest_difference():
    a = [_mc(0, [-1.0, -2.0, -3.0], 1), _mc(1, [-5.0, -4.0, -6.0], 0), _mc(2, [-1.0, -1.5, -9.0], 1)]
    b = [_mc(0, [-1.0, -2.0, -3.0], 1), _mc(1, [-3.5, -4.0, -6.0], 1), _mc(2, [-1.25, -1.5, -9.0], 1)]
    m = paired_task("multiple_choice", a, b)
    assert m["docs"] == 3
    assert m["ll_diff_max"] == pytest.approx(1.5)           # doc 1, choice 0: -5.0 vs -3.5
    assert m["choice_flips"] == 1 and m["choice_flip_rate"] == pytest.approx(1 / 3)
    assert (m["mcnemar_b"], m["mcnemar_c"]) == (0, 1)
    assert m["score_diff"] == pytest.approx(1 / 3)


def test_generation_pairing_counts_differing_texts():
    a = [{"doc_id": i, "resps": [[t]], "exact_match": float(t == "x")} for i, t in enumerate(["x", "y", "z"])]
    b = [{"doc_id": i, "resps": [[t]], "exact_match": float(t == "x")} for i, t in enumerate(["x", "y", "w"])]
    m = paired_task("generate_until", a, b)
    assert m["gen_mismatch_rate"] == pytest.approx(1 / 3)
    assert m["first_mismatch"] == {"doc_id": 2, "a": "z", "b": "w"}


def test_rolling_pairing_compares_perplexity_over_words():
    a = [{"doc_id": 0, "filtered_resps": [-10.0], "word_perplexity": (-10.0, 5)}]
    b = [{"doc_id": 0, "filtered_resps": [-12.0], "word_perplexity": (-12.0, 5)}]
    m = paired_task("loglikelihood_rolling", a, b)
    assert m["ll_diff_max"] == pytest.approx(2.0 / 5)      # per word of the document
    assert m["score_diff"] == pytest.approx(abs(math.exp(10 / 5) / math.exp(12 / 5) - 1))


def test_unknown_output_type_is_input_error():
    with pytest.raises(InputError, match="output_type"):
        paired_task("something_else", [{"doc_id": 0}], [{"doc_id": 0}])


def test_drift_names_each_differing_setting():
    base = {"bos": True, "num_fewshot": 0, "batch_size": 8, "padding_side": "right", "max_length": 2048,
            "dtype": "float32", "softmax_dtype": "float32"}
    (row,) = drift_rows("hf", "reference", {"settings": {**base, "bos": False, "batch_size": 1}},
                        {"settings": base})
    assert row.status == "fail" and row.value == 2
    assert "bos: False vs True" in row.reason and "batch_size: 1 vs 8" in row.reason
    (same,) = drift_rows("hf", "reference", {"settings": base}, {"settings": dict(base)})
    assert same.status == "pass"


def test_policy_gates_and_known_deviation_is_reported_not_gated():
    policy = load_bench_policy()
    settings = {"bos": True, "batch_size": 8, "dtype": "float32"}
    ev = lambda lls: {"settings": settings, "configs": {"t": {"output_type": "loglikelihood_rolling"}},  # noqa: E731
                      "samples": {"t": [{"doc_id": 0, "filtered_resps": [lls], "word_perplexity": (lls, 3)}]}}
    rows = compare_runs("adapter-hf", "reference", ev(-10.0), ev(-10.5), policy, "float32", gated=True)
    assert {r.metric: r.status for r in rows}["ll_diff_max"] == "fail"
    rows = compare_runs("hf", "reference", ev(-10.0), ev(-10.5), policy, "float32", gated=True)
    assert all(r.status == "info" and "hf-rolling-double-bos" in r.reason for r in rows)


def test_policy_errors_name_the_file_and_key(tmp_path):
    bad = tmp_path / "p.toml"
    bad.write_text('version = "x"\n[float32]\nll_diff_max = { max = 1 }\n')
    with pytest.raises(InputError, match=r"p\.toml: \[float32\.ll_diff_max\]"):
        load_bench_policy(bad)
    bad.write_text('version = "x"\n[float32]\nnot_a_metric = { max = 1, reason = "r" }\n')
    with pytest.raises(InputError, match="not_a_metric"):
        load_bench_policy(bad)
    with pytest.raises(InputError, match="--policy"):
        load_bench_policy(tmp_path / "missing.toml")


def test_quartz_item_converts_to_multiple_choice():
    item = {"input": [{"role": "system", "content": "Answer with the letter."},
                      {"role": "user", "content": "More resistors in series make the resistance\n\n A: increase\n B: decrease"}],
            "ideal": "A"}
    assert convert_item(item, "x") == {"question": "More resistors in series make the resistance",
                                       "choices": ["increase", "decrease"], "label": 0}
    rows = convert([json.dumps(item), "", json.dumps({**item, "ideal": "B"})], "samples.jsonl")
    assert [r["id"] for r in rows] == [0, 1] and rows[1]["label"] == 1


def test_quartz_bad_item_names_its_line():
    with pytest.raises(InputError, match="samples.jsonl:2"):
        convert([json.dumps({"input": [{"role": "user", "content": "q\n\n A: x\n B: y"}], "ideal": "A"}),
                 json.dumps({"input": [{"role": "user", "content": "q\n\n A: x\n B: y"}], "ideal": "C"})],
                "samples.jsonl")
