"""What content-keyed resume costs: sha256 of a weight file the first time, and the cached lookup.

    python benchmarks/resume_hash.py                 # a 1 GiB file in a temporary folder
    python benchmarks/resume_hash.py --gib 4 --dir /data/scratch

A resumed run keys its journal on each weight file's sha256 (harness/core/checkpoints.py
file_sha256), cached under the file's identity (device, inode, size, mtime, ctime), so a model is
read in full once and looked up afterwards. Prints both figures and the extrapolation to a 13 GB
Llama 2 7B checkpoint, and what keying on the installed transformers / tokenizers / sentencepiece
code (harness/core/environment.py code_sha256) costs per run. The first figure depends on the disk and page cache: the file is freshly
written here, so it is likely in the page cache (a cold disk is slower).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gib", type=float, default=1.0)
    p.add_argument("--dir", default=None)
    a = p.parse_args()
    with tempfile.TemporaryDirectory(dir=a.dir) as tmp:
        os.environ["LLAMA_PARITY_CACHE"] = str(Path(tmp) / "cache")    # a fresh hash cache
        from harness.core.checkpoints import file_sha256
        path = Path(tmp) / "consolidated.00.pth"
        block = os.urandom(64 << 20)
        with open(path, "wb") as f:
            for _ in range(max(1, round(a.gib * 16))):
                f.write(block)
        size = path.stat().st_size
        t = time.perf_counter()
        first = file_sha256(path)
        cold = time.perf_counter() - t
        t = time.perf_counter()
        for _ in range(100):
            assert file_sha256(path) == first
        cached = (time.perf_counter() - t) / 100
    from harness.core import environment
    environment._DIGESTS.clear()
    t = time.perf_counter()
    environment.code_sha256()
    code_first = time.perf_counter() - t
    t = time.perf_counter()
    environment.code_sha256()
    code_again = time.perf_counter() - t
    print(f"file: {size / 2**30:.2f} GiB")
    print(f"first hash: {cold:.2f} s ({size / cold / 1e9:.2f} GB/s)")
    print(f"cached lookup: {cached * 1e3:.2f} ms")
    print(f"13 GB checkpoint (Llama 2 7B), first run: about {13e9 / (size / cold):.0f} s; later runs: "
          f"{cached * 1e3 * 2:.1f} ms for its 2 files")
    print(f"installed code hash (transformers, tokenizers, sentencepiece): {code_first * 1e3:.0f} ms first, "
          f"{code_again * 1e3:.1f} ms again in the same process")


if __name__ == "__main__":
    main()
