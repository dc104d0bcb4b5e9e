"""The tokenizer suite: results in the common schema, verdicts, n/a with reasons, known divergences."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from harness.core import real_tokenizer as fixtures
from harness.core.errors import InputError
from harness.core.store import FAIL, INFO, NA, PASS
from harness.core.subjects import transformers_version
from harness.suites.tokenizer import (Catalogue, discover_subjects, fuzz_texts, load_catalogue,
                                     run_tokenizer_suite)


@pytest.fixture(scope="session")
def tokenizer_model() -> Path:
    cache = os.environ.get("LLAMA_PARITY_CACHE")
    return fixtures.ensure_tokenizer_model(Path(cache) / "tokenizer" if cache else None)


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text(encoding="utf-8"))


def test_reference_alone_passes_everything(tokenizer_model, tmp_path):
    out = tmp_path / "ref"
    code = run_tokenizer_suite(tokenizer_model, out, fuzz_examples=60, subjects=["reference"],
                               codepoint_step=997, progress=False)
    s = _summary(out)
    assert code == 0 and s["verdict"] == PASS and s["suite"] == "tokenizer"
    metrics = {c["metric"] for c in s["cells"]}
    assert {"encode", "encode_special", "roundtrip", "decode", "batch_encode", "batch_decode",
            "fuzz_encode", "vocab_decode", "vocab_encode", "codepoint_encode"} <= metrics
    pads = [c for c in s["cells"] if c["metric"].startswith("pad_")]
    assert pads and all(c["status"] == NA and "pad_id -1" in c["reason"] for c in pads)
    assert all(c["against"] == "sentencepiece" for c in s["cells"])
    assert (out / "results.csv").is_file() and (out / "report.md").is_file()
    assert s["tokenizer_sha256"] and s["environment"]


def test_transformers_divergences_are_recorded_with_evidence(tokenizer_model, tmp_path):
    """AutoTokenizer on a folder with only tokenizer.model (transformers 5.x: tokenizers-backed)."""
    out = tmp_path / "auto"
    code = run_tokenizer_suite(tokenizer_model, out, fuzz_examples=60, subjects=["transformers.AutoTokenizer*"],
                               codepoint_step=4999, vocab_sweep=False, progress=False)
    s = _summary(out)
    cells = s["cells"]
    assert cells and code == (1 if any(c["status"] == FAIL for c in cells) else 0)
    if all(c["status"] == NA for c in cells):
        # 4.x AutoTokenizer cannot load a folder holding only tokenizer.model (it wants config.json):
        # recorded as n/a with the loader's own error, which is what this release offers.
        assert transformers_version() < (5, 0) and all("loading failed" in c["reason"] for c in cells)
        return
    # special-token strings in text: matched by transformers, known, so info with the reason
    special = [c for c in cells if c["case"]["case"] == "special-bos-string" and c["metric"] == "encode"]
    assert special and special[0]["status"] == INFO and special[0]["reason"].startswith("known divergence:")
    ev = special[0]["extra"]["divergences"][0]
    assert ev["text"] == "<s>" and ev["expected"] == [529, 29879, 29958] and ev["got"] == [1]
    assert ev["expected_pieces"] == ["▁<", "s", ">"] and ev["got_pieces"] == ["<s>"]
    for c in cells:
        if c["status"] == FAIL:
            assert c["extra"]["divergences"], c        # every failure carries its evidence


def test_known_divergence_matching():
    cat = Catalogue("t", [], [], [], [], [{"subjects": "transformers.*/add_prefix_space=False", "cases": "*",
                                           "reason": "deliberate"}])
    assert cat.known_reason("transformers.LlamaTokenizer/from_pretrained/add_prefix_space=False", "x", "encode")
    assert not cat.known_reason("transformers.LlamaTokenizer/from_pretrained", "x", "encode")
    assert not cat.known_reason("reference/model_path", "x", "encode")


def test_every_subject_is_run_or_na_with_reason(tokenizer_model, tmp_path):
    import transformers
    subjects = discover_subjects(tokenizer_model, tmp_path)
    labels = [s.label for s in subjects]
    assert labels[0] == "reference/model_path"
    assert any(l.startswith("transformers.LlamaTokenizer/from_pretrained") for l in labels)
    assert any(l.startswith("transformers.LlamaTokenizer/saved") for l in labels)
    for s in subjects:
        assert s.na or s.make is not None
        assert not s.na or len(s.na) > 10
    from harness.suites.tokenizer import load_subject
    auto = load_subject(next(s for s in subjects if s.name == "transformers.AutoTokenizer"))
    assert auto.na or auto.encode("Hello world") == [15043, 3186]
    if int(transformers.__version__.split(".")[0]) >= 5:
        na = [s for s in subjects if s.name == "transformers.LlamaTokenizer(sentencepiece)"]
        assert na and "removed the sentencepiece-backed" in na[0].na


def test_fuzz_texts_are_deterministic():
    assert fuzz_texts(30) == fuzz_texts(30)
    assert len(fuzz_texts(30)) > 10


def test_catalogue_is_complete():
    cat = load_catalogue()
    names = {c["name"] for c in cat.encode}
    for must in ("empty", "prefix-space-banana", "space-leading", "newlines", "special-bos-then-text",
                 "emoji-zwj-family", "cjk-rare-ext-b", "combining-marks", "digits", "long-one-word",
                 "mixed-scripts"):
        assert must in names
    assert cat.decode and cat.batch and {p["side"] for p in cat.padding} == {"left", "right"}


@pytest.mark.parametrize("content, match", [
    (b"not a model", "--tokenizer"),
    (b"", "no pieces"),
])
def test_bad_tokenizer_file_is_input_error(tmp_path, content, match):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(content)
    with pytest.raises(InputError, match=match) as e:
        run_tokenizer_suite(path, tmp_path / "out", fuzz_examples=0, progress=False)
    assert str(path) in str(e.value)


def test_missing_file_and_bad_catalogue(tmp_path, tokenizer_model):
    with pytest.raises(InputError, match="no such file"):
        run_tokenizer_suite(tmp_path / "nope.model", tmp_path / "out", progress=False)
    bad = tmp_path / "cases.toml"
    bad.write_text("[[encode]]\nname = 1\n")
    with pytest.raises(InputError, match=str(bad)):
        run_tokenizer_suite(tokenizer_model, tmp_path / "out", cases_file=bad, progress=False)


def test_cli_exit_codes(tokenizer_model, tmp_path, capsys):
    from harness.cli import main
    assert main(["tokenizer", "--tokenizer", str(tmp_path / "missing.model"), "--out", str(tmp_path / "o")]) == 2
    assert main(["tokenizer", "--tokenizer", str(tokenizer_model), "--out", str(tmp_path / "o"),
                 "--subjects", "reference", "--fuzz-examples", "20", "--codepoint-step", "4999",
                 "--no-vocab-sweep", "--no-progress"]) == 0
    assert _summary(tmp_path / "o")["verdict"] == PASS
