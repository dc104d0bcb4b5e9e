"""The classes of wrong verdict from the trust issue, run against any checkout of the harness.

    python scripts/trust_classes.py TREE WORKDIR      # e.g. a `git worktree` of an older commit

Models come from this checkout's presets; each class runs as `python -m harness ...` inside TREE
and prints its exit code with the last line of stderr. tests/test_trust.py asserts the same
classes on this checkout; this script is how their before/after table was measured.
"""
import json, os, shutil, subprocess, sys, torch
from pathlib import Path
ROOT = Path(sys.argv[1]); W = Path(sys.argv[2]); W.mkdir(parents=True)   # a new folder: nothing of yours is replaced
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from harness.core.presets import write_preset
meta = write_preset("tiny-gqa", W/"meta", fmt="meta"); hf = write_preset("tiny-gqa", W/"hf", fmt="hf")
hfs = write_preset("tiny-gqa", W/"hfs", fmt="hf", hf_shard_tensors=7)
SMALL = ["--dtypes", "float32", "--attn", "eager", "--tp", "1", "--shapes", "1x6"]
env = {**os.environ, "PYTHONPATH": str(ROOT)}
def run(*argv):
    p = subprocess.run([sys.executable, "-m", "harness", *argv], cwd=ROOT, env=env, capture_output=True, text=True)
    tb = "Traceback" in p.stderr
    return p.returncode, ("traceback" if tb else (p.stderr.strip().splitlines() or [""])[-1][:90])
res = []
def rec(name, r): res.append((name, r)); print(f"{name:32s} exit {r[0]}  {r[1]}", flush=True)
# NaN copy, same names/sizes/mtimes
m = W/"model"; shutil.copytree(meta, m); out = W/"out"
rec("clean run", run("logits", "--model", str(m), "--out", str(out), *SMALL))
p = m/"consolidated.00.pth"; st = p.stat(); w = torch.load(p, weights_only=True)["layers.0.attention.wq.weight"]
old = w.flatten()[:4].contiguous().numpy().tobytes(); new = torch.full((4,), float("nan"), dtype=w.dtype).numpy().tobytes()
p.write_bytes(p.read_bytes().replace(old, new)); os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
rec("nan copy, same metadata, resume", run("logits", "--model", str(m), "--out", str(out), *SMALL))
two = W/"two"; shutil.copytree(hfs, two); shutil.copy2(hf/"model.safetensors", two/"model.safetensors")
rec("two weight sets", run("logits", "--model", str(two), "--out", str(W/"o"), *SMALL))
c = W/"conv"; shutil.copytree(hfs, c)
rec("convert into sharded folder", run("convert", "--model", str(meta), "--to", "hf", "--out", str(c)))
pol = (ROOT/"suites/tolerance.toml").read_text()
for name, a, b in [("policy floor nan", "floor = 1e-05", "floor = nan"), ("policy abs negative", "abs = 0.01", "abs = -0.01"),
                   ("policy misspelled metric", "[float32.max_abs]", "[float32.max_abss]")]:
    f = W/f"{name.replace(' ', '-')}.toml"; f.write_text(pol.replace(a, b, 1))
    rec(name, run("logits", "--model", str(meta), "--out", str(W/"o"), *SMALL, "--policy", str(f)))
def cfg(ch, name):
    d = W/name; shutil.copytree(hf, d); j = json.loads((d/"config.json").read_text()); j.update(ch); (d/"config.json").write_text(json.dumps(j)); return d
for name, ch in [("hidden_act gelu", {"hidden_act": "gelu"}), ("head_dim disagrees", {"head_dim": 7}),
                 ("num_key_value_heads 0", {"num_key_value_heads": 0}), ("10^6 layers", {"num_hidden_layers": 10**6})]:
    rec(name, run("logits", "--model", str(cfg(ch, name.replace(' ', '_'))), "--out", str(W/"o"), *SMALL))
rec("--shapes 1x999999", run("logits", "--model", str(meta), "--out", str(W/"o"), "--dtypes", "float32", "--attn", "eager", "--tp", "1", "--shapes", "1x999999"))
from safetensors.torch import load_file, save_file
for dt in (torch.int8, torch.complex64, torch.float8_e4m3fn):
    d = W/f"w{dt}"; shutil.copytree(hf, d); sd = load_file(d/"model.safetensors"); k = "model.layers.0.self_attn.q_proj.weight"
    sd[k] = sd[k].to(dt); save_file(sd, d/"model.safetensors")
    rec(f"weights {str(dt)[6:]}", run("logits", "--model", str(d), "--out", str(W/"o"), *SMALL))
rec("behaviour --suite ,", run("behaviour", "--model", str(hf), "--suite", ",", "--out", str(W/"o")))
rec("--attn flash_attention_2 on cpu", run("logits", "--model", str(hf), "--attn", "flash_attention_2", "--dtypes", "float32", "--tp", "1", "--shapes", "1x6", "--out", str(W/"o")))
json.dump(res, open(W/"results.json", "w"))
