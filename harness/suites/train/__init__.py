"""The train suite: a subject's loss and every parameter's gradient in train mode, against the
float64 oracle's (autograd through the independent reference), judged by the tolerance policy.
The subject (``--subject``, transformers by default) is any kind that offers "train" (autograd
through its own torch module, harness/subjects), built through the registry at each cell.

A cell is dtype x cast (loaded in the dtype, or float32 weights under autocast) x attention x
pretraining_tp x gradient checkpointing x input batch. The reference at the cell's dtype and cast
runs too and calibrates the policy, as in ``logits``: value <= min(abs, max(floor, factor x the
reference's own error)), ``max_factor`` for the worst tensor; the loss, one draw, may also reach
``noise_factor`` x the reference's own noise scale (``metrics.loss_noise``). Groups (the reference at a dtype and
cast; the subject at a dtype, cast, attention and tp) are journaled, so a rerun resumes.

Modules: ``batches`` (the inputs and their labels), ``grads`` (loss and gradients of each subject),
``metrics`` (how far from the oracle), ``measure`` (the run), ``accumulate`` (gradient accumulation
through transformers' Trainer), ``steps`` (a few AdamW steps), ``lora`` (LoRA through peft
against an independent LoRA on the oracle), ``report`` (the report section).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from harness.core import compat, corpus, deviations, inputs, resources
from harness.core.cases import Shape, make_inputs
from harness.core.checkpoints import ModelFolder, open_model
from harness.core.datafiles import suite_data
from harness.core.errors import InputError
from harness.core.faults import Fault, faults_for, get_fault
from harness.core.suite import Context, Result, Suite
from harness.core.tolerance import Policy, load_policy
from harness.subjects import DEFAULT, Spec, add_offering, offering
from harness.suites.train import batches
from harness.suites.train.metrics import GATED
from reference_model.checkpoint import Checkpoint

SUITE = "train"
CASTS = ("load", "autocast")
CHECKPOINTING = ("off", "reentrant", "non-reentrant")
INPUTS = (*batches.KINDS, "accum", "steps", "lora")
POLICY_METRICS = (*GATED, "gc_bitwise_diff", "accum_rel_l2", "accum_loss_rel_err", "steps_loss_rel_err", "steps_drift",
                  "logits_rel_l2", "loss_of_logits_rel_err")
DEFAULT_POLICY = "train_tolerance.toml"
# what this suite needs of a subject (--subject)
TRAIN_NEEDS = "autograd through its own torch module (loss and gradients, optimizer steps, Trainer, LoRA)"


class Train(Suite):
    name = SUITE
    help = "a subject's training loss and gradients against the float64 oracle's"
    # A process beside this one moved the first float32 cell's gradients on MKL's default branch
    # (4 of 22 runs); COMPATIBLE did not (harness/core/mkl.py has the counts and the cost).
    mkl_branch = "COMPATIBLE"

    def add_arguments(self, p) -> None:
        add_offering(p, self.name, TRAIN_NEEDS, own="attn, tp, plant")
        p.add_argument("--model", help="Meta or HF folder; default: the embedded model")
        p.add_argument("--dtypes", type=inputs.csv, help="comma list of float32,bfloat16,float16 (default: all three)")
        p.add_argument("--attn", type=inputs.csv, help="comma list of eager,sdpa,... (default: eager,sdpa)")
        p.add_argument("--tp", type=inputs.csv, help="pretraining_tp values (default: 1,2; 2 where the release honours it)")
        p.add_argument("--casts", type=inputs.csv, help="comma list of load,autocast (default: both)")
        p.add_argument("--checkpointing", type=inputs.csv,
                       help="comma list of off,reentrant,non-reentrant (default: all three)")
        p.add_argument("--inputs", type=inputs.csv, help=f"comma list of {', '.join(INPUTS)} (default: all)")
        p.add_argument("--corpus", help=f"a named corpus ({', '.join(corpus.NAMED)}; default: heldout)")
        p.add_argument("--text", help="a UTF-8 text file to train on, tokenized with the checkpoint's tokenizer (default: none; the --corpus)")
        p.add_argument("--ctx", help="tokens per text window, BOS first (default 128); padded rows scale with it")
        p.add_argument("--long-ctx", help="tokens of the long window (default 1024, capped at the model's max_seq_len)")
        p.add_argument("--tokenizer", help="SentencePiece tokenizer.model for the text (default: the one beside the weights, or Llama 2's for a 32000-piece vocabulary)")
        p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
        p.add_argument("--seed", default="0", help="which text windows (or random ids) to train on (default 0)")
        p.add_argument("--policy", help="tolerance policy TOML (default: suites/train_tolerance.toml)")
        p.add_argument("--plant", help=f"plant a known training bug: {', '.join(faults_for(SUITE))}")
        p.add_argument("--no-resume", action="store_true", help="forget finished groups journaled in --out")
        p.add_argument("--strict", nargs="?", const="all", metavar="NAMES",
                       help="gate known deviations like any other row: all of them, or a comma list of their names "
                            "(grad-accum-per-micro-batch-mean, num-items-counts-position-0); default: reported, not gated")
        deviations.add_argument(p)

    def run(self, a, ctx: Context) -> Result:
        plan = Plan.from_args(a, ctx)
        ctx.begin(resume=not a.no_resume)
        from harness.suites.train.measure import Measure
        return Measure(plan, ctx).run()


def strict_names(value: str | None) -> frozenset[str]:
    """--strict [NAMES]: which known deviations are gated (the museum gates one, not its neighbour)."""
    from harness.suites.train.accumulate import KNOWN_NAMES
    if value is None:
        return frozenset()
    if value == "all":
        return frozenset(KNOWN_NAMES)
    names = inputs.choices("--strict", inputs.csv(value), KNOWN_NAMES)
    return frozenset(names)


@dataclass
class Plan:
    folder: ModelFolder
    ckpt: Checkpoint
    dtypes: list[str]
    casts: list[str]
    attns: list[str]
    tps: list[int]
    checkpointing: list[str]
    batches: list[batches.Batch]
    accum: bool
    steps: bool
    lora: bool
    device: str
    seed: int
    policy: Policy
    fault: Fault | None
    data: dict
    text: str
    notes: list[str] = field(default_factory=list)
    strict: frozenset[str] = frozenset()    # names of the known deviations gated (--strict)
    known: list = field(default_factory=list)   # --known FILE: the user's own accepted findings
    subject: Spec = field(default_factory=lambda: Spec(DEFAULT))   # --subject: its kind offers "train"

    @classmethod
    def from_args(cls, a, ctx: Context) -> "Plan":
        data = suite_data(SUITE)
        d = data["defaults"]
        if a.text and a.corpus:
            raise InputError("--text and --corpus: give one")
        device = inputs.device(a.device)
        seed = inputs.seed(a.seed)
        strict = strict_names(getattr(a, "strict", None))
        known = deviations.user_deviations(a)      # a bad --known file is exit 2 before any model loads
        subject = offering(getattr(a, "subject", None), SUITE, "train", TRAIN_NEEDS, own=("attn", "tp", "plant"))
        dtypes = inputs.choices("--dtypes", a.dtypes if a.dtypes is not None else d["dtypes"], inputs.KNOWN_DTYPES)
        attns = inputs.choices("--attn", a.attn if a.attn is not None else d["attn"], inputs.KNOWN_ATTN)
        compat.usable_attns("--attn", attns, device)
        tps = inputs.positive_ints("--tp", a.tp if a.tp is not None else [str(t) for t in d["tp"]])
        if all(t > 1 for t in tps) and not compat.tp_honoured():
            raise InputError(f"--tp {','.join(map(str, tps))}: {compat.TP_NOOP}, so nothing would be measured")
        casts = inputs.choices("--casts", a.casts if a.casts is not None else d["casts"], CASTS)
        gcs = inputs.choices("--checkpointing", a.checkpointing if a.checkpointing is not None
                             else d["checkpointing"], CHECKPOINTING)
        kinds = inputs.choices("--inputs", a.inputs if a.inputs is not None else d["inputs"], INPUTS)
        if "off" not in gcs:
            raise InputError("--checkpointing: must include off (a checkpointed cell is judged against it)")
        from harness.core.datafiles import SUITES
        policy = load_policy(a.policy or SUITES / DEFAULT_POLICY, metrics=POLICY_METRICS).require(
            dtypes, POLICY_METRICS).require(["float32"], POLICY_METRICS)
        fault = get_fault(a.plant, SUITE)
        folder = open_model(a.model)
        notes: list[str] = []
        cfg = dict(data["corpus"])
        base_ctx = cfg["ctx"]
        if a.ctx:
            cfg["ctx"] = inputs.integer("--ctx", a.ctx, 8, inputs.MAX_SEQ)
        if a.long_ctx:
            cfg["long_ctx"] = inputs.integer("--long-ctx", a.long_ctx, 8, inputs.MAX_SEQ)
        long_ctx = min(cfg["long_ctx"], folder.args.max_seq_len)
        ctx.check_memory(resources.logits_run(folder.args, dtypes, [Shape(1, long_ctx), Shape(cfg["corpus_rows"],
                                              cfg["ctx"])], folder.stored_bytes), device)
        ckpt = folder.load()
        text, long_text, label = cls.token_windows(a, cfg, folder, ckpt, long_ctx, seed, notes)
        shape = {**cfg, **data["padded"]}
        for key in ("right_lengths", "left_lengths", "sft_lengths", "sft_prompt"):   # scaled with --ctx
            shape[key] = [max(2, min(cfg["ctx"], n * cfg["ctx"] // base_ctx)) for n in shape[key]]
        built = batches.build(kinds, text, long_text if "long" in kinds else None, shape,
                              pad_id=0, label=label)
        if not built:
            raise InputError(f"--inputs: nothing to measure on: accum, steps and lora run on the batches beside them; "
                             f"add one of {', '.join(batches.KINDS)}")
        return cls(folder, ckpt, dtypes, casts, attns, tps, gcs, built, "accum" in kinds, "steps" in kinds,
                   "lora" in kinds, device, seed, policy, fault, data, label, notes, strict, known, subject)

    @staticmethod
    def token_windows(a, cfg: dict, folder: ModelFolder, ckpt: Checkpoint, long_ctx: int, seed: int,
                      notes: list[str]) -> tuple[torch.Tensor, torch.Tensor, str]:
        """(windows of ctx tokens, one window of long_ctx tokens, label) of real text; seeded random
        ids when the model has no tokenizer at hand. The seed picks where in the text they start."""
        ctx_len, rows = cfg["ctx"], cfg["corpus_rows"] + 3
        try:
            sp, _ = corpus.tokenizer_for(folder.path, folder.args.vocab_size, a.tokenizer)
        except InputError as e:
            if a.text or a.corpus:
                raise
            notes.append(f"note: seeded random ids instead of real text ({e})")
            vocab = ckpt.args.vocab_size
            return (make_inputs(Shape(rows, ctx_len), vocab, seed), make_inputs(Shape(1, long_ctx), vocab, seed + 1),
                    f"random:seed{seed}")
        label, body = corpus.text_of(a.corpus or (None if a.text else cfg["name"]), a.text)
        stream = sp.encode(body)
        need = rows * (ctx_len - 1) + long_ctx
        if len(stream) < need:
            raise InputError(f"{label}: {len(stream)} tokens, fewer than the {need} the train batches need")
        start = (seed * 997) % (len(stream) - need + 1)
        stream = stream[start:start + need]
        bos = sp.bos_id()
        short = torch.tensor(stream[:rows * (ctx_len - 1)], dtype=torch.long).view(rows, ctx_len - 1)
        short = torch.cat([torch.full((rows, 1), bos, dtype=torch.long), short], dim=1)
        long = torch.tensor([[bos, *stream[rows * (ctx_len - 1):][:long_ctx - 1]]], dtype=torch.long)
        return short, long, label if not a.text else f"file:{a.text}"
