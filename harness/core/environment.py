"""The environment block of every summary: what a rerun must match to give the same numbers."""
from __future__ import annotations

import hashlib
import platform
import subprocess
from functools import lru_cache
from typing import Any

from harness.core import ROOT, releases
import torch


def _git_commit() -> str | None:
    root = ROOT
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


@lru_cache(maxsize=None)
def source_sha256() -> str:
    """The harness's own code (harness/ and reference_model/ sources), hashed: a resumed run must
    not reuse rows computed by other code, also where there is no git checkout to name a commit."""
    h = hashlib.sha256()
    for pkg in ("harness", "reference_model"):
        for f in sorted((ROOT / pkg).rglob("*.py")):
            h.update(f.relative_to(ROOT).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:32]


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version
        return version(module)
    except Exception:
        return None


def dtype_support(device: str) -> dict[str, bool]:
    """Whether a small matmul runs at each dtype on the device (CPU half works in torch >= 2.1)."""
    support = {}
    for name in ("float32", "bfloat16", "float16", "float64"):
        dtype = getattr(torch, name)
        try:
            a = torch.ones(4, 4, dtype=dtype, device=device)
            (a @ a).sum().item()
            support[name] = True
        except Exception:
            support[name] = False
    return support


def environment(device: str = "cpu") -> dict[str, Any]:
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "tokenizers": _version("tokenizers"),
        "lm_eval": _version("lm_eval"),
        # suites/releases.toml: a release not on the list gets the banner at the top of every view
        "transformers_tested": releases.is_tested(_version("transformers")),
        "tested_releases": ", ".join(releases.tested()),
        "sentencepiece": _version("sentencepiece"),
        "numpy": _version("numpy"),
        "harness_commit": _git_commit(),
        "harness_source_sha256": source_sha256(),
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda,
        "dtype_support": dtype_support(device),
        # What would make two runs with the same seed differ: the CPU's kernels (threads, ISA),
        # the torch build, and on CUDA non-deterministic reductions.
        "determinism_note": ("Same seed, inputs, torch build, thread count and device give the same numbers in "
                             "one process; across processes CPU kernels may differ in the last bits (seen: "
                             "a KL near 1e-13 moving in its 5th digit)."),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return env
