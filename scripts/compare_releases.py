"""Which releases give the very same transformers-vs-oracle numbers in the logits suite?

    python scripts/compare_releases.py [reports/matrix] [--base 4.46.3]

Reads ROOT/transformers-<release>/logits/results.csv and, for each release, counts the cells it
shares with the base release whose value is identical, and prints the ratio of those that differ.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

KEY = ["dtype", "attn", "tp", "shape", "metric"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("root", nargs="?", default="reports/matrix")
    p.add_argument("--base", default="4.46.3")
    a = p.parse_args()
    values = {}
    for path in sorted(Path(a.root).glob("transformers-*/logits/results.csv")):
        df = pd.read_csv(path)
        df = df[(df.subject == "transformers") & (df.against == "oracle-fp64") & (df.status != "n/a")]
        values[path.parts[-3].removeprefix("transformers-")] = df.set_index(KEY)["value"]
    base = values[a.base]
    for release, v in values.items():
        common = v.index.intersection(base.index)
        d = pd.DataFrame({"base": base.loc[common], "this": v.loc[common]})
        differ = d[d.base != d.this]
        print(f"{release}: {len(common) - len(differ)} of {len(common)} shared cells identical to {a.base}")
        if len(differ):
            ratio = (differ.this / differ.base).replace([float("inf")], float("nan")).dropna()
            print(f"   differing: {sorted({k[:3] for k in differ.index})}; value ratio {ratio.min():.2f}-{ratio.max():.2f}")


if __name__ == "__main__":
    main()
