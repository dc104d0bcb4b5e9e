"""`logits --subject KIND[:key=value,...]`: each subject is a parameter of the logits suite, gated on
its own rows, with who it is (settings, provenance, what it cannot do) in the summary and report;
a kind whose package is absent is n/a with the install command, never a traceback."""
from __future__ import annotations

import json
import os

import pytest

from harness.cli import main
from harness.subjects.common import has_module

FAST = ["--dtypes", "float32", "--attn", "eager", "--tp", "1", "--shapes", "1x8", "--no-progress"]
# Optional kinds and the module each needs; the first one absent here shows the n/a path.
OPTIONAL = (("llama.cpp", "llama_cpp"), ("torchao", "torchao"), ("quanto", "optimum.quanto"),
            ("onnxruntime", "onnxscript"), ("onnxruntime-genai", "onnxruntime_genai"))


def run(model, out, *extra) -> tuple[int, dict | None]:
    code = main(["logits", "--model", str(model), "--out", str(out), *FAST, *extra])
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else None
    return code, summary


def test_each_subject_is_gated_on_its_own_rows_with_its_provenance(models, tmp_path):
    absent = next((kind for kind, module in OPTIONAL if not has_module(module)), None)
    subjects = ["--subject", "transformers", "--subject", "transformers:plant=no-permute"]
    subjects += ["--subject", absent] if absent else []
    code, summary = run(models["tiny-gqa/meta"], tmp_path, "--inputs", "random,padded,cached", *subjects)
    assert code == 1                                  # the planted subject fails the gate
    by = {}
    for c in summary["cells"]:
        if c["against"] == "oracle-fp64":
            by.setdefault(c["subject"], []).append(c)
    clean, planted = by["transformers"], by["transformers:plant=no-permute"]
    assert clean and all(c["status"] in ("pass", "info") for c in clean)
    assert any(c["status"] == "fail" and c["metric"] == "kl_mean" for c in planted)
    assert {c["case"]["input"] for c in planted} == {c["case"]["input"] for c in clean} == {"random", "padded", "cached"}
    who = summary["subjects"]
    for label in ("transformers", "transformers:plant=no-permute"):
        assert who[label]["exact"] is True and who[label]["kind"] == "transformers"
        assert who[label]["provenance"]["torch"] and who[label]["provenance"]["transformers"]
        assert who[label]["settings"] == {"dtype": "float32", "attn": "eager", "tp": 1}
    assert who["transformers:plant=no-permute"]["provenance"]["plant"] == "no-permute"
    report = (tmp_path / "report.md").read_text()
    assert "transformers:plant=no-permute" in report
    if absent:
        rows = by[absent]
        assert rows and all(c["status"] == "n/a" and "pip install" in c["reason"] for c in rows)


def test_a_subject_that_cannot_pad_or_decode_is_na_with_its_reason(models, tmp_path, monkeypatch):
    """What a subject says it cannot do makes those cells n/a with its reason, the others run."""
    from harness.subjects import transformers as tf
    monkeypatch.setattr(tf.TransformersLM, "cannot", lambda self: {"padding": "no mask here", "decode": "no cache"})
    code, summary = run(models["tiny-gqa/meta"], tmp_path, "--inputs", "random,padded,cached")
    assert code == 0
    cells = {c["case"]["input"]: c for c in summary["cells"]
             if c["subject"] == "transformers" and c["against"] == "oracle-fp64" and c["metric"] in ("all", "kl_mean")}
    assert cells["padded"]["status"] == "n/a" and "no mask here" in cells["padded"]["reason"]
    assert cells["cached"]["status"] == "n/a" and "no cache" in cells["cached"]["reason"]
    assert cells["random"]["status"] == "pass"


@pytest.mark.parametrize("declared", [True, False])
def test_a_log_probability_subject_is_compared_in_log_softmax_space(models, tmp_path, monkeypatch, declared):
    """A subject that gives log-probabilities only (cannot "logits", as vLLM's default output) is
    judged in log-softmax space, its truth and calibrating reference taken there: transformers'
    own log_softmax passes the exact rule, its rows saying the space. Undeclared, the same numbers
    are compared with raw logits and max_abs measures the log-partition: the gate fails."""
    import torch

    from harness.subjects import transformers as tf
    for method in ("forward", "decode"):
        real = getattr(tf.TransformersLM, method)
        monkeypatch.setattr(tf.TransformersLM, method,
                            lambda self, *a, _real=real, **k: torch.log_softmax(_real(self, *a, **k).float(), -1))
    if declared:
        monkeypatch.setattr(tf.TransformersLM, "cannot", lambda self: {"logits": "log-probabilities only"})
    code, summary = run(models["tiny-gqa/meta"], tmp_path, "--inputs", "random,padded,cached")
    mine = [c for c in summary["cells"] if c["subject"] == "transformers" and c["against"] == "oracle-fp64"]
    max_abs = [c for c in mine if c["metric"] == "max_abs"]
    assert len(max_abs) == 3
    if declared:
        assert code == 0 and all(c["status"] == "pass" and c["extra"]["space"] == "log-softmax" for c in max_abs)
    else:
        assert code == 1 and all(c["status"] == "fail" and "space" not in c["extra"] for c in max_abs)


@pytest.mark.parametrize("spec, says", [("nope", "unknown kind 'nope'"),
                                        ("transformers:compile", "is not key=value"),
                                        # read by the kind's factory, before any subject is built
                                        ("transformers:bogus=1", "unknown option(s) bogus"),
                                        ("transformers:plant=nope", "plant='nope' is not a fault"),
                                        ("onnxruntime:attn=flash", "attn='flash'"),
                                        ("llama.cpp:quant=Q9", "quant='Q9'"),
                                        ("vllm:out=x", "logits or logprobs")])
def test_a_bad_subject_is_exit_2_naming_it_with_nothing_written(models, tmp_path, capsys, spec, says):
    """A bad kind or option is exit 2 before the run takes --out: not a journal line is written."""
    code, _ = run(models["tiny-gqa/meta"], tmp_path / "out", "--inputs", "random", "--subject", "transformers",
                  "--subject", spec)
    assert code == 2
    err = capsys.readouterr().err
    assert "--subject" in err and says in err, err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# --- the optional kinds through the suite (tox -e subjects: every package installed) --------------

OPTIONAL_RUN = pytest.mark.skipif(
    os.environ.get("LLAMA_PARITY_SUBJECTS") != "1",
    reason="minutes of CPU (a compile, quantising, the split's oracle): runs in tox -e subjects "
           "(LLAMA_PARITY_SUBJECTS=1)")
CORPUS = ["--inputs", "corpus,cached", "--ctx", "64", "--max-tokens", "256"]


@OPTIONAL_RUN
def test_plant_reaches_the_model_transformers_read_from_a_gguf(tmp_path):
    """--plant edits the model transformers builds from the converter's GGUF as it edits the HF
    folder's (load_transformers): the GGUF-read subject fails the gate, saying it was planted."""
    code = main(["logits", "--out", str(tmp_path), *FAST, "--inputs", "random",
                 "--subject", "transformers:gguf=F32", "--plant", "no-permute"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert code == 1
    rows = [c for c in summary["cells"] if c["subject"] == "transformers:gguf=F32" and c["against"] == "oracle-fp64"]
    assert any(c["status"] == "fail" and c["metric"] == "kl_mean" for c in rows)
    assert summary["subjects"]["transformers:gguf=F32"]["provenance"]["plant"] == "no-permute"


@OPTIONAL_RUN
def test_compiled_transformers_is_an_exact_subject_of_the_suite(tmp_path):
    """transformers:compile=1 on the embedded model: judged like transformers, its provenance
    saying it was compiled, and no localisation (it cannot be hooked)."""
    code, summary = main_embedded(tmp_path, "--subject", "transformers:compile=1", "--inputs", "corpus")
    assert code == 0, [c for c in summary["cells"] if c["status"] == "fail"]
    who = summary["subjects"]["transformers:compile=1"]
    assert who["exact"] and who["provenance"]["compile"]["backend"] == "inductor" and "hooks" in who["cannot"]


@OPTIONAL_RUN
@pytest.mark.skipif(not has_module("torchao"), reason="torchao is not installed (pip install 'llama-parity[torchao]')")
def test_a_lossy_subject_is_judged_by_its_budget_with_the_split(tmp_path):
    code, summary = main_embedded(tmp_path / "ok", "--subject", "torchao:quant=int8wo")
    assert code == 0, [c for c in summary["cells"] if c["status"] == "fail"]
    corpus = [c for c in summary["cells"] if c["subject"] == "torchao:quant=int8wo"
              and c["case"]["input"].startswith("corpus") and c["against"] == "oracle-fp64"]
    gated = {c["metric"]: c for c in corpus if c["status"] in ("pass", "fail")}
    assert {"kl_mean", "kl_p99", "rms_dp", "top1_differ", "weights_kl_mean"} <= set(gated)
    split = next(c for c in corpus if c["metric"] == "kl_max")["extra"]["split"]
    assert split["weights_kl_mean"] > 1e-7 and split["runtime_kl_mean"] < 1e-10    # weight-only: all weights
    code, summary = main_embedded(tmp_path / "bad", "--subject", "torchao:quant=int8wo,plant=torchao-scale-row0")
    assert code == 1
    failed = {c["metric"] for c in summary["cells"] if c["status"] == "fail"}
    assert {"kl_mean", "weights_kl_mean"} <= failed


def main_embedded(out, *extra) -> tuple[int, dict]:
    code = main(["logits", "--out", str(out), *FAST, *CORPUS, *extra])
    return code, json.loads((out / "summary.json").read_text())


@OPTIONAL_RUN
def test_transformers_reading_the_converters_f32_gguf_is_bit_equal_to_the_hf_folder():
    """llama.cpp's converter (from the pinned sdist) writes the F32 GGUF; transformers reads it back
    with gguf_file=: the logits equal those of the HF folder it was converted from, bit for bit."""
    import torch

    from harness.core.cases import Shape, make_inputs
    from harness.subjects.fidelity import build, open_source
    source = open_source()
    ids = make_inputs(Shape(2, 32), source.ckpt.args.vocab_size, 0)
    gguf = build("transformers:gguf=F32", source)
    assert gguf.exact and gguf.settings()["gguf"] == "F32" and gguf.provenance()["gguf"]["tensor_types"] == {"F32": 39}
    assert torch.equal(gguf.forward(ids), build("transformers", source).forward(ids))
