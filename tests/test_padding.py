"""Padding and batching invariance: the reference's padded forward, the suite, and its plants."""
from __future__ import annotations

import torch

from harness.core.compat import attn_implementations

from harness.suites.behaviour.padding import add_pad_token_reference, pad_batch
from reference_model import checkpoint

from conftest import failing, run_suite


def test_pad_batch_places_real_tokens_and_counts_positions_over_them():
    rows = [torch.tensor([1, 5, 6]), torch.tensor([1, 7])]
    ids, mask, pos = pad_batch(rows, "left", 1, pad_id=0)
    assert ids.tolist() == [[0, 1, 5, 6], [0, 0, 1, 7]]
    assert mask.tolist() == [[0, 1, 1, 1], [0, 0, 1, 1]]
    assert pos[mask.bool()].tolist() == [0, 1, 2, 0, 1]
    ids, mask, pos = pad_batch(rows, "right", 0, pad_id=0)
    assert ids.tolist() == [[1, 5, 6], [1, 7, 0]]
    assert pos[mask.bool()].tolist() == [0, 1, 2, 0, 1]


def _alone_and_padded(model, rows, side, extra, pad_id, explicit=True):
    ids, mask, pos = pad_batch(rows, side, extra, pad_id)
    batch = model(ids, key_mask=mask, positions=pos if explicit else None)
    return torch.cat([model(x[None])[0] for x in rows]), batch[mask.bool()]


def test_reference_padded_batch_equals_rows_alone_in_float64(models):
    ckpt = checkpoint.load(models["tiny-gqa/meta"])
    model = checkpoint.build_model(ckpt, torch.float64, rope_dtype=torch.float64)
    gen = torch.Generator().manual_seed(3)
    rows = [torch.randint(3, 512, (n,), generator=gen) for n in (9, 4, 1)]
    for side in ("left", "right"):
        alone, padded = _alone_and_padded(model, rows, side, 20, pad_id=0)
        torch.testing.assert_close(padded, alone, rtol=0, atol=1e-10)
    # Without the key mask the pads leak into left-padded rows: the mask is what makes it work.
    ids, mask, pos = pad_batch(rows, "left", 0, pad_id=0)
    leaky = model(ids, positions=pos)[mask.bool()]
    assert (leaky - alone).abs().max() > 1e-3


def test_reference_with_an_added_pad_token_embeds_pads_to_zero(models):
    ckpt = checkpoint.load(models["tiny-mha/meta"])
    model = checkpoint.build_model(ckpt, torch.float64, rope_dtype=torch.float64)
    rows = [torch.tensor([1, 9, 33, 7]), torch.tensor([1, 40])]
    before = torch.cat([model(x[None])[0] for x in rows])
    pad = add_pad_token_reference(model)
    assert pad == ckpt.args.vocab_size
    assert model.tok_embeddings(torch.tensor([pad])).abs().max() == 0
    _, padded = _alone_and_padded(model, rows, "right", 3, pad_id=pad)
    torch.testing.assert_close(padded[:, :pad], before, rtol=0, atol=1e-10)


def test_padding_suite_passes_on_a_correct_transformers(models, tmp_path):
    code, cells = run_suite(models["tiny-gqa/hf"], tmp_path, "padding", attns=("eager", "sdpa"))
    assert code == 0, failing(cells)
    gated = {(c["case"].get("side"), c["case"].get("pad_token"), c["case"]["attn"])
             for c in cells if c["subject"] == "transformers" and c["status"] == "pass"}
    assert ("right", "unk+mask", "eager") in gated and ("left", "added", "eager") in gated
    if attn_implementations("cpu")["sdpa"]:   # this release has no SDPA path: n/a with the reason
        assert any(c["case"]["attn"] == "sdpa" and c["status"] == "n/a" and c["reason"] for c in cells)
    else:
        assert ("left", "added", "sdpa") in gated


def test_pads_attended_are_caught(models, tmp_path):
    code, cells = run_suite(models["tiny-gqa/hf"], tmp_path, "padding", plant="pad-attend")
    assert code == 1
    bad = failing(cells)
    assert all(c["subject"] == "transformers" for c in bad)
    # Left padding puts pads before real tokens, so every left-padded cell must see them.
    assert {c["case"]["positions"] for c in bad if c["case"].get("side") == "left"} == {"explicit", "implicit"}
