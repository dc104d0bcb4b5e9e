"""The model-parallel reference: real gloo ranks vs the in-process emulation vs the plain reference.

Spawning ranks costs seconds each, so every distributed run below covers all dtypes in one spawn.
"""
from __future__ import annotations

import pytest
import torch

from harness.core.presets import preset_args, random_state
from reference_model import checkpoint
from reference_model.errors import CheckpointError
from reference_model.parallel import check_degree, distributed_logits, emulated_logits, load_rank

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@pytest.fixture(scope="module")
def mha(tmp_path_factory):
    """tiny-mha (4 heads) written with 1, 2 and 4 shards, plus its weights and some tokens."""
    root = tmp_path_factory.mktemp("mp")
    args = preset_args("tiny-mha")
    state = random_state(args, seed=3)
    paths = {k: checkpoint.save_meta(root / f"mp{k}", args, state, n_shards=k) for k in (1, 2, 4)}
    tokens = torch.randint(0, args.vocab_size, (2, 11), generator=torch.Generator().manual_seed(5))
    return args, state, paths, tokens


def _plain(args, state, tokens, dtype):
    return checkpoint.build_model(checkpoint.Checkpoint(args, state, "meta", None), dtype)(tokens)


def test_two_real_ranks_equal_the_emulation_bit_for_bit(mha):
    # Two partial sums add the same way in any order, so gloo and the emulation must agree exactly.
    _, _, paths, tokens = mha
    real = distributed_logits(paths[2], tokens, DTYPES)
    for dtype in DTYPES:
        name = str(dtype).removeprefix("torch.")
        emu = emulated_logits(paths[2], tokens, dtype)
        assert real[name].dtype == torch.float32
        assert torch.equal(real[name], emu), name


def test_four_real_ranks_match_the_emulation_within_one_reduction_rounding(mha):
    # gloo's ring sums each chunk from a different rank; the emulation sums in rank order. The two
    # may differ by the rounding of a 4-term sum, never by more than the dtype's error budget.
    _, _, paths, tokens = mha
    real = distributed_logits(paths[4], tokens, (torch.float32, torch.bfloat16))
    emu32 = emulated_logits(paths[4], tokens, torch.float32)
    scale = emu32.abs().max().item()
    assert (real["float32"] - emu32).abs().max().item() <= 8 * torch.finfo(torch.float32).eps * scale * 4
    emu16 = emulated_logits(paths[4], tokens, torch.bfloat16)
    # bfloat16: the gap is of the order of the bf16-vs-fp32 error itself, not larger.
    budget = (emu16 - emu32).abs().max().item()
    assert (real["bfloat16"] - emu16).abs().max().item() <= 2 * budget


def test_degree_one_is_the_plain_reference_exactly(mha):
    args, state, paths, tokens = mha
    for dtype in DTYPES:
        assert torch.equal(emulated_logits(paths[1], tokens, dtype), _plain(args, state, tokens, dtype))


@pytest.mark.parametrize("k", [2, 4])
def test_model_parallel_float32_is_the_single_process_reference_up_to_rounding(mha, k):
    args, state, paths, tokens = mha
    mp = emulated_logits(paths[k], tokens, torch.float32)
    single = _plain(args, state, tokens, torch.float32)
    oracle = checkpoint.build_model(checkpoint.Checkpoint(args, state, "meta", None), torch.float64,
                                    rope_dtype=torch.float32)(tokens)
    gap = (mp - single).abs().max().item()
    # float32 re-association only: tiny next to the logits, and of the order of float32 vs float64.
    assert 0 < gap < 1e-4 * single.abs().max().item()
    assert gap <= 4 * (single.double() - oracle).abs().max().item()


def test_row_parallel_rounding_is_visible_in_bfloat16(mha):
    # The point of the exercise: at degree 2 the k partial products are rounded before the sum,
    # so the bfloat16 logits are not those of a single-process bfloat16 run.
    args, state, paths, tokens = mha
    assert not torch.equal(emulated_logits(paths[2], tokens, torch.bfloat16),
                           _plain(args, state, tokens, torch.bfloat16))


def test_each_rank_loads_only_its_own_shard(mha):
    args, state, paths, _ = mha
    _, shard1 = load_rank(paths[4], 1, 4)
    assert torch.equal(shard1["layers.0.attention.wq.weight"], state["layers.0.attention.wq.weight"][16:32])
    assert torch.equal(shard1["layers.0.attention.wo.weight"], state["layers.0.attention.wo.weight"][:, 16:32])
    assert torch.equal(shard1["tok_embeddings.weight"], state["tok_embeddings.weight"][:, 16:32])
    assert torch.equal(shard1["output.weight"], state["output.weight"][128:256])
    assert torch.equal(shard1["norm.weight"], state["norm.weight"])


def test_shard_count_must_match_the_degree(mha):
    _, _, paths, _ = mha
    with pytest.raises(CheckpointError, match="2 shard file.*degree 4"):
        load_rank(paths[2], 0, 4)


def test_a_shard_of_the_wrong_shape_names_file_and_key(mha, tmp_path):
    args, state, _, _ = mha
    path = checkpoint.save_meta(tmp_path / "bad", args, state, n_shards=2)
    shard = torch.load(path / "consolidated.01.pth", weights_only=True)
    shard["layers.1.feed_forward.w2.weight"] = shard["layers.1.feed_forward.w2.weight"][:, :-1].clone()
    torch.save(shard, path / "consolidated.01.pth")
    with pytest.raises(CheckpointError, match=r"consolidated\.01\.pth.*layers\.1\.feed_forward\.w2\.weight"):
        load_rank(path, 1, 2)


def test_a_degree_that_splits_a_head_is_refused():
    args = preset_args("tiny-gqa")   # 2 kv heads: degree 4 would split a kv head across ranks
    with pytest.raises(CheckpointError, match="n_kv_heads"):
        check_degree(args, 4)
