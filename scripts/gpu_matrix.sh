#!/usr/bin/env bash
# The GPU part of the matrix, prepared and run by one script (about 10 minutes on one H100).
#
#   scripts/gpu_matrix.sh [OUT]      default OUT: reports/matrix-gpu/<gpu>-transformers-<version>
#
# Needs a CUDA torch and transformers already installed (bring your own; the CPU pin does not
# apply). Runs the logits suite at bfloat16/float16 with every attention implementation this
# release and card offer (flash_attention_2 only when flash_attn is installed; the suite records
# n/a with the reason otherwise), a real-text corpus run on the 7B-shaped slice, the axes suite (cast paths and flags, 4096 positions),
# placement across GPUs when there are two or more, the mp suite on CUDA (emulated ranks on one GPU, real
# NCCL ranks when the machine has as many GPUs as the degree), and the other implementations that
# run on CUDA against the same oracle (docs/subjects.md): torch.compile, bitsandbytes' CUDA kernels
# (NF4, the QLoRA base, LLM.int8()) when bitsandbytes is installed, and llama.cpp when
# llama-cpp-python was built with CUDA. Nothing here is needed by the CPU path.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 3)" || { echo "no CUDA device" >&2; exit 2; }
gpu=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '-'))")
ver=$("$PY" -c "import transformers; print(transformers.__version__)")
ngpu=$("$PY" -c "import torch; print(torch.cuda.device_count())")
out=${1:-reports/matrix-gpu/$gpu-transformers-$ver}
mkdir -p "$out"
worst=0
step() { local name=$1; shift; local t0=$SECONDS; timeout 300 "$@" > "$out/$name.log" 2>&1; local c=$?
         echo "$name exit=$c seconds=$((SECONDS - t0))" | tee -a "$out/steps.txt"; (( c > worst )) && worst=$c; }
slice=$("$PY" -c 'from harness.core.presets import cached; print(cached("slice-7b"))')
step logits "$PY" -m harness logits --device cuda --dtypes bfloat16,float16 \
    --attn eager,sdpa,flash_attention_2,flex_attention --tp 1,2 --shapes 1x128,4x2048 --no-progress --out "$out/logits"
# Real text on the 7B-shaped slice (Llama 2's width and 32000-piece vocabulary, so the Llama 2
# tokenizer fixture tokenizes the held-out corpus): 16 windows of 1024 tokens, every dtype and
# attention implementation, with the corpus table in its report.md.
step corpus-slice7b "$PY" -m harness logits --device cuda --model "$slice" --dtypes float32,bfloat16,float16 \
    --attn eager,sdpa,flash_attention_2 --tp 1 --inputs corpus,padded,cached --ctx 1024 --max-tokens 16384 \
    --no-progress --out "$out/corpus-slice7b"
step mp-slice7b "$PY" -m harness mp --device cuda --model "$slice" --degrees 1,2,4,8 \
    --dtypes float32,bfloat16,float16 --shapes 1x512 --out "$out/mp-slice7b"
step axes "$PY" -m harness axes --device cuda --dtypes bfloat16,float16 \
    --attn eager,sdpa,flash_attention_2,flex_attention --lengths 16,4096 --out "$out/axes"
# Other implementations on CUDA, judged as on the CPU: exact ones by the logits rule, lossy ones by
# their budgets with the error split. A kind whose package is absent is n/a with its install line.
subjects=(--subject transformers --subject transformers:compile=1 --subject bitsandbytes
          --subject bitsandbytes:quant=nf4,double=1,compute=bfloat16 --subject bitsandbytes:quant=int8)
if "$PY" -c "import llama_cpp, sys; sys.exit(0 if llama_cpp.llama_supports_gpu_offload() else 1)" 2>/dev/null; then
    subjects+=(--subject llama.cpp:quant=F32,kv=f32 --subject llama.cpp:quant=Q8_0 --subject llama.cpp:quant=Q4_0)
fi
step subjects "$PY" -m harness logits --device cuda --dtypes float32 --attn sdpa --tp 1 --inputs corpus,cached \
    "${subjects[@]}" --no-progress --out "$out/subjects"
if (( ngpu >= 2 )); then
    step place "$PY" -m harness place --device-map balanced --model "$slice" --dtype bfloat16 --out "$out/place"
fi
if (( ngpu >= 2 )); then
    step mp-real "$PY" -m harness mp --device cuda --ranks real --model "$slice" --degrees 2 \
        --dtypes bfloat16 --shapes 1x512 --out "$out/mp-real"
fi
exit $worst
