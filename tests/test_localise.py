"""Localisation: plant a fault in ONE layer or op of transformers, check the harness names it."""
from __future__ import annotations

import json

import pytest
import torch

from harness.core.cases import Shape, make_inputs
from harness.core.faults import Fault
from harness.scale.localise import capture_full, first_divergence, locate, ratios, thresholds
from harness.cli import main
from harness.core.checkpoints import HFFolder
from harness.core.compat import attn_implementations
from reference_model import checkpoint
from reference_model.convert import permute, unpermute

MODEL = "tiny-ffnmult/meta"     # 3 layers, GQA 6/3: a middle layer and a last one to plant in


def needs(attn: str) -> None:
    """Skip, with the release's reason, a test of an implementation it does not have (sdpa < 4.36)."""
    why = attn_implementations("cpu")[attn]
    if why:
        pytest.skip(f"{attn}: {why}")


@pytest.fixture(scope="module")
def subject(models):
    ckpt = checkpoint.load(models[MODEL])
    hf = HFFolder(ckpt)
    yield ckpt, hf.path, make_inputs(Shape(2, 16), ckpt.args.vocab_size, 0)
    hf.close()


class OneLayer(Fault):
    """A fault applied to one layer of the loaded transformers model."""

    def __init__(self, layer: int, edit):
        self.layer, self.edit, self.name = layer, edit, f"layer-{layer}"

    def edit_model(self, model):
        self.edit(model, model.model.layers[self.layer])


def scale_o_proj(model, layer):
    layer.self_attn.o_proj.weight.data *= 1.05


def swap_gate_up(model, layer):
    m = layer.mlp
    m.gate_proj.weight.data, m.up_proj.weight.data = m.up_proj.weight.data, m.gate_proj.weight.data


def post_norm_eps(model, layer):
    layer.post_attention_layernorm.variance_epsilon = 1e-6   # transformers' default, not Llama 2's 1e-5


def k_not_permuted(model, layer):
    a = layer.self_attn
    a.k_proj.weight.data = unpermute(a.k_proj.weight.data, model.config.num_key_value_heads)


def v_permuted(model, layer):
    a = layer.self_attn
    a.v_proj.weight.data = permute(a.v_proj.weight.data, model.config.num_key_value_heads)


def input_norm_ignored(model, layer):
    layer.input_layernorm.weight.data.fill_(1.0)


def mask_sees_next(model, layer):
    def hook(module, args, kwargs):
        h = kwargs["hidden_states"]
        seq = h.shape[1]
        allowed = torch.ones(seq, seq, dtype=torch.bool).tril(1)
        mask = torch.zeros(seq, seq, dtype=h.dtype).masked_fill(~allowed, torch.finfo(h.dtype).min)
        kwargs["attention_mask"] = mask[None, None].expand(h.shape[0], 1, seq, seq)
        return args, kwargs
    layer.self_attn.register_forward_pre_hook(hook, with_kwargs=True)


class HeadScaled(Fault):
    name = "head-scaled"

    def edit_model(self, model):
        model.lm_head.weight.data *= 1.1


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_correct_transformers_has_no_divergence(subject, dtype, attn):
    needs(attn)
    ckpt, hf_path, ids = subject
    order, ref, tf = capture_full(ckpt, hf_path, ids, dtype, attn=attn)
    found = locate(order, tf, ref, dtype)
    assert found["layer"] is None and found["op"] is None, found
    assert set(tf) == set(order) == set(ref)          # every point of both subjects was captured
    # The margin the limit leaves (the docstring of harness.scale.localise quotes it).
    assert max(ratios(tf, ref, dtype).values()) < thresholds()[1]


@pytest.mark.parametrize("layer,edit,op", [
    (1, scale_o_proj, "attn"),
    (2, swap_gate_up, "mlp"),
    (1, post_norm_eps, "mlp_norm"),
    (2, k_not_permuted, "k"),
    (0, v_permuted, "v"),
    (2, input_norm_ignored, "attn_norm"),
    (1, mask_sees_next, "attn_weights"),
])
def test_planted_fault_is_named_at_its_layer_and_op(subject, layer, edit, op):
    ckpt, hf_path, ids = subject
    found = first_divergence(ckpt, hf_path, ids, "float32", attn="eager", fault=OneLayer(layer, edit))
    assert (found["layer"], found["op"]) == (layer, op), found
    assert found["ratio"] > thresholds()[1] and found["jump"] > thresholds()[1]


def test_head_fault_is_named_head_with_no_layer(subject):
    ckpt, hf_path, ids = subject
    found = first_divergence(ckpt, hf_path, ids, "float32", fault=HeadScaled())
    assert (found["layer"], found["op"], found["group"]) == (None, "head", "head")


def test_coarse_capture_names_the_coarse_op(subject):
    ckpt, hf_path, ids = subject
    found = first_divergence(ckpt, hf_path, ids, "float32", fault=OneLayer(2, k_not_permuted), fine=False)
    assert (found["layer"], found["op"], found["group"]) == (2, "attn", "attn")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_fault_is_named(subject, dtype):
    needs("sdpa")
    ckpt, hf_path, ids = subject
    found = first_divergence(ckpt, hf_path, ids, dtype, attn="sdpa", fault=OneLayer(1, swap_gate_up))
    assert (found["layer"], found["op"]) == (1, "mlp"), found


def test_cli_localise_names_planted_bug_and_writes_curve(models, tmp_path):
    # --plant applies the fault to every layer: the first divergence is then layer 0.
    code = main(["localise", "--model", str(models["tiny-gqa/meta"]), "--plant", "swap-gate-up",
                 "--shape", "1x12", "--out", str(tmp_path)])
    assert code == 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["first_divergence"]["layer"] == 0 and summary["first_divergence"]["op"] == "mlp"
    assert summary["verdict"] == "fail"
    subjects = {c["subject"] for c in summary["cells"]}
    assert subjects == {"reference", "transformers"}      # a curve for each subject
    report = (tmp_path / "report.md").read_text()
    assert "layers.0.mlp" in report and "first divergence" in report


def test_cli_localise_clean_model_exits_0(models, tmp_path):
    code = main(["localise", "--model", str(models["tiny-mha/hf"]), "--dtype", "bfloat16", "--shape", "1x12",
                 "--out", str(tmp_path)])
    assert code == 0
    assert json.loads((tmp_path / "summary.json").read_text())["first_divergence"]["layer"] is None


@pytest.mark.parametrize("argv,named", [
    (["--dtype", "float8"], "--dtype"),
    (["--shape", "12"], "--shape:"),
    (["--plant", "nope"], "--plant"),
    (["--model", "/nonexistent/model"], "--model"),
])
def test_cli_localise_bad_input_exits_2(models, tmp_path, capsys, argv, named):
    code = main(["localise", "--model", str(models["tiny-mha/meta"]), "--out", str(tmp_path), *argv])
    assert code == 2
    assert named in capsys.readouterr().err
    assert not (tmp_path / "summary.json").exists()
