"""Padding and batching invariance: each sequence alone vs inside a padded batch.

Rows of different lengths are padded on the left or the right, to the longest row ("few") or
48 positions further ("many"), with explicit position ids (counted over real tokens, as
``generate`` does) or none (the release's default: 0..n-1 over the padded row, which under left
padding shifts every real token; RoPE is relative, so only rounding can tell). Only real tokens
are compared, each with the same subject's logits for the row alone at the same dtype and
attention implementation. The tolerance is calibrated on rounding, not on the reference's own
padding error (which is often exactly zero, a property of its kernels rather than of the dtype):
the reference's error against the float64 oracle on the rows alone, at the same dtype, says how
far rounding at that dtype moves these logits; batching may move them at most a stated factor
more. The reference's padded cells are judged by the same rule.

A pad token added as the docs advise (a new ``<pad>`` id, embeddings resized, ``padding_idx``
set so that its row embeds to zeros) must leave the logits of real tokens unchanged: those
cells compare the resized model's padded batch with the original model's rows alone.
"""
from __future__ import annotations

import torch
from torch import nn

from harness.core.errors import InputError
from harness.core.metrics import compare
from harness.core.store import FAIL, NA, Row
from harness.core.subjects import padded_positions
from harness.suites.behaviour.common import BehaviourRun, NotBuilt, attn_reason, failed, judge, reference
from harness.subjects import IMPLICIT

SUITE = "padding"
GATED = ("max_abs", "kl_max", "top1_disagree")


def rows_of_tokens(vocab: int, seed: int, lengths: list[int]) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed * 7919 + 11)
    rows = []
    for n in lengths:
        ids = torch.randint(3, vocab, (n,), generator=gen)
        ids[0] = 1                               # BOS
        rows.append(ids)
    return rows


def pad_batch(rows: list[torch.Tensor], side: str, extra: int, pad_id: int):
    """(ids, mask, positions): positions count real tokens only (pads get 0, never compared)."""
    width = max(len(x) for x in rows) + extra
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, x in enumerate(rows):
        sl = slice(width - len(x), width) if side == "left" else slice(0, len(x))
        ids[i, sl], mask[i, sl] = x, 1
    positions = padded_positions(mask)
    return ids, mask, positions


def _gather_real(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return logits.detach().cpu()[mask.bool()]          # (n_real, vocab), row by row in order


def _reference_logits(model, ids, mask, positions, explicit: bool):
    return model(ids, key_mask=mask, positions=positions if explicit else None)


def _subject_logits(subject, ids, mask, positions, explicit: bool):
    """A padded batch through a subject: positions over real tokens, or (implicit) what the
    implementation does with a mask alone; a subject without that default gets 0..n-1 over the row."""
    if not explicit:
        positions = IMPLICIT if getattr(subject, "implicit_positions", False) else \
            torch.arange(ids.shape[1]).expand(ids.shape[0], -1)
    return subject.forward(ids, mask=mask, positions=positions)


def add_pad_token_reference(model) -> int:
    """The same recipe on the reference: one more embedding row (zeros) and output row."""
    vocab, dim = model.tok_embeddings.weight.shape
    w = model.tok_embeddings.weight
    emb = nn.Embedding(vocab + 1, dim, padding_idx=vocab).to(w.device, w.dtype)
    out = nn.Linear(dim, vocab + 1, bias=False).to(w.device, w.dtype)
    with torch.no_grad():
        emb.weight[:vocab] = w
        emb.weight[vocab].zero_()
        out.weight[:vocab] = model.output.weight
        out.weight[vocab] = model.output.weight.mean(0)
    model.tok_embeddings, model.output = emb, out
    return vocab


def _cells(extra: dict):
    for side in ("left", "right"):
        for pads in extra:
            for positions in ("explicit", "implicit"):
                yield {"side": side, "pads": pads, "positions": positions, "pad_token": "unk+mask"}
        yield {"side": side, "pads": "few", "positions": "explicit", "pad_token": "added"}


def _errors(run_batch, alone: list[torch.Tensor], rows, cell, pad_id, vocab, extra: dict):
    ids, mask, positions = pad_batch(rows, cell["side"], extra[cell["pads"]], pad_id)
    got = _gather_real(run_batch(ids, mask, positions, cell["positions"] == "explicit"), mask)[:, :vocab]
    want = torch.cat(alone)
    vals, nonfinite = compare(got, want)
    return vals, nonfinite


def run(r: BehaviourRun) -> list[Row]:
    ckpt, cfg = r.ckpt, r.cases[SUITE]
    extra, pad_id = cfg["extra"], cfg["pad_id"]
    vocab = ckpt.args.vocab_size
    toks = rows_of_tokens(vocab, r.seed, cfg["lengths"])
    out: list[Row] = []
    oracle = reference(ckpt, "float64", r.device)
    truth = [oracle(x[None].to(r.device))[0].cpu() for x in toks]
    del oracle
    for dtype in r.dtypes:
        base = {"dtype": dtype, "device": r.device}
        # --- the reference: alone, then every padded cell; its errors calibrate the policy
        model = reference(ckpt, dtype, r.device)
        alone = [model(x[None].to(r.device))[0].cpu() for x in toks]
        rounding, _ = compare(torch.cat(alone), torch.cat(truth))
        ref_vals = {}
        for cell in _cells(extra):
            if cell["pad_token"] == "added":
                continue
            batch = lambda i, m, p, e: _reference_logits(model, i.to(r.device), m.to(r.device), p.to(r.device), e)
            ref_vals[tuple(cell.values())], _ = _errors(batch, alone, toks, cell, pad_id, vocab, extra)
        padded = reference(ckpt, dtype, r.device)
        new_pad = add_pad_token_reference(padded)
        for cell in _cells(extra):
            if cell["pad_token"] != "added":
                continue
            batch = lambda i, m, p, e: _reference_logits(padded, i.to(r.device), m.to(r.device), p.to(r.device), e)
            ref_vals[tuple(cell.values())], _ = _errors(batch, alone, toks, cell, new_pad, vocab, extra)
        for key, vals in ref_vals.items():
            case = {**base, "attn": "-", **dict(zip(("side", "pads", "positions", "pad_token"), key))}
            out += [judge(r.policy, SUITE, case, "reference", "reference-alone", f"pad_{m}", vals[m], rounding[m])
                    for m in GATED]
        pad_row = padded.tok_embeddings(torch.tensor([new_pad], device=r.device)).abs().max().item()
        out.append(judge(r.policy, SUITE, {**base, "attn": "-", "pad_token": "added"}, "reference", "zero",
                         "pad_row_abs", pad_row, None))
        del model, padded

        # --- each subject (transformers by default), per attention implementation it takes
        for spec in r.subjects:
            out += _subject_rows(r, spec, base, toks, extra, pad_id, vocab, rounding)
    return out


def _subject_rows(r: BehaviourRun, spec, base: dict, toks, extra: dict, pad_id: int, vocab: int,
                  rounding: dict) -> list[Row]:
    """One subject's padded cells, each against the same subject's rows alone. A subject without
    a padding mask is n/a with its reason; one that cannot take a new token, its added-pad cells."""
    label, dtype, out = spec.label(), base["dtype"], []
    against = f"{label}-alone"
    for attn in r.axis(spec, "attn", r.attns):
        why = attn_reason(attn, r.device) if attn != "-" else ""
        if why:
            out.append(Row(SUITE, {**base, "attn": attn}, label, against, "all", None, status=NA, reason=why))
            continue
        subject = resized = None
        try:
            subject = r.subject(spec, dtype, attn=attn)
            cannot = subject.cannot()
            if "padding" in cannot:
                raise NotBuilt(f"{subject.name} cannot take a padding mask: {cannot['padding']}")
            alone = [subject.forward(x[None].to(r.device))[0].float().cpu() for x in toks]
            if "resize" not in cannot and hasattr(subject, "add_pad_token"):
                resized = r.subject(spec, dtype, attn=attn)
                new_pad, pad_row = resized.add_pad_token()
            else:
                new_pad, pad_row = None, cannot.get("resize", f"{subject.name} offers no way to add a token")
        except NotBuilt as e:
            out.append(Row(SUITE, {**base, "attn": attn}, label, against, "all", None, status=NA, reason=str(e)))
            continue
        except InputError:
            raise
        except Exception as e:
            out.append(failed(SUITE, {**base, "attn": attn}, label, against, e, "loading"))
            continue
        for cell in _cells(extra):
            case = {**base, "attn": attn, **cell}
            if cell["pad_token"] == "added" and new_pad is None:
                out.append(Row(SUITE, case, label, against, "all", None, status=NA, reason=pad_row))
                continue
            m, pid = (resized, new_pad) if cell["pad_token"] == "added" else (subject, pad_id)
            batch = lambda i, k, p, e: _subject_logits(m, i, k, p, e)
            try:
                vals, nonfinite = _errors(batch, alone, toks, cell, pid, vocab, extra)
            except Exception as e:
                out.append(failed(SUITE, case, label, against, e, "padded forward"))
                continue
            for metric in GATED:
                row = judge(r.policy, SUITE, case, label, against, f"pad_{metric}", vals[metric], rounding[metric])
                if nonfinite:
                    row.status, row.reason = FAIL, nonfinite
                out.append(row)
        if new_pad is not None:
            out.append(judge(r.policy, SUITE, {**base, "attn": attn, "pad_token": "added"}, label, "zero",
                             "pad_row_abs", pad_row.abs().max().item(), None))
        for s in (subject, resized):
            if s is not None:
                s.close()
    return out
