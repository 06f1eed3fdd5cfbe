"""The benchmark scripts import and their plumbing runs: a tiny CPU dry run of the cheapest sections
through the bench_gpu.py runner. In a subprocess, as the scripts run (from the repository root, with
benchmarks/ on the path), so that their global state (device, $OUT, warning filters) stays there."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import sys, torch
sys.path.insert(0, "benchmarks")
import common as C
import bench_capture, bench_compare, bench_exactness, bench_gpu, bench_linalg, bench_patch  # noqa: F401
import bench_defaults, bench_patching_cpu, bench_rq3, bench_rq4, bench_scale, bench_stages, bench_tokens  # noqa: F401
sections = {s for m in bench_gpu.MODULES for s in m.SECTIONS}
assert sections == set(bench_gpu.ORDER.split(",")), sections
bench_gpu.main(["--tiny", "--reps", "1", "--out", sys.argv[1], "--sections", "maps_detail,linalg,patch"])
assert not C.RESULTS.get("failures"), C.RESULTS.get("failures")
assert {"cka_s", "maps_detail", "patch"} <= set(C.RESULTS), sorted(C.RESULTS)
# the honest baseline computes the same logits as HF's own last-token forward
cfg = C.llama_config(True)
model, b = C.build_model(cfg, torch.float32), C.random_batch(3, 8, cfg.vocab_size, pad_max=2)
with torch.no_grad():
    a, h = C.honest_forward(model, b), C.hf_forward(model, b)[:, -1]
assert torch.allclose(a, h, atol=1e-5), (a - h).abs().max()
rows = bench_tokens.main(["--tiny", "--reps", "1", "--batch", "2", "--seq", "8", "--out", sys.argv[1]])
assert len(rows) == 3 and rows[2][1] is not None, rows
print("OK")
"""


def test_bench_scripts_import_and_dry_run(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")  # tiny: 1 thread
    env.pop("OUT", None)
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.rstrip().endswith("OK"), r.stdout[-3000:] + r.stderr[-3000:]
    assert "### Patching sweep" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "results.json").exists()
