"""Planted bugs: the mistakes a real Llama 2 port makes, applied to the transformers subject.

``llama-parity logits --plant NAME`` runs the matrix with one of them, so a user can see that
their tolerance policy catches it (exit 1); the tests do exactly that for every fault here.
Each fault edits the config before loading, the loaded model, or the forward arguments; none
depends on private transformers functions, so every release is planted the same way.
"""
from __future__ import annotations

import torch

from reference_model.convert import unpermute

from harness.core.errors import InputError


class Fault:
    name = ""
    doc = ""
    #: dtypes where the fault changes anything (a precision bug is invisible in float32)
    visible_at = ("float32", "bfloat16", "float16")
    #: the shortest sequence on which the logits suite sees it (the `axes` suite runs long ones)
    min_positions = 1

    def not_applicable(self) -> str:
        """Why the installed transformers cannot be planted with this fault ('' when it can)."""
        return ""

    def edit_config(self, config) -> None:
        pass

    def edit_model(self, model) -> None:
        pass

    def forward_kwargs(self, ids: torch.Tensor) -> dict:
        return {}


def _layers(model):
    return model.model.layers


class NoPermute(Fault):
    name, doc = "no-permute", "q/k weights converted without Meta->HF permute (interleaved vs rotate_half RoPE)"

    def edit_model(self, model):
        c = model.config
        for layer in _layers(model):
            a = layer.self_attn
            a.q_proj.weight.data = unpermute(a.q_proj.weight.data, c.num_attention_heads)
            a.k_proj.weight.data = unpermute(a.k_proj.weight.data, c.num_key_value_heads)


class RopeBase(Fault):
    name, doc = "rope-base", "RoPE base 1% off (10100 instead of 10000)"
    visible_at = ("float32",)   # below float32, short inputs hide it in rounding noise (measured)

    def not_applicable(self):
        import transformers
        config = transformers.LlamaConfig()
        if hasattr(config, "rope_theta") or "rope_theta" in (getattr(config, "rope_parameters", None) or {}):
            return ""
        return f"transformers {transformers.__version__} has no rope_theta (its RoPE base is fixed at 10000)"

    def edit_config(self, config):
        params = getattr(config, "rope_parameters", None)
        if isinstance(params, dict) and "rope_theta" in params:
            params["rope_theta"] = params["rope_theta"] * 1.01
        if hasattr(config, "rope_theta"):
            config.rope_theta = config.rope_theta * 1.01


class MaskShift(Fault):
    name, doc = "mask-shift", "causal mask off by one: each position also sees the next token"

    def edit_model(self, model):
        def hook(module, args, kwargs):
            h = kwargs.get("hidden_states", args[0] if args else None)
            seq = h.shape[1]
            allowed = torch.ones(seq, seq, dtype=torch.bool, device=h.device).tril(1)
            mask = torch.zeros(seq, seq, dtype=h.dtype, device=h.device)
            mask = mask.masked_fill(~allowed, torch.finfo(h.dtype).min)
            kwargs["attention_mask"] = mask[None, None].expand(h.shape[0], 1, seq, seq)
            return args, kwargs

        for layer in _layers(model):
            layer.self_attn.register_forward_pre_hook(hook, with_kwargs=True)


class NormEps(Fault):
    name, doc = "norm-eps", "RMSNorm eps 1e-6 (transformers' default) instead of Llama 2's 1e-5"
    visible_at = ("float32",)

    def edit_config(self, config):
        config.rms_norm_eps = 1e-6


class NormLowPrecision(Fault):
    name, doc = "norm-low-precision", "RMSNorm computed in the activation dtype, not float32"
    # float16 with large activations: x**2 overflows 65504 (Llama 2 has activations in the
    # thousands). bfloat16 on CPU accumulates the mean in float32 and hides it (measured).
    visible_at = ("float16",)

    def edit_model(self, model):
        def forward(self, x):
            return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

        for module in model.modules():
            if type(module).__name__ == "LlamaRMSNorm":
                module.forward = forward.__get__(module)


class SwapGateUp(Fault):
    name, doc = "swap-gate-up", "w1 and w3 swapped in conversion: silu(up) * gate"

    def edit_model(self, model):
        for layer in _layers(model):
            m = layer.mlp
            m.gate_proj.weight.data, m.up_proj.weight.data = m.up_proj.weight.data, m.gate_proj.weight.data


class GqaTile(Fault):
    name, doc = "gqa-tile", "GQA kv heads repeated by tiling (head i uses kv i % n_kv) not by blocks"

    def edit_model(self, model):
        c = model.config
        n, n_kv = c.num_attention_heads, c.num_key_value_heads
        if n == n_kv:
            raise InputError("--plant gqa-tile: the model has no GQA (n_kv_heads == n_heads)")
        rep, hd = n // n_kv, c.hidden_size // n
        # Reordering q heads (and o_proj's columns with them) so that block-repeat pairs new head
        # i with the kv head that tiling would give old head order[i] reproduces the tiling bug.
        order = [j * n_kv + g for g in range(n_kv) for j in range(rep)]
        rows = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in order])
        for layer in _layers(model):
            a = layer.self_attn
            a.q_proj.weight.data = a.q_proj.weight.data[rows].clone()
            a.o_proj.weight.data = a.o_proj.weight.data[:, rows].clone()


class TiedEmbeddings(Fault):
    name, doc = "tied-embeddings", "output head tied to the input embedding (Llama 2 does not tie)"

    def edit_model(self, model):
        model.lm_head.weight.data = model.model.embed_tokens.weight.data.clone()


class NoFinalNorm(Fault):
    name, doc = "no-final-norm", "final RMSNorm before the output head skipped"

    def edit_model(self, model):
        model.model.norm = torch.nn.Identity()


class AttnScale(Fault):
    name, doc = "attn-scale", "attention scores scaled by 1/head_dim instead of 1/sqrt(head_dim)"

    def edit_model(self, model):
        hd = model.config.hidden_size // model.config.num_attention_heads
        for layer in _layers(model):
            layer.self_attn.q_proj.weight.data /= hd ** 0.5


class PermuteV(Fault):
    name, doc = "permute-v", "the q/k permute also applied to v (a converter that permutes every projection)"

    def edit_model(self, model):
        from reference_model.convert import permute
        for layer in _layers(model):
            v = layer.self_attn.v_proj
            v.weight.data = permute(v.weight.data, model.config.num_key_value_heads)


class ActGelu(Fault):
    name, doc = "act-gelu", "hidden_act gelu instead of silu in the config"

    def edit_config(self, config):
        config.hidden_act = "gelu"


class RopeLowPrecision(Fault):
    name, doc = "rope-low-precision", "RoPE frequencies (inv_freq) held in the activation dtype, not float32"
    # The angle position * inv_freq inherits inv_freq's relative rounding (2^-9 in bfloat16), so
    # its absolute error grows with position: invisible on short inputs, plain after ~1000 tokens
    # on head_dim 128 (measured with `llama-parity axes`).
    visible_at = ("bfloat16", "float16")
    min_positions = 1024

    def not_applicable(self):
        import inspect

        import transformers
        from transformers.models.llama import modeling_llama
        if "inv_freq" in inspect.getsource(modeling_llama.LlamaRotaryEmbedding.forward):
            return ""
        return (f"transformers {transformers.__version__} builds its cos/sin cache once at load, so inv_freq's "
                "dtype is not used by the forward")

    def edit_model(self, model):
        dtype = next(model.parameters()).dtype
        for name, buf in list(model.named_buffers()):
            if "rotary" in name and buf.is_floating_point():
                owner = model.get_submodule(name.rsplit(".", 1)[0])
                setattr(owner, name.rsplit(".", 1)[1], buf.to(dtype))


# Not planted: positions counted from 1. RoPE is relative, so a full forward without cache or
# padding cannot see a constant position offset (measured: ratio ~1 at every dtype); the cache
# and padding suites are where that bug shows.

FAULTS: dict[str, type[Fault]] = {f.name: f for f in (
    NoPermute, RopeBase, MaskShift, NormEps, NormLowPrecision, SwapGateUp, GqaTile, TiedEmbeddings,
    NoFinalNorm, AttnScale, PermuteV, ActGelu, RopeLowPrecision)}


def get_fault(name: str | None) -> Fault | None:
    if name is None:
        return None
    if name not in FAULTS:
        raise InputError(f"--plant: unknown fault {name!r} (known: {', '.join(FAULTS)})")
    fault = FAULTS[name]()
    why = fault.not_applicable()
    if why:
        raise InputError(f"--plant {name}: not applicable here: {why}")
    return fault
