"""reference_model/tokenizer.py == sentencepiece, on the real Llama 2 tokenizer.model.

The fixture is built once (harness.core.real_tokenizer, cached under $LLAMA_PARITY_CACHE or
~/.cache/llama-parity/tokenizer); the first run downloads the llama-cpp-python sdist (~77 MB).
"""
from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import pytest
import sentencepiece as spm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from harness.core import real_tokenizer as fixtures
from reference_model.tokenizer import Tokenizer, TokenizerFileError, utf8_with_replacement

ROOT = Path(__file__).resolve().parent.parent
# the ModelProto module the installed transformers uses (importing sentencepiece's copy first would
# make 4.31-4.44 tokenizers fail to load in the rest of this test process)
pb = fixtures.model_proto_module()


@pytest.fixture(scope="session")
def tokenizer_model() -> Path:
    cache = os.environ.get("LLAMA_PARITY_CACHE")
    return fixtures.ensure_tokenizer_model(Path(cache) / "tokenizer" if cache else None)


@pytest.fixture(scope="session")
def ref(tokenizer_model) -> Tokenizer:
    return Tokenizer(tokenizer_model)


@pytest.fixture(scope="session")
def sp(tokenizer_model) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(tokenizer_model))


# --- the fixture ----------------------------------------------------------------------------------

def test_fixture_provenance(tokenizer_model):
    prov = json.loads((tokenizer_model.parent / fixtures.PROVENANCE_FILE).read_text(encoding="utf-8"))
    assert prov["source"]["sdist_sha256"] == fixtures.SDIST_SHA256
    assert prov["gguf_sha256"] == fixtures.GGUF_SHA256
    assert prov["n_pieces"] == 32000 and prov["verified"]["all_equal"]
    import hashlib
    assert hashlib.sha256(tokenizer_model.read_bytes()).hexdigest() == prov["tokenizer_model_sha256"]
    assert "MIT" in prov["licence"] and "Llama 2 Community License" in prov["licence"]


def test_fixture_is_llama2(tokenizer_model, sp):
    m = pb.ModelProto()
    m.ParseFromString(tokenizer_model.read_bytes())
    assert m.trainer_spec.model_type == pb.TrainerSpec.BPE and m.trainer_spec.byte_fallback
    assert m.normalizer_spec.name == "identity" and not m.normalizer_spec.remove_extra_whitespaces
    assert (sp.vocab_size(), sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (32000, 0, 1, 2, -1)
    # Independent expected ids (Llama 2's documented encodings, not from the .out file).
    assert sp.encode("Hello world") == [15043, 3186]
    assert sp.encode(" Hello") == [29871, 15043]


def test_cached_fixture_is_reused_and_damage_rebuilt(tmp_path, tokenizer_model, monkeypatch):
    """A cache with a damaged tokenizer.model is rebuilt; an intact one is returned as is."""
    d = tmp_path / "tok"
    d.mkdir()
    for name in (fixtures.MODEL_FILE, fixtures.INP_FILE, fixtures.OUT_FILE, fixtures.PROVENANCE_FILE):
        (d / name).write_bytes((tokenizer_model.parent / name).read_bytes())
    built = []
    monkeypatch.setattr(fixtures, "build", lambda cache_dir: built.append(cache_dir) or cache_dir / "x")
    assert fixtures.ensure_tokenizer_model(d) == d / fixtures.MODEL_FILE and not built
    (d / fixtures.MODEL_FILE).write_bytes(b"damaged")
    fixtures.ensure_tokenizer_model(d)
    assert built == [d]


def test_vectors_parse_and_format():
    inp = "a\n__ggml_vocab_test__\n\n__ggml_vocab_test__\n x\ny\n__ggml_vocab_test__\n".encode()
    out = b" 1 2\n\n 3 4 5\n"
    assert fixtures.parse_vectors(inp, out) == [("a", [1, 2]), ("", []), (" x\ny", [3, 4, 5])]
    from harness.core.errors import InputError
    with pytest.raises(InputError, match="vectors"):
        fixtures.parse_vectors(inp, b" 1\n")
    with pytest.raises(InputError, match="separator"):
        fixtures.parse_vectors(b"no separator", b"")


def test_built_model_fails_loudly_on_a_wrong_vector(tokenizer_model):
    vectors = fixtures.parse_vectors(*(p.read_bytes() for p in (tokenizer_model.parent / fixtures.INP_FILE,
                                                                 tokenizer_model.parent / fixtures.OUT_FILE)))
    fixtures.verify_model(tokenizer_model.read_bytes(), vectors)
    text, ids = vectors[0]
    with pytest.raises(RuntimeError, match="fails 1 of"):
        fixtures.verify_model(tokenizer_model.read_bytes(), [(text, ids + [1])] + vectors[1:])


# --- reference == sentencepiece -------------------------------------------------------------------

def test_meta_interface(ref, sp):
    assert (ref.n_words, ref.bos_id, ref.eos_id, ref.pad_id) == (sp.vocab_size(), 1, 2, -1)
    assert ref.encode("Hello world", bos=True, eos=True) == [1, 15043, 3186, 2]
    assert ref.decode([1, 15043, 3186, 2]) == "Hello world"
    assert ref.id_to_piece(15043) == "▁Hello"
    with pytest.raises(IndexError):
        ref.decode([32000])


def test_every_shipped_vector(ref, sp, tokenizer_model):
    vectors = fixtures.load_vectors(tokenizer_model.parent)
    assert len(vectors) == 46
    for text, ids in vectors:
        assert ref.encode(text, bos=False, eos=False) == ids, text
        assert ref.decode(ids) == sp.decode(ids), text


def test_every_vocabulary_piece(ref, sp):
    """Decode every id alone; encode the text of every NORMAL piece, alone and after a word."""
    for i in range(sp.vocab_size()):
        assert ref.decode([i]) == sp.decode([i]), i
        if ref.types[i] == 1:
            text = sp.id_to_piece(i).replace("▁", " ")
            assert ref.encode(text, False, False) == sp.encode(text), (i, text)
            assert ref.encode("x" + text, False, False) == sp.encode("x" + text), (i, text)


def test_whole_catalogue(ref, sp):
    from harness.suites.tokenizer.catalogue import load_catalogue
    cat = load_catalogue()
    assert len(cat.encode) >= 40
    for case in cat.encode:
        t = case["text"]
        assert ref.encode(t, False, False) == sp.encode(t), case["name"]
        assert ref.decode(sp.encode(t)) == sp.decode(sp.encode(t)), case["name"]
    for case in cat.decode:
        ids = case["ids"] if "ids" in case else [sp.piece_to_id(p) for p in case["pieces"]]
        assert ref.decode(ids) == sp.decode(ids), case["name"]


def test_long_english_text_word_cache_and_whole_string_agree(ref, sp):
    """The per-word fast path and one BPE over the whole string give sentencepiece's ids."""
    from pydoc_data.topics import topics
    text = "\n\n".join(topics[k] for k in sorted(topics)[:40])
    ids = sp.encode(text)
    assert ref.encode(text, False, False) == ids
    whole = ref._ids(ref._bpe(ref.normalize(text[:3000])))
    assert whole == sp.encode(text[:3000])


UNICODE = st.text(st.characters(codec="utf-8"), max_size=40)
MIXED = st.lists(st.one_of(UNICODE, st.sampled_from([" ", "  ", "\n", "\t", "<s>", "</s>", "▁", "e\u0301", "🦙",
                                                      "\u200d", "123", "Hello", "\x00", "\ufffd"])),
                 max_size=8).map("".join)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.one_of(UNICODE, MIXED))
def test_fuzz_encode_decode(ref, sp, text):
    ids = sp.encode(text)
    assert ref.encode(text, bos=False, eos=False) == ids
    assert ref.decode(ids) == sp.decode(ids)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=st.lists(st.integers(0, 31999) | st.integers(0, 300) | st.sampled_from([29871, 259, 1, 2, 0]),
                    max_size=12))
def test_fuzz_decode_arbitrary_ids(ref, sp, ids):
    assert ref.decode(ids) == sp.decode(ids)


@given(st.binary(max_size=12))
def test_utf8_replacement_is_per_byte(data):
    text = utf8_with_replacement(data)
    try:
        assert text == data.decode("utf-8")
    except UnicodeDecodeError:
        assert "\ufffd" in text
    assert text.count("\ufffd") >= data.decode("utf-8", "replace").count("\ufffd") - data.count(b"\xef\xbf\xbd")


# --- other settings a SentencePiece BPE file may carry --------------------------------------------

def _variant(tokenizer_model: Path, tmp_path: Path, name: str, edit) -> Path:
    m = pb.ModelProto()
    m.ParseFromString(tokenizer_model.read_bytes())
    edit(m)
    path = tmp_path / f"{name}.model"
    path.write_bytes(m.SerializeToString())
    return path


def _no_bytes(m):
    keep = [p for p in m.pieces if p.type != pb.ModelProto.SentencePiece.BYTE]
    del m.pieces[:]
    m.pieces.extend(keep)
    m.trainer_spec.byte_fallback = False


def _user_and_unused(m):
    m.pieces.add(piece="<tool>", score=0.0, type=pb.ModelProto.SentencePiece.USER_DEFINED)
    m.pieces.add(piece="▁a▁b", score=0.0, type=pb.ModelProto.SentencePiece.USER_DEFINED)
    for p in m.pieces:
        if p.piece in ("▁the", "ing", "▁Hello"):
            p.type = pb.ModelProto.SentencePiece.UNUSED


VARIANTS = {
    "no-dummy-prefix": lambda m: setattr(m.normalizer_spec, "add_dummy_prefix", False),
    "remove-extra-whitespaces": lambda m: setattr(m.normalizer_spec, "remove_extra_whitespaces", True),
    "no-byte-fallback": _no_bytes,
    "user-defined-and-unused": _user_and_unused,
}
VARIANT_TEXTS = ["Hello world", "  lead and  inner  spaces  ", "", "   ", "🦙 我爱 \x00 text", "the thing singing",
                 "a <tool> b<tool>c", "x a b y ▁a▁b", " Hello the ring", "\n\tend "]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variants_match_sentencepiece(tokenizer_model, tmp_path, variant):
    path = _variant(tokenizer_model, tmp_path, variant, VARIANTS[variant])
    ref, sp = Tokenizer(path), spm.SentencePieceProcessor(model_file=str(path))
    for text in VARIANT_TEXTS:
        ids = sp.encode(text)
        assert ref.encode(text, False, False) == ids, (variant, text)
        assert ref.decode(ids) == sp.decode(ids), (variant, text)
    for i in range(0, sp.vocab_size(), 7):
        assert ref.decode([i, i]) == sp.decode([i, i]), (variant, i)


# --- malformed files ------------------------------------------------------------------------------

def test_no_forbidden_imports():
    tree = ast.parse((ROOT / "reference_model" / "tokenizer.py").read_text(encoding="utf-8"))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0] if node.level == 0 else "<relative>")
        elif isinstance(node, ast.Call) and getattr(node.func, "id", "") in ("__import__", "import_module"):
            pytest.fail("dynamic import in reference_model/tokenizer.py")
    assert not imported & {"sentencepiece", "transformers", "harness", "lm_eval", "tokenizers", "google", "<relative>"}


@pytest.mark.parametrize("data, match", [
    (b"", "no pieces"),
    (b"\x0a\x09\x0a\x03abc", "claims 9 bytes"),
    (b"\x0a", "truncated varint"),
    (b"\x08" + b"\xff" * 11, "longer than 10 bytes"),
    (b"\x0b", "wire type 3"),
    (b"\x00", "field number 0"),
    (b"\x0a\x02\x0a\x00", "empty or missing"),
    (b"\x0a\x03\x15\x00\x00", "truncated fixed32"),
    (b"\x0a\x05\x0a\x01a\x18\x09", "type 9"),
    (b"\x0a\x03\x0a\x01\xff", "not valid UTF-8"),
    (b"\x0a\x05\x0a\x01a\x18\x02\x12\x02\x18\x01", "UNIGRAM"),
    (b"\x0a\x03\x0a\x01a\x12\x02\x18\x02", "0 pieces of type UNKNOWN"),
    (b"\x0a\x05\x0a\x01a\x18\x02\x0a\x05\x0a\x01a\x18\x01\x12\x02\x18\x02", "repeats piece 0"),
    (b"\x0a\x05\x0a\x01a\x18\x02\x0a\x08\x0a\x04<0x>\x18\x06\x12\x05\x18\x02\x98\x02\x01", "<0xNN>"),
    (b"\x0a\x05\x0a\x01a\x18\x02\x0a\x0a\x0a\x06<0x41>\x18\x06\x12\x02\x18\x02", "byte_fallback is off"),
    (b"\x0a\x05\x0a\x01a\x18\x02\x12\x02\x18\x02\x1a\x03\x12\x01x", "character map"),
    (b"\x0a\x05\x0a\x01a\x18\x02\x12\x05\x18\x02\xc0\x01\x01", "treat_whitespace_as_suffix"),
    (b"\x12\x02\x18\x02", "no pieces"),
    (b"\x0d\x00\x00\x00\x00", "wire type 5, expected 2"),
])
def test_malformed_files_name_file_and_offset(tmp_path, data, match):
    path = tmp_path / "bad.model"
    path.write_bytes(data)
    with pytest.raises(TokenizerFileError, match=match) as e:
        Tokenizer(path)
    assert str(path) in str(e.value)
    assert isinstance(e.value, ValueError)


def test_minimal_valid_file_loads(tmp_path):
    path = tmp_path / "tiny.model"
    path.write_bytes(b"\x0a\x05\x0a\x01a\x18\x02\x0a\x03\x0a\x01b\x12\x02\x18\x02")
    tok = Tokenizer(path)
    assert tok.n_words == 2 and tok.unk_id == 0 and tok.bos_id == -1
    assert tok.encode("bb", False, False) == [0, 1, 1]     # '▁' is unknown here: no byte fallback


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_raise_only_tokenizer_file_error(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("rnd") / "x.model"
    path.write_bytes(data)
    try:
        Tokenizer(path)
    except TokenizerFileError as e:
        assert str(path) in str(e)


@pytest.fixture(scope="session")
def model_bytes(tokenizer_model) -> bytes:
    return tokenizer_model.read_bytes()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(0, 10**9), flips=st.lists(st.tuples(st.integers(0, 10**9), st.integers(0, 255)), max_size=3))
def test_truncated_or_mutated_real_file(tmp_path_factory, model_bytes, cut, flips):
    """Either a clean TokenizerFileError, or a model that sentencepiece also loads and agrees with."""
    data = bytearray(model_bytes[: cut % (len(model_bytes) + 1)])
    for pos, val in flips:
        if data:
            data[pos % len(data)] = val
    path = tmp_path_factory.mktemp("cut") / "x.model"
    path.write_bytes(bytes(data))
    try:
        ref = Tokenizer(path)
    except TokenizerFileError as e:
        assert str(path) in str(e)
        return
    sp = spm.SentencePieceProcessor(model_file=str(path))
    for text in ("Hello world", " a  b ", "🦙"):
        assert ref.encode(text, False, False) == sp.encode(text)
