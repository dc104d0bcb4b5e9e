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
    run = [*argv, "--model", str(models["tiny-gqa/hf"]), "--out", str(out)]
    assert main(run + ["--html"]) in (0, 1)
    assert (out / "report" / "junit.xml").is_file() and (out / "report" / "index.html").is_file()
    assert main(run) in (0, 1)
    assert not (out / "report").exists()


# --- 3. the <pad>-resized model the Llama 2 page tells users to make -----------------------------

@pytest.fixture(scope="module")
def padded(tmp_path_factory) -> Path:
    from harness.core.presets import write_padded_model
    return write_padded_model(tmp_path_factory.mktemp("pad") / "model")


def test_the_padded_fixture_is_what_save_pretrained_leaves(padded):
    """transformers itself reads the folder as a 32001-token tokenizer with <pad> = 32000: the
    fixture is the user's model, not the harness's idea of it."""
    from transformers import AutoConfig, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(padded)
    assert (len(tok), tok.pad_token, tok.pad_token_id) == (32001, "<pad>", 32000)
    assert AutoConfig.from_pretrained(padded).vocab_size == 32001


def test_pieces_plus_added_tokens_cover_the_vocabulary(padded, tmp_path):
    from harness.core import corpus
    from harness.core.errors import InputError
    sp, voc = corpus.tokenizer_for(padded, 32001, None)
    assert (voc.pieces, voc.added, voc.size) == (32000, {32000: "<pad>"}, 32001)
    with pytest.raises(InputError, match="32000 pieces plus 1 added token"):
        corpus.tokenizer_for(padded, 32002, None)
    gap = tmp_path / "gap"
    shutil.copytree(padded, gap)
    (gap / "added_tokens.json").write_text('{"<pad>": 32001}')
    (gap / "tokenizer_config.json").unlink()
    with pytest.raises(InputError, match="leave id 32000 without a token"):
        corpus.vocabulary(gap / "tokenizer.model", "--tokenizer")
    (gap / "added_tokens.json").write_text('{"<pad>": "32000"}')
    with pytest.raises(InputError, match=r"added_tokens.json \[<pad>\]"):
        corpus.vocabulary(gap / "tokenizer.model", "--tokenizer")


def test_the_default_run_of_the_padded_model_keeps_its_real_text(padded):
    """The default run takes real text whenever a tokenizer is at hand ("corpus?"); before, the
    32001-row model lost it to a note (no real-text cells). The plan's text step, without the run."""
    from harness.cli import build_parser
    from harness.core.checkpoints import open_model
    from harness.core.datafiles import suite_data
    from harness.suites.logits import Plan
    a = build_parser().parse_args(["logits", "--model", str(padded), "--ctx", "64", "--max-tokens", "256"])
    notes: list[str] = []
    text = Plan.text_windows(a, suite_data("logits")["corpus"], open_model(a.model), Plan.kinds(a), notes)
    assert text is not None and text.ids.shape == (4, 64), notes
    assert not any("no real-text cells" in n for n in notes)
    assert text.source["tokenizer"]["pieces"] == 32000 and text.source["not_measured"] == 256 - 4 * 63 + \
        text.source["tokens"] - 256


@pytest.mark.parametrize("extra", [["--text", "TEXT", "--inputs", "corpus"],
                                   ["--tokenizer", "MODEL/tokenizer.model", "--inputs", "corpus"]],
                         ids=["text", "tokenizer"])
def test_the_padded_model_runs_with_real_text(padded, tmp_path, capsys, extra):
    """Before: --text and --tokenizer exit 2 (32000 pieces, vocabulary 32001) and the default run
    drops the real text with a note. Now each measures the text, and says which tokenizer cut it."""
    import json
    text = tmp_path / "t.txt"
    text.write_text("The parity of two implementations is measured on real prose. " * 30)
    extra = [x.replace("TEXT", str(text)).replace("MODEL", str(padded)) for x in extra]
    out = tmp_path / "o"
    code = main(["logits", "--model", str(padded), "--out", str(out), "--dtypes", "float32", "--attn", "eager",
                 "--tp", "1", "--no-progress", "--no-localise", "--ctx", "64", "--max-tokens", "256", *extra])
    err = capsys.readouterr().err
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert any(c["case"]["input"].startswith("corpus:") for c in summary["cells"])
    tok = summary["text"]["tokenizer"]
    assert tok["path"] == str(padded / "tokenizer.model") and tok["added"] == {"32000": "<pad>"} and tok["sha256"]
    assert tok["sha256"] in (out / "report.md").read_text()


# --- 4. sizes in a checkpoint's config are part of the resource estimate --------------------------

@pytest.mark.parametrize("layout, file, key", [("meta", "params.json", "max_seq_len"),
                                               ("hf", "config.json", "max_position_embeddings")])
@pytest.mark.parametrize("argv", [["logits", "--dtypes", "float32", "--attn", "eager", "--tp", "1", "--shapes", "1x6"],
                                  ["behaviour", "--suite", "hidden"], ["stream"]], ids=["logits", "behaviour", "stream"])
def test_a_config_claiming_2_to_the_30_positions_is_refused_before_allocating(models, tmp_path, capsys, layout, file,
                                                                                argv, key):
    """Before: exit 3 after an allocation of 8+ GiB for the RoPE table (a 'bug in the harness')."""
    import json
    model = tmp_path / "m"
    shutil.copytree(models[f"tiny-mha/{layout}"], model)
    config = json.loads((model / file).read_text())
    config[key] = 2 ** 30
    (model / file).write_text(json.dumps(config))
    out = tmp_path / "o"
    assert main([*argv, "--model", str(model), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "max_seq_len 1073741824" in err and "position tables" in err, err
    assert not out.exists()


# --- 7. short text (issue 19): run on what there is, and never drop tokens without a word ----------

def test_text_shorter_than_a_window_is_one_shorter_window_and_a_remainder_is_named(tmp_path):
    """Before: a few paragraphs were refused below one 512-token window (exit 2), and with --ctx 128
    the tokens past the last full window went without a word."""
    import sentencepiece as spm

    from harness.core import corpus
    from harness.core.real_tokenizer import ensure_tokenizer_model
    sp = spm.SentencePieceProcessor(model_file=str(ensure_tokenizer_model()))
    text = "\n\n".join(["Python lets you work quickly and integrate systems more effectively."] * 3)
    n = len(sp.encode(text))
    w = corpus.windows("short", text, sp, 512, 4096)
    assert w.ids.shape == (1, n + 1) and w.tokens == n and w.dropped == 0
    assert f"{n} tokens, fewer than one window of --ctx 512" in w.note
    assert w.ids[0, 0] == sp.bos_id() and w.ids[0, 1:].tolist() == sp.encode(text)
    step = next(k for k in (8, 7, 6, 5) if n % k)             # windows that leave a remainder
    w = corpus.windows("short", text, sp, step + 1, None)
    assert w.ids.shape == (n // step, step + 1) and w.dropped == n % step
    assert f"the last {n % step} of {n} tokens do not fill a window" in w.note
    w = corpus.windows("short", text, sp, 9, 16)
    assert w.dropped == n - 16 and f"{n - 16} of {n} tokens are past --max-tokens 16" in w.note


# --- 5. signals: converted weights never outlive a run ---------------------------------------------

def _run_until_converted(tmpdir: Path, out: Path, model: Path):
    """A logits run (a subprocess, as CI runs it) stopped once its converted HF copy exists."""
    import os
    import subprocess
    import sys
    import time
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen([sys.executable, "-m", "harness", "logits", "--model", str(model), "--out", str(out),
                             "--dtypes", "float32,bfloat16,float16", "--attn", "eager,sdpa", "--shapes", "1x6",
                             "--inputs", "random", "--no-progress"],
                            env={**os.environ, "TMPDIR": str(tmpdir), "PYTHONPATH": str(root)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline, before = time.time() + 600, set(tmpdir.glob("llama-parity-hf-*/hf/model.safetensors"))
    while not set(tmpdir.glob("llama-parity-hf-*/hf/model.safetensors")) - before:
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() is not None else "slow"
        time.sleep(0.1)
    return proc


def test_sigterm_removes_converted_weights_and_the_next_run_removes_a_killed_runs(models, tmp_path):
    """Before: SIGTERM (a CI timeout) left the full converted copy in the temp folder, for ever."""
    import signal
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    proc = _run_until_converted(tmpdir, tmp_path / "o1", models["tiny-gqa/meta"])
    proc.kill()                                              # SIGKILL: no cleanup can run
    proc.wait()
    left = list(tmpdir.glob("llama-parity-hf-*"))
    assert len(left) == 1
    (tmpdir / "llama-parity-hf-users-own").mkdir()          # no owner marker: not the harness's
    proc = _run_until_converted(tmpdir, tmp_path / "o2", models["tiny-gqa/meta"])
    assert not left[0].exists()                              # the killed run's copy went when this one began
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    assert "terminated" in proc.stderr.read()
    assert sorted(p.name for p in tmpdir.glob("llama-parity-*")) == ["llama-parity-hf-users-own"]


def test_a_scratch_folder_whose_process_lives_is_kept(tmp_path, monkeypatch):
    import subprocess
    import sys
    from harness.core import checkpoints
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    mine = checkpoints.scratch("llama-parity-hf-")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    gone = tmp_path / "llama-parity-hf-gone"
    gone.mkdir()
    (gone / checkpoints.SCRATCH_OWNER).write_text(f"{int(dead.stdout)} 1\n")
    reused = tmp_path / "llama-parity-hf-reused"             # a live pid with another start time: pid reuse
    reused.mkdir()
    (reused / checkpoints.SCRATCH_OWNER).write_text(f"{__import__('os').getpid()} 0\n")
    assert sorted(p.name for p in checkpoints.remove_stale_scratch()) == ["llama-parity-hf-gone",
                                                                           "llama-parity-hf-reused"]
    assert Path(mine.name).is_dir()
    mine.cleanup()


# --- 6. messages that name the real problem --------------------------------------------------------

@pytest.fixture
def odd_paths(tmp_path):
    """A file, a folder, a FIFO, a dangling link and a looping link, side by side."""
    import os
    d = tmp_path / "odd"
    d.mkdir()
    (d / "afile").write_text("x")
    (d / "adir").mkdir()
    os.mkfifo(d / "fifo")
    (d / "dangling").symlink_to(d / "nowhere" / "x")
    (d / "loop").symlink_to(d / "loop")
    return d


@pytest.mark.parametrize("flag, name, needle", [
    ("--tokens", "fifo", "a named pipe (FIFO), not a regular file"),
    ("--tokens", "adir", "a folder, not a file"),
    ("--tokens", "dangling", "a dangling symbolic link (to "),
    ("--tokens", "loop", "a symbolic link that loops"),
    ("--text", "adir", "a folder, not a file"),             # before: "file not found"
    ("--text", "fifo", "a named pipe (FIFO), not a regular file"),
    ("--policy", "adir", "a folder, not a file"),           # before: "file not found"
    ("--tokenizer", "fifo", "a named pipe (FIFO), not a regular file"),
    ("--out", "dangling", "a dangling symbolic link (to "),  # before: "File exists"
    ("--out", "afile", "a file, not a folder"),
])
def test_odd_paths_are_named_for_what_they_are(models, odd_paths, capsys, flag, name, needle):
    out = odd_paths / "o"
    model = [] if flag == "--text" else ["--model", str(models["tiny-mha/meta"])]   # text: the embedded model
    argv = ["logits", *model, "--dtypes", "float32", "--no-progress", flag, str(odd_paths / name)]
    if flag != "--out":
        argv += ["--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{flag}" in err and needle in err, err
    assert "Traceback" not in err and not out.exists()


def test_a_looping_weights_link_is_named(models, tmp_path, capsys):
    """Before: 'the weight files hold 0 bytes: this is not the config of these weights'."""
    model = tmp_path / "m"
    shutil.copytree(models["tiny-mha/meta"], model)
    (model / "consolidated.00.pth").unlink()
    (model / "consolidated.00.pth").symlink_to(model / "consolidated.00.pth")
    assert main(["logits", "--model", str(model), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"--model: {model / 'consolidated.00.pth'}: a symbolic link that loops" in err, err


@pytest.mark.parametrize("variables, needle", [
    ({"LLAMA_PARITY_CACHE": "{afile}"}, "LLAMA_PARITY_CACHE={afile}: {afile}: a file, not a folder"),
    ({"LLAMA_PARITY_CACHE": "", "HOME": "{afile}"}, "LLAMA_PARITY_CACHE is unset; HOME={afile}): {afile}: a file"),
])
def test_a_cache_variable_or_home_pointing_at_a_file_is_named(monkeypatch, odd_paths, capsys, variables, needle):
    """Before: '/x/afile/tokenizer: Not a directory', naming no variable. A run that needs the cache
    (the Llama 2 tokenizer fixture, for real text) is refused naming the variable."""
    afile = str(odd_paths / "afile")
    for k, v in variables.items():
        monkeypatch.setenv(k, v.format(afile=afile))
    assert main(["logits", "--dtypes", "float32", "--attn", "eager", "--tp", "1", "--inputs", "corpus",
                 "--out", str(odd_paths / "o"), "--no-progress"]) == 2
    assert needle.format(afile=afile) in capsys.readouterr().err


def test_an_os_error_under_a_library_cache_variable_names_it(monkeypatch, odd_paths):
    from harness import cli
    monkeypatch.setenv("HF_HOME", str(odd_paths / "afile"))
    said = cli._variable_behind(str(odd_paths / "afile" / "hub" / "models--x"))
    assert said == f"HF_HOME={odd_paths / 'afile'} is a file, not a folder: "
    assert cli._variable_behind(str(odd_paths / "elsewhere")) == ""
