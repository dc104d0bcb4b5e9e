"""The train suite end to end through the CLI: a correct transformers passes, every planted training
bug fails the gate (exit 1), bad input is exit 2, a rerun resumes. Tiny presets (random ids), float32
and bfloat16 cells: the float16 and embedded-model runs are slow-marked."""
from __future__ import annotations

import json

import pytest

from harness.cli import main
from harness.core.compat import attn_implementations
from harness.core.faults import FAULTS, faults_for

# Short windows keep the CI cost small; the long one stays past 256 positions, where bfloat16 angles round.
BASE = ["--attn", "eager", "--tp", "1", "--ctx", "32", "--long-ctx", "320"]

# The cells each planted bug shows in, the smallest that do (the default run has them all).
PLANT_CELLS = {
    "labels-shifted-twice": ["--dtypes", "float32", "--casts", "load", "--checkpointing", "off", "--inputs", "corpus"],
    "pads-in-labels": ["--dtypes", "float32", "--casts", "load", "--checkpointing", "off", "--inputs", "right"],
    "gc-drops-grad": ["--dtypes", "float32", "--casts", "load", "--checkpointing", "off,reentrant,non-reentrant",
                      "--inputs", "corpus"],
    "rope-bf16-autocast": ["--dtypes", "bfloat16", "--casts", "autocast", "--checkpointing", "off", "--inputs", "long"],
    "ce-no-upcast": ["--dtypes", "bfloat16", "--casts", "load", "--checkpointing", "off", "--inputs", "corpus"],
    "grad-accum-mean": ["--dtypes", "float32", "--casts", "load", "--checkpointing", "off", "--inputs", "right,accum"],
    "lora-scaling": ["--dtypes", "float32", "--casts", "load", "--checkpointing", "off", "--inputs", "corpus,lora"],
    "lora-gc-no-input-grad": ["--dtypes", "float32", "--casts", "load", "--checkpointing", "off,reentrant",
                              "--inputs", "corpus,lora"],
}
# The finding a plant's failing cells must be filed under, where the suite names the mechanism.
PLANT_FINDING = {"lora-gc-no-input-grad": "train/lora-gc-no-input-grad"}


def run(model, out, *extra) -> tuple[int, dict | None]:
    code = main(["train", "--model", str(model), "--out", str(out), *BASE, *extra])
    path = out / "summary.json"
    return code, json.loads(path.read_text()) if path.exists() else None


def failing(summary):
    return [c for c in summary["cells"] if c["status"] == "fail"]


def test_every_training_fault_has_cells():
    assert set(faults_for("train")) == set(PLANT_CELLS)


def test_default_matrix_holds_every_plants_cells():
    """The default run (suites/train.toml) is trimmed for cost; each plant's cells must stay inside it,
    so that every planted bug fails `llama-parity train` with no flags."""
    from harness.core.datafiles import suite_data
    d = suite_data("train")["defaults"]
    flag = {"--dtypes": "dtypes", "--casts": "casts", "--checkpointing": "checkpointing", "--inputs": "inputs",
            "--attn": "attn", "--tp": "tp"}
    for fault, argv in PLANT_CELLS.items():
        given = dict(zip(argv[::2], argv[1::2]))
        given.update(dict(zip(BASE[::2], BASE[1::2])))
        for opt, key in flag.items():
            wanted = given[opt].split(",")
            assert set(wanted) <= {str(v) for v in d[key]}, f"{fault}: {opt} {given[opt]} is outside the default run"


def test_correct_transformers_passes(models, tmp_path):
    code, s = run(models["tiny-gqa/meta"], tmp_path, "--dtypes", "float32,bfloat16",
                  "--checkpointing", "off,reentrant,non-reentrant", "--inputs", "corpus,long,right,left,sft,accum")
    assert code == 0, failing(s)
    cells = [c for c in s["cells"] if c["subject"] == "transformers" and c["status"] in ("pass", "fail")]
    assert {c["case"]["cast"] for c in cells} == {"load", "autocast"}
    assert {c["metric"] for c in cells} >= {"loss_rel_err", "grad_rel_l2", "grad_cos_dist", "grad_rel_l2_max",
                                            "gc_bitwise_diff"}
    # checkpointing recomputes the same arithmetic: bit-equal to the cell without it
    assert all(c["value"] == 0 for c in cells if c["metric"] == "gc_bitwise_diff")
    # the left-pad hazard is measured and reported as a known finding, not gated
    naive = [c for c in s["cells"] if c["case"]["input"] == "left-naive-labels" and c["metric"] == "grad_rel_l2"]
    assert naive and all(c["status"] == "info" and c["value"] > 1e-3 for c in naive)
    assert any("left-pad" in f["id"] or "left-padded" in f["title"] for f in s["findings"])
    # bfloat16 cells measure their forward's peak against the dtype's range (float16's overflow question)
    peaks = [c for c in s["cells"] if c["metric"] == "peak_abs_activation"]
    assert peaks and all(c["status"] == "info" and 0 < c["value"] < c["extra"]["dtype_max"] for c in peaks)
    # the loss equals the cross entropy of its own logits (float32 accumulation) in every cell
    own = [c for c in cells if c["metric"] == "loss_of_logits_rel_err"]
    assert own and all(c["value"] < 1e-5 for c in own)
    # the report's train section names the worst tensor
    assert "worst tensor" in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize("fault", sorted(PLANT_CELLS))
def test_planted_training_bug_fails_the_gate(models, tmp_path, fault):
    why = FAULTS[fault]().not_applicable()
    if why:
        pytest.skip(f"{fault}: {why}")
    model = models["tiny-gqa/meta"]
    code, s = run(model, tmp_path / "planted", *PLANT_CELLS[fault], "--plant", fault)
    assert code == 1, f"{fault} passed the gate"
    bad = [c for c in failing(s) if c["subject"] in ("transformers", "trainer", "peft")]
    assert bad and all(c["subject"] != "reference" for c in failing(s))
    if fault in PLANT_FINDING:
        assert PLANT_FINDING[fault] in {f["id"] for f in s["findings"]}, s["findings"]
        assert all(c["extra"].get("finding") == PLANT_FINDING[fault].split("/")[1] for c in bad), bad
    # the same cells without the plant pass: test_correct_transformers_passes runs every one of them

@pytest.mark.slow
def test_lora_through_peft_against_the_oracle(models, tmp_path):
    pytest.importorskip("peft")
    code, s = run(models["tiny-gqa/meta"], tmp_path, "--dtypes", "float32,bfloat16", "--casts", "load",
                  "--checkpointing", "off,reentrant", "--inputs", "corpus,lora")
    assert code == 0, failing(s)
    peft = [c for c in s["cells"] if c["subject"] == "peft"]
    grads = [c for c in peft if c["metric"] == "grad_rel_l2"]
    # plain, checkpointing enabled before and after wrapping, per dtype: each against the oracle's LoRA
    assert {(c["case"]["dtype"], c["case"]["input"]) for c in grads} == {
        (d, i) for d in ("float32", "bfloat16") for i in ("lora", "lora-gc-before-wrap", "lora-gc-after-wrap")}
    assert all(c["status"] == "pass" for c in grads)
    # B is non-zero, so every A (and B) has a gradient: no adapter tensor is left at 0
    assert all(c["extra"]["zero_grad_count"] == 0 for c in grads if "gc" in c["case"]["input"])
    assert all(c["value"] == 0 for c in peft if c["metric"] == "gc_bitwise_diff")
    merged = [c for c in peft if c["case"]["input"] == "lora-merged" and c["status"] == "pass"]
    assert {c["case"]["dtype"] for c in merged} == {"float32", "bfloat16"}


def test_lora_rows_say_why_without_peft(models, tmp_path, monkeypatch):
    import harness.suites.train.lora as lora
    monkeypatch.setattr(lora, "peft_missing", lambda: "peft is not installed (test)")
    code, s = run(models["tiny-mha/meta"], tmp_path, "--dtypes", "float32", "--casts", "load", "--checkpointing",
                  "off", "--inputs", "corpus,lora")
    assert code == 0
    na = [c for c in s["cells"] if c["subject"] == "peft"]
    assert na and all(c["status"] == "n/a" and "peft is not installed" in c["reason"] for c in na)


def test_sdpa_and_tp_cells(models, tmp_path):
    if attn_implementations("cpu")["sdpa"]:
        pytest.skip(attn_implementations("cpu")["sdpa"])
    code, s = main(["train", "--model", str(models["tiny-gqa/meta"]), "--out", str(tmp_path), "--attn", "sdpa",
                    "--tp", "1,2", "--dtypes", "float32", "--casts", "load", "--checkpointing", "off", "--ctx", "32",
                    "--inputs", "right"]), json.loads((tmp_path / "summary.json").read_text())
    assert code == 0, failing(s)
    tps = {c["case"]["tp"] for c in s["cells"] if c["subject"] == "transformers"}
    assert tps == {1, 2}
    assert all(c["reason"] for c in s["cells"] if c["status"] == "n/a")


def test_resume_reuses_finished_groups(models, tmp_path, capsys):
    args = ["--dtypes", "float32", "--casts", "load", "--checkpointing", "off", "--inputs", "right"]
    code, first = run(models["tiny-mha/meta"], tmp_path, *args)
    assert code == 0
    capsys.readouterr()
    code, second = run(models["tiny-mha/meta"], tmp_path, *args)
    assert code == 0 and "resumed" in capsys.readouterr().err
    assert [c["value"] for c in first["cells"]] == [c["value"] for c in second["cells"]]


@pytest.mark.parametrize("argv,names", [
    (["--dtypes", "float8"], "--dtypes"),
    (["--casts", "amp"], "--casts"),
    (["--checkpointing", "reentrant"], "--checkpointing"),
    (["--inputs", "nothing"], "--inputs"),
    (["--inputs", "lora"], "--inputs"),
    (["--plant", "no-permute"], "--plant"),
    (["--policy", "/nonexistent.toml"], "/nonexistent.toml"),
    (["--strict", "grad-accum-typo"], "--strict"),
])
def test_bad_input_exits_2_naming_it(models, tmp_path, capsys, argv, names):
    code = main(["train", "--model", str(models["tiny-mha/meta"]), "--out", str(tmp_path / "o"), *BASE, *argv])
    assert code == 2
    assert names in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_float16_is_loss_scaled_and_unscaled_underflow_is_shown(models, tmp_path):
    code, s = run(models["tiny-gqa/meta"], tmp_path, "--dtypes", "float16", "--checkpointing", "off",
                  "--inputs", "corpus,right")
    assert code == 0, failing(s)
    scaled = [c for c in s["cells"] if c["metric"] == "grad_rel_l2" and c["case"]["input"] == "corpus"
              and c["subject"] == "transformers"]
    assert scaled and all(c["extra"]["loss_scale"] > 1 for c in scaled)
    under = [c for c in s["cells"] if c["metric"] == "underflow_frac"]
    assert under and all(c["status"] == "info" for c in under)


def test_optimizer_steps_follow_the_oracle(models, tmp_path):
    code, s = run(models["tiny-mha/meta"], tmp_path, "--dtypes", "float32", "--casts", "load", "--checkpointing", "off",
                  "--inputs", "corpus,steps")
    assert code == 0, failing(s)
    drift = [c for c in s["cells"] if c["metric"] == "steps_drift" and c["subject"] == "transformers"]
    assert drift and all(c["status"] == "pass" for c in drift)
    curve = [c for c in s["cells"] if c["metric"] == "steps_loss_rel_err" and c["subject"] == "transformers"]
    assert len(curve[0]["extra"]["losses"]) == len(curve[0]["extra"]["oracle_losses"]) >= 2


def test_loss_limit_is_the_references_noise_not_its_one_draw(tmp_path):
    """A loss is one draw: a reference that lands on the oracle's loss by luck must not shrink the
    limit to the floor. The noise term (noise_factor x the reference's per-token standard error) holds
    the limit at the noise; factor x the reference's draw still counts when it is larger."""
    import torch

    from harness.core.tolerance import load_policy
    from harness.suites.train.measure import judge
    from harness.suites.train.metrics import loss_noise

    torch.manual_seed(0)
    truth = torch.rand(400, dtype=torch.float64) + 5.0
    err = torch.randn(400, dtype=torch.float64) * 0.01
    true_loss = float(truth.mean())
    s = loss_noise(truth + err, truth, true_loss)
    assert s == pytest.approx(float(err.std()) / 20 / true_loss)          # std / sqrt(400), relative
    assert loss_noise(truth[:10], truth, true_loss) is None                # token counts differ: no scale
    policy = tmp_path / "p.toml"
    policy.write_text('version = "t"\n[bfloat16]\nfactor = 4.0\nmax_factor = 8.0\n'
                      '[bfloat16.loss_rel_err]\nabs = 0.05\nfloor = 1e-6\nnoise_factor = 5.0\nreason = "t"\n')
    p = load_policy(policy)
    lucky = 1e-9                                                            # the reference landed on the truth
    assert judge(p, "bfloat16", "loss_rel_err", 4 * s, lucky)[0] == pytest.approx(1e-6)    # the old rule: fails
    tol, status, _ = judge(p, "bfloat16", "loss_rel_err", 4 * s, lucky, s)
    assert tol == pytest.approx(5 * s) and status == "pass"
    assert judge(p, "bfloat16", "loss_rel_err", 6 * s, lucky, s)[1] == "fail"
    assert judge(p, "bfloat16", "loss_rel_err", 6 * s, s, s)[0] == pytest.approx(8 * s)  # max_factor x ref wins
    assert judge(p, "bfloat16", "loss_rel_err", 0.0, 1.0, s)[0] == 0.05                     # abs caps it
    policy.write_text(policy.read_text().replace("noise_factor = 5.0", "noise_factor = -1"))
    with pytest.raises(Exception, match="noise_factor"):
        load_policy(policy)


def test_trainer_prints_nothing_into_the_console(models, tmp_path, capsys):
    """Trainer's printer callback writes its metrics dict ({'train_runtime': ...}) to stdout in the
    middle of the suite's output; the accumulation cell removes it and keeps the values in its rows."""
    code, s = run(models["tiny-gqa/meta"], tmp_path, "--dtypes", "float32", "--casts", "load",
                  "--checkpointing", "off", "--inputs", "right,accum")
    out = capsys.readouterr().out
    assert code == 0, failing(s)
    accum = [c for c in s["cells"] if c["case"]["input"] == "accum"]
    if all(c["status"] == "n/a" for c in accum):
        pytest.skip(f"Trainer did not run on this release: {accum[0]['reason'] if accum else 'no accum cell'}")
    # measured: passing, or a known deviation of the release (info) before 5.24
    assert any(c["status"] in ("pass", "info") for c in accum)
    assert "train_runtime" not in out and "train_loss" not in out


def _calibrate_train():
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "calibrate_train.py"
    spec = importlib.util.spec_from_file_location("calibrate_train", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_calibration_write_touches_only_the_campaigns_dtypes(tmp_path):
    """A float16 campaign's --write must not replace the bfloat16/float32 campaign's block nor their
    noise_factor (their runs are not in it): it adds or replaces the float16 block and number only."""
    import difflib

    from harness.core.tolerance import load_policy
    ct = _calibrate_train()
    real = ct.POLICY.read_text(encoding="utf-8")
    # the policy as it was before float16 had a block of its own: the first write adds one
    text = real
    for m in ct.BLOCK.finditer(real):
        if m.group("dtypes") == "float16":
            text = real[:m.start()] + real[m.end() + 1:]
    lines = ["#   a float16 campaign's figures", "#     float16   loss_rel_err  0.5"]
    once = ct.rewrite(text, {"float16"}, lines, {"float16": 7.3, "float32": 99.0})
    diff = [d for d in difflib.ndiff(text.splitlines(), once.splitlines()) if d[:1] in "+-"]
    assert [d for d in diff if d[0] == "-"] == ["- noise_factor = "
                                               f"{load_policy(ct.POLICY).limit('float16', 'loss_rel_err').noise_factor}"]
    assert [d[2:] for d in diff if d[0] == "+"] == ["# --- calibration: float16", *lines,
                                                    "# --- end of calibration: float16", "noise_factor = 7.3"]
    (tmp_path / "p.toml").write_text(once, encoding="utf-8")
    before, after = load_policy(ct.POLICY), load_policy(tmp_path / "p.toml")
    assert after.limit("float16", "loss_rel_err").noise_factor == 7.3
    for dtype in ("bfloat16", "float32"):
        assert after.limit(dtype, "loss_rel_err").noise_factor == before.limit(dtype, "loss_rel_err").noise_factor
    # a second float16 campaign replaces its own block, not appends another
    twice = ct.rewrite(once, {"float16"}, ["#   the next one"], {"float16": 5.0})
    assert "#   a float16 campaign's figures" not in twice and twice.count("#   the next one") == 1
    assert twice.replace("#   the next one", "").count("calibration: float16") == 2          # begin and end
    # a campaign over some of another block's dtypes (bfloat16 without float32) would leave two blocks
    # claiming bfloat16: refused; a campaign over all three supersedes both blocks
    with pytest.raises(ValueError, match="float32"):
        ct.rewrite(twice, {"bfloat16", "float16"}, lines, {})
    every = ct.rewrite(twice, {"bfloat16", "float16", "float32"}, ["#   all three"], {})
    assert "#   the next one" not in every and every.count("#   all three") == 1
    assert "# --- calibration" in every and every.count("# --- calibration") == 1
    # the policy as it stands: a float16 rewrite leaves the bfloat16/float32 block as it is
    kept = [m.group(0) for m in ct.BLOCK.finditer(real) if m.group("dtypes") != "float16"]
    again = ct.rewrite(real, {"float16"}, lines, {})
    assert kept and all(again.count(b) == 1 for b in kept)


def test_calibration_plants_run_at_the_dtype_asked():
    """--plant-dtype float16: each plant's own cells, every dtype flag naming float16 alone."""
    ct = _calibrate_train()
    for fault in faults_for("train"):
        own, moved = ct.plant_cells(fault), ct.plant_cells(fault, "float16")
        flags = dict(zip(moved[::2], moved[1::2]))
        assert flags["--dtypes"] == "float16", fault
        assert {k: v for k, v in flags.items() if k != "--dtypes"} == \
            {k: v for k, v in zip(own[::2], own[1::2]) if k != "--dtypes"}, fault


def test_calibration_noise_factor_is_the_widest_models():
    """The loss's d is fitted per model: many seeds of a narrow preset must not pull the factor below
    what the embedded model's wider d needs (the pooled fit would)."""
    ct = _calibrate_train()
    narrow = [("float16", x, 8.0) for x in (-0.8, 0.8) * 200]
    wide = [("float16", x, 8.0) for x in (-1.2, 1.2) * 20]
    alone, _ = ct.noise_factors({"wide": wide}, {"wide": 2})
    both, lines = ct.noise_factors({"narrow": narrow, "wide": wide}, {"narrow": 20, "wide": 2})
    pooled, _ = ct.noise_factors({"all": narrow + wide}, {"all": 22})
    assert both["float16"] == alone["float16"] > pooled["float16"]
    assert any("wide" in ln for ln in lines) and any("narrow" in ln for ln in lines)
    gap = [("float32", 3.0 + x, 8.0) for x in (-1.0, 1.0) * 10]                 # not centred: no factor
    assert "float32" not in ct.noise_factors({"m": gap}, {"m": 2})[0]
