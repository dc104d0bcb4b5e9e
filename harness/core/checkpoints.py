"""The one way into a model folder, for every command (logits, stream, place, bench, ...).

``open_model`` checks what can be checked before a weight is read: the folder exists, it holds
exactly one set of weights, its config is a valid Llama 2 config. The weights are then read
either whole (``ModelFolder.load``: the strict importer of reference_model.checkpoint, every
tensor accounted for) or one tensor at a time from memory-mapped files (``ModelFolder.lazy``,
for streaming), with the same shape checks. ``fingerprint`` is what the weights *are* (content
hashes, cached per file), so a resumed run never mistakes a copy with other values for the model
it measured.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from harness.core.errors import InputError
from reference_model import checkpoint as ckpt_io
from reference_model.checkpoint import Checkpoint
from reference_model.convert import expected_meta_shapes, meta_to_hf_key, permute, unpermute
from reference_model.errors import CheckpointError
from reference_model.model import ModelArgs

# Files that each hold a complete set of weights by themselves (Meta shards count as one set).
_WEIGHT_SETS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
_META_SHARD = re.compile(r"^consolidated\.\d+\.pth$")


def weight_sets(path: Path) -> list[str]:
    """The sets of weights a folder holds, by the file that names each (Meta shards as one)."""
    names = {p.name for p in path.iterdir() if p.is_file()}
    found = [n for n in _WEIGHT_SETS if n in names]
    # A sharded index names its shards; a lone model-00001-of-00002.safetensors without it is not a set.
    meta = sorted(n for n in names if _META_SHARD.match(n))
    if meta:
        found.insert(0, "consolidated.*.pth" if len(meta) > 1 else meta[0])
    return found


@dataclass
class ModelFolder:
    path: Path
    format: str                  # "meta" or "hf"
    args: ModelArgs              # validated; vocab_size filled in
    stored_bytes: int = 0        # the weight files' sizes, summed

    def load(self, vocab_size: int | None = None) -> Checkpoint:
        """Every tensor, checked against the config (reference_model's strict importer)."""
        return ckpt_io.load(self.path, vocab_size=vocab_size)

    def lazy(self) -> "LazyWeights":
        return LazyWeights(self)

    def fingerprint(self) -> list[list]:
        """[name, size, sha256] of every file that decides the weights or the config."""
        files = sorted(p for p in self.path.iterdir() if p.is_file() and _decides_model(p.name))
        return [[p.name, p.stat().st_size, file_sha256(p)] for p in files]


def _decides_model(name: str) -> bool:
    return (name in ("params.json", "config.json", *_WEIGHT_SETS) or bool(_META_SHARD.match(name))
            or name.endswith((".safetensors", ".bin")))


def open_model(value: str | Path | None, arg: str = "--model", vocab_size: int | None = None) -> ModelFolder:
    """A model folder checked up to its config; None is the embedded default."""
    if value is None:
        from harness.core.presets import default_model
        path = default_model()
    else:
        from harness.core.inputs import path_arg
        from harness.core.inputs import path_problem
        path = path_arg(arg, value)
        if problem := path_problem(path, "folder"):
            raise InputError(f"{arg}: {path}: {'no such file or folder' if problem == 'no such folder' else problem}")
    fmt = ckpt_io.detect_format(path)
    sets = weight_sets(path)
    if len(sets) > 1:
        raise InputError(f"{arg}: {path} holds two sets of weights ({' and '.join(sets)}): the reference and "
                         "transformers could read different ones; keep one")
    if fmt == "hf" and (path / "params.json").exists():
        raise InputError(f"{arg}: {path} holds both params.json (Meta) and config.json (Hugging Face); keep one")
    if fmt == "meta":
        args = ckpt_io.load_meta_args(path, vocab_size)
        if args.vocab_size == -1:
            first = ckpt_io.meta_shard_files(path)
            rows = ckpt_io.torch_load(first[0]).get("tok_embeddings.weight")
            if rows is None:
                raise CheckpointError(str(first[0]), "tok_embeddings.weight", "missing tensor")
            args.vocab_size = rows.shape[0]
        from reference_model.convert import validate_args
        validate_args(args, str(path / "params.json"))
    else:
        from reference_model.convert import check_vocab, hf_config_to_args
        config = ckpt_io.read_json(path / "config.json")
        args = hf_config_to_args(config, str(path / "config.json"))
        check_vocab(args, vocab_size, str(path / "config.json"))
        ckpt_io.hf_weight_files(path)      # an index that points elsewhere is refused here
    files = ckpt_io.meta_shard_files(path) if fmt == "meta" else ckpt_io.hf_weight_files(path)[0]
    from harness.core.inputs import path_problem
    for f in files:                      # a link that loops or dangles, a FIFO: named, not summed as 0 bytes
        if f.exists() or f.is_symlink():
            if problem := path_problem(f):
                raise InputError(f"{arg}: {f}: {problem}")
    stored = sum(f.stat().st_size for f in files if f.is_file())
    from harness.core.resources import check_files
    check_files(args, stored, str(path / ("params.json" if fmt == "meta" else "config.json")))
    return ModelFolder(path, fmt, args, stored)


# --- content hashes, computed once per file ------------------------------------------------------

def _hash_cache() -> Path | None:
    """Where hashes are remembered; None when the cache folder is unusable (a run that needs nothing
    else from the cache goes on, hashing again; one that does is refused naming the variable)."""
    from harness.core import cache_dir
    try:
        return cache_dir() / "file-hashes.json"
    except InputError:
        return None


def file_sha256(path: Path, chunk: int = 16 << 20) -> str:
    """sha256 of a file, cached under the file's identity (device, inode, size, mtime, ctime):
    a copy, a rewrite or a touch-and-restore (ctime moves) all hash again."""
    st = path.stat()
    key = f"{os.path.realpath(path)}|{st.st_dev}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}"
    cache_file = _hash_cache()
    try:
        if cache_file is None:
            raise FileNotFoundError
        cache = json.loads(cache_file.read_text(encoding="utf-8"))
        if not isinstance(cache, dict):
            cache = {}
    except (OSError, ValueError, RecursionError):
        cache = {}
    if isinstance(cache.get(key), str):
        return cache[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    digest = h.hexdigest()
    cache = {k: v for k, v in cache.items() if os.path.exists(k.split("|", 1)[0])}   # forget deleted files
    cache[key] = digest
    try:
        from harness.core.store import atomic_write_text
        if cache_file is not None:
            atomic_write_text(cache_file, json.dumps(cache, indent=0) + "\n")
    except OSError:
        pass   # a read-only cache only costs the hash again next time
    return digest


# --- one tensor at a time ------------------------------------------------------------------------

_QK = ("attention.wq.weight", "attention.wk.weight")


class LazyWeights:
    """Tensors of a checked folder by Meta key, read one at a time from memory-mapped files
    (safetensors through ``safe_open``, ``.pth``/``.bin`` through ``torch.load(mmap=True,
    weights_only=True)``), with the importer's shape checks and Meta's shard table."""

    def __init__(self, folder: ModelFolder):
        self.folder, self.path, self.args = folder, folder.path, folder.args
        self.format = folder.format
        self.shapes = expected_meta_shapes(self.args)
        self._open: dict[Path, object] = {}
        if self.format == "meta":
            self.files = ckpt_io.meta_shard_files(self.path)
        else:
            files, _, _ = ckpt_io.hf_weight_files(self.path)
            self._where: dict[str, Path] = {}
            for f in files:
                if not f.is_file():
                    raise CheckpointError(str(f), None, "file not found")
                for key in self._keys(f):
                    if key in self._where:
                        raise CheckpointError(str(f), key, "tensor appears in more than one file")
                    self._where[key] = f
            self.close()

    # Files are mapped for one block at a time and closed after it: a mapping kept open would
    # keep every page read so far resident, and the peak would grow to the whole checkpoint.
    def _file(self, f: Path):
        if f not in self._open:
            if f.suffix == ".safetensors":
                from safetensors import safe_open
                try:
                    self._open[f] = safe_open(str(f), framework="pt", device="cpu")
                except Exception as e:
                    raise CheckpointError(str(f), None, f"unreadable safetensors ({type(e).__name__}: {e})") from None
            else:
                self._open[f] = ckpt_io.torch_load(f)
        return self._open[f]

    def _keys(self, f: Path) -> list[str]:
        return list(self._file(f).keys())

    def close(self) -> None:
        self._open.clear()

    def raw(self, meta_key: str) -> torch.Tensor:
        """The tensor in the file's own layout (HF: permuted q/k), shape-checked."""
        if self.format == "meta":
            parts = []
            for f in self.files:
                shard = self._file(f)
                if meta_key not in shard:
                    raise CheckpointError(str(f), meta_key, "missing tensor")
                ckpt_io.check_tensor(str(f), meta_key, shard[meta_key])   # before torch.equal/cat see it
                parts.append(shard[meta_key])
            dim = ckpt_io.shard_dim(meta_key)
            if dim is None:
                for f, p in zip(self.files[1:], parts[1:]):
                    if p.shape != parts[0].shape or not torch.equal(p, parts[0]):
                        raise CheckpointError(str(f), meta_key, "replicated tensor differs from shard 0")
                w = parts[0]
            else:
                try:
                    w = parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)
                except RuntimeError:
                    raise CheckpointError(str(self.files[-1]), meta_key, "shard shapes do not concatenate: "
                                          f"{[tuple(p.shape) for p in parts]} on dim {dim}") from None
        else:
            hf_key = meta_to_hf_key(meta_key)
            if hf_key not in self._where:
                raise CheckpointError(str(self.path), hf_key, "missing tensor")
            handle = self._file(self._where[hf_key])
            w = handle.get_tensor(hf_key) if hasattr(handle, "get_tensor") else handle[hf_key]
        if tuple(w.shape) != self.shapes[meta_key]:
            raise CheckpointError(str(self.path), meta_key, f"shape {tuple(w.shape)}, expected {self.shapes[meta_key]}")
        ckpt_io.check_tensor(str(self.path), meta_key, w)
        return w

    def block(self, layer: int, dtype: torch.dtype, device: str) -> tuple[dict, dict]:
        """(Meta-layout state, HF-layout state) of one block, cast once; only q/k differ."""
        if not 0 <= layer < self.args.n_layers:
            raise InputError(f"layer {layer}: the checkpoint has {self.args.n_layers} layers")
        meta, hf = {}, {}
        for key in (k for k in self.shapes if k.startswith(f"layers.{layer}.")):
            w = self.raw(key).to(device=device, dtype=dtype)
            suffix = key.split(".", 2)[2]
            local_hf = meta_to_hf_key(key).split(f"layers.{layer}.", 1)[1]
            if suffix in _QK:
                n = self.args.n_heads if suffix == _QK[0] else self.args.kv_heads
                native, other = (w, permute(w, n)) if self.format == "meta" else (unpermute(w, n), w)
                meta[suffix], hf[local_hf] = native.contiguous(), other.contiguous()
            else:
                meta[suffix] = hf[local_hf] = w
        self.close()
        return meta, hf

    def tensor(self, meta_key: str) -> torch.Tensor:
        w = self.raw(meta_key)
        self.close()
        return w


# --- the HF folder transformers loads ------------------------------------------------------------

# --- scratch folders: converted weights in the temp folder, removed also after a kill -------------

SCRATCH_OWNER = ".llama-parity-owner"     # inside every scratch folder: "pid start-time" of its process


def _process_start(pid: int) -> str | None:
    """The kernel's start time of a process (field 22 of /proc/PID/stat), so that a reused pid is not
    taken for the run that made a folder; None when the process is gone (or there is no /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _owner_alive(marker: Path) -> bool:
    try:
        pid_text, start = marker.read_text().split()
        pid = int(pid_text)
    except (OSError, ValueError):
        return False                     # unreadable or torn: written by a run killed at birth
    if not Path("/proc").is_dir():       # no way to tell: keep it
        return True
    return _process_start(pid) == start


def remove_stale_scratch(root: Path | None = None) -> list[Path]:
    """Remove scratch folders (converted weights) that runs killed before their cleanup left in the
    temp folder: only folders holding the harness's owner marker, and only when the process it
    names is gone. Returns what was removed."""
    import shutil
    root = Path(root or tempfile.gettempdir())
    removed = []
    try:
        candidates = list(root.glob("llama-parity-*"))
    except OSError:
        return removed
    for folder in candidates:
        marker = folder / SCRATCH_OWNER
        if folder.is_symlink() or not marker.is_file() or _owner_alive(marker):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


def scratch(prefix: str) -> tempfile.TemporaryDirectory:
    """A temporary folder marked as this process's (SCRATCH_OWNER), so that a later run removes it if
    this one is SIGKILLed; SIGTERM and SIGINT unwind through the caller's cleanup (harness.cli)."""
    remove_stale_scratch()
    tmp = tempfile.TemporaryDirectory(prefix=prefix)
    pid = os.getpid()
    (Path(tmp.name) / SCRATCH_OWNER).write_text(f"{pid} {_process_start(pid) or '-'}\n")
    return tmp


class HFFolder:
    """An HF folder for transformers: the user's own, or one converted from a Meta checkpoint by
    the harness's converter (the same conversion a user would run) into a temporary folder."""

    def __init__(self, ckpt: Checkpoint):
        self._tmp = None
        if ckpt.source == "hf":
            self.path = ckpt.path
        else:
            self._tmp = scratch("llama-parity-hf-")
            try:
                self.path = ckpt_io.save_hf(Path(self._tmp.name) / "hf", ckpt.args, ckpt.state)
            except BaseException:
                self._tmp.cleanup()
                raise

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> "HFFolder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
