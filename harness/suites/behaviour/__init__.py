"""`llama-parity behaviour`: the suites beyond one forward pass, one results folder each under --out.

  generate  greedy generation vs the oracle's tokens (generate.py)
  cache     incremental decoding through a KV cache vs a full forward (cache.py)
  padding   each sequence alone vs inside a padded batch; an added <pad> token (padding.py)
  seqcls    LlamaForSequenceClassification pooling and scores (seqcls.py)
  hidden    output_hidden_states layer by layer (hidden.py)
  api       API contracts: the logits dtype, logits_to_keep / num_logits_to_keep (api.py)

Cases are data (suites/behaviour.toml); tolerances are suites/behaviour_tolerance.toml.
"""
from __future__ import annotations

from harness.core import compat, deviations, inputs, resources
from harness.core.cases import Shape
from harness.core.checkpoints import HFFolder, open_model
from harness.core.datafiles import suite_data
from harness.core.faults import faults_for, get_fault
from harness.core.errors import InputError
from harness.core.store import NA, Row, fingerprint
from harness.core.suite import Context, Part, Result, Suite
from harness.core.tolerance import load_policy
from harness.subjects import DEFAULT, check_options, parse_spec
from harness.subjects.common import source_of
from harness.suites.behaviour.common import DEFAULT_POLICY, BehaviourRun

SUITES = ("generate", "cache", "padding", "seqcls", "hidden", "api")
SUBJECT_SUITES = ("cache", "padding")             # through the Subject protocol: any implementation
API_SUITES = {"generate": "transformers' generate()", "seqcls": "LlamaForSequenceClassification",
              "hidden": "output_hidden_states", "api": "transformers' forward arguments (logits_to_keep)"}
METRICS = [f"{prefix}_{m}" for prefix in ("cache", "pad") for m in ("max_abs", "kl_max", "top1_disagree")] + [
    "pad_row_abs", "seqcls_max_abs", "hidden_rel_l2", "gen_divergence_margin", "gen_step_max_abs",
    "attn_probs_max_abs"]
NEEDS = {"generate": ["gen_divergence_margin", "gen_step_max_abs"],
         "cache": ["cache_max_abs", "cache_kl_max", "cache_top1_disagree"],
         "padding": ["pad_max_abs", "pad_kl_max", "pad_top1_disagree", "pad_row_abs"],
         "seqcls": ["seqcls_max_abs"], "hidden": ["hidden_rel_l2"], "api": []}


def _runner(name: str):
    from harness.suites.behaviour import api, cache, generate, hidden, padding, seqcls
    return {"generate": generate.run, "cache": cache.run, "padding": padding.run,
            "seqcls": seqcls.run, "hidden": hidden.run, "api": api.run}[name]


class Behaviour(Suite):
    name = "behaviour"
    help = "generation, KV cache, padding/batching, sequence classification, hidden-state parity"

    def add_arguments(self, p) -> None:
        p.add_argument("--suite", type=inputs.csv, default=["all"], help=f"comma list of {', '.join(SUITES)} or all")
        p.add_argument("--model", help="Meta or HF folder; default: embedded model")
        p.add_argument("--dtypes", type=inputs.csv, help="comma list of float32,bfloat16,float16 (default: all three)")
        p.add_argument("--attn", type=inputs.csv, help="comma list of eager,sdpa,... (default: eager,sdpa)")
        p.add_argument("--device", default="cpu")
        p.add_argument("--seed", default="0")
        p.add_argument("--policy", help="tolerance policy TOML (default: suites/behaviour_tolerance.toml)")
        p.add_argument("--plant", help=f"plant a bug in the transformers subject: {', '.join(faults_for('behaviour'))}")
        p.add_argument("--strict", action="store_true", help="gate known deviations like any other row")
        deviations.add_argument(p)
        p.add_argument("--subject", action="append",
                       help="judge KIND[:key=value,...] (harness.subjects; default: transformers); repeatable. "
                            f"{', '.join(SUBJECT_SUITES)} take any subject; {', '.join(API_SUITES)} drive "
                            "transformers' own API and are n/a for any other (docs/behaviour.md)")

    def run(self, a, ctx: Context) -> Result:
        mine = deviations.user_deviations(a)       # a bad --known file is exit 2 before any model loads
        suites = list(SUITES) if a.suite == ["all"] else inputs.choices("--suite", a.suite, SUITES)
        dtypes = inputs.choices("--dtypes", a.dtypes if a.dtypes is not None else list(inputs.KNOWN_DTYPES),
                                inputs.KNOWN_DTYPES)
        attns = inputs.choices("--attn", a.attn if a.attn is not None else ["eager", "sdpa"], inputs.KNOWN_ATTN)
        device, seed = inputs.device(a.device), inputs.seed(a.seed)
        compat.usable_attns("--attn", attns, device)
        policy = load_policy(a.policy or DEFAULT_POLICY, metrics=METRICS).require(
            dtypes, [m for s in suites for m in NEEDS[s]])
        fault = get_fault(a.plant, self.name)
        specs = [parse_spec(t) for t in (a.subject or [DEFAULT])]
        for spec in specs:
            check_options(spec, dtypes[0], device)  # an unknown kind or a bad option: exit 2 before anything loads
        if len({s.label() for s in specs}) < len(specs):
            raise InputError(f"--subject: {', '.join(s.label() for s in specs)}: a subject given twice")
        cases = suite_data(self.name)
        folder = open_model(a.model)
        ctx.check_memory(resources.logits_run(folder.args, dtypes, largest_inputs(cases), folder.stored_bytes), device)
        ckpt = folder.load()
        model_id = fingerprint(folder.fingerprint())      # what `compare` checks both sides ran
        notes = []
        if fault is not None and not set(fault.shows_in) & set(suites):
            notes.append(f"note: --plant {fault.name} is visible only in suite(s) {', '.join(fault.shows_in)}")
        parts = []
        with HFFolder(ckpt) as hf:
            source = source_of(folder, ckpt, hf_path=lambda: hf.path)
            run = BehaviourRun(ckpt, hf.path, dtypes, attns, policy, cases, device, seed, fault,
                               subjects=specs, source=source)
            known = deviations.merge(deviations.read(cases, "suites/behaviour.toml"), mine)
            for name in suites:
                rows = deviations.settle(_rows(name, run), known, a.strict)
                extra = {"model": {"path": str(ckpt.path), "format": ckpt.source, "fingerprint": model_id},
                         "seed": seed,
                         "plant": a.plant, "policy": {"path": str(policy.path), "version": policy.version,
                                                      **deviations.user_summary(known)}}
                parts.append(Part(name, rows, extra, folder=name, device=device))
        return Result(parts, notes + run.notes)


def _rows(name: str, run: BehaviourRun) -> list:
    """A sub-suite's rows: the Subject suites judge every --subject; the API suites judge the
    default subject and say, once per other subject, what they would need of it."""
    if name in SUBJECT_SUITES:
        return _runner(name)(run)
    others = [s for s in run.subjects if s.label() != DEFAULT]
    rows = _runner(name)(run) if len(others) < len(run.subjects) else []
    return rows + [Row(name, {"dtype": "*"}, s.label(), "-", "all", None, status=NA,
                       reason=f"{s.label()}: the {name} suite drives {API_SUITES[name]}, not the Subject "
                              f"protocol; only {', '.join(SUBJECT_SUITES)} take --subject {s.label()}")
                   for s in others]


def largest_inputs(cases: dict) -> list[Shape]:
    """The biggest batch each behaviour suite runs (suites/behaviour.toml), for the memory check."""
    g, c, pad, h = cases["generate"], cases["cache"], cases["padding"], cases["hidden"]
    return [Shape(1, max(g["prompt_lengths"]) + g["new_tokens"]), Shape(c["batch"], c["length"]),
            Shape(len(pad["lengths"]), max(pad["lengths"]) + max(pad["extra"].values())),
            Shape(h["batch"], h["length"])]
