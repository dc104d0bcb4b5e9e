"""What the in-process subjects share: their options checked as bad input, the versions they record,
the folder a build is cached in, and the way back from a model's (dequantised) weights to Meta's
layout for the error split.

The error split: a lossy subject's error against the oracle is part weight quantisation and part
its runtime's own arithmetic (activations quantised inside the kernels, a low-precision cache). The
oracle run on the subject's *dequantised* weights isolates the first; ``dequantised()`` on a
subject returns those weights in Meta's layout (``reference_model.checkpoint.Checkpoint.state``)
or None where the subject is not lossy.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Iterator

import torch

from harness.core.errors import InputError
from harness.subjects import NotInstalledError, Source, Spec


class Options:
    """A subject's key=value options, each read once with its check; what is left unread is unknown.

        o = Options("transformers", options)
        attn = o.choice("attn", ("eager", "sdpa"), "eager")
        o.done()                      # exit 2 naming any option the subject does not know
    """

    def __init__(self, kind: str, options: dict[str, str]):
        self.kind, self.left = kind, dict(options)
        self.label = Spec(kind, {k: getattr(v, "name", v) for k, v in options.items()}).label()
        self.known: list[str] = []

    def _take(self, key: str) -> str | None:
        self.known.append(key)
        return self.left.pop(key, None)

    def choice(self, key: str, allowed: tuple[str, ...], default: str) -> str:
        value = self._take(key)
        if value is None:
            return default
        if value not in allowed:
            raise InputError(f"--subject {self.label}: {key}={value!r} (choose from {', '.join(allowed)})")
        return value

    def flag(self, key: str, default: bool = False) -> bool:
        return self.choice(key, ("0", "1"), "1" if default else "0") == "1"

    def integer(self, key: str, default: int, low: int = 1, high: int = 4096) -> int:
        value = self._take(key)
        if value is None:
            return default
        if not value.isdigit() or not low <= int(value) <= high:
            raise InputError(f"--subject {self.label}: {key}={value!r} must be an integer in {low}..{high}")
        return int(value)

    def text(self, key: str) -> str | None:
        return self._take(key)

    def internal(self, key: str, command: str):
        """A value only a command hands over (a device map, a folder), never a spec's key=value: a
        string here came from the user and is exit 2 naming the command that sets it."""
        value = self.left.pop(key, None)
        if isinstance(value, str):
            raise InputError(f"--subject {self.label}: {key} is set by {command}, not key=value")
        return value

    def done(self) -> None:
        if self.left:
            raise InputError(f"--subject {self.label}: unknown option(s) {', '.join(sorted(self.left))} "
                             f"for {self.kind} (known: {', '.join(self.known)})")


def package_versions(*names: str) -> dict[str, str | None]:
    """Installed distribution versions (None: not installed)."""
    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def has_module(module: str) -> bool:
    """Whether a module can be imported, without importing it (a dotted name whose parent package
    is absent, e.g. optimum.quanto without optimum, is absent too rather than an error)."""
    import importlib.util
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def require(kind: str, module: str, dist: str, extra: str) -> None:
    """Exit 2 naming the package when an optional subject's package is not installed."""
    if not has_module(module):
        raise NotInstalledError(f"--subject {kind}: needs the {dist} package (pip install 'llama-parity[{extra}]')")


def cache_key(source: Source, tool: dict[str, Any]) -> str:
    """The folder name of a build: the weights' fingerprint and everything the tool's output depends on."""
    from harness.core.store import fingerprint
    return fingerprint({"weights": source.fingerprint, "tool": tool})


@contextmanager
def built(folder: Path) -> Iterator[Path | None]:
    """A cached build folder: yields None when ``folder`` is complete (nothing to do), else a
    temporary folder beside it to build into, renamed into place only when the build finished, so
    an interrupted build is never mistaken for a finished one."""
    if (folder / "BUILT").is_file():
        yield None
        return
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        yield tmp
        (tmp / "BUILT").write_text("")
        if folder.exists():         # an unfinished build of another process: ours replaces it
            shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")


def source_of(folder, ckpt=None, cache: Path | None = None, hf_path=None, tokenizer: Path | None = None,
              find_tokenizer: bool = True) -> Source:
    """The Source of a model folder (harness.core.checkpoints.ModelFolder), the one way every caller
    (the logits suite, the benchmarks, the tests) makes it, so that builds cached by the weights'
    fingerprint are shared. ``hf_path``: a caller's own HF folder maker (made on first call);
    ``tokenizer``: the folder's tokenizer.model by default, else the Llama 2 fixture for a
    32000-piece vocabulary (``find_tokenizer=False``: none, for callers whose subjects read no text)."""
    from harness.core import cache_dir
    from harness.core.checkpoints import HFFolder
    from harness.core.store import fingerprint
    ckpt = ckpt if ckpt is not None else folder.load()
    holder: list = []

    def own_hf_path() -> Path:
        if not holder:
            holder.append(HFFolder(ckpt))
        return holder[0].path

    if tokenizer is None and find_tokenizer and (folder.path / "tokenizer.model").is_file():
        tokenizer = folder.path / "tokenizer.model"
    if tokenizer is None and find_tokenizer and ckpt.args.vocab_size == 32000:
        from harness.core.real_tokenizer import ensure_tokenizer_model
        tokenizer = ensure_tokenizer_model()
    return Source(ckpt=ckpt, fingerprint=fingerprint(folder.fingerprint()), hf_path=hf_path or own_hf_path,
                  tokenizer=tokenizer, cache=cache or cache_dir() / "subjects")


def meta_state(hf_state: dict[str, torch.Tensor], args) -> dict[str, torch.Tensor]:
    """An HF-layout state dict (q/k permuted) as Meta's layout, float32 on the CPU."""
    from reference_model.convert import hf_to_meta_state
    return hf_to_meta_state({k: v.detach().to("cpu", torch.float32) for k, v in hf_state.items()}, args)


def dequantised_checkpoint(ckpt, weights):
    """The checkpoint a lossy subject really computes with, for the oracle that measures the weights'
    share alone: ``dequantised()`` gives a Checkpoint (llama.cpp) or a Meta-layout state dict (the
    torch kinds); None where there is nothing to split."""
    from dataclasses import replace

    from reference_model.checkpoint import Checkpoint
    if weights is None or isinstance(weights, Checkpoint):
        return weights
    return replace(ckpt, state=weights)
