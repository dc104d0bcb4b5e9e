"""--known FILE on every suite with known deviations (harness.core.deviations.read_user): a user's
own accepted findings, merged with the project's, named as the user's wherever findings are shown."""
from __future__ import annotations

from pathlib import Path

import pytest

from harness.core import deviations
from harness.core.findings import collect
from harness.core.store import FAIL, INFO, Row

ACCEPTED = '''
[known.fp16-padding-floor]
where = { metric = "pad_kl_max", dtype = "float16" }
releases = ">=5.24,<5.26"
max_ratio = 2
reason = "our serving runs float32; float16 padding KL at the float16 floor is not our path"
source = "https://ci.example/decisions/7"
'''


def _row(value: float) -> Row:
    return Row("padding", {"dtype": "float16", "attn": "eager"}, "transformers", "reference", "pad_kl_max",
               value, 1e-5, FAIL, "pad_kl_max beyond tolerance")


def test_a_user_deviation_excuses_a_row_and_the_finding_says_whose(tmp_path):
    path = tmp_path / "known.toml"
    path.write_text(ACCEPTED, encoding="utf-8")
    mine = deviations.read_user(path)
    assert [d.origin for d in mine] == [str(path)]
    rows = deviations.settle([_row(1.05e-5), _row(9e-5)], deviations.merge([], mine), release="5.25.0")
    assert [r.status for r in rows] == [INFO, FAIL]          # the second is beyond the 2x it accepts
    found = collect(rows, suite="behaviour", release="5.25.0")
    known = next(f for f in found if f["status"] == "known")
    assert known["accepted_by"] == str(path) and known["source"] == "https://ci.example/decisions/7"
    assert next(f for f in found if f["status"] == "new")["accepted_by"] == ""
    assert deviations.user_summary(mine) == {"user_known": {"file": str(path), "entries": ["fp16-padding-floor"]}}
    # outside the user's releases it excuses nothing
    assert deviations.settle([_row(1.05e-5)], mine, release="5.26.0")[0].status == FAIL


@pytest.mark.parametrize("suite", ["behaviour", "axes", "train", "logits"])
def test_a_malformed_known_file_is_exit_2_on_every_suite(suite, tmp_path, capsys):
    from harness.cli import main
    path = tmp_path / "known.toml"
    path.write_text(ACCEPTED.replace('releases = ">=5.24,<5.26"\n', ""), encoding="utf-8")
    assert main([suite, "--known", str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "[known.fp16-padding-floor]" in err and "'releases'" in err
    assert not (tmp_path / "o").exists()


def test_train_settles_a_failing_cell_the_users_file_accepts(models, tmp_path):
    """train --known: a planted bug's failing cells, accepted by the user's file for this release,
    become known findings from that file and the run passes; the same run without the file fails."""
    from harness.cli import main
    from harness.core.compat import transformers_release
    import json
    path = tmp_path / "known.toml"
    path.write_text(f"""
[known.our-pads-in-labels]
where = {{ input = "right" }}
releases = "=={transformers_release()}"
reason = "a planted bug, accepted here to show the file works"
source = "https://ci.example/decisions/8"
""", encoding="utf-8")
    argv = ["train", "--model", str(models["tiny-gqa/meta"]), "--attn", "eager", "--tp", "1", "--ctx", "32",
            "--long-ctx", "320", "--dtypes", "float32", "--casts", "load", "--checkpointing", "off",
            "--inputs", "right", "--plant", "pads-in-labels"]
    assert main([*argv, "--out", str(tmp_path / "plain")]) == 1
    assert main([*argv, "--out", str(tmp_path / "accepted"), "--known", str(path)]) == 0
    s = json.loads((tmp_path / "accepted" / "summary.json").read_text())
    assert s["policy"]["user_known"] == {"file": str(path), "entries": ["our-pads-in-labels"], "unused": []}
    known = [f for f in s["findings"] if f["status"] == "known"]
    assert known and all(f["accepted_by"] == str(path) for f in known)


def test_logits_settles_what_the_users_file_accepts_and_nothing_else(models, tmp_path):
    """logits --known: the planted bug's failing cells at float32, accepted for this release, pass the
    run as known findings from the file; an entry that matches another dtype accepts nothing."""
    from harness.cli import main
    from harness.core.compat import transformers_release
    import json
    def known(dtype):
        path = tmp_path / f"known-{dtype}.toml"
        path.write_text(f"""
[known.our-norm-eps]
where = {{ subject = "transformers", dtype = "{dtype}" }}
releases = "=={transformers_release()}"
reason = "a planted bug, accepted here to show the file works"
source = "https://ci.example/decisions/9"
""", encoding="utf-8")
        return str(path)
    argv = ["logits", "--model", str(models["tiny-gqa/meta"]), "--dtypes", "float32", "--attn", "eager", "--tp", "1",
            "--shapes", "1x16", "--inputs", "random", "--no-localise", "--plant", "norm-eps"]
    assert main([*argv, "--out", str(tmp_path / "other"), "--known", known("bfloat16")]) == 1
    assert main([*argv, "--out", str(tmp_path / "accepted"), "--known", known("float32")]) == 0
    s = json.loads((tmp_path / "accepted" / "summary.json").read_text())
    assert s["policy"]["user_known"]["unused"] == []
    assert [f["accepted_by"] for f in s["findings"] if f["status"] == "known"] == [known("float32")]
