"""The Llama 2 parity harness: runs the reference and transformers side by side and judges them."""

import os

# MKL (torch's CPU BLAS) by default schedules a GEMM's work dynamically, so a process running beside
# this one can change how a reduction is split and so the last bits of a result. Measured (issue 21):
# the first float32 transformers cell of a default `train` run beside a `logits` run took a second,
# bit-identical set of values in 4 of 22 runs, failing the gradient gate and checkpointing's bitwise
# check. MKL's reproducibility mode keeps the ISA dispatch (AUTO) but fixes the scheduling and the
# reductions. Set before torch makes its first MKL call (MKL reads it then); a user's own value wins,
# and the environment block of every report records which one ran.
os.environ.setdefault("MKL_CBWR", "AUTO")
