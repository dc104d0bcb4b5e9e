"""The training corpus split and the local lm-eval task data (scripts/train_tiny.py)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def train_tiny():
    spec = importlib.util.spec_from_file_location("train_tiny", ROOT / "scripts" / "train_tiny.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def corpus(train_tiny):
    return train_tiny.corpus()


def _key(p: str) -> str:
    return " ".join(p.split()).lower()


def test_heldout_paragraphs_never_reach_training(corpus):
    held = {_key(p) for p in corpus["heldout"]}
    assert len(held) == len(corpus["heldout"]) > 50
    assert not held & {_key(p) for p in corpus["train"]}
    # and no held-out paragraph sits inside a training paragraph word for word
    train_text = "\n".join(_key(p) for p in corpus["train"])
    assert not [p for p in held if p in train_text]


def test_task_data_is_deterministic_and_matches_the_committed_files(train_tiny, corpus, tmp_path):
    counts = train_tiny.build_task_data(corpus["heldout"], tmp_path)
    for name in ("heldout_mc", "heldout_ppl", "heldout_gen"):
        assert (tmp_path / f"{name}.jsonl").read_bytes() == (ROOT / "suites/lmeval/data" / f"{name}.jsonl").read_bytes()
    assert counts["mc"] >= 100


def test_multiple_choice_answer_is_the_true_continuation(corpus):
    rows = [json.loads(l) for l in (ROOT / "suites/lmeval/data/heldout_mc.jsonl").read_text().splitlines()]
    held = [" ".join(p.split()) for p in corpus["heldout"]]
    for r in rows:
        assert len(set(r["choices"])) == 4
        text = f"{r['context']} {r['choices'][r['label']]}"
        assert any(h.startswith(text) for h in held), r["id"]
    labels = [r["label"] for r in rows]
    assert {labels.count(k) for k in range(4)} != {0} and min(labels.count(k) for k in range(4)) > len(rows) / 8
