"""`llama-parity axes`: cast paths with long positions, and output flags."""
from __future__ import annotations

import json

import pytest

from harness.suites.axes import buckets
from harness.cli import main
from harness.core.faults import FAULTS
from harness.core.presets import write_preset
from harness.core.compat import attn_implementations, transformers_version


@pytest.fixture(scope="module")
def long_model(tmp_path_factory):
    """head_dim 128, max_position_embeddings 2048: where RoPE rounding grows with position."""
    return write_preset("long-hd128", tmp_path_factory.mktemp("long") / "hf", fmt="hf")


def axes(tmp_path, model, *args):
    code = main(["axes", "--model", str(model), "--out", str(tmp_path), *args])
    return code, {p.parent.name: json.loads(p.read_text()) for p in tmp_path.glob("*/summary.json")}


def failing(summary):
    return [c for c in summary["cells"] if c["status"] == "fail"]


def test_buckets_cover_the_sequence_and_split_at_max_position_embeddings():
    spans = buckets(3072, [16, 128, 512, 1024, 2048], max_pos=2000)
    assert spans[0][0] == 0 and spans[-1][1] == 3072
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert (2000, 2048, "beyond max_position_embeddings") in spans
    assert all(region == "within" for a, _, region in spans if a < 2000)
    assert buckets(10, [16, 128], max_pos=2048) == [(0, 10, "within")]


def test_cast_to_diverges_with_position_and_is_a_known_deviation(long_model, tmp_path):
    """model.to(float16) lowers RoPE's inv_freq: the late buckets fail, the early ones and the
    load path pass. Gated with --strict; otherwise reported as the known deviation."""
    args = ("--suite", "cast", "--dtypes", "float16", "--casts", "load,to", "--attn", "eager", "--lengths", "1280")
    code, out = axes(tmp_path / "strict", long_model, *args, "--strict")
    buffers = {c["case"]["cast"]: c["extra"]["rope_buffers"] for c in out["cast"]["cells"]
               if c["subject"] == "transformers" and c.get("extra")}
    assert "inv_freq=float16" in buffers["to"] and "inv_freq=float32" in buffers["load"]
    if FAULTS["rope-low-precision"]().not_applicable():
        # 4.31-4.37 use a cos/sin cache built at load in the activation dtype on both paths
        assert code == 0 and "cos_cached=float16" in buffers["load"]
        return
    assert code == 1
    bad = failing(out["cast"])
    assert bad and {c["case"]["cast"] for c in bad} == {"to"}
    assert min(int(c["case"]["positions"].split("-")[0]) for c in bad) >= 128   # grows with position

    code, out = axes(tmp_path / "default", long_model, *args)
    assert code == 0
    # info rows are the known deviation's and the near-tie rates (top1_disagree, topk_miss: shown, not gated)
    known = [c for c in out["cast"]["cells"] if c["status"] == "info" and "known deviation" in c["reason"]]
    assert known and {c["case"]["cast"] for c in known} == {"to"}
    assert all("known deviation cast-to-casts-rope-frequencies" in c["reason"] for c in known)
    rates = [c for c in out["cast"]["cells"] if c["status"] == "info" and c not in known]
    assert rates and {c["metric"] for c in rates} <= {"top1_disagree", "topk_miss"}


def test_known_cast_deviation_does_not_hide_a_second_cause(long_model, tmp_path):
    """The inv_freq deviation explains a `.to` bucket only when the same model with its rotary buffers
    put back at float32 passes (rope_restored): a RoPE bug of the port's own under the cast (planted
    rope-base: a wrong theta, which the float32 buffers carry too) fails the default run, with the
    counterfactual named in the reason. (rope-low-precision is the deviation itself on this path:
    it lowers inv_freq to the weights' dtype, float32 before the cast.)"""
    why = FAULTS["rope-low-precision"]().not_applicable() or FAULTS["rope-base"]().not_applicable()
    if why:   # the cast deviation itself is out of range there
        pytest.skip(why)
    args = ("--suite", "cast", "--dtypes", "float16", "--casts", "to", "--attn", "eager", "--lengths", "1280")
    code, out = axes(tmp_path / "clean", long_model, *args)
    assert code == 0
    restored = {c["extra"].get("rope_restored") for c in out["cast"]["cells"]
                if c["subject"] == "transformers" and c.get("extra")}
    assert restored == {"passes"}
    code, out = axes(tmp_path / "planted", long_model, *args, "--plant", "rope-base")
    assert code == 1
    bad = failing(out["cast"])
    assert bad and all(c["extra"]["rope_restored"] == "fails" for c in bad)
    assert all("evidence rope_restored='fails'" in c["reason"] for c in bad)


def test_autocast_path_passes(long_model, tmp_path):
    code, out = axes(tmp_path, long_model, "--suite", "cast", "--dtypes", "bfloat16", "--casts", "autocast",
                     "--attn", "eager", "--lengths", "600", "--strict")
    assert code == 0 and not failing(out["cast"])
    assert any(c["case"]["cast"] == "autocast" and c["status"] == "pass" for c in out["cast"]["cells"])


@pytest.mark.parametrize("plant", ["rope-low-precision", "rope-base"])
def test_rope_faults_hidden_on_short_inputs_show_at_long_positions(long_model, tmp_path, plant):
    """Both are invisible at float16 on 16 tokens and plain by 1280 (the `logits` suite cannot
    see them below float32 on its short shapes)."""
    why = FAULTS[plant]().not_applicable()
    if why:
        pytest.skip(why)
    common = ("--suite", "cast", "--dtypes", "float16", "--casts", "load", "--attn", "eager", "--plant", plant)
    code, _ = axes(tmp_path / "short", long_model, *common, "--lengths", "16")
    assert code == 0
    code, out = axes(tmp_path / "long", long_model, *common, "--lengths", "1280")
    assert code == 1
    assert all(c["subject"] == "transformers" for c in failing(out["cast"]))
    assert min(int(c["case"]["positions"].split("-")[0]) for c in failing(out["cast"])) >= 16


def test_flags_suite_passes_and_records_what_each_flag_returns(models, tmp_path):
    code, out = axes(tmp_path, models["tiny-gqa/hf"], "--suite", "flags", "--dtypes", "float32,bfloat16")
    assert code == 0
    cells = out["flags"]["cells"]
    probs = [c for c in cells if c["metric"] == "attn_probs_max_abs" and c["subject"] == "transformers"]
    assert probs and all(c["status"] == "pass" for c in probs)
    hidden = [c for c in cells if c["metric"] == "hidden_rel_l2" and c["subject"] == "transformers"]
    assert {c["case"]["layer"] for c in hidden} == {"embedding", "block0", "block1+norm"}
    empty = [c for c in cells if c["metric"] == "attentions_returned"]
    for c in empty:   # 5.x SDPA: an empty tuple, reported as the known deviation
        assert c["case"]["attn"] == "sdpa" and c["status"] == "info" and "sdpa-output-attentions-empty" in c["reason"]
    if transformers_version() >= (5, 0):
        assert empty, "SDPA returned attention weights: the known deviation may be obsolete"


def test_flags_strict_fails_where_sdpa_returns_no_attentions(models, tmp_path):
    why = attn_implementations("cpu")["sdpa"]
    if why:   # every cell would be n/a, which the CLI refuses as 'nothing was measured' (exit 2)
        code = main(["axes", "--model", str(models["tiny-gqa/hf"]), "--out", str(tmp_path / "o"), "--suite", "flags",
                     "--dtypes", "float32", "--attn", "sdpa", "--flags", "attentions"])
        assert code == 2
        return
    code, out = axes(tmp_path, models["tiny-gqa/hf"], "--suite", "flags", "--dtypes", "float32",
                     "--attn", "sdpa", "--flags", "attentions", "--strict")
    returned = [c for c in out["flags"]["cells"] if c["metric"] == "attentions_returned"]
    assert code == (1 if returned else 0)
    assert all(c["status"] == "fail" for c in returned)


def test_flags_catch_a_planted_attention_bug(models, tmp_path):
    code, out = axes(tmp_path, models["tiny-gqa/hf"], "--suite", "flags", "--dtypes", "float32",
                     "--attn", "eager", "--plant", "attn-scale")
    assert code == 1
    bad = {(c["case"]["flags"], c["metric"]) for c in failing(out["flags"])}
    assert ("attentions", "attn_probs_max_abs") in bad and ("hidden_states", "hidden_rel_l2") in bad


@pytest.mark.parametrize("args, needle", [
    (["--lengths", "0"], "--lengths"),
    (["--casts", "bake"], "--casts"),
    (["--flags", "loud"], "--flags"),
    (["--suite", "everything"], "--suite"),
    (["--plant", "nope"], "--plant"),
])
def test_bad_arguments_exit_2_and_write_nothing(models, tmp_path, capsys, args, needle):
    code = main(["axes", "--model", str(models["tiny-gqa/hf"]), "--out", str(tmp_path / "o"), *args])
    assert code == 2 and needle in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_bad_spec_file_is_named(models, tmp_path, capsys):
    spec = tmp_path / "axes.toml"
    spec.write_text('version = "x"\n[defaults]\nposition_edges = [0, "a"]\n')
    code = main(["axes", "--model", str(models["tiny-gqa/hf"]), "--out", str(tmp_path / "o"), "--spec", str(spec)])
    assert code == 2 and str(spec) in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_fault_this_release_cannot_plant_is_bad_input(models, tmp_path, capsys):
    """e.g. rope-base on 4.31 (no rope_theta): exit 2 with the reason, never a silent no-op plant."""
    unplantable = {n: f().not_applicable() for n, f in FAULTS.items() if "logits" in f.suites and f().not_applicable()}
    if not unplantable:
        pytest.skip("every fault can be planted in this transformers release")
    for name, why in unplantable.items():
        code = main(["logits", "--model", str(models["tiny-gqa/hf"]), "--out", str(tmp_path / name), "--plant", name])
        assert code == 2 and why in capsys.readouterr().err
        assert not (tmp_path / name).exists()
