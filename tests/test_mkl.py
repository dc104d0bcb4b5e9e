"""MKL's code branch (harness/core/mkl.py): `train` pins COMPATIBLE before its first matrix multiply,
a user's MKL_CBWR wins, a process where MKL already ran says it could not pin, and the summary
records the branch MKL runs. Each case runs in a fresh process: MKL takes its branch once."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from harness.core import mkl

pytestmark = pytest.mark.skipif(mkl.branch() is None, reason="this torch build has no MKL")
PIN = "from harness.core import mkl\nprint(mkl.pin('COMPATIBLE'))\nprint(mkl.branch())\n"


def child(argv: list[str], **env) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"}
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, env={**clean, **env}, timeout=600)


def lines(code: str, **env) -> list[str]:
    done = child(["-c", code], **env)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_pinned_before_the_first_multiply():
    assert lines(PIN) == ["COMPATIBLE (pinned by the harness)", "COMPATIBLE"]


def test_after_a_multiply_it_says_it_could_not_and_changes_nothing():
    said, now = lines("import torch\na = torch.ones(8, 8)\na @ a\n" + PIN)
    assert said == "OFF (not pinned to COMPATIBLE: MKL had already run in this process)" and now == "OFF"


def test_the_callers_own_branch_wins():
    assert lines(PIN, MKL_CBWR="AVX2") == ["AVX2 (MKL_CBWR=AVX2, the caller's)", "AVX2"]
    assert lines(PIN, MKL_CBWR="") == ["OFF (MKL_CBWR=, the caller's)", "OFF"]     # empty: MKL's own default


def test_the_train_command_pins_it_and_its_summary_says_so(models, tmp_path):
    done = child(["-m", "harness", "train", "--model", str(models["tiny-mha/meta"]), "--out", str(tmp_path),
                  "--attn", "eager", "--tp", "1", "--ctx", "32", "--dtypes", "float32", "--casts", "load",
                  "--checkpointing", "off", "--inputs", "right"])
    assert done.returncode == 0, done.stderr
    env = json.loads((tmp_path / "summary.json").read_text())["environment"]
    assert env["mkl_branch"] == "COMPATIBLE (pinned by the harness)"
