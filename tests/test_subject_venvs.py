"""Subjects that run in another venv (harness/subjects/subprocess.py and workers/).

The protocol is tested without any heavy venv: a fake worker, run by this interpreter through the
real worker_protocol, hands back the reference's own float32 logits (and the statistics must be
the reference's), or garbage of every kind (each must end as a WorkerError that says what was
wrong, never a traceback of another type). The real kinds run only where their venv exists
(``python -m harness.subjects.subprocess setup KIND``, or ``tox -e KIND``); elsewhere they are
skipped with that command as the reason.
"""
from __future__ import annotations

import hashlib
import json
import subprocess as sp
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from harness.core.checkpoints import HFFolder, open_model
from harness.core.errors import InputError
from harness.core.metrics import corpus_stats, position_stats
from harness.core.presets import default_model
from harness.core.subjects import ReferenceSubject
from harness.subjects import KINDS, Source, parse_spec
from harness.subjects import subprocess as subproc
from harness.subjects.subprocess import SubjectCannot, WorkerError, WorkerSubject

import harness.subjects.gptq  # noqa: F401,E402
import harness.subjects.llama_models  # noqa: F401,E402  (each registers its kind)
import harness.subjects.torchtune  # noqa: F401,E402
import harness.subjects.vllm  # noqa: F401,E402

FAKE = """
import os, sys, time, json
sys.path.insert(0, {workers!r})
import numpy as np
import worker_protocol

class Runner:
    def __init__(self, start):
        self.start, self.mode = start, start["mode"]
        if self.mode == "die-loading":
            raise RuntimeError("cannot open the weights")
        if self.mode == "exit-loading":
            os._exit(7)

    def provenance(self):
        return {{"implementation": "fake", "dtype": self.start["dtype"]}}

    def forward(self, ids):
        print("a library's chatter on stdout", flush=True)     # must never be read as a reply
        expect = np.load(self.start["ids"])
        if not np.array_equal(ids, expect) or ids.dtype != np.int64:
            raise ValueError("ids changed on the way")
        out = np.load(self.start["logits"])
        m = self.mode
        if m == "nan":
            out[0, 3, 5] = np.nan
        elif m == "inf":
            out[1, 0, :2] = np.inf
        elif m == "shape":
            out = out[:, :-1]
        elif m == "float64":
            out = out.astype(np.float64)
        elif m == "shift":      # vLLM's prompt_logprobs[j] is position j - 1: forget that
            out[:, 1:] = out[:, :-1].copy()
        elif m == "raise":
            raise MemoryError("out of memory in the kernel")
        elif m == "crash":
            os._exit(3)
        elif m == "hang":
            time.sleep(60)
        elif m == "pickle":
            np.save(self.start["out_hint"], np.array([{{"a": 1}}], dtype=object), allow_pickle=True)
        return out

    def decode(self, ids, prefill):
        return self.forward(ids)

if __name__ == "__main__":
    if {raw!r}:
        print("hello, not a protocol line", flush=True)
        sys.exit(0)
    sys.exit(worker_protocol.serve(Runner))
"""


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """Two held-out-text-like windows of the embedded model, the reference's float32 logits and the
    oracle's."""
    folder = open_model(default_model())
    ckpt = folder.load()
    g = torch.Generator().manual_seed(22)
    ids = torch.randint(3, ckpt.args.vocab_size, (2, 24), generator=g)
    ids[:, 0] = 1
    with torch.inference_mode():
        ref32 = ReferenceSubject(ckpt, "float32", "cpu").logits(ids)
        oracle = ReferenceSubject(ckpt, "float64", "cpu", oracle=True).logits(ids)
    root = tmp_path_factory.mktemp("fake")
    np.save(root / "ids.npy", ids.numpy())
    np.save(root / "logits.npy", ref32.numpy())
    return {"ckpt": ckpt, "ids": ids, "ref32": ref32, "oracle": oracle, "root": root}


def fake_subject(ref, mode: str, raw: bool = False, **kw) -> WorkerSubject:
    script = ref["root"] / f"fake_{mode}_{int(raw)}.py"
    script.write_text(textwrap.dedent(FAKE.format(workers=str(subproc.WORKERS), raw=raw)))
    start = {"dtype": "float32", "mode": mode, "ids": str(ref["root"] / "ids.npy"),
             "logits": str(ref["root"] / "logits.npy")}
    return WorkerSubject(name="fake", python=Path(sys.executable), script=script, start=start,
                         vocab=ref["ckpt"].args.vocab_size, **kw)


def exact(got: torch.Tensor, ref) -> bool:
    """Judged like transformers: every top-1 the oracle's, mean KL within a small factor of the
    reference's own float32 error."""
    ours = corpus_stats(position_stats(got, ref["oracle"]))
    own = corpus_stats(position_stats(ref["ref32"], ref["oracle"]))
    return ours["same_top1"] == 1.0 and ours["kl_mean"] <= 20 * own["kl_mean"]


def test_fake_worker_returns_the_reference_and_the_statistics_are_the_references(ref):
    with fake_subject(ref, "ok") as subject:
        got = subject.forward(ref["ids"])
        assert got.dtype == torch.float32 and torch.equal(got, ref["ref32"])   # bit for bit across the files
        prov = subject.provenance()
        assert prov["implementation"] == "fake" and prov["protocol"] == 1 and prov["returns"] == "logits"
        again = subject.decode(ref["ids"], prefill=8)                             # the same worker, still up
        assert torch.equal(again, ref["ref32"])
    via = corpus_stats(position_stats(got, ref["oracle"]))
    own = corpus_stats(position_stats(ref["ref32"], ref["oracle"]))
    assert via["kl_mean"] == own["kl_mean"] and 0 < via["kl_mean"] < 1e-9
    assert via["same_top1"] == 1.0


def test_an_off_by_one_in_the_workers_positions_is_caught(ref):
    """The bug a prompt_logprobs reader makes (score j is position j - 1): well-formed, finite,
    and far outside what an exact subject may be."""
    with fake_subject(ref, "shift") as subject:
        got = subject.forward(ref["ids"])
    assert not exact(got, ref)
    assert exact(ref["ref32"], ref)


@pytest.mark.parametrize("mode, says", [
    ("nan", r"1 non-finite values \(1 NaN, 0 infinite\).*first at \(batch, seq, vocab\) \(0, 3, 5\)"),
    ("inf", r"2 non-finite values \(0 NaN, 2 infinite\)"),
    ("shape", r"has shape \(2, 23, 32000\), \(2, 24, 32000\) expected"),
    ("float64", r"holds float64, float32 expected"),
    ("raise", r"forward failed in the worker: MemoryError: out of memory in the kernel"),
    ("crash", r"exited with code 3 while computing forward"),
    ("die-loading", r"could not load the model: RuntimeError: cannot open the weights"),
    ("exit-loading", r"exited with code 7 while loading the model"),
])
def test_a_worker_that_misbehaves_is_a_clear_worker_error(ref, mode, says):
    subject = fake_subject(ref, mode)
    try:
        with pytest.raises(WorkerError, match=says):
            subject.forward(ref["ids"])
    finally:
        subject.close()


def test_a_hung_worker_is_stopped_at_the_timeout(ref):
    subject = fake_subject(ref, "hang", call_timeout=3)
    try:
        with pytest.raises(WorkerError, match=r"no answer within 3 s while computing forward .*stopped"):
            subject.forward(ref["ids"])
        assert subject._worker.proc.poll() is not None          # killed, not left running
    finally:
        subject.close()


def test_a_worker_that_prints_on_the_control_channel_is_refused(ref):
    subject = fake_subject(ref, "ok", raw=True)
    try:
        with pytest.raises(WorkerError, match=r"answered b'hello, not a protocol line', not a protocol line"):
            subject.forward(ref["ids"])
    finally:
        subject.close()


def test_a_pickled_answer_is_never_loaded(ref, tmp_path):
    bad = tmp_path / "out.npy"
    np.save(bad, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(WorkerError, match="holds pickled objects, which are never loaded"):
        subproc.read_array(bad, (1,), "fake")
    junk = tmp_path / "junk.npy"
    junk.write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(WorkerError, match="junk.npy"):
        subproc.read_array(junk, (1,), "fake")
    with pytest.raises(WorkerError, match="wrote no missing.npy"):
        subproc.read_array(tmp_path / "missing.npy", (1,), "fake")


def test_a_padding_mask_is_refused_before_any_process_starts(ref):
    subject = fake_subject(ref, "ok", cannots={"padding": "no mask here"})
    with pytest.raises(SubjectCannot, match="no mask here"):
        subject.forward(ref["ids"], mask=torch.ones_like(ref["ids"]))
    assert subject._worker is None


# --- the three kinds, as the registry builds them -----------------------------------------------------

@pytest.fixture(scope="module")
def source(tmp_path_factory):
    folder = open_model(default_model())
    ckpt = folder.load()
    held = []

    def hf_path():
        if not held:
            held.append(HFFolder(ckpt))
        return held[0].path
    fp = hashlib.sha256(json.dumps(folder.fingerprint()).encode()).hexdigest()
    yield Source(ckpt, fp, hf_path, None, subproc.cache_dir() / "subjects")
    for h in held:
        h.close()


@pytest.fixture
def no_venvs(source, tmp_path):
    return Source(source.ckpt, source.fingerprint, source.hf_path, None, tmp_path / "empty-cache")


@pytest.mark.parametrize("kind", ["vllm", "torchtune", "llama-models", "gptq"])
def test_a_missing_venv_makes_the_subject_na_with_the_command_that_creates_it(no_venvs, kind):
    subject = KINDS[kind](no_venvs, "float32", "cpu", {})
    why = subject.cannot()["subject"]
    assert f"python -m harness.subjects.subprocess setup {kind}" in why and f"tox -e {kind}" in why
    with pytest.raises(SubjectCannot, match="setup " + kind):
        subject.forward(torch.ones(1, 4, dtype=torch.long))
    assert subject.provenance()["kind"] == kind
    assert "dtype:float64" in subject.cannot() and "hooks" in subject.cannot()


def test_each_kind_checks_its_options(no_venvs):
    with pytest.raises(InputError, match=r"--subject vllm:color=\.\.\.: unknown option 'color'"):
        KINDS["vllm"](no_venvs, "float32", "cpu", parse_spec("vllm:color=red").options)
    with pytest.raises(InputError, match="logits or logprobs"):
        KINDS["vllm"](no_venvs, "float32", "cpu", {"out": "probs"})
    with pytest.raises(InputError, match=r"vllm:batch=1\.5: a positive integer"):
        KINDS["vllm"](no_venvs, "float32", "cpu", {"batch": "1.5"})
    with pytest.raises(InputError, match="timeout=0: a positive number"):
        KINDS["torchtune"](no_venvs, "float32", "cpu", {"timeout": "0"})
    logprobs = KINDS["vllm"](no_venvs, "float32", "cpu", {"out": "logprobs"})
    assert "log-softmax space" in logprobs.cannot()["logits"]
    assert "logits" not in KINDS["vllm"](no_venvs, "float32", "cpu", {}).cannot()
    f64 = KINDS["llama-models"](no_venvs, "float64", "cpu", {})
    assert "xq.float()" in f64.cannot()["dtype:float64"]        # the kind's own reason reaches the n/a cell


def test_a_venv_is_named_by_its_pins_and_a_failed_setup_leaves_nothing_that_looks_ready(tmp_path, monkeypatch):
    pins = tmp_path / "pins.txt"
    pins.write_text("numpy==2.0.0\n")
    venv = subproc.Venv("fake", pins, subproc.WORKERS / "run_vllm.py", ())
    key = venv.key()
    pins.write_text("# a comment\nnumpy==2.0.0   # why\n\n")
    assert venv.key() == key                                   # a comment is not a new venv
    pins.write_text("numpy==2.0.1\n")
    assert venv.key() != key                                   # a changed pin is
    monkeypatch.setitem(subproc.VENVS, "fake", venv)
    monkeypatch.setattr(subproc, "ROOT", tmp_path)

    def run(cmd, check=True):
        if "pip" in cmd:
            raise sp.CalledProcessError(1, cmd)
        Path(cmd[-1], "bin").mkdir(parents=True)
    monkeypatch.setattr(subproc.subprocess, "run", run)
    with pytest.raises(sp.CalledProcessError):
        subproc.setup("fake", tmp_path / "cache", log=lambda *_: None)
    assert venv.installed(tmp_path / "cache") is None
    assert list((tmp_path / "cache").iterdir()) == []          # the scratch venv is gone too


# --- the real kinds, where their venv exists ------------------------------------------------------

@pytest.mark.slow          # ~45 s for vLLM (its engine starts in the test), ~20 s for the others
@pytest.mark.parametrize("kind, dtype", [("vllm", "float32"), ("torchtune", "float32"), ("llama-models", "float32")])
def test_a_real_kind_computes_what_the_reference_computes(source, ref, kind, dtype):
    venv = subproc.VENVS[kind]
    if venv.installed(source.cache) is None:
        pytest.skip(f"{kind}'s venv is not installed: {venv.setup_command()}")
    with KINDS[kind](source, dtype, "cpu", {}) as subject:
        got = subject.forward(ref["ids"])
        decoded = subject.decode(ref["ids"], prefill=10) if "decode" not in subject.cannot() else None
        prov = subject.provenance()
    assert prov["dtype"] == dtype and prov["versions"]
    assert exact(got, ref), corpus_stats(position_stats(got, ref["oracle"]))
    if decoded is not None:
        assert exact(decoded, ref)
