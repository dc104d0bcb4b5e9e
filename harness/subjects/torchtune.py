"""torchtune's ``llama2()`` builder as a subject, run in its own venv (harness/subjects/subprocess.py).

    --subject torchtune                 float32 or bfloat16 (the run's dtype)
    --subject torchtune:threads=2,timeout=600

The worker builds ``torchtune.models.llama2.llama2`` with the checkpoint's shape, converts Meta's
state dict with torchtune's ``meta_to_tune`` and loads it strictly; forward and decode (through
torchtune's own KV cache) return its float32 logits.
"""
from __future__ import annotations

from harness.subjects import NOT_INSTALLED, register
from harness.subjects.subprocess import meta_file, options, positive, venv_subject

OPTIONS = {"threads": "torch threads in the worker", "timeout": "seconds per call"}

CANNOT = {
    "padding": "not wired: torchtune takes a mask and input_pos, but the worker exchanges token ids only",
    "hooks": "the model runs in another process: no per-layer captures",
    "planting": "the harness's planted faults edit transformers and the reference, not torchtune",
    "dtype:float64": "not offered: torchtune's RoPE cache and attention run in float32 at best",
}


@register("torchtune")
def torchtune_subject(source, dtype: str, device: str, opts: dict):
    opts = options("torchtune", opts, OPTIONS)
    start = {"threads": positive("torchtune", "threads", opts.get("threads"), None, whole=True)}
    subject = venv_subject("torchtune", source, dtype, device, opts, dtypes=("float32", "bfloat16"),
                           cannots=CANNOT, start=start)
    if NOT_INSTALLED not in subject.cannots:
        subject.start["meta_file"] = str(meta_file(source))
    return subject
