"""Meta's ``llama-models`` as a subject: its Llama 3 reference ``Transformer`` loading a Llama 2 checkpoint.

Runs in its own venv (suites/venvs/llama-models.txt: llama-models, fairscale, torch, no torchvision
and no fbgemm, which its ``[torch]`` extra would pull for quantised Llama 4); imports nothing from
the harness. Llama 3's architecture is Llama 2's plus GQA and a RoPE base of 500000: with
``rope_theta=10000`` and ``use_scaled_rope=False`` it is Llama 2 exactly, so Meta's own newest code
is a second independent implementation of the same maths.

As Meta's ``Llama3.build`` does: a one-process gloo group and fairscale model parallelism of 1,
the default dtype set to the run's dtype before the model is built (so its weights and KV cache
are in that dtype; RoPE stays complex64), ``load_state_dict(strict=True)``. Meta's Llama 2 files
carry ``rope.freqs``, which Llama 3's code has no buffer for: it is dropped, and the provenance says
so. Its forward always writes its KV cache (``start_pos``), so a decode is its native use.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import worker_protocol  # noqa: E402

import numpy as np  # noqa: E402


class Runner:
    def __init__(self, start: dict):
        import torch
        import torch.distributed as dist
        from fairscale.nn.model_parallel.initialize import initialize_model_parallel
        from llama_models.llama3.args import ModelArgs
        from llama_models.llama3.model import Transformer
        if start.get("threads"):
            torch.set_num_threads(int(start["threads"]))
        self._pg = tempfile.TemporaryDirectory(prefix="llama-models-pg-")
        dist.init_process_group("gloo", init_method=f"file://{self._pg.name}/rendezvous", rank=0, world_size=1)
        initialize_model_parallel(1)
        m = start["model"]
        self.dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[start["dtype"]]
        self.args = ModelArgs(dim=m["dim"], n_layers=m["n_layers"], n_heads=m["n_heads"],
                              n_kv_heads=m["n_kv_heads"], vocab_size=m["vocab_size"], multiple_of=m["multiple_of"],
                              ffn_dim_multiplier=m["ffn_dim_multiplier"], norm_eps=m["norm_eps"],
                              rope_theta=m["rope_theta"], use_scaled_rope=False,
                              max_batch_size=1, max_seq_len=m["max_seq_len"])
        state = worker_protocol.load_meta_state(start["meta_file"])
        self.dropped = sorted(k for k in state if k == "rope.freqs")
        state = {k: v for k, v in state.items() if k not in self.dropped}
        previous = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            self.model = Transformer(self.args)
        finally:
            torch.set_default_dtype(previous)
        self.model.load_state_dict(state, strict=True)
        self.model.eval()
        self._cache = (1, self.args.max_seq_len)

    def _fit(self, batch: int, seq: int) -> None:
        """Its KV cache holds max_batch_size x max_seq_len: size it to the request (as building
        the model with those two numbers would)."""
        import torch
        if (batch, seq) == self._cache:
            return
        for layer in self.model.layers:
            a = layer.attention
            shape = (batch, seq, a.n_local_kv_heads, a.head_dim)
            a.cache_k = torch.zeros(shape, dtype=self.dtype)
            a.cache_v = torch.zeros(shape, dtype=self.dtype)
        self._cache = (batch, seq)

    def provenance(self) -> dict:
        import torch
        return {
            "implementation": "llama-models llama3.model.Transformer (rope_theta from the checkpoint, "
                              "use_scaled_rope=False), forward(tokens, start_pos)",
            "versions": worker_protocol.versions("llama-models", "fairscale", "torch"),
            "dtype": str(self.dtype).replace("torch.", ""),
            "rope_theta": self.args.rope_theta,
            "dropped_keys": self.dropped,
            "torch_threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        }

    def forward(self, ids: np.ndarray) -> np.ndarray:
        import torch
        tokens = torch.from_numpy(ids.astype(np.int64))
        self._fit(*tokens.shape)
        return self.model(tokens, start_pos=0).float().numpy()

    def decode(self, ids: np.ndarray, prefill: int) -> np.ndarray:
        import torch
        tokens = torch.from_numpy(ids.astype(np.int64))
        self._fit(*tokens.shape)
        steps = [self.model(tokens[:, :prefill], start_pos=0)]
        for t in range(prefill, tokens.shape[1]):
            steps.append(self.model(tokens[:, t:t + 1], start_pos=t))
        return torch.cat(steps, dim=1).float().numpy()

    def close(self) -> None:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()
        self._pg.cleanup()


if __name__ == "__main__":
    sys.exit(worker_protocol.serve(Runner))
