"""bitsandbytes (NF4, FP4, the QLoRA base, LLM.int8()) on the CPU: each within its budget on real
text with the error split, its provenance saying which kernel ran and what was quantised, a planted
absmax bug caught in the weights' share, and no Hub download at import."""
from __future__ import annotations

import subprocess
import sys

import pytest

from harness.core.errors import InputError
from harness.subjects import KINDS, NotInstalledError
from harness.subjects.common import has_module
from harness.subjects.fidelity import budget, over_budget
from subjects_common import embedded, lossy_failures, lossy_run, needs, split

BNB = needs("bitsandbytes", "bitsandbytes")
QLORA = {"quant": "nf4", "double": "1", "compute": "bfloat16"}


def make(options: dict):
    from harness.subjects import bnb  # noqa: F401  (registers the kind)
    return KINDS["bitsandbytes"](embedded(), "float32", "cpu", dict(options))


@BNB
@pytest.mark.parametrize("options", [{}, QLORA, {"quant": "fp4"}, {"quant": "int8"}],
                         ids=["nf4", "qlora-base", "fp4", "int8"])
def test_within_budget_with_split_and_provenance(options):
    subject = make(options)
    broken, stats = lossy_failures(subject)
    assert broken == {}, broken
    assert stats["kl_mean"] > 1e-6      # quantisation is visible: not silently the float model
    prov = subject.provenance()
    q = prov["quantisation"]
    assert q["quantised"] == 7 * embedded().ckpt.args.n_layers and q["kept_float"] == ["lm_head"]
    assert q["quantised_types"] == ["Linear8bitLt" if options.get("quant") == "int8" else "Linear4bit"]
    assert prov["bitsandbytes"] and "hooks" not in subject.cannot()
    quant, runtime = split(subject)
    assert over_budget({"weights_kl_mean": quant, "runtime_kl_mean": runtime}, budget("bitsandbytes", subject.settings())) == {}
    assert quant > runtime if options.get("quant") != "int8" else runtime > quant   # int8 activations
    subject.close()


@BNB
@pytest.mark.parametrize("options", [{}, {"quant": "int8"}], ids=["nf4", "int8"])
def test_a_planted_absmax_bug_breaks_the_budget_in_the_weights_share(options):
    subject = make({**options, "plant": "bnb-scale-block0"})
    broken, _ = lossy_failures(subject)
    assert "kl_mean" in broken and len(broken) >= 2, broken
    quant, _ = split(subject)
    assert quant > budget("bitsandbytes", subject.settings())["weights_kl_mean"]


@BNB
def test_the_split_reads_the_weights_as_quantised_not_as_repacked():
    """After a forward the CPU kernel has repacked the 4-bit weights (on CPUs with AVX512-BF16); the
    split still reads the weights as they were quantised, so a second call gives the same share."""
    subject = make({})
    first, _ = split(subject)
    second, _ = split(subject)
    assert first == pytest.approx(second, rel=1e-9)


@BNB
def test_bad_options_are_exit_2_naming_the_option():
    with pytest.raises(InputError, match="quant='q4'"):
        make({"quant": "q4"})
    with pytest.raises(InputError, match="4-bit options"):
        make({"quant": "int8", "double": "1"})
    with pytest.raises(InputError, match="plant='torchao-scale-row0' is not a fault of bitsandbytes"):
        make({"plant": "torchao-scale-row0"})


@BNB
def test_import_asks_the_hub_for_no_kernel():
    """On a CPU with AVX512-BF16, importing bitsandbytes asks the `kernels` package for a Hub kernel.
    A stand-in `kernels` module records any request: through the harness there is none."""
    code = ("import sys, types; asked = []\n"
            "fake = types.ModuleType('kernels'); fake.get_kernel = lambda *a, **k: asked.append(a) or None\n"
            "sys.modules['kernels'] = fake\n"
            "from harness.subjects.bnb import import_bitsandbytes; import_bitsandbytes()\n"
            "from bitsandbytes.functional import has_avx512bf16\n"
            "print(int(has_avx512bf16()), len(asked), sys.modules['kernels'] is fake)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    avx512bf16, asked, restored = out.stdout.split()
    if avx512bf16 == "0":
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes asks for no Hub kernel here anyway")
    assert (asked, restored) == ("0", "True")


@pytest.mark.skipif(has_module("bitsandbytes"), reason="bitsandbytes is installed")
def test_absent_package_is_not_installed_naming_the_extra():
    with pytest.raises(NotInstalledError, match=r"llama-parity\[bitsandbytes\]"):
        make({})


@BNB
def test_the_logits_suite_judges_each_by_its_budget_and_fails_the_planted_one(tmp_path):
    """Through the CLI: the QLoRA base passes its budget with the split in its rows; the same
    subject with a planted absmax bug fails the run (exit 1) on the corpus, in the weights' share."""
    planted = "bitsandbytes:plant=bnb-scale-block0,quant=nf4"     # the label sorts the options
    code, summary, failed = lossy_run(tmp_path, "bitsandbytes:quant=nf4,double=1,compute=bfloat16", planted)
    assert code == 1
    assert {s for s, _ in failed} == {planted} and (planted, "weights_kl_mean") in failed
    who = summary["subjects"]["bitsandbytes:compute=bfloat16,double=1,quant=nf4"]
    assert not who["exact"] and who["provenance"]["quantisation"]["compute_dtype"] == "bfloat16"
