"""The offline demo: the whole pipeline on the planted-cultural pair (real SmolLM2 weights, a planted
rank-2 change in layers 20/22/24 and an extended tokenizer), in one run directory.

RQ1 (fairness, CKA, layer patching, behaviour) picks the layers; RQ2 fits maps there and runs the
mapped-patching alpha-sweep with side effects and controls; one report covers it all.
"""
from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console

from mechdiff.artifacts import new_run_dir
from mechdiff.experiments.rq1 import RQ1Options, run_rq1
from mechdiff.experiments.rq2 import RQ2Options, run_mapped_patch
from mechdiff.models.planted import load_planted
from mechdiff.pairs import load_pair
from mechdiff.report import write_report

console = Console()


def run_demo(out: str | Path | None = None, device: str | None = None, quick: bool = False) -> Path:
    """Run the demo; returns the run directory. ``quick`` uses fewer prompts (CI smoke runs)."""
    t0 = time.perf_counter()
    path = Path(out) if out else new_run_dir("runs", "demo")
    pair = load_pair("planted-cultural")
    console.print(f"[bold]mechdiff demo[/] on {pair.name}: {pair.description}")
    base, tuned, truth = load_planted("planted-cultural", device=device or "cpu")
    console.print(f"planted ground truth: layers {truth['layers']}, rank {truth['rank']}, "
                  f"{len(truth.get('new_tokens', []))} new tokens")
    n1, n_train, n_val = (32, 48, 16) if quick else (64, 128, 32)
    t = time.perf_counter()
    run_rq1(pair, RQ1Options(n_prompts=n1, behaviour_n=8 if quick else 16, batch_size=32),
            out=path, models=(base, tuned))
    rq1 = (path / "rq1.json")
    console.print(f"RQ1 done in {time.perf_counter() - t:.0f}s -> {rq1}")
    t = time.perf_counter()
    run_mapped_patch(pair, RQ2Options(sites=["resid_post", "mlp_out"], solvers=["procrustes_scaled"],
                                      n_train=n_train, n_val=n_val, side_n=8 if quick else 16,
                                      batch_size=32),
                     out=path, models=(base, tuned))
    console.print(f"RQ2 done in {time.perf_counter() - t:.0f}s -> {path / 'rq2_summary.txt'}")
    console.print((path / "rq2_summary.txt").read_text(encoding="utf-8"))
    html, _ = write_report(path)
    console.print(f"total {time.perf_counter() - t0:.0f}s; report: {html}")
    return path
