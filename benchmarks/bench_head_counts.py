#!/usr/bin/env python
"""The changed-head count on planted-cognitive over every layer (270 heads, 60 planted): the known answer
of issue 24 that the CPU suite checks on 3 layers only (tests/test_rq4.py).

    python benchmarks/bench_head_counts.py                 # cuda if available, 16 prompts
    python benchmarks/bench_head_counts.py --prompts 48 --layers 0-29 --device cpu

Prints one markdown row: layers, prompts, heads, true share, BH count (FDR 0.05) with its interval,
Storey's share, AUROC and precision at the true count against chance, the swap count beside, seconds.
Acceptance (issue 24): AUROC >= 0.9 and the estimated share within 25% of 60/270.
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch

from mechdiff.experiments import run_stage
from mechdiff.models.planted import load_planted
from mechdiff.pairs import load_pair


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--layers", default="0-29")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    lo, hi = (int(x) for x in a.layers.split("-"))
    base, tuned, _ = load_planted("planted-cognitive", device=a.device)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        run = run_stage("heads", load_pair("planted-cognitive"), out=out, models=(base, tuned),
                        layers=list(range(lo, hi + 1)), n_prompts=a.prompts, ablations=[], swaps=["swap", "own"],
                        attribution="grad_x_act", importance="attribution", top_k=4)
        rq4 = run.read_json("rq4.json")
    secs = time.perf_counter() - t0
    own, swap, rec = rq4["churn"]["own"], rq4["churn"]["swap"], rq4["planted"]["own"]
    iv = own["share_interval"]
    print("| layers | prompts | heads | true share | BH share [95%] | Storey | AUROC | precision@true (chance) "
          "| swap BH share | s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {lo}-{hi} | {rq4['headline']['prompts']} | {own['n_heads']} | {rec['true_share']:.1%} | "
          f"{own['share']:.1%} [{iv['ci_low']:.1%}, {iv['ci_high']:.1%}] | {own['share_storey']:.1%} | "
          f"{rec['auroc']:.3f} | {rec['precision_at_true_count']:.2f} ({rec['precision_chance']:.2f}) | "
          f"{swap['share']:.1%} | {secs:.0f} |")


if __name__ == "__main__":
    main()
