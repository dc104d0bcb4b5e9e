"""The logits suite end to end through the CLI: correct models pass, planted bugs fail the gate."""
from __future__ import annotations

import json

import pytest

from harness.cli import main
from harness.core.faults import FAULTS, faults_for
from harness.core.compat import attn_implementations, tp_honoured

FAST = ["--attn", "eager,sdpa", "--tp", "1", "--shapes", "1x8,2x24", "--no-progress"]


def run(model, out, *extra) -> tuple[int, dict]:
    code = main(["logits", "--model", str(model), "--out", str(out), *FAST, *extra])
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else None
    return code, summary


@pytest.mark.parametrize("name", ["tiny-mha/meta", "tiny-mha/meta2", "tiny-gqa/meta", "tiny-gqa/meta2",
                                  "tiny-gqa/hf", "tiny-ffnmult/meta2", "tiny-ffnmult/hf-sharded"])
def test_correct_transformers_passes_at_float32(models, tmp_path, name):
    code, summary = run(models[name], tmp_path, "--dtypes", "float32")
    assert code == 0, [c for c in summary["cells"] if c["status"] == "fail"]
    assert summary["verdict"] == "pass"
    cells = [c for c in summary["cells"] if c["subject"] == "transformers" and c["against"] == "oracle-fp64"]
    gated = [c for c in cells if c["status"] in ("pass", "fail")]   # sdpa before 4.36: n/a, with the reason
    assert gated and all(c["passed"] is True for c in gated)
    assert all(c["reason"] for c in cells if c["status"] == "n/a")


def test_summary_schema(models, tmp_path):
    code, summary = run(models["tiny-gqa/meta"], tmp_path, "--dtypes", "float32,bfloat16")
    assert code == 0
    env = summary["environment"]
    assert {"torch", "transformers", "device", "dtype_support"} <= env.keys()
    cell = summary["cells"][0]
    assert {"case", "subject", "against", "metric", "value", "tolerance", "passed", "status"} <= cell.keys()
    assert {"dtype", "attn", "tp", "shape", "device"} <= cell["case"].keys()
    assert summary["policy"]["version"]
    curves = [c for c in summary["cells"] if c["metric"] == "max_abs" and c["case"]["shape"] == "2x24"
              and c["against"] == "oracle-fp64"]
    assert curves and all(len(c["extra"]["per_position"]) == 24 for c in curves)
    assert (tmp_path / "results.csv").read_text().startswith("suite,")
    assert "PASS" in (tmp_path / "report.md").read_text()


def test_low_precision_cells_pass_on_a_correct_model(models, tmp_path):
    code, summary = run(models["tiny-outliers/meta"], tmp_path, "--dtypes", "bfloat16,float16")
    assert code == 0, [c for c in summary["cells"] if c["status"] == "fail"]


def test_rerun_with_same_seed_writes_identical_numbers(models, tmp_path):
    run(models["tiny-gqa/meta"], tmp_path / "a", "--dtypes", "float32,bfloat16")
    run(models["tiny-gqa/meta"], tmp_path / "b", "--dtypes", "float32,bfloat16")
    assert (tmp_path / "a" / "results.csv").read_bytes() == (tmp_path / "b" / "results.csv").read_bytes()


def test_pretraining_tp_not_applicable_is_recorded_not_skipped(models, tmp_path):
    code, summary = main(["logits", "--model", str(models["tiny-mha/meta"]), "--out", str(tmp_path),
                          "--dtypes", "float32", "--attn", "eager", "--tp", "1,2", "--shapes", "1x8",
                          "--no-progress"]), json.loads((tmp_path / "summary.json").read_text())
    tp2 = [c for c in summary["cells"] if c["case"]["tp"] == 2]
    assert tp2
    if tp_honoured():
        assert all(c["status"] != "n/a" for c in tp2) and code == 0
    else:
        assert all(c["status"] == "n/a" and "pretraining_tp" in c["reason"] for c in tp2)


def _plant_cases():
    for name in faults_for("logits"):
        fault = FAULTS[name]
        if fault.min_positions > 64:   # long-position faults: tests/test_axes.py
            continue
        why = fault().not_applicable()
        for dtype in fault.visible_at:
            model = (f"{fault.fixture_float16}/meta" if dtype == "float16" else "tiny-gqa/meta") \
                if fault.fixture == "tiny-gqa" else fault.fixture
            yield pytest.param(name, dtype, model, id=f"{name}-{dtype}",
                               marks=pytest.mark.skipif(bool(why), reason=why))


@pytest.mark.parametrize("fault, dtype, model", list(_plant_cases()))
def test_planted_bug_fails_the_gate_and_is_localised(models, tmp_path, fault, dtype, model, capsys):
    # a fault of the mask or the cache shows only in the padded or cached cell of the default matrix
    cells = ["--inputs", ",".join(("random", *FAULTS[fault].inputs))] if FAULTS[fault].inputs else []
    code, summary = run(models[model], tmp_path / "plant", "--dtypes", dtype, "--plant", fault, *cells)
    assert code == 1, f"--plant {fault} passed the gate at {dtype}"
    failing = [c for c in summary["cells"] if c["status"] == "fail"]
    assert failing and all(c["subject"] == "transformers" for c in failing)
    assert "FAILING" in capsys.readouterr().out
    # every failing group names where the bug was planted: its layer and op, the right one
    groups = {(c["case"]["attn"], c["case"]["tp"]) for c in failing}
    named = {(d["case"]["attn"], d["case"]["tp"]): (d["layer"], d["op"]) for d in summary["divergences"]}
    assert set(named) == groups
    planted = FAULTS[fault]()
    assert all(named[g] == planted.expected_point(g[0]) for g in groups), (named, planted.first_point)
    if dtype == planted.visible_at[0]:      # the same run without the plant passes
        code, _ = run(models[model], tmp_path / "clean", "--dtypes", dtype, *cells)
        assert code == 0


@pytest.mark.parametrize("args, needle", [
    (["--dtypes", "float8"], "--dtypes"),
    (["--attn", "magic"], "--attn"),
    (["--shapes", "2by3"], "--shapes"),
    (["--tp", "0"], "--tp"),
    (["--device", "tpu"], "--device"),
    (["--plant", "nope"], "--plant"),
])
def test_bad_arguments_exit_2_naming_the_argument(models, tmp_path, capsys, args, needle):
    code = main(["logits", "--model", str(models["tiny-mha/meta"]), "--out", str(tmp_path / "o"), *args])
    assert code == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cuda_device_absent_is_bad_input(models, tmp_path, capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("a CUDA device exists here")
    code = main(["logits", "--model", str(models["tiny-mha/meta"]), "--out", str(tmp_path / "o"),
                 "--device", "cuda"])
    assert code == 2 and "no CUDA device" in capsys.readouterr().err


@pytest.mark.slow
def test_llama2_7b_shaped_slice(tmp_path):
    """Real 7B shapes (head_dim 128, FFN 11008, vocab 32000), one layer: correct passes, a
    missing permute fails. About a minute and 6 GB on CPU."""
    from harness.core.presets import write_preset
    model = write_preset("slice-7b", tmp_path / "slice-7b")
    attn = "eager" if attn_implementations("cpu")["sdpa"] else "sdpa"   # 4.31 has no SDPA path
    args = ["--attn", attn, "--tp", "1", "--shapes", "1x64", "--no-progress"]
    assert main(["logits", "--model", str(model), "--out", str(tmp_path / "a"), "--dtypes", "float32,bfloat16", *args]) == 0
    assert main(["logits", "--model", str(model), "--out", str(tmp_path / "b"), "--dtypes", "float32",
                 "--plant", "no-permute", *args]) == 1


@pytest.mark.parametrize("fault, op", [("swap-gate-up", "mlp"), ("no-permute", "q")])
def test_failing_run_names_the_first_diverging_layer_and_op(models, tmp_path, fault, op):
    code, summary = run(models["tiny-gqa/meta"], tmp_path, "--dtypes", "float32", "--plant", fault)
    assert code == 1
    found = summary["first_divergence"]
    assert found["layer"] == 0 and found["op"] == op, found
    assert "first_divergence" in (tmp_path / "report.md").read_text()
