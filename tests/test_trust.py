"""A verdict a gate can trust: each class of wrong verdict seen from outside, planted and refused.

False pass (a resumed run reusing rows of other weights), false blame (two weight sets in one
folder), policies that would judge nothing, sizes that cannot fit, configs and weights that are not
Llama 2, runs that measure nothing, debris from a killed write. Every refusal is exit 2 naming the
argument, file or key, and leaves what was in --out as it was.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from harness.cli import main

SUITES = Path(__file__).resolve().parent.parent / "suites"
SMALL = ["--dtypes", "float32", "--attn", "eager", "--tp", "1", "--shapes", "1x6", "--no-progress", "--no-localise"]


def logits(model: Path, out: Path, *extra: str) -> int:
    return main(["logits", "--model", str(model), "--out", str(out), *SMALL, *extra])


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()} if folder.exists() else {}


def refused(capsys, argv: list[str], out: Path, *needles: str) -> str:
    """exit 2, every needle in the message, and --out exactly as it was."""
    before = snapshot(out)
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert all(n in err for n in needles), err
    assert "Traceback" not in err
    assert snapshot(out) == before
    return err


def poison_in_place(path: Path, key: str) -> None:
    """Overwrite one weight of a Meta shard with NaN byte for byte: same name, same size, and the
    modification time put back, as `cp -p`, `rsync -a` or `tar` leave a copy."""
    st = path.stat()
    w = torch.load(path, weights_only=True)[key]
    old = w.flatten()[:4].contiguous().numpy().tobytes()
    new = torch.full((4,), float("nan"), dtype=w.dtype).numpy().tobytes()
    data = path.read_bytes()
    assert data.count(old) == 1, "the first four values must be a unique byte pattern in the file"
    path.write_bytes(data.replace(old, new))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


def test_a_nan_model_with_the_same_file_names_sizes_and_mtimes_is_not_resumed_as_the_clean_one(
        models, tmp_path, capsys):
    model, out = tmp_path / "model", tmp_path / "out"
    shutil.copytree(models["tiny-gqa/meta"], model)
    assert logits(model, out) == 0
    capsys.readouterr()
    poison_in_place(model / "consolidated.00.pth", "layers.0.attention.wq.weight")
    code = logits(model, out)
    printed = capsys.readouterr().out
    assert code == 1 and "resumed:" not in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["verdict"] == "fail"
    assert any("NaN" in c["reason"] for c in summary["cells"] if c["status"] == "fail")


def test_a_folder_with_two_weight_sets_is_refused_naming_both(models, tmp_path, capsys):
    two = tmp_path / "two"
    shutil.copytree(models["tiny-gqa/hf-sharded"], two)
    shutil.copy2(models["tiny-gqa/hf"] / "model.safetensors", two / "model.safetensors")
    refused(capsys, ["logits", "--model", str(two), "--out", str(tmp_path / "out"), *SMALL], tmp_path / "out",
            "two sets of weights", "model.safetensors and model.safetensors.index.json")


def test_convert_into_a_folder_that_holds_a_checkpoint_is_refused(models, tmp_path, capsys):
    into = tmp_path / "into"
    shutil.copytree(models["tiny-gqa/hf-sharded"], into)
    refused(capsys, ["convert", "--model", str(models["tiny-gqa/meta"]), "--to", "hf", "--out", str(into)], into,
            "--out", "already holds a checkpoint")


@pytest.mark.parametrize("name, old, new, needle", [
    ("floor-nan", "floor = 1e-05", "floor = nan", "[float32.max_abs]: floor = nan"),
    ("abs-negative", "abs = 0.01", "abs = -0.01", "[float32.max_abs]: abs = -0.01"),
    ("abs-boolean", "abs = 0.01", "abs = true", "[float32.max_abs]: abs = True"),
    ("factor-nan", "factor = 4.0", "factor = nan", "factor = nan must be a finite number >= 1"),
    ("misspelled-metric", "[float32.max_abs]", "[float32.max_abss]", "[float32.max_abss]: unknown metric"),
    ("missing-metric", "[float32.kl_max]", "[float32.kl_max_unused]", "[float32.kl_max_unused]: unknown metric"),
])
def test_a_bad_tolerance_policy_is_refused_before_the_previous_results_change(
        models, tmp_path, capsys, name, old, new, needle):
    out = tmp_path / "out"
    assert logits(models["tiny-gqa/meta"], out) == 0
    capsys.readouterr()
    text = (SUITES / "tolerance.toml").read_text(encoding="utf-8")
    assert old in text
    policy = tmp_path / f"{name}.toml"
    policy.write_text(text.replace(old, new, 1), encoding="utf-8")
    refused(capsys, ["logits", "--model", str(models["tiny-gqa/meta"]), "--out", str(out), *SMALL,
                     "--policy", str(policy)], out, str(policy), needle)


def test_a_policy_without_a_metric_the_suite_gates_is_refused(models, tmp_path, capsys):
    text = (SUITES / "tolerance.toml").read_text(encoding="utf-8")
    start = text.index("[bfloat16.kl_max]")
    end = text.index("\n[", start + 1)
    policy = tmp_path / "short.toml"
    policy.write_text(text[:start] + text[end + 1:], encoding="utf-8")
    refused(capsys, ["logits", "--model", str(models["tiny-gqa/meta"]), "--out", str(tmp_path / "out"),
                     "--policy", str(policy), "--dtypes", "bfloat16", "--attn", "eager", "--tp", "1",
                     "--shapes", "1x6"], tmp_path / "out", str(policy), "kl_max")


def _hf_with(models, tmp_path, change: dict) -> Path:
    d = tmp_path / "model"
    shutil.copytree(models["tiny-gqa/hf"], d)
    config = json.loads((d / "config.json").read_text())
    config.update(change)
    (d / "config.json").write_text(json.dumps(config))
    return d


@pytest.mark.parametrize("change, needle", [
    ({"hidden_act": "gelu"}, "config.json [hidden_act]: 'gelu': Llama 2 has 'silu'"),
    ({"head_dim": 7}, "config.json [head_dim]: 7"),
    ({"num_key_value_heads": 0}, "config.json [num_key_value_heads]: 0 must be positive"),
    ({"num_hidden_layers": 10 ** 6}, "config.json [n_layers]: 1000000 layers"),
])
def test_a_config_that_is_not_llama_2_is_refused_naming_the_key(models, tmp_path, capsys, change, needle):
    model = _hf_with(models, tmp_path, change)
    refused(capsys, ["logits", "--model", str(model), "--out", str(tmp_path / "out"), *SMALL],
            tmp_path / "out", needle)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.int8, torch.complex64])
def test_weights_that_cannot_be_compared_honestly_are_refused(models, tmp_path, capsys, dtype):
    from safetensors.torch import load_file, save_file
    d = tmp_path / "model"
    shutil.copytree(models["tiny-gqa/hf"], d)
    sd = load_file(d / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight"
    sd[key] = sd[key].to(dtype)
    save_file(sd, d / "model.safetensors")
    refused(capsys, ["logits", "--model", str(d), "--out", str(tmp_path / "out"), *SMALL], tmp_path / "out",
            f"[{key}]: dtype {str(dtype).removeprefix('torch.')}")


@pytest.mark.parametrize("shapes, needle", [
    ("1x999999", "--shapes"),            # fits the limits, not the memory: the estimate says so
    ("99999999x8", "--shapes: '99999999x8' is larger than the harness runs"),
])
def test_sizes_that_cannot_fit_are_refused_before_anything_is_built(models, tmp_path, capsys, shapes, needle):
    err = refused(capsys, ["logits", "--model", str(models["tiny-gqa/meta"]), "--out", str(tmp_path / "out"),
                           "--dtypes", "float32", "--attn", "eager", "--tp", "1", "--shapes", shapes],
                  tmp_path / "out", needle)
    assert "MemoryError" not in err


@pytest.mark.parametrize("argv, needle", [
    (["behaviour", "--suite", ","], "--suite: no value given"),
    (["logits", "--shapes", ""], "--shapes: no shape given"),
    (["logits", "--attn", "flash_attention_2", "--dtypes", "float32", "--tp", "1", "--shapes", "1x6"],
     "--attn flash_attention_2: none can run here, so nothing would be measured"),
])
def test_a_run_that_would_measure_nothing_is_refused_not_passed(models, tmp_path, capsys, argv, needle):
    if "flash_attention_2" in argv and torch.cuda.is_available():
        pytest.skip("flash_attention_2 may run on this machine")
    refused(capsys, [*argv, "--model", str(models["tiny-gqa/hf"]), "--out", str(tmp_path / "out")],
            tmp_path / "out", needle)


def test_a_killed_writes_temporary_file_is_removed_by_the_next_run(models, tmp_path):
    out = tmp_path / "out"
    assert logits(models["tiny-gqa/meta"], out) == 0
    debris = out / ".summary.json.12345.tmp"      # what a kill between write and rename leaves
    debris.write_text("{half a summ")
    assert logits(models["tiny-gqa/meta"], out) == 0
    assert not debris.exists() and not list(out.glob(".*.tmp"))
