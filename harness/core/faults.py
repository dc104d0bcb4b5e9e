"""Planted bugs: the mistakes a real Llama 2 port makes, applied to the transformers subject.

The one registry of them. ``--plant NAME`` on any suite that lists the fault runs that suite
with it, so a user can see that their tolerance policy catches it (exit 1); the tests do exactly
that for every fault here. Each fault edits the config before loading, the loaded model (or one
decoder layer, so that streaming can plant it too), the forward arguments, or the tokenizer
config of an HF folder; none depends on private transformers functions, so every release is
planted the same way. ``suites`` says where a fault is planted; ``shows_in`` narrows that to the
sub-suites (behaviour's) whose checks can see it. ``kinds`` says which subject kinds
(harness.subjects) a fault can edit: transformers faults edit a torch model; llama.cpp faults edit
the HF tensors its converter reads (``edit_hf_state``) or the runtime's context (``edit_context``).
"""
from __future__ import annotations

import torch

from harness.core import compat
from harness.core.errors import InputError
from reference_model.convert import permute, unpermute

MODEL_SUITES = ("logits", "localise", "axes")      # full-model faults
LAYER_SUITES = (*MODEL_SUITES, "stream")           # faults inside one decoder layer stream too


class Fault:
    name = ""
    doc = ""
    suites: tuple[str, ...] = MODEL_SUITES
    shows_in: tuple[str, ...] = ()
    #: dtypes where the fault changes anything (a precision bug is invisible in float32)
    visible_at = ("float32", "bfloat16", "float16")
    #: the shortest sequence on which the logits suite sees it (the `axes` suite runs long ones)
    min_positions = 1
    #: the smallest preset on which it changes anything (harness.core.presets; the tests plant it there)
    fixture = "tiny-gqa"
    #: the preset the tests plant it on at float16: one with outlier activations, where a precision
    #: bug of the forward shows (tiny-gqa's float16 error is too small to hide it from, too large to show it)
    fixture_float16 = "tiny-outliers"
    #: where the planted bug first changes a value, as (layer, op) of harness.scale.capture, read off
    #: how the fault is planted (every layer from 0, or a model-level op): what localisation must name
    first_point: tuple = (None, None)
    #: the logits suite's inputs beyond random ids that the fault needs in order to show
    inputs: tuple[str, ...] = ()
    #: the subject kinds (harness.subjects) whose artefact this fault edits; empty: the model faults
    #: of the logits suite edit any transformers model (see subject_kinds)
    kinds: tuple[str, ...] = ()

    def expected_point(self, attn: str) -> tuple:
        return self.first_point

    def not_applicable(self) -> str:
        """Why the installed transformers cannot be planted with this fault ('' when it can)."""
        return ""

    def edit_config(self, config) -> None:
        pass

    def edit_model(self, model) -> None:
        """Any Llama model class (CausalLM, the bare LlamaModel, SequenceClassification)."""
        for layer in _layers(model):
            self.edit_layer(layer, model.config)

    def edit_layer(self, layer, config) -> None:
        pass

    def forward_kwargs(self, ids: torch.Tensor) -> dict:
        return {}

    def edit_tokenizer_config(self, config: dict) -> None:
        pass

    def edit_tokenizer(self, subject, truth) -> None:
        """A tokenizer suite subject (its encode/decode callables), given the suite's truth."""

    def edit_built(self, built) -> None:
        """What a subject of ``kinds`` built (a quantised model, an ONNX graph or folder), once built."""


def _layers(model):
    return model.layers if hasattr(model, "layers") else model.model.layers


class NoPermute(Fault):
    name, doc = "no-permute", "q/k weights converted without Meta->HF permute (interleaved vs rotate_half RoPE)"
    first_point = (0, "q")

    suites = LAYER_SUITES

    def edit_layer(self, layer, c):
        a = layer.self_attn
        a.q_proj.weight.data = unpermute(a.q_proj.weight.data, c.num_attention_heads)
        a.k_proj.weight.data = unpermute(a.k_proj.weight.data, c.num_key_value_heads)


class RopeBase(Fault):
    name, doc = "rope-base", "RoPE base 1% off (10100 instead of 10000)"
    first_point = (0, "q")
    visible_at = ("float32",)   # below float32, short inputs hide it in rounding noise (measured)

    suites = LAYER_SUITES

    def not_applicable(self):
        if compat.has_rope_theta():
            return ""
        return f"transformers {compat.transformers_release()} has no rope_theta (its RoPE base is fixed at 10000)"

    def edit_config(self, config):
        params = getattr(config, "rope_parameters", None)
        if isinstance(params, dict) and "rope_theta" in params:
            params["rope_theta"] = params["rope_theta"] * 1.01
        if hasattr(config, "rope_theta"):
            config.rope_theta = config.rope_theta * 1.01


class MaskShift(Fault):
    name, doc = "mask-shift", "causal mask off by one: each position also sees the next token"

    def expected_point(self, attn):
        # eager hands back its own attention weights; for other kernels capture recomputes them
        # with a correct causal mask, so the first wrong value is the attention's output
        return (0, "attn_weights") if attn == "eager" else (0, "attn")

    suites = LAYER_SUITES

    def edit_layer(self, layer, config):
        def hook(module, args, kwargs):
            h = kwargs.get("hidden_states", args[0] if args else None)
            seq = h.shape[1]
            allowed = torch.ones(seq, seq, dtype=torch.bool, device=h.device).tril(1)
            mask = torch.zeros(seq, seq, dtype=h.dtype, device=h.device)
            mask = mask.masked_fill(~allowed, torch.finfo(h.dtype).min)
            kwargs["attention_mask"] = mask[None, None].expand(h.shape[0], 1, seq, seq)
            return args, kwargs

        layer.self_attn.register_forward_pre_hook(hook, with_kwargs=True)


class NormEps(Fault):
    name, doc = "norm-eps", "RMSNorm eps 1e-6 (transformers' default) instead of Llama 2's 1e-5"
    first_point = (0, "attn_norm")
    visible_at = ("float32",)
    suites = LAYER_SUITES

    def edit_config(self, config):
        config.rms_norm_eps = 1e-6


class NormLowPrecision(Fault):
    name, doc = "norm-low-precision", "RMSNorm computed in the activation dtype, not float32"
    # float16 with large activations: x**2 overflows 65504 (Llama 2 has activations in the
    # thousands). bfloat16 on CPU accumulates the mean in float32 and hides it (measured).
    first_point = (0, "attn_norm")
    visible_at = ("float16",)
    suites = LAYER_SUITES

    def edit_model(self, model):
        self.edit_layer(model, model.config)

    def edit_layer(self, layer, config):
        def forward(self, x):
            return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

        for module in layer.modules():
            if type(module).__name__ == "LlamaRMSNorm":
                module.forward = forward.__get__(module)


class SwapGateUp(Fault):
    name, doc = "swap-gate-up", "w1 and w3 swapped in conversion: silu(up) * gate"
    first_point = (0, "mlp")

    suites = LAYER_SUITES

    def edit_layer(self, layer, config):
        m = layer.mlp
        m.gate_proj.weight.data, m.up_proj.weight.data = m.up_proj.weight.data, m.gate_proj.weight.data


class GqaTile(Fault):
    name, doc = "gqa-tile", "GQA kv heads repeated by tiling (head i uses kv i % n_kv) not by blocks"
    first_point = (0, "q")      # planted by reordering q's heads (below), so q is the first changed value

    suites = LAYER_SUITES

    def edit_layer(self, layer, c):
        n, n_kv = c.num_attention_heads, c.num_key_value_heads
        if n == n_kv:
            raise InputError("--plant gqa-tile: the model has no GQA (n_kv_heads == n_heads)")
        rep, hd = n // n_kv, c.hidden_size // n
        # Reordering q heads (and o_proj's columns with them) so that block-repeat pairs new head
        # i with the kv head that tiling would give old head order[i] reproduces the tiling bug.
        order = [j * n_kv + g for g in range(n_kv) for j in range(rep)]
        rows = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in order])
        a = layer.self_attn
        a.q_proj.weight.data = a.q_proj.weight.data[rows].clone()
        a.o_proj.weight.data = a.o_proj.weight.data[:, rows].clone()


class TiedEmbeddings(Fault):
    name, doc = "tied-embeddings", "output head tied to the input embedding (Llama 2 does not tie)"
    first_point = (None, "head")

    def edit_model(self, model):
        model.lm_head.weight.data = model.model.embed_tokens.weight.data.clone()


class NoFinalNorm(Fault):
    name, doc = "no-final-norm", "final RMSNorm before the output head skipped"
    first_point = (None, "norm")

    def edit_model(self, model):
        model.model.norm = torch.nn.Identity()


class AttnScale(Fault):
    name, doc = "attn-scale", "attention scores scaled by 1/head_dim instead of 1/sqrt(head_dim)"
    first_point = (0, "q")

    suites = LAYER_SUITES

    def edit_layer(self, layer, config):
        layer.self_attn.q_proj.weight.data /= (config.hidden_size // config.num_attention_heads) ** 0.5


class PermuteV(Fault):
    name, doc = "permute-v", "the q/k permute also applied to v (a converter that permutes every projection)"
    first_point = (0, "v")

    suites = LAYER_SUITES

    def edit_layer(self, layer, config):
        v = layer.self_attn.v_proj
        v.weight.data = permute(v.weight.data, config.num_key_value_heads)


class ActGelu(Fault):
    name, doc = "act-gelu", "hidden_act gelu instead of silu in the config"
    first_point = (0, "mlp")

    suites = LAYER_SUITES

    def edit_config(self, config):
        config.hidden_act = "gelu"


class RopeLowPrecision(Fault):
    name, doc = "rope-low-precision", "RoPE frequencies (inv_freq) held in the activation dtype, not float32"
    # The angle position * inv_freq inherits inv_freq's relative rounding (2^-9 in bfloat16), so
    # its absolute error grows with position: invisible on short inputs, plain after ~1000 tokens
    # on head_dim 128 (measured with `llama-parity axes`).
    first_point = (0, "q")
    visible_at = ("bfloat16", "float16")
    min_positions = 1024

    def not_applicable(self):
        if compat.rope_uses_inv_freq_at_forward():
            return ""
        return (f"transformers {compat.transformers_release()} builds its cos/sin cache once at load, so inv_freq's "
                "dtype is not used by the forward")

    def edit_model(self, model):
        dtype = next(model.parameters()).dtype
        for name, buf in list(model.named_buffers()):
            if "rotary" in name and buf.is_floating_point():
                owner = model.get_submodule(name.rsplit(".", 1)[0])
                setattr(owner, name.rsplit(".", 1)[1], buf.to(dtype))


# --- precision regressions: small, systematic, visible where the dtype's rounding is finer ------

class ResidualLowPrecision(Fault):
    name, doc = "residual-low-precision", ("each block's residual output rounded through bfloat16, which keeps "
                                           "fewer digits than float32 and float16")
    first_point = (0, "resid")
    visible_at = ("float32", "float16")
    suites = LAYER_SUITES

    def edit_layer(self, layer, config):
        def round_trip(module, args, out):
            h = out[0] if isinstance(out, tuple) else out
            h = h.to(torch.bfloat16).to(h.dtype)
            return (h, *out[1:]) if isinstance(out, tuple) else h
        layer.register_forward_hook(round_trip)


class AttnAddLowPrecision(Fault):
    name, doc = "attn-add-low-precision", ("the residual add after attention rounded through bfloat16 (the sum the "
                                           "MLP and the next add both use)")
    first_point = (0, "attn_resid")
    visible_at = ("float32", "float16")
    suites = LAYER_SUITES

    def edit_layer(self, layer, config):
        # Both Meta's block and transformers' layer hand the sum itself to the MLP norm and keep
        # the same tensor as the residual, so rounding it in place is a bug in the add.
        def round_in_place(module, args):
            args[0].copy_(args[0].to(torch.bfloat16))
        layer.post_attention_layernorm.register_forward_pre_hook(round_in_place)


class FinalNormEps(Fault):
    name, doc = "final-norm-eps", "the final RMSNorm's eps 10x too large (1e-4 instead of 1e-5)"
    first_point = (None, "norm")
    visible_at = ("float32",)

    def edit_model(self, model):
        norm = model.model.norm if hasattr(model, "model") else model.norm
        norm.variance_epsilon *= 10


class AttnScaleBf16(Fault):
    name, doc = "attn-scale-bf16", ("the attention scale 1/sqrt(head_dim) rounded to bfloat16 (a no-op where it is "
                                    "exact, e.g. head_dim 16 or 64; 1.1e-4 off at Llama 2's 128)")
    first_point = (0, "q")
    visible_at = ("float32",)
    suites = LAYER_SUITES
    fixture = "long-hd128"

    def edit_layer(self, layer, config):
        hd = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        exact = hd ** -0.5
        rounded = torch.tensor(exact, dtype=torch.bfloat16).item()
        layer.self_attn.q_proj.weight.data *= rounded / exact


class VocabTruncated(Fault):
    name, doc = "vocab-truncated", ("the head drops its last vocabulary row, as pretraining_tp > 1 did in 4.31-4.46 "
                                    "for a vocabulary it does not divide")
    first_point = (None, "head")
    suites = ("logits",)

    def edit_model(self, model):
        model.lm_head.register_forward_hook(lambda module, args, out: out[..., :-1])


class SpecialRowsZeroed(Fault):
    name, doc = "special-rows-zeroed", ("the embedding rows of <unk> and </s> (ids 0 and 2) zeroed, as a fine-tune "
                                        "that zeroes its pad row (<unk>) or a resize that re-initialises them does")
    # Only inputs holding ids 0 or 2 can see it: the logits suite's default rows carry them
    # (cases.py); <s> (1) is left alone, since every row starts with it and would show any bug there
    first_point = (None, "embed")

    def edit_model(self, model):
        emb = model.get_input_embeddings()
        emb.weight.data[[0, 2]] = 0


class RopeWraps512(Fault):
    name, doc = "rope-wraps-512", ("positions from 512 on wrap around (a RoPE table or position buffer of 512 rows "
                                   "indexed modulo its length): invisible in any window of 512 tokens")
    # the full-context row it needs is localised on coarse ops (harness.suites.logits), so the first
    # changed value named is the attention's output, not q
    first_point = (0, "attn")
    min_positions = 513
    WRAP = 512

    def edit_model(self, model):
        def wrap(module, args, kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            if ids is None:
                return args, kwargs
            pos = kwargs.get("position_ids")
            if pos is None:
                past = _cache_length(kwargs.get("cache", kwargs.get("past_key_values")))
                pos = torch.arange(past, past + ids.shape[1], device=ids.device)[None].expand(ids.shape[0], -1)
            kwargs["position_ids"] = pos % self.WRAP
            return args, kwargs
        model.register_forward_pre_hook(wrap, with_kwargs=True)


class KvKeysBf16(Fault):
    name, doc = "kv-keys-bf16", ("keys kept in bfloat16 on their way into the KV cache, whatever the model's dtype "
                                 "(a cache allocated in a narrower dtype): only cached decoding sees it")
    # logits: its cached cell. At float16 end to end it is only 1.4x the reference's KL (inside
    # what a correct subject's extremes scatter by); cache_gap catches it: the cached logits
    # against transformers' own full forward, 1.4-2.4x the dtype's rounding where a correct cache
    # stays below 0.62 (docs/design.md, "Statistics that hold ..."). Not on a model whose float16
    # error is dominated by outlier activations (tiny-outliers: 0.13x): there the keys' rounding is
    # small beside the forward's. A no-op at bfloat16 itself: no standard float dtype is narrower.
    suites, inputs = ("logits",), ("cached",)
    fixture_float16 = "tiny-gqa"
    first_point = (None, "kv_cache")
    visible_at = ("float32", "float16")

    def edit_model(self, model):
        state = {"cached": False}

        def note(module, args, kwargs):     # only forwards that fill a cache round their keys
            state["cached"] = bool(kwargs.get("use_cache"))
            return args, kwargs

        def narrow(module, args, out):
            return out.to(torch.bfloat16).to(out.dtype) if state["cached"] else out
        model.register_forward_pre_hook(note, with_kwargs=True)
        for layer in _layers(model):
            layer.self_attn.k_proj.register_forward_hook(narrow)


def _cache_length(cache) -> int:
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    return int(cache[0][0].shape[2])      # 4.31-4.35: a tuple of (key, value) per layer


# Not planted: positions counted from 1. RoPE is relative, so a full forward without cache or
# padding cannot see a constant position offset (measured: ratio ~1 at every dtype); the cache
# and padding suites are where that bug shows (cache-off-by-one).


# --- behaviour: what the suites beyond one forward pass catch ------------------------------------

class PadAttend(Fault):
    name, doc = "pad-attend", "the attention mask is dropped: pad tokens are attended"
    # logits: its padded cell (the main gate sees a padding bug, not only `behaviour --suite padding`)
    suites, shows_in = ("behaviour", "logits"), ("padding", "seqcls")
    first_point, inputs = (None, "attention_mask"), ("padded",)

    def edit_model(self, model):
        def drop_mask(module, args, kwargs):
            # Every token marked real, so pads are attended. (Passing no mask at all is not the same
            # bug in 5.x: with explicit position_ids it infers packed sequences from the position resets.)
            mask = kwargs.get("attention_mask")
            if mask is not None and mask.dim() == 2:
                kwargs["attention_mask"] = torch.ones_like(mask)
            return args, kwargs
        model.register_forward_pre_hook(drop_mask, with_kwargs=True)


class CacheOffByOne(Fault):
    name, doc = "cache-off-by-one", "decoding steps put the new token one position too far"
    # logits: its cached cell
    suites, shows_in = ("behaviour", "logits"), ("cache", "generate")
    first_point, inputs = (None, "kv_cache"), ("cached",)

    def edit_model(self, model):
        def shift(module, args, kwargs):
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
        model.register_forward_pre_hook(shift, with_kwargs=True)


class PoolLastPosition(Fault):
    name, doc = "pool-last-position", ("pad_token_id set to a token that never occurs: pooling takes the last "
                                       "position even under right padding")
    suites, shows_in = ("behaviour",), ("seqcls",)

    def edit_model(self, model):
        model.config.pad_token_id = model.config.vocab_size - 1


class KeepArgIgnored(Fault):
    name, doc = "keep-arg-ignored", "logits_to_keep / num_logits_to_keep accepted and ignored (every position returned)"
    suites, shows_in = ("behaviour",), ("api",)

    def edit_model(self, model):
        def drop(module, args, kwargs):
            for k in ("logits_to_keep", "num_logits_to_keep"):
                kwargs.pop(k, None)
            return args, kwargs
        model.register_forward_pre_hook(drop, with_kwargs=True)


class GcRecomputeStale(Fault):
    name, doc = ("gc-recompute-stale", "a checkpointed block's recomputation in backward sees state its first pass "
                 "left behind, as 4.36.0's live cache did under the default use_cache (#28056)")
    suites, shows_in = ("behaviour",), ("api",)

    def edit_model(self, model):
        calls: dict[int, int] = {}
        # a model forward starts a fresh count; an MLP called twice before the next one is being
        # recomputed by checkpointing (hooked on the MLP: releases differ in how the block's own
        # __call__ is wrapped): its input is then not the first pass's
        model.register_forward_pre_hook(lambda module, args: calls.clear())

        def stale(module, args):
            n = calls.get(id(module), 0)
            calls[id(module)] = n + 1
            if n == 0 or not module.training:
                return None
            return (args[0] * (1 + 2 ** -7), *args[1:])
        for layer in _layers(model):
            layer.mlp.register_forward_pre_hook(stale)


class LastLayerGateUp(Fault):
    name, doc = "last-layer-gate-up", "w1/w3 swapped in the last block only"
    suites, shows_in = ("behaviour",), ("hidden", "generate")

    def edit_model(self, model):
        SwapGateUp().edit_layer(_layers(model)[-1], model.config)


# --- placement: a block lost or mangled on its way between devices -------------------------------

def _placement_hooks():
    from accelerate.hooks import ModelHook

    class DropBlock(ModelHook):
        """The block's output is its input: a placement that loses a block on the way."""

        def pre_forward(self, module, *args, **kwargs):
            self.seen = args[0] if args else kwargs["hidden_states"]
            return args, kwargs

        def post_forward(self, module, output):
            return (self.seen, *output[1:]) if isinstance(output, tuple) else self.seen

    class HalfHop(ModelHook):
        """The hidden state reaches the block through float16: a transfer in the wrong dtype."""

        def pre_forward(self, module, *args, **kwargs):
            if args:
                args = (args[0].to(torch.float16).to(args[0].dtype), *args[1:])
            else:
                h = kwargs["hidden_states"]
                kwargs["hidden_states"] = h.to(torch.float16).to(h.dtype)
            return args, kwargs

    return {"drop-block": DropBlock, "half-hop": HalfHop}


class PlacementFault(Fault):
    """Added to the last block on top of accelerate's own hook there (after dispatch)."""
    suites = ("place",)

    def edit_model(self, model):
        from accelerate.hooks import add_hook_to_module
        add_hook_to_module(_layers(model)[-1], _placement_hooks()[self.name](), append=True)


class DropBlock(PlacementFault):
    name, doc = "drop-block", "the last block's output is replaced by its input"


class HalfHop(PlacementFault):
    name, doc = "half-hop", "the last block's input passes through float16 (visible at float32)"


# --- bench: what lm-eval's wrapper is handed -----------------------------------------------------

class DropBos(Fault):
    # What transformers 5 gives for a folder with only tokenizer.model: its tokenizer says
    # add_bos_token false, every setting left alone.
    name, doc = "drop-bos", "HF tokenizer_config.json with add_bos_token=false"
    suites = ("bench",)

    def edit_tokenizer_config(self, config: dict) -> None:
        config["add_bos_token"] = False


# --- tokenizers: the two spacing bugs transformers' Llama tokenizers had next to special tokens ---

class TokSpaceAfterSpecial(Fault):
    name, doc = "tok-space-after-special", ("text right after a special token gets a dummy-prefix space "
                                            "('<s>Hello' -> '<s>', '▁Hello'): the pre-legacy=False behaviour")
    suites = ("tokenizer",)

    def edit_tokenizer(self, s, truth):
        """Planted on transformers subjects' encode and batch encode (not the reference's)."""
        if s.hf is None:
            return

        def legacy(text: str, real=s.encode) -> list[int]:
            if not truth.has_special(text):
                return real(text)
            ids = []
            for part in truth._split.split(text):
                ids += [truth.specials[part]] if part in truth.specials else (list(truth.sp.encode(part)) if part else [])
            return ids
        s.encode = legacy
        s.batch_encode = lambda texts: [legacy(x) for x in texts]


class TokDecodeDropsSpace(Fault):
    name, doc = "tok-decode-drops-space", ("decoding with special tokens kept drops the space after a special "
                                           "token ('<s> Hello' -> '<s>Hello')")
    suites = ("tokenizer",)

    def edit_tokenizer(self, s, truth):
        if s.decode_keep is not None:
            real = s.decode_keep
            s.decode_keep = lambda ids: _drop_space_after(real(ids), truth.specials)


class TokSpaceBeforeSpecial(Fault):
    name, doc = "tok-space-before-special", ("decoding with special tokens kept puts a space before a special "
                                             "token that follows text ('Hey</s> you' -> 'Hey </s> you'; the "
                                             "slow tokenizer of 4.31-4.48)")
    suites = ("tokenizer",)

    def edit_tokenizer(self, s, truth):
        if s.decode_keep is not None:
            real = s.decode_keep
            s.decode_keep = lambda ids: _space_before(real(ids), truth.specials)


class TokDropLastId(Fault):
    name, doc = "tok-drop-last-id", "encode loses the last id of every text (a bug no known mechanism explains)"
    suites = ("tokenizer",)

    def edit_tokenizer(self, s, truth):
        if s.hf is None and not s.name.startswith("transformers."):
            return
        real = s.encode
        s.encode = lambda text: real(text)[:-1]
        s.batch_encode = lambda texts: [real(t)[:-1] for t in texts]


def _space_before(text: str, specials: dict) -> str:
    import re
    pattern = "|".join(re.escape(sp) for sp in sorted(specials, key=len, reverse=True))
    return re.sub(f"(?<=[^ ])({pattern})(?=.)", r" \1", text, flags=re.S)   # between text pieces only


def _drop_space_after(text: str, specials: dict) -> str:
    for sp in specials:
        text = text.replace(sp + " ", sp)
    return text


# --- llama.cpp: a converter or runtime that gets Llama 2 wrong (harness/subjects/llamacpp.py) ------

class LlamaCppFault(Fault):
    kinds, suites = ("llama.cpp",), ("logits",)
    fixture = "tiny-llama2"

    def edit_hf_state(self, state: dict, config: dict) -> None:
        """The HF tensors handed to llama.cpp's converter (a converter bug, written into the GGUF)."""

    def edit_context(self, context: dict) -> None:
        """llama.cpp's context settings (type_k, type_v, flash_attn) behind the subject's back."""


def _qk(state: dict, config: dict, op) -> None:
    for key in list(state):
        if key.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
            n = config["num_attention_heads"] if ".q_proj." in key else config["num_key_value_heads"]
            state[key] = op(state[key], n).contiguous()


class GgufNoPermute(LlamaCppFault):
    name, doc = "gguf-no-permute", ("GGUF written without undoing HF's q/k permute: llama.cpp's interleaved RoPE "
                                    "rotates rotate_half's pairs")

    def edit_hf_state(self, state, config):
        # the converter undoes one permute; handing it q/k permuted twice leaves HF's layout in the file
        _qk(state, config, permute)


class GgufPermuteTwice(LlamaCppFault):
    name, doc = "gguf-permute-twice", "GGUF whose q/k were un-permuted twice (a converter that undoes a permute already undone)"

    def edit_hf_state(self, state, config):
        _qk(state, config, unpermute)


class KvF16ForF32(LlamaCppFault):
    name, doc = "kv-f16-for-f32", "the KV cache silently kept in float16 when float32 was asked for"

    def edit_context(self, context):
        for k in ("type_k", "type_v"):
            if context[k] == "f32":
                context[k] = "f16"


# --- subjects beyond transformers: bugs in what a runtime is handed (harness.subjects) -----------
# Planted with a subject's plant=NAME option into its built artefact (a copy, never the cache).

RING = 1.01     # a RoPE base 1% off: 10100 instead of 10000, as RopeBase plants in transformers


def _ring(inv_freq, dim: int):
    """inv_freq_i = base^(-2i/dim) recomputed for base x RING."""
    import numpy as np
    i = np.arange(inv_freq.shape[-1], dtype=np.float64)
    return (inv_freq.astype(np.float64) * RING ** (-2 * i / dim)).astype(inv_freq.dtype)


def _onnx_folder_edit(folder, edit) -> None:
    """Load an onnxruntime-genai model folder's graph with its weights, edit initializers, save back."""
    import onnx
    from pathlib import Path
    path = Path(folder) / "model.onnx"
    proto = onnx.load(str(path))
    edit({i.name: i for i in proto.graph.initializer})
    for p in Path(folder).glob("model.onnx*"):
        p.unlink()
    onnx.save(proto, str(path), save_as_external_data=True, location="model.onnx.data")


def _set_array(initializer, array) -> None:
    from onnx import numpy_helper
    initializer.CopyFrom(numpy_helper.from_array(array, initializer.name))


class OnnxRopeBase(Fault):
    name, doc = "onnx-rope-base", "the exported ONNX graph's RoPE frequencies made with base 10100, not 10000"
    suites, kinds = (), ("onnxruntime",)
    visible_at = ("float32",)

    def edit_built(self, proto):
        from onnx import numpy_helper
        found = [i for i in proto.graph.initializer if i.name.endswith("rotary_emb.inv_freq")]
        if not found:
            raise RuntimeError("plant onnx-rope-base: no rotary_emb.inv_freq initializer in the exported graph")
        for init in found:
            inv = numpy_helper.to_array(init)
            _set_array(init, _ring(inv, 2 * inv.shape[-1]))


class GenaiRopeBase(Fault):
    name, doc = "genai-rope-base", "onnxruntime-genai's cos/sin cache made with RoPE base 10100, not 10000"
    suites, kinds = (), ("onnxruntime-genai",)
    visible_at = ("float32",)

    def edit_built(self, folder):
        import numpy as np
        from onnx import numpy_helper

        def edit(init):
            cos, sin = numpy_helper.to_array(init["cos_cache"]), numpy_helper.to_array(init["sin_cache"])
            inv = np.arctan2(sin[1].astype(np.float64), cos[1].astype(np.float64))   # position 1: the frequencies
            angle = np.arange(cos.shape[0], dtype=np.float64)[:, None] * _ring(inv, 2 * inv.shape[-1])[None]
            _set_array(init["cos_cache"], np.cos(angle).astype(cos.dtype))
            _set_array(init["sin_cache"], np.sin(angle).astype(sin.dtype))
        _onnx_folder_edit(folder, edit)


class ScaleRow0(Fault):
    """A quantiser that writes the first output channel's scale for every channel of one tensor
    (layer 0's down projection): the weights of that tensor come back scaled wrongly row by row."""
    suites = ()
    visible_at = ("float32", "bfloat16", "float16")

    def edit_built(self, model):
        w = model.model.layers[0].mlp.down_proj.weight
        scale = getattr(w, "scale", None)
        scale = getattr(w, "_scale", None) if scale is None else scale
        if scale is None:
            raise RuntimeError(f"plant {self.name}: layer 0's down_proj weight ({type(w).__name__}) has no scale")
        with torch.no_grad():
            scale.copy_(scale.reshape(-1)[0].expand_as(scale))


class TorchaoScaleRow0(ScaleRow0):
    name, doc = "torchao-scale-row0", "torchao: every output channel of one tensor dequantised with channel 0's scale"
    kinds = ("torchao",)


class QuantoScaleRow0(ScaleRow0):
    name, doc = "quanto-scale-row0", "quanto: every channel (group) of one tensor dequantised with the first one's scale"
    kinds = ("quanto",)


class BnbScaleBlock0(Fault):
    """bitsandbytes' absmax of the first block (4-bit) or row (int8) written for all of one tensor
    (layer 0's down projection)."""
    name, doc = "bnb-scale-block0", "bitsandbytes: every block (4-bit) or row (int8) of one tensor dequantised with the first one's scale"
    suites, kinds = (), ("bitsandbytes",)
    visible_at = ("float32", "bfloat16", "float16")

    def edit_built(self, model):
        w = model.model.layers[0].mlp.down_proj.weight
        state = getattr(w, "quant_state", None)
        scale = state.absmax if state is not None else getattr(w, "SCB", None)
        if scale is None:
            raise RuntimeError(f"plant {self.name}: layer 0's down_proj weight ({type(w).__name__}) has no absmax")
        with torch.no_grad():
            scale.copy_(scale.reshape(-1)[0].expand_as(scale))


class GptqZerosV2(Fault):
    """GPTQ's two meanings of a stored zero point mixed up: a checkpoint labelled v1
    (``checkpoint_format = "gptq"``, each zero stored minus one) written with v2's zeros (the zero
    itself), the off-by-one GPT-QModel's v1/v2 conversion exists for. One tensor (layer 0's down
    projection): its every weight comes back one quantisation step low."""
    name, doc = "gptq-zeros-v2", "GPTQ: one tensor's zero points written as v2 into a v1 checkpoint (off by one step)"
    suites, kinds = (), ("gptq",)

    def edit_built(self, folder):
        import json

        from safetensors import safe_open
        from safetensors.torch import load_file, save_file

        from harness.subjects.gptq import pack, unpack
        bits = int(json.loads((folder / "quantize_config.json").read_text(encoding="utf-8"))["bits"])
        key = "model.layers.0.mlp.down_proj.qzeros"
        files = [f for f in sorted(folder.glob("*.safetensors")) if key in safe_open(str(f), "pt").keys()]
        if not files:
            raise InputError(f"--plant {self.name}: {folder} has no {key}")
        state = load_file(str(files[0]))
        zeros = unpack(state[key], bits, 1)
        state[key] = pack((zeros + 1).clamp(max=(1 << bits) - 1), bits, 1)
        save_file(state, str(files[0]), metadata={"format": "pt"})


class GenaiScaleRow0(Fault):
    name, doc = "genai-scale-row0", "onnxruntime-genai int4: every block of one tensor dequantised with block 0's scale"
    suites, kinds = (), ("onnxruntime-genai",)

    def edit_built(self, folder):
        from onnx import numpy_helper
        key = "model.layers.0.mlp.down_proj.MatMul.weight_scales"

        def edit(init):
            if key not in init:
                raise InputError(f"--plant {self.name}: the graph has no {key} (precision=int4 only)")
            scales = numpy_helper.to_array(init[key])
            _set_array(init[key], scales.reshape(-1)[:1].repeat(scales.size).reshape(scales.shape))
        _onnx_folder_edit(folder, edit)


FAULTS: dict[str, type[Fault]] = {f.name: f for f in (
    NoPermute, RopeBase, MaskShift, NormEps, NormLowPrecision, SwapGateUp, GqaTile, TiedEmbeddings,
    NoFinalNorm, AttnScale, PermuteV, ActGelu, RopeLowPrecision, VocabTruncated,
    ResidualLowPrecision, AttnAddLowPrecision, FinalNormEps, AttnScaleBf16, SpecialRowsZeroed, RopeWraps512,
    KvKeysBf16,
    PadAttend, KeepArgIgnored, GcRecomputeStale, CacheOffByOne, PoolLastPosition, LastLayerGateUp, DropBlock, HalfHop, DropBos,
    TokSpaceAfterSpecial, TokDecodeDropsSpace, TokSpaceBeforeSpecial, TokDropLastId, GgufNoPermute, GgufPermuteTwice, KvF16ForF32,
    OnnxRopeBase, GenaiRopeBase, TorchaoScaleRow0, QuantoScaleRow0, BnbScaleBlock0, GptqZerosV2, GenaiScaleRow0)}


# Subjects built on a transformers model (quantised in place or not): the logits suite's model faults
# are planted into them before they quantise.
TRANSFORMERS_KINDS = ("transformers", "torchao", "quanto")


def subject_kinds(fault: type[Fault]) -> tuple[str, ...]:
    """The subject kinds a fault can be planted in (no kinds named: the transformers-built ones)."""
    return fault.kinds or TRANSFORMERS_KINDS


def get_subject_fault(name: str, kind: str, label: str) -> Fault:
    """The fault a subject's ``plant=NAME`` option names, checked against the subject's kind."""
    def plantable(f: type[Fault]) -> bool:   # a tokenizer or behaviour fault edits no built model
        return kind in subject_kinds(f) and bool(f.kinds or "logits" in f.suites)
    known = [n for n, f in FAULTS.items() if plantable(f)]
    if name not in FAULTS or not plantable(FAULTS[name]):
        raise InputError(f"--subject {label}: plant={name!r} is not a fault of {kind} subjects "
                         f"(known: {', '.join(known) or 'none'})")
    fault = FAULTS[name]()
    why = fault.not_applicable()
    if why:
        raise InputError(f"--subject {label}: plant={name}: not applicable here: {why}")
    return fault


def faults_for(suite: str, kind: str = "transformers") -> list[str]:
    return [name for name, f in FAULTS.items() if suite in f.suites and kind in subject_kinds(f)]


def get_fault(name: str | None, suite: str = "logits", kind: str = "transformers") -> Fault | None:
    """The fault --plant names, checked against the suite, the subject kind and the installed release."""
    if name is None:
        return None
    known = faults_for(suite, kind)
    if name in FAULTS and kind not in subject_kinds(FAULTS[name]):
        raise InputError(f"--plant {name}: edits {', '.join(subject_kinds(FAULTS[name]))} subjects, not {kind} "
                         f"(known for {kind} in {suite}: {', '.join(known) or 'none'})")
    if name not in FAULTS:
        raise InputError(f"--plant: unknown fault {name!r} (known for {suite}: {', '.join(known)})")
    if name not in known:
        raise InputError(f"--plant {name}: planted in {', '.join(FAULTS[name].suites)}, not in {suite} "
                         f"(known for {suite}: {', '.join(known) or 'none'})")
    fault = FAULTS[name]()
    why = fault.not_applicable()
    if why:
        raise InputError(f"--plant {name}: not applicable here: {why}")
    return fault


# --- training bugs: the train suite (harness/suites/train) -------------------------------------------
# A training fault may also rewrite the labels a fine-tuning loop hands the model (``train_labels``),
# compute the loss from the logits itself (``train_loss``), or edit the model Trainer drives.

class TrainFault(Fault):
    suites = ("train",)
    fixture = "tiny-gqa"


class GradAccumMean(TrainFault):
    name = "grad-accum-mean"
    doc = ("gradient accumulation averages each micro-batch's mean loss instead of the per-token mean over "
           "all micro-batches (transformers <= 4.45, #34191): the model hides its num_items_in_batch from Trainer")

    def not_applicable(self):
        import inspect
        try:
            from transformers import Trainer
        except Exception as e:   # noqa: BLE001 - Trainer needs accelerate (and a hub it agrees with)
            return f"transformers' Trainer cannot be imported here: {type(e).__name__}: {str(e)[:160]}"
        if "num_items_in_batch" not in inspect.signature(Trainer.compute_loss).parameters:
            return (f"transformers {compat.transformers_release()}'s Trainer has no num_items_in_batch path: it "
                    "averages per micro-batch already (the bug itself)")
        return ""

    def edit_model(self, model):
        # Trainer asks the model whether it takes loss kwargs: 5.x reads accepts_loss_kwargs, 4.46-4.5x a
        # **loss_kwargs in forward's signature. Saying no makes it divide each micro-batch's mean loss by
        # the accumulation steps, as releases before the fix did.
        import inspect

        from transformers import Trainer
        model.accepts_loss_kwargs = False
        if "accepts_loss_kwargs\")" in inspect.getsource(Trainer.__init__):
            return
        forward = model.forward

        def no_loss_kwargs(*args, **kwargs):     # a signature without **loss_kwargs
            kwargs.pop("num_items_in_batch", None)
            return forward(*args, **kwargs)

        model.forward = no_loss_kwargs


class LabelsShiftedTwice(TrainFault):
    name, doc = "labels-shifted-twice", "labels shifted by one before the model shifts them again"

    def train_labels(self, labels, batch):
        return torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)


class PadsInLabels(TrainFault):
    name, doc = "pads-in-labels", "labels = input_ids with the pads not masked (-100): pad tokens are trained on"
    inputs = ("right",)

    def train_labels(self, labels, batch):
        out = labels.clone()
        pads = batch.mask == 0
        out[pads] = batch.ids[pads]
        return out


class CheckpointDropsGrad(TrainFault):
    name = "gc-drops-grad"
    doc = ("gradient checkpointing cuts the graph at the first decoder layer's input (reentrant checkpointing "
           "of an input that does not require grad): everything before it gets no gradient, silently")

    def edit_model(self, model):
        layer = _layers(model)[0]

        def cut(module, args, kwargs):
            if not (module.training and compat.checkpointing_on(model)):
                return None
            if args:
                return (args[0].detach(), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": kwargs["hidden_states"].detach()}

        layer.register_forward_pre_hook(cut, with_kwargs=True)


class RopeBf16Autocast(TrainFault):
    name = "rope-bf16-autocast"
    doc = ("RoPE angles computed inside autocast, so in bfloat16 (transformers 4.38.0-4.38.1, PR #29285): "
           "positions past 256 round, the loss drifts with context")
    visible_at = ("bfloat16", "float16")

    def not_applicable(self):
        from transformers.models.llama import modeling_llama
        if not hasattr(modeling_llama, "LlamaRotaryEmbedding") or "position_ids" not in __import__(
                "inspect").signature(modeling_llama.LlamaRotaryEmbedding.forward).parameters:
            return (f"transformers {compat.transformers_release()} caches cos/sin in float32 buffers at load: no "
                    "angle is computed under autocast")
        return ""

    def edit_model(self, model):
        rotary = getattr(model.model, "rotary_emb", None)
        if rotary is None:
            return
        scaling = getattr(rotary, "attention_scaling", 1.0)

        def forward(x, position_ids):
            device = x.device.type
            inv = rotary.inv_freq[None, :, None].float().expand(position_ids.shape[0], -1, 1).to(x.device)
            freqs = (inv @ position_ids[:, None, :].float()).transpose(1, 2)   # autocast: a bf16 matmul
            emb = torch.cat((freqs, freqs), dim=-1)
            dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
            return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)

        rotary.forward = forward


class CrossEntropyNoUpcast(TrainFault):
    name = "ce-no-upcast"
    doc = "cross entropy on the logits in the working dtype (no float32 upcast): the loss lands on the bf16 grid"
    visible_at = ("bfloat16", "float16")

    def train_loss(self, logits, labels, model):
        dtype = model.lm_head.weight.dtype          # 4.31-4.44 hand back float32 logits: the bug casts back
        if torch.is_autocast_enabled(logits.device.type):
            dtype = torch.get_autocast_dtype(logits.device.type)
        shift = logits[:, :-1].to(dtype).reshape(-1, logits.shape[-1])
        return torch.nn.functional.cross_entropy(shift, labels[:, 1:].reshape(-1), ignore_index=-100)


class LoraScaling(TrainFault):
    name = "lora-scaling"
    doc = ("LoRA's update scaled by alpha / sqrt(r) (rank-stabilised LoRA's rule) where alpha / r was asked for: "
           "every adapted layer's update, its gradients and the merged weights off by sqrt(r)")

    def not_applicable(self):
        from harness.suites.train.lora import peft_missing
        return peft_missing()

    def edit_peft(self, model):
        import math

        from peft.tuners.lora import LoraLayer
        for module in model.modules():
            if isinstance(module, LoraLayer):
                for adapter, r in module.r.items():
                    module.scaling[adapter] = module.lora_alpha[adapter] / math.sqrt(r)


class LoraGcNoInputGrad(TrainFault):
    name = "lora-gc-no-input-grad"
    doc = ("no hook makes the embeddings' output require grad (peft registers one when it wraps a checkpointed "
           "model, transformers 5 when checkpointing is enabled; 4.x with checkpointing enabled after "
           "get_peft_model has none, #26334): under reentrant checkpointing no LoRA weight gets a gradient")

    def not_applicable(self):
        from harness.suites.train.lora import peft_missing
        return peft_missing()

    def edit_peft(self, model):
        base = model.get_base_model()
        base.get_input_embeddings()._forward_hooks.clear()    # the hook peft registered at wrapping
        base.enable_input_require_grads = lambda: None         # the one transformers 5 registers later


FAULTS.update({f.name: f for f in (GradAccumMean, LabelsShiftedTwice, PadsInLabels, CheckpointDropsGrad,
                                   RopeBf16Autocast, CrossEntropyNoUpcast, LoraScaling, LoraGcNoInputGrad)})
