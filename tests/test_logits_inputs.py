"""What the logits suite's default inputs reach (special ids, the full context), how it judges a
precision regression of one path, and how its failures become findings: each class planted."""
from __future__ import annotations

import argparse
import json

import pytest
import torch

from harness.cli import main
from harness.core import compat
from harness.core.cases import BOS, EOS, UNK, special_positions
from harness.core.suite import Context
from harness.suites.logits import Logits, Plan

# the default matrix at float32 / eager / tp 1: every default input, the full-context row included
DEFAULT32 = ["--dtypes", "float32", "--attn", "eager", "--tp", "1", "--no-progress"]


def run(model, out, *extra) -> tuple[int, dict]:
    code = main(["logits", "--model", str(model), "--out", str(out), *extra])
    return code, json.loads((out / "summary.json").read_text())


def plan(model, tmp_path, *argv, budget=None) -> Plan:
    p = argparse.ArgumentParser()
    Logits().add_arguments(p)
    return Plan.from_args(p.parse_args(["--model", str(model), *argv]),
                          Context(tmp_path / "o", progress=False, memory_budget=budget))


def hf_copy(models, tmp_path, **config_changes):
    """tiny-gqa as an HF folder with its config.json changed."""
    hf = models["tiny-gqa/hf"]
    folder = tmp_path / "model"
    folder.mkdir()
    for f in hf.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    config = json.loads((hf / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **config_changes}))
    return folder


def test_default_inputs_hold_every_special_id_and_the_full_context(models, tmp_path):
    folder = hf_copy(models, tmp_path, pad_token_id=7, max_position_embeddings=1024)
    config = json.loads((folder / "config.json").read_text())
    p = plan(folder, tmp_path, "--dtypes", "float32,bfloat16")
    by_kind = {i.kind: i for i in p.inputs}
    assert {"random", "padded", "cached", "full"} <= set(by_kind)
    for kind in ("random", "cached", "full"):
        ids = by_kind[kind].ids
        for row in ids.tolist():
            assert row[-1] == EOS and UNK in row and 7 in row, kind
            assert any(a == EOS and b == BOS for a, b in zip(row[1:], row[2:])), kind   # packed: </s> <s> mid-row
    padded = by_kind["padded"]
    real = padded.ids[padded.mask.bool()].tolist()
    assert {UNK, BOS, EOS, 7} <= set(real)
    full = by_kind["full"]
    assert full.shape.seq == config["max_position_embeddings"] and full.dtypes == ("float32",)
    assert special_positions(5) == [(4, "eos")] and special_positions(1) == []


def test_full_context_row_is_only_where_asked(models, tmp_path):
    folder = hf_copy(models, tmp_path, max_position_embeddings=1024)
    p = plan(folder, tmp_path, "--dtypes", "bfloat16,float16")
    assert "full" not in {i.kind for i in p.inputs}           # [full] dtypes = float32 only
    p = plan(folder, tmp_path, "--dtypes", "bfloat16", "--inputs", "full")
    assert [i.kind for i in p.inputs] == ["full"] and p.inputs[0].dtypes is None
    # where the default row does not fit the memory budget it is dropped with a note, not refused
    from harness.core.cases import Shape
    from harness.core.checkpoints import open_model
    from harness.core.resources import logits_run
    m = open_model(folder)
    short = [Shape(1, 16), Shape(2, 64), Shape(3, 64), Shape(2, 48)]
    need = [sum(n.bytes for n in logits_run(m.args, ["float32"], s, m.stored_bytes)) for s in (short, [*short, Shape(1, 1024)])]
    assert need[0] < need[1]
    p = plan(folder, tmp_path, "--dtypes", "float32", budget=(need[0] + need[1]) // 2)
    assert "full" not in {i.kind for i in p.inputs} and any("no full-context row" in n for n in p.notes)


@pytest.mark.parametrize("fault", ["special-rows-zeroed", "rope-wraps-512"])
def test_default_run_fails_on_a_bug_only_its_new_inputs_reach(models, tmp_path, fault):
    """Zeroed embedding rows of ids 0-2 and positions that wrap at 512 passed main's default run
    (its rows drew ids from [3, vocab) and stopped at 512); now the default run fails, as one finding."""
    # a 1024-token context: past 512, and its float64 attention fits any machine
    code, summary = run(hf_copy(models, tmp_path, max_position_embeddings=1024), tmp_path / "p", *DEFAULT32,
                        "--plant", fault)
    assert code == 1
    failing = [c for c in summary["cells"] if c["status"] == "fail"]
    if fault == "rope-wraps-512":
        assert {c["case"]["input"] for c in failing} == {"full"}
        assert [f["id"] for f in summary["findings"]] == ["logits/long-positions"]
    else:
        assert [f["id"] for f in summary["findings"]] == ["logits/forward-at-embed"]
    assert summary["first_divergence"]["subject"] == "transformers"
    assert any(i["input"] == "full" and i["shape"] == "1x1024" for i in summary["inputs"]["cells"])


def test_a_planted_bug_is_one_finding_not_one_per_metric(models, tmp_path):
    code, summary = run(models["tiny-gqa/meta"], tmp_path / "p", "--dtypes", "float32", "--attn", "eager,sdpa",
                        "--tp", "1", "--shapes", "1x8,2x24", "--no-progress", "--plant", "no-permute")
    assert code == 1
    failing = [c for c in summary["cells"] if c["status"] == "fail"]
    assert len(failing) > 4
    assert [f["id"] for f in summary["findings"]] == ["logits/forward-at-layers.0.q"]
    assert summary["findings"][0]["cells"] == len(failing)


def test_tp2_logits_dtype_is_checked_against_tp1(models, tmp_path):
    """4.45's pretraining_tp > 1 head returned bfloat16 logits where tp 1 returned float32."""
    if not compat.tp_honoured():
        pytest.skip(f"{compat.TP_NOOP}: no tp 2 cell to check")
    code, summary = run(models["tiny-gqa/meta"], tmp_path / "p", "--dtypes", "bfloat16", "--attn", "eager",
                        "--tp", "1,2", "--shapes", "1x8", "--no-progress")
    rows = [c for c in summary["cells"] if c["metric"] == "logits_dtype"]
    assert len(rows) == 1 and rows[0]["case"]["tp"] == 2
    release = compat.transformers_release()
    if release.startswith("4.45."):
        assert code == 1 and rows[0]["status"] == "fail" and "bfloat16" in rows[0]["reason"]
        assert [f["id"] for f in summary["findings"]] == ["logits/tp-logits-dtype"]
        assert summary["findings"][0]["releases"] == "==4.45.*"
    else:
        assert code == 0 and rows[0]["status"] == "pass", rows[0]["reason"]


def test_float16_cache_in_bfloat16_fails_the_default_gate(models, tmp_path):
    """Keys kept in bfloat16 in a float16 KV cache are only 1.4x the reference's KL end to end, inside
    the extremes' scatter; against transformers' own full forward (cache_gap) they are 1.4-2.4x the
    dtype's rounding, where a correct cache stays below 1. The clean run passes, eager and sdpa."""
    fp16 = ["--dtypes", "float16", "--tp", "1", "--no-progress"]
    code, summary = run(models["tiny-gqa/meta"], tmp_path / "p", *fp16, "--plant", "kv-keys-bf16")
    assert code == 1
    failing = [c for c in summary["cells"] if c["status"] == "fail"]
    assert {c["metric"] for c in failing} == {"cache_gap"}
    assert {c["case"]["input"] for c in failing} == {"cached"}
    # every attention the release has (4.31 has no SDPA path for Llama: those cells are n/a)
    attns = {c["case"]["attn"] for c in summary["cells"] if c["case"].get("input") == "cached"
             and c["subject"] == "transformers" and c["status"] != "n/a"}
    assert attns and {c["case"]["attn"] for c in failing} == attns
    assert [f["id"] for f in summary["findings"]] == ["logits/kv-cache"]
    code, summary = run(models["tiny-gqa/meta"], tmp_path / "c", *fp16)
    assert code == 0
    gaps = [c for c in summary["cells"] if c["metric"] == "cache_gap" and c["subject"] == "transformers"]
    assert len(gaps) == len(attns) and all(c["status"] == "pass" and c["value"] < c["tolerance"] for c in gaps)
