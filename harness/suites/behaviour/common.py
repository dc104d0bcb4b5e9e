"""What the behaviour suites (generation, cache, padding, sequence classification, hidden states)
share: their run settings, transformers models of each head class, and the one judging rule
(harness.core.tolerance) applied with suites/behaviour_tolerance.toml.

Each suite compares a behaviour of a subject with the same subject's plain forward (invariance)
or with the float64 oracle, and calibrates its tolerance on the reference doing the same thing at
the same dtype: the reference's own error says what a correct implementation reaches.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.core import SUITES
from harness.core.compat import attn_reason  # noqa: F401  (the sub-suites take it from here)
from harness.core.faults import Fault
from harness.core.store import FAIL, INFO, Row
from harness.core.subjects import ORACLE, load_transformers, reference  # noqa: F401
from harness.core.tolerance import Policy
from harness.subjects import AXES, DEFAULT, NOT_INSTALLED, NotInstalledError, Spec, factory
from reference_model.checkpoint import Checkpoint

DEFAULT_POLICY = SUITES / "behaviour_tolerance.toml"


@dataclass
class BehaviourRun:
    ckpt: Checkpoint
    hf_path: Path
    dtypes: list[str]
    attns: list[str]
    policy: Policy
    cases: dict[str, Any]                 # suites/behaviour.toml
    device: str = "cpu"
    seed: int = 0
    fault: Fault | None = None
    notes: list[str] = field(default_factory=list)
    subjects: list[Spec] = field(default_factory=lambda: [Spec(DEFAULT)])   # --subject
    source: Any = None                    # harness.subjects.Source: what every subject is built from

    def load(self, kind: str, dtype: str, attn: str, **config_edits):
        """transformers' LlamaForCausalLM / LlamaModel / LlamaForSequenceClassification, loaded as a
        user would, with the planted fault if any; config_edits (num_labels, pad_token_id) first."""
        return load_transformers(kind, self.hf_path, dtype, self.device, attn, self.fault, **config_edits)

    # -- subjects (harness.subjects): the suites that any implementation can take part in ---------
    def axis(self, spec: Spec, name: str, values: list[str]) -> list[str]:
        """The values of a matrix axis a subject runs at: the spec's own, the suite's when its kind
        takes the axis, else "-"."""
        if name in spec.options:
            return [spec.options[name]]
        return list(values) if name in AXES.get(spec.kind, ()) else ["-"]

    def subject(self, spec: Spec, dtype: str, **axes: str):
        """The subject at these axis values (those not "-"), planted with --plant where its kind can
        be; NotBuilt (its cells n/a) when its package is absent or it lacks the dtype."""
        from harness.core.faults import subject_kinds
        options = {**spec.options, **{k: v for k, v in axes.items() if v != "-"}}
        if self.fault is not None and spec.kind in subject_kinds(type(self.fault)):
            options["plant"] = self.fault
        try:
            built = factory(spec)(self.source, dtype, self.device, options)
        except NotInstalledError as e:
            raise NotBuilt(str(e)) from None
        cannot = built.cannot()
        why = cannot.get(NOT_INSTALLED) or cannot.get(f"dtype:{dtype}")
        if why:
            built.close()
            raise NotBuilt(why)
        return built


class NotBuilt(Exception):
    """A subject that cannot take part here (package absent, a dtype it lacks): its cells are n/a."""


def judge(policy: Policy, suite: str, case: dict, subject: str, against: str, metric: str,
          value: float, reference_value: float | None, extra: dict | None = None) -> Row:
    """One gated row: value <= min(abs, max(floor, factor * reference_value)) from the policy."""
    tol, status, why = policy.judge(case["dtype"], metric, value, reference_value)
    # the calibrator beside the value: a campaign can judge the same run under another policy
    # (benchmarks/calibrate_behaviour.py) and a reader can see whether the floor or the factor bound
    extra = {**(extra or {}), "calibrator": reference_value}
    return Row(suite, dict(case), subject, against, metric, value, tol, status, why, extra)


def info(suite: str, case: dict, subject: str, against: str, metric: str, value: float | None,
         reason: str) -> Row:
    return Row(suite, dict(case), subject, against, metric, value, None, INFO, reason)


def failed(suite: str, case: dict, subject: str, against: str, error: Exception, what: str) -> Row:
    why = f"{what} failed: {type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
    return Row(suite, dict(case), subject, against, "all", None, None, FAIL, why)
