"""Train the embedded default: a small Llama 2 on English prose that ships with CPython.

    python scripts/train_tiny.py --out models/tiny-llama2            # train + write model + task data
    python scripts/train_tiny.py --data-only                          # rebuild suites/lmeval/data only

Corpus. Held-out text comes from CPython's ``pydoc_data/topics.py`` (the language reference's help
topics, PSF licence). Topics contain one another word for word, so paragraphs are deduplicated
(after whitespace normalisation) *before* the split, and only prose is kept (no grammar rules, no
``>>>`` sessions, no indented code). A paragraph is held out when a hash of its text says so (20%),
so the split does not depend on dict order. Training text is the remaining topic paragraphs plus
the standard library's docstrings (prose paragraphs, same filter); any paragraph equal to a
held-out one is dropped from training. Topics alone get memorised in a few minutes.

Model: real Llama 2 tokenizer (32000 pieces), dim 128, 4 layers, 4 query / 2 kv heads (GQA),
trained with the reference model's own modules, so the weights are Meta layout by construction.
Fixed seed and fixed step count (not wall-clock); CPU training is not bit-reproducible across
machines, hence the weights are committed with this script.

The lm-eval task data under suites/lmeval/data is built from the held-out paragraphs only,
deterministically (seeded, sorted), so every task measures text the model never trained on.
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import json
import math
import os
import random
import re
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from reference_model.checkpoint import save_meta  # noqa: E402
from reference_model.model import ModelArgs, Transformer  # noqa: E402

DATA_DIR = ROOT / "suites" / "lmeval" / "data"
PARAMS = dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=32000, multiple_of=64,
              norm_eps=1e-5)
HELDOUT_PERCENT = 20
BOS, EOS = 1, 2


# --- corpus --------------------------------------------------------------------------------------

def _paragraphs(text: str) -> list[str]:
    """Prose paragraphs of a reST-ish text, each reflowed to one line."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = [l for l in block.split("\n") if l.strip()]
        if not lines or len({len(l) - len(l.lstrip()) for l in lines}) > 1:
            continue                                   # ragged indentation: code, grammar, tables
        if any(l.lstrip().startswith((">>>", "...", "*", "=", "-", "+", "|")) for l in lines):
            continue                                   # sessions, headings' underlines, lists, tables
        para = " ".join(l.strip() for l in lines)
        words = para.split()
        if len(words) < 12:
            continue
        letters = sum(c.isalpha() or c.isspace() for c in para)
        if letters / len(para) < 0.85 or not para[0].isupper() or not para.endswith((".", ":")):
            continue                                   # symbol-heavy or fragments
        out.append(para)
    return out


def _dedupe(paras: list[str]) -> list[str]:
    seen, out = set(), []
    for p in paras:
        key = " ".join(p.split()).lower()
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def _is_heldout(para: str) -> bool:
    h = int(hashlib.sha256(para.encode("utf-8")).hexdigest()[:8], 16)
    return h % 100 < HELDOUT_PERCENT


def topics_file() -> Path:
    import pydoc_data.topics as t
    return Path(t.__file__)


def stdlib_docstrings() -> list[str]:
    """Module, class and function docstrings of the standard library (tests and IDLE excluded)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = []
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib).parts
        if rel[0] in ("site-packages", "test", "idlelib", "lib2to3", "pydoc_data", "tkinter") or "tests" in rel:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    texts.append(doc)
    return texts


def corpus() -> dict:
    import pydoc_data.topics as t
    topic_paras = _dedupe([p for key in sorted(t.topics) for p in _paragraphs(t.topics[key])])
    heldout = [p for p in topic_paras if _is_heldout(p)]
    held_keys = {" ".join(p.split()).lower() for p in heldout}
    doc_paras = [p for d in stdlib_docstrings() for p in _paragraphs(d)]
    train = _dedupe([p for p in topic_paras if not _is_heldout(p)] + doc_paras)
    train = [p for p in train if " ".join(p.split()).lower() not in held_keys]
    return {"train": train, "heldout": heldout,
            "topics_sha256": hashlib.sha256(topics_file().read_bytes()).hexdigest(),
            "n_topic_paragraphs": len(topic_paras)}


# --- tokenizer -----------------------------------------------------------------------------------

def tokenizer_path(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    from harness.core.real_tokenizer import ensure_tokenizer_model   # the real Llama 2 tokenizer, built once
    return ensure_tokenizer_model()


def encode_all(sp, paras: list[str]) -> list[list[int]]:
    return [[BOS] + ids + [EOS] for ids in sp.encode(paras)]


# --- model ---------------------------------------------------------------------------------------

def forward_train(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    """The reference forward without inference_mode, so autograd sees it (same modules, same math)."""
    seqlen = tokens.shape[1]
    h = model.tok_embeddings(tokens)
    freqs = model.freqs_cis(seqlen, tokens.device)[:seqlen]
    mask = torch.full((seqlen, seqlen), float("-inf")).triu(1)
    for layer in model.layers:
        h = layer(h, 0, freqs, mask, False)
    return model.output(model.norm(h))


def batches(docs: list[list[int]], seq: int, batch: int, gen: random.Random):
    """Windows of seq+1 tokens starting at a document's BOS, packed across documents after it,
    so the model sees BOS at position 0 as every evaluation does."""
    stream, starts = [], []
    for d in docs:
        starts.append(len(stream))
        stream.extend(d)
    stream += stream[: seq + 1]                        # wrap so every start has a full window
    data = torch.tensor(stream)
    while True:
        idx = [starts[gen.randrange(len(starts))] for _ in range(batch)]
        yield torch.stack([data[i: i + seq + 1] for i in idx])


@torch.no_grad()
def evaluate(model: Transformer, docs: list[list[int]], seq: int) -> dict:
    """Held-out next-token loss and top-1 over every held-out document (chunks of seq+1 tokens)."""
    nll, correct, count = 0.0, 0, 0
    for d in docs:
        for i in range(0, len(d) - 1, seq):
            chunk = torch.tensor(d[i: i + seq + 1])[None]
            if chunk.shape[1] < 2:
                continue
            logits = forward_train(model, chunk[:, :-1]).float()
            target = chunk[:, 1:]
            nll += F.cross_entropy(logits[0], target[0], reduction="sum").item()
            correct += (logits.argmax(-1) == target).sum().item()
            count += target.numel()
    return {"loss": nll / count, "perplexity": math.exp(nll / count), "top1": correct / count,
            "tokens": count}


def train(args, sp, c: dict) -> dict:
    torch.manual_seed(args.seed)
    gen = random.Random(args.seed)
    torch.set_num_threads(args.threads)
    margs = ModelArgs.from_params(PARAMS)
    model = Transformer(margs)
    for name, p in model.named_parameters():           # GPT-2 style init; norms start at 1
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.02)
    train_docs, held_docs = encode_all(sp, c["train"]), encode_all(sp, c["heldout"])
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params {n_params}, train {sum(map(len, train_docs))} tokens in {len(train_docs)} paragraphs, "
          f"held-out {sum(map(len, held_docs))} tokens in {len(held_docs)}", flush=True)
    decay = [p for p in model.parameters() if p.dim() == 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps))))
    it = batches(train_docs, args.seq, args.batch, gen)
    t0 = time.time()
    for step in range(1, args.steps + 1):
        x = next(it)
        logits = forward_train(model, x[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % args.log_every == 0 or step == args.steps:
            print(f"step {step}/{args.steps} loss {loss.item():.3f} {time.time() - t0:.0f}s", flush=True)
    wall = time.time() - t0
    model.eval()
    held = evaluate(model, held_docs, args.seq)
    # Weights are stored in bfloat16 (half the bytes); evaluate what is committed, not the fp32 copy.
    state = {k: v.detach().to(torch.bfloat16) for k, v in model.state_dict().items()}
    model.load_state_dict({k: v.float() for k, v in state.items()})
    held_bf16 = evaluate(model, held_docs, args.seq)
    return {"state": state, "args": margs, "n_params": n_params, "wall_s": wall,
            "heldout_fp32": held, "heldout_bf16_weights": held_bf16,
            "train_tokens": sum(map(len, train_docs)), "heldout_tokens": sum(map(len, held_docs))}


# --- lm-eval task data (held-out text only) ------------------------------------------------------

def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows),
                    encoding="utf-8")


def build_task_data(heldout: list[str], out: Path = DATA_DIR, seed: int = 0) -> dict[str, int]:
    """Three local tasks from held-out paragraphs, one per lm-eval request type.

    mc:   context = a paragraph's first words, 4 choices = its true next 6 words and the 6 words at
          the same word position in 3 other held-out paragraphs (answer position seeded).
    ppl:  each held-out paragraph as a document for rolling perplexity.
    gen:  context = a paragraph's first words, target = the next word (greedy, exact match).
    """
    gen = random.Random(seed)
    mc, ppl, gen_rows = [], [], []
    pool = [p.split() for p in heldout]
    for i, para in enumerate(heldout):
        ppl.append({"id": i, "text": para})
    for i, words in enumerate(pool):
        if len(words) < 16:
            continue
        cut = 8 + (i % max(1, min(len(words) - 14, 12)))     # vary the cut, keep >= 6 words after it
        truth = " ".join(words[cut: cut + 6])
        others = [j for j in range(len(pool)) if j != i and len(pool[j]) >= cut + 6]
        distract = []
        for j in gen.sample(others, k=min(len(others), 12)):
            cand = " ".join(pool[j][cut: cut + 6])
            if cand != truth and cand not in distract:
                distract.append(cand)
            if len(distract) == 3:
                break
        if len(distract) < 3:
            continue
        label = gen.randrange(4)
        choices = distract[:label] + [truth] + distract[label:]
        mc.append({"id": i, "context": " ".join(words[:cut]), "choices": choices, "label": label})
        gen_rows.append({"id": i, "context": " ".join(words[:cut]), "target": words[cut]})
    _write_jsonl(out / "heldout_mc.jsonl", mc)
    _write_jsonl(out / "heldout_ppl.jsonl", ppl)
    _write_jsonl(out / "heldout_gen.jsonl", gen_rows)
    return {"mc": len(mc), "ppl": len(ppl), "gen": len(gen_rows)}


# --- model card ----------------------------------------------------------------------------------

def write_card(out: Path) -> Path:
    """MODEL_CARD.md from training.json (what this script measured) — numbers are never typed in."""
    info = json.loads((out / "training.json").read_text())
    h32, h16 = info["heldout_fp32_weights"], info["heldout_bf16_weights"]
    size = sum(f.stat().st_size for f in out.iterdir() if f.suffix == ".pth")
    card = f"""# tiny-llama2: a small trained Llama 2, the harness's embedded default

Trained by `scripts/train_tiny.py` (this repository). Real Llama 2 architecture and tokenizer, small
enough to commit: its job is to make logits peaked and benchmark scores sit above chance, so that
parity checks run on a model that behaves like a language model, not on random weights.

| | |
|---|---|
| architecture | Llama 2: dim {info['params']['dim']}, {info['params']['n_layers']} layers, {info['params']['n_heads']} query / {info['params']['n_kv_heads']} kv heads (GQA), vocab {info['params']['vocab_size']}, multiple_of {info['params']['multiple_of']}, norm_eps {info['params']['norm_eps']}, RoPE theta 10000 |
| parameters | {info['n_params']:,} |
| tokenizer | the real Llama 2 SentencePiece model (32000 pieces), built by `harness.core.real_tokenizer.ensure_tokenizer_model()` (not committed: built in the set-up step); training used sha256 `{info['tokenizer_sha256'][:16]}...`{(' - ' + info['tokenizer_note']) if info.get('tokenizer_note') else ''} |
| format | Meta (`params.json` + `consolidated.00.pth`), bfloat16 storage, {size / 1e6:.1f} MB; HF format on the fly with `llama-parity convert --model models/tiny-llama2 --to hf --out DIR` |
| training data | CPython {info['python']} `pydoc_data/topics.py` (sha256 `{info['topics_py_sha256'][:16]}...`) prose paragraphs, deduplicated by paragraph, plus prose paragraphs of the standard library's docstrings; {info['train_paragraphs']} paragraphs, {info['train_tokens']:,} tokens (BOS/EOS per paragraph). PSF licence. |
| held-out split | {info['heldout_paragraphs']} topic paragraphs ({info['heldout_tokens']:,} tokens): those whose sha256 mod 100 < 20, chosen *after* deduplication; none of them, nor any equal paragraph, is in training |
| training | {info['steps']} steps (fixed, not wall-clock), batch {info['batch']} x {info['seq']} tokens, windows starting at a paragraph's BOS; AdamW lr {info['lr']} (betas 0.9/0.95, weight decay 0.1 on matrices), 5% warmup, cosine to 10%; grad clip 1.0; seed {info['seed']}; {info['threads']} CPU threads; {info['wall_s'] / 60:.1f} wall minutes on a shared 2-core machine (torch {info['torch']}) |
| held-out perplexity | {h16['perplexity']:.1f} with the committed bfloat16 weights ({h32['perplexity']:.1f} with the float32 weights before rounding) |
| held-out top-1 | {h16['top1'] * 100:.1f}% next-token accuracy ({h32['top1'] * 100:.1f}% before rounding), over {h16['tokens']:,} predicted tokens |
| benchmark | see docs/bench.md (`llama-parity bench`): 4-way held-out continuation choice, rolling perplexity, greedy next word, QuaRTz |

Reproduce (CPU training is not bit-reproducible across machines or thread counts; hence the weights
are committed with the script that made them):

    {info['command']}

Limitation: {info['steps']} steps is short of the ~2300 that DESIGN measured to reach held-out
perplexity ~50. The step count was chosen for the wall time this shared machine gave
({info['wall_s'] / info['steps']:.1f} s per step here, against ~0.7 s on an idle 2-core machine). It is
peaked enough for parity work; `--steps 2300` on an idle machine gives a better one.

The lm-eval task data in `suites/lmeval/data/` is rebuilt from the same held-out paragraphs with
`python scripts/train_tiny.py --data-only`.
"""
    path = out / "MODEL_CARD.md"
    path.write_text(card, encoding="utf-8")
    return path


# --- main ----------------------------------------------------------------------------------------

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "models" / "tiny-llama2"))
    p.add_argument("--tokenizer", help="tokenizer.model (default: harness.core.real_tokenizer.ensure_tokenizer_model())")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--data-only", action="store_true", help="only rebuild suites/lmeval/data")
    p.add_argument("--card-only", action="store_true", help="only rewrite MODEL_CARD.md from training.json")
    a = p.parse_args(argv)
    if a.card_only:
        print(write_card(Path(a.out)))
        return 0

    c = corpus()
    counts = build_task_data(c["heldout"])
    print(f"corpus: {c['n_topic_paragraphs']} unique topic paragraphs, {len(c['heldout'])} held out, "
          f"{len(c['train'])} training paragraphs; task data {counts}", flush=True)
    if a.data_only:
        return 0
    import sentencepiece as spm
    tok = tokenizer_path(a.tokenizer)
    sp = spm.SentencePieceProcessor(model_file=str(tok))
    r = train(a, sp, c)
    out = Path(a.out)
    save_meta(out, r["args"], r["state"])
    info = {
        "params": PARAMS, "n_params": r["n_params"], "steps": a.steps, "batch": a.batch, "seq": a.seq,
        "lr": a.lr, "seed": a.seed, "threads": a.threads, "wall_s": round(r["wall_s"], 1),
        "train_paragraphs": len(c["train"]), "train_tokens": r["train_tokens"],
        "heldout_paragraphs": len(c["heldout"]), "heldout_tokens": r["heldout_tokens"],
        "heldout_fp32_weights": r["heldout_fp32"], "heldout_bf16_weights": r["heldout_bf16_weights"],
        "task_data": counts, "python": sys.version.split()[0], "torch": torch.__version__,
        "topics_py_sha256": c["topics_sha256"],
        "tokenizer_sha256": hashlib.sha256(tok.read_bytes()).hexdigest(),
        "command": "python scripts/train_tiny.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    (out / "training.json").write_text(json.dumps(info, indent=1) + "\n")
    write_card(out)
    print(json.dumps(info, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
