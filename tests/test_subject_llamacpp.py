"""llama.cpp through llama-cpp-python as a subject (harness/subjects/llamacpp.py), against the oracle.

The tests that run llama.cpp need llama-cpp-python, which builds from its sdist: they run in the
tox env ``llamacpp`` (``tox -e llamacpp``) and are skipped with the install command elsewhere. The
option checks, the not-installed subject and the fault registry's kinds run everywhere.
"""
from __future__ import annotations

import pytest
import torch

from harness.core.errors import InputError
from harness.core.faults import FAULTS, TRANSFORMERS_KINDS, faults_for, get_fault, subject_kinds
from harness.subjects import KINDS, parse_spec
from harness.subjects import llamacpp

NEED = pytest.mark.skipif(bool(llamacpp.missing()), reason="llama-cpp-python is not installed: these run in "
                          "`tox -e llamacpp` (install: docs/subjects.md)")
CLEAN_EXACT = "llama.cpp:quant=F32,kv=f32"


# --- everywhere: no llama-cpp-python needed ----------------------------------------------------------

@pytest.mark.parametrize("spec, said", [
    ("llama.cpp:quant=Q9_9", "quant='Q9_9'"), ("llama.cpp:kv=f8", "kv='f8'"), ("llama.cpp:threads=0", "threads"),
    ("llama.cpp:ctx=4", "unknown option(s) ctx"), ("llama.cpp:flash_attn=yes", "flash_attn"),
    ("llama.cpp:kv=q8_0,flash_attn=0", "needs flash_attn=1"),
])
def test_bad_options_are_exit_2_naming_the_key(spec, said):
    with pytest.raises(InputError, match=None) as e:
        llamacpp.parse_options(parse_spec(spec).options)
    assert said in str(e.value)


def test_options_spell_the_cell():
    o = llamacpp.parse_options(parse_spec("llama.cpp:quant=q4_k_m,kv=Q8_0,threads=2").options)
    assert (o["quant"], o["kv"], o["threads"], o["flash_attn"]) == ("Q4_K_M", "q8_0", 2, True)
    assert llamacpp.parse_options({}) == {"quant": "F32", "kv": "f16", "threads": None, "flash_attn": False,
                                          "plant": None}


def test_not_installed_is_na_with_the_install_command(monkeypatch):
    monkeypatch.setattr(llamacpp, "missing", lambda: f"llama-cpp-python is not installed: {llamacpp.INSTALL}")
    subject = KINDS["llama.cpp"](None, "float32", "cpu", {"quant": "Q8_0"})
    cannot = subject.cannot()
    assert "pip install" in cannot["subject"] and "GGML_NATIVE=OFF" in cannot["subject"]
    assert set(cannot) >= {"subject", "padding", "decode", "hooks", "logits", "planting"}
    assert subject.settings()["quant"] == "Q8_0"
    with pytest.raises(RuntimeError, match="not installed"):
        subject.forward(torch.zeros(1, 4, dtype=torch.long))


def test_llama_cpp_faults_are_their_own_kind():
    mine = faults_for("logits", kind="llama.cpp")
    assert set(mine) == {"gguf-no-permute", "gguf-permute-twice", "kv-f16-for-f32"}
    assert not set(mine) & set(faults_for("logits"))           # never planted into transformers
    assert all(subject_kinds(FAULTS[n]) == TRANSFORMERS_KINDS for n in faults_for("logits"))
    with pytest.raises(InputError, match="edits llama.cpp subjects, not transformers"):
        get_fault("gguf-no-permute", "logits")
    with pytest.raises(InputError, match="edits transformers, torchao, quanto subjects, not llama.cpp"):
        get_fault("no-permute", "logits", kind="llama.cpp")


# --- with llama-cpp-python ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def corpus():
    """The embedded model, its held-out text in 8 windows of 128 (1016 text tokens), the oracle's
    logits and the reference's own float32 error on them."""
    from harness.core.metrics import position_stats
    from harness.subjects import fidelity
    source = fidelity.open_source()
    windows = fidelity.corpus_windows(source, "heldout", 128, 1024)
    truth = fidelity.oracle_logits(source.ckpt, windows.ids)
    ref = position_stats(fidelity.oracle_logits(source.ckpt, windows.ids, dtype="float32"), truth,
                         targets=windows.targets)
    return source, windows, truth, ref


def run(spec, corpus, split=None):
    from harness.subjects import fidelity
    source, windows, truth, _ = corpus
    subject = fidelity.build(spec, source)
    try:
        return subject, fidelity.measure(subject, spec, windows, truth, split=split)
    finally:
        subject.close()


def failures(judged):
    return {m: r for m, _, _, status, r in judged if status == "fail"}


@NEED
def test_f32_gguf_holds_the_checkpoint_bit_for_bit(corpus):
    """The converter's q/k layout is Meta's: reading the F32 file back gives every tensor unchanged,
    so the split's oracle on dequantised weights runs what the file holds."""
    from harness.subjects import fidelity
    source = corpus[0]
    subject = fidelity.build(CLEAN_EXACT, source)
    try:
        ckpt = subject.dequantised()
    finally:
        subject.close()
    assert ckpt.args == source.ckpt.args
    assert set(ckpt.state) == set(source.ckpt.state)
    for key, w in source.ckpt.state.items():
        assert torch.equal(ckpt.state[key], w.float()), key


@NEED
def test_f32_with_f32_cache_is_judged_like_transformers_and_passes(corpus):
    from harness.subjects import fidelity
    subject, f = run(CLEAN_EXACT, corpus)
    assert subject.exact and f.split == {}
    judged = fidelity.judge_exact(f.stats, corpus[3])
    assert not failures(judged), failures(judged)
    prov = f.provenance
    assert prov["kv_cache"] == {"type_k": "f32", "type_v": "f32"} and prov["tensor_types"] == {"F32": 39}
    assert "AVX2 = 1" in prov["system_info"] and prov["fallbacks"] == 0


@NEED
def test_decode_through_llama_cpp_cache_is_judged_like_the_full_forward(corpus):
    """Prefill 16, then one token per eval: judged against the oracle's full forward by the same rule,
    the reference decoding through its own cache giving the float32 error to beat."""
    from harness.core.metrics import position_stats
    from harness.core.subjects import ReferenceSubject, reference_decode
    from harness.subjects import fidelity
    source, windows, truth, _ = corpus
    ids, prefill = windows.ids[:2, :48], 16
    subject = fidelity.build(CLEAN_EXACT, source)
    try:
        decoded = subject.decode(ids, prefill)
        whole = subject.forward(ids)
    finally:
        subject.close()
    reference = ReferenceSubject(source.ckpt, "float32", "cpu")
    with torch.inference_mode():
        ref = reference_decode(reference.model, ids, prefill)
    t = truth[:2, :48]
    judged = fidelity.judge_exact(position_stats(decoded, t), position_stats(ref, t))
    judged = [j for j in judged if j[0] not in ("rms_dp", "lp_at_t_absdiff_mean")] or judged
    assert not failures(judged), failures(judged)
    assert (decoded - whole).abs().max() < 1e-3          # the cache path is the same model


@NEED
def test_rows_do_not_see_each_other_through_the_cache(corpus):
    from harness.subjects import fidelity
    source, windows, _, _ = corpus
    subject = fidelity.build(CLEAN_EXACT, source)
    try:
        both = subject.forward(windows.ids[:2, :32])
        alone = subject.forward(windows.ids[1:2, :32])
        with pytest.raises(RuntimeError, match="padded batch"):
            subject.forward(windows.ids[:1, :8], mask=torch.tensor([[0] * 2 + [1] * 6]))
    finally:
        subject.close()
    assert torch.equal(both[1], alone[0])


@NEED
@pytest.mark.parametrize("spec", ["llama.cpp:quant=F32,kv=f16", "llama.cpp:quant=F16,kv=f32",
                                  "llama.cpp:quant=Q8_0,kv=f16", "llama.cpp:quant=Q4_0,kv=f16"])
def test_lossy_subjects_stay_within_their_budgets_with_the_split(corpus, spec):
    from harness.subjects import fidelity
    subject, f = run(spec, corpus)
    budget = fidelity.budget_for("llama.cpp", f.settings, fidelity.load_budgets()[1])
    assert budget is not None, f"no budget in suites/subjects_tolerance.toml for {spec}"
    assert not failures(fidelity.judge_lossy(f, budget)), failures(fidelity.judge_lossy(f, budget))
    # the split: a KV cache in f16 changes no weight; a quantised file moves the weights part
    if f.settings["quant"] == "F32":
        assert f.split["weights_kl_mean"] == 0.0 and f.split["runtime_kl_mean"] > 0
    else:
        assert f.split["weights_kl_mean"] > 0 and f.split["runtime_kl_mean"] > 0


@NEED
def test_k_quants_on_rows_of_128_fall_back_and_say_so(corpus):
    """The embedded model's rows are 128 wide: a 256-block K-quant fits none of its matrices, and
    llama.cpp's fallbacks are recorded in the provenance (K-quants are real on slice-7b only)."""
    from harness.subjects import fidelity
    subject = fidelity.build("llama.cpp:quant=Q4_K_M", corpus[0])
    try:
        prov = subject.provenance()
    finally:
        subject.close()
    assert prov["fallbacks"] > 0 and all(t["ncols"] % 256 for t in prov["fallback_tensors"])
    assert "Q4_K" not in prov["tensor_types"]


@NEED
@pytest.mark.parametrize("fault", ["gguf-no-permute", "gguf-permute-twice", "kv-f16-for-f32"])
def test_planted_llama_cpp_bug_fails_the_exact_rule(corpus, fault):
    """F32 with an f32 cache passes (above); each planted bug in the same cell must fail."""
    from harness.subjects import fidelity
    subject, f = run(f"{CLEAN_EXACT},plant={fault}", corpus, split=fault.startswith("gguf-"))
    assert subject.settings()["kv"] == "f32"              # the subject still says what was asked
    assert failures(fidelity.judge_exact(f.stats, corpus[3])), f"--plant {fault} passed the exact rule"
    if fault.startswith("gguf-"):
        # a converter bug is in the file: the split puts it in the weights, not the runtime
        assert f.split["weights_kl_mean"] > 100 * f.split["runtime_kl_mean"]


@NEED
def test_planted_converter_bug_fails_a_lossy_budget_too(corpus):
    from harness.subjects import fidelity
    _, f = run("llama.cpp:quant=Q8_0,kv=f16,plant=gguf-no-permute", corpus, split=False)
    budget = fidelity.budget_for("llama.cpp", f.settings, fidelity.load_budgets()[1])
    assert "kl_mean" in failures(fidelity.judge_lossy(f, budget))
