"""What the behaviour suites (generation, cache, padding, sequence classification, hidden states)
share: their run settings, transformers models of each head class, the bugs they can plant, and
the one judging rule (harness/tolerance.py) applied with suites/behaviour.toml.

Each suite compares a behaviour of a subject with the same subject's plain forward (invariance)
or with the float64 oracle, and calibrates its tolerance on the reference doing the same thing at
the same dtype: the reference's own error says what a correct implementation reaches.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from harness.core import SUITES
import torch

from reference_model import checkpoint
from reference_model.checkpoint import Checkpoint

from harness.core.errors import InputError
from harness.core.store import FAIL, INFO, Row
from harness.core.subjects import DTYPES, attn_implementations, load_transformers
from harness.core.tolerance import Policy, load_policy

DEFAULT_POLICY = SUITES / "behaviour.toml"
ORACLE = "oracle-fp64"


@dataclass
class BehaviourRun:
    model: Path
    dtypes: list[str]
    attns: list[str]
    device: str = "cpu"
    seed: int = 0
    policy: Policy | None = None
    plant: str | None = None
    out: Path = Path("reports/latest/behaviour")
    log: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.policy is None:
            self.policy = load_policy(DEFAULT_POLICY)


def reference(ckpt: Checkpoint, dtype: str, device: str):
    """The reference at dtype with Meta's float32 RoPE angles, or the float64 oracle."""
    rope = torch.float64 if dtype == "float64" else torch.float32
    return checkpoint.build_model(ckpt, DTYPES[dtype], device, rope_dtype=rope)


def attn_reason(attn: str, device: str) -> str:
    """'' when transformers can run this attention implementation here, else why not."""
    return attn_implementations(device).get(attn, f"unknown attention implementation {attn!r}")


def load_hf(kind: str, hf_path: Path, dtype: str, device: str, attn: str = "eager", **config_edits):
    """transformers' LlamaForCausalLM / LlamaModel / LlamaForSequenceClassification, loaded as a
    user would; config_edits (e.g. num_labels, pad_token_id) are set on the config first."""
    return load_transformers(kind, hf_path, dtype, device, attn, **config_edits)


# --- planted bugs: each suite must be able to fail ----------------------------------------------

def _drop_mask(module, args, kwargs):
    # Every token marked real, so pads are attended. (Passing no mask at all is not the same bug
    # in 5.x: with explicit position_ids it infers packed sequences from the position resets.)
    mask = kwargs.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        kwargs["attention_mask"] = torch.ones_like(mask)
    return args, kwargs


def cache_kwarg(model) -> str:
    """The forward's name for the KV cache: ``cache`` from 5.x (``past_key_values`` deprecated)."""
    import inspect
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _decode_off_by_one(module, args, kwargs):
    ids = kwargs.get("input_ids", args[0] if args else None)
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is None:
        past = 0
    elif hasattr(cache, "get_seq_length"):
        past = cache.get_seq_length()
    else:   # 4.31-4.35: a tuple of (key, value) per layer, keys (batch, heads, seq, head_dim)
        past = cache[0][0].shape[2]
    if ids is None or ids.shape[1] != 1 or not past:
        return args, kwargs
    pos = kwargs.get("position_ids")
    if pos is None:
        pos = torch.full_like(ids, int(past))
    kwargs["position_ids"] = pos + 1           # the decoded token sits one further than it should
    return args, kwargs


def _swap_last_gate_up(model):
    layers = model.layers if hasattr(model, "layers") else model.model.layers
    m = layers[-1].mlp
    m.gate_proj.weight.data, m.up_proj.weight.data = m.up_proj.weight.data, m.gate_proj.weight.data


PLANTS = {
    # name: (what it is, the suites that can see it)
    "pad-attend": ("the attention mask is dropped: pad tokens are attended", ("padding", "seqcls")),
    "cache-off-by-one": ("decoding steps put the new token one position too far", ("cache", "generate")),
    "pool-last-position": ("pad_token_id set to a token that never occurs: pooling takes the last "
                           "position even under right padding", ("seqcls",)),
    "last-layer-gate-up": ("w1/w3 swapped in the last block only", ("hidden", "generate")),
}


def check_plant(name: str | None) -> None:
    if name is not None and name not in PLANTS:
        raise InputError(f"--plant: unknown bug {name!r} (known: {', '.join(PLANTS)})")


def plant(model, name: str | None):
    """Apply a planted bug to a loaded transformers model (in place); returns the model."""
    if name == "pad-attend":
        model.register_forward_pre_hook(_drop_mask, with_kwargs=True)
    elif name == "cache-off-by-one":
        model.register_forward_pre_hook(_decode_off_by_one, with_kwargs=True)
    elif name == "pool-last-position":
        model.config.pad_token_id = model.config.vocab_size - 1
    elif name == "last-layer-gate-up":
        _swap_last_gate_up(model)
    return model


# --- judging ----------------------------------------------------------------------------------

def judge(policy: Policy, suite: str, case: dict, subject: str, against: str, metric: str,
          value: float, reference_value: float | None, extra: dict | None = None) -> Row:
    """One gated row: value <= min(abs, max(floor, factor * reference_value)) from the policy."""
    tol, status, why = policy.judge(case["dtype"], metric, value, reference_value)
    return Row(suite, dict(case), subject, against, metric, value, tol, status, why, extra or {})


def info(suite: str, case: dict, subject: str, against: str, metric: str, value: float | None,
         reason: str) -> Row:
    return Row(suite, dict(case), subject, against, metric, value, None, INFO, reason)


def failed(suite: str, case: dict, subject: str, against: str, error: Exception, what: str) -> Row:
    why = f"{what} failed: {type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
    return Row(suite, dict(case), subject, against, "all", None, None, FAIL, why)

