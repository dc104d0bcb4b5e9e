"""The tokenizer policy's calibration: clean runs over fuzz seeds, counted.

    python benchmarks/tokenizer_campaign.py                      # seeds 1-20, 300 texts each
    python benchmarks/tokenizer_campaign.py --seeds 1-100 --examples 500

The tokenizer suite has no numeric threshold: every check is exact equality with sentencepiece
(tolerance 0), and nothing in it is drawn at random except the fuzz texts (hypothesis; the default
run uses the derandomised draw, the same texts every run). So its false-alarm rate is the rate at
which a *correct* tokenizer fails on texts it has not seen: the campaign runs the reference
tokenizer (reference_model/tokenizer.py, independent of sentencepiece) on every check with the
fuzz texts of each seed and prints how many rows fail. A failing row here is either a reference
bug or a false alarm of the rule; the policy holds while the count is 0. Second, for the
transformers subjects of the installed release it prints, per seed, the rows that no mechanism
explains (the new findings a run would report beside the known ones): a rate above 0 for a seed
that the default draw does not show would mean the default run's verdict depends on its texts.
"""
from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harness.core.real_tokenizer import ensure_tokenizer_model  # noqa: E402
from harness.core.store import FAIL  # noqa: E402
from harness.suites.tokenizer import checks  # noqa: E402
from harness.suites.tokenizer.catalogue import load_catalogue  # noqa: E402
from harness.suites.tokenizer.subjects import discover_subjects, load_subject  # noqa: E402


def seed_range(text: str) -> list[int]:
    lo, _, hi = text.partition("-")
    return list(range(int(lo), int(hi or lo) + 1))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="1-20")
    p.add_argument("--examples", type=int, default=300)
    p.add_argument("--subjects", default="reference/model_path,transformers.LlamaTokenizer/from_pretrained,"
                                         "transformers.AutoTokenizer/from_pretrained")
    a = p.parse_args()
    model = ensure_tokenizer_model()
    truth = checks.Truth(model)
    cat = load_catalogue()
    wanted = a.subjects.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        subjects = [load_subject(s) for s in discover_subjects(model, Path(tmp)) if s.label in wanted]
        subjects = [s for s in subjects if not s.na]
        print(f"{len(seed_range(a.seeds))} seeds x {a.examples} fuzz texts; subjects: "
              f"{', '.join(s.label for s in subjects)}")
        totals: dict[str, collections.Counter] = {s.label: collections.Counter() for s in subjects}
        started = time.time()
        for seed in seed_range(a.seeds):
            texts = checks.fuzz_texts(a.examples, seed)
            for s in subjects:
                j = checks.Judge(cat)
                checks.check_fuzz(j, truth, s, texts)
                failing = [r for r in j.rows if r.status == FAIL]
                unexplained = [r for r in failing if r.extra.get("mechanism") == "unexplained"]
                t = totals[s.label]
                t["runs"] += 1
                t["rows"] += len(j.rows)
                t["failing rows"] += len(failing)
                t["unexplained rows"] += len(unexplained)
                t["runs with a failing row"] += bool(failing)
                t["runs with an unexplained row"] += bool(unexplained)
        print(f"({time.time() - started:.0f} s)\n")
        for label, t in totals.items():
            runs = t["runs"]
            print(f"{label}: {runs} runs, {t['rows']} rows; failing rows {t['failing rows']} "
                  f"(runs with one: {t['runs with a failing row']}/{runs}); unexplained rows {t['unexplained rows']} "
                  f"(runs with one: {t['runs with an unexplained row']}/{runs})")
        ref = totals.get("reference/model_path")
        if ref is not None:
            rate = ref["runs with a failing row"] / max(ref["runs"], 1)
            print(f"\nclean-run false-alarm rate (reference, exact equality, tolerance 0): "
                  f"{ref['runs with a failing row']}/{ref['runs']} = {rate:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
