"""The transformers subject behind the Subject protocol: the plain one is today's subject value
for value (so moving the suites onto it changes no results.csv), its variants are judged by the
logits rule against the float64 oracle, and a fault planted through plant= fails that rule."""
from __future__ import annotations

import os

import pytest
import torch

from harness.core import compat
from harness.core.cases import Shape, make_inputs
from harness.core.errors import InputError
from harness.core.subjects import TransformersSubject, padded_positions, transformers_decode
from harness.subjects import KINDS, Subject, parse_spec
from harness.subjects import transformers as _registers  # noqa: F401  (registers the kind)
from subjects_common import embedded, exact_failures, load_kinds, oracle

IDS = make_inputs(Shape(2, 24), 32000, 0)
COMPILE = pytest.mark.skipif(
    os.environ.get("LLAMA_PARITY_SUBJECTS") != "1",
    reason="torch.compile (inductor) costs minutes of CPU per graph: run in `tox -e subjects`")


@pytest.fixture(scope="module")
def truth():
    return oracle(embedded().ckpt).logits(IDS)


def make(spec: str, dtype: str = "float32"):
    s = parse_spec(spec)
    return KINDS[s.kind](embedded(), dtype, "cpu", dict(s.options))


def test_plain_subject_is_todays_transformers_value_for_value():
    attn = "eager" if compat.attn_reason("sdpa", "cpu") else "sdpa"     # 4.31 has no SDPA path
    subject = make(f"transformers:attn={attn}")
    assert isinstance(subject, Subject) and subject.name == "transformers"
    assert subject.settings() == {"dtype": "float32", "attn": attn, "tp": 1}     # the logits rows' case keys
    today = TransformersSubject(embedded().hf_path(), "float32", "cpu", attn, 1)
    assert torch.equal(subject.forward(IDS), today.logits(IDS))
    mask = torch.ones_like(IDS)
    mask[1, :7] = 0
    with torch.inference_mode():
        padded = today.model(input_ids=IDS, attention_mask=mask, position_ids=padded_positions(mask),
                             use_cache=False).logits
    assert torch.equal(subject.forward(IDS, mask), padded)
    assert torch.equal(subject.decode(IDS, 16), transformers_decode(today.model, IDS, 16))
    prov = subject.provenance()
    assert prov["transformers"] == compat.transformers_release() and prov["attn_implementation"] == attn
    assert subject.dequantised() is None


def test_plain_subject_passes_the_logits_rule(truth):
    assert exact_failures(make("transformers").forward(IDS), IDS, truth) == {}


def test_static_cache_decode_passes_the_logits_rule_or_says_why_not(truth):
    subject = make("transformers:cache=static")
    assert subject.settings()["cache"] == "static"
    why = subject.cannot().get("decode")
    assert bool(why) == (compat.transformers_version() < (4, 41))     # the releases make_cache refuses
    if why:
        assert "StaticCache" in why
        with pytest.raises(NotImplementedError):
            subject.decode(IDS, 16)
        return
    assert exact_failures(subject.decode(IDS, 16), IDS, truth) == {}


def test_a_fault_planted_through_the_subject_fails_the_rule(truth):
    subject = make("transformers:plant=swap-gate-up")
    assert subject.provenance()["plant"] == "swap-gate-up"
    assert {"kl_mean", "max_abs"} <= set(exact_failures(subject.forward(IDS), IDS, truth))


@pytest.mark.parametrize("spec, needle", [
    ("transformers:attn=magic", "attn='magic'"),
    ("transformers:tp=0", "tp='0'"),
    ("transformers:colour=red", "unknown option(s) colour"),
    ("transformers:backend=eager", "backend= needs compile=1"),
    ("transformers:plant=nope", "plant='nope'"),
    ("transformers:plant=onnx-rope-base", "not a fault of transformers"),
    ("transformers:gguf=Q9", "gguf='Q9'"),
    ("transformers:gguf=F32,compile=1", "gguf= takes attn=, tp= and plant= only"),
    ("torchao:quant=int3", "quant='int3'"),
    ("quanto:weights=fp8", "weights='fp8'"),
    ("onnxruntime:attn=flash", "attn='flash'"),
    ("onnxruntime-genai:precision=fp32,accuracy_level=4", "accuracy_level="),
    ("onnxruntime-genai:precision=int2", "precision='int2'"),
])
def test_bad_options_are_bad_input_naming_the_subject(spec, needle):
    load_kinds()
    with pytest.raises(InputError) as e:
        make(spec)
    assert needle in str(e.value) and "--subject" in str(e.value)


@COMPILE
@pytest.mark.slow
@pytest.mark.parametrize("spec", ["transformers:compile=1", "transformers:compile=1,cache=static"])
def test_compiled_transformers_passes_the_logits_rule(truth, spec):
    subject = make(spec)
    assert subject.settings()["compile"] == "inductor" and "hooks" in subject.cannot()
    logits = subject.decode(IDS, 16) if "static" in spec else subject.forward(IDS)
    assert exact_failures(logits, IDS, truth) == {}
    assert subject.provenance()["compile"]["first_call_seconds"]


@pytest.mark.parametrize("spec, module, extra", [("torchao", "torchao", "torchao"),
                                                 ("quanto", "optimum.quanto", "quanto"),
                                                 ("onnxruntime", "onnxscript", "onnx"),
                                                 ("onnxruntime-genai", "onnxruntime_genai", "onnx")])
def test_an_optional_subject_without_its_package_is_bad_input_naming_the_extra(spec, module, extra):
    from harness.subjects.common import has_module
    if has_module(module):
        pytest.skip(f"{module} is installed here")
    load_kinds()
    with pytest.raises(InputError, match=rf"needs the .* package \(pip install 'llama-parity\[{extra}\]'\)"):
        make(spec)
