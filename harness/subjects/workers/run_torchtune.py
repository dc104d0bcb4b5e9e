"""torchtune as a subject: its ``llama2()`` builder loading Meta's checkpoint, as its recipes do.

Runs in its own venv (suites/venvs/torchtune.txt: torchtune pins torchao 0.11, older than what the
harness's other subjects use); imports nothing from the harness. The weights go through
torchtune's own ``convert_weights.meta_to_tune`` (which drops ``rope.freqs``, rebuilt by its RoPE
module) into ``load_state_dict(strict=True)``. The FFN width is read off the model's shape (the
builder would otherwise round 2/3 of 4*dim to 256, which only Meta's released sizes satisfy).

Decode goes through torchtune's KV cache as ``torchtune.generation.generate`` drives it:
its ``local_kv_cache``, a boolean causal mask over the cache and ``input_pos`` for every step.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import worker_protocol  # noqa: E402

import numpy as np  # noqa: E402


class Runner:
    def __init__(self, start: dict):
        import torch
        from torchtune.models.convert_weights import meta_to_tune
        from torchtune.models.llama2 import llama2
        if start.get("threads"):
            torch.set_num_threads(int(start["threads"]))
        m = start["model"]
        self.dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[start["dtype"]]
        self.max_seq_len = max(int(m["max_seq_len"]), int(start.get("max_len", 0)))
        self.model = llama2(vocab_size=m["vocab_size"], num_layers=m["n_layers"], num_heads=m["n_heads"],
                            num_kv_heads=m["n_kv_heads"], embed_dim=m["dim"], max_seq_len=self.max_seq_len,
                            intermediate_dim=m["ffn_hidden"], norm_eps=m["norm_eps"], rope_base=m["rope_theta"])
        state = meta_to_tune(worker_protocol.load_meta_state(start["meta_file"]))
        self.model.load_state_dict(state, strict=True)
        self.model.to(self.dtype).eval()

    def provenance(self) -> dict:
        import torch
        return {
            "implementation": "torchtune.models.llama2.llama2() + convert_weights.meta_to_tune, "
                              "TransformerDecoder.forward(tokens)",
            "versions": worker_protocol.versions("torchtune", "torchao", "torch"),
            "dtype": str(self.dtype).replace("torch.", ""),
            "torch_threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        }

    def forward(self, ids: np.ndarray) -> np.ndarray:
        import torch
        with torch.inference_mode():
            return self.model(torch.from_numpy(ids.astype(np.int64))).float().numpy()

    def decode(self, ids: np.ndarray, prefill: int) -> np.ndarray:
        import torch
        from torchtune.modules import local_kv_cache
        tokens = torch.from_numpy(ids.astype(np.int64))
        batch, seq = tokens.shape
        causal = torch.tril(torch.ones(seq, seq, dtype=torch.bool))
        pos = torch.arange(seq).expand(batch, seq)

        def step(lo: int, hi: int):
            return self.model(tokens[:, lo:hi], mask=causal[None, lo:hi].expand(batch, -1, -1),
                              input_pos=pos[:, lo:hi])
        with torch.inference_mode(), local_kv_cache(self.model, batch_size=batch, device=torch.device("cpu"),
                                                    dtype=self.dtype, decoder_max_seq_len=seq):
            steps = [step(0, prefill)] + [step(t, t + 1) for t in range(prefill, seq)]
        return torch.cat(steps, dim=1).float().numpy()

if __name__ == "__main__":
    sys.exit(worker_protocol.serve(Runner))
