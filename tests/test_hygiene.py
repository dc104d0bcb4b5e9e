"""Hygiene of a run (issue 20): resume keyed on the code that computes the verdict, an --out that
holds nothing stale, the harness's own temporary files and converted weights cleaned (also after a
kill), checkpoint sizes in the resource estimate, and messages that name the real problem."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from harness.cli import main
from harness.core import environment

SMALL = ["--dtypes", "float32", "--attn", "eager", "--tp", "1", "--shapes", "1x6", "--no-progress",
         "--no-localise"]


# --- 1. resume keyed on transformers' code, not its version string --------------------------------

@pytest.fixture
def fake_transformers(monkeypatch, tmp_path):
    """The files whose hash keys the journal, copied from the installed transformers into a folder
    this test may edit (the real install is shared); the code that runs is still the real one."""
    real = environment.package_dir("transformers")
    fake = tmp_path / "site" / "transformers"
    for pattern in environment.CODE_FILES["transformers"]:
        for f in real.glob(pattern):
            dst = fake / f.relative_to(real)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, dst)
    (fake / "models" / "bert").mkdir(parents=True)
    (fake / "models" / "bert" / "modeling_bert.py").write_text("# not Llama\n")
    found = environment.package_dir
    monkeypatch.setattr(environment, "package_dir", lambda name: fake if name == "transformers" else found(name))
    monkeypatch.setattr(environment, "_git_commit", lambda: "pinned-for-this-test")
    return fake


def test_code_hash_follows_the_files_that_define_llama_not_the_rest(fake_transformers):
    before = environment.code_sha256()["transformers"]
    (fake_transformers / "models" / "bert" / "modeling_bert.py").write_text("# changed, not Llama\n")
    assert environment.code_sha256()["transformers"] == before
    for rel in ("models/llama/modeling_llama.py", "cache_utils.py", "masking_utils.py", "integrations/sdpa_attention.py"):
        f = fake_transformers / rel
        if not f.exists():       # older releases lack masking_utils.py
            continue
        f.write_bytes(f.read_bytes() + b"\n# patched in place\n")
        after = environment.code_sha256()["transformers"]
        assert after != before, rel
        before = after


def test_a_rerun_after_transformers_code_changed_in_place_resumes_nothing(fake_transformers, models, tmp_path, capsys):
    out = tmp_path / "o"
    run = ["logits", "--model", str(models["tiny-gqa/meta"]), "--out", str(out), *SMALL]
    assert main(run) == 0
    capsys.readouterr()
    assert main(run) == 0            # the same code: the journal is reused (the test can fail)
    assert "resumed: 2 finished cell group(s)" in capsys.readouterr().err
    llama = fake_transformers / "models" / "llama" / "modeling_llama.py"
    llama.write_bytes(llama.read_bytes().replace(b"variance_epsilon", b"variance_epsilon ", 1))  # same version
    assert main(run) == 0
    assert "resumed" not in capsys.readouterr().err


# --- 2. a stale verdict: nothing in --out may contradict this run, and exit 2 changes nothing ------

def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_nothing_measured_after_the_run_began_puts_the_previous_results_back(models, tmp_path, monkeypatch, capsys):
    """logits takes --out (ctx.begin) before it measures; a run whose every cell then turns out n/a
    ends in exit 2, and exit 2 must leave the folder as it was, journal and views included."""
    out = tmp_path / "o"
    run = ["logits", "--model", str(models["tiny-mha/meta"]), "--out", str(out), *SMALL]
    assert main(run + ["--html"]) == 0
    before = _files(out)
    real = environment.dtype_support
    monkeypatch.setattr(environment, "dtype_support", lambda device: {k: False for k in real(device)})
    capsys.readouterr()
    assert main(run + ["--no-resume"]) == 2
    assert "nothing was measured" in capsys.readouterr().err
    assert _files(out) == before


def test_a_killed_runs_moved_aside_results_are_removed_by_the_next_run(models, tmp_path):
    from harness.core import store
    out = tmp_path / "o"
    run = ["logits", "--model", str(models["tiny-mha/meta"]), "--out", str(out), *SMALL]
    assert main(run) == 0
    stale = out / f"{store.STASH_PREFIX}999999"          # what a SIGKILL between begin and finish leaves
    stale.mkdir()
    (stale / "summary.json").write_text('{"verdict": "pass"}')
    assert main(run) == 0
    assert not list(out.glob(f"{store.STASH_PREFIX}*"))


@pytest.mark.parametrize("argv", [
    ["behaviour", "--suite", "hidden", "--dtypes", "float32", "--attn", "eager"],
    ["axes", "--suite", "flags", "--dtypes", "float32", "--attn", "eager", "--lengths", "8"],
], ids=["behaviour", "axes"])
def test_every_suite_removes_the_views_an_earlier_run_rendered(models, tmp_path, argv):
    """The views in OUT/report belong to the run that rendered them: a later run without --html
    removes them, whichever suite it is (logits: tests/test_reliability.py)."""
    out = tmp_path / "o"
    run = [*argv, "--model", str(models["tiny-gqa/hf"]), "--out", str(out), "--no-progress"]
    assert main(run + ["--html"]) in (0, 1)
    assert (out / "report" / "junit.xml").is_file() and (out / "report" / "index.html").is_file()
    assert main(run) in (0, 1)
    assert not (out / "report").exists()
