"""Placement by accelerate device maps (harness/scale/place.py, `llama-parity place`), on CPU.

No GPU here: plans over GPU budgets are made on meta-device models (accelerate only warns that
GPU 0 and 1 are absent), and execution is checked with "cpu" and "disk" entries, which go through
the same dispatch hooks as a GPU placement.
"""
from __future__ import annotations

import json

import pytest
import torch

from harness.core.cases import Shape, make_inputs
from harness.core.presets import PRESETS
from harness.cli import main
from harness.scale.place import (blocks_per_device, bytes_per_device, empty_reference, place_reference, plan,
                                 to_transformers_map)
from harness.core.checkpoints import HFFolder
from harness.core.subjects import ReferenceSubject, TransformersSubject, reference
from reference_model import checkpoint
from reference_model.model import ModelArgs

# Layer 0 and the head go to disk, the rest stays on the CPU: both offload paths in one forward.
CPU_DISK = {"tok_embeddings": "cpu", "layers.0": "disk", "layers.1": "cpu", "norm": "disk", "output": "disk"}


def test_70b_shaped_plan_puts_whole_blocks_on_gpu0_then_gpu1_then_cpu():
    args = ModelArgs.from_params({**PRESETS["slice-70b"], "n_layers": 8})
    model = empty_reference(args, torch.float16)
    block = sum(p.numel() for p in model.layers[0].parameters()) * 2          # float16 bytes of one block
    assert args.ffn_hidden == 28672 and block > 1.5 * 2**30                   # a real 70B block, ~1.6 GiB
    budget = int(2.5 * block)
    device_map = plan(model, {0: budget, 1: budget, "cpu": 100 * block}, torch.float16)

    assert all(p.device.type == "meta" for p in model.parameters())           # planning allocated nothing
    assert set(device_map) == {"tok_embeddings", "norm", "output", *(f"layers.{i}" for i in range(8))}
    order = [device_map["tok_embeddings"], *(device_map[f"layers.{i}"] for i in range(8)),
             device_map["norm"], device_map["output"]]
    rank = {0: 0, 1: 1, "cpu": 2, "disk": 3}
    assert [rank[d] for d in order] == sorted(rank[d] for d in order)         # forward order = device order
    blocks = blocks_per_device(device_map, 8)
    assert blocks[0] and blocks[1] and blocks.get("cpu")                      # both GPUs used, the rest spills
    used = bytes_per_device(model, device_map, torch.float16)
    assert used[0] <= budget and used[1] <= budget


def test_balanced_plan_spreads_blocks_evenly_over_gpus():
    args = ModelArgs.from_params({**PRESETS["slice-70b"], "n_layers": 8})
    model = empty_reference(args, torch.float16)
    big = 100 * 2**30
    auto = blocks_per_device(plan(model, {0: big, 1: big, "cpu": big}, torch.float16), 8)
    balanced = blocks_per_device(plan(model, {0: big, 1: big, "cpu": big}, torch.float16, "balanced"), 8)
    assert auto == {0: list(range(8))}                                        # auto fills GPU 0 first
    assert abs(len(balanced[0]) - len(balanced[1])) <= 1 and len(balanced[0]) + len(balanced[1]) == 8


@pytest.mark.parametrize("dtype,oracle", [("float32", False), ("bfloat16", False), ("float64", True)])
def test_reference_on_cpu_and_disk_gives_bit_identical_logits(models, tmp_path, dtype, oracle):
    ckpt = checkpoint.load(models["tiny-gqa/meta"])
    ids = make_inputs(Shape(2, 12), ckpt.args.vocab_size, 0)
    plain = ReferenceSubject(ckpt, dtype, "cpu", oracle=oracle).logits(ids)
    placed = place_reference(reference(ckpt, dtype, "cpu"), CPU_DISK, tmp_path)
    # Offloaded for real: the disk blocks' weights are not in memory but in files accelerate reads back.
    assert placed.layers[0].attention.wq.weight.device.type == "meta"
    assert placed.output.weight.device.type == "meta"
    assert placed.layers[1].attention.wq.weight.device.type == "cpu"
    assert (tmp_path / "layers.0.attention.wq.weight.dat").is_file()
    assert torch.equal(placed(ids), plain)
    assert torch.equal(placed(ids), plain)                                     # again: reloads from disk


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_transformers_on_cpu_and_disk_gives_bit_identical_logits(models, tmp_path, dtype):
    ckpt = checkpoint.load(models["tiny-gqa/meta"])
    ids = make_inputs(Shape(2, 12), ckpt.args.vocab_size, 0)
    hf = HFFolder(ckpt)
    try:
        plain = TransformersSubject(hf.path, dtype, "cpu").logits(ids)
        placed = TransformersSubject(hf.path, dtype, "cpu", device_map=to_transformers_map(CPU_DISK),
                                     offload_folder=str(tmp_path))
        auto = TransformersSubject(hf.path, dtype, "cpu", device_map="auto")     # accelerate decides: all cpu here
        assert placed.model.model.layers[0].self_attn.q_proj.weight.device.type == "meta"
        assert placed.model.lm_head.weight.device.type == "meta"
        assert torch.equal(placed.logits(ids), plain)
        assert torch.equal(auto.logits(ids), plain)
    finally:
        hf.close()


def _run(models, tmp_path, *extra):
    out = tmp_path / "out"
    code = main(["place", "--model", str(models["tiny-gqa/meta"]), "--offload-dir", str(tmp_path / "off"),
                 "--out", str(out), *extra])
    return code, out


def test_place_command_passes_with_blocks_on_cpu_and_disk(models, tmp_path):
    # 2 MB of CPU for a ~2 MB float32 model: accelerate keeps the embedding and block 0, block 1 goes to disk.
    code, out = _run(models, tmp_path, "--max-memory", "cpu=2MB")
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["verdict"] == "pass" and summary["counts"]["fail"] == 0 and summary["counts"]["pass"] == 18
    placement = summary["placement"]
    assert "disk" in placement["reference"].values() and "cpu" in placement["reference"].values()
    assert placement["transformers"]["model.layers.1"] == placement["reference"]["layers.1"] == "disk"
    assert set(placement["oracle-fp64"].values()) <= {"cpu", "disk"}


@pytest.mark.parametrize("bug", ["drop-block", "half-hop"])
def test_planted_placement_bug_fails_the_comparison(models, tmp_path, bug):
    code, out = _run(models, tmp_path, "--device-map", _map_file(tmp_path, CPU_DISK), "--plant", bug)
    assert code == 1
    cells = json.loads((out / "summary.json").read_text())["cells"]
    failing = {c["subject"] for c in cells if c["status"] == "fail"}
    assert failing == {"transformers"}                                         # the reference is untouched


def _map_file(tmp_path, data) -> str:
    path = tmp_path / "map.json"
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return str(path)


@pytest.mark.parametrize("args,named", [
    (["--max-memory", "cpu=2XB"], "--max-memory"),
    (["--max-memory", "cpu:2GB"], "--max-memory"),
    (["--max-memory", "disk=2GB"], "--max-memory"),
    (["--device-map", "nowhere.json"], "--device-map"),
    (["--device-map", "MAP:{not json"], "--device-map"),
    (["--device-map", "MAP:" + json.dumps({**CPU_DISK, "layers.9": "cpu"})], "'layers.9'"),
    (["--device-map", "MAP:" + json.dumps({**CPU_DISK, "norm": "gpu"})], "'norm'"),
    (["--device-map", "MAP:" + json.dumps({k: v for k, v in CPU_DISK.items() if k != "output"})], "output.weight"),
    (["--device-map", "MAP:" + json.dumps({**CPU_DISK, "layers.0.attention": "cpu"})], "placed twice"),
    (["--device-map", "MAP:" + json.dumps(CPU_DISK), "--max-memory", "cpu=1GB"], "--max-memory"),
    (["--plant", "nope"], "--plant"),
])
def test_bad_specs_exit_2_naming_the_argument(models, tmp_path, capsys, args, named):
    args = [_map_file(tmp_path, a[4:]) if a.startswith("MAP:") else a for a in args]
    code, out = _run(models, tmp_path, *args)
    assert code == 2
    assert named in capsys.readouterr().err
    assert not out.exists()                                                    # nothing written


@pytest.mark.skipif(torch.cuda.device_count() > 0, reason="checks the message on a machine without GPUs")
def test_map_naming_a_missing_gpu_exits_2(models, tmp_path, capsys):
    code, out = _run(models, tmp_path, "--device-map", _map_file(tmp_path, {**CPU_DISK, "layers.1": "cuda:0"}))
    assert code == 2 and "GPU 0" in capsys.readouterr().err and not out.exists()


def test_a_block_split_finer_than_transformers_can_follow_exits_2(models, tmp_path, capsys):
    split = {**{k: v for k, v in CPU_DISK.items() if k != "layers.0"},
             "layers.0.attention": "cpu", "layers.0.feed_forward": "disk",
             "layers.0.attention_norm": "cpu", "layers.0.ffn_norm": "cpu"}
    code, out = _run(models, tmp_path, "--device-map", _map_file(tmp_path, split))
    assert code == 2 and "'layers.0.attention'" in capsys.readouterr().err and not out.exists()


# --- --subject: any kind that offers "place" ------------------------------------------------------

@pytest.fixture
def placeable(monkeypatch):
    """Kinds registered for the test: one that offers "place" with a bug of its own (layer 1 1% off,
    which no transformers model has), and the same without the offer."""
    from subjects_common import drifted, register_kind
    register_kind(monkeypatch, "placed-off", drifted("placed-off", 1), offers=("place",))
    register_kind(monkeypatch, "placed-off-nowhere", drifted("placed-off-nowhere", 1))


def test_a_kind_that_offers_place_is_placed_and_judged(models, tmp_path, placeable):
    """The registered kind's own model is dispatched by the same map (its layer 1 on disk) and judged:
    its bug fails the run, under its own name, where the default subject passes."""
    code, out = _run(models, tmp_path, "--device-map", _map_file(tmp_path, CPU_DISK), "--subject", "placed-off")
    assert code == 1
    summary = json.loads((out / "summary.json").read_text())
    assert {c["subject"] for c in summary["cells"] if c["status"] == "fail"} == {"placed-off"}
    assert summary["placement"]["placed-off"]["model.layers.0"] == "disk"
    assert summary["subject"]["label"] == "placed-off"
    assert _run(models, tmp_path / "plain", "--device-map", _map_file(tmp_path, CPU_DISK))[0] == 0


@pytest.mark.parametrize("spec, says", [
    ("placed-off-nowhere", "kinds that can: "),                 # the kind does not offer "place"
    ("transformers:compile=1", "nothing was measured"),          # its options take the placement away
    ("placed-off:device_map=auto", "with its own flags"),        # the command's own value as key=value
])
def test_a_subject_that_cannot_be_placed_is_exit_2(models, tmp_path, capsys, placeable, spec, says):
    code, out = _run(models, tmp_path, "--subject", spec)
    assert code == 2
    err = capsys.readouterr().err
    assert spec in err and says in err, err
    assert not (out / "summary.json").exists()


def test_a_placement_given_as_key_value_elsewhere_is_exit_2(tmp_path, capsys):
    """device_map and offload_folder are the place command's to hand over: as a spec's key=value on
    another command they are exit 2 naming the command that sets them, and nothing is written."""
    out = tmp_path / "out"
    code = main(["logits", "--dtypes", "float32", "--attn", "eager", "--tp", "1", "--shapes", "1x8",
                 "--inputs", "random", "--no-progress", "--subject", "transformers:device_map=auto", "--out", str(out)])
    assert code == 2
    err = capsys.readouterr().err
    assert "device_map=auto" in err and "set by the place command" in err, err
    assert not (out / "summary.json").exists()
