"""ONNX Runtime (the dynamo export of transformers' model) and onnxruntime-genai (its own model
builder, Generator and KV cache): the float32 ones judged by the logits rule like transformers, the
int4 one by its budget with the error split, the builds cached, and a planted bug in each built
artefact caught."""
from __future__ import annotations

import pytest
import torch

from harness.subjects import KINDS
from harness.subjects.common import dequantised_checkpoint
from harness.subjects.fidelity import budget, over_budget
from subjects_common import embedded, exact_failures, lossy_failures, needs, oracle, split, text

ORT = needs("onnxscript", "onnx")
GENAI = needs("onnxruntime_genai", "onnx")


def make(kind: str, options: dict | None = None, dtype: str = "float32"):
    from harness.subjects import onnx, ortgenai  # noqa: F401  (registers the kinds)
    return KINDS[kind](embedded(), dtype, "cpu", dict(options or {}))


@ORT
def test_onnxruntime_dynamo_export_passes_the_logits_rule_and_is_cached():
    subject = make("onnxruntime")
    ids, _, truth = text()
    assert exact_failures(subject.forward(ids), ids, truth) == {}
    built = subject.folder / "BUILT"
    stamp = built.stat().st_mtime_ns
    again = make("onnxruntime")               # the same weights and tools: the cached export
    assert again.folder == subject.folder and built.stat().st_mtime_ns == stamp
    prov = subject.provenance()
    assert prov["export"]["exporter"] == "torch.onnx.export(dynamo=True)" and prov["onnxruntime"]
    # a padded row at its own positions equals the same row alone
    mask = torch.ones_like(ids[:2, :64])
    mask[1, :20] = 0
    padded = subject.forward(ids[:2, :64], mask)
    alone = subject.forward(ids[1:2, 20:64])
    assert torch.allclose(padded[1, 20:], alone[0], atol=1e-4)
    assert "decode" in subject.cannot()
    with pytest.raises(NotImplementedError):
        subject.decode(ids, 8)


@ORT
def test_onnxruntime_says_it_cannot_run_bfloat16():
    subject = make("onnxruntime", dtype="bfloat16")
    assert "dtype:bfloat16" in subject.cannot()
    with pytest.raises(NotImplementedError, match="bfloat16"):
        subject.forward(torch.zeros(1, 4, dtype=torch.long))


@ORT
def test_a_wrong_rope_base_in_the_exported_graph_fails_the_rule():
    subject = make("onnxruntime", {"plant": "onnx-rope-base"})
    ids, _, truth = text()
    assert {"kl_mean", "max_abs"} <= set(exact_failures(subject.forward(ids), ids, truth))
    # planted in a copy: the cached graph keeps Llama 2's frequencies, 10000^(-2i/head_dim)
    import onnx
    from onnx import numpy_helper
    graph = onnx.load(str(subject.folder / "model.onnx"))
    inv = next(numpy_helper.to_array(i) for i in graph.graph.initializer if i.name.endswith("rotary_emb.inv_freq"))
    hd = 2 * inv.shape[-1]
    expected = 1.0 / 10000 ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    assert torch.allclose(torch.from_numpy(inv).double(), expected, rtol=1e-6)


@GENAI
def test_genai_fp32_forward_and_its_own_cached_decode_pass_the_logits_rule():
    subject = make("onnxruntime-genai", {"precision": "fp32"})
    ids, _, truth = text()
    assert exact_failures(subject.forward(ids), ids, truth) == {}
    assert exact_failures(subject.decode(ids[:2], 96), ids[:2], truth[:2]) == {}
    assert subject.dequantised() is None and "padding" in subject.cannot()


@GENAI
def test_genai_int4_within_budget_and_its_dequantised_weights_are_the_kernels():
    subject = make("onnxruntime-genai", {"precision": "int4"})
    broken, _ = lossy_failures(subject)
    assert broken == {}, broken
    graph = subject.provenance()["graph"]
    assert graph["lm_head_quantised"] and graph["float_matmul"] == 0 and graph["accuracy_level"] == [4]
    quant, runtime = split(subject)
    assert over_budget({"weights_kl_mean": quant, "runtime_kl_mean": runtime}, budget("onnxruntime-genai", subject.settings())) == {}
    # With float32 activations (accuracy_level=1) the kernel computes with exactly the weights
    # dequantised() reads back: against their oracle it is float32-exact.
    f32 = make("onnxruntime-genai", {"precision": "int4", "accuracy_level": "1"})
    ids, _, _ = text()
    own = oracle(dequantised_checkpoint(embedded().ckpt, f32.dequantised())).logits(ids)
    assert exact_failures(f32.forward(ids), ids, own) == {}


@GENAI
@pytest.mark.parametrize("options, fault", [({"precision": "fp32"}, "genai-rope-base"),
                                            ({"precision": "int4"}, "genai-scale-row0")])
def test_planted_genai_bugs_are_caught(options, fault):
    subject = make("onnxruntime-genai", {**options, "plant": fault})
    ids, _, truth = text()
    if options["precision"] == "fp32":
        assert {"kl_mean", "max_abs"} <= set(exact_failures(subject.forward(ids), ids, truth))
    else:
        broken, _ = lossy_failures(subject)
        assert "kl_mean" in broken
