"""Why a tokenizer cell differs: each mechanism is a model built from sentencepiece alone that
predicts what a tokenizer with that mechanism outputs. A failing cell is explained only when a
model (or a combination of them) reproduces *exactly* what the subject gave, text by text; a
difference no model reproduces stays "unexplained" and fails the run as a new finding.

Components (a cell may need several; ``extra["mechanism"]`` joins them with '+'):

  encode side   prefix-space-fused   a text that starts with a space gets no dummy prefix
                                     (' Banana' -> '▁Ban','ana'; sentencepiece '▁','▁Ban','ana')
                merges-by-id         BPE merges ranked by piece id, not by sentencepiece score
                                     ('  ' -> '▁▁'; sentencepiece '▁▁▁')
                special-aware        '<s>', '</s>', '<unk>' in text parsed as special tokens, the
                                     text after one continues without a dummy prefix (legacy=False)
                special-legacy       parsed, and the text after one gets a dummy prefix (legacy=True)
                no-dummy-prefix      no dummy prefix at all ('Hello' -> 'Hello', not '▁Hello')
                no-bos               encode with the default special tokens adds no <s>
  decode side   unk-skipped          skip_special_tokens=True drops <unk> (sentencepiece: ' ⁇ ')
                byte-run-fffd        an invalid UTF-8 run of byte pieces becomes one U+FFFD per byte,
                                     its valid bytes included (sentencepiece keeps them)
                byte-space-stripped  a leading space that a byte piece (<0x20>) produced is stripped
                join-pieces          pieces joined as text, '▁' -> ' ', stripped: byte pieces read
                                     '<0x0A>', control pieces '<s>' (5.x SentencePieceBackend)
                space-around-special decode keeping special tokens moves the spaces around a special
                                     token between text pieces ([▁Hey, </s>, ▁you] -> ' Hey</s>you')
                leading-space-dropped one more leading space lost (' Hello' -> 'Hello')
                prefix-space-kept    the dummy prefix's space not removed ('Banana' -> ' Banana')
  subject       vocab-not-loaded     the tokenizer holds fewer pieces than tokenizer.model: every
                                     cell differs for that one reason

Which of them are known deviations (cited, release-scoped) is the catalogue's business
(suites/tokenizer.toml [known.NAME] with evidence.mechanism); this module only explains.
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.core.findings import Mechanism
from harness.core.real_tokenizer import model_proto_module
from harness.core.store import FAIL

UNEXPLAINED = "unexplained"


@dataclass(frozen=True)
class Info:
    title: str                 # one line a transformers maintainer could act on
    reproduction: str
    releases: str              # where it was measured (PEP 440); the catalogue scopes known ones
    path: str                  # which loader paths it touches: what users take, or a constructor


# The "path" words: a published Llama-2-7b-hf folder ships tokenizer.json and tokenizer_config.json
# (AutoTokenizer loads tokenizer.json as it is); a folder with only tokenizer.model (what Meta's
# download and many conversions give) makes transformers build the tokenizer itself; a constructor
# is called by library code, rarely by users.
INFO: dict[str, Info] = {
    "vocab-not-loaded": Info(
        "LlamaTokenizer(vocab_file=PATH) silently ignores vocab_file (5.x takes vocab=; vocab_file lands in "
        "**kwargs) and builds a 3-token vocabulary: every text encodes to [] with no error",
        "LlamaTokenizer(vocab_file='tokenizer.model').encode('Hello world', add_special_tokens=False) -> [] "
        "(sentencepiece [15043, 3186]); len(tokenizer) == 3",
        ">=5.0", "constructor path (LlamaTokenizer/LlamaTokenizerFast(vocab_file=...)), not from_pretrained"),
    "prefix-space-fused": Info(
        "Llama tokenizer with legacy=False fuses a real leading space into the dummy prefix: ' Banana' encodes "
        "like 'Banana'",
        "LlamaTokenizer.from_pretrained(folder_with_tokenizer_model).encode(' Banana', add_special_tokens=False) "
        "-> [10765, 1648] '▁Ban','ana' (sentencepiece [29871, 10765, 1648])",
        ">=4.41", "from_pretrained on a folder without tokenizer.json (5.x: legacy=False is the default)"),
    "merges-by-id": Info(
        "5.x builds the BPE merges of a tokenizer.model-only Llama folder in piece-id order, not by "
        "sentencepiece score: runs of spaces merge first",
        "LlamaTokenizer.from_pretrained(folder_with_tokenizer_model).encode('if x:\\n    return', "
        "add_special_tokens=False) -> [..., 268 '▁▁▁▁', 2457 'return'] (sentencepiece 1678 '▁▁▁', 736 '▁return')",
        ">=5.0", "from_pretrained on a folder without tokenizer.json; a published folder's tokenizer.json is not "
                 "affected"),
    "special-aware": Info(
        "special-token strings in text ('<s>', '</s>', '<unk>') are parsed as special tokens",
        "tokenizer.encode('<s>Hello', add_special_tokens=False) -> [1, 10994] (sentencepiece: the characters "
        "'<', 's', '>': [529, 29879, 29958, 10994])",
        "", "every transformers loader (split_special_tokens=False is the default)"),
    "special-legacy": Info(
        "special-token strings in text are parsed and the text after one gets a dummy-prefix space "
        "(the legacy=True behaviour)",
        "tokenizer.encode('<s>Hello', add_special_tokens=False) -> [1, 15043] '▁Hello' (legacy=False: [1, 10994])",
        "", "legacy=True, and loaders whose default is legacy"),
    "no-bos": Info(
        "encode with the default special tokens adds no <s>: the folder gave no add_bos_token and the class "
        "defaults to False",
        "LlamaTokenizer.from_pretrained(folder_with_only_tokenizer_model).encode('Hello world') -> [15043, 3186] "
        "(Meta's tokenizer and a published Llama-2-7b-hf folder: [1, 15043, 3186])",
        ">=5.0", "from_pretrained on a folder without tokenizer_config.json (a published folder sets "
                 "add_bos_token=true)"),
    "unk-skipped": Info(
        "decode(skip_special_tokens=True) drops <unk>, which sentencepiece decodes to ' ⁇ '",
        "tokenizer.decode([0, 15043, 0], skip_special_tokens=True) -> 'Hello' (sentencepiece ' ⁇  Hello ⁇ ')",
        "", "every transformers loader"),
    "byte-run-fffd": Info(
        "tokenizers' ByteFallback decoder turns a whole invalid UTF-8 run of byte pieces into U+FFFD, valid "
        "bytes included: <0xC0><0x00> decodes to two U+FFFD (sentencepiece: U+FFFD, '\\x00')",
        "tokenizer.decode([195, 3]) -> '\\ufffd\\ufffd' (sentencepiece '\\ufffd\\x00')",
        "", "every tokenizers-backed loader"),
    "byte-space-stripped": Info(
        "the decoder's Strip(' ', 1, 0) also strips a leading space that a byte piece <0x20> produced "
        "(sentencepiece strips only the dummy prefix of a '▁' piece)",
        "tokenizer.decode([35]) -> '' (sentencepiece ' ')",
        "", "every tokenizers-backed loader"),
    "join-pieces": Info(
        "5.x SentencePieceBackend decodes by joining pieces as text and stripping: byte pieces come out as "
        "'<0x0A>', '<s>' is not skipped, leading/trailing spaces are lost",
        "SentencePieceBackend(vocab_file='tokenizer.model').decode([13, 15043]) -> '<0x0A> Hello' "
        "(sentencepiece '\\n Hello')",
        ">=5.0", "constructor path (SentencePieceBackend(vocab_file=...))"),
    "space-around-special": Info(
        "decode(skip_special_tokens=False) moves the spaces around a special token between text pieces, so the "
        "text no longer encodes back to the same ids (the slow LlamaTokenizer of 4.31-4.48)",
        "LlamaTokenizer.from_pretrained(folder).decode([18637, 2, 366], skip_special_tokens=False) -> "
        "' Hey</s>you' on 4.45.2 (pieces '▁Hey','</s>','▁you': 'Hey</s> you')",
        ">=4.31,<4.49", "the slow LlamaTokenizer and AutoTokenizer(use_fast=False), 4.x; add_prefix_space=False"),
    "leading-space-dropped": Info(
        "slow LlamaTokenizer (legacy=True) drops one leading space when decoding (' Hello' -> 'Hello')",
        "LlamaTokenizer.from_pretrained(folder).decode([29871, 10765, 1648]) -> 'Banana' (sentencepiece ' Banana')",
        ">=4.32,<5", "the slow LlamaTokenizer, 4.x"),
    "no-dummy-prefix": Info(
        "the tokenizer adds no dummy prefix: 'Hello world' encodes as 'Hello','▁world'",
        "LlamaTokenizerFast(vocab_file='tokenizer.model').encode('Hello world', add_special_tokens=False) -> "
        "[10994, 3186] on 4.x (sentencepiece [15043, 3186])",
        "", "add_prefix_space=False (on purpose); 4.x LlamaTokenizerFast(vocab_file=...) (constructor path)"),
    "prefix-space-kept": Info(
        "decode keeps the space of a first '▁' piece: [10765, 1648] -> ' Banana'",
        "LlamaTokenizerFast(vocab_file='tokenizer.model').decode([10765, 1648]) -> ' Banana' on 4.x "
        "(sentencepiece 'Banana')",
        "", "add_prefix_space=False (on purpose); 4.x LlamaTokenizerFast(vocab_file=...) (constructor path)"),
}


def mechanism_table(rows: list, known_sources: dict[str, dict[str, Any]]) -> dict[str, Mechanism]:
    """Part.mechanisms for a run: one Mechanism per component seen as a finding key (see
    checks.Judge.settle, which names rows' keys)."""
    table: dict[str, Mechanism] = {}
    keys: dict[str, bool] = {}      # key -> every row of it known (a cited deviation here and now)
    for r in rows:
        key = r.extra.get("finding")
        if isinstance(key, str) and (r.status == FAIL or isinstance(r.extra.get("known"), dict)):
            keys[key] = keys.get(key, True) and isinstance(r.extra.get("known"), dict)
    for key, all_known in keys.items():
        comp, _, scope = key.partition("@")
        info = INFO.get(comp)
        if info is None:
            continue
        known = known_sources.get(key) if all_known else None
        title = info.title + (f" [outside its known scope: {scope}]" if scope else "") + f" ({info.path})"
        table[key] = Mechanism(key, title, info.reproduction, (known or {}).get("source", ""),
                               info.releases if known is None else known.get("releases", ""), known is not None,
                               (known or {}).get("origin", ""))
    return table


class Models:
    """The mechanisms' predictions, from sentencepiece on the same tokenizer.model."""

    def __init__(self, truth: Any, model: Path):
        import sentencepiece as spm
        self.truth = truth
        pb = model_proto_module()
        proto = pb.ModelProto()
        proto.ParseFromString(Path(model).read_bytes())
        for i, p in enumerate(proto.pieces):       # merges ranked by id: lower id, higher score
            p.score = -float(i)
        self.by_id = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        proto.normalizer_spec.add_dummy_prefix = False
        self.by_id_cont = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        sp = truth.sp
        self.unk = sp.unk_id()
        self.byte_ids = {i: int(sp.id_to_piece(i)[3:5], 16) for i in range(truth.n) if sp.is_byte(i)}
        self.byte_of = {b: i for i, b in self.byte_ids.items()}
        self._cache: dict[tuple, list[int]] = {}

    # --- encode ---------------------------------------------------------------------------------

    def encode(self, text: str, fused: bool = False, by_id: bool = False, special: str | None = None,
               bare: bool = False) -> list[int]:
        key = (text, fused, by_id, special, bare)
        if key not in self._cache:
            if len(self._cache) > 50_000:
                self._cache.clear()
            self._cache[key] = self._encode(text, fused, by_id, special, bare)
        return self._cache[key]

    def _encode(self, text: str, fused: bool, by_id: bool, special: str | None, bare: bool) -> list[int]:
        t = self.truth
        first, cont = (self.by_id, self.by_id_cont) if by_id else (t.sp, t.continuation)
        if bare:
            first = cont

        def chunk(part: str, at_start: bool) -> list[int]:
            if at_start:
                return list((cont if fused and part[:1] in (" ", "▁") else first).encode(part))
            return list((cont if special == "aware" else first).encode(part))
        if special is None:
            return chunk(text, True)
        ids: list[int] = []
        for i, part in enumerate(t._split.split(text)):
            if part in t.specials:
                ids.append(t.specials[part])
            elif part:
                ids += chunk(part, i == 0)
        return ids

    def _encode_variants(self, text: str):
        specials = [None, "aware", "legacy"] if self.truth.has_special(text) else [None]
        out = []
        for fused, by_id, special, bare in itertools.product((False, True), (False, True), specials, (False, True)):
            if fused and bare:
                continue
            comps = ((["prefix-space-fused"] if fused else []) + (["merges-by-id"] if by_id else [])
                     + ([f"special-{special}"] if special else []) + (["no-dummy-prefix"] if bare else []))
            out.append((comps, dict(fused=fused, by_id=by_id, special=special, bare=bare)))
        out.sort(key=lambda c: (len(c[0]), "no-dummy-prefix" in c[0]))   # fewest, the rarer reading last
        return out

    def why_encode(self, text: str, got: Any) -> list[str] | None:
        """The fewest components whose prediction is exactly ``got`` (ids, no special tokens)."""
        if not isinstance(got, list):
            return None
        for comps, kw in self._encode_variants(text):
            if self.encode(text, **kw) == got:
                return comps
        return None

    def why_encode_special(self, text: str, got: Any) -> list[str] | None:
        if not isinstance(got, list):
            return None
        bos = self.truth.sp.bos_id()
        for comps, kw in self._encode_variants(text):
            ids = self.encode(text, **kw)
            if [bos] + ids == got:
                return comps
            if ids == got:
                return comps + ["no-bos"]
        return None

    # --- decode ---------------------------------------------------------------------------------

    def _fffd(self, ids: list[int]) -> list[int]:
        """Each maximal run of byte pieces that is not valid UTF-8 -> U+FFFD per byte (as bytes)."""
        out: list[int] = []
        run: list[int] = []
        fffd = [self.byte_of[b] for b in "\ufffd".encode()]

        def flush() -> None:
            try:
                bytes(self.byte_ids[i] for i in run).decode("utf-8")
                out.extend(run)
            except UnicodeDecodeError:
                out.extend(fffd * len(run))
            run.clear()
        for i in ids:
            if i in self.byte_ids:
                run.append(i)
            else:
                flush()
                out.append(i)
        flush()
        return out

    def decode(self, ids: list[int], unk_skipped: bool = False, fffd: bool = False, strip: bool = False,
               dropped: bool = False, kept: bool = False) -> str:
        sp = self.truth.sp
        if unk_skipped:
            ids = [i for i in ids if i != self.unk]
        text = sp.decode(self._fffd(ids) if fffd else list(ids))
        first = next((i for i in ids if not sp.is_control(i)), None)
        if strip and text.startswith(" ") and first is not None and self.byte_ids.get(first) == 0x20:
            text = text[1:]
        if dropped and text.startswith(" "):        # one more leading space lost
            text = text[1:]
        if kept and first is not None and sp.id_to_piece(first).startswith("▁") and first not in self.byte_ids:
            text = " " + text                       # the dummy prefix's space not removed
        return text

    def join_pieces(self, ids: list[int]) -> str:
        return "".join(self.truth.sp.id_to_piece(i) for i in ids).replace("▁", " ").strip()

    join_first = False    # set per subject (checks.check_subject): its decode joins pieces as text

    def why_decode(self, ids: list[int], got: Any) -> list[str] | None:
        if not isinstance(got, str):
            return None
        if self.join_first and self.join_pieces(ids) == got:
            return ["join-pieces"]      # the subject's decode is this one: ' Hello' -> 'Hello' is it too
        names = ("unk-skipped", "byte-run-fffd", "byte-space-stripped", "leading-space-dropped", "prefix-space-kept")
        for n in range(4):
            for flags in itertools.combinations(names, n):
                if ("leading-space-dropped" in flags and "prefix-space-kept" in flags):
                    continue
                if self.decode(ids, *(x in flags for x in names)) == got:
                    return list(flags)
        if self.join_pieces(ids) == got:
            return ["join-pieces"]
        return None

    def why_roundtrip(self, text: str, ids: Any, got: Any) -> list[str] | None:
        """decode(encode(text)): what explains the ids, plus what explains decoding them."""
        enc = self.why_encode(text, ids)
        if enc is None:
            return None
        dec = self.why_decode(ids, got)
        return None if dec is None else enc + dec

    def why_decode_keep(self, ids: list[int], text: Any) -> list[str] | None:
        """decode(ids, skip_special_tokens=False) that does not parse back to ``ids``."""
        if not isinstance(text, str):
            return None
        if self.join_pieces(ids) == text:
            return ["join-pieces"]
        # [▁Hey, </s>, ▁you] -> ' Hey</s>you' or 'Hey </s> you': the same text once the spaces next to
        # special tokens and at the ends are set aside
        t = self.truth
        specials = "|".join(re.escape(n) for n in sorted(t.specials, key=len, reverse=True))
        chunks, run = [], []
        for i in ids:
            if i in t.specials.values():
                chunks += [t.sp.decode(run), t.sp.id_to_piece(i)]
                run = []
            else:
                run.append(i)
        reference = "".join(chunks + [t.sp.decode(run)])

        def canonical(x: str) -> str:
            return re.sub(f" *({specials}) *", r"\1", x).strip(" ")
        if canonical(text) == canonical(reference):
            return ["space-around-special"]
        return None


def combine(parts: list[list[str] | None]) -> str:
    """One row's mechanism from its texts' explanations: '+'-joined components, or unexplained."""
    if not parts or any(p is None for p in parts):
        return UNEXPLAINED
    comps = sorted({c for p in parts for c in p})
    return "+".join(comps) if comps else UNEXPLAINED
