"""LoRA through peft, against an independent LoRA on the reference oracle.

The oracle's LoRA is written here from the paper's definition, y = W x + (alpha / r) B A x, as a
wrapper around the reference's own linear layers (the reference model is not edited; nothing here
imports peft). peft wraps transformers' model; both get the same seeded A and B, and B is set
non-zero (peft's default B = 0 makes A's gradient exactly 0, which would test nothing). Values are
drawn on bfloat16's grid so that every dtype holds the same adapter exactly.

Rows (per dtype, weights loaded in the dtype, the first input batch):

  lora                      adapter gradients (every A and B) and the loss against the oracle's,
                            calibrated by the reference at the dtype carrying the same LoRA
  lora-gc-before-wrap       gradient checkpointing enabled on the model, then wrapped by peft
  lora-gc-after-wrap        wrapped, then checkpointing enabled through the peft model (what Trainer
                            does): both judged against the oracle, and bit-equal to `lora`. A
                            loss outside the graph is measured as every adapter gradient absent;
                            where reentrant checkpointing met an input that does not require grad,
                            the failing rows name that mechanism (lora-gc-no-input-grad, #26334)
  lora-unmerged             logits of the peft model against the oracle's (eval, no grad)
  lora-merged               logits after peft merges the adapter into the dtype's weights, judged
                            against the truth (not against the unmerged model), same calibrator
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from harness.core.findings import Mechanism
from harness.core.store import FAIL, INFO, NA, Row
from harness.core.subjects import DTYPES, ORACLE
from harness.subjects import Cannot
from harness.suites.train import SUITE
from harness.suites.train import grads as G
from harness.suites.train.batches import Batch
from harness.suites.train.metrics import GATED, bitwise_diff, compare, loss_noise
from reference_model.checkpoint import build_model
from reference_model.convert import unpermute

# the rows' `input` settings the `lora` input writes (the module docstring says what each is)
ROW_INPUTS = ("lora", "lora-gc-before-wrap", "lora-gc-after-wrap", "lora-unmerged", "lora-merged")

# transformers' module -> the reference's (attribute path inside a layer)
TARGETS = {"q_proj": "attention.wq", "k_proj": "attention.wk", "v_proj": "attention.wv", "o_proj": "attention.wo",
           "gate_proj": "feed_forward.w1", "up_proj": "feed_forward.w3", "down_proj": "feed_forward.w2"}


def peft_missing() -> str:
    """Why the LoRA rows cannot run here ('' when peft imports)."""
    try:
        import peft  # noqa: F401
    except Exception as e:   # noqa: BLE001 - absent, or broken beside this transformers
        return (f"peft is not installed or does not import here ({type(e).__name__}: {str(e)[:120]}); "
                "pip install -e '.[peft]'")
    return ""


class OracleLoRA(nn.Module):
    """A frozen linear layer plus the low-rank update (alpha / r) B A, as the LoRA paper defines it."""

    def __init__(self, base: nn.Linear, a: torch.Tensor, b: torch.Tensor, scaling: float):
        super().__init__()
        self.base, self.scaling = base, scaling
        self.lora_A, self.lora_B = nn.Parameter(a.clone()), nn.Parameter(b.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scaling * F.linear(F.linear(x, self.lora_A), self.lora_B)


def adapters(ckpt, r: int, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Seeded (A, B) per target in Meta's layout, float64 holding bfloat16-representable values."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, w in sorted(ckpt.state.items()):
        if not any(key.endswith(f"{t}.weight") for t in TARGETS.values()):
            continue
        n_out, n_in = w.shape
        a = torch.randn(r, n_in, generator=gen, dtype=torch.float64) / math.sqrt(n_in)
        b = torch.randn(n_out, r, generator=gen, dtype=torch.float64) * float(w.double().std()) / math.sqrt(r)
        out[key.removesuffix(".weight")] = (a.to(torch.bfloat16).double(), b.to(torch.bfloat16).double())
    return out


def wrap_reference(model: nn.Module, ads: dict, scaling: float, dtype: torch.dtype) -> None:
    """Put OracleLoRA around each target linear of the reference; only the adapters train."""
    for p in model.parameters():
        p.requires_grad_(False)
    for name, (a, b) in ads.items():
        parent, _, attr = name.rpartition(".")
        owner = model.get_submodule(parent)
        setattr(owner, attr, OracleLoRA(getattr(owner, attr), a.to(dtype), b.to(dtype), scaling))


def reference_adapter_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: (torch.zeros(p.shape, dtype=torch.float64) if p.grad is None else p.grad.detach().double().cpu())
            for k, p in model.named_parameters() if p.requires_grad}


def _meta_name(hf: str) -> str | None:
    """peft's parameter name -> the oracle's: base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight
    -> layers.0.attention.wq.lora_A."""
    parts = hf.split(".")
    if "lora_A" not in parts and "lora_B" not in parts:
        return None
    i = parts.index("layers")
    which = "lora_A" if "lora_A" in parts else "lora_B"
    proj = parts[parts.index(which) - 1]
    return f"layers.{parts[i + 1]}.{TARGETS[proj]}.{which}"


def peft_model(model, ads: dict, r: int, alpha: int, fault=None):
    """transformers' model wrapped by peft with the oracle's A and B (HF layout: q/k rows permuted)."""
    from peft import LoraConfig, get_peft_model

    from reference_model.convert import permute
    c = model.config
    heads = {"attention.wq": c.num_attention_heads, "attention.wk": c.num_key_value_heads}
    wrapped = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(TARGETS),
                                               bias="none"))
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            key = _meta_name(name)
            if key is None:
                continue
            a, b = ads[key.rsplit(".", 1)[0]]
            kind = key.rsplit(".", 2)[-2]
            if key.endswith("lora_B") and f"attention.{kind}" in heads:
                b = permute(b, heads[f"attention.{kind}"])
            p.copy_(a if key.endswith("lora_A") else b)
    if fault is not None and hasattr(fault, "edit_peft"):
        fault.edit_peft(wrapped)
    return wrapped


def peft_grads(wrapped) -> dict[str, torch.Tensor]:
    c = wrapped.config
    heads = {"wq": c.num_attention_heads, "wk": c.num_key_value_heads}
    out = {}
    for name, p in wrapped.named_parameters():
        key = _meta_name(name)
        if key is None:
            continue
        g = torch.zeros(p.shape, dtype=torch.float64) if p.grad is None else p.grad.detach().double().cpu()
        kind = key.rsplit(".", 2)[-2]
        if key.endswith("lora_B") and kind in heads:
            g = unpermute(g, heads[kind])
        out[key] = g
    return out


def _loss_and_grads(model, forward, collect, scaled: bool = False) -> G.Grads:
    """The loss and the adapter gradients. ``scaled`` (float16 cells): the loss times a scale as
    GradScaler does (grads._scaled), as every other float16 cell of the suite; unscaled, most small
    adapter gradients flush to 0 (grad_rel_l2 0.034 on the embedded model, reference and peft
    alike; scaled 0.0014, the dtype's own rounding)."""
    graph = True

    def step(scale: float) -> float:
        nonlocal graph
        model.zero_grad(set_to_none=True)
        loss = forward()
        # A loss outside the autograd graph (reentrant checkpointing whose blocks' input does not
        # require grad, transformers #26334) is measured, not raised: backward cannot run, so every
        # adapter gradient is absent (counted as 0) and the row says why.
        graph = loss.requires_grad
        if graph:
            (loss * scale).backward()
        return float(loss.detach())

    def grads_at(scale: float) -> dict:
        grads = collect(model)
        model.zero_grad(set_to_none=True)
        return grads if scale == 1.0 else {k: g / scale for k, g in grads.items()}

    got = G._scaled(step, grads_at, scaled)
    got.extra["loss_requires_grad"] = graph
    return got


class InputGradProbe:
    """Records whether the input embeddings' output requires grad in the forward: with reentrant
    checkpointing a block records a graph only when its input does (torch.utils.checkpoint)."""

    def __init__(self, model):
        self.seen: bool | None = None
        self.handle = model.get_input_embeddings().register_forward_hook(self._hook)

    def _hook(self, module, args, out):
        self.seen = bool(out.requires_grad) if self.seen is None else self.seen

    def close(self) -> None:
        self.handle.remove()


def _ref_forward(model, batch: Batch, device: str, terms: list | None = None):
    """The loss closure; ``terms`` collects each labelled token's cross entropy (the loss's noise scale)."""
    from harness.core.subjects import padded_positions
    ids, mask = batch.ids.to(device), batch.mask.to(device)
    kwargs = {"key_mask": mask, "positions": padded_positions(mask)} if batch.padded else {}

    def forward():
        logits = G._train_forward(model, ids, **kwargs)
        if terms is not None:
            terms.append(G.token_losses(logits, batch.labels))
        return G.token_loss_sum(logits, batch.labels) / batch.tokens()
    return forward


def _hf_forward(model, batch: Batch, device: str):
    def forward():
        model.train()
        return model(input_ids=batch.ids.to(device), attention_mask=batch.mask.to(device),
                     labels=batch.labels.to(device), use_cache=False).loss
    return forward


def _logits_ref(model, batch: Batch, device: str) -> torch.Tensor:
    with torch.no_grad():
        return G._train_forward(model, batch.ids.to(device)).double().cpu()


def _logits_hf(model, batch: Batch, device: str) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch.ids.to(device), use_cache=False).logits.double().cpu()


def _rel_l2(x: torch.Tensor, y: torch.Tensor) -> float:
    v = float((x - y).norm() / y.norm())
    return v if math.isfinite(v) else math.nan


def _first(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def explain_lost_grads(cell: list[Row], gc: str, ev: dict) -> None:
    """Name the mechanism on a checkpointed cell's failing rows when the evidence shows it: reentrant
    checkpointing, the embeddings' output not requiring grad, adapter tensors left without gradient.
    The whole account goes on the grad_rel_l2 row (which carries the evidence), a short one elsewhere."""
    if not (gc == "reentrant" and ev["zero_grad_count"] and ev["embeddings_output_requires_grad"] is False):
        return
    short = f"{ev['zero_grad_count']} of {ev['adapter_tensors']} adapter tensors get no gradient"
    full = f"{short}: reentrant checkpointing, and the blocks' input (the embeddings' output) does not require grad"
    if not ev["loss_requires_grad"]:
        full += "; the loss has no grad_fn, so loss.backward() raises 'element 0 of tensors does not require grad'"
    for r in cell:
        if r.status == FAIL:
            r.extra["finding"] = LORA_GC.key
            text = full if r.metric == "grad_rel_l2" else short
            r.reason = f"{r.reason}; {text}" if r.reason else text


LORA_GC = Mechanism(
    "lora-gc-no-input-grad",
    "LoRA with reentrant gradient checkpointing: the checkpointed blocks' input does not require grad (frozen "
    "embeddings, no enable_input_require_grads hook), so they record no graph and their adapters get no gradient",
    reproduction="model = get_peft_model(model, LoraConfig(...)); model.gradient_checkpointing_enable()  "
                 "# reentrant, after wrapping; loss.requires_grad -> False",
    source="https://github.com/huggingface/transformers/issues/26334")


def lora_rows(measure) -> list[Row]:
    """Every LoRA row of the run (see the module docstring); n/a with the reason when peft is absent."""
    from harness.suites.train.measure import enable_checkpointing, judge
    plan = measure.plan
    cfg = plan.data["lora"]
    r, alpha = int(cfg["r"]), int(cfg["alpha"])
    batch = next((b for b in plan.batches if b.kind == "corpus"), plan.batches[0])
    attn = "eager" if "eager" in plan.attns else plan.attns[0]

    def case(dtype, name, gc="off"):
        return {"dtype": dtype, "cast": "load", "attn": attn, "tp": 1, "checkpointing": gc, "input": name,
                "shape": batch.shape, "device": plan.device}
    why = peft_missing()
    if why:
        return [Row(SUITE, case(d, "lora"), "peft", ORACLE, "all", None, None, NA, why) for d in plan.dtypes]
    ads = adapters(plan.ckpt, r, plan.seed)
    scaling = alpha / r
    oracle = build_model(plan.ckpt, torch.float64, plan.device, rope_dtype=torch.float64)
    wrap_reference(oracle, ads, scaling, torch.float64)
    true_terms: list = []
    truth = _loss_and_grads(oracle, _ref_forward(oracle, batch, plan.device, true_terms), reference_adapter_grads)
    true_logits = _logits_ref(oracle, batch, plan.device)
    del oracle
    rows: list[Row] = []
    for dtype in plan.dtypes:
        ref = build_model(plan.ckpt, DTYPES[dtype], plan.device)
        wrap_reference(ref, ads, scaling, DTYPES[dtype])
        ref_terms: list = []
        rg = _loss_and_grads(ref, _ref_forward(ref, batch, plan.device, ref_terms), reference_adapter_grads,
                             scaled=dtype == "float16")
        rc = compare(rg.grads, truth.grads, rg.loss, truth.loss)["values"]
        rc["loss_noise"] = loss_noise(ref_terms[-1], true_terms[-1], truth.loss)
        ref_logits = _rel_l2(_logits_ref(ref, batch, plan.device), true_logits)
        del ref
        for m in GATED:
            tol, status, reason = judge(plan.policy, dtype, m, rc[m], None)
            rows.append(Row(SUITE, case(dtype, "lora"), "reference", ORACLE, m, rc[m], tol, status, reason,
                            {"loss_noise": rc["loss_noise"], "loss": rg.loss, "oracle_loss": truth.loss}
                            if m == "loss_rel_err" else {}))
        tol, status, reason = judge(plan.policy, dtype, "logits_rel_l2", ref_logits, None)
        rows.append(Row(SUITE, case(dtype, "lora-unmerged"), "reference", ORACLE, "logits_rel_l2", ref_logits, tol,
                        status, reason))
        try:
            rows += _peft_cells(measure, dtype, attn, ads, r, alpha, batch, truth, true_logits, rc, ref_logits, case,
                                enable_checkpointing, judge)
        except Cannot as e:
            rows.append(Row(SUITE, case(dtype, "lora"), "peft", ORACLE, "all", None, None, NA, str(e)))
        except Exception as e:   # noqa: BLE001 - a release pair that cannot run LoRA fails, naming why
            rows.append(Row(SUITE, case(dtype, "lora"), "peft", ORACLE, "all", None, None, FAIL,
                            f"peft LoRA failed: {_first(e)}"))
    return rows


def _peft_cells(measure, dtype, attn, ads, r, alpha, batch, truth, true_logits, rc, ref_logits, case,
                enable_checkpointing, judge) -> list[Row]:
    plan = measure.plan
    load = lambda: measure.module(dtype, attn)  # noqa: E731
    rows: list[Row] = []

    def judged(name, got: G.Grads, gc="off", extra=None) -> list[Row]:
        c = compare(got.grads, truth.grads, got.loss, truth.loss)
        out = []
        for m in GATED:
            tol, status, reason = judge(plan.policy, dtype, m, c["values"][m], rc[m],
                                        rc["loss_noise"] if m == "loss_rel_err" else None)
            if got.nonfinite:
                status, reason = FAIL, got.nonfinite
            out.append(Row(SUITE, case(dtype, name, gc), "peft", ORACLE, m, c["values"][m], tol, status, reason))
        out[1].extra.update({"worst_tensor": c["worst"], "by_kind": c["by_kind"], "by_layer": c["by_layer"],
                             "loss": got.loss, "oracle_loss": truth.loss, **(extra or {})})
        if out[3].status == FAIL and not got.nonfinite:
            out[3].reason += f" (worst tensor {c['worst']})"
        return out

    wrapped = peft_model(load(), ads, r, alpha, plan.fault)
    plain = _loss_and_grads(wrapped, _hf_forward(wrapped, batch, plan.device), peft_grads, scaled=dtype == "float16")
    rows += judged("lora", plain, extra={"r": r, "alpha": alpha, "targets": list(TARGETS)})
    for gc in plan.checkpointing:
        if gc == "off":
            continue
        for order in ("before", "after"):
            name = f"lora-gc-{order}-wrap"
            model = load()
            if order == "before":
                why = enable_checkpointing(model, gc)
                model = peft_model(model, ads, r, alpha, plan.fault)
            else:
                model = peft_model(model, ads, r, alpha, plan.fault)
                why = enable_checkpointing(model, gc)
            if why:
                rows.append(Row(SUITE, case(dtype, name, gc), "peft", ORACLE, "all", None, None, NA, why))
                continue
            try:
                probe = InputGradProbe(model)
                try:
                    got = _loss_and_grads(model, _hf_forward(model, batch, plan.device), peft_grads,
                                          scaled=dtype == "float16")
                finally:
                    probe.close()
            except Exception as e:   # noqa: BLE001 - this cell fails, naming why; the others still run
                rows.append(Row(SUITE, case(dtype, name, gc), "peft", ORACLE, "all", None, None, FAIL,
                                f"peft LoRA with checkpointing enabled {order} wrapping failed: {_first(e)}"))
                continue
            missing = [k for k, g in got.grads.items() if not bool(g.any())]
            evidence = {"zero_grad_tensors": missing[:8], "zero_grad_count": len(missing),
                        "adapter_tensors": len(got.grads), "loss_requires_grad": got.extra["loss_requires_grad"],
                        "embeddings_output_requires_grad": probe.seen}
            cell = judged(name, got, gc, evidence)
            d = bitwise_diff(got, plain)
            tol, status, reason = judge(plan.policy, dtype, "gc_bitwise_diff", d, None)
            cell.append(Row(SUITE, case(dtype, name, gc), "peft", "peft checkpointing=off", "gc_bitwise_diff", d, tol,
                            status, reason or "loss and every adapter gradient equal the cell without checkpointing"))
            explain_lost_grads(cell, gc, evidence)
            rows += cell
    unmerged = _logits_hf(wrapped, batch, plan.device)
    merged_model = copy.deepcopy(wrapped).merge_and_unload()
    merged = _logits_hf(merged_model, batch, plan.device)
    for name, logits in (("lora-unmerged", unmerged), ("lora-merged", merged)):
        v = _rel_l2(logits, true_logits)
        tol, status, reason = judge(plan.policy, dtype, "logits_rel_l2", v, ref_logits)
        rows.append(Row(SUITE, case(dtype, name), "peft", ORACLE, "logits_rel_l2", v, tol, status,
                        reason or ("merged into the dtype's weights, judged against the truth" if name == "lora-merged"
                                   else "the adapter beside the frozen weights")))
    rows.append(Row(SUITE, case(dtype, "lora-merged"), "peft", "peft unmerged", "logits_rel_l2",
                    _rel_l2(merged, unmerged), None, INFO,
                    "merged against unmerged (what peft's own tests compare): context, not the verdict"))
    return rows
