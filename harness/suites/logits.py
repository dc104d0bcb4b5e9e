"""The logits suite: every subject over the case matrix, measured against the float64 oracle,
judged with the tolerance policy.

A cell is dtype x attention x pretraining_tp x input. Inputs (the case's ``input``):

  random   seeded random token ids of each --shapes (the structure of the forward)
  tokens   the user's own ids (--tokens FILE)
  corpus   real text (--corpus NAME, --text FILE) in windows of --ctx tokens starting with BOS;
           corpus statistics (llama.cpp's `perplexity --kl-divergence` set and ours) per cell
           (no informational transformers-vs-reference rows: they would double the metric cost)
  padded   rows of different lengths left-padded into one batch, attention mask and positions given
  cached   a prefill, then one token at a time through the KV cache
  full     one row as long as the model's context (max_seq_len / max_position_embeddings), at the
           dtypes suites/logits.toml [full] names: where a RoPE table, cache or mask that breaks
           past a window's length shows

Random, padded, cached and full rows carry the vocabulary's special ids (<unk>, <s>, </s>, the
config's pad id) where they matter (harness.core.cases.with_special_ids).

Subjects (``--subject KIND[:key=value,...]``, repeatable; default: transformers) are built through
the registry of ``harness.subjects``; a kind that takes the matrix's attn / tp axes runs at each of
them unless its spec fixes one. Exact subjects are judged by the policy against the reference's own
error; lossy ones (quantised weights, a low-precision cache) against their budget in
suites/subjects_tolerance.toml, with the error split on real text. What a subject cannot do (a
padding mask, its own cache, a dtype) makes those cells n/a with its reason.

Flow: checkpoint -> oracle logits per input -> reference at each dtype (the calibrator) ->
each subject per cell -> per-position statistics (harness.core.metrics) -> metrics -> verdict rows.
Rows are journaled group by group (the reference at a dtype; a subject at a dtype, attention
and tp; a corpus at a dtype), so a rerun with the same --out resumes. A corpus is streamed window
batch by window batch: the oracle's logits of a batch live only while that batch is compared.
Weights with NaN/Inf, or activations that overflow a narrow dtype, fail the cells they spoil
with the cause named; they never pass and never stop the run.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from harness.core import compat, corpus, deviations, inputs, resources
from harness.core.cases import Shape, make_inputs, with_special_ids
from harness.core.checkpoints import HFFolder, ModelFolder, open_model
from harness.core.datafiles import suite_data
from harness.core.environment import environment
from harness.core.errors import InputError
from harness.core.faults import Fault, faults_for, get_fault
from harness.core.findings import Mechanism
from harness.core.metrics import (CACHE_GAP, CORPUS_GATED, GATED, METRICS, PAIRED, POLICY_METRICS, RATES,
                                  PositionStats, beyond_rounding, cache_gap, cat_stats, corpus_evidence, corpus_stats, curves, paired_ratio,
                                  position_stats, summarize)
from harness.core.store import FAIL, INFO, NA, PASS, Row, fingerprint
from harness.core.subjects import DTYPES, ORACLE, TRUTH, ReferenceSubject, padded_positions, reference_decode
from harness.core.suite import Context, Part, Result, Suite
from harness.core.tolerance import EXTREMES, Policy, load_policy
from reference_model import checkpoint
from reference_model.checkpoint import Checkpoint

from harness.subjects import (AXES, DEFAULT as DEFAULT_SUBJECT, NOT_INSTALLED, OFFERS, NotInstalledError, Spec, built,
                              check_options, factory, is_exact, parse_spec)
from harness.subjects.common import dequantised_checkpoint, source_of
from harness.subjects.fidelity import split_of

SUITE = "logits"
INPUTS = ("random", "tokens", "corpus", "padded", "cached", "full")
# Corpus statistics beyond the common metrics: gated like the means they are, or shown.
# Shown with their intervals, not gated: the sign of a perplexity shift is noise-dominated (the
# mean of per-token log-ratios of either sign), so |ln ratio| of two correct subjects is no yardstick.
CORPUS_INFO = ("ppl_ratio", "same_top1")


class Logits(Suite):
    name = SUITE
    help = "reference vs each subject's logits (default: transformers) over a case matrix"

    def add_arguments(self, p) -> None:
        p.add_argument("--model", help="Meta (params.json + consolidated.*.pth) or HF folder; default: embedded model")
        p.add_argument("--dtypes", type=inputs.csv, help="comma list of float32,bfloat16,float16 (default: all three)")
        p.add_argument("--attn", type=inputs.csv, help="comma list of eager,sdpa,flash_attention_2,flex_attention (default: eager,sdpa)")
        p.add_argument("--tp", type=inputs.csv, help="comma list of pretraining_tp values (default: 1,2)")
        p.add_argument("--shapes", type=inputs.csv, help="comma list of BATCHxSEQ of random ids (default: 1x16,2x64)")
        p.add_argument("--tokens", help="JSON file: a list of equal-length token-id lists to run instead of --shapes "
                                         "(default: none; seeded random ids of --shapes)")
        p.add_argument("--text", help="a UTF-8 text file to measure on, tokenized with the checkpoint's tokenizer "
                                       "(default: none; the --corpus is read)")
        p.add_argument("--corpus", help=f"a named corpus to measure on ({', '.join(corpus.NAMED)}; default: heldout)")
        p.add_argument("--ctx", help="tokens per text window, BOS first (default 512)")
        p.add_argument("--max-tokens", help="text tokens to use at most (default 4096; 'all' for the whole text)")
        p.add_argument("--inputs", type=inputs.csv,
                       help=f"comma list of {', '.join(INPUTS)} (default: random, corpus when a tokenizer is at "
                            "hand, padded, cached, full (one row of the model's whole context, at float32); only "
                            "the given ones when --shapes/--tokens/--text/--corpus is)")
        p.add_argument("--tokenizer", help="SentencePiece tokenizer.model (or a folder holding one): the checkpoint's "
                                           "vocab_size must match it (fills params.json's -1); tokenizes the text "
                                           "(default: the model folder's, else the built Llama 2 fixture "
                                           "for a 32000-piece vocabulary)")
        p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
        p.add_argument("--seed", default="0", help="input seed (default 0)")
        p.add_argument("--policy", help="tolerance policy TOML (default: suites/tolerance.toml)")
        deviations.add_argument(p)
        p.add_argument("--subject", action="append",
                       help="KIND[:key=value,...], repeatable: the implementations judged (default: transformers), "
                            "e.g. transformers:compile=1, torchao:quant=int8wo, onnxruntime, llama.cpp:quant=Q8_0 "
                            "(docs/subjects.md)")
        p.add_argument("--plant", help=f"plant a known porting bug in every subject it can edit: "
                                       f"{', '.join(faults_for(SUITE))}")
        p.add_argument("--no-localise", action="store_true",
                       help="skip naming the first diverging layer/op of failing cells")
        p.add_argument("--no-resume", action="store_true", help="forget finished cells journaled in --out; rerun all")

    def run(self, a, ctx: Context) -> Result:
        plan = Plan.from_args(a, ctx)
        ctx.begin(resume=not a.no_resume)
        return Measure(plan, ctx).run()


# --- inputs --------------------------------------------------------------------------------------

@dataclass
class Input:
    kind: str                           # one of INPUTS
    shape: Shape                        # batch x seq (a corpus: windows x ctx)
    ids: torch.Tensor
    mask: torch.Tensor | None = None    # padded: 1 where a real token sits
    targets: torch.Tensor | None = None  # corpus: the next token of every position (-1: none)
    prefill: int = 0                    # cached
    batch: int = 0                      # corpus: windows per forward
    label: str = ""                     # corpus: which text
    source: dict | None = None          # corpus: the text, the tokenizer that cut it, tokens not measured
    dtypes: tuple[str, ...] | None = None  # measured only at these dtypes (None: every dtype of the run)

    def at(self, dtype: str) -> bool:
        return self.dtypes is None or dtype in self.dtypes

    @property
    def name(self) -> str:
        return f"corpus:{self.label}" if self.kind == "corpus" else self.kind

    def key(self) -> str:
        return f"{self.name}/{self.shape}"

    def describe(self) -> dict:
        d = {"input": self.name, "shape": str(self.shape)}
        if self.kind == "cached":
            d["prefill"] = self.prefill
        if self.kind == "padded":
            d["lengths"] = self.mask.sum(-1).tolist()
        return d


def padded_input(lengths: list[int], vocab: int, seed: int, pad_id: int | None = None) -> Input:
    width = max(lengths)
    base = make_inputs(Shape(len(lengths), width), vocab, seed + 17)
    ids = torch.zeros_like(base)
    mask = torch.zeros_like(base)
    for i, n in enumerate(lengths):          # left padding, as generation batches are padded
        ids[i, width - n:] = with_special_ids(base[i:i + 1, :n], pad_id)[0]
        mask[i, width - n:] = 1
    return Input("padded", Shape(len(lengths), width), ids, mask=mask)


@dataclass
class Plan:
    """Everything a run needs, validated before anything in --out changes."""
    folder: ModelFolder
    ckpt: Checkpoint
    dtypes: list[str]
    attns: list[str]
    tps: list[int]
    inputs: list[Input]
    device: str
    seed: int
    policy: Policy
    fault: Fault | None
    localise: bool
    tokens_path: Path | None
    tokenizer_vocab: int | None
    subjects: list[Spec] = field(default_factory=list)
    tokenizer: Path | None = None
    notes: list[str] = field(default_factory=list)
    known: list = field(default_factory=list)      # --known FILE: the user's own accepted findings

    @classmethod
    def from_args(cls, a, ctx: Context) -> "Plan":
        data = suite_data(SUITE)
        d = data["defaults"]
        known = deviations.user_deviations(a)      # a bad --known file is exit 2 before any model loads
        if a.tokens and a.shapes:
            raise InputError("--tokens and --shapes: give one (the token file fixes the shape)")
        if a.text and a.corpus:
            raise InputError("--text and --corpus: give one")
        tokens = inputs.token_file(a.tokens) if a.tokens else None
        vocab = tokenizer_vocab(a.tokenizer) if a.tokenizer else None
        device = inputs.device(a.device)
        seed = inputs.seed(a.seed)
        dtypes = inputs.choices("--dtypes", a.dtypes if a.dtypes is not None else d["dtypes"], inputs.KNOWN_DTYPES)
        attns = inputs.choices("--attn", a.attn if a.attn is not None else d["attn"], inputs.KNOWN_ATTN)
        compat.usable_attns("--attn", attns, device)
        tps = inputs.positive_ints("--tp", a.tp if a.tp is not None else [str(t) for t in d["tp"]])
        if all(t > 1 for t in tps) and not compat.tp_honoured():
            raise InputError(f"--tp {','.join(map(str, tps))}: {compat.TP_NOOP}, so nothing would be measured")
        shapes = inputs.shapes("--shapes", a.shapes if a.shapes is not None else d["shapes"])
        kinds = cls.kinds(a)
        policy = load_policy(a.policy, metrics=POLICY_METRICS).require(
            dtypes, GATED + list(PAIRED) + list(RATES) + list(CACHE_GAP))
        fault = get_fault(a.plant, SUITE)
        specs = [parse_spec(t) for t in (a.subject or [DEFAULT_SUBJECT])]
        for spec in specs:      # an unknown kind or a bad option is exit 2 before anything in --out changes
            check_options(spec, dtypes[0], device)
        if len({s.label() for s in specs}) < len(specs):
            raise InputError(f"--subject: {', '.join(s.label() for s in specs)}: a subject given twice")
        folder = open_model(a.model, vocab_size=vocab)
        args = folder.args
        notes: list[str] = []
        text = cls.text_windows(a, data["corpus"], folder, kinds, notes)
        if text is not None:
            policy.require(dtypes, CORPUS_GATED)
        elif "corpus?" in kinds and a.shapes is None:
            # No real text for this model: the default matrix still gets one long input, where
            # position-dependent bugs (RoPE precision, scaling, windows) show.
            long = inputs.shape("suites/logits.toml [defaults] long_shape", d["long_shape"])
            shapes = [*shapes, Shape(long.batch, min(long.seq, args.max_seq_len))]
        plan_shapes = ([Shape(len(tokens), len(tokens[0]))] if tokens else list(shapes) if "random" in kinds else [])
        plan_shapes += [Shape(text.batch, text.shape.seq)] if text else []
        full = cls.full_window(a, data["full"], kinds, dtypes, args)
        if full is not None and a.inputs is None:
            # the default full-context row is dropped, with a note, where it does not fit (it may
            # need GBs for the oracle's attention); asked for with --inputs, it is checked like any
            try:
                ctx.check_memory(resources.logits_run(args, dtypes, [*plan_shapes, full], folder.stored_bytes), device)
            except InputError as e:
                notes.append(f"note: no full-context row ({full}, the model's max_seq_len): {e}; "
                             "--inputs ...,full insists")
                full = None
        plan_shapes += [full] if full is not None else []
        ctx.check_memory(resources.logits_run(args, dtypes, plan_shapes or [Shape(1, 16)], folder.stored_bytes), device)
        ckpt = folder.load(vocab_size=vocab)
        pad = config_pad_id(folder, ckpt.args.vocab_size)
        ins: list[Input] = []
        if tokens is not None:
            inputs.token_ids_in_vocab(f"--tokens {a.tokens}", tokens, ckpt.args.vocab_size)
            t = torch.tensor(tokens, dtype=torch.long)
            ins.append(Input("tokens", Shape(*t.shape), t))
        else:
            ins += seeded_inputs(data, [k for k in kinds if k == "random"], shapes, ckpt.args.vocab_size, seed, pad)
        if text is not None:
            ins.append(text)
        ins += seeded_inputs(data, [k for k in kinds if k != "random"], shapes, ckpt.args.vocab_size, seed, pad,
                             full, dtypes)
        if not ins:
            raise InputError("--inputs: nothing to measure on")
        tok = Path(a.tokenizer) if a.tokenizer else folder.path / "tokenizer.model"
        tok = tok / "tokenizer.model" if tok.is_dir() else tok
        return cls(folder, ckpt, dtypes, attns, tps, ins, device, seed, policy, fault, not a.no_localise,
                   Path(a.tokens) if a.tokens else None, vocab, specs, tok if tok.is_file() else None, notes,
                   known)

    @staticmethod
    def kinds(a) -> list[str]:
        if a.inputs is not None:
            return inputs.choices("--inputs", a.inputs, INPUTS)
        given = [k for k, v in (("random", a.shapes), ("tokens", a.tokens), ("corpus", a.text or a.corpus)) if v]
        return given or ["random", "corpus?", "padded", "cached", "full"]  # corpus? = when a tokenizer is at hand

    @staticmethod
    def full_window(a, cfg: dict, kinds: list[str], dtypes: list[str], args) -> Shape | None:
        """One row of the model's whole context, at the [full] dtypes this run measures (none of
        them: no row). Explicit --inputs full with none of them measures it at every dtype given."""
        if "full" not in kinds:
            return None
        if a.inputs is None and not any(d in cfg.get("dtypes", ()) for d in dtypes):
            return None
        return inputs.shape("the model's max_seq_len", f"1x{args.max_seq_len}")

    @staticmethod
    def text_windows(a, cfg: dict, folder: ModelFolder, kinds: list[str], notes: list[str]) -> Input | None:
        if "corpus" not in kinds and "corpus?" not in kinds:
            return None
        ctx_len = inputs.integer("--ctx", a.ctx, 2, inputs.MAX_SEQ) if a.ctx else cfg["ctx"]
        if a.max_tokens == "all":
            limit = None
        else:
            limit = inputs.integer("--max-tokens", a.max_tokens, 1, 10 ** 9) if a.max_tokens else cfg["max_tokens"]
        try:
            sp, voc = corpus.tokenizer_for(folder.path, folder.args.vocab_size, a.tokenizer)
        except InputError as e:
            if "corpus" in kinds:
                raise
            notes.append(f"note: no real-text cells ({e})")
            return None
        label, text = corpus.text_of(a.corpus or (None if a.text else cfg["name"]), a.text)
        w = corpus.windows(label, text, sp, ctx_len, limit)
        if w.note:
            notes.append(f"note: {w.note}")
        return Input("corpus", Shape(*w.ids.shape), w.ids, targets=w.targets, batch=cfg["batch"],
                     label=Path(label).name if a.text else label,
                     source={"text": label, "tokenizer": voc.describe(), "tokens": w.total, "measured": w.tokens,
                             "not_measured": w.dropped, **({"note": w.note} if w.note else {})})


def config_pad_id(folder: ModelFolder, vocab: int) -> int | None:
    """The pad id an HF config names (a fine-tune's, e.g. <unk> or an added <pad>); Meta has none."""
    if folder.format != "hf":
        return None
    try:
        pad = inputs.read_json("--model", folder.path / "config.json").get("pad_token_id")
    except (InputError, AttributeError):
        return None
    return pad if isinstance(pad, int) and not isinstance(pad, bool) and 0 <= pad < vocab else None


def seeded_inputs(data: dict, kinds: list[str], shapes: list[Shape], vocab: int, seed: int, pad: int | None,
                  full: Shape | None = None, dtypes: list[str] = ()) -> list[Input]:
    """The seeded inputs of ``kinds`` (random, padded, cached, full), each with the special ids."""
    ins = []
    if "random" in kinds:
        ins += [Input("random", s, with_special_ids(make_inputs(s, vocab, seed), pad)) for s in shapes]
    if "padded" in kinds:
        ins.append(padded_input(data["padded"]["lengths"], vocab, seed, pad))
    if "cached" in kinds:
        s = inputs.shape("suites/logits.toml [cached] shape", data["cached"]["shape"])
        ins.append(Input("cached", s, with_special_ids(make_inputs(s, vocab, seed + 29), pad),
                         prefill=data["cached"]["prefill"]))
    if full is not None:
        at = tuple(d for d in dtypes if d in data["full"]["dtypes"])
        ins.append(Input("full", full, with_special_ids(make_inputs(full, vocab, seed + 41), pad), dtypes=at or None))
    return ins


def reference_pools(stats: dict[str, PositionStats], short: list[Input]) -> dict[str, PositionStats]:
    """kind -> the reference's statistics over every input of that kind (only kinds with several)."""
    kinds: dict[str, list[PositionStats]] = {}
    for inp in short:
        if inp.key() in stats:
            kinds.setdefault(inp.kind, []).append(stats[inp.key()])
    return {k: cat_stats(v) for k, v in kinds.items() if len(v) > 1}


def tokenizer_vocab(path: str) -> int:
    """A SentencePiece tokenizer.model's pieces plus the tokens added beside it (a <pad>-resized
    model's added_tokens.json): the vocabulary the checkpoint must have."""
    p = Path(path)
    path = inputs.existing_file("--tokenizer", p / "tokenizer.model" if p.is_dir() else p)
    return corpus.vocabulary(path, "--tokenizer").size


# --- how each subject runs an input ----------------------------------------------------------------

def reference_logits(subject: ReferenceSubject, inp: Input, ids: torch.Tensor | None = None) -> torch.Tensor:
    ids = inp.ids if ids is None else ids
    model, dev = subject.model, subject.device
    if inp.kind == "padded":
        return model(ids.to(dev), key_mask=inp.mask.to(dev), positions=padded_positions(inp.mask).to(dev))
    if inp.kind == "cached":
        return reference_decode(model, ids.to(dev), inp.prefill)
    return subject.logits(ids)


def log_space(x: torch.Tensor) -> torch.Tensor:
    """Logits as log-probabilities (float32 at least, float64 kept): the space a subject that gives
    only log-probabilities (``cannot()["logits"]``) is compared in, its truth and the reference that
    calibrates it taken there too. KL, top-1 and the token statistics are the same in either space;
    max_abs, rel_l2 and nmse of raw logits against log-probabilities would measure the log-partition."""
    return torch.log_softmax(x if x.dtype == torch.float64 else x.float(), dim=-1)


def in_space(rows: list[Row], lp: bool) -> list[Row]:
    """Rows of a log-probability subject say so (their max_abs, rel_l2, nmse are in log-softmax space)."""
    for r in rows if lp else ():
        r.extra["space"] = "log-softmax"
    return rows


# What an input needs of a subject beyond its plain forward (harness.subjects.CAPABILITIES).
NEEDS = {"padded": "padding", "cached": "decode"}


def subject_logits(subject, inp: Input, ids: torch.Tensor | None = None) -> torch.Tensor:
    """A subject (harness.subjects.Subject) on an input: padded rows with their mask, a cached input
    through its own cache, anything else in one forward."""
    ids = inp.ids if ids is None else ids
    if inp.kind == "padded":
        return subject.forward(ids, mask=inp.mask, positions=padded_positions(inp.mask))
    if inp.kind == "cached":
        return subject.decode(ids, inp.prefill)
    return subject.forward(ids)


def own_gap(cached: torch.Tensor, full: torch.Tensor, inp: Input) -> PositionStats:
    """A cached input's logits against the same implementation's full forward at the same dtype."""
    return position_stats(cached, full.to(cached.device, torch.float64), mask=inp.mask)


def oracle_logits(oracle: ReferenceSubject, inp: Input, ids: torch.Tensor | None = None) -> torch.Tensor:
    """The truth: the full float64 forward; for padded rows, each row alone (at its real positions)."""
    ids = inp.ids if ids is None else ids
    if inp.kind != "padded":
        return oracle.logits(ids)
    truth = None
    for i, row in enumerate(ids):
        n = int(inp.mask[i].sum())
        alone = oracle.logits(row[len(row) - n:][None])[0]
        if truth is None:
            truth = torch.zeros(*ids.shape, alone.shape[-1], dtype=alone.dtype, device=alone.device)
        truth[i, len(row) - n:] = alone
    return truth


# --- the run ------------------------------------------------------------------------------------

CORPUS_TRUTH_BYTES = 2 << 30     # a corpus's float64 truth kept across dtypes up to this size

class Measure:
    """One run of the plan: the oracle and the HF folder are made once, when first needed."""

    def __init__(self, plan: Plan, ctx: Context):
        self.plan, self.ctx = plan, ctx
        self.env = environment(plan.device)
        self._notes: dict[str, str] | None = None
        self._oracle: ReferenceSubject | None = None
        self._truth: dict[str, torch.Tensor] = {}
        self._corpus_truth: dict[tuple, torch.Tensor] = {}
        self._hf: HFFolder | None = None
        self.settings = {   # everything that decides a group's rows; a journaled group is reused only if all match
            "suite": SUITE, "model": plan.folder.fingerprint(), "seed": plan.seed,
            "inputs": fingerprint([[i.key(), i.ids.tolist(), None if i.mask is None else i.mask.tolist(),
                                    i.prefill] for i in plan.inputs]),
            "policy": {"version": plan.policy.version,
                       "sha": fingerprint(plan.policy.path.read_text(encoding="utf-8"))},
            "plant": plan.fault.name if plan.fault else None,
            "environment": {k: self.env[k] for k in ("torch", "transformers", "device", "torch_threads",
                                                     "harness_commit", "harness_source_sha256", "code_sha256")},
        }

    # -- shared, made once ----------------------------------------------------------------------
    @property
    def notes(self) -> dict[str, str]:
        """What in the weights spoils each dtype: a scan of every tensor (minutes on a 7B), so made
        only when a cell's logits are not finite and need explaining."""
        if self._notes is None:
            self._notes = weight_notes(self.plan.ckpt, self.plan.dtypes)
        return self._notes

    def oracle(self) -> ReferenceSubject:
        if self._oracle is None:
            self._oracle = ReferenceSubject(self.plan.ckpt, "float64", self.plan.device, oracle=True)
        return self._oracle

    def truth(self, inp: Input) -> torch.Tensor:
        if inp.key() not in self._truth:
            self._truth[inp.key()] = oracle_logits(self.oracle(), inp)   # on the subjects' device
        return self._truth[inp.key()]

    def corpus_truth(self, inp: Input, n: int, ids: torch.Tensor) -> torch.Tensor:
        """The oracle's logits of a corpus batch. Kept for the next dtype while the whole corpus's fit
        in CORPUS_TRUTH_BYTES (the default corpus does); a larger corpus streams, computing each
        batch's truth again per dtype rather than holding windows x ctx x vocab float64 values."""
        key = (inp.key(), n)
        if key in self._corpus_truth:
            return self._corpus_truth[key].to(self.plan.device)
        truth = self.oracle().logits(ids)
        size = inp.ids.numel() * self.plan.ckpt.args.vocab_size * 8
        if len(self.plan.dtypes) > 1 and size <= CORPUS_TRUTH_BYTES:
            self._corpus_truth[key] = truth.cpu()     # kept off the device between dtypes
        return truth

    def hf_path(self) -> Path:
        if self._hf is None:
            self._hf = HFFolder(self.plan.ckpt)
        return self._hf.path

    def source(self):
        """What every subject is built from: these weights, the one HF folder, the build cache."""
        plan = self.plan
        return source_of(plan.folder, plan.ckpt, hf_path=self.hf_path, tokenizer=plan.tokenizer)

    # -- subjects ---------------------------------------------------------------------------------
    def cells(self) -> list[Cell]:
        """Every --subject at every point of the attn x tp matrix its kind takes (a spec that fixes
        an axis runs at that value only); --plant goes to every kind the fault can edit."""
        from harness.core.faults import subject_kinds
        plan, out = self.plan, []
        for spec in plan.subjects:
            axes = AXES.get(spec.kind, ())
            attns = [spec.options["attn"]] if "attn" in spec.options else plan.attns if "attn" in axes else ["-"]
            tps = ([_tp(spec.options["tp"])] if "tp" in spec.options else plan.tps if "tp" in axes else ["-"])
            options = dict(spec.options)
            if plan.fault is not None and "plant" not in options:
                if spec.kind in subject_kinds(type(plan.fault)):
                    options["plant"] = plan.fault.name
                else:
                    self.ctx.note(f"note: --plant {plan.fault.name} edits {', '.join(subject_kinds(type(plan.fault)))} "
                                  f"subjects; {spec.label()} runs unplanted")
            for a in attns:
                for t in tps:
                    given = {**options, **({"attn": a} if a != "-" else {}), **({"tp": str(t)} if t != "-" else {})}
                    out.append(Cell(spec.label(), spec.kind, tuple(sorted(given.items())), a, t))
        return out

    def build(self, cell: Cell, dtype: str):
        """(subject, None), or (None, (status, reason)): n/a when its package is absent or it cannot
        run at this dtype, failed when it fails to load. Bad options are exit 2."""
        options = dict(cell.options)
        try:
            subject = factory(Spec(cell.kind, options))(self.source(), dtype, self.plan.device, options)
        except NotInstalledError as e:
            return None, (NA, str(e))
        except InputError:
            raise
        except Exception as e:  # a release that cannot build this cell fails it, naming the error
            return None, (FAIL, f"{cell.kind} failed to load: {_first_line(e)}")
        cannot = subject.cannot()
        why = cannot.get(NOT_INSTALLED) or cannot.get(f"dtype:{dtype}")
        if why:
            subject.close()
            return None, (NA, why)
        return subject, None

    @staticmethod
    def described(rows: list[Row], subject, cell: Cell, split: dict | None = None) -> list[Row]:
        """The group's first row carries who the subject is: settings, provenance (package versions,
        build flags, KV-cache type, quantisation and fallbacks), what it cannot do and how it is judged."""
        if rows:
            rows[0].extra["subject"] = {"label": cell.label, "kind": cell.kind, "exact": is_exact(subject),
                                        "settings": _plain(subject.settings()), "provenance": _plain(subject.provenance()),
                                        "cannot": dict(subject.cannot())}
        return rows

    def key(self, group: dict) -> str:
        return fingerprint({"run": self.settings, "group": group})

    def cached(self, group: dict, compute) -> list[Row]:
        """The group's rows from the journal, or computed now and journaled."""
        journal = self.ctx.journal()
        rows = journal.get(self.key(group))
        if rows is None:
            rows = compute()
            journal.append(self.key(group), group, rows)
        return rows

    def case(self, dtype: str, attn, tp, inp: Input) -> dict:
        return {"dtype": dtype, "attn": attn, "tp": tp, "shape": str(inp.shape), "input": inp.name,
                "device": self.plan.device}

    def run(self) -> Result:
        plan, started = self.plan, time.perf_counter()
        support = self.env["dtype_support"]
        groups = self.cells()
        rows: list[Row] = []
        bar = _progress(sum((1 + len(groups)) * sum(i.at(d) for i in plan.inputs) for d in plan.dtypes),
                        self.ctx.progress)
        try:
            for dtype in plan.dtypes:
                if not support.get(dtype, False):
                    why = f"{dtype} does not run on {plan.device}"
                    rows += [_na(self.case(dtype, c.attn, c.tp, i), why, c.label)
                             for c in groups for i in plan.inputs if i.at(dtype)]
                    bar.update((1 + len(groups)) * sum(i.at(dtype) for i in plan.inputs))
                    continue
                rows += self.dtype_rows(dtype, groups, bar)
        finally:
            bar.close()
            if self._hf is not None:
                self._hf.close()
        journal = self.ctx.journal()
        if journal.reused:
            self.ctx.note(f"resumed: {len(journal.reused)} finished cell group(s) read from {journal.path}, not rerun")
        # logits has no catalogue of known deviations: only the user's --known entries settle rows
        rows = deviations.settle(rows, plan.known)
        extra = self.summary_extra(rows)
        used = {r.extra["known"]["name"] for r in rows if "known" in r.extra}
        extra["policy"].update(deviations.user_summary(plan.known, used))
        if plan.localise:
            extra.update(localise_failures(plan, rows, self.ctx.notes, self.cells()))
        mechanisms = assign_findings(rows, plan.inputs, extra.get("divergences") or [])
        timing = {"wall_seconds": round(time.perf_counter() - started, 3), "groups_resumed": len(journal.reused)}
        sections = [("Corpus statistics (llama.cpp's perplexity --kl-divergence layout)", corpus_table(rows))] \
            if any(i.kind == "corpus" for i in plan.inputs) else []
        if extra.get("divergences"):
            sections.insert(0, ("Where each failing group diverges first", divergence_table(extra["divergences"])))
        return Result([Part(SUITE, rows, extra, sections=sections, timing=timing, device=plan.device,
                            mechanisms=mechanisms)],
                      plan.notes + self.ctx.notes)

    def dtype_rows(self, dtype: str, groups: list[Cell], bar) -> list[Row]:
        """The reference at this dtype (it calibrates), each subject's group, and the corpus."""
        plan = self.plan
        short = [i for i in plan.inputs if i.kind != "corpus" and i.at(dtype)]
        text = [i for i in plan.inputs if i.kind == "corpus" and i.at(dtype)]
        ref_group = {"subject": "reference", "dtype": dtype}
        journal = self.ctx.journal()
        rows: list[Row] = []
        if short:
            pending = any(journal.entries.get(self.key(g)) is None for g in [ref_group, *(c.group(dtype) for c in groups)])
            calibration = self.reference_pass(dtype, short) if pending else None
            rows += self.cached(ref_group, lambda: calibration[1])
            bar.update(len(short))
            for cell in groups:
                rows += self.cached(cell.group(dtype), lambda: self.subject_rows(dtype, cell, short, calibration))
                bar.update(len(short))
        for inp in text:
            group = {"subject": "corpus", "dtype": dtype, "input": inp.key()}
            rows += self.cached(group, lambda: self.corpus_rows(dtype, groups, inp))
            bar.update(1 + len(groups))
        later = plan.dtypes[plan.dtypes.index(dtype) + 1:]
        for inp in short:       # a full-context truth (GBs at a 32000 vocabulary) is not kept for nothing
            if not any(inp.at(d) for d in later):
                self._truth.pop(inp.key(), None)
        return rows

    # -- short inputs: each subject loaded once, every input through it ---------------------------
    def reference_pass(self, dtype: str, short: list[Input]):
        """({input: PositionStats}, rows, {input: logits}, {input: gap}) of the reference at dtype on
        the short inputs; gap: a cached input's logits against the reference's own full forward."""
        reference = ReferenceSubject(self.plan.ckpt, dtype, self.plan.device)
        stats, rows, logits, gaps = {}, [], {}, {}
        for inp in short:
            logits[inp.key()] = reference_logits(reference, inp)
            st = position_stats(logits[inp.key()], self.truth(inp), mask=inp.mask)
            stats[inp.key()] = st
            if inp.kind == "cached":
                gaps[inp.key()] = own_gap(logits[inp.key()], reference.logits(inp.ids), inp)
            rows += self.judged(self.case(dtype, "-", "-", inp), "reference", st, None, dtype, self.truth(inp), inp,
                                gap=(gaps.get(inp.key()), None))
        return stats, rows, logits, gaps

    def subject_rows(self, dtype: str, cell: Cell, short: list[Input], calibration) -> list[Row]:
        """One subject's group at a dtype; nothing loads for an n/a group."""
        ref_stats, _, ref_logits, ref_gaps = calibration
        label = cell.label
        pools = reference_pools(ref_stats, short)
        why_na = self.not_applicable(dtype, cell.attn, cell.tp)
        if why_na:
            return [_na(self.case(dtype, cell.attn, cell.tp, i), why_na, label) for i in short]
        subject, bad = self.build(cell, dtype)
        if subject is None:
            return [Row(SUITE, self.case(dtype, cell.attn, cell.tp, i), label, ORACLE, "all", None, status=bad[0],
                        reason=bad[1]) for i in short]
        try:
            cannot, exact = subject.cannot(), is_exact(subject)
            lp = "logits" in cannot          # log-probabilities only: compared in log-softmax space
            rows = []
            for inp in short:
                case = self.case(dtype, cell.attn, cell.tp, inp)
                need = NEEDS.get(inp.kind)
                if need in cannot:
                    rows.append(_na(case, f"{label} cannot ({need}): {cannot[need]}", label))
                    continue
                try:
                    logits = subject_logits(subject, inp)
                except Exception as e:
                    rows.append(_failed(case, f"{cell.kind} {inp.kind} forward failed: {_first_line(e)}", label))
                    continue
                truth, ref_st, ref_l = self.truth(inp), ref_stats[inp.key()], ref_logits[inp.key()]
                if logits.shape != truth.shape:
                    rows.append(_failed(case, shape_mismatch(cell.kind, logits, truth, cell.tp), label))
                    continue
                if lp:
                    truth, ref_l = log_space(truth), log_space(ref_l)
                    ref_st = position_stats(ref_l, truth, mask=inp.mask)
                st = position_stats(logits, truth, mask=inp.mask)
                gap = None
                if inp.kind == "cached" and inp.key() in ref_gaps:
                    try:    # the same subject's full forward: what its cache alone changes
                        gap = (own_gap(logits, subject.forward(inp.ids), inp), ref_gaps[inp.key()])
                    except Exception as e:
                        rows.append(_failed(case, f"{cell.kind} full forward of the cached input failed: "
                                                  f"{_first_line(e)}", label))
                judged = in_space(self.judged(case, label, st, ref_st, dtype, truth, inp,
                                              pool=pools.get(inp.kind), gap=gap), lp)
                rows += judged if exact else shown(judged, LOSSY_SHORT)
                pair, why = summarize(position_stats(logits, ref_l, mask=inp.mask))
                rows += [Row(SUITE, case, label, "reference", m, pair[m], status=INFO,
                             reason=why or "informational: same dtype, no truth") for m in METRICS]
                if (isinstance(cell.tp, int) and cell.tp > 1 and inp.kind == "random" and hasattr(subject, "model")
                        and not any(r.metric == "logits_dtype" for r in rows)):
                    rows.append(tp_dtype_row(subject, label, case, cell.tp, logits.dtype, inp.ids))
            return self.described(rows, subject, cell)
        finally:
            subject.close()

    def not_applicable(self, dtype: str, attn, tp) -> str:
        why = compat.attn_reason(attn, self.plan.device) if attn != "-" else ""
        if not why and tp != "-" and tp > 1 and not compat.tp_honoured():
            why = compat.TP_NOOP
        if not why and self.plan.fault is not None and dtype not in self.plan.fault.visible_at:
            self.ctx.note(f"note: --plant {self.plan.fault.name} changes nothing at {dtype}")
        return why

    # -- a corpus: windows outer, every subject of the dtype loaded at once ----------------------
    def corpus_rows(self, dtype: str, groups: list[Cell], inp: Input) -> list[Row]:
        plan = self.plan
        reference = ReferenceSubject(plan.ckpt, dtype, plan.device)
        subjects: dict[Cell, object] = {}
        splits: dict[Cell, ReferenceSubject] = {}     # lossy subjects: the oracle on their own weights
        rows = []
        for cell in groups:
            why = self.not_applicable(dtype, cell.attn, cell.tp)
            if why:
                rows.append(_na(self.case(dtype, cell.attn, cell.tp, inp), why, cell.label))
                continue
            subject, bad = self.build(cell, dtype)
            if subject is None:
                rows.append(Row(SUITE, self.case(dtype, cell.attn, cell.tp, inp), cell.label, ORACLE, "all", None,
                                status=bad[0], reason=bad[1]))
                continue
            subjects[cell] = subject
            if not is_exact(subject) and hasattr(subject, "dequantised"):
                weights = dequantised_checkpoint(plan.ckpt, subject.dequantised())
                if weights is not None:
                    splits[cell] = ReferenceSubject(weights, "float64", plan.device, oracle=True)
        parts: dict = {"reference": [], "reference-lp": [], **{c: [] for c in subjects}}
        split_parts: dict = {c: ([], []) for c in splits}
        lp = {c for c, subject in subjects.items() if "logits" in subject.cannot()}   # log-softmax space
        broken: dict[Cell, str] = {}
        try:
            for n, (ids, targets) in enumerate(corpus.Windows(inp.label, inp.ids, inp.targets, 0, "").batches(inp.batch)):
                truth = self.corpus_truth(inp, n, ids)
                ref = reference.logits(ids)
                parts["reference"].append(position_stats(ref, truth, targets=targets))
                truth_lp = log_space(truth) if lp else None
                if lp:
                    parts["reference-lp"].append(position_stats(log_space(ref), truth_lp, targets=targets))
                for cell, subject in subjects.items():
                    if cell in broken:
                        continue
                    try:
                        logits = subject.forward(ids)
                    except Exception as e:
                        broken[cell] = f"{cell.kind} forward failed: {_first_line(e)}"
                        continue
                    if logits.shape != truth.shape:
                        broken[cell] = shape_mismatch(cell.kind, logits, truth, cell.tp)
                        continue
                    parts[cell].append(position_stats(logits, truth_lp if cell in lp else truth, targets=targets))
                    if cell in splits:       # weights: oracle vs oracle on them; runtime: them vs the subject
                        deq = splits[cell].logits(ids)
                        split_parts[cell][0].append(position_stats(deq, truth, targets=targets))
                        split_parts[cell][1].append(position_stats(logits, log_space(deq) if cell in lp else deq,
                                                                   targets=targets))
                        del deq
                del truth, ref
            ref_stats = cat_stats(parts["reference"])
            rows += self.judged(self.case(dtype, "-", "-", inp), "reference", ref_stats, None, dtype, None, inp)
            for cell, subject in subjects.items():
                case = self.case(dtype, cell.attn, cell.tp, inp)
                if cell in broken:
                    rows.append(_failed(case, broken[cell], cell.label))
                    continue
                st = cat_stats(parts[cell])
                calibrator = cat_stats(parts["reference-lp"]) if cell in lp else ref_stats
                judged = in_space(self.judged(case, cell.label, st, calibrator, dtype, None, inp), cell in lp)
                split = split_of(*(cat_stats(p) for p in split_parts[cell])) if cell in splits else None
                if not is_exact(subject):
                    judged = self.budget_rows(judged, case, cell, subject, st, split)
                self.described(judged, subject, cell)
                if split:
                    next(r for r in judged if r.metric == "kl_max").extra["split"] = split
                rows += judged
        finally:
            for subject in subjects.values():
                subject.close()
        return rows

    def budget_rows(self, judged: list[Row], case: dict, cell: Cell, subject, st: PositionStats,
                    split: dict | None) -> list[Row]:
        """A lossy subject's corpus cell: the metrics its budget names are judged against it, the
        rest shown; the budget's other figures (top-1, perplexity, the split) as rows of their own."""
        from harness.subjects.fidelity import Fidelity, budget_for, judge_lossy, load_budgets
        version, budgets = load_budgets()
        settings = subject.settings()
        budget = budget_for(cell.kind, settings, budgets)
        if budget is None:
            return shown(judged, f"lossy subject with no budget for {cell.kind} {_settings(settings)} in "
                                 "suites/subjects_tolerance.toml: shown, not judged") + [
                Row(SUITE, case, cell.label, ORACLE, "budget", None, status=NA,
                    reason=f"no [[budget]] for {cell.kind} matching {_settings(settings)}")]
        if any(r.status == FAIL and r.metric != "all" and "non-finite" in r.reason for r in judged):
            return judged
        verdicts = {m: (v, lim, status, reason) for m, v, lim, status, reason in
                    judge_lossy(Fidelity(cell.label, settings, {}, st, corpus_stats(st), split or {}), budget)}
        why = f"budget {_settings(budget.match)} (suites/subjects_tolerance.toml {version}): {budget.measured}"
        out = []
        for r in judged:
            if r.metric in verdicts:
                v, lim, status, reason = verdicts.pop(r.metric)
                r.tolerance, r.status, r.reason = lim, status, reason or why
            elif r.status != INFO:
                r.status, r.reason = INFO, "lossy: shown; its budget judges it"
            out.append(r)
        out += [Row(SUITE, case, cell.label, ORACLE, m, v, lim, status, reason or why)
                for m, (v, lim, status, reason) in verdicts.items()]
        return out

    # -- judging ----------------------------------------------------------------------------------
    def judged(self, case: dict, subject: str, st: PositionStats, ref: PositionStats | None, dtype: str,
               truth: torch.Tensor | None, inp: Input, pool: PositionStats | None = None,
               gap: tuple[PositionStats | None, PositionStats | None] | None = None) -> list[Row]:
        """The cell's rows: every metric judged by the policy against the reference's same value (the
        reference itself against the hard ceilings), flips counted beyond rounding, corpus statistics.

        Extremes are judged against the reference's extreme over ``pool`` when it is larger: every
        position of the inputs of the same kind at this dtype (random ids: 1x16 and 2x64 together),
        not the cell's own 16, whose maximum is one small draw. The paired ratio (kl_ratio_lo) is
        what a precision regression of one path fails on at every dtype: it compares every position
        with the reference's same position on the same path (the cached cell with the reference's
        own cache).

        ``gap`` (cached input): (this implementation's cached logits against its own full forward,
        the reference's the same). cache_gap judges the first, in units of the reference's error on
        the cell, against the policy's floor or factor x the reference's own gap: the forward's
        rounding is common to both paths of one implementation, so a cache that loses precision
        shows at a dtype where the end-to-end error hides it (keys in bfloat16 in a float16 cache)."""
        policy = self.plan.policy
        values, why = summarize(st)
        if why:
            why = explain_nonfinite(why, dtype, truth, self.notes)
        elif truth is not None and not bool(torch.isfinite(truth).all()):
            bad = int((~torch.isfinite(truth)).sum())
            why = explain_nonfinite(f"non-finite float64 oracle logits: {bad} values "
                                    f"({'NaN' if torch.isnan(truth).any() else 'Inf'})", dtype, truth, self.notes)
        ref_values = summarize(ref)[0] if ref is not None else None
        if ref_values is not None and pool is not None and len(pool) > len(ref) and not pool.nonfinite:
            pooled = summarize(pool)[0]
            for m in EXTREMES:
                ref_values[m] = max(ref_values[m], pooled[m])
        paired = paired_ratio(st, ref) if ref is not None and not why else None
        if paired is not None:
            values["kl_ratio_lo"], ref_values["kl_ratio_lo"] = paired["kl_ratio_lo"], 1.0
        if gap is not None and gap[0] is not None and not why:
            scale = ref if ref is not None else st
            values["cache_gap"] = cache_gap(gap[0], scale)
            if ref_values is not None and gap[1] is not None:
                ref_values["cache_gap"] = cache_gap(gap[1], scale)
        max_factor = policy.limit(dtype, "max_abs").max_factor or policy.limit(dtype, "max_abs").factor
        values.update(beyond_rounding(st, ref if ref is not None else st, max_factor))
        if ref_values is not None:
            ref_values.update(beyond_rounding(ref, ref, max_factor))
        extra_rows = {}
        if inp.kind == "corpus":
            c = corpus_stats(st)
            values.update({m: c[m] for m in CORPUS_GATED})
            if ref is not None:
                rc = corpus_stats(ref)
                ref_values.update({m: rc[m] for m in CORPUS_GATED})
            extra_rows = {"corpus": {k: v for k, v in c.items()}}
        rows = []
        for m in [*GATED, *PAIRED, *CACHE_GAP, *RATES, *(CORPUS_GATED if inp.kind == "corpus" else ())]:
            if m not in values:
                continue
            tol, status, reason = policy.judge(dtype, m, values[m],
                                               None if ref_values is None else ref_values.get(m, math.nan))
            if m in RATES:
                status = INFO if not why else FAIL
                reason = why or (f"a rate over {len(st)} positions; top1_flips/topk_misses gate the flips "
                                 "rounding cannot explain")
            elif why:
                status, reason = FAIL, why
            elif m in PAIRED:
                reason = (f"{'' if status == PASS else reason + ': '}KL {paired['gm']:.3g}x the reference's at the "
                          f"same positions (geometric mean over {paired['n']}; lower 3-sigma bound {values[m]:.3g})")
            elif m in CACHE_GAP:
                mine = float(gap[0].kl.mean())
                reason = (f"{'' if status == PASS else reason + ': '}cached against its own full forward: KL mean "
                          f"{mine:.3g}, {values[m]:.3g}x the reference's error on the cell"
                          + ("" if ref_values is None or gap[1] is None else
                             f"; the reference's own cache {ref_values[m]:.3g}x"))
            rows.append(Row(SUITE, case, subject, ORACLE, m, values[m], tol, status, reason))
        if inp.kind == "corpus" and not why:
            c = extra_rows["corpus"]
            for m in CORPUS_INFO:
                rows.append(Row(SUITE, case, subject, ORACLE, m, c[m], None, INFO,
                                f"95% interval {c[m + '_lo']:.6g} .. {c[m + '_hi']:.6g} over {int(c['n'])} positions"))
        self.attach(rows, st, inp, extra_rows)
        return rows

    @staticmethod
    def attach(rows: list[Row], st: PositionStats, inp: Input, extra: dict) -> None:
        """Evidence for the report: error along the position, and a corpus's KL histogram."""
        if inp.kind == "corpus":
            ev = {**extra, **corpus_evidence(st, inp.shape.batch, inp.shape.seq)}
            per = curves(st, inp.shape.batch, inp.shape.seq)
        else:
            ev, per = {}, curves(st, inp.shape.batch, inp.shape.seq) if inp.mask is None else {}
        for r in rows:
            if r.metric == "max_abs" and "per_position" in per:
                r.extra["per_position"] = per["per_position"]
            elif r.metric == "kl_max":
                if "kl_per_position" in per:
                    r.extra["kl_per_position"] = per["kl_per_position"]
                r.extra.update(ev)

    def summary_extra(self, rows: list[Row]) -> dict:
        plan = self.plan
        nonfinite = any(r.status == FAIL and "non-finite" in r.reason for r in rows)
        return {
            "model": {"path": str(plan.folder.path), "format": plan.ckpt.source, "shards": plan.ckpt.n_shards,
                      "fingerprint": fingerprint(self.settings["model"]),
                      "args": dict(vars(plan.ckpt.args))},
            "truth": TRUTH,
            "seed": plan.seed,
            "inputs": {"tokens": str(plan.tokens_path) if plan.tokens_path else None,
                       "shapes": [str(i.shape) for i in plan.inputs],
                       "cells": [i.describe() for i in plan.inputs], "sha": self.settings["inputs"]},
            "policy": {"path": str(plan.policy.path), "version": plan.policy.version},
            "plant": plan.fault.name if plan.fault else None,
            "tokenizer_vocab": plan.tokenizer_vocab,
            "subjects": subjects_of(rows),
            "text": next((i.source for i in plan.inputs if i.source), None),
            "weights": ({d: n for d, n in self.notes.items() if n} or None) if nonfinite else None,
        }


# --- rows ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Cell:
    """One subject at one point of the matrix: a --subject spec with the suite's axes filled in."""
    label: str              # the rows' subject: the spec as given ("transformers", "torchao:quant=int8wo")
    kind: str
    options: tuple          # (key, value) pairs for the kind's factory, axes and --plant included
    attn: str               # the case's attn and tp ("-" where the kind has no such axis)
    tp: object

    def group(self, dtype: str) -> dict:
        return {"subject": self.label, "dtype": dtype, "attn": self.attn, "tp": self.tp}


# Lossy subjects on short random inputs: there is no budget for random ids, only for real text.
LOSSY_SHORT = "lossy subject: shown; judged by its budget on real text (suites/subjects_tolerance.toml)"


def shown(rows: list[Row], reason: str) -> list[Row]:
    """Rows made informational (failures that say the logits are not finite stay failures)."""
    for r in rows:
        if r.status in (PASS, FAIL) and "non-finite" not in r.reason:
            r.status, r.reason, r.tolerance = INFO, reason, None
    return rows


def _tp(value: str):
    return int(value) if value.isdigit() else value


def _settings(settings: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(settings.items())) or "-"


def _plain(obj):
    """JSON-able copy (provenance may hold paths, tuples, numbers of numpy types)."""
    import json
    return json.loads(json.dumps(obj, default=str))


def _na(case: dict, why: str, subject: str) -> Row:
    return Row(SUITE, case, subject, ORACLE, "all", None, status=NA, reason=why)


def _failed(case: dict, why: str, subject: str) -> Row:
    return Row(SUITE, case, subject, ORACLE, "all", None, status=FAIL, reason=why)


def _first_line(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def shape_mismatch(kind: str, logits: torch.Tensor, truth: torch.Tensor, tp) -> str:
    why = f"{kind} returned logits of shape {tuple(logits.shape)}, the oracle {tuple(truth.shape)}"
    vocab = truth.shape[-1]
    if isinstance(tp, int) and tp > 1 and vocab % tp and logits.shape[-1] == tp * (vocab // tp):
        why += (f": pretraining_tp={tp} slices lm_head into {vocab} // {tp} = {vocab // tp} rows and drops the "
                f"last {vocab % tp} vocabulary entries")
    return why


FIDELITY_HEAD = ("subject", "dtype", "attn", "tp", "Mean KLD", "Median KLD", "99% KLD", "99.9% KLD", "Max KLD",
                 "Same top p", "RMS Δp", "PPL ratio", "KLD weights", "KLD runtime", "verdict")


def fidelity_rows(rows: list[Row]) -> list[list[str]]:
    """One line per corpus cell in llama.cpp's `perplexity --kl-divergence` layout (against the
    oracle), with the error split of lossy subjects, sorted by mean KL (closest to the truth first)."""
    verdicts: dict[tuple, str] = {}
    for r in rows:
        if r.against == ORACLE and str(r.case.get("input", "")).startswith("corpus"):
            k = (r.subject, r.case["dtype"], r.case["attn"], r.case["tp"])
            if r.status == FAIL or (r.status == PASS and verdicts.get(k) != FAIL):
                verdicts[k] = r.status
    found = []
    for r in rows:
        c = r.extra.get("corpus") if r.metric == "kl_max" else None
        if not c or r.against != ORACLE:
            continue
        sp = r.extra.get("split") or {}
        key = (r.subject, r.case["dtype"], r.case["attn"], r.case["tp"])
        found.append((c["kl_mean"], [str(x) for x in (
            *key, f"{c['kl_mean']:.4g} ± {c['kl_mean_se']:.2g}", f"{c['kl_median']:.4g}", f"{c['kl_p99']:.4g}",
            f"{c['kl_p99_9']:.4g}", f"{c['kl_max']:.4g}",
            f"{100 * c['same_top1']:.3f} ± {100 * c['same_top1_se']:.3f} %",
            f"{100 * c['rms_dp']:.4g} ± {100 * c['rms_dp_se']:.2g} %",
            f"{c['ppl_ratio']:.6f} ± {c['ppl_ratio_se']:.2g}",
            f"{sp['weights_kl_mean']:.3g}" if sp else "-", f"{sp['runtime_kl_mean']:.3g}" if sp else "-",
            verdicts.get(key, INFO))]))
    return [line for _, line in sorted(found, key=lambda f: f[0])]


def corpus_table(rows: list[Row]) -> str:
    """The fidelity table of every subject on the corpus, and where each subject's numbers come from."""
    from harness.results.markdown import md_escape
    lines = ["| " + " | ".join(FIDELITY_HEAD) + " |", "|" + "---|" * len(FIDELITY_HEAD)]
    lines += ["| " + " | ".join(md_escape(x) for x in line) + " |" for line in fidelity_rows(rows)]
    n = next((r.extra["corpus"]["n"] for r in rows if r.metric == "kl_max" and r.extra.get("corpus")), None)
    note = (f"\n{int(n)} positions per cell; ± is one standard error; truth: the float64 oracle; sorted by mean KL. "
            "KLD weights: the oracle on the subject's own dequantised weights; KLD runtime: the subject "
            "against that (lossy subjects).\n") if n else ""
    return "\n".join(lines) + "\n" + note + provenance_table(rows)


def subjects_of(rows: list[Row]) -> dict[str, dict]:
    """label -> what the subject said of itself (settings, provenance, cannot), from its rows."""
    out: dict[str, dict] = {}
    for r in rows:
        if "subject" in r.extra:
            out.setdefault(r.subject, r.extra["subject"])
    return out


def provenance_table(rows: list[Row]) -> str:
    from harness.results.markdown import md_escape
    subjects = subjects_of(rows)
    if not subjects:
        return ""
    lines = ["", "| subject | judged | settings | provenance | cannot |", "|---|---|---|---|---|"]
    for label, d in sorted(subjects.items()):
        lines.append("| " + " | ".join(md_escape(x) for x in (
            label, "exact: the logits rule" if d["exact"] else "lossy: its budget", _settings(d["settings"]),
            "; ".join(f"{k}={_short(v)}" for k, v in d["provenance"].items()),
            "; ".join(sorted(d["cannot"])) or "-")) + " |")
    return "\n".join(lines) + "\n"


def _short(v) -> str:
    import json
    text = v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str)
    return text if len(text) <= 160 else text[:157] + "..."


# --- non-finite logits: say why ------------------------------------------------------------------

def weight_notes(ckpt: Checkpoint, dtypes: list[str]) -> dict[str, str]:
    """dtype -> what in the weights spoils cells at that dtype ('' when nothing); float64 is the oracle."""
    notes = {}
    for dtype in ["float64", *dtypes]:
        bad = checkpoint.nonfinite_weights(ckpt.state, DTYPES[dtype])
        notes[dtype] = "; ".join(f"{k}: {v}" for k, v in list(bad.items())[:3]) + (
            f"; and {len(bad) - 3} more tensors" if len(bad) > 3 else "")
    return notes


def explain_nonfinite(why: str, dtype: str, truth: torch.Tensor | None, notes: dict[str, str]) -> str:
    """Say why logits are not finite: bad weights, or a dtype whose range the activations outgrew."""
    truth_ok = truth is None or bool(torch.isfinite(truth).all())
    if notes.get(dtype) or notes.get("float64"):
        return f"{why}; the weights: {notes.get(dtype) or notes['float64']}"
    if truth_ok and dtype in ("float16", "bfloat16"):
        top = torch.finfo(DTYPES[dtype]).max
        return f"{why}; overflow: activations exceed {dtype}'s range (max {top:.6g}) while the float64 oracle stays finite"
    return why


# --- where failing cells diverge -----------------------------------------------------------------

def localise_failures(plan: Plan, rows: list[Row], notes: list[str] | None = None, cells: list | None = None) -> dict:
    """For each failing group of a subject that takes per-layer captures (the default one, or an
    exact subject whose kind offers "hooks": its own module is hooked), name the first layer and op
    that diverge, on the group's first failing plain input (a corpus: its first window). A group
    whose only failures are padded or cached inputs is named by that mechanism: its full unpadded
    forward agrees, and what differs is the mask or the cache. A subject that cannot be localised
    says why once (no hooks; lossy: its error enters at every quantised weight, and the error split
    says how much is the weights'). A localisation error is reported, never fatal."""
    from harness.scale.localise import first_divergence
    described = {r.subject: r.extra["subject"] for r in rows if "subject" in r.extra}
    by_cell = {(c.label, c.attn, c.tp): c for c in cells or []}
    failing: dict[tuple, list[Row]] = {}
    unhooked: dict[str, str] = {}
    for r in rows:
        if r.subject == "reference" or r.against != ORACLE or r.status != FAIL:
            continue
        why = _unlocalisable(r.subject, described.get(r.subject, {}), (r.subject, r.case["attn"], r.case["tp"]) in by_cell)
        if why:
            unhooked.setdefault(r.subject, why)
            continue
        failing.setdefault((r.subject, r.case["dtype"], r.case["attn"], r.case["tp"]), []).append(r)
    if notes is not None:
        notes += [f"note: {label} fails and is not localised: {why}" for label, why in unhooked.items()]
    if not failing:
        return {}
    by_key = {(i.name, str(i.shape)): i for i in plan.inputs}
    found = []
    with HFFolder(plan.ckpt) as hf:
        source = source_of(plan.folder, plan.ckpt, hf_path=lambda: hf.path, tokenizer=plan.tokenizer)
        for (label, dtype, attn, tp), group in failing.items():
            kinds = [(by_key[(r.case["input"], r.case["shape"])], r) for r in group]
            plain = [(inp, r) for inp, r in kinds if inp.kind not in ("padded", "cached")]
            if not plain:
                inp, r = kinds[0]
                found.append({"case": dict(r.case), **_mechanism(inp.kind), "subject": label})
                continue
            inp, r = plain[0]
            ids = inp.ids[:1] if inp.kind == "corpus" else inp.ids
            # a full-context row is localised on the block's coarse ops: the fine ones hold the
            # attention weights, seq^2 per head (GBs at 4096 positions)
            fine = inp.kind != "full"
            make = None
            if label != DEFAULT_SUBJECT:       # built as the run built it: its options, axes and plant
                cell = by_cell[(label, attn, tp)]
                make = (lambda c: lambda dt: built(Spec(c.kind, dict(c.options)), source, dt, plan.device, {},
                                                   "hooks"))(cell)
            try:
                d = first_divergence(plan.ckpt, hf.path, ids, dtype, plan.device, attn if attn != "-" else "eager",
                                     tp if tp != "-" else 1, plan.fault, fine=fine, failed=True, subject=make)
            except Exception as e:  # noqa: BLE001 - evidence gathering must not lose the verdict
                d = {"layer": None, "op": None, "error": _first_line(e)}
            # what diverged (the reference is what it is measured beside)
            found.append({"case": dict(r.case), **{k: v for k, v in d.items() if _jsonable(v)}, "subject": label})
    return {"first_divergence": found[0], "divergences": found}


def _unlocalisable(label: str, described: dict, known_cell: bool) -> str:
    """Why a failing subject's groups are not localised ('' when they are)."""
    cannot = described.get("cannot", {})
    if "hooks" in cannot:
        return cannot["hooks"]
    if label == DEFAULT_SUBJECT:
        return ""
    kind = described.get("kind", label.split(":")[0])
    if "hooks" not in OFFERS.get(kind, ()) or not known_cell:
        return f"{kind} offers no per-layer hooks on a torch module of its own"
    if not described.get("exact", False):
        return ("lossy: its error enters at every quantised weight, so a first divergence would name the first "
                "one (the error split says how much of it is the weights')")
    return ""


# --- pretraining_tp's own contract: the same outputs as tp 1, in the same dtype ---------------------

TP_CHECKS = {"logits_dtype": Mechanism(
    "tp-logits-dtype",
    "LlamaForCausalLM with pretraining_tp > 1 returns logits in the model's dtype, with pretraining_tp=1 in "
    "float32: the tp > 1 branch of the head skips the upcast (values equal, dtype differs)",
    reproduction="LlamaForCausalLM.from_pretrained(path, torch_dtype=torch.bfloat16, pretraining_tp=2)(ids).logits"
                 ".dtype -> torch.bfloat16; pretraining_tp=1 -> torch.float32",
    releases="==4.45.*")}


def tp_dtype_row(subject, label: str, case: dict, tp: int, got: torch.dtype, ids: torch.Tensor) -> Row:
    """The dtype of a tp > 1 cell's logits against the same model's at pretraining_tp=1 (one short
    forward with the config switched, which every release that honours tp reads at call time)."""
    config = subject.model.config
    config.pretraining_tp = 1
    try:
        with torch.inference_mode():
            want = subject.model(input_ids=ids[:1, :2].to(subject.device), use_cache=False).logits.dtype
    finally:
        config.pretraining_tp = tp
    name = lambda d: str(d).replace("torch.", "")     # noqa: E731
    case = {**case, "input": "-", "shape": "-"}
    if got == want:
        return Row(SUITE, case, label, f"{label}-tp1", "logits_dtype", 0.0, 0.0, PASS,
                   f"{name(got)} logits, as at pretraining_tp=1")
    return Row(SUITE, case, label, f"{label}-tp1", "logits_dtype", 1.0, 0.0, FAIL,
               f"pretraining_tp={tp} returns {name(got)} logits, pretraining_tp=1 {name(want)} (same model, same call)")


# --- findings: one per mechanism, not one per failing metric ----------------------------------------

PATHS = {   # input kind -> the code path that only that kind exercises
    "cached": ("kv-cache", "decoding with the KV cache diverges while full forwards agree"),
    "padded": ("attention-mask", "the attention mask of a left-padded batch diverges while unpadded forwards agree"),
    "full": ("long-positions", "positions past the short windows diverge (a RoPE table, cache or mask that breaks "
                               "with length) while every short input agrees"),
}
ERRORS = (("transformers failed to load", "load-failed", "transformers cannot build the cell"),
          ("forward failed", "forward-failed", "transformers' forward raises"),
          ("returned logits of shape", "logits-shape", "transformers returns logits of the wrong shape"),
          ("non-finite", "non-finite", "non-finite logits"))


def assign_findings(rows: list[Row], ins: list[Input], found: list[dict]) -> dict[str, Mechanism]:
    """Name each failing transformers row's mechanism in ``extra["finding"]`` (harness.core.findings):
    within a (dtype, attn, tp) group, the path its failing inputs share (only cached: the KV cache;
    only padded: the mask; only the full-context row: long positions; else the forward) and, when
    localised, the first diverging point; groups that share both are one finding. A failure only at
    tp > 1, whose tp 1 sibling passes, is named as pretraining_tp's. Returns the mechanisms."""
    kind_of = {(i.name, str(i.shape)): i.kind for i in ins}
    failing = [r for r in rows if r.subject == DEFAULT_SUBJECT and r.status == FAIL
               and (r.against == ORACLE or r.metric in TP_CHECKS)]
    groups: dict[tuple, list[Row]] = {}
    for r in failing:
        groups.setdefault((r.case["dtype"], r.case["attn"], r.case["tp"]), []).append(r)
    point = {(d["case"].get("dtype"), d["case"].get("attn"), d["case"].get("tp")): d for d in found}
    mechanisms: dict[str, Mechanism] = {}
    for (dtype, attn, tp), group in groups.items():
        kinds = {kind_of.get((r.case["input"], r.case["shape"]), "random") for r in group if r.metric not in TP_CHECKS}
        path, title = PATHS[min(kinds)] if len(kinds) == 1 and min(kinds) in PATHS else \
            ("forward", "transformers' forward diverges from the float64 oracle")
        d = point.get((dtype, attn, tp))
        if d and path == "forward" and d.get("op") is not None:
            where = d["op"] if d.get("layer") is None else f"layers.{d['layer']}.{d['op']}"
            path, title = f"forward-at-{where}", f"{title}, first at {where}"
        if tp not in ("-", 1) and not any(r.metric not in TP_CHECKS for r in groups.get((dtype, attn, 1), [])):
            path, title = f"tp{tp}-{path}", f"pretraining_tp={tp} only (tp 1 agrees): {title}"
        for r in group:
            key = next((k for needle, k, _ in ERRORS if needle in r.reason), None)
            if r.metric in TP_CHECKS:
                key = TP_CHECKS[r.metric].key
                mechanisms[key] = TP_CHECKS[r.metric]
            elif key is not None:
                mechanisms[key] = Mechanism(key, next(t for _, k, t in ERRORS if k == key) + f" ({r.reason[:120]})")
            else:
                key = path
                mechanisms[key] = Mechanism(key, title)
            r.extra["finding"] = key
    return mechanisms


def divergence_table(found: list[dict]) -> str:
    from harness.results.markdown import table
    rows = [[d["case"].get("dtype"), d["case"].get("attn"), d["case"].get("tp"), d["case"].get("input"),
             d.get("point") or "-", d.get("located_at", d["case"].get("dtype")),
             "-" if d.get("ratio") is None else f"{d['ratio']:.3g}x",
             "yes" if d.get("certain", d.get("op") is not None) else "no", d.get("error") or d.get("rule", "")]
            for d in found]
    return table(["dtype", "attn", "tp", "input", "first divergence", "located at", "ratio", "certain", "rule"], rows)


def _mechanism(kind: str) -> dict:
    op = "attention_mask" if kind == "padded" else "kv_cache"
    what = "the attention mask of a padded batch" if kind == "padded" else "decoding with the KV cache"
    return {"layer": None, "op": op, "group": "attn", "point": op, "certain": True,
            "rule": f"only {kind} inputs fail in this group while its unpadded full forwards pass, so the "
                    f"divergence is in {what} (behaviour --suite {'padding' if kind == 'padded' else 'cache'} "
                    "names the positions)"}


def _jsonable(v) -> bool:
    return v is None or isinstance(v, (str, int, float, bool, list, dict))


def _progress(total: int, on: bool):
    from tqdm import tqdm
    return tqdm(total=total, desc=SUITE, unit="cell", disable=not on, file=sys.stderr)
