"""Fuzzing the checkpoint readers: malformed params.json / config.json / index JSON, mutated .pth
and safetensors bytes, hand-built safetensors headers. A reader may accept its input or raise the
harness's own errors (which name the file); nothing else may escape."""
from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from harness.core.errors import InputError
from reference_model import checkpoint
from reference_model.errors import CheckpointError
from reference_model.model import ModelArgs

OURS = (CheckpointError, InputError)
FUZZ = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "60")), deadline=None, suppress_health_check=[HealthCheck.too_slow])

MICRO = ModelArgs(dim=8, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=16, multiple_of=4)


@pytest.fixture(scope="module")
def micro(tmp_path_factory) -> dict[str, Path]:
    """A valid micro checkpoint in every layout (a few KB each, so mutations stay cheap)."""
    from harness.core.presets import random_state
    root = tmp_path_factory.mktemp("micro")
    state = random_state(MICRO, 0)
    return {"meta": checkpoint.save_meta(root / "meta", MICRO, state),
            "meta2": checkpoint.save_meta(root / "meta2", MICRO, state, n_shards=2),
            "hf": checkpoint.save_hf(root / "hf", MICRO, state),
            "hf-sharded": checkpoint.save_hf(root / "hf-sharded", MICRO, state, max_shard_tensors=4)}


def _load_or_our_error(path: Path):
    try:
        return checkpoint.load(path)
    except OURS as e:
        assert str(path) in str(e) or str(e).startswith(str(path.parent)), e   # names where it was
        return None


def _scratch(src: Path) -> tuple[tempfile.TemporaryDirectory, Path]:
    tmp = tempfile.TemporaryDirectory(prefix="fuzz-")
    dst = Path(tmp.name) / src.name
    shutil.copytree(src, dst)
    return tmp, dst


def test_the_micro_checkpoints_are_valid(micro):
    for path in micro.values():
        assert checkpoint.load(path).args.dim == 8    # so the mutations below start from good input


# --- JSON files --------------------------------------------------------------------------------

JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                      st.text(max_size=8))
JSON_VALUE = st.recursive(JSON_LEAF, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                             st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                          max_leaves=6)
META_KEYS = ["dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
             "norm_eps", "rope_theta", "max_seq_len", "max_batch_size", "bogus"]
HF_KEYS = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
           "vocab_size", "rms_norm_eps", "rope_theta", "rope_parameters", "rope_scaling", "tie_word_embeddings",
           "max_position_embeddings", "llama_parity_meta_params"]


def _edits(keys):
    """A dict of edits: a key set to any JSON value, or deleted ("<delete>")."""
    return st.dictionaries(st.sampled_from(keys), st.one_of(JSON_VALUE, st.just("<delete>")), max_size=4)


@FUZZ
@given(data=st.binary(max_size=200))
def test_params_json_arbitrary_bytes(micro, data):
    tmp, path = _scratch(micro["meta"])
    with tmp:
        (path / "params.json").write_bytes(data)
        _load_or_our_error(path)


@FUZZ
@given(edits=_edits(META_KEYS))
# inputs that once escaped as TypeError / ZeroDivisionError / OverflowError
@example(edits={"dim": "8"})
@example(edits={"multiple_of": 0})
@example(edits={"ffn_dim_multiplier": 1e308})
@example(edits={"dim": 2**70})
@example(edits={"rope_theta": -1.0})
def test_params_json_fields_of_any_type(micro, edits):
    tmp, path = _scratch(micro["meta"])
    with tmp:
        params = json.loads((path / "params.json").read_text())
        for k, v in edits.items():
            params.pop(k, None) if v == "<delete>" else params.__setitem__(k, v)
        (path / "params.json").write_text(json.dumps(params))
        _load_or_our_error(path)


@FUZZ
@given(edits=_edits(HF_KEYS), data=st.binary(max_size=100), raw=st.booleans())
@example(edits={"rope_parameters": [1]}, data=b"", raw=False)
@example(edits={"hidden_size": "8"}, data=b"", raw=False)
@example(edits={"llama_parity_meta_params": {"dim": 8, "bogus": 1}}, data=b"", raw=False)
@example(edits={"llama_parity_meta_params": {"dim": 8, "multiple_of": 0}}, data=b"", raw=False)
def test_config_json_fields_of_any_type(micro, edits, data, raw):
    tmp, path = _scratch(micro["hf"])
    with tmp:
        if raw:
            (path / "config.json").write_bytes(data)
        else:
            config = json.loads((path / "config.json").read_text())
            for k, v in edits.items():
                config.pop(k, None) if v == "<delete>" else config.__setitem__(k, v)
            (path / "config.json").write_text(json.dumps(config))
        _load_or_our_error(path)


@FUZZ
@given(weight_map=st.one_of(JSON_VALUE, st.dictionaries(st.text(max_size=40), JSON_VALUE, max_size=4)),
       keep=st.booleans())
@example(weight_map={"model.norm.weight": 3}, keep=True)
@example(weight_map={"model.norm.weight": "../hf/model.safetensors"}, keep=True)
def test_safetensors_index_of_any_shape(micro, weight_map, keep):
    tmp, path = _scratch(micro["hf-sharded"])
    with tmp:
        index_path = path / "model.safetensors.index.json"
        index = json.loads(index_path.read_text())
        if keep and isinstance(weight_map, dict):
            index["weight_map"].update(weight_map)
        else:
            index["weight_map"] = weight_map
        index_path.write_text(json.dumps(index))
        _load_or_our_error(path)


# --- binary files ------------------------------------------------------------------------------

MUTATION = st.tuples(
    st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), max_size=8),   # byte writes
    st.one_of(st.none(), st.floats(0, 1)),                                                     # truncate at
)


def _mutate(data: bytes, mutation) -> bytes:
    writes, cut = mutation
    out = bytearray(data)
    for where, byte in writes:
        out[int(where * len(out))] = byte
    if cut is not None:
        out = out[: int(cut * len(out))]
    return bytes(out)


@FUZZ
@given(mutation=MUTATION, which=st.sampled_from(["meta", "meta2"]))
def test_mutated_pth(micro, mutation, which):
    tmp, path = _scratch(micro[which])
    with tmp:
        f = path / "consolidated.00.pth"
        f.write_bytes(_mutate(f.read_bytes(), mutation))
        _load_or_our_error(path)


@FUZZ
@given(mutation=MUTATION)
def test_mutated_hf_bin(micro, mutation):
    tmp, path = _scratch(micro["hf"])
    with tmp:
        from safetensors.torch import load_file
        state = load_file(path / "model.safetensors")
        (path / "model.safetensors").unlink()
        torch.save(state, path / "pytorch_model.bin")
        f = path / "pytorch_model.bin"
        f.write_bytes(_mutate(f.read_bytes(), mutation))
        _load_or_our_error(path)


@FUZZ
@given(mutation=MUTATION, which=st.sampled_from(["hf", "hf-sharded"]))
def test_mutated_safetensors(micro, mutation, which):
    tmp, path = _scratch(micro[which])
    with tmp:
        f = sorted(path.glob("*.safetensors"))[0]
        f.write_bytes(_mutate(f.read_bytes(), mutation))
        _load_or_our_error(path)


TENSOR_HEADER = st.fixed_dictionaries({
    "dtype": st.sampled_from(["F32", "F16", "BF16", "F64", "I64", "U8", "BOOL", "F8_E4M3", "XX", ""]),
    "shape": st.lists(st.integers(-2, 2**40), max_size=3),
    "data_offsets": st.lists(st.integers(-2, 2**40), min_size=0, max_size=3),
})


@FUZZ
@given(tensors=st.dictionaries(st.sampled_from(["model.norm.weight", "lm_head.weight", "x", ""]),
                               st.one_of(TENSOR_HEADER, JSON_VALUE), max_size=3),
       body=st.binary(max_size=64), claimed=st.one_of(st.none(), st.integers(0, 2**64 - 1)))
def test_hand_built_safetensors_header(micro, tensors, body, claimed):
    """Headers that lie: wrong dtypes, shapes past the data, offsets out of order, absurd lengths."""
    tmp, path = _scratch(micro["hf"])
    with tmp:
        header = json.dumps(tensors).encode()
        n = len(header) if claimed is None else claimed
        (path / "model.safetensors").write_bytes(struct.pack("<Q", n) + header + body)
        _load_or_our_error(path)
