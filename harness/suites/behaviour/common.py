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

    def load(self, kind: str, dtype: str, attn: str, **config_edits):
        """transformers' LlamaForCausalLM / LlamaModel / LlamaForSequenceClassification, loaded as a
        user would, with the planted fault if any; config_edits (num_labels, pad_token_id) first."""
        return load_transformers(kind, self.hf_path, dtype, self.device, attn, self.fault, **config_edits)


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
