#!/usr/bin/env python
"""Every GPU section of benchmarks/RESULTS.md in one process (one pair built once), in turn:

    PYTHONUNBUFFERED=1 OUT=/tmp/bench python benchmarks/bench_gpu.py      # Llama-3.1-8B-shaped pair, GPU
    python benchmarks/bench_gpu.py --tiny                                  # tiny config on CPU (dry run)
    python benchmarks/bench_gpu.py --sections capture,patch --reps 7       # a subset

A thin runner: each section lives in its own script, runnable alone, and this one calls their
``main()`` with one shared context (arguments, config, the pair):

  bench_capture.py  capture, capture_more
  bench_patch.py    patch, patch_more, mapped_engine
  bench_linalg.py   linalg, maps_detail          (no models)
  bench_stages.py   stages                       (--budget, --reserve, --full-study)
  bench_compare.py  compare                      (frees the tuned model; run it last)

Each section is guarded, so one failure does not lose the others. Output: markdown tables on
stdout; with $OUT (or --out) also $OUT/bench.log (everything), $OUT/results.md (tables),
$OUT/results.json and the profiles.
"""
from __future__ import annotations

import time

import bench_capture
import bench_compare
import bench_linalg
import bench_patch
import bench_stages
import common as C

MODULES = (bench_capture, bench_patch, bench_linalg, bench_stages, bench_compare)
ORDER = "capture,patch,linalg,maps_detail,patch_more,capture_more,mapped_engine,stages,compare"


def main(argv=None):
    where = {name: m for m in MODULES for name in m.SECTIONS}
    ap = C.parser(__doc__)
    ap.add_argument("--sections", default=ORDER, help=f"of {ORDER}")
    bench_stages.add_args(ap)
    args = ap.parse_args(argv)
    secs = args.sections.split(",")
    secs = sorted(secs, key=lambda s: ORDER.split(",").index(s) if s in where else -1)   # compare last
    bad = [s for s in secs if s not in where]
    if bad:
        ap.error(f"unknown section(s) {bad}; choose from {ORDER}")
    C.setup(args, "results")
    ctx = C.Ctx(args, secs)
    if any(where[s].SECTIONS[s].models for s in secs):
        ctx.pair()   # built once, before the first section, as before the split
    for s in secs:
        where[s].main(ctx=ctx, sections=[s])
    C.log(f"\nall done in {time.perf_counter() - C.T_START:.0f}s")
    C.flush_results()


if __name__ == "__main__":
    main()
