"""What the subject tests share: the embedded model as a Source, its held-out text, and the two
ways a subject is judged against the float64 oracle (the logits rule for exact subjects, the
per-type budget for lossy ones)."""
from __future__ import annotations

from functools import lru_cache

import pytest
import torch

from harness.core import corpus
from harness.core.checkpoints import open_model
from harness.core.metrics import POLICY_METRICS, beyond_rounding, cat_stats, corpus_stats, position_stats, summarize
from harness.core.store import FAIL
from harness.core.subjects import ReferenceSubject
from harness.core.tolerance import load_policy
from harness.subjects.common import dequantised_checkpoint, has_module, source_of
from harness.subjects.fidelity import budget, over_budget
from harness.suites.logits import GATED

CTX, TOKENS = 128, 512        # 4 windows of 128: 508 real-text positions, seconds per subject


def load_kinds() -> None:
    """Register the torch-side kinds (importing none of the optional packages)."""
    from harness.subjects import load_kinds as load
    load("transformers", "torchao", "quanto", "onnxruntime", "onnxruntime-genai")


def needs(module: str, extra: str):
    """Skip, naming the package, when an optional subject's package is absent."""
    missing = not has_module(module)
    return pytest.mark.skipif(missing, reason=f"{module} is not installed (pip install 'llama-parity[{extra}]')")


@lru_cache(maxsize=1)
def embedded():
    folder = open_model(None)
    return source_of(folder, folder.load())


@lru_cache(maxsize=1)
def text():
    """(windows ids, targets) of the held-out corpus, and the oracle's logits of them."""
    src = embedded()
    sp, _ = corpus.tokenizer_for(open_model(None).path, src.ckpt.args.vocab_size, None)
    label, body = corpus.text_of("heldout", None)
    w = corpus.windows(label, body, sp, CTX, TOKENS)
    return w.ids, w.targets, oracle(src.ckpt).logits(w.ids)


def oracle(ckpt) -> ReferenceSubject:
    return ReferenceSubject(ckpt, "float64", "cpu", oracle=True)


def exact_failures(logits: torch.Tensor, ids: torch.Tensor, truth: torch.Tensor, dtype: str = "float32") -> dict:
    """The logits suite's rule: each gated metric against the reference's own error at dtype."""
    reference = ReferenceSubject(embedded().ckpt, dtype, "cpu").logits(ids)
    st, rs = position_stats(logits, truth), position_stats(reference, truth)
    (values, why), (ref_values, _) = summarize(st), summarize(rs)
    assert not why, why
    policy = load_policy(metrics=POLICY_METRICS)
    factor = policy.limit(dtype, "max_abs").max_factor
    values.update(beyond_rounding(st, rs, factor))
    ref_values.update(beyond_rounding(rs, rs, factor))
    judged = {m: policy.judge(dtype, m, values[m], ref_values[m]) for m in GATED}
    return {m: reason for m, (_, status, reason) in judged.items() if status == FAIL}


def text_stats(run, truth: torch.Tensor | None = None) -> dict:
    ids, targets, oracle_logits = text()
    truth = oracle_logits if truth is None else truth
    parts = [position_stats(run(ids[i:i + 2]), truth[i:i + 2], targets=targets[i:i + 2]) for i in range(0, len(ids), 2)]
    return corpus_stats(cat_stats(parts))


def lossy_failures(subject) -> tuple[dict, dict]:
    """(broken budget metrics, corpus statistics) of a lossy subject on the held-out text, against
    the [[budget]] of suites/subjects_tolerance.toml that its settings match."""
    stats = text_stats(subject.forward)
    return over_budget(stats, budget(subject.name, subject.settings())), stats


def split(subject) -> tuple[float, float]:
    """(quantisation, runtime) mean KL: the oracle on the subject's dequantised weights against the
    true oracle, and the subject against that oracle."""
    ids, _, _ = text()
    dq = oracle(dequantised_checkpoint(embedded().ckpt, subject.dequantised())).logits(ids)
    return text_stats(lambda x, it=iter(dq.split(2)): next(it))["kl_mean"], text_stats(subject.forward, dq)["kl_mean"]


# --- kinds registered for one test ----------------------------------------------------------------

def register_kind(monkeypatch, kind: str, make, axes: tuple[str, ...] = ("attn",), offers: tuple[str, ...] = (),
                  layers=None) -> None:
    """``make`` registered as ``kind`` for one test; the registry's tables are restored after it."""
    from harness.subjects import AXES, KINDS, LAYERS, OFFERS, register
    for table in (KINDS, AXES, OFFERS, LAYERS):
        monkeypatch.setitem(table, kind, None)
    register(kind, axes=axes, offers=offers, layers=layers)(make)


def drifted(kind: str, layer: int, exact: bool = True):
    """A factory of transformers with layer ``layer``'s MLP output projection 1% off: a bug no
    transformers model has, so a command that finds it found it on this kind's own model."""
    from harness.subjects.common import Options
    from harness.subjects.transformers import TransformersLM, common_options

    class Drifted(TransformersLM):
        def __init__(self, *args, **common):
            super().__init__(*args, **common)
            self.name, self.exact = kind, exact
            with torch.no_grad():
                self.model.model.layers[layer].mlp.down_proj.weight.mul_(1.01)

    def make(source, dtype, device, options):
        o = Options(kind, options)
        common = common_options(o, "transformers")
        o.done()
        return Drifted(source, dtype, device, **common)
    return make


def shaped_run(command: str, tmp_path, *argv) -> tuple[int, dict | None]:
    """``llama-parity COMMAND --shape 1x12 --out TMP/out ARGV``: its exit code and summary.json (None
    when nothing was written), for the commands that take one input shape (localise, stream)."""
    import json

    from harness.cli import main
    out = tmp_path / "out"
    code = main([command, "--shape", "1x12", "--out", str(out), *argv])
    path = out / "summary.json"
    return code, json.loads(path.read_text()) if path.exists() else None


def lossy_run(tmp_path, *subjects: str) -> tuple[int, dict, set]:
    """``llama-parity logits`` at float32 on real text and cached inputs for ``subjects`` (each
    --subject): its exit code, summary.json and the (subject, metric) pairs that failed, for the
    tests that a lossy kind passes its budget and its planted bug fails it."""
    import json

    from harness.cli import main
    argv = ["logits", "--out", str(tmp_path), "--dtypes", "float32", "--attn", "eager", "--tp", "1", "--shapes", "1x8",
            "--no-progress", "--inputs", "corpus,cached", "--ctx", "64", "--max-tokens", "256"]
    code = main(argv + [x for spec in subjects for x in ("--subject", spec)])
    summary = json.loads((tmp_path / "summary.json").read_text())
    return code, summary, {(c["subject"], c["metric"]) for c in summary["cells"] if c["status"] == "fail"}

