"""The worker's half of the subprocess-subject protocol (the harness's half: harness/subjects/subprocess.py).

A worker runs in another virtual environment, whose pins conflict with the harness's, so it imports
nothing from the harness: only the standard library, numpy and its own implementation. It is run by
path, in isolated mode, with this folder put first on ``sys.path`` by the kind's script:

    <venv>/bin/python -I harness/subjects/workers/run_<kind>.py SESSION_DIR

and speaks through files and one line of JSON per message:

  SESSION_DIR/start.json         written by the harness: the weights' paths, the model's shape, the
                                 dtype and the kind's options
  SESSION_DIR/provenance.json    written by the worker once the model is loaded
  fd 1 (the control channel)     {"ready": true} or {"ready": false, "error": ...}, then one reply
                                 per request; everything else the worker or its libraries print
                                 goes to stderr (fd 1 is moved there), so a log line can never be
                                 read as a reply
  stdin                          one request per line: {"op": "forward", "ids": PATH, "out": PATH},
                                 {"op": "decode", ..., "prefill": N} or {"op": "quit"}

``ids`` is an int64 (batch, seq) .npy; the worker writes ``out`` as a float32 (batch, seq, vocab)
.npy (logits, or log-probabilities for a kind that only returns those), atomically, and answers
{"ok": true} or {"ok": false, "error": ...}. Arrays never travel as pickles: both sides load with
``allow_pickle=False``.
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np

PROTOCOL = 1


class Cannot(Exception):
    """The implementation cannot do what was asked (e.g. decode through its own cache)."""


def _error(e: BaseException) -> dict:
    return {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-4000:]}


def serve(make) -> int:
    """Load the model with ``make(start) -> runner`` and answer requests until "quit" or EOF.

    ``runner`` has ``provenance() -> dict``, ``forward(ids) -> array`` and optionally
    ``decode(ids, prefill) -> array`` and ``close()``."""
    ctl = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)                     # the libraries' prints (and their child processes') -> stderr
    sys.stdout = sys.stderr

    def say(msg: dict) -> None:
        ctl.write(json.dumps(msg) + "\n")

    session = Path(sys.argv[1])
    try:
        start = json.loads((session / "start.json").read_text(encoding="utf-8"))
        runner = make(start)
        provenance = dict(runner.provenance(), protocol=PROTOCOL, python=sys.version.split()[0],
                          numpy=np.__version__)
        _write_atomic(session / "provenance.json", json.dumps(provenance, indent=1, default=str).encode())
    except BaseException as e:        # a failed load is an answer, not a silent death
        say({"ready": False, **_error(e)})
        return 1
    say({"ready": True, "protocol": PROTOCOL})
    for line in sys.stdin:
        try:
            msg = json.loads(line)
            if msg.get("op") == "quit":
                break
            ids = np.load(msg["ids"], allow_pickle=False)
            t0 = time.perf_counter()
            if msg["op"] == "forward":
                out = runner.forward(ids)
            elif msg["op"] == "decode":
                if not hasattr(runner, "decode"):
                    raise Cannot("this worker has no decode")
                out = runner.decode(ids, int(msg["prefill"]))
            else:
                raise ValueError(f"unknown op {msg.get('op')!r}")
            _save(Path(msg["out"]), out)
            say({"ok": True, "seconds": round(time.perf_counter() - t0, 3)})
        except Cannot as e:
            say({"ok": False, "cannot": str(e)})
        except Exception as e:
            say({"ok": False, **_error(e)})
    if hasattr(runner, "close"):
        runner.close()
    return 0


def _save(path: Path, array) -> None:
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)
    os.replace(tmp, path)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def versions(*names: str) -> dict[str, str]:
    """Installed versions of distributions, as the venv has them (absent ones left out)."""
    from importlib import metadata
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def load_meta_state(path: str) -> dict:
    """Meta's consolidated.00.pth, read without executing anything it carries."""
    import torch
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
