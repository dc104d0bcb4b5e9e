"""The environment block of every summary: what a rerun must match to give the same numbers."""
from __future__ import annotations

import hashlib
import importlib.util
import platform
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Any

from harness.core import ROOT, mkl, releases
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


# The installed files whose code decides a Llama's logits and a tokenizer's ids, per package (globs under
# the package folder). A resumed run keys on their content, not on a version string: an editable
# install, a local patch or a vendored fix changes the code and leaves the version as it was.
CODE_FILES = {
    "transformers": ("models/llama/*.py", "modeling_utils.py", "modeling_rope_utils.py",
                     "modeling_attn_mask_utils.py", "masking_utils.py", "cache_utils.py",
                     "modeling_flash_attention_utils.py", "modeling_layers.py", "pytorch_utils.py",
                     "activations.py", "integrations/*attention*.py", "integrations/tensor_parallel.py",
                     "configuration_utils.py", "generation/utils.py", "tokenization_utils*.py",
                     "convert_slow_tokenizer.py", "core_model_loading.py"),
    "tokenizers": ("*.py", "*.so", "*.pyd", "**/*.py"),
    "sentencepiece": ("*.py", "*.so", "*.pyd"),
}


def package_dir(name: str) -> Path | None:
    """Where a package is installed, found without importing it (None: not installed)."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    locations = list(spec.submodule_search_locations or []) if spec else []
    return Path(locations[0]) if locations else None


def code_sha256(packages: tuple[str, ...] = ("transformers", "tokenizers", "sentencepiece")) -> dict[str, str | None]:
    """sha256 of each package's files that define Llama, attention, masks, caches and tokenizers
    (CODE_FILES): what a journaled group's key holds so that changed code is never resumed from.
    Each file is read again when its stat changes, so a file edited in place is seen."""
    out: dict[str, str | None] = {}
    for name in packages:
        root = package_dir(name)
        if root is None:
            out[name] = None
            continue
        files = sorted({f for pattern in CODE_FILES.get(name, ("**/*.py",)) for f in root.glob(pattern)
                        if f.is_file()})
        h = hashlib.sha256()
        for f in files:
            h.update(f.relative_to(root).as_posix().encode() + b"\0" + _file_digest(f) + b"\0")
        out[name] = h.hexdigest()[:32]
    return out


_DIGESTS: dict[tuple, bytes] = {}


def _file_digest(f: Path) -> bytes:
    """A file's sha256, read again whenever its size, mtime, ctime or inode change (an edit in place)."""
    try:
        st = f.stat()
        key = (str(f), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
        if key not in _DIGESTS:
            _DIGESTS[key] = hashlib.sha256(f.read_bytes()).digest()
        return _DIGESTS[key]
    except OSError as e:                  # unreadable: its error still keys the code
        return f"unreadable: {e.strerror}".encode()


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
        "code_sha256": code_sha256(),
        "device": device,
        "torch_threads": torch.get_num_threads(),
        # MKL's code branch (harness/core/mkl.py): `train` pins COMPATIBLE, the others run MKL's default (OFF)
        "mkl_branch": mkl.describe(),
        "cuda": torch.version.cuda,
        "dtype_support": dtype_support(device),
        # What would make two runs with the same seed differ: the CPU's kernels (threads, ISA),
        # the torch build, MKL's scheduling, and on CUDA non-deterministic reductions.
        "determinism_note": ("Same seed, inputs, torch build, thread count, MKL branch and device give the same "
                             "numbers in one process; across processes CPU kernels may differ in the last bits "
                             "(seen: a KL near 1e-13 moving in its 5th digit), and on MKL's default branch a "
                             "process running beside this one once moved a train cell's float32 gradients."),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return env
