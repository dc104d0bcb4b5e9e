"""Shared fixtures and helpers: deterministic tiny checkpoints written once per test session, and
the one way tests run a command (``harness.cli.main``, as a user's shell would)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

# Tests never reach a model hub; make any attempt fail loudly instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from harness.cli import main  # noqa: E402
from harness.core.presets import write_preset  # noqa: E402


# Test files whose verdict does not depend on the transformers release: the reference model and
# tokenizer, statistics, rendering of stored results, checkpoint parsing, refusals of bad input, the
# CLI's help, resume and locking, the museum's catalogue. Every one of them still runs on the newest
# release; the older releases' envs (tox.ini) deselect them with -m "not one_release" so that CI
# spends its time on what a release can change. A file that drives transformers to a verdict does
# not belong here.
ONE_RELEASE = {
    "test_baseline.py", "test_bench_compare.py", "test_bench_data.py", "test_ci_recipe.py",
    "test_cli_help.py", "test_fuzz_checkpoint.py", "test_fuzz_cli.py", "test_history.py",
    "test_hygiene.py", "test_metrics.py", "test_parallel.py", "test_pytest_plugin.py",
    "test_reference_model.py", "test_reliability.py", "test_report_html.py",
    "test_report_html_browser.py", "test_report_junit.py", "test_report_views.py",
    "test_subject_venvs.py", "test_tokenizer_reference.py", "test_trust.py", "test_mkl.py",
    "test_localise_subjects.py",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in ONE_RELEASE:
            item.add_marker(pytest.mark.one_release)


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Path]:
    """name -> checkpoint folder, for every tiny preset in Meta (1 and 2 shards) and HF layouts."""
    root = tmp_path_factory.mktemp("models")
    out = {}
    for preset in ("tiny-mha", "tiny-gqa", "tiny-ffnmult", "tiny-outliers"):
        out[f"{preset}/meta"] = write_preset(preset, root / preset / "meta", fmt="meta")
        out[f"{preset}/meta2"] = write_preset(preset, root / preset / "meta2", fmt="meta", shards=2)
        out[f"{preset}/hf"] = write_preset(preset, root / preset / "hf", fmt="hf")
        out[f"{preset}/hf-sharded"] = write_preset(preset, root / preset / "hf-sharded", fmt="hf",
                                                   hf_shard_tensors=7)
    # Llama 2's head_dim 128 (1/sqrt(128) is not exact in low precision); HF only (max_seq_len 2048)
    out["long-hd128"] = write_preset("long-hd128", root / "long-hd128", fmt="hf")
    return out


def summary(out: Path) -> dict | None:
    path = Path(out) / "summary.json"
    return json.loads(path.read_text()) if path.exists() else None


def failing(cells: list[dict]) -> list[dict]:
    return [c for c in cells if c["status"] == "fail"]


def run_suite(model: Path, out: Path, suite: str, plant: str | None = None, dtypes=("float32",),
              attns=("eager",)) -> tuple[int, list[dict]]:
    """One behaviour sub-suite through the CLI: (exit code, its cells)."""
    argv = ["behaviour", "--model", str(model), "--suite", suite, "--dtypes", ",".join(dtypes),
            "--attn", ",".join(attns), "--out", str(out)]
    code = main(argv + (["--plant", plant] if plant else []))
    return code, summary(Path(out) / suite)["cells"]
