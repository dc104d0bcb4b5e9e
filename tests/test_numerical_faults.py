"""Numerical faults: NaN/Inf weights and float16 overflow fail the cells they spoil, with the cause
named; they never pass and never stop the run."""
from __future__ import annotations

import json
import math

import pytest
import torch

from harness.core.cases import Shape, make_inputs
from harness.cli import main
from harness.core.presets import preset_args, random_state
from reference_model.checkpoint import Checkpoint, build_model, save_meta

ARGS = ["--attn", "eager,sdpa", "--tp", "1", "--shapes", "1x6", "--no-progress"]


def _run(model, out, dtypes) -> tuple[int, list[dict], dict]:
    code = main(["logits", "--model", str(model), "--out", str(out), "--dtypes", dtypes, *ARGS])
    summary = json.loads((out / "summary.json").read_text())   # the run completed and wrote its verdict
    return code, summary["cells"], summary


def _gated(cells, dtype=None):
    """Cells the gate judged: not info, and not n/a (an implementation the release lacks)."""
    return [c for c in cells if c["status"] not in ("info", "n/a") and (dtype is None or c["case"]["dtype"] == dtype)]


def _poisoned(tmp_path, key, index, value):
    args = preset_args("tiny-mha")
    state = random_state(args, 0)
    state[key][index] = value
    return save_meta(tmp_path / "ckpt", args, state)


@pytest.mark.parametrize("value, kind", [(math.nan, "NaN"), (math.inf, "Inf"), (-math.inf, "Inf")])
def test_nonfinite_weight_fails_every_cell_naming_it(tmp_path, value, kind):
    key = "layers.0.attention.wq.weight"
    model = _poisoned(tmp_path, key, (3, 5), value)
    code, cells, summary = _run(model, tmp_path / "o", "float32,bfloat16")
    assert code == 1
    gated = _gated(cells)
    assert gated and all(c["status"] == "fail" for c in gated)
    assert all(kind in c["reason"] and key in c["reason"] for c in gated), {c["reason"] for c in gated}
    assert key in summary["weights"]["float64"]


def test_weight_beyond_float16_range_is_named_at_float16_only(tmp_path):
    key = "layers.1.feed_forward.w1.weight"
    model = _poisoned(tmp_path, key, (0, 0), 1.0e6)        # finite in float32, Inf once cast to float16
    code, cells, summary = _run(model, tmp_path / "o", "float32,float16")
    assert code == 1
    half = _gated(cells, "float16")
    assert half and all(c["status"] == "fail" for c in half)
    assert all("beyond float16 range" in c["reason"] and key in c["reason"] for c in half)
    assert "float32" not in summary["weights"]
    assert not any("beyond" in c["reason"] for c in _gated(cells, "float32"))


def _overflow_scale(args, state) -> float:
    """Scale layer 0's gate and up projections (their product enters the residual) until the
    reference's float16 forward stops being finite while float64 still is."""
    ids = make_inputs(Shape(1, 6), args.vocab_size, 0)
    keys = ("layers.0.feed_forward.w1.weight", "layers.0.feed_forward.w3.weight")
    scale = 2.0
    while scale <= 4096:
        scaled = {**state, **{k: state[k] * scale for k in keys}}
        ckpt = Checkpoint(args, scaled, "meta", None)
        exact = build_model(ckpt, torch.float64, rope_dtype=torch.float64)(ids)
        half = build_model(ckpt, torch.float16)(ids)
        if torch.isfinite(exact).all() and not torch.isfinite(half).all():
            assert all(scaled[k].abs().max() < torch.finfo(torch.float16).max for k in keys)   # activations, not weights
            return scale
        scale *= 2
    pytest.fail("no scale up to 4096 overflows float16")


def test_float16_overflow_fails_float16_cells_and_the_rest_still_pass(tmp_path):
    args = preset_args("tiny-gqa")
    state = random_state(args, 0)
    scale = _overflow_scale(args, state)
    for k in ("layers.0.feed_forward.w1.weight", "layers.0.feed_forward.w3.weight"):
        state[k] = state[k] * scale
    model = save_meta(tmp_path / "ckpt", args, state)
    code, cells, summary = _run(model, tmp_path / "o", "float32,bfloat16,float16")
    assert code == 1
    half = _gated(cells, "float16")
    assert half and all(c["status"] == "fail" for c in half)
    assert all("overflow" in c["reason"] and "float16" in c["reason"] for c in half), {c["reason"] for c in half}
    for dtype in ("float32", "bfloat16"):       # same weights, wider range: unaffected
        rows = _gated(cells, dtype)
        assert rows and all(c["status"] == "pass" for c in rows), [c for c in rows if c["status"] != "pass"]
    assert summary["weights"] is None           # the weights themselves are fine
