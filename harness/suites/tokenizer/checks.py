"""The tokenizer checks: each compares one behaviour of a subject with sentencepiece and adds rows."""
from __future__ import annotations

import re
import unicodedata
from pathlib import Path
from typing import Any, Callable

from harness.core.real_tokenizer import model_proto_module
from harness.core.store import FAIL, INFO, NA, PASS, Row
from harness.suites.tokenizer.catalogue import Catalogue
from harness.suites.tokenizer.mechanisms import UNEXPLAINED, Models, combine
from harness.suites.tokenizer.subjects import Subject

SUITE = "tokenizer"
AGAINST = "sentencepiece"
MAX_EVIDENCE = 8            # divergences kept per row (the count is complete)


class Truth:
    """sentencepiece on the same file: the ground truth.

    ``special_aware`` is a second, narrower truth, built from sentencepiece alone: the ids of a
    text whose special-token strings (<s>, </s>, <unk>) are parsed as those tokens, the text
    between them encoded as a continuation (no dummy prefix after a special token), which is what
    transformers declares correct (legacy=False). A divergence that this truth explains is the
    known mechanism "special strings are parsed"; one it does not explain (an extra or a missing
    space next to a special token, the pre-4.31 legacy behaviour) is a bug, whatever the case name.
    """

    def __init__(self, model: Path):
        import sentencepiece as spm
        pb = model_proto_module()
        self.sp = spm.SentencePieceProcessor(model_file=str(model))
        self.n = self.sp.get_piece_size()
        proto = pb.ModelProto()
        proto.ParseFromString(Path(model).read_bytes())
        proto.normalizer_spec.add_dummy_prefix = False
        self.continuation = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        self.specials = {self.sp.id_to_piece(i): i for i in range(self.n)
                         if self.sp.is_control(i) or self.sp.is_unknown(i)}
        self._split = re.compile("(" + "|".join(re.escape(s) for s in sorted(self.specials, key=len, reverse=True)) + ")")
        self.models = Models(self, Path(model))

    def has_special(self, text: str) -> bool:
        return any(s in text for s in self.specials)

    def special_aware(self, text: str) -> list[int]:
        ids: list[int] = []
        for i, part in enumerate(self._split.split(text)):
            if part in self.specials:
                ids.append(self.specials[part])
            elif part:
                ids += list(self.sp.encode(part) if i == 0 else self.continuation.encode(part))
        return ids

    def without_specials(self, ids: list[int]) -> list[int]:
        return [i for i in ids if i not in self.specials.values()]

    def encode(self, s: str) -> list[int]:
        return list(self.sp.encode(s))

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(list(ids))

    def pieces(self, ids: list[int]) -> list[str]:
        return [self.sp.id_to_piece(i) if 0 <= i < self.n else f"<id {i}>" for i in ids]


def _safe(fn: Callable[..., Any], *args: Any) -> tuple[Any, str | None]:
    try:
        return fn(*args), None
    except Exception as e:   # a subject that raises is a divergence with the error as evidence
        return None, f"{type(e).__name__}: {str(e)[:200]}"


def _first_diff(a: Any, b: Any) -> int | None:
    if a == b:
        return None
    for i, (x, y) in enumerate(zip(a or [], b or [])):
        if x != y:
            return i
    return min(len(a or []), len(b or []))


def _evidence(truth: Truth, subject: Subject, text: str | None, want: Any, got: Any,
              error: str | None = None, **more: Any) -> dict[str, Any]:
    ev: dict[str, Any] = {}
    if text is not None:
        ev["text"] = text if len(text) <= 400 else text[:400] + f"... ({len(text)} chars)"
    ev["expected"], ev["got"] = _clip(want), _clip(got)
    if isinstance(want, list) and all(isinstance(i, int) for i in want):
        ev["expected_pieces"] = _clip(truth.pieces(want))
    if isinstance(got, list) and all(isinstance(i, int) for i in got) and subject.pieces:
        ev["got_pieces"] = _clip(_safe(subject.pieces, got)[0])
    if isinstance(want, (list, str)) and isinstance(got, (list, str)):
        ev["first_difference_at"] = _first_diff(want, got)
    if error:
        ev["error"] = error
    ev.update(more)
    return ev


def _clip(x: Any, n: int = 200) -> Any:
    if isinstance(x, list) and len(x) > n:
        return x[:n] + [f"... {len(x) - n} more"]
    if isinstance(x, str) and len(x) > 4 * n:
        return x[: 4 * n] + f"... ({len(x)} chars)"
    return x


class Judge:
    """Turns (subject, case, metric, mismatches) into rows, each failing row explained by the
    mechanisms that reproduce it (harness.suites.tokenizer.mechanisms) and settled against the
    catalogue's known deviations: a row is known only when every one of its mechanisms is a known
    deviation where (subject, loader, flags, case) and when (release) it happens."""

    def __init__(self, cat: Catalogue, strict: bool = False, release: str | None = None):
        self.cat, self.rows, self.strict = cat, [], strict
        if release is None:
            try:
                from harness.core.compat import transformers_release
                release = transformers_release()
            except ImportError:
                release = None
        self.release = release
        self.known_sources: dict[str, dict[str, Any]] = {}    # finding key -> the deviation's source, releases
        self.used: set[str] = set()         # the deviations that excused a row (every component's)

    def add(self, subject: Subject, kind: str, case: str, metric: str, mismatches: int,
            total: int = 1, evidence: list[dict[str, Any]] | None = None, note: str = "",
            mechanism: str | None = None) -> None:
        """``mechanism``: the '+'-joined components that reproduce every divergence of this row
        (mechanisms.combine), the evidence a known deviation is matched on."""
        extra: dict[str, Any] = {}
        if evidence:
            extra["divergences"] = evidence[:MAX_EVIDENCE]
        if mismatches:
            extra["mechanism"] = "vocab-not-loaded" if subject.info.get("vocab_missing") else (mechanism or UNEXPLAINED)
        row = Row(SUITE, subject.case(kind, case), subject.name, AGAINST, metric, float(mismatches), 0.0,
                  PASS, "", extra)
        if mismatches == 0:
            row.reason = note or ("equal" if total == 1 else f"all {total} equal")
            # only a deviation that excuses the whole place (no mechanism named) says so: one of a
            # mechanism is scoped wide (every transformers subject) and would note every passing row
            known = [d.name for d in self.cat.known if not d.evidence and d.applies_to(row, self.release)]
            if known:
                row.reason += f"; marked known ({known[0]}) in the catalogue but no longer diverges"
        else:
            row.status = FAIL
            row.reason = (f"{mismatches} of {total} differ from sentencepiece" if total > 1
                          else "differs from sentencepiece")
            self.settle(row)
        self.rows.append(row)

    def settle(self, row: Row) -> None:
        """Each component must be a known deviation here and now, or the row is a new finding named
        for its first component that is not (``extra["finding"]``)."""
        whole = row.extra["mechanism"]
        comps = whole.split("+")
        found = []
        for c in comps:
            row.extra["mechanism"] = c
            found.append(next((d for d in self.cat.known
                               if d.applies_to(row, self.release) and not d.misfit(row)), None))
        row.extra["mechanism"] = whole
        if len(comps) > 1:
            row.extra["also"] = comps[1:]
        if all(found):
            d = found[0]
            row.extra["known"] = d.known()
            self.used.update(x.name for x in found)
            users = sorted({x.origin for x in found if x.origin})
            if users:                       # the user's file accepted (part of) it: say so on the row
                row.extra["known"]["origin"] = ", ".join(users)
            if _evidence_names(d, comps[0]):    # a deviation of this very mechanism: the finding is named for it
                row.extra["finding"] = comps[0]
                self.known_sources.setdefault(comps[0], {"source": d.source, "releases": d.releases,
                                                         "origin": d.origin})
            # else a blanket deviation (a flag that drops the prefix on purpose) excuses the row: the
            # finding is the deviation's own (harness.core.findings.key groups by it)
            names = ", ".join(sorted({x.name for x in found}))
            if self.strict:
                row.reason = f"{row.reason} (known deviation {names}, gated by --strict)"
            else:
                row.status, row.reason = INFO, f"known deviation {names} (would fail: {row.reason}): {d.reason}"
            return
        first_new = next(c for c, d in zip(comps, found) if d is None)
        if first_new != UNEXPLAINED:
            # a component known elsewhere (another subject, flag or release) is new here
            scoped = any(_evidence_names(d, first_new) for d in self.cat.known)
            row.extra["finding"] = f"{first_new}@{_scope(row)}" if scoped else first_new
            row.reason = f"{row.reason}; mechanism {whole}"


def _evidence_names(d: Any, comp: str) -> bool:
    pattern = d.evidence.get("mechanism")
    return pattern is not None and any(p == comp for p in str(pattern).split("|"))


def _scope(row: Row) -> str:
    return "/".join(x for x in (row.subject, row.case.get("loader"), row.case.get("flags")) if x)


def check_subject(j: Judge, truth: Truth, s: Subject, cat: Catalogue, texts: list[str],
                  groups: dict[str, list[str]], vocab_sweep: bool) -> None:
    """Every check of the catalogue on one subject."""
    # a decode that renders byte pieces as text ('<0x0A>') joins pieces: read its other decode
    # differences (a lost leading space) as that same mechanism, not as another one that looks alike
    probe, _ = _safe(s.decode, [truth.sp.piece_to_id("<0x0A>")])
    truth.models.join_first = probe == "<0x0A>"
    for c in cat.encode:
        check_encode(j, truth, s, c)
    for c in cat.decode:
        check_decode(j, truth, s, c)
    for c in cat.batch:
        check_batch(j, truth, s, c)
    for c in cat.padding:
        check_padding(j, truth, s, c)
    if texts:
        check_fuzz(j, truth, s, texts)
    if vocab_sweep:
        check_vocab(j, truth, s)
    if groups:
        check_codepoints(j, truth, s, groups)


# --- the checks -----------------------------------------------------------------------------------

def check_encode(j: Judge, truth: Truth, s: Subject, case: dict[str, Any]) -> None:
    text, name = case["text"], case["name"]
    want = truth.encode(text)
    got, err = _safe(s.encode, text)
    j.add(s, "encode", name, "encode", int(got != want),
          evidence=[_evidence(truth, s, text, want, got, err)] if got != want else None,
          mechanism=combine([truth.models.why_encode(text, got)]))
    bos = truth.sp.bos_id()
    want_sp = [bos] + want
    got_sp, err = _safe(s.encode_special, text)
    j.add(s, "encode", name, "encode_special", int(got_sp != want_sp),
          evidence=[_evidence(truth, s, text, want_sp, got_sp, err,
                              rule="default special tokens vs Meta's encode(bos=True, eos=False)")]
          if got_sp != want_sp else None,
          mechanism=combine([truth.models.why_encode_special(text, got_sp)]))
    want_rt = truth.decode(want)
    got_rt, err = (None, err) if got is None else _safe(s.decode, got)
    j.add(s, "encode", name, "roundtrip", int(got_rt != want_rt),
          evidence=[_evidence(truth, s, text, want_rt, got_rt, err,
                              sentencepiece_roundtrip_is_identity=want_rt == text)]
          if got_rt != want_rt else None,
          mechanism=combine([truth.models.why_roundtrip(text, got, got_rt)]))
    if not truth.has_special(text):
        check_decode_keeping_specials(j, truth, s, "encode", name, [want])


def check_decode_keeping_specials(j: Judge, truth: Truth, s: Subject, kind: str, name: str,
                                  id_lists: list[list[int]], wrap: bool = True) -> None:
    """decode(skip_special_tokens=False) must give back text that encodes to the same ids when its
    special strings are parsed (Truth.special_aware): no space lost or added next to <s>, </s>."""
    if s.decode_keep is None:
        j.rows.append(Row(SUITE, s.case(kind, name), s.name, AGAINST, "decode_keep_special", None, None, NA,
                          "Meta's tokenizer has no decode that keeps special tokens"))
        return
    bos, eos = truth.sp.bos_id(), truth.sp.eos_id()
    bad, why = [], []
    for ids in id_lists:
        full = [bos, *ids, eos] if wrap else list(ids)
        text, err = _safe(s.decode_keep, full)
        back = None if text is None else truth.special_aware(text)
        if back != full:
            why.append(truth.models.why_decode_keep(full, text))
            bad.append(_evidence(truth, s, text, full, back, err,
                                 rule="special_aware(decode(ids, skip_special_tokens=False)) == ids"))
    j.add(s, kind, name, "decode_keep_special", len(bad), len(id_lists), bad, mechanism=combine(why))


def check_decode(j: Judge, truth: Truth, s: Subject, case: dict[str, Any]) -> None:
    ids = case["ids"] if "ids" in case else [truth.sp.piece_to_id(p) for p in case["pieces"]]
    want = truth.decode(ids)
    got, err = _safe(s.decode, ids)
    j.add(s, "decode", case["name"], "decode", int(got != want),
          evidence=[_evidence(truth, s, None, want, got, err, ids=ids, pieces=truth.pieces(ids))]
          if got != want else None, mechanism=combine([truth.models.why_decode(ids, got)]))
    if case.get("keep_special"):
        check_decode_keeping_specials(j, truth, s, "decode", case["name"], [ids], wrap=False)


def check_batch(j: Judge, truth: Truth, s: Subject, case: dict[str, Any]) -> None:
    texts = case["texts"]
    want = [truth.encode(t) for t in texts]
    got, err = _safe(s.batch_encode, texts)
    bad = [i for i in range(len(texts)) if got is None or got[i] != want[i]]
    j.add(s, "batch", case["name"], "batch_encode", len(bad), len(texts),
          [_evidence(truth, s, texts[i], want[i], None if got is None else got[i], err) for i in bad],
          mechanism=combine([truth.models.why_encode(texts[i], None if got is None else got[i]) for i in bad]))
    want_d = [truth.decode(ids) for ids in want]
    got_d, err = _safe(s.batch_decode, want)
    bad = [i for i in range(len(texts)) if got_d is None or got_d[i] != want_d[i]]
    j.add(s, "batch", case["name"], "batch_decode", len(bad), len(texts),
          [_evidence(truth, s, texts[i], want_d[i], None if got_d is None else got_d[i], err) for i in bad],
          mechanism=combine([truth.models.why_decode(want[i], None if got_d is None else got_d[i]) for i in bad]))


def check_padding(j: Judge, truth: Truth, s: Subject, case: dict[str, Any]) -> None:
    """Add <pad> the transformers way, pad a batch left/right: real tokens and masks must be exact."""
    metrics = ("pad_unchanged_encodings", "pad_real_tokens", "pad_mask")
    if s.hf is None:
        for m in metrics:
            j.rows.append(Row(SUITE, s.case("padding", case["name"]), s.name, AGAINST, m, None, None, NA,
                              "Meta's tokenizer has no pad token (pad_id -1): padding is the caller's job"))
        return
    import copy
    texts, side = case["texts"], case["side"]
    try:
        tk = copy.deepcopy(s.hf)
        before = [list(tk.encode(t)) for t in texts]
        tk.add_special_tokens({"pad_token": "<pad>"})
        tk.padding_side = side
        after = [list(tk.encode(t)) for t in texts]
        batch = tk(texts, padding=True)
    except Exception as e:
        for m in metrics:
            j.add(s, "padding", case["name"], m, 1, evidence=[{"error": f"{type(e).__name__}: {e}"}])
        return
    pad_id = tk.pad_token_id
    bad_unchanged = [i for i in range(len(texts)) if before[i] != after[i]]
    j.add(s, "padding", case["name"], "pad_unchanged_encodings", len(bad_unchanged), len(texts),
          [_evidence(truth, s, texts[i], before[i], after[i], rule="encode before vs after adding <pad>")
           for i in bad_unchanged])
    bad_real, bad_mask = [], []
    width = max(len(x) for x in before)
    for i, text in enumerate(texts):
        ids, mask = list(batch["input_ids"][i]), list(batch["attention_mask"][i])
        n = len(before[i])
        want_mask = [1] * n + [0] * (width - n) if side == "right" else [0] * (width - n) + [1] * n
        want_ids = (before[i] + [pad_id] * (width - n) if side == "right"
                    else [pad_id] * (width - n) + before[i])
        real = [t for t, m in zip(ids, mask) if m]
        if real != before[i] or ids != want_ids:
            bad_real.append(_evidence(truth, s, text, want_ids, ids, pad_id=pad_id, side=side))
        if mask != want_mask:
            bad_mask.append(_evidence(truth, s, text, want_mask, mask, side=side))
    j.add(s, "padding", case["name"], "pad_real_tokens", len(bad_real), len(texts), bad_real,
          note=f"pad id {pad_id}, {side} padding")
    j.add(s, "padding", case["name"], "pad_mask", len(bad_mask), len(texts), bad_mask)


def fuzz_texts(n: int, seed: int | None = None) -> list[str]:
    """n random Unicode strings from hypothesis, derandomised (the same list on every run), or
    drawn from ``seed`` (another fixed list per seed: the calibration campaign's draws)."""
    if n <= 0:
        return []
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as fix_seed
    from hypothesis import strategies as st
    pieces = st.one_of(
        st.text(max_size=12),                                            # any code point but surrogates
        st.text(alphabet=" \t\n\r\u00a0\u3000▁", max_size=6),            # whitespace, incl. '▁' itself
        st.sampled_from(["<s>", "</s>", "<unk>", "<0x41>", "▁", "  ", "Hello", " world", "123", "🦙",
                         "\u200d", "e\u0301", "𠀀", "\ufffd", "\x00"]),
        st.text(alphabet=st.characters(codec="ascii"), max_size=12),
    )
    strategy = st.lists(pieces, max_size=6).map("".join)
    out: list[str] = []

    @settings(max_examples=n, derandomize=seed is None, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def collect(text: str) -> None:
        out.append(text)

    if seed is not None:
        collect = fix_seed(seed)(collect)

    collect()
    seen, unique = set(), []
    for t in out:                     # hypothesis may call twice with one value; keep the first
        if t not in seen:
            seen.add(t)
            unique.append(t)
    return unique


def check_fuzz(j: Judge, truth: Truth, s: Subject, texts: list[str]) -> None:
    """Texts holding a special-token string (<s>, </s>, <unk>) are judged apart, as fuzz-special."""
    special = [truth.sp.id_to_piece(i) for i in range(truth.n) if truth.sp.is_control(i) or truth.sp.is_unknown(i)]
    plain = [t for t in texts if not any(p in t for p in special)]
    with_special = [t for t in texts if any(p in t for p in special)]
    _fuzz(j, truth, s, plain, "fuzz")
    _fuzz(j, truth, s, with_special, "fuzz-special")


def _fuzz(j: Judge, truth: Truth, s: Subject, texts: list[str], name: str) -> None:
    want = [truth.encode(t) for t in texts]
    if s.batch_encode is not None and s.hf is not None:
        got_all, err = _safe(s.batch_encode, texts)
    else:
        got_all, err = None, "unbatched"
    ev_enc, ev_rt, why_enc, why_rt = [], [], [], []
    for i, t in enumerate(texts):
        got, e = (got_all[i], None) if got_all is not None else _safe(s.encode, t)
        if got != want[i]:
            why_enc.append(truth.models.why_encode(t, got))
            if len(ev_enc) < MAX_EVIDENCE:
                ev_enc.append(_evidence(truth, s, t, want[i], got, e))
        want_rt = truth.decode(want[i])
        got_rt, e = (None, e) if got is None else _safe(s.decode, got)
        if got_rt != want_rt:
            why_rt.append(truth.models.why_roundtrip(t, got, got_rt))
            if len(ev_rt) < MAX_EVIDENCE:
                ev_rt.append(_evidence(truth, s, t, want_rt, got_rt, e))
    j.add(s, "fuzz", name, "fuzz_encode", len(why_enc), len(texts), ev_enc, mechanism=combine(why_enc))
    j.add(s, "fuzz", name, "fuzz_roundtrip", len(why_rt), len(texts), ev_rt, mechanism=combine(why_rt))
    if name == "fuzz":
        check_decode_keeping_specials(j, truth, s, "fuzz", name, want[:100])


def check_vocab(j: Judge, truth: Truth, s: Subject) -> None:
    """Decode every id alone; encode the text of every NORMAL piece."""
    n = truth.n
    want = [truth.decode([i]) for i in range(n)]
    if s.batch_decode is not None:
        got, err = _safe(s.batch_decode, [[i] for i in range(n)])
    else:
        got, err = None, "no batch decode"
    bad = [i for i in range(n) if got is None or got[i] != want[i]]
    j.add(s, "vocab", "every-id", "vocab_decode", len(bad), n,
          [_evidence(truth, s, None, want[i], None if got is None else got[i], err, id=i,
                     piece=truth.sp.id_to_piece(i)) for i in bad[:MAX_EVIDENCE]],
          mechanism=combine([truth.models.why_decode([i], None if got is None else got[i]) for i in bad]))
    normal = [i for i in range(n) if not (truth.sp.is_control(i) or truth.sp.is_unknown(i) or truth.sp.is_byte(i))]
    texts = [truth.sp.id_to_piece(i).replace("▁", " ") for i in normal]
    want_e = [truth.encode(t) for t in texts]
    got_e, err = _safe(s.batch_encode, texts)
    bad = [k for k in range(len(texts)) if got_e is None or got_e[k] != want_e[k]]
    j.add(s, "vocab", "every-normal-piece", "vocab_encode", len(bad), len(texts),
          [_evidence(truth, s, texts[k], want_e[k], None if got_e is None else got_e[k], err, id=normal[k])
           for k in bad[:MAX_EVIDENCE]],
          mechanism=combine([truth.models.why_encode(texts[k], None if got_e is None else got_e[k]) for k in bad]))


def codepoint_classes(step: int = 97) -> dict[str, list[str]]:
    """Every step-th Unicode scalar value (no surrogates), grouped by major general category."""
    groups: dict[str, list[str]] = {}
    for cp in range(0, 0x110000, step):
        if 0xD800 <= cp <= 0xDFFF:
            continue
        c = chr(cp)
        groups.setdefault(unicodedata.category(c)[0], []).append(c)
    return dict(sorted(groups.items()))


def check_codepoints(j: Judge, truth: Truth, s: Subject, groups: dict[str, list[str]]) -> None:
    for cls, chars in groups.items():
        texts = [f"{c}" for c in chars] + [f"a{c} {c}b" for c in chars]
        want = [truth.encode(t) for t in texts]
        got, err = _safe(s.batch_encode, texts)
        bad = [k for k in range(len(texts)) if got is None or got[k] != want[k]]
        j.add(s, "codepoints", f"category-{cls}", "codepoint_encode", len(bad), len(texts),
              [_evidence(truth, s, texts[k], want[k], None if got is None else got[k], err,
                         codepoint=f"U+{ord(texts[k][0] if k < len(chars) else texts[k][1]):04X}")
               for k in bad[:MAX_EVIDENCE]],
              mechanism=combine([truth.models.why_encode(texts[k], None if got is None else got[k]) for k in bad]))


