"""Streaming (block by block from mapped files) gives the full-model comparison's numbers."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from harness.core.cases import Shape, make_inputs
from harness.core.errors import InputError
from harness.scale.localise import capture_full, locate
from harness.cli import main
from harness.core.checkpoints import open_model
from harness.scale.stream import shared_reference, stream_compare
from harness.core.checkpoints import HFFolder
from harness.core.compat import attn_implementations
from harness.core.subjects import ReferenceSubject, TransformersSubject
from reference_model import checkpoint
from reference_model.errors import CheckpointError


@pytest.mark.parametrize("name,dtype,attn", [
    ("tiny-mha/meta", "float32", "eager"),
    ("tiny-gqa/meta2", "bfloat16", "sdpa"),       # two model-parallel shards merged per block
    ("tiny-gqa/hf", "float16", "eager"),
    ("tiny-ffnmult/hf-sharded", "float32", "sdpa"),
])
def test_streamed_equals_full_model_comparison(models, name, dtype, attn):
    why = attn_implementations("cpu")[attn]
    if why:
        pytest.skip(f"{attn}: {why}")
    ckpt = checkpoint.load(models[name])
    hf = HFFolder(ckpt)
    ids = make_inputs(Shape(2, 12), ckpt.args.vocab_size, 1)
    try:
        streamed = stream_compare(models[name], ids, dtype, attn=attn, fine=True)
        order, ref, tf = capture_full(ckpt, hf.path, ids, dtype, attn=attn, fine=True)
        full = {"oracle-fp64": ReferenceSubject(ckpt, "float64", "cpu", oracle=True).logits(ids),
                "reference": ReferenceSubject(ckpt, dtype, "cpu").logits(ids),
                "transformers": TransformersSubject(hf.path, dtype, "cpu", attn).logits(ids).float()}
    finally:
        hf.close()
    for subject, logits in full.items():
        assert torch.equal(streamed.logits[subject], logits), subject     # same kernels, same numbers
    assert streamed.order == order
    assert streamed.reference == ref and streamed.transformers == tf


def test_streamed_localisation_names_the_planted_layer(models):
    path = models["tiny-ffnmult/hf"]
    ids = make_inputs(Shape(1, 12), 700, 0)

    def swap_in_layer_1(layer, module):
        if layer == 1:
            m = module.mlp
            m.gate_proj.weight.data, m.up_proj.weight.data = m.up_proj.weight.data, m.gate_proj.weight.data

    own = stream_compare(path, ids, "float32", layer_hook=swap_in_layer_1)
    found = locate(own.order, own.transformers, own.reference, "float32")
    assert (found["layer"], found["op"]) == (1, "mlp")
    assert own.transformers[(2, "attn_norm")] > 100 * own.reference[(2, "attn_norm")]   # inherited

    # Fed the oracle's input, layer 2 starts clean again: its error is its own, nothing inherited.
    fed = stream_compare(path, ids, "float32", feed="oracle", layer_hook=swap_in_layer_1)
    assert (locate(fed.order, fed.transformers, fed.reference, "float32")["layer"]) == 1
    assert fed.transformers[(2, "attn_norm")] < 2 * max(fed.reference[(2, "attn_norm")], 1.2e-7)


def test_blocks_are_read_one_at_a_time(models, monkeypatch):
    """Every block tensor is read for its own block only: no whole-model load on the way."""
    source = open_model(models["tiny-ffnmult/meta2"]).lazy()
    reads: list[str] = []
    real = source.raw
    monkeypatch.setattr(source, "raw", lambda key: reads.append(key) or real(key))
    meta, hf = source.block(1, torch.float32, "cpu")
    assert reads and all(k.startswith("layers.1.") for k in reads)
    # Shared where the layouts agree; only q/k are separate tensors.
    assert meta["feed_forward.w1.weight"] is hf["mlp.gate_proj.weight"]
    assert meta["attention.wq.weight"] is not hf["self_attn.q_proj.weight"]


def test_shared_reference_equals_a_separate_reference(models):
    ckpt = checkpoint.load(models["tiny-gqa/meta"])
    hf = HFFolder(ckpt)
    try:
        tf = TransformersSubject(hf.path, "float32", "cpu")
        shared = shared_reference(tf.model, ckpt.args)
        ids = make_inputs(Shape(1, 10), ckpt.args.vocab_size, 0)
        assert torch.equal(shared(ids), ReferenceSubject(ckpt, "float32", "cpu").logits(ids))
        hf_ptrs = {p.data_ptr() for p in tf.model.parameters()}
        separate = [n for n, p in shared.named_parameters() if p.data_ptr() not in hf_ptrs]
        assert sorted(separate) == sorted(f"layers.{i}.attention.w{x}.weight" for i in range(2) for x in "qk")
    finally:
        hf.close()


def test_bad_input(models, tmp_path):
    ids = make_inputs(Shape(1, 4), 512, 0)
    with pytest.raises(InputError, match="--feed"):
        stream_compare(models["tiny-mha/meta"], ids, "float32", feed="teacher")
    with pytest.raises(InputError, match="token ids"):
        stream_compare(models["tiny-mha/meta"], ids + 1000, "float32")
    # An implementation this machine or release lacks is refused with the reason, not run as another.
    with pytest.raises(InputError, match="--attn flash_attention_2: needs a CUDA device"):
        stream_compare(models["tiny-mha/meta"], ids, "float32", attn="flash_attention_2")
    broken = tmp_path / "broken"
    shutil.copytree(models["tiny-mha/hf-sharded"], broken)
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    victim = next(k for k in index["weight_map"] if ".mlp.up_proj." in k)
    # A file without the tensor its index promises: named by key when its block is reached.
    from safetensors.torch import load_file, save_file
    f = broken / index["weight_map"][victim]
    part = load_file(str(f))
    del part[victim]
    save_file(part, str(f))
    with pytest.raises(CheckpointError, match=victim.replace(".", r"\.")):
        stream_compare(broken, ids, "float32")


def test_cli_stream_writes_curve_and_logits_metrics(models, tmp_path):
    code = main(["stream", "--model", str(models["tiny-gqa/meta"]), "--dtype", "bfloat16", "--shape", "1x8",
                 "--out", str(tmp_path)])
    assert code == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["first_divergence"]["layer"] is None
    ops = {c["case"]["op"] for c in summary["cells"]}
    assert {"embed", "attn", "mlp", "norm", "head", "logits"} <= ops
    assert main(["stream", "--model", str(models["tiny-gqa/meta"]), "--feed", "x", "--out", str(tmp_path / "x")]) == 2


def test_without_oracle_transformers_is_measured_against_the_reference(models):
    from harness.core.metrics import compare
    path = models["tiny-gqa/hf"]
    ids = make_inputs(Shape(1, 8), 512, 0)
    with_oracle = stream_compare(path, ids, "bfloat16")
    pair = stream_compare(path, ids, "bfloat16", oracle=False)
    assert pair.reference == {} and set(pair.transformers) == set(pair.order)
    assert torch.equal(pair.logits["transformers"], with_oracle.logits["transformers"])
    expected, _ = compare(with_oracle.logits["transformers"], with_oracle.logits["reference"])
    assert pair.metrics["transformers"][0] == expected
