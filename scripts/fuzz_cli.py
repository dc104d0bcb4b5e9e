"""A longer fuzzing campaign over the whole command line (the property of tests/test_fuzz_cli.py).

    python scripts/fuzz_cli.py --examples 40 --seed 1            # 40 examples per subcommand
    python scripts/fuzz_cli.py --commands logits,report --examples 200 --verbose

Every subcommand is driven in-process through ``harness.cli.main(argv)`` with the test module's
strategies (generated flags, corrupted checkpoints, mutated stored results and policies). Prints
how many examples ran per subcommand (and their exit codes), then every distinct failure: the
command line, the exit code, the first error line and what it broke. Exit 0 when none was found,
1 otherwise. Failures of the issues listed in the test module's KNOWN_ISSUES (bugs in files outside the
fuzzer's reach, each with its proposed fix) are listed apart and do not fail the campaign
unless --strict. An exit 3 names the harness function that raised (LLAMA_PARITY_DEBUG=1 is set
for every example).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def _key(command: str, violation: str) -> str:
    """A failure's class: the command and what was broken, with paths and numbers blurred."""
    v = re.sub(r"(/[^\s'\"\]]*)?/ex-[^/\s]+/\d\d-[\w-]+", "{DIR}", violation)
    v = re.sub(r"/tmp/[^\s'\")\]]+", "{TMP}", v)
    v = re.sub(r"\d+(\.\d+)?(e[-+]?\d+)?", "N", v)
    return f"{command}: {v[:160]}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--examples", type=int, default=30, help="examples per subcommand (default 30)")
    p.add_argument("--seed", type=int, default=0, help="hypothesis seed (default 0)")
    p.add_argument("--commands", help="comma list of subcommands (default: all)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds one example may run (default 120)")
    p.add_argument("--strict", action="store_true", help="known issues count as failures, and argparse usage "
                                                         "errors must start 'llama-parity: error:'")
    p.add_argument("--json", help="also write every failing example to this JSON file")
    p.add_argument("--verbose", action="store_true",
                   help="one line per example (the command line is printed before it runs: a crash names it)")
    a = p.parse_args(argv)
    import faulthandler
    faulthandler.enable()          # a crash of the process itself (SIGSEGV, SIGBUS) shows where it was
    if a.strict:
        os.environ["FUZZ_CLI_STRICT"] = "1"
    os.environ.setdefault("LLAMA_PARITY_CACHE", str(ROOT / ".cache" / "llama-parity"))

    from hypothesis import HealthCheck, Phase, given, seed, settings
    from hypothesis import strategies as st

    import test_fuzz_cli as fz

    commands = [c.strip() for c in a.commands.split(",")] if a.commands else list(fz.COMMANDS)
    unknown = [c for c in commands if c not in fz.COMMANDS]
    if unknown:
        p.error(f"--commands: unknown {', '.join(unknown)} (known: {', '.join(fz.COMMANDS)})")
    if "bench" in commands and not fz.HAVE_LMEVAL:
        print("bench: skipped (lm-eval is not installed)")
        commands.remove("bench")

    started = time.perf_counter()
    fz.fixtures()
    print(f"fixtures ready in {time.perf_counter() - started:.1f}s", flush=True)
    ran: dict[str, collections.Counter] = {}
    seconds: dict[str, float] = collections.defaultdict(float)
    failures: dict[str, list] = collections.defaultdict(list)
    skipped: collections.Counter = collections.Counter()

    def make_campaign(command: str):
        @settings(max_examples=a.examples, deadline=None, database=None, derandomize=False,
                  suppress_health_check=list(HealthCheck), phases=[Phase.generate])
        @seed(a.seed)
        @given(data=st.data())
        def campaign(data):
            inv = data.draw(fz.invocation(command))
            if a.verbose:
                print(f"  > {inv!r}", flush=True)
            try:
                o = fz.run_invocation(inv, timeout=a.timeout)
            except BaseException as e:   # noqa: BLE001 - pytest.skip (no tokenizer fixture here)
                if type(e).__name__ == "Skipped":
                    skipped[command] += 1
                    return
                raise
            if a.verbose:
                print(f"    exit {o.code} in {o.seconds:.1f}s: {o.first_error_line()[:160]}"
                      + (f"  BROKE: {'; '.join(o.violations)[:300]}" if o.violations else ""), flush=True)
            ran[command][o.code] += 1
            seconds[command] += o.seconds
            for v in o.violations:
                failures[(o.known.get(v) if not a.strict else None, _key(command, v))].append(o)

        return campaign

    for command in commands:
        ran[command] = collections.Counter()
        t0 = time.perf_counter()
        make_campaign(command)()
        print(f"{command:10} {sum(ran[command].values()):4} examples in {time.perf_counter() - t0:6.1f}s  "
              f"exit codes {dict(sorted(ran[command].items(), key=lambda kv: str(kv[0])))}"
              + (f"  ({skipped[command]} skipped)" if skipped[command] else ""), flush=True)

    total = sum(sum(c.values()) for c in ran.values())
    print(f"\n{total} examples over {len(ran)} subcommands in {time.perf_counter() - started:.0f}s")
    new = {k: v for k, v in failures.items() if k[0] is None}
    known = {k: v for k, v in failures.items() if k[0] is not None}
    dump = []
    for title, group in ((f"{len(new)} distinct new failure(s)", new),
                         (f"{len(known)} distinct failure(s) of known issues (tests/test_fuzz_cli.py KNOWN_ISSUES)",
                          known)):
        if not group:
            continue
        print(f"\n{title}:")
        for (issue, key), outcomes in sorted(group.items(), key=lambda kv: (str(kv[0][0]), kv[0][1])):
            o = outcomes[0]
            print(f"\n[{len(outcomes)}x] {key}" + (f"  (known issue: {issue})" if issue else ""))
            print(f"  argv: {o.invocation!r}")
            print(f"  exit {o.code}; first error line: {o.first_error_line()}")
            if o.code == 3:
                print(f"  raised in: {o.last_frame()}")
            dump.append({"class": key, "known_issue": issue, "count": len(outcomes), "argv": repr(o.invocation),
                         "exit": o.code, "first_error_line": o.first_error_line(), "raised_in": o.last_frame(),
                         "violations": o.violations, "stderr_tail": o.err[-3000:]})
    if a.json:
        Path(a.json).write_text(json.dumps(dump, indent=1, ensure_ascii=False), encoding="utf-8")
    if not new:
        print("\nno new failures" + (f" ({len(known)} known issue class(es) hit)" if known else ""))
        return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
