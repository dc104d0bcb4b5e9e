"""Llama 2's tokenizer, from scratch: reads a SentencePiece ``tokenizer.model`` and runs its BPE.

No sentencepiece, no transformers: the file is read with the small protobuf wire-format reader
below, and encoding / decoding follow SentencePiece's own rules, which are:

encode  1. normalise: the "identity" normaliser changes no character; optionally strip and squeeze
           spaces (remove_extra_whitespaces), then put one space in front (add_dummy_prefix), then
           write every space as U+2581 "▁" (escape_whitespaces). The empty string stays empty.
        2. BPE: start from single characters (user-defined pieces are matched whole and never
           merged), and repeatedly merge the adjacent pair whose concatenation is the
           highest-scoring piece; ties go to the leftmost pair. A heap holds candidate pairs, a
           linked list the current symbols; a popped pair whose sides have changed is stale and
           skipped (this is SentencePiece's bpe_model.cc, step for step).
        3. ids: a symbol that is not a piece becomes its UTF-8 bytes as ``<0xNN>`` pieces when
           byte_fallback is on, else the unknown id. Control pieces (<s>, </s>) are never matched
           from text: the literal string "<s>" is the five characters it looks like.
decode  byte pieces are gathered and read as UTF-8, an invalid byte giving one U+FFFD; control
        pieces give ""; the unknown piece gives " ⁇ "; "▁" becomes a space, and the first piece's
        leading "▁" is dropped (the dummy prefix), unless text was already produced.

Speed: when no mergeable piece has a "▁" after a non-"▁" character (true of Llama 2), no merge can
cross the start of a word, so the text is cut into words ("▁*" then non-"▁" characters), each word
is merged on its own and the result is cached: the same ids, much faster on real text. A
character that no multi-character piece contains (newline, tab) is a word by itself.

Meta's interface: ``Tokenizer(model_path)``, ``encode(s, bos, eos)``, ``decode(ids)``, ``n_words``,
``bos_id``, ``eos_id``, ``pad_id``.
"""
from __future__ import annotations

import heapq
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

SPACE = "\u2581"                       # "▁", SentencePiece's visible space
UNK_SURFACE = " \u2047 "               # " ⁇ ", what the unknown piece decodes to by default

# SentencePiece.Type
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
# TrainerSpec.ModelType
MODEL_TYPES = {1: "UNIGRAM", 2: "BPE", 3: "WORD", 4: "CHAR"}
BPE = 2

_BYTE_PIECE = re.compile(r"<0x([0-9A-F]{2})>")


class TokenizerFileError(ValueError):
    """A tokenizer.model that cannot be read or is not a model this tokenizer implements."""

    def __init__(self, path: str | Path, offset: int | None, problem: str):
        self.path, self.offset, self.problem = str(path), offset, problem
        at = f" (byte {offset})" if offset is not None else ""
        super().__init__(f"{path}{at}: {problem}")


# --- protobuf wire format: just enough to read sentencepiece_model.proto -------------------------

VARINT, FIXED64, LEN, FIXED32 = 0, 1, 2, 5


class _Wire:
    """Reads the fields of one message in data[start:end]; every error names the file and offset."""

    def __init__(self, data: bytes, path: str):
        self.data, self.path = data, path

    def error(self, offset: int, problem: str) -> TokenizerFileError:
        return TokenizerFileError(self.path, offset, problem)

    def varint(self, pos: int, end: int) -> tuple[int, int]:
        data, start, result, shift = self.data, pos, 0, 0
        while True:
            if pos >= end:
                raise self.error(start, "truncated varint")
            b = data[pos]
            pos += 1
            result |= (b & 0x7F) << shift
            if b < 0x80:
                return result, pos
            shift += 7
            if shift >= 70:
                raise self.error(start, "varint longer than 10 bytes")

    def fields(self, start: int, end: int) -> Iterator[tuple[int, int, int | bytes | tuple[int, int], int]]:
        """(field number, wire type, value, offset of the field's key) for each field."""
        pos, data = start, self.data
        while pos < end:
            at = pos
            key = data[pos]
            if key < 0x80:                    # one-byte keys and lengths: the common case, inlined
                pos += 1
            else:
                key, pos = self.varint(pos, end)
            number, wire = key >> 3, key & 7
            if number == 0:
                raise self.error(at, "field number 0 (not a protobuf message)")
            if wire == VARINT:
                value, pos = self.varint(pos, end)
            elif wire == LEN:
                if pos < end and data[pos] < 0x80:
                    n, pos = data[pos], pos + 1
                else:
                    n, pos = self.varint(pos, end)
                if n > end - pos:
                    raise self.error(at, f"field {number} claims {n} bytes, only {end - pos} left")
                value, pos = (pos, pos + n), pos + n
            elif wire in (FIXED64, FIXED32):
                n = 8 if wire == FIXED64 else 4
                if n > end - pos:
                    raise self.error(at, f"field {number}: truncated fixed{8 * n}")
                value, pos = self.data[pos:pos + n], pos + n
            else:
                raise self.error(at, f"field {number}: wire type {wire} is not valid here")
            yield number, wire, value, at

    def expect(self, number: int, wire: int, want: int, at: int, what: str) -> None:
        if wire != want:
            raise self.error(at, f"{what} (field {number}) has wire type {wire}, expected {want}")

    def string(self, span: tuple[int, int], at: int, what: str) -> str:
        try:
            return self.data[span[0]:span[1]].decode("utf-8")
        except UnicodeDecodeError:
            raise self.error(at, f"{what} is not valid UTF-8") from None


def _int32(v: int) -> int:
    v &= 0xFFFFFFFF                    # protobuf int32: negative values are 10-byte varints
    return v - (1 << 32) if v >= 1 << 31 else v


@dataclass
class ModelFile:
    """What the reader takes from a tokenizer.model (proto2 defaults where a field is absent)."""
    pieces: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    types: list[int] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)     # where each piece starts in the file
    model_type: int = 1                                   # UNIGRAM, the proto default
    byte_fallback: bool = False
    treat_whitespace_as_suffix: bool = False
    unk_piece: str = "<unk>"
    bos_piece: str = "<s>"
    eos_piece: str = "</s>"
    pad_piece: str = "<pad>"
    unk_surface: str = UNK_SURFACE
    normalizer_name: str = ""
    precompiled_charsmap: bytes = b""
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    escape_whitespaces: bool = True
    denormalizer_charsmap: bytes = b""
    at: dict[str, int] = field(default_factory=dict)      # offsets of the specs, for messages


def read_model_file(path: str | Path) -> ModelFile:
    data = Path(path).read_bytes()
    return parse_model_proto(data, str(path))


def parse_model_proto(data: bytes, path: str = "<bytes>") -> ModelFile:
    w, m = _Wire(data, path), ModelFile()
    for number, wire, value, at in w.fields(0, len(data)):
        if number == 1:
            w.expect(number, wire, LEN, at, "ModelProto.pieces")
            _read_piece(w, value, at, m)
        elif number == 2:
            w.expect(number, wire, LEN, at, "ModelProto.trainer_spec")
            m.at["trainer_spec"] = at
            _read_trainer_spec(w, value, m)
        elif number in (3, 5):
            name = "normalizer_spec" if number == 3 else "denormalizer_spec"
            w.expect(number, wire, LEN, at, f"ModelProto.{name}")
            m.at[name] = at
            _read_normalizer_spec(w, value, m, denormalizer=number == 5)
        # other fields (self_test_data, ...) do not change encoding: skipped
    return m


def _read_piece(w: _Wire, span, at: int, m: ModelFile) -> None:
    piece, score, typ = None, 0.0, NORMAL
    for number, wire, value, fat in w.fields(*span):
        if number == 1:
            w.expect(number, wire, LEN, fat, "SentencePiece.piece")
            piece = w.string(value, fat, "SentencePiece.piece")
        elif number == 2:
            w.expect(number, wire, FIXED32, fat, "SentencePiece.score")
            score = struct.unpack("<f", value)[0]
        elif number == 3:
            w.expect(number, wire, VARINT, fat, "SentencePiece.type")
            typ = _int32(value)
            if typ not in (NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE):
                raise w.error(fat, f"piece {len(m.pieces)}: type {typ} is not a SentencePiece type")
    if not piece:
        raise w.error(at, f"piece {len(m.pieces)} is empty or missing")
    m.pieces.append(piece)
    m.scores.append(score)
    m.types.append(typ)
    m.offsets.append(at)


def _read_trainer_spec(w: _Wire, span, m: ModelFile) -> None:
    varints = {3: "model_type", 24: "treat_whitespace_as_suffix", 35: "byte_fallback"}
    strings = {45: "unk_piece", 46: "bos_piece", 47: "eos_piece", 48: "pad_piece", 44: "unk_surface"}
    for number, wire, value, at in w.fields(*span):
        if number in varints:
            w.expect(number, wire, VARINT, at, f"TrainerSpec.{varints[number]}")
            v = _int32(value) if number == 3 else bool(value)
            setattr(m, varints[number], v)
        elif number in strings:
            w.expect(number, wire, LEN, at, f"TrainerSpec.{strings[number]}")
            setattr(m, strings[number], w.string(value, at, f"TrainerSpec.{strings[number]}"))
        # unk_id/bos_id/eos_id/pad_id (40-43) are training settings: at run time SentencePiece
        # finds the special ids by piece (unk: the UNKNOWN piece; bos/eos/pad: *_piece, if CONTROL).


def _read_normalizer_spec(w: _Wire, span, m: ModelFile, denormalizer: bool) -> None:
    bools = {3: "add_dummy_prefix", 4: "remove_extra_whitespaces", 5: "escape_whitespaces"}
    for number, wire, value, at in w.fields(*span):
        if number == 2:
            w.expect(number, wire, LEN, at, "NormalizerSpec.precompiled_charsmap")
            charsmap = w.data[value[0]:value[1]]
            if denormalizer:
                m.denormalizer_charsmap = charsmap
            else:
                m.precompiled_charsmap = charsmap
        elif denormalizer:
            continue
        elif number == 1:
            w.expect(number, wire, LEN, at, "NormalizerSpec.name")
            m.normalizer_name = w.string(value, at, "NormalizerSpec.name")
        elif number in bools:
            w.expect(number, wire, VARINT, at, f"NormalizerSpec.{bools[number]}")
            setattr(m, bools[number], bool(value))


# --- the tokenizer --------------------------------------------------------------------------------

class Tokenizer:
    """A SentencePiece BPE tokenizer (Llama 2's), with Meta's interface."""

    def __init__(self, model_path: str | Path):
        self.path = str(model_path)
        m = read_model_file(model_path)
        self._check(m)
        self._m = m
        self.pieces: list[str] = m.pieces
        self.scores: list[float] = m.scores
        self.types: list[int] = m.types
        self.n_words: int = len(m.pieces)
        self._id = {p: i for i, p in enumerate(m.pieces)}
        # What BPE may merge into: NORMAL, USER_DEFINED and UNUSED pieces (SentencePiece's pieces_).
        self._merge_score = {p: s for p, s, t in zip(m.pieces, m.scores, m.types)
                             if t in (NORMAL, USER_DEFINED, UNUSED)}
        self._unused = {p for p, t in zip(m.pieces, m.types) if t == UNUSED}
        self._user = sorted((p for p, t in zip(m.pieces, m.types) if t == USER_DEFINED), key=len, reverse=True)
        self._user_first = {p[0] for p in self._user}
        self.unk_id: int = m.types.index(UNKNOWN)
        self.bos_id: int = self._control_id(m.bos_piece)
        self.eos_id: int = self._control_id(m.eos_piece)
        self.pad_id: int = self._control_id(m.pad_piece)
        self._byte_id: list[int] = [self._id.get(f"<0x{b:02X}>", self.unk_id) for b in range(256)]
        self._byte_of: dict[int, int] = {i: int(_BYTE_PIECE.fullmatch(p).group(1), 16)
                                         for i, (p, t) in enumerate(zip(m.pieces, m.types)) if t == BYTE}
        # Text can be cut into words, each merged on its own, only if no mergeable piece spans a
        # word start (a "▁" after another character). A character found in no mergeable piece
        # of two or more characters (newline, in Llama 2) can never merge: it is a word by itself.
        word = re.compile(f"{SPACE}*[^{SPACE}]*")
        self._by_word = all(word.fullmatch(p) for p in self._merge_score)
        joinable = "".join(sorted(set("".join(p for p in self._merge_score if len(p) > 1)) - {SPACE}))
        cls = "".join(re.escape(c) for c in joinable)
        self._words = re.compile(f"{SPACE}+[{cls}]*|[{cls}]+|." if cls else f"{SPACE}+|.", re.DOTALL)
        self._cache: dict[str, list[int]] = {}

    def _check(self, m: ModelFile) -> None:
        def err(offset: int | None, problem: str) -> TokenizerFileError:
            return TokenizerFileError(self.path, offset, problem)
        if not m.pieces:
            raise err(None, "no pieces: not a SentencePiece model")
        if m.model_type != BPE:
            raise err(m.at.get("trainer_spec"), f"model_type is {MODEL_TYPES.get(m.model_type, m.model_type)}: "
                      "this tokenizer implements SentencePiece BPE only (Llama 2's)")
        if m.precompiled_charsmap or m.denormalizer_charsmap:
            raise err(m.at.get("normalizer_spec"), f"normalizer {m.normalizer_name!r} has a character map: "
                      "only the identity normaliser is implemented")
        if m.treat_whitespace_as_suffix:
            raise err(m.at.get("trainer_spec"), "treat_whitespace_as_suffix is not implemented")
        seen: dict[str, int] = {}
        for i, (p, t, at) in enumerate(zip(m.pieces, m.types, m.offsets)):
            if p in seen:
                raise err(at, f"piece {i} {p!r} repeats piece {seen[p]}")
            seen[p] = i
            if t == BYTE:
                if not m.byte_fallback:
                    raise err(at, f"byte piece {i} {p!r} but byte_fallback is off")
                if not _BYTE_PIECE.fullmatch(p):
                    raise err(at, f"byte piece {i} {p!r} is not of the form <0xNN>")
        n_unk = m.types.count(UNKNOWN)
        if n_unk != 1:
            raise err(None, f"{n_unk} pieces of type UNKNOWN, expected exactly one")

    def _control_id(self, piece: str) -> int:
        i = self._id.get(piece, -1)
        return i if i >= 0 and self.types[i] == CONTROL else -1

    # -- encoding --

    def normalize(self, text: str) -> str:
        m = self._m
        if m.remove_extra_whitespaces:
            text = re.sub(" +", " ", text).strip(" ")
        if not text:
            return ""
        if m.add_dummy_prefix:
            text = " " + text
        return text.replace(" ", SPACE) if m.escape_whitespaces else text

    def encode(self, s: str, bos: bool, eos: bool) -> list[int]:
        assert type(s) is str
        s.encode("utf-8")          # a lone surrogate cannot be UTF-8: raise as SentencePiece's wrapper does
        text = self.normalize(s)
        ids = [self.bos_id] if bos else []
        if self._by_word:
            cache = self._cache
            if len(cache) > 200_000:
                cache.clear()
            for word in self._words.findall(text):
                hit = cache.get(word)
                if hit is None:
                    hit = cache[word] = self._ids(self._bpe(word))
                ids.extend(hit)
        elif text:
            ids.extend(self._ids(self._bpe(text)))
        if not self._m.byte_fallback:     # without byte fallback, a run of unknown symbols is one <unk>
            unk = self.unk_id
            ids = [t for k, t in enumerate(ids) if t != unk or k == 0 or ids[k - 1] != unk]
        if eos:
            ids.append(self.eos_id)
        return ids

    def _split(self, text: str) -> tuple[list[str], set[int]]:
        """Single characters, except user-defined pieces: matched whole (longest first), frozen."""
        if not self._user:
            return list(text), set()
        symbols, frozen, i = [], set(), 0
        while i < len(text):
            match = None
            if text[i] in self._user_first:
                match = next((p for p in self._user if text.startswith(p, i)), None)
            if match:
                frozen.add(len(symbols))
            symbols.append(match or text[i])
            i += len(match or text[i])
        return symbols, frozen

    def _bpe(self, text: str) -> list[str]:
        """SentencePiece's BPE: merge the best-scoring adjacent pair (leftmost on ties) until none is a piece."""
        symbols, frozen = self._split(text)
        n = len(symbols)
        if n < 2:
            return symbols
        score_of, unused = self._merge_score.get, self._unused
        nxt = list(range(1, n + 1))           # linked list over symbols; -1 ends it
        nxt[-1] = -1
        prev = list(range(-1, n - 1))
        unused_split: dict[str, tuple[str, str]] = {}
        heap: list[tuple[float, int, int, int]] = []   # (-score, left, right, length of the merge)

        def candidate(left: int, right: int, merged: str) -> None:
            score = score_of(merged)
            if score is None or (frozen and (left in frozen or right in frozen)):
                return
            heapq.heappush(heap, (-score, left, right, len(merged)))
            if merged in unused:
                unused_split[merged] = (symbols[left], symbols[right])

        for i in range(n - 1):
            candidate(i, i + 1, symbols[i] + symbols[i + 1])
        while heap:
            _, left, right, size = heapq.heappop(heap)
            a, b = symbols[left], symbols[right]
            if not a or not b or len(a) + len(b) != size:
                continue                      # stale: a side has merged with something else since
            a += b
            symbols[left], symbols[right] = a, ""
            after = nxt[left] = nxt[right]
            if after >= 0:
                prev[after] = left
                candidate(left, after, a + symbols[after])
            before = prev[left]
            if before >= 0:
                candidate(before, left, symbols[before] + a)

        out: list[str] = []
        for piece in symbols:
            if piece:
                self._resegment(piece, unused_split, out) if unused_split else out.append(piece)
        return out

    def _resegment(self, piece: str, unused_split: dict[str, tuple[str, str]], out: list[str]) -> None:
        """An UNUSED piece is never emitted: it is split back into the two symbols it came from."""
        if piece in unused_split:
            for part in unused_split[piece]:
                self._resegment(part, unused_split, out)
        else:
            out.append(piece)

    def _ids(self, symbols: list[str]) -> list[int]:
        ids, unk, get = [], self.unk_id, self._id.get
        for s in symbols:
            i = get(s, unk)
            if i != unk:
                ids.append(i)
            elif self._m.byte_fallback:
                ids.extend(self._byte_id[b] for b in s.encode("utf-8"))
            else:
                ids.append(unk)
        return ids

    # -- decoding --

    def id_to_piece(self, i: int) -> str:
        if not 0 <= i < self.n_words:
            raise IndexError(f"token id {i} out of range [0, {self.n_words})")
        return self.pieces[i]

    def piece_to_id(self, piece: str) -> int:
        return self._id.get(piece, self.unk_id)

    def decode(self, ids: int | Iterable[int]) -> str:
        if isinstance(ids, int):
            ids = [ids]
        m, out, pending = self._m, [], bytearray()
        produced = False             # has any text been written yet?
        bos_ws_seen = False          # did the previous piece give up its leading "▁"?
        is_bos_ws = True             # may the next piece still drop its leading "▁"?
        strip_first = m.add_dummy_prefix or m.remove_extra_whitespaces
        for i in ids:
            i = int(i)
            if not 0 <= i < self.n_words:
                raise IndexError(f"token id {i} out of range [0, {self.n_words})")
            t = self.types[i]
            if t == BYTE:
                pending.append(self._byte_of[i])
                continue
            if pending:
                out.append(utf8_with_replacement(pending))
                pending.clear()
                produced = True
            if bos_ws_seen or produced:
                is_bos_ws = False
            bos_ws_seen = False
            if t == CONTROL:
                text = ""
            elif i == self.unk_id:
                text = m.unk_surface
            else:
                piece = self.pieces[i]
                if is_bos_ws and strip_first and piece.startswith(SPACE):
                    piece = piece[1:]
                    bos_ws_seen = not m.remove_extra_whitespaces
                text = piece.replace(SPACE, " ")
            out.append(text)
            produced = produced or bool(text)
        if pending:
            out.append(utf8_with_replacement(pending))
        return "".join(out)


def utf8_with_replacement(data: bytes | bytearray) -> str:
    """UTF-8 as SentencePiece reads byte pieces: each byte that does not start a valid character
    becomes one U+FFFD (Python's "replace" would give one U+FFFD per maximal invalid run)."""
    out, i, n = [], 0, len(data)
    while i < n:
        b = data[i]
        if b < 0x80:
            out.append(chr(b))
            i += 1
            continue
        k = 2 if 0xC0 <= b < 0xE0 else 3 if 0xE0 <= b < 0xF0 else 4 if 0xF0 <= b < 0xF8 else 0
        if k and i + k <= n:
            try:
                out.append(bytes(data[i:i + k]).decode("utf-8"))
                i += k
                continue
            except UnicodeDecodeError:
                pass
        out.append("\ufffd")
        i += 1
    return "".join(out)
