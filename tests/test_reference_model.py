"""The reference model on its own: sizing facts, numerics choices, cache, independence."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from reference_model import checkpoint
from reference_model.model import ModelArgs, RMSNorm, apply_rotary_emb, precompute_freqs_cis

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("params, hidden", [
    # Published Llama 2 params.json files and the FFN sizes of the published checkpoints.
    (dict(dim=4096, n_layers=32, n_heads=32, multiple_of=256, norm_eps=1e-5, vocab_size=-1), 11008),
    (dict(dim=5120, n_layers=40, n_heads=40, multiple_of=256, norm_eps=1e-5, vocab_size=-1), 13824),
    (dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096, ffn_dim_multiplier=1.3,
          norm_eps=1e-5, vocab_size=-1), 28672),
])
def test_ffn_sizing_matches_published_checkpoints(params, hidden):
    args = ModelArgs.from_params(params)
    assert args.ffn_hidden == hidden
    assert args.kv_heads == params.get("n_kv_heads", params["n_heads"])


def test_unknown_params_key_is_an_error():
    with pytest.raises(KeyError, match="use_scaled_rope"):
        ModelArgs.from_params({"dim": 64, "n_layers": 1, "n_heads": 4, "use_scaled_rope": True})


def test_reference_model_imports_nothing_from_the_subjects_under_test():
    forbidden = {"transformers", "lm_eval", "harness", "sentencepiece"}
    for path in (ROOT / "reference_model").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            for name in names:
                assert name.split(".")[0] not in forbidden, f"{path.name} imports {name}"


def test_rmsnorm_casts_back_before_the_weight():
    # Meta: norm(x.float()).type_as(x) * w. In bfloat16 that rounds the normalised value before
    # the weight multiplies it; computing w * norm in float32 and rounding once differs.
    torch.manual_seed(0)
    norm = RMSNorm(256, eps=1e-5)
    norm.weight.data = 1 + torch.randn(256)
    x = torch.randn(4, 256).bfloat16()
    got = norm.bfloat16()(x)
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).bfloat16()
    assert torch.equal(got, normed * norm.weight)
    one_rounding = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight.float()).bfloat16()
    assert not torch.equal(got, one_rounding)


def test_rope_rotates_interleaved_pairs_by_position_angle():
    head_dim, pos = 8, 5
    freqs = precompute_freqs_cis(head_dim, 16, 10000.0)
    x = torch.zeros(1, 16, 1, head_dim)
    x[0, pos, 0, 2] = 1.0            # pair j=1 is (x[2], x[3]): rotating (1, 0) gives (cos, sin)
    q, _ = apply_rotary_emb(x, x, freqs)
    angle = pos * 10000.0 ** (-2 / head_dim)
    expected = torch.tensor([torch.cos(torch.tensor(angle)), torch.sin(torch.tensor(angle))])
    torch.testing.assert_close(q[0, pos, 0, 2:4], expected.float(), atol=1e-6, rtol=0)
    assert q[0, pos, 0, [0, 1, 4, 5, 6, 7]].abs().max() == 0


def test_kv_cache_decoding_matches_full_forward(models):
    ckpt = checkpoint.load(models["tiny-gqa/meta"])
    model = checkpoint.build_model(ckpt, torch.float64, rope_dtype=torch.float64)
    ids = torch.randint(3, ckpt.args.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    full = model(ids)
    step = [model(ids[:, :5], start_pos=0, use_cache=True)]
    for t in range(5, 12):
        step.append(model(ids[:, t:t + 1], start_pos=t, use_cache=True))
    torch.testing.assert_close(torch.cat(step, dim=1), full, rtol=0, atol=1e-10)


def test_oracle_runs_in_float64_and_differs_from_meta_float32_angles(models):
    ckpt = checkpoint.load(models["tiny-mha/meta"])
    ids = torch.arange(3, 67)[None]
    exact = checkpoint.build_model(ckpt, torch.float64, rope_dtype=torch.float64)(ids)
    meta = checkpoint.build_model(ckpt, torch.float64, rope_dtype=torch.float32)(ids)
    assert exact.dtype == torch.float64
    gap = (exact - meta).abs().max().item()
    assert 0 < gap < 1e-3        # float32 angles are a different truth, but only just
