"""Shared fixtures: deterministic tiny checkpoints written once per test session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never reach a model hub; make any attempt fail loudly instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from harness.core.presets import write_preset  # noqa: E402


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
    return out
