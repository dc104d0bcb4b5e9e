"""Are two runs' results the same? The proof that moving a suite onto another code path changed
nothing: results.csv byte for byte, and every cell of summary.json value for value (JSON keeps
a float's full repr, so equal there is bit-equal), with its status, tolerance, reason and evidence,
and the verdict. Keys a newer run only adds are named (``--ignore-extra KEY``), never skipped silently.

    python scripts/same_rows.py /tmp/before /tmp/after [--ignore-extra subject]
    python scripts/same_rows.py /tmp/before /tmp/after --journal   # runs still going: the cell groups
                                                                    # both have journaled so far

Exit 0: the same; 1: a difference (the first ten printed); 2: a folder without results.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def load(folder: Path) -> tuple[str, dict]:
    csv, summary = folder / "results.csv", folder / "summary.json"
    if not csv.is_file() or not summary.is_file():
        print(f"{folder}: no results.csv / summary.json", file=sys.stderr)
        sys.exit(2)
    return csv.read_text(encoding="utf-8"), json.loads(summary.read_text(encoding="utf-8"))


def cell(c: dict, ignore: set[str]) -> dict:
    return {**c, "extra": {k: v for k, v in c.get("extra", {}).items() if k not in ignore}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("before", type=Path)
    p.add_argument("after", type=Path)
    p.add_argument("--ignore-extra", action="append", default=[],
                   help="a key of a cell's evidence (extra) that only the newer run writes")
    p.add_argument("--journal", action="store_true",
                   help="compare the rows of every cell group both folders' journal.jsonl hold (runs not finished)")
    a = p.parse_args(argv)
    ignore = set(a.ignore_extra)
    if a.journal:
        return journals(a.before, a.after, ignore)
    (csv_a, sum_a), (csv_b, sum_b) = load(a.before), load(a.after)
    diffs = []
    if csv_a != csv_b:
        lines_a, lines_b = csv_a.splitlines(), csv_b.splitlines()
        diffs += [f"results.csv line {i + 1}: {x!r} != {y!r}" for i, (x, y) in enumerate(zip(lines_a, lines_b)) if x != y]
        if len(lines_a) != len(lines_b):
            diffs.append(f"results.csv: {len(lines_a)} lines != {len(lines_b)}")
    cells_a, cells_b = sum_a["cells"], sum_b["cells"]
    if len(cells_a) != len(cells_b):
        diffs.append(f"summary.json: {len(cells_a)} cells != {len(cells_b)}")
    for n, (x, y) in enumerate(zip(cells_a, cells_b)):
        if cell(x, ignore) != cell(y, ignore):
            keys = sorted(k for k in set(x) | set(y) if cell(x, ignore).get(k) != cell(y, ignore).get(k))
            diffs.append(f"summary.json cell {n} ({x['subject']} {x['metric']} {x['case']}): differs in {keys}")
    for key in ("verdict", "counts"):
        if sum_a.get(key) != sum_b.get(key):
            diffs.append(f"summary.json {key}: {sum_a.get(key)} != {sum_b.get(key)}")
    added = sorted({k for c in cells_b for k in c.get("extra", {})} - {k for c in cells_a for k in c.get("extra", {})})
    print(f"results.csv: {len(csv_a.splitlines())} lines, {'identical' if csv_a == csv_b else 'DIFFERENT'}; "
          f"summary.json: {len(cells_a)} cells; verdict {sum_a.get('verdict')} -> {sum_b.get('verdict')}; "
          f"counts {sum_a.get('counts')} -> {sum_b.get('counts')}")
    if added:
        print(f"evidence keys only the newer run writes: {', '.join(added)} "
              f"({'ignored as asked' if set(added) <= ignore else 'compared'})")
    for d in diffs[:10]:
        print("  " + d)
    print("SAME" if not diffs else f"{len(diffs)} difference(s)")
    return 1 if diffs else 0


def journals(before: Path, after: Path, ignore: set[str]) -> int:
    def groups(folder: Path) -> dict[str, list]:
        path = folder / "journal.jsonl"
        if not path.is_file():
            print(f"{folder}: no journal.jsonl", file=sys.stderr)
            sys.exit(2)
        out = {}
        for line in path.read_text(encoding="utf-8").splitlines():
            entry = json.loads(line)
            out[json.dumps(entry["group"], sort_keys=True)] = entry["rows"]
        return out
    ga, gb = groups(before), groups(after)
    common = [g for g in ga if g in gb]
    diffs = [f"{g}: rows differ" for g in common
             if [cell(r, ignore) for r in ga[g]] != [cell(r, ignore) for r in gb[g]]]
    rows = sum(len(ga[g]) for g in common)
    print(f"journal: {len(common)} cell groups in both ({rows} rows); {len(ga)} and {len(gb)} journaled")
    for d in diffs[:10]:
        print("  " + d)
    print("SAME" if common and not diffs else f"{len(diffs)} difference(s)" if diffs else "nothing to compare")
    return 1 if diffs or not common else 0


if __name__ == "__main__":
    sys.exit(main())
