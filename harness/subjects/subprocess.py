"""Subjects that run in their own virtual environment, as a worker process the harness talks to.

vLLM, torchtune, Meta's llama-models and GPT-QModel pin packages the harness cannot share (vLLM a
transformers older than the harness's, torchtune a torchao of its own, GPT-QModel a newer torch), so
each gets a venv of its own, built from an exact list of pins (``suites/venvs/<kind>.txt``) into
``Source.cache`` and named by the hash of those pins: a changed pin is a new venv, never a silently
different one. Venvs are made by an explicit command, never at run time:

    python -m harness.subjects.subprocess setup vllm        (or: tox -e vllm)
    python -m harness.subjects.subprocess status

A subject whose venv is missing is built all the same and says so: ``cannot()[NOT_INSTALLED]`` holds the
command that makes it, so every cell it would fill is n/a with that reason.

The worker (``workers/run_<kind>.py`` + ``workers/worker_protocol.py``) imports nothing from the
harness; it is run by path in isolated mode (``python -I``), so neither the checkout nor the
user's PYTHONPATH leaks into the other environment. It stays up for the subject's life (vLLM takes
tens of seconds to start), gets token ids as .npy files and writes float32 logits or
log-probabilities as .npy, never a pickle. Everything it returns is checked here (shape, dtype,
finiteness) before a statistic sees it; the statistics themselves stay in harness.core.metrics.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import selectors
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from harness.core import ROOT, SUITES, cache_dir
from harness.core.errors import InputError
from harness.subjects import NOT_INSTALLED

WORKERS = Path(__file__).resolve().parent / "workers"
PINS = SUITES / "venvs"
START_TIMEOUT = 900.0        # loading vLLM on a busy 2-core machine takes minutes
CALL_TIMEOUT = 1800.0


class WorkerError(RuntimeError):
    """The worker failed or answered something the protocol does not allow. The message names the
    kind and what went wrong (and the tail of the worker's log); the cell fails with it."""


class SubjectCannot(WorkerError):
    """Asked for something ``cannot()`` lists (a padding mask, decode, a dtype, a missing venv)."""


# --- the venvs ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Venv:
    """One kind's environment: its pins, its worker script, where it lives in the cache."""
    kind: str
    pins: Path
    worker: Path
    imports: tuple[str, ...]          # what `setup` imports to prove the venv works

    def requirements(self) -> list[str]:
        """The pins file's requirement lines (comments and blank lines are not part of it)."""
        lines = (line.split("#", 1)[0].strip() for line in self.pins.read_text(encoding="utf-8").splitlines())
        return [line for line in lines if line]

    def key(self) -> str:
        """Hash of the pins and the interpreter's minor version (a venv is tied to both); a
        comment edited in the pins file is not a new venv."""
        text = "\n".join(self.requirements())
        tag = f"{sys.version_info.major}.{sys.version_info.minor}-{sys.platform}"
        return hashlib.sha256(f"{tag}\n{text}".encode()).hexdigest()[:12]

    def path(self, cache: Path | None = None) -> Path:
        return (cache or cache_dir() / "subjects") / f"venv-{self.kind}-{self.key()}"

    def python(self, cache: Path | None = None) -> Path:
        return self.path(cache) / "bin" / "python"

    def installed(self, cache: Path | None = None) -> dict | None:
        """installed.json of a finished venv (written last, so its presence means complete)."""
        marker = self.path(cache) / "installed.json"
        if not marker.is_file() or not self.python(cache).exists():
            return None
        try:
            return json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def setup_command(self) -> str:
        return f"python -m harness.subjects.subprocess setup {self.kind}   (or: tox -e {self.kind})"


VENVS = {v.kind: v for v in (
    Venv("vllm", PINS / "vllm.txt", WORKERS / "run_vllm.py", ("vllm",)),
    Venv("torchtune", PINS / "torchtune.txt", WORKERS / "run_torchtune.py", ("torchtune", "torchao")),
    Venv("llama-models", PINS / "llama-models.txt", WORKERS / "run_llama_models.py",
         ("llama_models.llama3.model", "fairscale")),
    Venv("gptq", PINS / "gptq.txt", WORKERS / "run_gptq.py", ("gptqmodel", "optimum.gptq")),
)}


def _du(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            p = Path(root) / f
            if not p.is_symlink():
                total += p.stat().st_size
    return total


def setup(kind: str, cache: Path | None = None, force: bool = False, log=print) -> dict:
    """Create the kind's venv from its pins: ``pip install --no-deps`` of the exact list, so nothing
    outside it (a CUDA torch above all) can be pulled in; then import what the worker needs. Built
    in a scratch folder beside the target and renamed into place, so a failed or interrupted
    install never leaves a venv that looks ready."""
    venv = VENVS[kind]
    target = venv.path(cache)
    if venv.installed(cache) and not force:
        log(f"{kind}: ready at {target}")
        return venv.installed(cache)
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".venv-{kind}-", dir=target.parent))
    t0 = time.perf_counter()
    try:
        subprocess.run([sys.executable, "-m", "venv", str(scratch)], check=True)
        py = scratch / "bin" / "python"
        pip = [str(py), "-m", "pip", "install", "--no-deps", "--disable-pip-version-check"]
        log(f"{kind}: installing {venv.pins.relative_to(ROOT)} into {target} ...")
        subprocess.run([*pip, "-r", str(venv.pins)], check=True)
        seconds = time.perf_counter() - t0
        probe = ";".join(f"import {m}" for m in venv.imports)
        subprocess.run([str(py), "-I", "-c", probe], check=True)
        info = {"kind": kind, "pins": str(venv.pins.relative_to(ROOT)), "key": venv.key(),
                "install_seconds": round(seconds, 1), "bytes": _du(scratch),
                "python": sys.version.split()[0], "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        (scratch / "installed.json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
        if target.exists():
            shutil.rmtree(target)
        scratch.rename(target)     # the venv's python finds its prefix from pyvenv.cfg: a move is safe
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    log(f"{kind}: {info['bytes'] / 2**20:.0f} MiB installed in {info['install_seconds']:.0f} s")
    return info


# --- one worker process -----------------------------------------------------------------------------

def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


def worker_env(extra: dict | None = None) -> dict:
    """The environment of a process in a subject's venv: the user's, less PYTHON* (the other venv
    must not see this one's paths), offline. A worker never reaches a hub: the weights and
    everything else come through its files."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    base.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                TOKENIZERS_PARALLELISM="false", **(extra or {}))
    return base


class Worker:
    """A worker process and its session folder. Requests and replies are JSON lines; arrays are files."""

    def __init__(self, label: str, python: Path, script: Path, start: dict,
                 start_timeout: float = START_TIMEOUT, call_timeout: float = CALL_TIMEOUT,
                 env: dict | None = None):
        self.label, self.call_timeout = label, call_timeout
        self._dir = tempfile.TemporaryDirectory(prefix="llama-parity-worker-")
        self.session = Path(self._dir.name)
        (self.session / "start.json").write_text(json.dumps(start), encoding="utf-8")
        self.log = self.session / "worker.log"
        self._calls = 0
        base = worker_env(env)
        with open(self.log, "wb") as logf:
            try:
                self.proc = subprocess.Popen([str(python), "-I", str(script), str(self.session)],
                                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=logf,
                                             cwd=self.session, env=base, start_new_session=True)
            except OSError as e:
                self._dir.cleanup()
                raise WorkerError(f"{label}: cannot start {python}: {e}") from None
        self._sel = selectors.DefaultSelector()
        self._sel.register(self.proc.stdout, selectors.EVENT_READ)
        self._buf = b""
        reply = self._read(start_timeout, "loading the model")
        if not reply.get("ready"):
            self.close()
            raise WorkerError(f"{label}: the worker could not load the model: {reply.get('error')}"
                              + self._log_tail())
        try:
            self.provenance = json.loads((self.session / "provenance.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            self.close()
            raise WorkerError(f"{label}: the worker wrote no readable provenance.json ({e})") from None

    def _log_tail(self) -> str:
        tail = _tail(self.log)
        return f"\n--- the worker's log ({self.log.name}), last lines ---\n{tail}" if tail else ""

    def _read(self, timeout: float, doing: str) -> dict:
        """The next control line, or a WorkerError when the worker dies, hangs or says nonsense."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill()
                raise WorkerError(f"{self.label}: no answer within {timeout:.0f} s while {doing}; "
                                  "the worker was stopped" + self._log_tail())
            if not self._sel.select(timeout=min(left, 1.0)):
                continue
            chunk = os.read(self.proc.stdout.fileno(), 1 << 16)
            if not chunk:
                code = self.proc.wait()
                raise WorkerError(f"{self.label}: the worker exited with code {code} while {doing}"
                                  + self._log_tail())
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        try:
            reply = json.loads(line)
            if not isinstance(reply, dict):
                raise ValueError("not an object")
        except ValueError:
            self.kill()
            raise WorkerError(f"{self.label}: the worker answered {line[:200]!r}, not a protocol line"
                              + self._log_tail()) from None
        return reply

    def call(self, op: str, ids: torch.Tensor, **extra) -> Path:
        """Send ids, wait for the reply, return the path of the array the worker wrote."""
        if self.proc.poll() is not None:
            raise WorkerError(f"{self.label}: the worker is not running (exit code {self.proc.returncode})")
        self._calls += 1
        src = self.session / f"ids-{self._calls}.npy"
        out = self.session / f"out-{self._calls}.npy"
        import numpy as np
        np.save(src, ids.detach().to("cpu", torch.int64).numpy(), allow_pickle=False)
        msg = {"op": op, "ids": str(src), "out": str(out), **extra}
        try:
            self.proc.stdin.write((json.dumps(msg) + "\n").encode())
            self.proc.stdin.flush()
        except OSError:
            code = self.proc.wait()
            raise WorkerError(f"{self.label}: the worker exited with code {code}" + self._log_tail()) from None
        reply = self._read(self.call_timeout, f"computing {op} of {tuple(ids.shape)}")
        src.unlink(missing_ok=True)
        if "cannot" in reply:
            raise SubjectCannot(f"{self.label}: {reply['cannot']}")
        if not reply.get("ok"):
            raise WorkerError(f"{self.label}: {op} failed in the worker: {reply.get('error')}"
                              + (f"\n{reply['trace']}" if reply.get("trace") else ""))
        return out

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, 9)      # its own session: vLLM's engine process goes too
            except OSError:
                self.proc.kill()
            self.proc.wait()

    def close(self, grace: float = 30.0) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(b'{"op": "quit"}\n')
                self.proc.stdin.flush()
                self.proc.wait(timeout=grace)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self.kill()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass
        self._sel.close()
        self._dir.cleanup()


def read_array(path: Path, shape: tuple[int, ...], label: str) -> torch.Tensor:
    """The worker's float32 answer, checked: a readable .npy (never a pickle), float32, the shape
    asked for, every value finite."""
    import numpy as np
    if not path.is_file():
        raise WorkerError(f"{label}: the worker answered ok but wrote no {path.name}")
    try:
        arr = np.load(path, allow_pickle=False)
    except ValueError as e:
        why = "holds pickled objects, which are never loaded" if "pickle" in str(e) else str(e)
        raise WorkerError(f"{label}: {path.name} {why}") from None
    except OSError as e:
        raise WorkerError(f"{label}: {path.name} is not a .npy array ({e})") from None
    finally:
        path.unlink(missing_ok=True)
    if not isinstance(arr, np.ndarray) or arr.dtype != np.float32:
        raise WorkerError(f"{label}: {path.name} holds {getattr(arr, 'dtype', type(arr).__name__)}, "
                          "float32 expected")
    if tuple(arr.shape) != tuple(shape):
        raise WorkerError(f"{label}: {path.name} has shape {tuple(arr.shape)}, {tuple(shape)} expected "
                          "(batch, seq, vocab)")
    bad = ~np.isfinite(arr)
    if bad.any():
        nan = int(np.isnan(arr).sum())
        raise WorkerError(f"{label}: {int(bad.sum())} non-finite values ({nan} NaN, {int(bad.sum()) - nan} "
                          f"infinite) in {path.name}, first at (batch, seq, vocab) "
                          f"{tuple(int(i) for i in np.argwhere(bad)[0])}")
    return torch.from_numpy(arr)


# --- the subject ----------------------------------------------------------------------------------

@dataclass
class WorkerSubject:
    """A Subject (harness.subjects) whose numbers come from a worker in another environment.

    The worker starts on first use and stays up until ``close``. ``cannot`` holds what the kind
    cannot do; NOT_INSTALLED ("subject") in it means the subject cannot run here at all (its venv is missing)."""
    name: str
    python: Path
    script: Path
    start: dict
    vocab: int
    device: str = "cpu"
    options: dict[str, Any] = field(default_factory=dict)      # settings() beyond dtype
    cannots: dict[str, str] = field(default_factory=dict)
    venv_info: dict | None = None
    start_timeout: float = START_TIMEOUT
    call_timeout: float = CALL_TIMEOUT
    env: dict | None = None
    _worker: Worker | None = field(default=None, init=False, repr=False)

    def settings(self) -> dict[str, Any]:
        return {"dtype": self.start["dtype"], **self.options}

    @property
    def exact(self) -> bool:
        """float32 on the checkpoint's own weights (vLLM bf16 is lossy: judged by a budget)."""
        return self.start["dtype"] == "float32"

    def cannot(self) -> dict[str, str]:
        return dict(self.cannots)

    def provenance(self) -> dict[str, Any]:
        out = {"kind": self.name, "venv": self.venv_info or {}, "runs_on": "cpu",
               "returns": "logits" if "logits" not in self.cannots else "log-probabilities"}
        if self._worker is not None:
            out.update(self._worker.provenance)
        return out

    def _ready(self) -> Worker:
        if NOT_INSTALLED in self.cannots:
            raise SubjectCannot(f"{self.name}: {self.cannots[NOT_INSTALLED]}")
        if self._worker is None:
            self._worker = Worker(self.name, self.python, self.script, self.start, self.start_timeout,
                                  self.call_timeout, self.env)
        return self._worker

    def _check_ids(self, ids: torch.Tensor) -> None:
        if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32) or ids.numel() == 0:
            raise ValueError(f"{self.name}: ids must be a non-empty (batch, seq) integer tensor, got "
                             f"{tuple(ids.shape)} {ids.dtype}")

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        if mask is not None or positions is not None:
            raise SubjectCannot(f"{self.name}: {self.cannots.get('padding', 'no padding mask')}")
        self._check_ids(ids)
        worker = self._ready()
        out = worker.call("forward", ids)
        return read_array(out, (*ids.shape, self.vocab), self.name).to(self.device)

    def decode(self, ids: torch.Tensor, prefill: int) -> torch.Tensor:
        if "decode" in self.cannots:
            raise SubjectCannot(f"{self.name}: {self.cannots['decode']}")
        self._check_ids(ids)
        if not 0 < prefill <= ids.shape[1]:
            raise ValueError(f"{self.name}: prefill {prefill} outside 1..{ids.shape[1]}")
        out = self._ready().call("decode", ids, prefill=int(prefill))
        return read_array(out, (*ids.shape, self.vocab), self.name).to(self.device)

    def close(self) -> None:
        if self._worker is not None:
            self._worker.close()
            self._worker = None

    def __enter__(self) -> "WorkerSubject":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- what the three kinds share: weights for the worker, options, a missing venv -----------------

def model_shape(args) -> dict:
    """The model's shape as every worker reads it (the harness's ModelArgs, vocab filled in)."""
    return {"dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads, "n_kv_heads": args.kv_heads,
            "vocab_size": args.vocab_size, "norm_eps": args.norm_eps, "rope_theta": args.rope_theta,
            "multiple_of": args.multiple_of, "ffn_dim_multiplier": args.ffn_dim_multiplier,
            "ffn_hidden": args.ffn_hidden, "max_seq_len": args.max_seq_len}


def meta_file(source) -> Path:
    """One consolidated.00.pth with the whole model in Meta's layout, for workers that load Meta's
    format: the user's own file when it is one shard, else written once into the cache (merged
    shards, or converted from an HF folder) keyed by the weights' fingerprint."""
    ckpt = source.ckpt
    own = Path(ckpt.path) / "consolidated.00.pth"
    if ckpt.source == "meta" and ckpt.n_shards == 1 and own.is_file():
        return own
    from reference_model.checkpoint import save_meta
    target = source.cache / f"meta-{source.fingerprint[:16]}"
    if not (target / "consolidated.00.pth").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=".meta-", dir=target.parent))
        save_meta(scratch, ckpt.args, ckpt.state, n_shards=1)
        try:
            scratch.rename(target)
        except OSError:                       # another run made it first
            shutil.rmtree(scratch, ignore_errors=True)
    return target / "consolidated.00.pth"


def options(kind: str, given: dict, known: dict[str, str]) -> dict[str, str]:
    """The spec's options, each one known to the kind (else exit 2 naming it)."""
    for key in given:
        if key not in known:
            raise InputError(f"--subject {kind}:{key}=...: unknown option {key!r} (known: "
                             + ", ".join(f"{k} ({v})" for k, v in known.items()) + ")")
    return dict(given)


def positive(kind: str, key: str, value: str | None, default: float | None, whole: bool = False) -> float | None:
    """A positive number (a positive integer where ``whole``) given as --subject KIND:key=value."""
    if value is None:
        return default
    try:
        x = float(value)
    except ValueError:
        x = -1.0
    if not x > 0 or not math.isfinite(x) or (whole and x != int(x)):
        raise InputError(f"--subject {kind}:{key}={value}: a positive {'integer' if whole else 'number'} expected")
    return int(x) if whole else x


def venv_subject(kind: str, source, dtype: str, device: str, opts: dict, *, dtypes: tuple[str, ...],
                 cannots: dict[str, str], start: dict, settings: dict | None = None,
                 env: dict | None = None, cls: type = WorkerSubject) -> WorkerSubject:
    """The subject of a venv kind (``cls``: WorkerSubject or a kind's own subclass); n/a
    (``cannot()[NOT_INSTALLED]``) when its venv is not installed."""
    venv = VENVS[kind]
    info = venv.installed(source.cache)
    cannots = dict(cannots)
    if info is None:
        cannots[NOT_INSTALLED] = (f"its environment is not installed (venv-{kind}-{venv.key()} under "
                          f"{source.cache}); create it with: {venv.setup_command()}")
    if dtype not in dtypes:
        cannots.setdefault(f"dtype:{dtype}", f"{kind} runs at {' or '.join(dtypes)} only")
        cannots.setdefault(NOT_INSTALLED, cannots[f"dtype:{dtype}"])
    timeout = positive(kind, "timeout", opts.get("timeout"), CALL_TIMEOUT)
    return cls(name=kind, python=venv.python(source.cache), script=venv.worker,
               start={"kind": kind, "dtype": dtype, "model": model_shape(source.ckpt.args), **start},
               vocab=source.ckpt.args.vocab_size, device=device, options=settings or {},
               cannots=cannots, venv_info=info, call_timeout=timeout, env=env)


# --- the command line: setup and status ------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    import argparse
    p = argparse.ArgumentParser(prog="python -m harness.subjects.subprocess",
                                description="Create or list the venvs of the optional subjects.")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("setup", help="create a kind's venv from its pins (suites/venvs/KIND.txt)")
    s.add_argument("kinds", nargs="+", choices=sorted(VENVS))
    s.add_argument("--force", action="store_true", help="rebuild even when it exists")
    sub.add_parser("status", help="which venvs exist, their size and install time")
    a = p.parse_args(argv)
    cache = cache_dir() / "subjects"
    if a.cmd == "status":
        for kind, venv in sorted(VENVS.items()):
            info = venv.installed(cache)
            print(f"{kind:13s} " + (f"ready  {info['bytes'] / 2**20:6.0f} MiB  installed in "
                                    f"{info['install_seconds']:.0f} s  {venv.path(cache)}" if info else
                                    f"absent  create with: {venv.setup_command()}"))
        return 0
    for kind in a.kinds:
        try:
            setup(kind, cache, force=a.force)
        except subprocess.CalledProcessError as e:
            print(f"{kind}: setup failed: {' '.join(map(str, e.cmd[:6]))} ... exited {e.returncode}",
                  file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
