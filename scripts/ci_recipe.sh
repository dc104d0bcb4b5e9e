#!/usr/bin/env bash
# The CI recipe of docs/ci.md, as one script the GitHub Actions workflow and the GitLab CI job call
# (tests/test_ci_recipe.py runs it on the embedded model, so the recipe a user copies is tested).
#
#   scripts/ci_recipe.sh key                 the baseline's cache key: model fingerprint + transformers
#   scripts/ci_recipe.sh baseline DIR        run the suites into DIR, once: a DIR that holds results is kept
#   scripts/ci_recipe.sh check BASELINE OUT  run the suites into OUT/current, then `compare` against
#                                            BASELINE into OUT/compare (report/junit.xml, report/index.html)
#
# Settings, from the environment:
#   LLAMA_PARITY     the command (default: llama-parity; e.g. "python -m harness")
#   PYTHON           the interpreter the harness is installed in, for `key` (default: python)
#   MODEL            model folder (default: the embedded model)
#   SUITES           suites to run, space separated (default: logits)
#   SUITE_ARGS       more arguments for every suite run (e.g. "--dtypes float32 --shapes 1x16")
#
# Exit code of `check`: 0 when the current run and the comparison both pass; 1 when either fails
# (a new finding, a cell over its tolerance, a cell that moved beyond the regression policy); 2 or
# 3 (bad input, a harness bug) when any step says so. Every step runs, so the reports are complete.
set -uo pipefail

read -r -a LP <<< "${LLAMA_PARITY:-llama-parity}"
read -r -a SUITE_LIST <<< "${SUITES:-logits}"
read -r -a EXTRA <<< "${SUITE_ARGS:-}"
MODEL_ARGS=()
[[ -n "${MODEL:-}" ]] && MODEL_ARGS=(--model "$MODEL")

worst=0
keep() {      # the most severe exit code wins: 3 (harness bug) > 2 (bad input) > 1 (fail) > 0
    local code=$1
    if (( code > worst )); then worst=$code; fi
}

run_suites() {    # OUT [ARGS]: each suite into OUT/<suite>
    local out=$1 suite
    shift
    for suite in "${SUITE_LIST[@]}"; do
        "${LP[@]}" "$suite" "${MODEL_ARGS[@]}" "${EXTRA[@]}" "$@" --out "$out/$suite"      # progress bars are drawn only on a terminal
        keep $?
    done
}

case "${1:-}" in
    key)
        "${PYTHON:-python}" - "${MODEL:-}" <<'EOF'
import sys
import transformers
from harness.core.checkpoints import open_model
from harness.core.store import fingerprint
model = open_model(sys.argv[1] or None)
print(f"llama-parity-baseline-{fingerprint(model.fingerprint())[:16]}-transformers-{transformers.__version__}")
EOF
        exit $?
        ;;
    baseline)
        dir=${2:?usage: ci_recipe.sh baseline DIR}
        if compgen -G "$dir/*/summary.json" > /dev/null; then
            echo "baseline: $dir holds results already (restored from the cache): kept"
            exit 0
        fi
        run_suites "$dir"
        # a baseline that is not clean is kept anyway: compare then fails only on what moves from it
        (( worst >= 2 )) && { echo "baseline: a step ended in exit $worst; no baseline written" >&2; rm -rf "$dir"; exit $worst; }
        exit 0
        ;;
    check)
        base=${2:?usage: ci_recipe.sh check BASELINE OUT}
        out=${3:?usage: ci_recipe.sh check BASELINE OUT}
        run_suites "$out/current" --html      # its own verdict and JUnit too: a new finding fails the job
        "${LP[@]}" compare --baseline "$base" --current "$out/current" --html --out "$out/compare"
        keep $?
        echo "ci_recipe: exit $worst (reports: $out/current, $out/compare/report/index.html, $out/compare/report/junit.xml)"
        exit $worst
        ;;
    *)
        echo "usage: ci_recipe.sh key | baseline DIR | check BASELINE OUT" >&2
        exit 2
        ;;
esac
