"""The tokenizers compared with sentencepiece: the reference, and every transformers class, loader
and flag the installed release offers (what it lacks is a row with status n/a and the reason)."""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


@dataclass
class Subject:
    name: str                                      # e.g. "transformers.LlamaTokenizer"
    loader: str                                    # "vocab_file", "from_pretrained", "saved", "model_path"
    flags: str = ""                                # e.g. "legacy=True"
    encode: Callable[[str], list[int]] | None = None
    encode_special: Callable[[str], list[int]] | None = None
    decode: Callable[[list[int]], str] | None = None
    decode_keep: Callable[[list[int]], str] | None = None     # decode keeping special tokens
    batch_encode: Callable[[list[str]], list[list[int]]] | None = None
    batch_decode: Callable[[list[list[int]]], list[str]] | None = None
    pieces: Callable[[list[int]], list[str]] | None = None
    hf: Any = None                                 # the transformers object, for padding
    na: str | None = None                          # why it cannot be run here
    make: Callable[[], Any] | None = None          # builds the tokenizer (load_subject)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """What --subjects patterns match: name/loader[/flags]."""
        return "/".join(x for x in (self.name, self.loader, self.flags) if x)

    def case(self, kind: str, name: str) -> dict[str, Any]:
        return {"kind": kind, "case": name, "loader": self.loader, "flags": self.flags}


def _reference_subject(model: Path) -> Subject:
    def make() -> Any:
        from reference_model.tokenizer import Tokenizer
        return Tokenizer(model)
    return Subject("reference", "model_path", make=make)


def _hf_subject(name: str, loader: str, flags: str, make: Callable[[], Any]) -> Subject:
    return Subject(name, loader, flags, make=make)


def load_subject(s: Subject) -> Subject:
    """Build the tokenizer behind a subject (only the subjects a run selects are ever built)."""
    if s.na or s.encode is not None or s.make is None:
        return s
    try:
        tk = s.make()
    except Exception as e:    # a loader that fails here is a finding, reported as n/a with the error
        s.na = f"loading failed: {type(e).__name__}: {str(e)[:300]}"
        return s
    if s.name == "reference":
        s.encode = lambda t: tk.encode(t, bos=False, eos=False)
        s.encode_special = lambda t: tk.encode(t, bos=True, eos=False)
        s.decode = tk.decode
        s.batch_encode = lambda texts: [tk.encode(t, bos=False, eos=False) for t in texts]
        s.batch_decode = lambda batch: [tk.decode(ids) for ids in batch]
        s.pieces = lambda ids: [tk.id_to_piece(i) for i in ids]
        s.info["class"] = "reference_model.tokenizer.Tokenizer"
        return s
    s.encode = lambda t: list(tk.encode(t, add_special_tokens=False))
    s.encode_special = lambda t: list(tk.encode(t))
    s.decode = lambda ids: tk.decode(ids, skip_special_tokens=True)
    s.decode_keep = lambda ids: tk.decode(ids, skip_special_tokens=False)
    s.batch_encode = lambda texts: [list(x) for x in tk(texts, add_special_tokens=False)["input_ids"]]
    s.batch_decode = lambda batch: list(tk.batch_decode(batch, skip_special_tokens=True))
    s.pieces = lambda ids: list(tk.convert_ids_to_tokens(ids))
    s.hf = tk
    s.info.update({"class": f"{type(tk).__module__}.{type(tk).__qualname__}", "vocab_size": len(tk)})
    return s


def _is_slow(cls: type) -> bool:
    names = {c.__name__ for c in cls.__mro__}
    return "PreTrainedTokenizer" in names and not names & {"PreTrainedTokenizerFast", "TokenizersBackend"}


def discover_subjects(model: Path, workdir: Path, user_folder: Path | None = None) -> list[Subject]:
    """The reference plus every transformers tokenizer/loader/flag combination the installed release has.

    ``user_folder``: an HF tokenizer folder as users have it (tokenizer.model beside its
    tokenizer_config.json): every class also loads it as it is (loader "user-folder")."""
    subjects = [_reference_subject(model)]
    try:
        import transformers
    except ImportError as e:
        return subjects + [Subject("transformers", "-", na=f"transformers not importable: {e}")]
    bare = workdir / "bare"                       # a folder holding only tokenizer.model
    bare.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model, bare / "tokenizer.model")
    major = int(transformers.__version__.split(".")[0])
    flag_sets = [("", {}), ("legacy=True", {"legacy": True}), ("legacy=False", {"legacy": False}),
                 ("add_prefix_space=True", {"add_prefix_space": True}),
                 ("add_prefix_space=False", {"add_prefix_space": False})]

    llama = getattr(transformers, "LlamaTokenizer", None)
    fast = getattr(transformers, "LlamaTokenizerFast", None)
    for cls_name, cls in (("LlamaTokenizer", llama), ("LlamaTokenizerFast", fast)):
        name = f"transformers.{cls_name}"
        if cls is None:
            subjects.append(Subject(name, "-", na=f"transformers {transformers.__version__} has no {cls_name}"))
            continue
        if cls_name == "LlamaTokenizer" and not _is_slow(cls):
            subjects.append(Subject(name + "(sentencepiece)", "-", na=(
                f"transformers {transformers.__version__} removed the sentencepiece-backed slow "
                f"LlamaTokenizer: LlamaTokenizer is {cls.__mro__[1].__name__}-based (tested below)")))
        alias = cls_name == "LlamaTokenizerFast" and fast is llama
        flag_list = flag_sets[:1] if alias else flag_sets
        if cls_name == "LlamaTokenizerFast" or not _is_slow(cls):
            flag_list = flag_list + ([] if alias else [("from_slow=True", {"from_slow": True})])
        subjects.append(_hf_subject(name, "vocab_file", "",
                                    lambda cls=cls: cls(vocab_file=str(model))))
        for flags, kw in flag_list:
            s = _hf_subject(name, "from_pretrained", flags,
                            lambda cls=cls, kw=kw: cls.from_pretrained(str(bare), **kw))
            if alias:
                s.info["alias_of"] = "transformers.LlamaTokenizer"
            subjects.append(s)
        saved = workdir / f"saved-{cls_name}"

        def save_and_reload(cls=cls, saved=saved):
            cls.from_pretrained(str(bare)).save_pretrained(str(saved))
            return cls.from_pretrained(str(saved))
        subjects.append(_hf_subject(name, "saved", "", save_and_reload))

    sp_backend = getattr(transformers, "SentencePieceBackend", None)
    if sp_backend is None:
        subjects.append(Subject("transformers.SentencePieceBackend", "-", na=(
            f"transformers {transformers.__version__} has no SentencePieceBackend (5.x only); "
            "its sentencepiece path is the slow LlamaTokenizer")))
    else:
        subjects.append(_hf_subject("transformers.SentencePieceBackend", "vocab_file", "",
                                    lambda: sp_backend(vocab_file=str(model))))
    # AutoTokenizer is what users call on a model folder; 4.x resolves the class from config.json
    # (a folder holding only tokenizer.model does not load at all), so it gets the model folder's
    # minimal shape: tokenizer.model beside a config.json naming the architecture.
    model_folder = workdir / "model-folder"
    model_folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model, model_folder / "tokenizer.model")
    (model_folder / "config.json").write_text('{"model_type": "llama"}\n', encoding="utf-8")
    auto = transformers.AutoTokenizer
    subjects.append(_hf_subject("transformers.AutoTokenizer", "from_pretrained", "",
                                lambda: auto.from_pretrained(str(model_folder))))
    if major < 5:
        subjects.append(_hf_subject("transformers.AutoTokenizer", "from_pretrained", "use_fast=False",
                                    lambda: auto.from_pretrained(str(model_folder), use_fast=False)))
    classes = {n: c for n, c in (("LlamaTokenizer", llama), ("LlamaTokenizerFast", fast), ("AutoTokenizer", auto))
               if c is not None}
    subjects += _saved_by_another(classes, bare, workdir)
    if user_folder is not None:
        for cls_name, cls in classes.items():
            subjects.append(_hf_subject(f"transformers.{cls_name}", "user-folder", "",
                                        lambda cls=cls: cls.from_pretrained(str(user_folder))))
    return subjects


def _saved_by_another(classes: dict, bare: Path, workdir: Path) -> list[Subject]:
    """A folder saved by one class with legacy=False, loaded by another: the flag must travel in
    the folder (tokenizer_config.json), or the loader falls back to its default behaviour."""
    out = []
    savers = {n: c for n, c in classes.items() if n != "AutoTokenizer"}
    for saver_name, saver in savers.items():
        folder = workdir / f"saved-by-{saver_name}-legacy-false"

        def save(saver=saver, folder=folder):
            if not (folder / "tokenizer_config.json").exists():
                saver.from_pretrained(str(bare), legacy=False).save_pretrained(str(folder))
            return folder
        for loader_name, loader in classes.items():
            if loader is saver:
                continue   # same class (5.x: LlamaTokenizerFast is LlamaTokenizer): 'saved' covers it
            out.append(_hf_subject(f"transformers.{loader_name}", f"saved-by-{saver_name}", "legacy=False",
                                   lambda loader=loader, save=save: loader.from_pretrained(str(save()))))
    return out


