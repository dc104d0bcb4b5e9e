"""The CI recipe of docs/ci.md (scripts/ci_recipe.sh) run as a CI job would, on the embedded model
with one small cell: the cache key, a baseline made once and then kept, a clean check that passes
with every report in place, and a regression (a planted bug in the current run) that fails it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SMALL = "--dtypes float32 --attn eager --tp 1 --shapes 1x16 --inputs random --no-localise"


def recipe(*args: str, extra: str = SMALL) -> subprocess.CompletedProcess:
    env = {**os.environ, "LLAMA_PARITY": f"{sys.executable} -m harness", "PYTHON": sys.executable,
           "SUITE_ARGS": extra, "PYTHONPATH": str(ROOT)}
    return subprocess.run(["bash", str(ROOT / "scripts" / "ci_recipe.sh"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1800)   # a guard: seconds on an idle machine


def test_ci_recipe_baseline_once_then_check(tmp_path):
    import transformers
    key = recipe("key")
    assert key.returncode == 0, key.stderr
    assert key.stdout.strip().startswith("llama-parity-baseline-")
    assert key.stdout.strip().endswith(f"-transformers-{transformers.__version__}")

    base = tmp_path / "baseline"
    made = recipe("baseline", str(base))
    assert made.returncode == 0, made.stdout + made.stderr
    stamp = (base / "logits" / "summary.json").stat().st_mtime_ns
    again = recipe("baseline", str(base))            # restored from the cache: kept, not rerun
    assert again.returncode == 0 and "kept" in again.stdout
    assert (base / "logits" / "summary.json").stat().st_mtime_ns == stamp

    ok = recipe("check", str(base), str(tmp_path / "ok"))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    report = tmp_path / "ok" / "compare" / "report"
    assert (report / "index.html").is_file()
    junit = ET.parse(report / "junit.xml").getroot()
    assert junit.get("failures") == "0" and int(junit.get("tests")) > 0
    assert f"transformers {transformers.__version__} (same)" in (report / "junit.xml").read_text()
    assert (tmp_path / "ok" / "current" / "logits" / "report" / "junit.xml").is_file()

    bad = recipe("check", str(base), str(tmp_path / "bad"), extra=SMALL + " --plant act-gelu")
    assert bad.returncode == 1, bad.stdout + bad.stderr
    failed = json.loads((tmp_path / "bad" / "compare" / "summary.json").read_text())
    assert failed["verdict"] == "fail" and failed["counts"]["fail"] > 0
    assert 'failures="0"' not in (tmp_path / "bad" / "compare" / "report" / "junit.xml").read_text()
