"""Gradient accumulation as users run it: transformers' own ``Trainer`` on the CPU, one optimizer step
over micro-batches of uneven token counts, the gradients captured before the optimizer steps, against
the oracle's full-batch per-token-mean gradients (the right-padded batch's rows, each its own
micro-batch: nothing is padded). And, where the release has it, the model's ``num_items_in_batch``
contract: the micro-batches' losses, each a sum over its tokens divided by the whole batch's count,
add up to the full batch's mean loss and gradients.

float32 only: what is measured is how the loss is normalised across micro-batches, not rounding, so
these rows have no calibrator and are held to the policy's abs. A release whose Trainer predates the
fix (<= 4.45) is reported as the known upstream bug it is (transformers #34191), not gated.
"""
from __future__ import annotations

import inspect
import tempfile

import torch

from harness.core import compat
from harness.core.store import FAIL, INFO, NA, Row
from harness.core.subjects import ORACLE
from harness.subjects import Cannot
from harness.suites.train import SUITE
from harness.suites.train import grads as G
from harness.suites.train.metrics import compare

KNOWN_ACCUM = {"name": "grad-accum-per-micro-batch-mean",
               "mechanism": "Trainer averages each micro-batch's mean loss instead of the per-token mean over the "
                            "accumulated batch (fixed in 4.46.0)",
               "source": "https://github.com/huggingface/transformers/issues/34191", "releases": "<4.46"}
# 4.46 fixed the averaging, but its num_items_in_batch counted every label, position 0 included, which
# the causal shift never predicts: the denominator is too large by one per row and every gradient is
# scaled by targets / labels (0.046 on the 3 rows here). Fixed by #46204 (merged 2026-05-26): 5.24.0
# has it; the first release with it lies between 4.48.3 and 5.24.0 and is not pinned here.
KNOWN_COUNT = {"name": "num-items-counts-position-0",
               "mechanism": "Trainer's num_items_in_batch counts position 0 of every row, which the shifted loss "
                            "never predicts: every gradient is scaled by targets / labels",
               "source": "https://github.com/huggingface/transformers/pull/46204", "releases": ">=4.46,<5.24"}

KNOWN_NAMES = (KNOWN_ACCUM["name"], KNOWN_COUNT["name"])


def quiet(trainer) -> None:
    """Trainer prints its final metrics dict (train_runtime, ...) to stdout through its printer or
    progress callback: in the middle of the suite's console output and a CI log. Its values are
    recorded in the rows; the callbacks go."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    for callback in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(callback)


class Capture(torch.optim.Optimizer):
    """An optimizer whose step records every gradient and changes nothing (lr 0): what Trainer has
    accumulated at the moment the real optimizer would step."""

    def __init__(self, params):
        super().__init__(list(params), {"lr": 0.0})
        self.seen: list[dict[int, torch.Tensor]] = []

    def step(self, closure=None):
        self.seen.append({id(p): p.grad.detach().clone() for g in self.param_groups for p in g["params"]
                          if p.grad is not None})


class Rows(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def _collate(items):
    # one row per micro-batch: nothing to pad
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def accumulation_rows(measure) -> list[Row]:
    plan = measure.plan
    batch = next((b for b in plan.batches if b.kind == "right"), None)
    case = {"dtype": "float32", "cast": "load", "attn": "eager", "tp": 1, "checkpointing": "off",
            "input": "accum", "shape": batch.shape if batch else "-", "device": plan.device}
    if batch is None:
        return [_row(case, "trainer", "all", None, NA, "needs the 'right' input (its rows are the micro-batches)")]
    truth = measure.truth(batch)
    rows = [*trainer_rows(measure, batch, truth, case), *contract_rows(measure, batch, truth, case)]
    return rows


def trainer_rows(measure, batch, truth, case) -> list[Row]:
    plan = measure.plan
    try:
        from transformers import Trainer, TrainingArguments
    except Exception as e:   # noqa: BLE001 - Trainer needs accelerate; its absence is a reason, not a crash
        return [_row(case, "trainer", "all", None, NA, f"transformers' Trainer cannot be imported: {e}")]
    micro = plan.data["accum"]["micro_batch"]
    samples = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
               for ids, labels in batch.rows()]
    steps = len(samples) // micro
    try:
        model = measure.module("float32")
    except Cannot as e:
        return [_row(case, "trainer", "all", None, NA, str(e))]
    model.train()
    opt = Capture(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    fields = inspect.signature(TrainingArguments.__init__).parameters
    with tempfile.TemporaryDirectory(prefix="llama-parity-trainer-") as tmp:
        kw = dict(output_dir=tmp, per_device_train_batch_size=micro, gradient_accumulation_steps=steps, max_steps=1,
                  max_grad_norm=0.0, report_to=[], save_strategy="no", logging_strategy="no", seed=plan.seed,
                  disable_tqdm=True, dataloader_num_workers=0, remove_unused_columns=False)
        kw["use_cpu" if "use_cpu" in fields else "no_cuda"] = plan.device == "cpu"
        args = TrainingArguments(**kw)
        trainer = Trainer(model=model, args=args, train_dataset=Rows(samples), data_collator=_collate,
                          optimizers=(opt, sched))
        quiet(trainer)
        out = trainer.train()
    if len(opt.seen) != 1:
        return [_row(case, "trainer", "all", None, FAIL, f"Trainer stepped the optimizer {len(opt.seen)} times, not once")]
    by_id = opt.seen[0]
    params = dict(model.named_parameters())
    captured = {n: p for n, p in params.items()}
    for n, p in captured.items():
        p.grad = by_id.get(id(p))
    grads = G.hf_grads(model)
    c = compare(grads, truth.grads, truth.loss, truth.loss)
    v = c["values"]["grad_rel_l2"]
    tol, status, reason = measure_judge(measure, "accum_rel_l2", v)
    known = None
    if status == FAIL and compat.transformers_version() < (4, 46) and plan.fault is None:
        known = KNOWN_ACCUM
        status, reason = INFO, f"{reason}: the known per-micro-batch averaging of this release ({known['source']})"
    elif status == FAIL and compat.transformers_version() < (5, 24) and plan.fault is None:
        # known only when the mechanism reproduces the gradients: the oracle's, scaled by targets / labels
        labels = [lab for _, lab in batch.rows()]
        scale = sum(int((lab[1:] != -100).sum()) for lab in labels) / sum(int((lab != -100).sum()) for lab in labels)
        scaled = {n: g * scale for n, g in truth.grads.items()}
        explained = compare(grads, scaled, truth.loss, truth.loss)["values"]["grad_rel_l2"]
        if measure_judge(measure, "accum_rel_l2", explained)[1] != FAIL:
            known = KNOWN_COUNT
            status, reason = INFO, (f"{reason}: the known over-count of num_items_in_batch ({known['source']}); the "
                                    f"oracle's gradients scaled by {scale:.4g} match to {explained:.2g}")
    if known and known["name"] in plan.strict:
        status, reason = FAIL, f"{reason} (known deviation {known['name']}, gated by --strict)"
    case = {**case, "micro_batches": steps}
    extra = {"micro_batch_tokens": [int((lab[1:] != -100).sum()) for _, lab in batch.rows()], "worst_tensor": c["worst"], "by_kind": c["by_kind"], "by_layer": c["by_layer"],
             "trainer_train_loss": float(out.training_loss), "oracle_loss": truth.loss}
    if known:
        extra["known"] = known
    return [_row(case, "trainer", "accum_rel_l2", v, status, reason or
                 f"Trainer, {steps} micro-batches of uneven token counts, gradients before the optimizer step",
                 tol, extra),
            _row(case, "trainer", "train_loss", float(out.training_loss), INFO,
                 f"Trainer's reported training loss (the oracle's full-batch mean is {truth.loss:.6g}); shown, not "
                 "gated: how releases log it differs", None)]


def contract_rows(measure, batch, truth, case) -> list[Row]:
    """model(**micro, num_items_in_batch=N) summed over micro-batches equals the full batch's mean."""
    plan = measure.plan
    case = {**case, "input": "num_items_in_batch"}
    try:
        model = measure.module("float32")
    except Cannot as e:
        return [_row(case, measure.label, "all", None, NA, str(e))]
    params = inspect.signature(model.forward).parameters
    if "num_items_in_batch" not in params and not any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return [_row(case, measure.label, "all", None, NA,
                     f"transformers {compat.transformers_release()}: the model's forward takes no num_items_in_batch")]
    if compat.transformers_version() < (4, 46):
        return [_row(case, measure.label, "all", None, NA,
                     f"transformers {compat.transformers_release()}: num_items_in_batch arrives in 4.46")]
    model.train()
    model.zero_grad(set_to_none=True)
    n = batch.tokens()
    total = 0.0
    for ids, labels in batch.rows():
        loss = model(input_ids=ids[None], labels=labels[None], num_items_in_batch=n, use_cache=False).loss
        loss.backward()
        total += float(loss.detach())
    c = compare(G.hf_grads(model), truth.grads, total, truth.loss)
    rows = []
    for metric, value in (("accum_rel_l2", c["values"]["grad_rel_l2"]), ("accum_loss_rel_err", c["values"]["loss_rel_err"])):
        tol, status, reason = measure_judge(measure, metric, value)
        rows.append(_row(case, measure.label, metric, value, status, reason or
                         "micro-batch losses with num_items_in_batch = the whole batch's labelled tokens, summed",
                         tol, {"worst_tensor": c["worst"]} if metric == "accum_rel_l2" else {}))
    return rows


def measure_judge(measure, metric: str, value: float):
    from harness.suites.train.measure import judge
    return judge(measure.plan.policy, "float32", metric, value, None)


def _row(case, subject, metric, value, status, reason, tol=None, extra=None) -> Row:
    return Row(SUITE, dict(case), subject, ORACLE, metric, value, tol, status, reason, extra or {})
