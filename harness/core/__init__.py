"""The engine's foundation: inputs, checkpoints, subjects, cases, metrics, tolerance, store.

Imports reference_model only and knows no suite. ``ROOT`` is the checkout (``suites/`` and
``models/`` live beside ``harness/``); every data file is found from here, nowhere else.
"""
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SUITES = ROOT / "suites"


def cache_dir() -> Path:
    """Built fixtures and generated models: $LLAMA_PARITY_CACHE, else ~/.cache/llama-parity."""
    return Path(os.environ.get("LLAMA_PARITY_CACHE") or Path.home() / ".cache" / "llama-parity")
