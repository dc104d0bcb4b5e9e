"""What the installed transformers (and lm-eval) release offers, asked in one place.

Each probe reads the installed code or signatures rather than the version number where it can,
and is cached: a case the release cannot run is recorded n/a with the reason these give.
"""
from __future__ import annotations

import inspect
from functools import lru_cache


def transformers_version() -> tuple[int, ...]:
    import transformers
    return tuple(int(p) for p in transformers.__version__.split(".")[:2])


def transformers_release() -> str:
    import transformers
    return transformers.__version__


@lru_cache(maxsize=None)
def tp_honoured() -> bool:
    """Whether this release's Llama MLP slices by pretraining_tp (4.31-4.46; a no-op from 4.47)."""
    from transformers.models.llama import modeling_llama
    return "pretraining_tp" in inspect.getsource(modeling_llama.LlamaMLP.forward)


TP_NOOP = "pretraining_tp is a no-op in this transformers release (live only in 4.31-4.46)"


@lru_cache(maxsize=None)
def attn_implementations(device: str) -> dict[str, str]:
    """Attention implementation -> '' when usable here, else the reason it is not."""
    version = transformers_version()
    out = {"eager": ""}
    out["sdpa"] = "" if version >= (4, 36) else f"transformers {version} has no SDPA path for Llama"
    try:
        import flash_attn  # noqa: F401
        has_fa = True
    except ImportError:
        has_fa = False
    if not device.startswith("cuda"):
        out["flash_attention_2"] = "needs a CUDA device"
    elif not has_fa:
        out["flash_attention_2"] = "the flash_attn package is not installed"
    else:
        out["flash_attention_2"] = ""
    out["flex_attention"] = "" if version >= (4, 48) else "flex attention arrives in transformers 4.48"
    return out


def attn_reason(attn: str, device: str) -> str:
    """'' when transformers can run this attention implementation here, else why not."""
    return attn_implementations(device).get(attn, f"unknown attention implementation {attn!r}")


def usable_attns(arg: str, attns: list[str], device: str) -> list[str]:
    """The requested attention implementations; when none of them can run here, a run would
    measure nothing and pass by default: that is bad input, said before anything runs."""
    from harness.core.errors import InputError
    reasons = {a: attn_reason(a, device) for a in attns}
    if all(reasons.values()):
        raise InputError(f"{arg} {','.join(attns)}: none can run here, so nothing would be measured ("
                         + "; ".join(f"{a}: {why}" for a, why in reasons.items()) + ")")
    return attns


def default_attn() -> str:
    """The attention implementation from_pretrained picks when none is asked for: SDPA from 4.36
    (with the torch releases the harness supports), eager before. Asking for it by name loads the
    same code; load_transformers refuses a model loaded under another name, so a wrong answer here
    cannot pass unnoticed."""
    return "sdpa" if transformers_version() >= (4, 36) else "eager"


def dtype_kwarg() -> str:
    """from_pretrained's name for the dtype: ``dtype`` from 4.56, ``torch_dtype`` before."""
    return "dtype" if transformers_version() >= (4, 56) else "torch_dtype"


def cache_kwarg(model) -> str:
    """The forward's name for the KV cache: ``cache`` from 5.x (``past_key_values`` deprecated)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def legacy_cache() -> bool:
    """Releases before the Cache classes (4.31; 4.38 has them): the cache is the tuple the model returns."""
    import transformers
    return not hasattr(transformers, "DynamicCache")


def make_cache(model, kind: str, batch: int, length: int):
    """A fresh cache of this kind for model, in whichever constructor this release offers."""
    import transformers
    if kind == "dynamic":
        return transformers.DynamicCache()
    if not hasattr(transformers, "StaticCache"):
        raise NotImplementedError("this transformers release has no StaticCache")
    if transformers_version() < (4, 41):
        # 4.38-4.40 read a StaticCache only when model._setup_cache() attached it to every layer (what
        # generate(cache_implementation="static") does): passed as past_key_values, the model counts
        # 0 tokens seen and sizes the causal mask for a dynamic cache, so the call is not one they offer.
        raise NotImplementedError(f"transformers {transformers.__version__} takes a StaticCache only through "
                                  "model._setup_cache / generate(cache_implementation='static'), not as "
                                  "past_key_values (from 4.41)")
    try:                                   # 4.56 and later
        return transformers.StaticCache(config=model.config, max_cache_len=length)
    except TypeError:                      # 4.38 - 4.55
        return transformers.StaticCache(config=model.config, max_batch_size=batch, max_cache_len=length,
                                        device=model.device, dtype=model.dtype)


def forward_takes(model, name: str) -> bool:
    return name in inspect.signature(model.forward).parameters


@lru_cache(maxsize=None)
def checkpointing_enable(model, reentrant: bool | None = None) -> bool:
    """Turn gradient checkpointing on as a user of this release does (5.x: activation_checkpointing_enable;
    the old name is a warning alias). ``reentrant`` None: the release's default. False when the release
    cannot choose (no kwargs before 4.35), and nothing is enabled."""
    new = getattr(model, "activation_checkpointing_enable", None)
    enable, key = (new, "activation_checkpointing_kwargs") if new is not None else \
        (model.gradient_checkpointing_enable, "gradient_checkpointing_kwargs")
    if reentrant is None:
        enable()
    elif key in inspect.signature(enable).parameters:
        enable(**{key: {"use_reentrant": reentrant}})
    else:
        return False
    return True


def checkpointing_on(model) -> bool:
    """Whether gradient checkpointing is on, under the release's own name (5.x warns on the old one)."""
    new = hasattr(type(model), "is_activation_checkpointing")
    return bool(getattr(model, "is_activation_checkpointing" if new else "is_gradient_checkpointing", False))


def checkpointing_off(model) -> None:
    """Switch gradient checkpointing off under the release's own name: 5.x renamed it
    activation_checkpointing_disable and warns (a FutureWarning in the suite's console) on the old one."""
    (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()


def has_output_logits() -> bool:
    """generate(output_logits=True) exists (4.38; not in 4.31)."""
    from transformers import GenerationConfig
    return hasattr(GenerationConfig(), "output_logits")


def has_rope_theta() -> bool:
    import transformers
    config = transformers.LlamaConfig()
    return hasattr(config, "rope_theta") or "rope_theta" in (getattr(config, "rope_parameters", None) or {})


def rope_uses_inv_freq_at_forward() -> bool:
    """Whether the rotary embedding reads inv_freq on every forward (4.38 on) or builds its
    cos/sin cache once at load (4.31)."""
    from transformers.models.llama import modeling_llama
    return "inv_freq" in inspect.getsource(modeling_llama.LlamaRotaryEmbedding.forward)


@lru_cache(maxsize=None)
def lmeval_unsupported() -> str:
    """Why lm-eval cannot run against the installed transformers here ('' when it can)."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        return ("lm-eval is not installed (pip install 'llama-parity[bench]'; lm-eval 0.4.13 cannot be "
                "installed beside transformers 4.31)")
    import transformers
    from transformers import modeling_utils
    # lm-eval 0.4.13's HFLM calls from_pretrained(..., gguf_file=...): a TypeError in releases
    # that do not know the argument (measured: 4.38.2 fails, 4.46.3 and later accept it).
    if "gguf_file" not in inspect.getsource(modeling_utils.PreTrainedModel.from_pretrained):
        return (f"lm-eval 0.4.13's HF wrapper passes gguf_file= to from_pretrained, which transformers "
                f"{transformers.__version__} does not accept")
    return ""
