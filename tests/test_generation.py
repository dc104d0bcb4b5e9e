"""Greedy generation parity: the reference's cached greedy loop, divergence, the suite and a plant."""
from __future__ import annotations

import torch

from harness.core.compat import attn_implementations

from harness.suites.behaviour.generate import first_divergence
from reference_model import checkpoint
from reference_model.generate import greedy, top2_margin

from conftest import failing, run_suite


def test_first_divergence():
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 2, 4], [1, 2, 3]) == 2
    assert first_divergence([1, 2], [1, 2, 3]) == 2        # stopping early is a divergence too
    assert top2_margin(torch.tensor([0.5, 3.0, 2.0])) == 1.0


def test_cached_greedy_equals_greedy_by_full_forwards(models):
    # Independent check of the cache loop: recompute every step with a full forward, no cache.
    ckpt = checkpoint.load(models["tiny-mha/meta"])
    model = checkpoint.build_model(ckpt, torch.float64, rope_dtype=torch.float64)
    prompt = [1, 17, 250, 3, 99]
    got = greedy(model, prompt, 12)
    seq = list(prompt)
    for step in range(12):
        logits = model(torch.tensor([seq]))[0, -1]
        torch.testing.assert_close(got.logits[step], logits, rtol=0, atol=1e-10)
        seq.append(int(logits.argmax()))
    assert got.tokens == seq[len(prompt):]


def test_generation_suite_passes_on_a_correct_transformers(models, tmp_path):
    attn = "eager" if attn_implementations("cpu")["sdpa"] else "sdpa"   # no SDPA before 4.36
    code, cells = run_suite(models["tiny-gqa/hf"], tmp_path, "generate", attns=(attn,))
    assert code == 0, failing(cells)
    assert any(c["metric"] == "gen_divergence_margin" and c["subject"] == "transformers" for c in cells)


def test_decoding_off_by_one_is_caught(models, tmp_path):
    code, cells = run_suite(models["tiny-gqa/hf"], tmp_path, "generate", plant="cache-off-by-one")
    assert code == 1
    bad = failing(cells)
    assert bad and all(c["subject"] == "transformers" for c in bad)
    # 4.31 indexes its cos/sin cache by position: one position too far is an IndexError there,
    # a failed cell naming it; later releases compute the angle and give wrong logits instead.
    assert ({c["metric"] for c in bad} >= {"gen_step_max_abs"}
            or all(c["metric"] == "all" and "IndexError" in c["reason"] for c in bad))
