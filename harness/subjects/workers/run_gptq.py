"""GPTQ as a subject: GPT-QModel quantises the harness's HF folder; transformers loads the result.

Runs in its own venv (suites/venvs/gptq.txt: GPT-QModel 7.7 requires torch >= 2.14.1, the harness
pins 2.13.0); imports nothing from the harness. Two entry points:

    python -I run_gptq.py quantise JOB.json     GPTQModel.load + quantize + save, once per cache key
    python -I run_gptq.py SESSION_DIR           the worker: from_pretrained(the quantised folder)

Quantising is what GPT-QModel's README does (``GPTQModel.load(path, QuantizeConfig(...))``,
``model.quantize(calibration)``, ``model.save(out)``), with the harness's calibration token ids.
Loading is what a user of a GPTQ checkpoint from the Hub does: ``AutoModelForCausalLM
.from_pretrained(folder)``, which hands the quantised linears to GPT-QModel's kernels through
optimum. Decode goes through transformers' own cache.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import worker_protocol  # noqa: E402

import numpy as np  # noqa: E402

DTYPES = ("float32", "bfloat16", "float16")


def _with_tokenizer(hf_dir: str, tokenizer_model: str, into: Path) -> Path:
    """GPTQModel.load insists on a tokenizer beside the weights, though the calibration is given as
    token ids: a folder of links to the HF folder's files plus the checkpoint's tokenizer.model."""
    for f in Path(hf_dir).iterdir():
        (into / f.name).symlink_to(f.resolve())
    shutil.copyfile(tokenizer_model, into / "tokenizer.model")
    (into / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False}), encoding="utf-8")
    return into


def quantise(job_file: str) -> int:
    job = json.loads(Path(job_file).read_text(encoding="utf-8"))
    import torch
    from gptqmodel import GPTQModel, QuantizeConfig
    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    calib = np.load(job["calibration"], allow_pickle=False)
    rows = [{"input_ids": r.tolist(), "attention_mask": [1] * len(r)} for r in calib.astype(np.int64)]
    # act_group_aware (GPT-QModel's own refinement, on by default unless desc_act) needs groups: off
    # for group=-1; left to GPT-QModel's default otherwise (setting it beside desc_act=True is refused).
    own = {"act_group_aware": False} if job["group"] <= 0 else {}
    config = QuantizeConfig(bits=job["bits"], group_size=job["group"], desc_act=job["desc_act"], sym=job["sym"],
                            damp_percent=job["damp"], offload_to_disk=False, **own)
    with tempfile.TemporaryDirectory(prefix="gptq-in-") as tmp:
        folder = _with_tokenizer(job["hf_dir"], job["tokenizer_model"], Path(tmp))
        model = GPTQModel.load(str(folder), config, device="cpu", dtype=torch.float32)
        model.quantize(rows, batch_size=job.get("batch", 4))
        model.save(job["out"])
    return 0


class Runner:
    def __init__(self, start: dict):
        import torch
        from transformers import AutoModelForCausalLM
        if start.get("threads"):
            torch.set_num_threads(int(start["threads"]))
        self.dtype = getattr(torch, start["dtype"])
        self.folder = Path(start["model_dir"])
        self.model = AutoModelForCausalLM.from_pretrained(str(self.folder), dtype=self.dtype, device_map="cpu")
        self.model.eval()

    def provenance(self) -> dict:
        import collections

        import torch
        kernels = collections.Counter(type(m).__name__ for m in self.model.modules() if hasattr(m, "qweight"))
        float_linear = sorted(n for n, m in self.model.named_modules()
                              if isinstance(m, torch.nn.Linear) and not hasattr(m, "qweight"))
        qc = json.loads((self.folder / "quantize_config.json").read_text(encoding="utf-8"))
        return {
            "implementation": "gptqmodel.GPTQModel.quantize, then transformers AutoModelForCausalLM.from_pretrained "
                              "(optimum -> GPT-QModel kernels)",
            "versions": worker_protocol.versions("gptqmodel", "transformers", "optimum", "torch", "accelerate"),
            "dtype": str(self.dtype).replace("torch.", ""),
            "kernels": dict(kernels),
            "float_linear": float_linear,          # left unquantised (the output head by default)
            "quantize_config": {k: qc.get(k) for k in ("bits", "group_size", "desc_act", "sym", "checkpoint_format",
                                                       "lm_head")},
            "damp_percent": qc.get("meta", {}).get("damp_percent"),
            "act_group_aware": qc.get("meta", {}).get("act_group_aware"),
            "fallback": qc.get("meta", {}).get("fallback"),
            "kv_cache": f"{str(self.dtype).replace('torch.', '')}, transformers' DynamicCache",
            "torch_threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        }

    def forward(self, ids: np.ndarray) -> np.ndarray:
        import torch
        with torch.inference_mode():
            return self.model(torch.from_numpy(ids.astype(np.int64)), use_cache=False).logits.float().numpy()

    def decode(self, ids: np.ndarray, prefill: int) -> np.ndarray:
        import torch
        tokens = torch.from_numpy(ids.astype(np.int64))
        with torch.inference_mode():
            out = self.model(tokens[:, :prefill], use_cache=True)
            steps, cache = [out.logits], out.past_key_values
            for t in range(prefill, tokens.shape[1]):
                out = self.model(tokens[:, t:t + 1], past_key_values=cache, use_cache=True)
                steps.append(out.logits)
                cache = out.past_key_values
        return torch.cat(steps, dim=1).float().numpy()


if __name__ == "__main__":
    # GPT-QModel 7.7 asks for two model-loader threads but sizes its CPU pool to (cores + 1) // 2: on a
    # machine with fewer than three cores it refuses to load anything unless told how many to use.
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, ((os.cpu_count() or 1) + 1) // 2)))
    if len(sys.argv) == 3 and sys.argv[1] == "quantise":
        sys.exit(quantise(sys.argv[2]))
    sys.exit(worker_protocol.serve(Runner))
