"""The benchmark suite: the same lm-eval tasks through the reference and through transformers,
compared document by document, judged by suites/bench_tolerance.toml.

Subjects (all on the same weights and the same tokenizer.model):
  reference          the independent reference behind harness.lmeval_model.ParityLM
  hf                 transformers through lm-eval's own HFLM wrapper (what users run)
  adapter-hf         transformers behind ParityLM: same wrapper as the reference, so
                     reference vs adapter-hf is model numerics alone and adapter-hf vs hf is
                     the wrapper's behaviour alone.
Effects (``effects=True``): each of reference and hf at batch size 1 vs the main batch size, and
at bfloat16 vs float32 (measured, reported as info), plus reference vs hf both at bfloat16 (gated).

Runs are offline by construction: HF_DATASETS_OFFLINE/HF_HUB_OFFLINE are set before lm-eval or
datasets are imported, task YAMLs are rewritten with absolute data paths, the HF folder is local.
"""
from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from harness.core import ROOT, SUITES, deviations
from harness.core.errors import InputError
from harness.core.faults import Fault
from harness.core.suite import Part, Result

TASK_DIR = SUITES / "lmeval"
LOCAL_TASKS = ("parity_heldout_mc", "parity_heldout_ppl", "parity_heldout_gen", "parity_quartz")
DEFAULT_TASKS = LOCAL_TASKS
OFFLINE_ENV = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false"}


def go_offline() -> None:
    """Must run before datasets/huggingface_hub are imported: they read these once at import."""
    os.environ.update(OFFLINE_ENV)
    for mod in ("datasets", "huggingface_hub"):
        if mod in sys.modules:
            from importlib import import_module
            cfg = import_module(mod + ".config") if mod == "datasets" else import_module(mod + ".constants")
            for attr in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
                if hasattr(cfg, attr):
                    setattr(cfg, attr, True)


# --- tasks -----------------------------------------------------------------------------------------

def materialise_tasks(names: list[str], out: Path, data_root: Path | None = None) -> Path:
    """Copy the task YAMLs named (local ones) into out/tasks with absolute data_files paths.
    Names that are not local are left to lm-eval's own registry (they need their data reachable)."""
    tasks_dir = out / "tasks"
    tasks_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        src = TASK_DIR / f"{name}.yaml"
        if not src.is_file():
            continue
        text = src.read_text(encoding="utf-8")
        if name == "parity_quartz":
            from harness.suites.bench.data import ensure_quartz
            data = ensure_quartz()
            text = text.replace("test: quartz/quartz.jsonl", f"test: {json.dumps(str(data))}")
        else:
            text = re.sub(r"test: (suites/lmeval/data/\S+)",
                          lambda m: f"test: {json.dumps(str((data_root or ROOT) / m.group(1)))}", text)
        (tasks_dir / src.name).write_text(text, encoding="utf-8")
    return tasks_dir


# --- subjects --------------------------------------------------------------------------------------

HF_TOKENIZER_CONFIG = {
    # What a Llama 2 HF folder carries; add_bos_token is explicit because transformers 5 defaults
    # it to false for a folder that has only tokenizer.model (measured).
    "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
    "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None,
    "legacy": False, "model_max_length": 4096, "clean_up_tokenization_spaces": False,
}


def write_hf_folder(ckpt, tokenizer_model: Path, path: Path, fault: Fault | None = None) -> Path:
    """The HF folder transformers loads: harness-converted weights + the same tokenizer.model."""
    import shutil
    from reference_model.checkpoint import save_hf
    save_hf(path, ckpt.args, ckpt.state)
    shutil.copyfile(tokenizer_model, path / "tokenizer.model")
    config = dict(HF_TOKENIZER_CONFIG)
    if fault is not None:
        fault.edit_tokenizer_config(config)
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=1) + "\n")
    (path / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}) + "\n")
    return path


def hflm_settings(lm) -> dict:
    """HFLM's effective settings, measured where a flag could be overridden by the tokenizer."""
    bos_id = lm.tokenizer.bos_token_id
    probe = lm.tok_encode("probe")
    dtype = str(next(lm.model.parameters()).dtype).replace("torch.", "")
    softmax = lm.softmax_dtype
    return {"bos": bool(probe and probe[0] == bos_id), "batch_size": int(lm.batch_size),
            # HFLM right-pads scoring batches (pad_and_concat) and left-pads generation batches.
            "padding_side": "right", "max_length": int(lm.max_length), "dtype": dtype,
            "softmax_dtype": str(softmax).replace("torch.", "") if softmax is not None else "float32"}


@dataclass
class SubjectSpec:
    name: str             # reference | hf | adapter-hf
    dtype: str
    batch_size: int

    @property
    def label(self) -> str:
        return f"{self.name}[{self.dtype},bs{self.batch_size}]"


@dataclass
class BenchRun:
    model: Path
    tasks: list[str]
    limit: int | None
    dtype: str = "float32"
    batch_size: int = 8
    max_length: int = 2048
    num_fewshot: int = 0
    effects: bool = False
    fault: Fault | None = None
    policy: Any = None
    tokenizer: Path | None = None
    device: str = "cpu"
    subjects: tuple[str, ...] = ("reference", "hf", "adapter-hf")
    chance: dict[str, float] = field(default_factory=dict)    # suites/bench.toml [chance]
    progress: bool = False            # lm-eval's bars drawn (a terminal, no --no-progress)
    log: list[str] = field(default_factory=list)


class Subjects:
    """Builds lm-eval LMs for each subject spec on one set of weights, once each."""

    def __init__(self, run: BenchRun, workdir: Path):
        from reference_model.checkpoint import load
        from harness.suites.bench.lmeval_model import resolve_tokenizer
        self.run = run
        self.ckpt = load(run.model)
        self.tokenizer = resolve_tokenizer(Path(run.model), str(run.tokenizer) if run.tokenizer else None)
        self.hf_dir = write_hf_folder(self.ckpt, self.tokenizer, workdir / "hf")
        self.hf_fault_dir = (write_hf_folder(self.ckpt, self.tokenizer, workdir / "hf-fault", run.fault)
                             if run.fault is not None else None)

    def build(self, spec: SubjectSpec):
        from harness.suites.bench.lmeval_model import ParityLM
        r = self.run
        common = dict(dtype=spec.dtype, batch_size=spec.batch_size, max_length=r.max_length, device=r.device)
        if spec.name == "reference":
            lm = ParityLM(model=str(r.model), tokenizer=str(self.tokenizer), **common)
            return lm, lm.settings()
        hf_dir = self.hf_fault_dir or self.hf_dir
        if spec.name == "adapter-hf":
            lm = ParityLM(model=str(r.model), backend="transformers", hf_model=str(hf_dir),
                          tokenizer=str(self.tokenizer), **common)
            return lm, lm.settings()
        if spec.name == "hf":
            from lm_eval.models.huggingface import HFLM
            lm = HFLM(pretrained=str(hf_dir), tokenizer=str(hf_dir), backend="causal",
                      softmax_dtype="float32", **common)
            return lm, hflm_settings(lm)
        raise InputError(f"unknown subject {spec.name!r}")


@lru_cache(maxsize=4)
def task_manager(tasks_dir: str):
    """lm-eval indexes every task YAML it ships (thousands) on construction: do it once."""
    from lm_eval.tasks import TaskManager
    return TaskManager(include_path=tasks_dir)


def evaluate(lm, tasks_dir: Path, tasks: list[str], limit: int | None, num_fewshot: int) -> dict:
    """One lm-eval run: aggregate results and per-document samples, keyed by task."""
    import lm_eval
    manager = task_manager(str(tasks_dir))
    res = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                  log_samples=True, task_manager=manager, bootstrap_iters=1000,
                                  random_seed=0, numpy_random_seed=0, torch_random_seed=0,
                                  fewshot_random_seed=0, verbosity="ERROR")
    return {"results": res["results"], "samples": res["samples"], "configs": res.get("configs", {})}


@contextmanager
def lmeval_bars(on: bool):
    """lm-eval draws tqdm bars of its own (building requests, HFLM's loglikelihood, bootstrapping)
    and offers no switch for all of them: off a terminal or with --no-progress, every tqdm made
    meanwhile through lm-eval's imports or ``from tqdm import tqdm`` is created disabled, and
    transformers' own (HFLM's "Loading weights") are switched off."""
    if on:
        yield
        return
    import tqdm
    from transformers.utils import logging as hf_logging
    drawn = tqdm.tqdm
    hf_bars = getattr(hf_logging, "is_progress_bar_enabled", lambda: False)()
    hf_logging.disable_progress_bar()

    class Quiet(drawn):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "disable": True})

    def holding(cls) -> list:
        return [m for name, m in list(sys.modules.items())
                if name.startswith("lm_eval") and getattr(m, "tqdm", None) is cls]

    for m in [tqdm, *holding(drawn)]:
        m.tqdm = Quiet
    try:
        yield
    finally:            # modules lm-eval imported meanwhile took Quiet too: they get the real one back
        for m in [tqdm, *holding(Quiet)]:
            m.tqdm = drawn
        if hf_bars:
            hf_logging.enable_progress_bar()


def run_subject(subjects: Subjects, spec: SubjectSpec, tasks_dir: Path, run: BenchRun) -> dict:
    t0 = time.time()
    with lmeval_bars(run.progress):
        lm, settings = subjects.build(spec)
        out = evaluate(lm, tasks_dir, run.tasks, run.limit, run.num_fewshot)
    settings = {**settings, "num_fewshot": run.num_fewshot}
    out.update(settings=settings, label=spec.label, seconds=round(time.time() - t0, 2))
    run.log.append(f"{spec.label}: {out['seconds']}s")
    return out


def run_bench(run: BenchRun) -> Result:
    """Evaluate every subject, compare, judge: the rows, summary and per-document samples."""
    go_offline()
    from harness.suites.bench.paired import compare_runs, drift_rows, scores_rows
    from harness.suites.bench.report import sections
    from harness.core.checkpoints import scratch
    with scratch("llama-parity-bench-") as tmp:      # holds converted weights: removed after a kill too
        # Bad input (unknown task, missing model) must fail before anything is written to --out.
        tasks_dir = materialise_tasks(run.tasks, Path(tmp))
        manager = task_manager(str(tasks_dir))
        missing = [t for t in run.tasks if t not in manager.all_tasks]
        if missing:
            raise InputError(f"--tasks: unknown task(s) {', '.join(missing)} (local: {', '.join(LOCAL_TASKS)})")
        subjects = Subjects(run, Path(tmp))
        main = {n: SubjectSpec(n, run.dtype, run.batch_size) for n in run.subjects}
        evals = {n: run_subject(subjects, s, tasks_dir, run) for n, s in main.items()}
        rows = []
        rows += scores_rows(evals, run)
        pairs = [(x, y, True) for x, y in (("hf", "reference"), ("adapter-hf", "reference"), ("hf", "adapter-hf"))
                 if x in main and y in main]
        effects = {}
        if run.effects:
            other_bs = 1 if run.batch_size != 1 else 8
            low = "bfloat16" if run.dtype != "bfloat16" else "float32"
            for n in [n for n in ("reference", "hf") if n in main]:
                effects[f"{n}@bs{other_bs}"] = run_subject(subjects, SubjectSpec(n, run.dtype, other_bs), tasks_dir, run)
                effects[f"{n}@{low}"] = run_subject(subjects, SubjectSpec(n, low, run.batch_size), tasks_dir, run)
            evals.update(effects)
            rows += scores_rows({k: v for k, v in effects.items()}, run)
            pairs += [(k, k.split("@")[0], False) for k in effects]
            if f"hf@{low}" in effects:
                pairs += [(f"hf@{low}", f"reference@{low}", True)]
        for subject, against, gated in pairs:
            a, b = evals[subject], evals[against]
            dtype = a["settings"]["dtype"] if a["settings"]["dtype"] == b["settings"]["dtype"] else run.dtype
            if gated:
                rows += drift_rows(subject, against, a, b)
            rows += compare_runs(subject, against, a, b, run.policy, dtype, gated)
        summary_extra = {
            "model": str(run.model), "model_fingerprint": _model_fingerprint(run.model),
            "tasks": run.tasks, "limit": run.limit,
            "plant": run.fault.name if run.fault else None,
            "policy": {"path": str(run.policy.path), "version": run.policy.version,
                       **deviations.user_summary(run.policy.deviations)},
            "subjects": {k: {"label": v["label"], "settings": v["settings"], "seconds": v["seconds"],
                             "scores": _scores(v)} for k, v in evals.items()},
        }
        files = samples(evals)
        # What was run, for lm-eval's own CLI (docs/bench.md).
        files.update({f"tasks/{f.name}": f.read_text(encoding="utf-8") for f in sorted(tasks_dir.iterdir())
                      if f.is_file()})
    notes = [*run.log, *(f"FAIL {r.cell_id()}: {r.reason}" for r in rows if r.status == "fail")]
    part = Part("bench", rows, summary_extra, files=files, device=run.device)
    part.sections = sections(summary_extra, rows)
    return Result([part], notes)


def _model_fingerprint(path) -> str:
    """The weights' content fingerprint (cached hashes), which `compare` checks both sides ran."""
    from harness.core.checkpoints import open_model
    from harness.core.store import fingerprint
    return fingerprint(open_model(path).fingerprint())


def _scores(ev: dict) -> dict:
    out = {}
    for task, metrics in ev["results"].items():
        out[task] = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "alias"}
    return out


def samples(evals: dict) -> dict[str, str]:
    """Per-document responses of every subject (JSONL per subject and task), for the paired view."""
    files = {}
    for name, ev in evals.items():
        for task, items in ev["samples"].items():
            lines = []
            for s in items:
                lines.append(json.dumps({"doc_id": s["doc_id"], "target": s.get("target"),
                                         "resps": s.get("resps"), "filtered_resps": s.get("filtered_resps"),
                                         **{k: s[k] for k in s if k in ("acc", "acc_norm", "exact_match")}},
                                        default=str, ensure_ascii=False))
            files[f"samples/{name}.{task}.jsonl"] = "\n".join(lines) + "\n"
    return files
