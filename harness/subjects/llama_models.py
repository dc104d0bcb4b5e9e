"""Meta's ``llama-models`` (its Llama 3 reference code) as a subject, run in its own venv.

    --subject llama-models              float32 or bfloat16 (the run's dtype)
    --subject llama-models:threads=2,timeout=600

Llama 3's ``Transformer`` with the checkpoint's RoPE base (10000 for Llama 2) and no RoPE scaling
is Llama 2; the worker builds it as Meta's ``Llama3.build`` does (fairscale model parallelism of 1
in a one-process gloo group) and loads Meta's checkpoint strictly, less ``rope.freqs``. Its
forward always goes through its KV cache, so decode is its native path.
"""
from __future__ import annotations

from harness.subjects import NOT_INSTALLED, register
from harness.subjects.subprocess import meta_file, options, positive, venv_subject

OPTIONS = {"threads": "torch threads in the worker", "timeout": "seconds per call"}

CANNOT = {
    "padding": "Meta's forward takes tokens and start_pos only: no attention mask or explicit positions",
    "hooks": "the model runs in another process: no per-layer captures",
    "planting": "the harness's planted faults edit transformers and the reference, not llama-models",
    "dtype:float64": "its RoPE casts queries and keys to float32 (xq.float()), so a float64 run is not float64",
}


@register("llama-models")
def llama_models_subject(source, dtype: str, device: str, opts: dict):
    opts = options("llama-models", opts, OPTIONS)
    start = {"threads": positive("llama-models", "threads", opts.get("threads"), None, whole=True)}
    subject = venv_subject("llama-models", source, dtype, device, opts, dtypes=("float32", "bfloat16"),
                           cannots=CANNOT, start=start)
    if NOT_INSTALLED not in subject.cannots:
        subject.start["meta_file"] = str(meta_file(source))
    return subject
