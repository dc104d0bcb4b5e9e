"""`stream --subject` takes any kind that offers "stream": its decoder layers built one block's
weights at a time (harness/subjects/layers.py). A registered kind with a bug of its own in one layer
is streamed and localised there, where transformers is clean; a kind that cannot stream, or an
option only a whole model takes, is exit 2; torchao's and quanto's layers, quantised as they are built, give
the whole quantised model's logits without the whole model ever loaded."""
from __future__ import annotations

import pytest
import torch

from harness.subjects.layers import TransformersLayers, layer_options
from subjects_common import shaped_run, embedded, needs, register_kind

LAYER = 2      # of the embedded model's 4


class DriftedLayers(TransformersLayers):
    """transformers' layers with layer 2's MLP output projection 1% off."""
    name = "drifted-layers"

    def layer(self, i, state):
        module = super().layer(i, state)
        if i == LAYER:
            with torch.no_grad():
                module.mlp.down_proj.weight.mul_(1.01)
        return module


def drifted_layers(source, dtype, device, options):
    o, common = layer_options("drifted-layers", options)
    o.done()
    return DriftedLayers(source, dtype, device, **common)


@pytest.fixture
def kinds(monkeypatch):
    never = lambda *a: pytest.fail("stream built a whole model")   # noqa: E731
    register_kind(monkeypatch, "drifted-layers", never, layers=drifted_layers)
    register_kind(monkeypatch, "unstreamed", never)


def stream(tmp_path, *argv) -> tuple[int, dict | None]:
    return shaped_run("stream", tmp_path, *argv)


def test_a_kind_that_offers_stream_is_streamed_and_localised_at_its_own_bug(tmp_path, kinds):
    code, summary = stream(tmp_path, "--subject", "drifted-layers")
    assert code == 1
    found = summary["first_divergence"]
    assert (found["layer"], found["op"]) == (LAYER, "mlp"), found
    assert {c["subject"] for c in summary["cells"] if c["status"] == "fail"} == {"drifted-layers"}
    assert summary["subject"]["label"] == "drifted-layers"
    assert stream(tmp_path / "plain")[0] == 0          # transformers on the same input is clean


@pytest.mark.parametrize("spec, says", [("unstreamed", "kinds that can: "),
                                        ("transformers:tp=2", "unknown option(s) tp"),
                                        ("transformers:plant=torchao-scale-row0", "plant")])
def test_a_subject_that_cannot_stream_is_exit_2(tmp_path, capsys, kinds, spec, says):
    code, summary = stream(tmp_path, "--subject", spec)
    assert code == 2 and summary is None
    err = capsys.readouterr().err
    assert spec.split(":")[0] in err and says in err, err


@pytest.mark.parametrize("text, options", [
    pytest.param("torchao:quant=int8wo", {"quant": "int8wo"}, marks=needs("torchao", "torchao"), id="torchao"),
    pytest.param("quanto:weights=int8", {"weights": "int8"}, marks=needs("optimum.quanto", "quanto"), id="quanto"),
])
def test_quantised_layers_streamed_give_the_whole_quantised_models_logits(text, options):
    """Quantising each layer as it is built is the whole model's quantisation: the streamed logits
    are the whole quantised model's to float32 rounding, with no whole model loaded."""
    from harness.core.cases import Shape, make_inputs
    from harness.core.checkpoints import open_model
    from harness.scale.stream import stream_compare
    from harness.subjects import Spec, factory, parse_spec
    spec = parse_spec(text)
    ids = make_inputs(Shape(1, 16), embedded().ckpt.args.vocab_size, 0)
    streamed = stream_compare(open_model(None).path, ids, "float32", subject=spec)
    assert not streamed.exact and streamed.subject == text
    whole = factory(spec)(embedded(), "float32", "cpu", options).forward(ids).float()
    assert torch.allclose(streamed.logits[spec.label()], whole, atol=1e-4, rtol=0)
    plain = stream_compare(open_model(None).path, ids, "float32", subject=Spec("transformers")).logits["transformers"]
    assert (whole - plain).abs().max() > 1e-3      # quantised: not the float model by another name
