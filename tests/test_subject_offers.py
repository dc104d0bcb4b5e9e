"""Which subject kinds `axes` and `train` judge comes from the registry (what each kind offers),
not from a name in the suites: a kind that does not offer what a command needs is exit 2 naming
the kinds that do, and a subject whose options take the capability away (a compiled forward) is
n/a with its own reason instead of being judged through a module it does not run."""
from __future__ import annotations

import pytest
import torch

from harness.cli import main
from harness.core.errors import InputError
from harness.subjects import AXES, DEFAULT, KINDS, OFFERS, Cannot, Spec, module_of, offering, register
from harness.subjects import transformers as _registers  # noqa: F401  (registers the kind)
from harness.subjects.transformers import transformers_subject
from subjects_common import embedded, load_kinds


def test_no_subject_is_the_default_kind_and_it_offers_module_and_train():
    assert offering(None, "train", "train", "autograd") == Spec(DEFAULT)
    assert {"module", "train"} <= OFFERS[DEFAULT]


@pytest.mark.parametrize("command, capability", [("axes", "module"), ("train", "train")])
@pytest.mark.parametrize("spec", ["onnxruntime", "torchao:quant=int8wo", "llama.cpp:quant=Q8_0"])
def test_a_kind_that_does_not_offer_it_is_bad_input_naming_the_kinds_that_do(command, capability, spec):
    load_kinds()
    with pytest.raises(InputError) as e:
        offering([spec], command, capability, "what it needs")
    kind = spec.split(":")[0]
    assert f"--subject {spec}" in str(e.value) and f"which {kind} cannot give" in str(e.value)
    assert "kinds that can: transformers" in str(e.value)


def test_the_registry_decides_not_a_name(monkeypatch):
    """A kind registered as offering "train" is taken; the same factory registered without it is not."""
    for table in (KINDS, AXES, OFFERS):
        monkeypatch.setitem(table, "twin", None)
    register("twin", offers=("train",))(transformers_subject)
    assert offering(["twin"], "train", "train", "autograd") == Spec("twin")
    register("twin")(transformers_subject)
    with pytest.raises(InputError, match="which twin cannot give"):
        offering(["twin"], "train", "train", "autograd")


@pytest.mark.parametrize("texts, needle", [
    (["transformers:attn=sdpa"], "train sets attn with its own flags"),
    (["transformers:tp=2"], "train sets tp with its own flags"),
    (["transformers", "transformers"], "one subject at a time"),
    (["nope"], "unknown kind 'nope'"),
])
def test_options_the_command_sets_itself_are_bad_input(texts, needle):
    with pytest.raises(InputError, match=needle):
        offering(texts, "train", "train", "autograd", own=("attn", "tp", "plant"))


@pytest.mark.parametrize("command", ["axes", "train"])
def test_the_cli_refuses_before_anything_is_written(tmp_path, command):
    out = tmp_path / "out"
    assert main([command, "--subject", "onnxruntime", "--out", str(out)]) == 2
    assert not out.exists()


def test_the_default_module_backpropagates_to_every_parameter():
    model = module_of(Spec(DEFAULT), embedded(), "float32", "cpu", {"attn": "eager"}, "train")
    ids = torch.randint(0, model.config.vocab_size, (1, 8))
    model.train()
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
    assert sum(bool(g.any()) for g in grads) == len(grads)


@pytest.mark.parametrize("capability", ["module", "train"])
def test_a_compiled_subject_is_not_judged_through_its_eager_module(capability):
    """compile=1 runs the compiled graph; its module's eager forward and backward are not that graph.
    Planted: were the subject to stop saying so, module_of would hand the eager module over."""
    with pytest.raises(Cannot, match="torch.compile"):
        module_of(Spec(DEFAULT, {"compile": "1"}), embedded(), "float32", "cpu", {}, capability)


def test_the_plant_without_the_declaration_hands_the_eager_module_over(monkeypatch):
    from harness.subjects.transformers import TransformersLM
    monkeypatch.setattr(TransformersLM, "cannot", lambda self: {})
    model = module_of(Spec(DEFAULT, {"compile": "1"}), embedded(), "float32", "cpu", {}, "train")
    assert isinstance(model, torch.nn.Module)    # what the declaration above keeps from happening
