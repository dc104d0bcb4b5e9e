"""Sequence classification (pooling rule, suite, plant) and hidden states layer by layer."""
from __future__ import annotations

import pytest
import torch

from harness.core.compat import transformers_version
from reference_model.classify import last_real_token

from conftest import failing, run_suite


def test_pooling_picks_the_rightmost_non_pad_token():
    pad = 0
    ids = torch.tensor([[0, 0, 5, 6],      # left padded: last position
                        [5, 6, 7, 0],      # right padded: before the first pad
                        [5, 0, 6, 0]])     # a pad id inside the row: still the rightmost real one
    assert last_real_token(ids, pad).tolist() == [3, 2, 2]
    assert last_real_token(torch.tensor([[4, 5, 6]]), None).tolist() == [2]
    with pytest.raises(ValueError, match="batch of one"):
        last_real_token(ids, None)


def test_seqcls_suite_passes_on_a_correct_transformers(models, tmp_path):
    code, cells = run_suite(models["tiny-gqa/hf"], tmp_path, "seqcls", dtypes=("float32", "bfloat16"))
    # 4.46 pools "one before the first pad id", which differs when the pad id (here eos) also
    # occurs inside a row (measured: 4.46.3 fails exactly those cells; 5.24.0 passes all).
    # 4.31 pools at "number of non-pad tokens - 1", which under left padding is a position inside
    # the padding or the prompt, not the last token (measured: 4.31.0 fails left and eos-inside).
    allowed = {"eos-inside", "left"} if transformers_version() < (4, 35) else {"eos-inside"}
    assert {c["case"]["padding"] for c in failing(cells)} <= allowed
    if transformers_version() >= (5, 0):
        assert code == 0, failing(cells)
    gated = {c["case"]["padding"] for c in cells if c["subject"] == "transformers" and c["status"] in ("pass", "fail")}
    assert gated == {"left", "right", "none", "eos-inside"}


def test_wrong_pooling_is_caught_under_right_padding_only(models, tmp_path):
    code, cells = run_suite(models["tiny-gqa/hf"], tmp_path, "seqcls", plant="pool-last-position")
    assert code == 1
    # Left padding ends every row with a real token, so only right-padded cases can see it.
    assert {c["case"]["padding"] for c in failing(cells)} == {"right", "eos-inside"}


def test_hidden_states_pass_and_a_last_block_bug_is_localised(models, tmp_path):
    code, cells = run_suite(models["tiny-ffnmult/hf"], tmp_path / "ok", "hidden")
    assert code == 0, failing(cells)
    layers = [c["case"]["layer"] for c in cells if c["subject"] == "transformers"]
    assert layers == ["embedding", "block0", "block1", "block2+norm"]
    code, cells = run_suite(models["tiny-ffnmult/hf"], tmp_path / "bug", "hidden", plant="last-layer-gate-up")
    assert code == 1
    assert [c["case"]["layer"] for c in failing(cells)] == ["block2+norm"]
