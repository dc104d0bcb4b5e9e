"""Reliability: bad inputs answered with exit 2 naming the culprit, resumable runs that survive a
kill, atomic results, and byte-identical results for the same seed, inputs and environment."""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from harness.core import store
from harness.suites import logits as runner
from harness.cli import main
from harness.core.store import Journal, Row
from reference_model import checkpoint
from reference_model.errors import CheckpointError

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["--attn", "eager", "--tp", "1", "--shapes", "1x6", "--no-progress"]


def _logits(model, out, *extra) -> int:
    return main(["logits", "--model", str(model), "--out", str(out), *SMALL, *extra])


def _copy(models, name, tmp_path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(models[name], dst)
    return dst


def _bad(argv: list[str], out: Path, capsys) -> str:
    """Run the CLI expecting exit 2; nothing may be written to the output folder."""
    code = main([*argv, "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert not out.exists(), sorted(p.name for p in out.iterdir())
    return err


# --- resume and interruption ------------------------------------------------------------------

@pytest.fixture
def pinned_commit(monkeypatch):
    """The commit is part of every group's key; colleagues committing mid-test must not move it."""
    import harness.core.environment
    monkeypatch.setattr(harness.core.environment, "_git_commit", lambda: "pinned-for-this-test")


def test_rerun_resumes_and_writes_the_same_results(pinned_commit, models, tmp_path, capsys):
    out = tmp_path / "o"
    assert _logits(models["tiny-gqa/meta"], out, "--dtypes", "float32,bfloat16") == 0
    first = {n: (out / n).read_bytes() for n in ("results.csv", "summary.json")}
    assert "resumed" not in capsys.readouterr().err
    assert _logits(models["tiny-gqa/meta"], out, "--dtypes", "float32,bfloat16") == 0
    err = capsys.readouterr().err
    assert "resumed: 4 finished cell group(s)" in err     # reference + transformers, per dtype
    assert json.loads((out / "timing.json").read_text())["groups_resumed"] == 4
    for name, data in first.items():
        assert (out / name).read_bytes() == data, name


def test_no_resume_reruns_everything(pinned_commit, models, tmp_path, capsys):
    out = tmp_path / "o"
    assert _logits(models["tiny-mha/meta"], out, "--dtypes", "float32") == 0
    capsys.readouterr()
    assert _logits(models["tiny-mha/meta"], out, "--dtypes", "float32", "--no-resume") == 0
    assert "resumed" not in capsys.readouterr().err
    assert json.loads((out / "timing.json").read_text())["groups_resumed"] == 0
    assert len(Journal.open(out).entries) == 2


def test_changed_seed_reuses_nothing(pinned_commit, models, tmp_path, capsys):
    out = tmp_path / "o"
    assert _logits(models["tiny-mha/meta"], out, "--dtypes", "float32") == 0
    capsys.readouterr()
    assert _logits(models["tiny-mha/meta"], out, "--dtypes", "float32", "--seed", "1") == 0
    assert "resumed" not in capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seed"] == 1
    assert len(Journal.open(out).entries) == 4     # both seeds' groups are kept, keyed apart


def test_extending_the_matrix_reuses_the_finished_part(pinned_commit, models, tmp_path, capsys):
    out = tmp_path / "o"
    assert _logits(models["tiny-mha/meta"], out, "--dtypes", "float32") == 0
    capsys.readouterr()
    assert _logits(models["tiny-mha/meta"], out, "--dtypes", "float32,bfloat16") == 0
    assert "resumed: 2 finished cell group(s)" in capsys.readouterr().err
    fresh = tmp_path / "fresh"
    assert _logits(models["tiny-mha/meta"], fresh, "--dtypes", "float32,bfloat16") == 0
    assert (out / "results.csv").read_bytes() == (fresh / "results.csv").read_bytes()


def test_torn_journal_line_is_dropped_and_its_group_rerun(pinned_commit, models, tmp_path, capsys):
    out = tmp_path / "o"
    assert _logits(models["tiny-mha/meta"], out, "--dtypes", "float32") == 0
    expected = (out / "results.csv").read_bytes()
    journal = out / store.JOURNAL
    lines = journal.read_bytes().splitlines(keepends=True)
    assert len(lines) == 2
    journal.write_bytes(lines[0] + lines[1][: len(lines[1]) // 2])   # a write cut off mid-line
    capsys.readouterr()
    assert _logits(models["tiny-mha/meta"], out, "--dtypes", "float32") == 0
    err = capsys.readouterr().err
    assert "1 unreadable line(s)" in err and "resumed: 1 finished cell group(s)" in err
    assert (out / "results.csv").read_bytes() == expected
    assert all(json.loads(line) for line in journal.read_text().splitlines())   # healed


def _journal_lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def test_killed_run_leaves_no_corrupt_file_and_the_rerun_resumes(pinned_commit, models, tmp_path, capsys):
    """SIGKILL a real CLI process after its first journaled group; then rerun with the same --out."""
    out = tmp_path / "o"
    args = ["--dtypes", "float32,bfloat16,float16", "--attn", "eager,sdpa", "--tp", "1", "--shapes", "1x6",
            "--no-progress"]
    model = models["tiny-gqa/meta"]
    # A stale verdict from an earlier run must not survive a run that is then killed.
    out.mkdir()
    (out / "summary.json").write_text('{"verdict": "pass"}')
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # The child pins the commit as the pinned_commit fixture does here, so its groups' keys match ours.
    child = ("import sys, harness.core.environment as e; e._git_commit = lambda: 'pinned-for-this-test'; "
             "from harness.cli import main; sys.exit(main(sys.argv[1:]))")
    proc = subprocess.Popen([sys.executable, "-c", child, "logits", "--model", str(model), "--out", str(out),
                             *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    journal = out / store.JOURNAL
    deadline = time.monotonic() + 300
    try:
        while _journal_lines(journal) < 1 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be interrupted"
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    finished = _journal_lines(journal)
    assert 1 <= finished < 9, finished                  # 3 dtypes x (reference + eager + sdpa)
    assert not (out / "summary.json").exists() and not (out / "results.csv").exists()
    assert not list(out.glob(".*.tmp"))
    assert len(Journal.open(out).entries) >= 1

    capsys.readouterr()
    code = main(["logits", "--model", str(model), "--out", str(out), *args])
    assert code == 0
    assert f"resumed: {finished} finished cell group(s)" in capsys.readouterr().err
    fresh = tmp_path / "fresh"
    assert main(["logits", "--model", str(model), "--out", str(fresh), *args]) == 0
    # Groups journaled by the killed child were computed in another process: there CPU kernels may
    # round the last bits differently (seen under 4.46.3: a KL of 7.0974e-13 vs 7.0972e-13), so
    # the values are compared closely and everything else exactly.
    _assert_same_results(out, fresh)


def _assert_same_results(a: Path, b: Path) -> None:
    import pandas as pd
    fa, fb = pd.read_csv(a / "results.csv"), pd.read_csv(b / "results.csv")
    assert list(fa.columns) == list(fb.columns) and len(fa) == len(fb)
    pd.testing.assert_frame_equal(fa.drop(columns=["value", "tolerance"]), fb.drop(columns=["value", "tolerance"]))
    for col in ("value", "tolerance"):
        pd.testing.assert_series_equal(fa[col], fb[col], rtol=1e-3, atol=1e-15)
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    assert (sa["verdict"], sa["counts"]) == (sb["verdict"], sb["counts"])
    assert [c["status"] for c in sa["cells"]] == [c["status"] for c in sb["cells"]]


def _summary_without_commit(out: Path) -> str:
    """summary.json's text less the harness commit, which colleagues' commits move mid-test here."""
    summary = json.loads((out / "summary.json").read_text())
    summary["environment"].pop("harness_commit")
    return json.dumps(summary)


def test_interrupted_write_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "summary.json"
    store.atomic_write_text(target, '{"old": true}\n')

    def fail(*_):
        raise KeyboardInterrupt   # as if the run were stopped between write and rename
    monkeypatch.setattr(store.os, "replace", fail)
    with pytest.raises(KeyboardInterrupt):
        store.atomic_write_text(target, '{"new": tr')
    assert target.read_text() == '{"old": true}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


# --- a run owns its --out ----------------------------------------------------------------------

def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_no_view_of_an_earlier_run_survives_to_contradict_the_verdict(models, tmp_path):
    """A passing run with --html, then a failing one without --html into the same --out: nothing
    may still say pass (a CI job reading report/junit.xml would see one). The user's own temporary
    file survives; the harness's own debris does not."""
    out, model = tmp_path / "o", models["tiny-mha/meta"]
    assert _logits(model, out, "--dtypes", "float32", "--html") == 0
    assert 'failures="0"' in (out / "report" / "junit.xml").read_text()
    (out / ".draft.tmp").write_text("the user's")
    (out / f"{store.TMP_PREFIX}summary.json.x1y2.tmp").write_text("half a summary")   # a killed write's
    (out / ".results.csv.ab12cd34.tmp").write_text("half a table")      # ... as older releases named it
    (out / "report" / "notes").mkdir()                    # the user's, in the views' folder
    assert _logits(model, out, "--dtypes", "float32", "--plant", "no-permute", "--no-localise") == 1
    assert json.loads((out / "summary.json").read_text())["verdict"] == "fail"
    assert sorted(p.name for p in (out / "report").iterdir()) == ["notes"]   # the stale page and JUnit went
    assert (out / ".draft.tmp").read_text() == "the user's"
    assert not list(out.glob(f"{store.TMP_PREFIX}*")) and not (out / ".results.csv.ab12cd34.tmp").exists()
    assert not (out / store.LOCK).exists()
    # with --html the views are this run's: JUnit fails, the page says fail
    assert _logits(model, out, "--dtypes", "float32", "--plant", "no-permute", "--no-localise", "--html") == 1
    assert 'failures="0"' not in (out / "report" / "junit.xml").read_text()
    assert 'data-verdict="fail"' in (out / "report" / "index.html").read_text()


def test_a_run_that_ends_in_exit_2_changes_nothing_in_a_used_out(models, tmp_path, capsys):
    out, model = tmp_path / "o", models["tiny-mha/meta"]
    assert _logits(model, out, "--dtypes", "float32", "--html") == 0
    before = _files(out)
    assert _logits(model, out, "--dtypes", "float32", "--html", "--shapes", "0x4") == 2
    assert "--shapes" in capsys.readouterr().err
    assert _files(out) == before


LOCK_HOLDER = ("import sys; from pathlib import Path; from harness.core.suite import Context; "
               "c = Context(Path(sys.argv[1]), command='llama-parity logits (the holder)'); c.lock(); "
               "print('locked', flush=True); sys.stdin.read()")


def test_a_second_run_into_a_busy_out_is_refused_and_a_killed_holder_blocks_nothing(models, tmp_path, capsys):
    out, model = tmp_path / "o", models["tiny-mha/meta"]
    assert _logits(model, out, "--dtypes", "float32") == 0
    before = _files(out)
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(out)], env={**os.environ, "PYTHONPATH": str(ROOT)},
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        capsys.readouterr()
        assert _logits(model, out, "--dtypes", "float32") == 2
        err = capsys.readouterr().err
        assert f"--out: {out} is in use by another llama-parity run (pid {holder.pid}" in err, err
        assert "the holder" in err and "Traceback" not in err
        assert {k: v for k, v in _files(out).items() if k != store.LOCK} == before
    finally:
        holder.kill()                                   # SIGKILL: no chance to remove its lock file
        holder.wait()
    assert (out / store.LOCK).exists()                  # what a killed run leaves behind
    assert _logits(model, out, "--dtypes", "float32") == 0    # ... does not block the next one
    assert not (out / store.LOCK).exists()


def test_row_round_trips_through_the_journal(tmp_path):
    rows = [Row("logits", {"dtype": "float16", "tp": 2}, "transformers", "oracle-fp64", m, v, t, s, why)
            for m, v, t, s, why in [("max_abs", 0.125, 0.5, "pass", ""), ("nmse", math.nan, 1.0, "fail", "NaN"),
                                    ("kl_max", math.inf, None, "fail", "Inf"), ("all", None, None, "n/a", "x")]]
    j = Journal.open(tmp_path)
    j.append("k", {"g": 1}, rows)
    back = Journal.open(tmp_path).get("k")
    assert [r.to_dict() for r in back] == [r.to_dict() for r in rows]


# --- reproducibility -------------------------------------------------------------------------

def test_same_seed_same_inputs_write_identical_files(models, tmp_path):
    for name in ("a", "b"):
        assert _logits(models["tiny-gqa/meta"], tmp_path / name, "--dtypes", "float32,float16") == 0
    assert (tmp_path / "a" / "results.csv").read_bytes() == (tmp_path / "b" / "results.csv").read_bytes()
    a, b = (tmp_path / "a" / "summary.json").read_text(), (tmp_path / "b" / "summary.json").read_text()
    if json.loads(a)["environment"]["harness_commit"] == json.loads(b)["environment"]["harness_commit"]:
        assert a == b                                       # byte-identical, environment included
    assert _summary_without_commit(tmp_path / "a") == _summary_without_commit(tmp_path / "b")
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert "wall_seconds" not in json.dumps(summary)                       # timings live apart
    assert json.loads((tmp_path / "a" / "timing.json").read_text())["wall_seconds"] >= 0
    env = summary["environment"]
    assert {"torch", "torch_threads", "harness_commit", "determinism_note", "device"} <= env.keys()


# --- bad inputs: exit 2, the message names the file and the key / index / argument ------------

def _tokens(tmp_path, data) -> Path:
    path = tmp_path / "tokens.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


@pytest.mark.parametrize("data, needle", [
    ([[1, 5, 511], [1, 2, 512]], "[1][2]: token id 512 is out of range"),   # tiny-mha's vocab is 512
    ([[1, -1]], "[0][1]: token id -1 is out of range"),
    ("[[1, 2", "not valid JSON"),
    ([[1, 2], [3]], "[1]: 1 ids, but [0] has 2"),
    ([[1, "2"]], "[0][1]: '2' is not an integer"),
    ([[1, True]], "[0][1]: True is not an integer"),
    ([], "non-empty JSON list"),
    ([[]], "[0]: expected a non-empty list"),
])
def test_bad_token_file(models, tmp_path, capsys, data, needle):
    path = _tokens(tmp_path, data)
    err = _bad(["logits", "--model", str(models["tiny-mha/meta"]), "--tokens", str(path)], tmp_path / "o", capsys)
    assert str(path) in err and needle in err, err


def test_tokens_and_shapes_together(models, tmp_path, capsys):
    path = _tokens(tmp_path, [[1, 2]])
    err = _bad(["logits", "--model", str(models["tiny-mha/meta"]), "--tokens", str(path), "--shapes", "1x4"],
               tmp_path / "o", capsys)
    assert "--tokens" in err and "--shapes" in err


def test_token_file_runs_those_ids(models, tmp_path):
    ids = [[1, 7, 300, 511, 42], [1, 3, 3, 3, 3]]
    path = _tokens(tmp_path, ids)
    code = main(["logits", "--model", str(models["tiny-mha/meta"]), "--out", str(tmp_path / "o"), "--tokens",
                 str(path), "--dtypes", "float32", "--attn", "eager", "--tp", "1", "--no-progress"])
    assert code == 0
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["inputs"]["shapes"] == ["2x5"] and summary["inputs"]["tokens"] == str(path)
    assert {c["case"]["shape"] for c in summary["cells"]} == {"2x5"}


def test_missing_token_file(models, tmp_path, capsys):
    err = _bad(["logits", "--model", str(models["tiny-mha/meta"]), "--tokens", str(tmp_path / "nope.json")],
               tmp_path / "o", capsys)
    assert "nope.json" in err and "not found" in err


@pytest.mark.parametrize("device, needle", [("cuda:x", "unknown device"), ("cuda:7", "--device cuda:7"),
                                            ("gpu", "unknown device")])
def test_device_that_does_not_exist(models, tmp_path, capsys, device, needle):
    if device == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 CUDA devices")
    err = _bad(["logits", "--model", str(models["tiny-mha/meta"]), "--device", device], tmp_path / "o", capsys)
    assert needle in err


def test_dtype_the_device_cannot_run_is_not_applicable(models, tmp_path, monkeypatch):
    real = runner.environment

    def without_half(device="cpu"):
        env = real(device)
        env["dtype_support"] = {**env["dtype_support"], "float16": False}
        return env
    monkeypatch.setattr(runner, "environment", without_half)
    assert _logits(models["tiny-mha/meta"], tmp_path / "o", "--dtypes", "float16,float32") == 0
    cells = json.loads((tmp_path / "o" / "summary.json").read_text())["cells"]
    half = [c for c in cells if c["case"]["dtype"] == "float16"]
    assert half and all(c["status"] == "n/a" and "float16 does not run on cpu" in c["reason"] for c in half)
    assert any(c["status"] == "pass" for c in cells if c["case"]["dtype"] == "float32")


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    for k, v in changes.items():
        if v is ...:
            del data[k]
        else:
            data[k] = v
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("name, file, changes, needles", [
    ("tiny-gqa/meta", "params.json", {"n_kv_heads": 3}, ["params.json", "n_kv_heads", "do not divide 8 heads"]),
    ("tiny-mha/meta", "params.json", {"dim": "64"}, ["params.json", "[dim]", "not a finite int"]),
    ("tiny-mha/meta", "params.json", {"multiple_of": 0}, ["params.json", "multiple_of"]),
    ("tiny-mha/meta", "params.json", {"norm_eps": -1}, ["params.json", "norm_eps"]),
    ("tiny-mha/meta", "params.json", {"vocab_size": 500}, ["params.json", "[vocab_size]", "500, but consolidated.00.pth [tok_embeddings.weight] has 512 rows"]),
    ("tiny-mha/meta", "params.json", {"bogus": 1}, ["params.json", "bogus"]),
    ("tiny-mha/hf", "config.json", {"num_attention_heads": 5}, ["config.json", "heads do not divide dim 64"]),
    ("tiny-gqa/hf", "config.json", {"num_key_value_heads": 3}, ["config.json", "n_kv_heads", "3 kv heads do not divide 8 heads"]),
    ("tiny-mha/hf", "config.json", {"hidden_size": ...}, ["config.json", "[hidden_size]", "missing field"]),
    ("tiny-mha/hf", "config.json", {"rms_norm_eps": None}, ["config.json", "[rms_norm_eps]"]),
    ("tiny-mha/hf", "config.json", {"vocab_size": 511}, ["config.json", "[vocab_size]", "511, but [model.embed_tokens.weight] has 512 rows"]),
    ("tiny-mha/hf", "config.json", {"rope_scaling": {"type": "linear", "factor": 2}}, ["config.json", "rope_scaling"]),
])
def test_inconsistent_config(models, tmp_path, capsys, name, file, changes, needles):
    path = _copy(models, name, tmp_path)
    _edit_json(path / file, **changes)
    err = _bad(["logits", "--model", str(path)], tmp_path / "o", capsys)
    for needle in needles:
        assert needle in err, (needle, err)


def test_config_json_not_json(models, tmp_path, capsys):
    path = _copy(models, "tiny-mha/hf", tmp_path)
    (path / "config.json").write_bytes(b"\xff\xfe not json")
    err = _bad(["logits", "--model", str(path)], tmp_path / "o", capsys)
    assert "config.json" in err and "not valid JSON" in err


def test_vocab_mismatch_with_the_tokenizer(models, tmp_path):
    """A tokenizer of 32000 pieces with a 512-row checkpoint: refused at load, naming vocab_size."""
    for name, file in (("tiny-mha/meta", "params.json"), ("tiny-mha/hf", "config.json")):
        with pytest.raises(CheckpointError) as e:
            checkpoint.load(models[name], vocab_size=32000)
        assert e.value.key == "vocab_size" and e.value.where.endswith(file)
        assert "512, but the tokenizer has 32000 pieces" in str(e.value)
    # params.json's vocab_size -1 means "the tokenizer's": filled in, then checked against the weights
    path = _copy(models, "tiny-mha/meta", tmp_path)
    _edit_json(path / "params.json", vocab_size=-1)
    assert checkpoint.load(path, vocab_size=512).args.vocab_size == 512
    with pytest.raises(CheckpointError, match=r"params\.json \[vocab_size\]: 600, but .* has 512 rows"):
        checkpoint.load(path, vocab_size=600)


def test_extra_shard(models, tmp_path, capsys):
    path = _copy(models, "tiny-gqa/meta2", tmp_path)
    shutil.copy(path / "consolidated.01.pth", path / "consolidated.02.pth")
    err = _bad(["logits", "--model", str(path)], tmp_path / "o", capsys)
    assert "consolidated.02.pth [" in err and "3 shards" in err and "2 shard(s) of this size would fit" in err


def test_last_shard_missing(models, tmp_path, capsys):
    """Only consolidated.00.pth of a 2-shard model: nothing is missing by name, the sizes say it."""
    path = _copy(models, "tiny-gqa/meta2", tmp_path)
    (path / "consolidated.01.pth").unlink()
    err = _bad(["logits", "--model", str(path)], tmp_path / "o", capsys)
    assert "consolidated.00.pth [" in err and "the only shard holds" in err and "2 shard(s) of this size would fit" in err


def test_gap_in_shards_names_the_missing_one(models, tmp_path, capsys):
    path = _copy(models, "tiny-gqa/meta2", tmp_path)
    shutil.copy(path / "consolidated.01.pth", path / "consolidated.02.pth")
    (path / "consolidated.01.pth").unlink()
    err = _bad(["logits", "--model", str(path)], tmp_path / "o", capsys)
    assert "consolidated.01.pth" in err and "missing shard" in err


def test_corrupt_safetensors_header(models, tmp_path, capsys):
    path = _copy(models, "tiny-mha/hf", tmp_path)
    data = bytearray((path / "model.safetensors").read_bytes())
    data[8:16] = b"\x00garbage"       # inside the JSON header
    (path / "model.safetensors").write_bytes(bytes(data))
    err = _bad(["logits", "--model", str(path)], tmp_path / "o", capsys)
    assert "model.safetensors" in err and "unreadable safetensors" in err


def test_corrupt_pth_bytes(models, tmp_path, capsys):
    path = _copy(models, "tiny-mha/meta", tmp_path)
    f = path / "consolidated.00.pth"
    data = bytearray(f.read_bytes())
    data[:64] = bytes(64)             # zip local header gone
    f.write_bytes(bytes(data))
    err = _bad(["logits", "--model", str(path)], tmp_path / "o", capsys)
    assert "consolidated.00.pth" in err and "unreadable" in err


def test_index_may_not_point_outside_the_folder(models, tmp_path, capsys):
    path = _copy(models, "tiny-mha/hf-sharded", tmp_path)
    index = path / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    key = next(iter(data["weight_map"]))
    data["weight_map"][key] = "../../elsewhere.safetensors"
    index.write_text(json.dumps(data))
    err = _bad(["logits", "--model", str(path)], tmp_path / "o", capsys)
    assert "model.safetensors.index.json" in err and f"weight_map.{key}" in err


def test_pickled_callable_in_hf_bin_is_refused(models, tmp_path, capsys):
    path = _copy(models, "tiny-mha/hf", tmp_path)
    from safetensors.torch import load_file
    state = load_file(path / "model.safetensors")
    (path / "model.safetensors").unlink()
    state["model.norm.weight"] = _Boom()
    torch.save(state, path / "pytorch_model.bin")
    err = _bad(["logits", "--model", str(path)], tmp_path / "o", capsys)
    assert "pytorch_model.bin" in err and "refused" in err
    assert "this must never run" not in capsys.readouterr().out


class _Boom:
    def __reduce__(self):
        return (print, ("this must never run",))


# --- --tokenizer: the checkpoint's vocabulary must be the tokenizer's -------------------------

@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> Path:
    """A real SentencePiece model of 60 pieces, trained here on a few lines (no download)."""
    spm = pytest.importorskip("sentencepiece")
    pytest.importorskip("reference_model.tokenizer")   # the tokenizer reader this option uses
    d = tmp_path_factory.mktemp("sp")
    (d / "text.txt").write_text("\n".join(f"the quick brown fox {i} jumps over the lazy dog" for i in range(200)))
    spm.SentencePieceTrainer.train(input=str(d / "text.txt"), model_prefix=str(d / "m"), vocab_size=60,
                                   model_type="bpe", minloglevel=2)
    return d / "m.model"


def test_tokenizer_vocab_mismatch_is_bad_input(models, tmp_path, capsys, sp_model):
    err = _bad(["logits", "--model", str(models["tiny-mha/meta"]), "--tokenizer", str(sp_model)], tmp_path / "o", capsys)
    assert "params.json [vocab_size]: 512, but the tokenizer has 60 pieces" in err


def test_file_that_is_not_a_sentencepiece_model(models, tmp_path, capsys):
    pytest.importorskip("reference_model.tokenizer")
    bogus = tmp_path / "tokenizer.model"
    bogus.write_text("this is not a protobuf\n")
    err = _bad(["logits", "--model", str(models["tiny-mha/meta"]), "--tokenizer", str(bogus)], tmp_path / "o", capsys)
    assert f"--tokenizer {bogus}" in err and "byte" in err


def test_tokenizer_fills_vocab_minus_one_and_the_run_goes_on(tmp_path, sp_model):
    from harness.core.presets import preset_args, random_state
    args = preset_args("tiny-mha")
    args.vocab_size = 60
    path = checkpoint.save_meta(tmp_path / "m", args, random_state(args, 0))
    _edit_json(path / "params.json", vocab_size=-1)        # Meta's "take it from the tokenizer"
    assert _logits(path, tmp_path / "o", "--dtypes", "float32", "--tokenizer", str(sp_model)) == 0
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["model"]["args"]["vocab_size"] == 60 == summary["tokenizer_vocab"]
