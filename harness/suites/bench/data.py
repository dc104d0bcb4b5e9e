"""Benchmark data that is not generated here: QuaRTz, fetched once in a set-up step and cached.

QuaRTz (Tafjord et al. 2019, AllenAI; CC BY 4.0) is a 2-way qualitative-relations benchmark. The
`evals` wheel on PyPI (OpenAI's evals, MIT) ships 3,860 of its questions as chat prompts in
``evals/registry/data/quartz/samples.jsonl``. The wheel is fetched with pip (a registry client,
no hub), its sha256 checked, and each item converted to lm-eval's multiple-choice shape:
question stem as context, the two option texts as choices, the letter as the label.
"""
from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from harness.core.errors import InputError
from harness.core import cache_dir

EVALS_VERSION = "3.0.1.post1"
EVALS_WHEEL = f"evals-{EVALS_VERSION}-py3-none-any.whl"
EVALS_SHA256 = "0abcb2051303500784b1641a6e4f6b813ed43ad64f879a37d344a6774eb8eb78"
MEMBER = "evals/registry/data/quartz/samples.jsonl"
PROVENANCE = {
    "dataset": "QuaRTz as shipped in OpenAI evals (3,860 questions; QuaRTz has 3,864 over "
               "train/dev/test and evals does not say which it took)",
    "citation": "Tafjord, Gardner, Lin, Clark. QuaRTz: An Open-Domain Dataset of Qualitative "
                "Relationship Questions. EMNLP 2019.",
    "licence": "CC BY 4.0, as published by AllenAI. The wheel's LICENSE.md (MIT for the package) "
               "lists per-dataset licences but not quartz; the dataset keeps its own licence.",
    "source": f"PyPI evals=={EVALS_VERSION}, {MEMBER}",
    "wheel_sha256": EVALS_SHA256,
}
_OPTION = re.compile(r"^\s*([A-Z]):\s*(.+?)\s*$")


def convert_item(item: dict, where: str) -> dict:
    """One evals sample -> {"question", "choices", "label"}."""
    try:
        user = [m["content"] for m in item["input"] if m["role"] == "user"][-1]
        ideal = item["ideal"]
    except (KeyError, IndexError, TypeError):
        raise InputError(f"{where}: not an evals chat sample (input/user/ideal)") from None
    stem, _, options = user.partition("\n\n")
    letters, choices = [], []
    for line in options.splitlines():
        m = _OPTION.match(line)
        if m:
            letters.append(m.group(1))
            choices.append(m.group(2))
    if len(choices) < 2 or ideal not in letters:
        raise InputError(f"{where}: expected lettered options and an ideal letter among them")
    return {"question": " ".join(stem.split()), "choices": choices, "label": letters.index(ideal)}


def convert(lines: list[str], source: str) -> list[dict]:
    rows = []
    for n, line in enumerate(lines):
        if line.strip():
            row = convert_item(json.loads(line), f"{source}:{n + 1}")
            rows.append({"id": len(rows), **row})
    return rows


def ensure_quartz(cache: Path | None = None) -> Path:
    """The converted QuaRTz JSONL, fetched and built on first use (needs PyPI once)."""
    folder = (cache or cache_dir()) / "lmeval" / "quartz"
    out = folder / "quartz.jsonl"
    if out.is_file() and (folder / "provenance.json").is_file():
        return out
    with tempfile.TemporaryDirectory(prefix="llama-parity-evals-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               f"evals=={EVALS_VERSION}", "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheel = Path(tmp) / EVALS_WHEEL
        if proc.returncode != 0 or not wheel.is_file():
            raise InputError(f"QuaRTz set-up: `{' '.join(cmd)}` failed: {proc.stderr.strip()[-500:]}")
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        if digest != EVALS_SHA256:
            raise InputError(f"QuaRTz set-up: {EVALS_WHEEL} has sha256 {digest}, expected {EVALS_SHA256}")
        with zipfile.ZipFile(wheel) as z:
            lines = z.read(MEMBER).decode("utf-8").splitlines()
    rows = convert(lines, MEMBER)
    folder.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)
    tmp_out = out.with_suffix(".tmp")
    tmp_out.write_text(text, encoding="utf-8")
    tmp_out.replace(out)
    prov = {**PROVENANCE, "items": len(rows), "jsonl_sha256": hashlib.sha256(text.encode()).hexdigest()}
    (folder / "provenance.json").write_text(json.dumps(prov, indent=1) + "\n")
    return out
