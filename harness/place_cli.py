"""`llama-parity place`: one comparison with every subject placed across devices by a device map.

The float64 oracle, the reference at --dtype and transformers at --dtype are each dispatched by
accelerate (harness/placement.py): on several GPUs their blocks spread over cuda:0..N, on a
machine without one over "cpu" and "disk". The reference and transformers get the same map
(transformers' in its own module names); the oracle is planned at float64, which is 2-4x larger.
Rows and exit codes are the logits suite's: 0 pass, 1 transformers breaks the policy, 2 bad input.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from harness.core.errors import InputError

SUITE = "place"


def _maps(a, ckpt) -> tuple[dict, dict]:
    """(map for the working dtype, map for the float64 oracle), both in Meta names."""
    from harness.scale.place import STRATEGIES, empty_reference, parse_max_memory, plan, read_device_map
    from harness.core.subjects import DTYPES
    max_memory = parse_max_memory(a.max_memory)
    if a.device_map in STRATEGIES:
        return tuple(plan(empty_reference(ckpt.args, DTYPES[d]), max_memory, DTYPES[d], a.device_map)
                     for d in (a.dtype, "float64"))
    if max_memory is not None:
        raise InputError("--max-memory: only with --device-map auto or balanced "
                         "(a map file says where everything goes)")
    fixed = read_device_map(a.device_map)
    return fixed, fixed


def cmd_place(a: argparse.Namespace) -> int:
    import torch

    from reference_model import checkpoint

    from harness.core.cases import KNOWN_ATTN, KNOWN_DTYPES, make_inputs, parse_shapes
    from harness.core.environment import environment
    from harness.core.metrics import METRICS, compare
    from harness.core.presets import default_model
    from harness.scale.place import PLANTS, blocks_per_device, check_map, describe, empty_reference, plant, to_transformers_map
    from harness.results.markdown import print_console, write_markdown
    from harness.core.store import INFO, Row, atomic_write_text, exit_code, write_results
    from harness.core.subjects import HFFolder, ReferenceSubject, TransformersSubject, attn_implementations
    from harness.core.tolerance import load_policy

    if a.dtype not in KNOWN_DTYPES:
        raise InputError(f"--dtype: unknown value {a.dtype!r} (choose from {', '.join(KNOWN_DTYPES)})")
    if a.attn not in KNOWN_ATTN:
        raise InputError(f"--attn: unknown value {a.attn!r} (choose from {', '.join(KNOWN_ATTN)})")
    if a.plant is not None and a.plant not in PLANTS:
        raise InputError(f"--plant: unknown placement bug {a.plant!r} (known: {', '.join(PLANTS)})")
    why = attn_implementations("cuda" if torch.cuda.is_available() else "cpu").get(a.attn, "")
    if why:
        raise InputError(f"--attn {a.attn}: {why}")
    if a.model and not Path(a.model).exists():
        raise InputError(f"--model: {a.model}: no such file or folder")
    shape = parse_shapes([a.shape])[0]
    policy = load_policy(a.policy)
    model = Path(a.model) if a.model else default_model()
    ckpt = checkpoint.load(model)
    work_map, oracle_map = _maps(a, ckpt)
    probe = empty_reference(ckpt.args)
    check_map(work_map, probe)       # every input error before anything loads or is written
    check_map(oracle_map, probe)
    tf_map = to_transformers_map(work_map)
    ids = make_inputs(shape, ckpt.args.vocab_size, a.seed)

    scratch = tempfile.TemporaryDirectory(prefix="llama-parity-offload-")
    offload = Path(a.offload_dir) if a.offload_dir else Path(scratch.name)
    hf = HFFolder(ckpt)
    try:
        oracle = ReferenceSubject(ckpt, "float64", "cpu", oracle=True, device_map=oracle_map,
                                  offload_dir=offload / "oracle")
        truth = oracle.logits(ids).cpu()
        del oracle
        reference = ReferenceSubject(ckpt, a.dtype, "cpu", device_map=work_map, offload_dir=offload / "reference")
        ref_logits = reference.logits(ids).cpu()
        del reference
        subject = TransformersSubject(hf.path, a.dtype, "cpu", a.attn, device_map=tf_map,
                                      offload_folder=str(offload / "transformers"))
        if a.plant:
            plant(subject.model.model.layers, a.plant)
        tf_placed = dict(getattr(subject.model, "hf_device_map", tf_map))
        tf_logits = subject.logits(ids).float().cpu()
        del subject
    finally:
        hf.close()
        scratch.cleanup()

    case = {"dtype": a.dtype, "attn": a.attn, "shape": str(shape), "device_map": a.device_map}
    ref_values, ref_why = compare(ref_logits, truth)
    tf_values, tf_why = compare(tf_logits, truth)
    pair, pair_why = compare(tf_logits, ref_logits)
    rows = []
    for subject_name, values, why, calib in (("reference", ref_values, ref_why, None),
                                             ("transformers", tf_values, tf_why, ref_values)):
        for m in METRICS:
            tol, status, reason = policy.judge(a.dtype, m, values[m], None if calib is None else calib[m])
            rows.append(Row(SUITE, case, subject_name, "oracle-fp64", m, values[m], tol,
                            "fail" if why else status, why or reason))
    rows += [Row(SUITE, case, "transformers", "reference", m, pair[m], status=INFO,
                 reason=pair_why or "informational: same dtype, no truth") for m in METRICS]

    placement = {"oracle-fp64": {k: str(v) for k, v in oracle_map.items()},
                 "reference": {k: str(v) for k, v in work_map.items()},
                 "transformers": {k: str(v) for k, v in tf_placed.items()},
                 "blocks_per_device": {str(d): b for d, b in blocks_per_device(work_map, ckpt.args.n_layers).items()}}
    extra = {"model": str(model), "truth": "oracle-fp64 (the reference entirely in float64)", "seed": a.seed,
             "policy": {"path": str(policy.path), "version": policy.version}, "plant": a.plant,
             "placement": placement}
    out = Path(a.out)
    on_gpu = any(isinstance(d, int) for d in (*work_map.values(), *oracle_map.values()))
    summary = write_results(out, SUITE, rows, environment("cuda" if on_gpu else "cpu"), extra)
    write_markdown(out / "report.md", summary)
    text = (out / "report.md").read_text(encoding="utf-8")
    text += ("\n## Placement (accelerate device maps)\n\n"
             + "".join(f"- **{k}**: {describe(v)}\n" for k, v in
                       (("oracle-fp64", oracle_map), ("reference", work_map), ("transformers", tf_placed))))
    atomic_write_text(out / "report.md", text)
    print_console(summary)
    print(f"placement (reference, transformers): {describe(work_map)}")
    print(f"results: {out}/results.csv, {out}/summary.json, {out}/report.md")
    return exit_code(rows)


def register(sub) -> None:
    p = sub.add_parser("place", help="compare the subjects with their blocks placed across devices (accelerate)")
    p.add_argument("--model", help="Meta or HF folder; default: the embedded model")
    p.add_argument("--device-map", default="auto",
                   help="auto (accelerate fills GPUs in order, then cpu, then disk), balanced (even over the "
                        "GPUs), or a JSON file {module: device} in the reference's names "
                        "(tok_embeddings, layers.N, norm, output; device 0, 'cuda:1', 'cpu' or 'disk')")
    p.add_argument("--max-memory", help="budgets for auto/balanced, e.g. 0=20GiB,1=20GiB,cpu=64GiB")
    p.add_argument("--offload-dir", help="folder for weights placed on disk (default: a temporary folder)")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 (default float32)")
    p.add_argument("--attn", default="eager", help="attention implementation (default eager)")
    p.add_argument("--shape", default="1x16", help="BATCHxSEQ of the input (default 1x16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--policy", help="tolerance policy TOML (default: suites/tolerance.toml)")
    p.add_argument("--plant", help="plant a placement bug in transformers' last block: drop-block or half-hop")
    p.add_argument("--out", default="reports/latest/place", help="output folder")
    p.set_defaults(func=cmd_place)


def main(argv: list[str] | None = None) -> int:
    """The full `llama-parity` CLI (`place` is registered there): same exit codes."""
    from harness.cli import main as cli_main
    return cli_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
