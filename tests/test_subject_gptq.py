"""GPTQ (GPT-QModel quantising, transformers loading) against the float64 oracle.

Everywhere: the harness's own reader of the GPTQ format (packing, the v1 zero point, act-order's
g_idx) against values written out by hand, the planted bug's edit, options and a missing venv. Where
the gptq venv exists (tox -e gptq): each width within its budget with the split, the runtime's share
at float32 rounding (the kernels compute the file's weights as the harness reads them), the planted
bug caught in the weights' share, decode through transformers' cache, and the logits suite's rows."""
from __future__ import annotations

import json

import pytest
import torch

from harness.core.errors import InputError
from harness.subjects import KINDS, Source, load_kinds
from harness.subjects.fidelity import budget, over_budget
from harness.subjects.subprocess import VENVS, SubjectCannot
from subjects_common import embedded, lossy_failures, lossy_run, split

load_kinds("gptq")
from harness.subjects.gptq import dequantise, pack, read_folder, unpack  # noqa: E402


def venv_ready() -> bool:
    return VENVS["gptq"].installed(embedded().cache) is not None


GPTQ = pytest.mark.skipif(not venv_ready(), reason=f"the gptq venv is not installed: {VENVS['gptq'].setup_command()}")


def make(options: dict):
    return KINDS["gptq"](embedded(), "float32", "cpu", dict(options))


# --- the format, by hand -------------------------------------------------------------------------

def hand_packed(values: list[list[int]], bits: int) -> list[list[int]]:
    """Rows of ``32 // bits`` values packed down the first dimension into int32 words, lowest bits
    first, written out one value at a time (the layout of GPTQ's qweight)."""
    per = 32 // bits
    words = []
    for r in range(0, len(values), per):
        row = []
        for c in range(len(values[0])):
            w = sum(values[r + k][c] << (bits * k) for k in range(per))
            row.append(w - (1 << 32) if w >= 1 << 31 else w)
        words.append(row)
    return words


@pytest.mark.parametrize("bits", [4, 8])
def test_unpack_reads_the_words_as_packed_by_hand(bits):
    g = torch.Generator().manual_seed(bits)
    values = torch.randint(0, 1 << bits, (2 * 32 // bits, 5), generator=g)
    words = torch.tensor(hand_packed(values.tolist(), bits), dtype=torch.int32)
    assert (words < 0).any()                      # the top value's high bit: a negative int32
    assert torch.equal(unpack(words, bits, 0), values)
    assert torch.equal(pack(values, bits, 0), words)
    assert torch.equal(unpack(words.T.contiguous(), bits, 1), values.T)        # qzeros: along outputs


def test_dequantise_uses_v1_zero_points_and_g_idx():
    """W[o, i] = scale[g_idx[i], o] * (q[i, o] - (stored_zero[g_idx[i], o] + 1)), element by element,
    with act-order's g_idx (inputs visited out of order, groups not contiguous)."""
    bits, n_in, n_out, groups = 4, 16, 8, 2
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (n_in, n_out), generator=g)
    stored = torch.randint(0, 15, (groups, n_out), generator=g)
    scales = torch.rand(groups, n_out, generator=g).half() + 0.01
    g_idx = torch.randperm(n_in, generator=g) % groups
    want = torch.empty(n_out, n_in)
    for o in range(n_out):
        for i in range(n_in):
            k = int(g_idx[i])
            want[o, i] = float(scales[k, o]) * (int(q[i, o]) - (int(stored[k, o]) + 1))
    got = dequantise(pack(q, bits, 0), pack(stored, bits, 1), scales, g_idx.int(), bits)
    assert torch.equal(got, want)


def gptq_folder(path, bits: int = 4):
    """A minimal GPTQ folder: layer 0's down projection quantised, one float tensor beside it."""
    from safetensors.torch import save_file
    p = "model.layers.0.mlp.down_proj"
    g = torch.Generator().manual_seed(1)
    save_file({f"{p}.qweight": pack(torch.randint(0, 16, (16, 8), generator=g), bits, 0),
               f"{p}.qzeros": pack(torch.full((2, 8), 7), bits, 1),
               f"{p}.scales": torch.rand(2, 8, generator=g).half() + 0.01,
               f"{p}.g_idx": (torch.arange(16) // 8).int(),
               "model.norm.weight": torch.ones(4)}, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "quantize_config.json").write_text(json.dumps({"bits": bits, "checkpoint_format": "gptq"}))
    return path


def test_the_planted_bug_moves_one_tensor_one_step_down(tmp_path):
    from harness.core.faults import FAULTS
    before, _ = read_folder(gptq_folder(tmp_path))
    from safetensors.torch import load_file
    scales = load_file(str(tmp_path / "model.safetensors"))["model.layers.0.mlp.down_proj.scales"].float()
    FAULTS["gptq-zeros-v2"]().edit_built(tmp_path)
    after, _ = read_folder(tmp_path)
    w = "model.layers.0.mlp.down_proj.weight"
    step = scales[(torch.arange(16) // 8)].T                  # (out, in): each weight's own scale
    assert torch.allclose(before[w] - after[w], step, rtol=0, atol=1e-6)
    assert torch.equal(before["model.norm.weight"], after["model.norm.weight"])


def test_a_folder_in_another_format_is_refused(tmp_path):
    gptq_folder(tmp_path)
    (tmp_path / "quantize_config.json").write_text(json.dumps({"bits": 4, "checkpoint_format": "gptq_v2"}))
    with pytest.raises(ValueError, match="checkpoint_format 'gptq_v2'"):
        read_folder(tmp_path)


def test_the_calibration_text_holds_none_of_the_held_out_text():
    """GPTQ is fitted on its calibration text: measured on the same text, its error would look smaller."""
    import sentencepiece as spm

    from harness.core import corpus
    from harness.subjects.gptq import calibration
    src = embedded()
    ids = calibration(src, 64)
    assert tuple(ids.shape) == (64, 256) and bool((ids[:, 0] == 1).all())
    sp = spm.SentencePieceProcessor(model_file=str(src.tokenizer))
    seen = " ".join(" ".join(sp.decode(row[1:].tolist()).split()) for row in ids)
    held = [" ".join(p.split()) for p in corpus.text_of("heldout", None)[1].split("\n\n")]
    long = [p for p in held if len(p) > 200]
    assert len(long) > 50
    assert [p[20:120] for p in long if p[20:120] in seen] == []


# --- options and a missing venv ------------------------------------------------------------------

@pytest.fixture
def no_venv(tmp_path):
    s = embedded()
    return Source(s.ckpt, s.fingerprint, s.hf_path, s.tokenizer, tmp_path / "empty-cache")


def test_bad_options_are_exit_2_naming_the_option(no_venv):
    for options, says in [({"bits": "3"}, "bits=3: 4 or 8"), ({"group": "100"}, "group=100: must divide"),
                          ({"group": "0"}, "group=0: a positive integer"), ({"desc_act": "yes"}, "desc_act=yes: 0 or 1"),
                          ({"plant": "bnb-scale-block0"}, "not a fault of gptq"), ({"color": "red"}, "unknown option 'color'")]:
        with pytest.raises(InputError, match=says):
            KINDS["gptq"](no_venv, "float32", "cpu", options)


def test_a_missing_venv_is_na_with_the_command_that_creates_it(no_venv):
    subject = KINDS["gptq"](no_venv, "float32", "cpu", {})
    assert "setup gptq" in subject.cannot()["subject"] and "tox -e gptq" in subject.cannot()["subject"]
    with pytest.raises(SubjectCannot, match="setup gptq"):
        subject.forward(torch.ones(1, 4, dtype=torch.long))


# --- the real thing, where the venv exists -------------------------------------------------------

@GPTQ
@pytest.mark.parametrize("options", [{}, {"bits": "8"}, {"desc_act": "1"}], ids=["4bit", "8bit", "act-order"])
def test_within_budget_with_the_split_and_its_provenance(options):
    with make(options) as subject:
        broken, stats = lossy_failures(subject)
        assert broken == {}, broken
        assert stats["kl_mean"] > 1e-7                    # quantised: not silently the float model
        quant, runtime = split(subject)
        assert over_budget({"weights_kl_mean": quant, "runtime_kl_mean": runtime},
                           budget("gptq", subject.settings())) == {}
        assert runtime < 1e-6 < quant                     # the kernels compute the weights the harness reads
        prov = subject.provenance()
    assert prov["quantize_config"]["bits"] == int(options.get("bits", 4)) and prov["float_linear"] == ["lm_head"]
    assert sum(prov["kernels"].values()) == 7 * embedded().ckpt.args.n_layers
    assert prov["versions"]["gptqmodel"] and prov["versions"]["torch"] >= "2.14"


@GPTQ
def test_the_planted_zero_point_bug_breaks_the_budget_in_the_weights_share():
    with make({"plant": "gptq-zeros-v2"}) as subject:
        broken, _ = lossy_failures(subject)
        quant, runtime = split(subject)
        limit = budget("gptq", subject.settings())
    assert "kl_mean" in broken, broken
    assert quant > limit["weights_kl_mean"] and runtime <= limit["runtime_kl_mean"]


@GPTQ
def test_decode_through_transformers_cache_matches_the_forward():
    ids = torch.tensor([[1] + list(range(100, 139))])
    with make({}) as subject:
        full, stepped = subject.forward(ids), subject.decode(ids, prefill=8)
    assert (full - stepped).abs().max() < 1e-4          # 1.5e-5 measured: float32 reordering


@GPTQ
def test_the_logits_suite_judges_it_by_its_budget_and_fails_the_planted_one(tmp_path):
    planted = "gptq:plant=gptq-zeros-v2"
    code, summary, failed = lossy_run(tmp_path, "gptq", planted)
    assert code == 1
    assert {s for s, _ in failed} == {planted} and (planted, "weights_kl_mean") in failed
    assert not summary["subjects"]["gptq"]["exact"]
