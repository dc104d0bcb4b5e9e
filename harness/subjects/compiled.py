"""``torch.compile`` of a transformers model's forward, as transformers' own docs deploy it
(``model.forward = torch.compile(model.forward)``), with what compiling cost recorded.

On CPU the backend is inductor (C++ code generated and built with the system compiler) in its
default mode: ``reduce-overhead`` means CUDA graphs and does nothing on a CPU. ``aot_eager`` traces
and partitions the graph like inductor but runs torch's own kernels, so a difference between the
two backends is inductor's code generation, not the tracing. Each new input shape compiles again
(dynamo marks a dimension dynamic once it has seen two sizes); the first call of each shape is
recorded as the compile cost, the later calls as the steady state.
"""
from __future__ import annotations

import functools
import statistics
import time

import torch

BACKENDS = ("inductor", "aot_eager", "eager")


class CompiledForward:
    """model.forward replaced by its compiled graph; calls timed by input shape."""

    def __init__(self, model, backend: str):
        self.backend = backend
        self.first: dict[str, float] = {}       # "shape" -> seconds of its first call (compiling)
        self.steady: list[float] = []
        self.eager_forward = model.forward
        compiled = torch.compile(model.forward, backend=backend)

        # wraps: the eager forward's signature stays visible, which is how the harness asks a model
        # what its cache argument is called and whether it takes cache_position (core/compat.py)
        @functools.wraps(self.eager_forward)
        def forward(*args, **kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            key = "x".join(map(str, ids.shape)) if ids is not None else "?"
            started = time.perf_counter()
            out = compiled(*args, **kwargs)
            took = time.perf_counter() - started
            if key in self.first:
                self.steady.append(took)
            else:
                self.first[key] = round(took, 3)
            return out

        model.forward = forward

    def provenance(self) -> dict:
        return {"backend": self.backend, "mode": "default", "torch": torch.__version__,
                "first_call_seconds": dict(self.first),   # per input shape: compiling + one call
                "steady_call_seconds": round(statistics.median(self.steady), 4) if self.steady else None}
