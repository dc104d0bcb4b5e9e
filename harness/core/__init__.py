"""The engine's foundation: inputs, checkpoints, subjects, cases, metrics, tolerance, store.

Imports reference_model only and knows no suite. ``ROOT`` is the checkout (``suites/`` and
``models/`` live beside ``harness/``); every data file is found from here, nowhere else.
"""
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SUITES = ROOT / "suites"


def cache_dir() -> Path:
    """Built fixtures and generated models: $LLAMA_PARITY_CACHE, else ~/.cache/llama-parity. A path
    that cannot be a folder (a file, a FIFO, a dangling link on the way) is refused naming the
    variable that chose it, before anything tries to make a folder under it."""
    value = os.environ.get("LLAMA_PARITY_CACHE")
    if value:
        path, chosen = Path(value), f"LLAMA_PARITY_CACHE={value}"
    else:
        path = Path.home() / ".cache" / "llama-parity"
        chosen = f"the cache {path} (LLAMA_PARITY_CACHE is unset; HOME={os.environ.get('HOME', '')})"
    probe = path
    while not (probe.exists() or probe.is_symlink()) and probe.parent != probe:
        probe = probe.parent
    from harness.core.inputs import path_problem
    problem = path_problem(probe, "folder")
    if problem:
        from harness.core.errors import InputError
        raise InputError(f"{chosen}: {probe}: {problem}; point LLAMA_PARITY_CACHE at a folder")
    return path
