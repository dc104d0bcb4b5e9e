"""MKL's code branch (conditional numerical reproducibility), asked and set through MKL's own service
calls in the torch library, so that what a summary records is what MKL runs, not an environment
variable it may have read too late.

Why a command pins it (issue 21, measured on the project's 2-core CPU): the first float32
transformers cell of a default `train` run started beside another harness process took a second
set of gradients, bit-identical from run to run, about 15x further from the float64 oracle (q
and k worst), in 4 of 22 runs: it failed the gradient gate and checkpointing's bitwise check. MKL's
reproducibility mode on its default ISA branch (AUTO: fixed scheduling and reductions) did not
remove it (2 of 8 runs failed); the COMPATIBLE branch (SSE2, no approximate reciprocals) did
(0 of 63: 51 with MKL_CBWR set, 12 with the pin below). The op behind it was not named:
MKL_VERBOSE shows only SGEMM and SGEMM_BATCH calls in that cell. COMPATIBLE costs matrix-multiply
speed (about 4x in float32 on this CPU: ``benchmarks/mkl_branch.py``), so only `train` pins it; a
user's own MKL_CBWR always wins (set empty, MKL_CBWR= keeps MKL's default branch, OFF).
"""
from __future__ import annotations

import ctypes
import os
from functools import lru_cache

# mkl_service.h's branch codes (MKL_CBWR_BRANCH asks for the branch alone)
ASK_BRANCH = 1
BRANCHES = {0: "OFF", 1: "OFF", 2: "AUTO", 3: "COMPATIBLE", 4: "SSE2", 6: "SSSE3", 7: "SSE4_1", 8: "SSE4_2",
            9: "AVX", 10: "AVX2", 12: "AVX512", 14: "AVX512_E1", 15: "AVX512_E2", 16: "AVX512_E3",
            17: "AVX512_E4", 18: "AVX512_E5"}
CODES = {name: code for code, name in BRANCHES.items() if code > 1}
TOO_LATE = -8           # MKL_CBWR_ERR_MODE_CHANGE_FAILURE: MKL already ran in this process
_pinned: list[str] = []  # what pin() did in this process, for the environment block


@lru_cache(maxsize=1)
def _service():
    """MKL's cbwr get/set from torch's CPU library, or None (a torch built without MKL: ARM, macOS)."""
    import torch
    path = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
    try:
        lib = ctypes.CDLL(path)
        get, put = lib.mkl_serv_cbwr_get, lib.mkl_serv_cbwr_set
    except (OSError, AttributeError):
        return None
    for f in (get, put):
        f.restype, f.argtypes = ctypes.c_int, [ctypes.c_int]
    return get, put


def branch() -> str | None:
    """The branch MKL runs (or will run) in this process: OFF, AUTO, COMPATIBLE, ...; None without MKL."""
    service = _service()
    if service is None:
        return None
    code = service[0](ASK_BRANCH)
    return BRANCHES.get(code, str(code))


def pin(wanted: str) -> str:
    """Put MKL on ``wanted``'s branch unless the user chose one (MKL_CBWR); what happened, in words."""
    service = _service()
    if "MKL_CBWR" in os.environ:        # set empty: MKL's own default branch, OFF
        said = f"{branch()} (MKL_CBWR={os.environ['MKL_CBWR']}, the caller's)"
    elif service is None:
        said = "no MKL in this torch build"
    else:
        code = service[1](CODES[wanted])
        said = (f"{wanted} (pinned by the harness)" if code == 0 else
                f"{branch()} (not pinned to {wanted}: MKL had already run in this process)" if code == TOO_LATE else
                f"{branch()} (not pinned: MKL refused {wanted}, code {code})")
    _pinned[:] = [said]
    return said


def describe() -> str | None:
    """The environment block's line: the branch MKL runs and, when a command pinned it, how."""
    return _pinned[0] if _pinned else branch()
