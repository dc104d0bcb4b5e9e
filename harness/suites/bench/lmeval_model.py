"""lm-eval models for the parity bench: any subject (harness.subjects) behind one adapter.

``llama-parity`` (alias ``llama-parity-reference``) is registered with lm-eval's model registry on
import. It scores with the independent reference by default; ``backend=KIND[:key=value]`` puts a
registered subject behind the *same* adapter (``backend=transformers:attn=sdpa``: transformers'
LlamaForCausalLM; lm-eval splits model_args on commas, so one option per spec there), so that
comparing it with lm-eval's own ``hf`` wrapper on the same weights isolates what the wrapper does
(BOS, splits, padding, batching). The bench hands the adapter subjects it built itself.

    python -m harness.suites.bench.lmeval_model run --model llama-parity \\
        --model_args model=models/tiny-llama2,dtype=float32 --batch_size 8 --device cpu \\
        --tasks parity_heldout_mc --include_path reports/latest/bench/tasks   # lm-eval's own CLI

Conventions, each one a setting that the bench compares between subjects:
- BOS: every context starts with BOS (``add_bos_token=True``, Llama 2's training convention); an
  empty context is BOS alone; a rolling document is BOS + text, scoring the text only.
- context/continuation split: lm-eval's TemplateLM rule (tokenise context+continuation, split at
  len(tokenise(context)), trailing spaces moved to the continuation).
- batching: requests sorted by length (longest first), right-padded; right padding cannot change a
  causal model's earlier positions, so no attention mask is needed.
- generation: greedy, the subject's own kv cache (harness.subjects.steps: the whole sequence again
  per token where it has none), batched by equal context length (so no padding at all). The text
  is decoded as lm-eval's HFLM decodes it (``tokenizer.decode(ids, skip_special_tokens=True)``,
  lm_eval/models/huggingface.py ``HFLM.tok_decode``): special ids are dropped, where sentencepiece
  alone writes " ⁇ " for a generated <unk> (measured: a random-weight preset generating id 0 gave
  'cpp wennuint' in hf, 'cpp wenn ⁇ uint' here, the same ids: a false generation mismatch).
- log-softmax in ``softmax_dtype`` (float32 by default) over the model's float32 logits (or the
  full-vocabulary log-probabilities of a subject without logits: log-softmax leaves them as they are).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from harness.core.errors import InputError
from harness.core.subjects import DTYPES

BOS_ID, EOS_ID = 1, 2


def _dtype(name: str, arg: str) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise InputError(f"{arg}: unknown dtype {name!r} (known: {', '.join(DTYPES)})")
    return DTYPES[name]


def _bool(v) -> bool:
    return v if isinstance(v, bool) else str(v).lower() in ("1", "true", "yes")


def resolve_tokenizer(model: Path, tokenizer: str | None) -> Path:
    """tokenizer.model: the argument, else beside the weights, else the harness's built fixture."""
    if tokenizer:
        path = Path(tokenizer)
        if not path.is_file():
            raise InputError(f"tokenizer: {path}: file not found")
        return path
    if (model / "tokenizer.model").is_file():
        return model / "tokenizer.model"
    from harness.core.real_tokenizer import ensure_tokenizer_model
    return ensure_tokenizer_model()


# --- subjects: token ids -> logits, through harness.subjects ---------------------------------------

def build_subject(model: Path, backend: str, dtype: str, device: str, tokenizer: Path, hf_model: str | None):
    """The subject behind the adapter: the reference, or any registered kind (``backend`` is a
    --subject spec, e.g. transformers:attn=sdpa) built from the same weights as the logits suite
    builds it. ``hf_model``: the HF folder transformers kinds load (the bench's converted one)."""
    from harness.core.checkpoints import open_model
    from harness.core.subjects import ReferenceSubject
    from harness.subjects import factory, parse_spec
    from harness.subjects.common import source_of
    folder = open_model(str(model))
    if backend == "reference":
        return ReferenceSubject(folder.load(), dtype, device)
    spec = parse_spec(backend, "backend")
    hf = (lambda: Path(hf_model)) if hf_model else None
    source = source_of(folder, hf_path=hf, tokenizer=tokenizer)
    return factory(spec, "backend")(source, dtype, device, dict(spec.options))


# --- the adapter ---------------------------------------------------------------------------------

@register_model("llama-parity", "llama-parity-reference")
class ParityLM(TemplateLM):
    """lm-eval LM over the reference (or transformers) with the conventions in the module doc."""

    def __init__(self, model: str | None = None, backend: str = "reference", tokenizer: str | None = None,
                 dtype: str = "float32", softmax_dtype: str = "float32", batch_size: int | str = 1,
                 max_length: int | str = 2048, add_bos_token: bool | str = True, device: str = "cpu",
                 max_gen_toks: int | str = 256, hf_model: str | None = None, subject=None, **_ignored):
        super().__init__()
        import sentencepiece as spm
        if model is None:
            from harness.core.presets import default_model
            model = default_model()
        self.model_path = Path(model)
        if not self.model_path.exists():
            raise InputError(f"model: {self.model_path}: no such file or folder")
        if str(batch_size).startswith("auto"):
            raise InputError("batch_size: 'auto' is not supported; give an integer (it is compared between subjects)")
        self.batch_size_per_gpu = int(batch_size)
        if self.batch_size_per_gpu < 1:
            raise InputError(f"batch_size: must be >= 1, got {batch_size}")
        self.dtype_name = str(dtype)
        self.dtype = _dtype(dtype, "dtype")
        self.softmax_dtype_name = str(softmax_dtype)
        self.softmax_dtype = _dtype(softmax_dtype, "softmax_dtype")
        self._max_length, self._max_gen_toks = int(max_length), int(max_gen_toks)
        self.add_bos_token = _bool(add_bos_token)
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's CLI passes device=cuda by default; its own HF wrapper falls back the same way.
            print(f"llama-parity: device {device!r} unavailable, using cpu", file=sys.stderr)
            device = "cpu"
        self._device = device
        self.backend_name = backend
        self.tokenizer_path = resolve_tokenizer(self.model_path, tokenizer)
        self.sp = spm.SentencePieceProcessor(model_file=str(self.tokenizer_path))
        # The subject: handed over built (the bench), else built here from backend's spec.
        self.net = subject if subject is not None else build_subject(
            self.model_path, str(backend), self.dtype_name, device, self.tokenizer_path, hf_model)
        self.generation = None          # how generation drove the subject (harness.subjects.steps)

    # -- what the bench compares between subjects
    def settings(self) -> dict:
        return {"bos": self.add_bos_token, "batch_size": self.batch_size_per_gpu, "padding_side": "right",
                "max_length": self._max_length, "dtype": self.dtype_name,
                "softmax_dtype": self.softmax_dtype_name}

    # -- lm-eval's protocol
    @property
    def eot_token_id(self) -> int:
        return EOS_ID

    @property
    def prefix_token_id(self) -> int:
        return BOS_ID

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self):
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer_path)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        add_bos = self.add_bos_token if add_special_tokens is None else add_special_tokens
        return ([BOS_ID] if add_bos else []) + self.sp.encode(string)

    def tok_decode(self, tokens: list[int]) -> str:
        # HFLM's skip_special_tokens=True: <unk>, <s>, </s> leave no text (see the module docstring).
        return self.sp.decode([t for t in tokens if not (self.sp.is_unknown(t) or self.sp.is_control(t))])

    def _score_batch(self, batch: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(context, continuation) token lists -> (sum log p(continuation), all greedy), one forward."""
        inputs = [(ctx + cont)[-(self._max_length + 1):][:-1] for ctx, cont in batch]
        width = max(len(i) for i in inputs)
        ids = torch.zeros(len(inputs), width, dtype=torch.long)
        for row, inp in enumerate(inputs):
            ids[row, : len(inp)] = torch.tensor(inp)
        logprobs = F.log_softmax(self.net.forward(ids).float(), dim=-1, dtype=self.softmax_dtype)
        out = []
        for row, (inp, (_ctx, cont)) in enumerate(zip(inputs, batch)):
            n = len(cont)
            lp = logprobs[row, len(inp) - n: len(inp)]
            target = torch.tensor(cont, device=lp.device)
            ll = lp.gather(-1, target[:, None]).sum().item()
            out.append((float(ll), bool((lp.argmax(-1) == target).all())))
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        for _, ctx, cont in requests:
            if not ctx or not cont:
                raise InputError("loglikelihood: a request has an empty context or continuation after tokenising")
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1] + requests[i][2]))
        results: list = [None] * len(requests)
        bs = self.batch_size_per_gpu
        for start in range(0, len(order), bs):
            idx = order[start: start + bs]
            scored = self._score_batch([(requests[i][1], requests[i][2]) for i in idx])
            for i, r in zip(idx, scored):
                results[i] = r
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], r)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for n, req in enumerate(requests):
            (text,) = req.args
            tokens = self.tok_encode(text, add_special_tokens=False)
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=tokens, prefix_token=BOS_ID, max_seq_len=self._max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(n)
        scores = self._loglikelihood_tokens(windows)
        totals = [0.0] * len(requests)
        for n, (ll, _greedy) in zip(owner, scores):
            totals[n] += ll
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        results: list = [None] * len(requests)
        prepared = []
        for n, req in enumerate(requests):
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            if kwargs.get("do_sample") or float(kwargs.get("temperature", 0.0) or 0.0) > 0:
                raise InputError("generate_until: only greedy decoding is compared (do_sample false, temperature 0)")
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", self._max_gen_toks))
            ids = self.tok_encode(context)[-(self._max_length - max_new):]
            prepared.append((n, ids, until, max_new))
        # Equal context lengths batch without padding; longest first like the scoring path.
        groups: dict[tuple, list] = {}
        for item in prepared:
            groups.setdefault((len(item[1]), tuple(item[2]), item[3]), []).append(item)
        for key in sorted(groups, key=lambda k: -k[0]):
            items = groups[key]
            for start in range(0, len(items), self.batch_size_per_gpu):
                chunk = items[start: start + self.batch_size_per_gpu]
                for (n, _, _, _), text in zip(chunk, self._greedy(chunk)):
                    results[n] = text
                    self.cache_hook.add_partial("generate_until", requests[n].args, text)
        return results

    def _greedy(self, chunk) -> list[str]:
        _, _, until, max_new = chunk[0]
        from harness.subjects import steps
        ids = torch.tensor([c[1] for c in chunk])
        step, self.generation = steps(self.net, ids.shape[0], ids.shape[1] + max_new)
        logits = step(ids)[:, -1].float()
        generated = [[] for _ in chunk]
        done = [False] * len(chunk)
        for _ in range(max_new):
            nxt = logits.argmax(-1)
            for row, tok in enumerate(nxt.tolist()):
                if done[row]:
                    continue
                if tok == EOS_ID:
                    done[row] = True
                    continue
                generated[row].append(tok)
                if any(u and u in self.tok_decode(generated[row]) for u in until):
                    done[row] = True
            if all(done):
                break
            logits = step(nxt[:, None])[:, -1].float()
        texts = []
        for toks in generated:
            text = self.tok_decode(toks)
            for u in until:
                if u:
                    text = text.split(u)[0]
            texts.append(text)
        return texts


def lm_eval_main(argv: list[str] | None = None) -> None:
    """lm-eval's own command line with the models above registered (lm-eval has no plugin hook)."""
    from lm_eval.__main__ import cli_evaluate
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    lm_eval_main()
