#!/usr/bin/env python
"""Time the offline demo end to end on the CPU (`make bench`): `mechdiff demo` in a fresh output
directory, torch limited to the cores given (default 2, the CI/laptop budget). Prints one line."""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    out = Path(tempfile.mkdtemp(prefix="mechdiff_demo_bench_"))
    shutil.rmtree(out)
    exe = Path(sys.executable).with_name("mechdiff")
    cmd = [str(exe) if exe.exists() else "mechdiff", "demo", "--out", str(out)] + (["--quick"] if args.quick else [])
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               CUDA_VISIBLE_DEVICES="")
    t = time.perf_counter()
    rc = subprocess.call(cmd, env=env)
    dt = time.perf_counter() - t
    print(f"mechdiff demo{' --quick' if args.quick else ''}: {dt:.1f} s wall on {args.threads} CPU threads, "
          f"exit code {rc}, results in {out}")
    sys.exit(rc)


if __name__ == "__main__":
    main()
