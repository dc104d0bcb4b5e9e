#!/usr/bin/env bash
# The transformers version matrix, one release at a time.
#
#   scripts/matrix.sh run [ROOT]     every suite with this python's transformers -> ROOT/transformers-X.Y.Z/
#   scripts/matrix.sh merge [ROOT]   merge ROOT/*/ into ROOT/matrix.csv + ROOT/matrix.md
#   scripts/matrix.sh all [ROOT]     run in each of /work/venv431 ... (VENVS=...), then merge
#
# PYTHON picks the interpreter (default: python). MATRIX_PYTEST=0 leaves out the test suite,
# MATRIX_SLICE=1 adds the mp suite on the Llama-2-7B-shaped slice (minutes, ~8 GB).
# A suite that fails a cell exits 1; the other suites still run, and the worst code is returned.
set -uo pipefail
cd "$(dirname "$0")/.."
cmd=${1:-run}; root=${2:-reports/matrix}
PY=${PYTHON:-python}

run() {
    local ver out worst=0 code
    ver=$("$PY" -c "import transformers; print(transformers.__version__)") || exit 2
    out="$root/transformers-$ver"
    rm -rf "$out"; mkdir -p "$out"
    step() {   # name, command...: run, keep its exit code and wall time
        local name=$1; shift
        local t0=$SECONDS
        "$@" > "$out/$name.log" 2>&1; code=$?
        echo "$name exit=$code seconds=$((SECONDS - t0))" | tee -a "$out/steps.txt"
        (( code > worst )) && worst=$code
    }
    step logits "$PY" -m harness logits --shapes 1x16,2x64 --no-progress --out "$out/logits"
    step tokenizer "$PY" -m harness tokenizer --no-progress --out "$out/tokenizer"
    step behaviour "$PY" -m harness behaviour --out "$out/behaviour"
    step axes "$PY" -m harness axes --out "$out/axes"
    why=$("$PY" -c "from harness.suites.bench.run import lmeval_unsupported; print(lmeval_unsupported())")
    if [[ -z $why ]]; then
        step bench "$PY" -m harness bench --limit 40 --out "$out/bench"
    else   # recorded with the reason, never silently left out
        echo "bench n/a: $why" | tee -a "$out/steps.txt"
    fi
    step mp "$PY" -m harness mp --degrees 1,2 --shapes 1x64 --out "$out/mp"
    step mp-mha "$PY" -m harness mp --model "$("$PY" -c 'from harness.core.presets import cached; print(cached("tiny-mha"))')" \
        --degrees 1,2,4 --shapes 1x64 --out "$out/mp-mha"
    if [[ -f models/tiny-llama2/params.json || -f models/tiny-llama2/config.json ]]; then
        step mp-trained "$PY" -m harness mp --model models/tiny-llama2 --degrees 1,2 --shapes 1x64 --out "$out/mp-trained"
    fi
    if [[ ${MATRIX_SLICE:-0} == 1 ]]; then
        step mp-slice7b "$PY" -m harness mp --model "$("$PY" -c 'from harness.core.presets import cached; print(cached("slice-7b"))')" \
            --degrees 1,2,4,8 --shapes 1x32 --out "$out/mp-slice7b"
    fi
    if [[ ${MATRIX_PYTEST:-1} == 1 ]]; then
        step pytest "$PY" -m pytest -q -p no:cacheprovider --junitxml "$out/pytest.xml" \
            --deselect tests/test_logits_gate.py::test_llama2_7b_shaped_slice
    fi
    return $worst
}

case $cmd in
    run) run ;;
    merge) "$PY" -m harness.results.matrix --root "$root" ;;
    all)
        worst=0
        for venv in ${VENVS:-/work/venv /work/venv446 /work/venv448 /work/venv438 /work/venv431}; do
            PY=$venv/bin/python run; code=$?; (( code > worst )) && worst=$code
        done
        "$PY" -m harness.results.matrix --root "$root"; exit $worst ;;
    *) echo "usage: scripts/matrix.sh run|merge|all [ROOT]" >&2; exit 2 ;;
esac
