"""Checkpoint formats: shard merge, HF layout, round trips, and strict errors naming file and key."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from harness.cli import main
from reference_model import checkpoint
from reference_model.convert import permute, unpermute
from reference_model.errors import CheckpointError

PRESETS = ("tiny-mha", "tiny-gqa", "tiny-ffnmult")


def test_permute_matches_rotate_half_layout():
    # For one head of size 8, Meta rows (0,1),(2,3),(4,5),(6,7) are interleaved pairs;
    # transformers pairs row j with row j + 4. permute must put Meta row 2j at j and 2j+1 at j+4.
    w = torch.arange(8.0)[:, None]
    assert permute(w, 1).flatten().tolist() == [0, 2, 4, 6, 1, 3, 5, 7]
    w = torch.randn(4 * 16, 32)
    assert torch.equal(unpermute(permute(w, 4), 4), w)


@pytest.mark.parametrize("preset", PRESETS)
def test_two_shards_merge_to_the_single_shard_checkpoint(models, preset):
    one = checkpoint.load(models[f"{preset}/meta"])
    two = checkpoint.load(models[f"{preset}/meta2"])
    assert two.n_shards == 2 and one.args == two.args
    assert one.state.keys() == two.state.keys()
    for key in one.state:
        assert torch.equal(one.state[key], two.state[key]), key


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("shards", [1, 2])
def test_round_trip_meta_hf_meta_is_bit_exact(models, tmp_path, preset, shards):
    src = models[f"{preset}/meta" if shards == 1 else f"{preset}/meta2"]
    assert main(["convert", "--model", str(src), "--to", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert main(["convert", "--model", str(tmp_path / "hf"), "--to", "meta", "--shards", str(shards),
                 "--out", str(tmp_path / "meta")]) == 0
    for f in sorted(src.glob("consolidated.*.pth")):
        a = torch.load(f, weights_only=True)
        b = torch.load(tmp_path / "meta" / f.name, weights_only=True)
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), (f.name, key)
    assert json.loads((src / "params.json").read_text()) == json.loads((tmp_path / "meta" / "params.json").read_text())


@pytest.mark.parametrize("preset", PRESETS)
def test_sharded_hf_index_loads_the_same_weights(models, preset):
    single = checkpoint.load(models[f"{preset}/hf"])
    sharded = checkpoint.load(models[f"{preset}/hf-sharded"])
    assert sharded.n_shards > 1
    for key in single.state:
        assert torch.equal(single.state[key], sharded.state[key])


def test_hf_config_is_read_by_transformers_as_the_same_model(models):
    from transformers import LlamaConfig
    ckpt = checkpoint.load(models["tiny-ffnmult/hf"])
    config = LlamaConfig.from_pretrained(models["tiny-ffnmult/hf"])
    assert config.intermediate_size == ckpt.args.ffn_hidden == 336
    assert config.num_key_value_heads == 3 and config.rms_norm_eps == 1e-5


# --- bad input: exit 2, message names the file and key ------------------------------------------

def _copy(models, name, tmp_path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(models[name], dst)
    return dst


def _run_bad(path, capsys) -> str:
    code = main(["logits", "--model", str(path), "--dtypes", "float32", "--attn", "eager", "--tp", "1",
                 "--shapes", "1x4", "--no-progress", "--out", str(path.parent / "out")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert not (path.parent / "out" / "summary.json").exists()   # nothing half-written
    return err


def test_missing_shard(models, tmp_path, capsys):
    path = _copy(models, "tiny-gqa/meta2", tmp_path)
    (path / "consolidated.00.pth").unlink()
    assert "consolidated.00.pth" in _run_bad(path, capsys)


def test_wrong_shape_names_the_key(models, tmp_path, capsys):
    path = _copy(models, "tiny-gqa/meta", tmp_path)
    state = torch.load(path / "consolidated.00.pth", weights_only=True)
    state["layers.1.feed_forward.w2.weight"] = state["layers.1.feed_forward.w2.weight"][:, :-1].clone()
    torch.save(state, path / "consolidated.00.pth")
    err = _run_bad(path, capsys)
    assert "layers.1.feed_forward.w2.weight" in err and "consolidated.00.pth" in err


def test_shards_that_disagree_on_shape(models, tmp_path, capsys):
    path = _copy(models, "tiny-gqa/meta2", tmp_path)
    state = torch.load(path / "consolidated.01.pth", weights_only=True)
    state["layers.0.attention.wo.weight"] = torch.zeros(3, 3)
    torch.save(state, path / "consolidated.01.pth")
    err = _run_bad(path, capsys)
    assert "layers.0.attention.wo.weight" in err and "consolidated.01.pth" in err


def test_unknown_key(models, tmp_path, capsys):
    path = _copy(models, "tiny-mha/meta", tmp_path)
    state = torch.load(path / "consolidated.00.pth", weights_only=True)
    state["layers.0.attention.bias"] = torch.zeros(4)
    torch.save(state, path / "consolidated.00.pth")
    assert "layers.0.attention.bias" in _run_bad(path, capsys)


def test_unknown_hf_key(models, tmp_path, capsys):
    from safetensors.torch import load_file, save_file
    path = _copy(models, "tiny-mha/hf", tmp_path)
    state = load_file(path / "model.safetensors")
    state["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    save_file(state, path / "model.safetensors")
    assert "model.layers.0.self_attn.q_proj.bias" in _run_bad(path, capsys)


def test_missing_hf_tensor_named_in_hf_terms(models, tmp_path, capsys):
    from safetensors.torch import load_file, save_file
    path = _copy(models, "tiny-mha/hf", tmp_path)
    state = load_file(path / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, path / "model.safetensors")
    assert "model.layers.1.mlp.up_proj.weight" in _run_bad(path, capsys)


def test_unreadable_params_json(models, tmp_path, capsys):
    path = _copy(models, "tiny-mha/meta", tmp_path)
    (path / "params.json").write_text("{dim: 64,")
    err = _run_bad(path, capsys)
    assert "params.json" in err and "not valid JSON" in err


def test_params_json_missing_field(models, tmp_path, capsys):
    path = _copy(models, "tiny-mha/meta", tmp_path)
    params = json.loads((path / "params.json").read_text())
    del params["n_heads"]
    (path / "params.json").write_text(json.dumps(params))
    err = _run_bad(path, capsys)
    assert "params.json" in err and "n_heads" in err


def test_heads_not_dividing_dim(models, tmp_path, capsys):
    path = _copy(models, "tiny-mha/meta", tmp_path)
    params = json.loads((path / "params.json").read_text())
    params["n_heads"] = 5
    (path / "params.json").write_text(json.dumps(params))
    assert "n_heads" in _run_bad(path, capsys)


class _Boom:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickled_callable_is_refused_not_run(models, tmp_path, capsys):
    path = _copy(models, "tiny-mha/meta", tmp_path)
    state = torch.load(path / "consolidated.00.pth", weights_only=True)
    state["evil"] = _Boom()
    torch.save(state, path / "consolidated.00.pth")
    err = _run_bad(path, capsys)
    assert "consolidated.00.pth" in err and "refused" in err
    assert "this must never run" not in capsys.readouterr().out


def test_truncated_pth(models, tmp_path, capsys):
    path = _copy(models, "tiny-mha/meta", tmp_path)
    data = (path / "consolidated.00.pth").read_bytes()
    (path / "consolidated.00.pth").write_bytes(data[: len(data) // 2])
    assert "consolidated.00.pth" in _run_bad(path, capsys)


def test_truncated_safetensors(models, tmp_path, capsys):
    path = _copy(models, "tiny-mha/hf", tmp_path)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 3])
    assert "model.safetensors" in _run_bad(path, capsys)


def test_errors_are_checkpoint_errors_not_crashes(tmp_path):
    with pytest.raises(CheckpointError, match="neither params.json"):
        checkpoint.load(tmp_path)


def test_convert_to_hf_writes_the_folder_a_llama2_user_downloads(tmp_path):
    """The embedded model converted to HF: weights, config, generation config and the tokenizer files
    of a published Llama-2-7b-hf, so that AutoTokenizer loads it (on every tested release: no
    tokenizer.json, which 4.31-4.40 cannot read when a newer tokenizers wrote it) and encodes as
    sentencepiece does; converted back to Meta, tokenizer.model stays beside the weights."""
    from transformers import AutoTokenizer
    import sentencepiece as spm
    from harness.core.presets import default_model
    hf, meta = tmp_path / "hf", tmp_path / "meta"
    assert main(["convert", "--model", str(default_model()), "--to", "hf", "--out", str(hf)]) == 0
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.model", "tokenizer_config.json",
            "special_tokens_map.json"} <= {p.name for p in hf.iterdir()}
    assert not (hf / "tokenizer.json").exists()
    gen = json.loads((hf / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (1, 2)
    tok = AutoTokenizer.from_pretrained(str(hf))
    sp = spm.SentencePieceProcessor(model_file=str(hf / "tokenizer.model"))
    for text in ("Hello world", "The cat sat on the mat.\nIt purred."):
        assert tok(text).input_ids == [1] + sp.encode(text), text
    assert (tok.bos_token, tok.eos_token, tok.unk_token) == ("<s>", "</s>", "<unk>")
    assert main(["convert", "--model", str(hf), "--to", "meta", "--out", str(meta)]) == 0
    assert (meta / "tokenizer.model").read_bytes() == (hf / "tokenizer.model").read_bytes()


def test_convert_refuses_a_tokenizer_of_another_vocabulary(models, tmp_path, capsys):
    """A 512-entry model with the 32000-piece Llama 2 tokenizer: exit 2 naming --tokenizer, nothing written;
    without --tokenizer it converts and says that no tokenizer was shipped."""
    from harness.core.real_tokenizer import ensure_tokenizer_model
    out = tmp_path / "hf"
    code = main(["convert", "--model", str(models["tiny-gqa/meta"]), "--to", "hf", "--tokenizer",
                 str(ensure_tokenizer_model()), "--out", str(out)])
    assert code == 2 and "--tokenizer" in capsys.readouterr().err and not any(out.glob("*"))
    assert main(["convert", "--model", str(models["tiny-gqa/meta"]), "--to", "hf", "--out", str(out)]) == 0
    assert "no tokenizer" in capsys.readouterr().out and not (out / "tokenizer_config.json").exists()
