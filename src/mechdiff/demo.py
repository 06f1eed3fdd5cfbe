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
from mechdiff.experiments import get_stage, run_stage
from mechdiff.models.planted import load_planted
from mechdiff.pairs import load_pair
from mechdiff.report import write_report

console = Console()


def demo_plan(quick: bool) -> list[tuple[str, dict]]:
    """(stage name, option overrides) in the order the demo runs them; each stage reads the layers
    the stages before it chose from the shared run directory."""
    n1, n_train, n_val = (32, 48, 16) if quick else (64, 128, 32)
    return [("rq1", dict(n_prompts=n1, behaviour_n=8 if quick else 16)),
            ("mapped-patch", dict(sites=["resid_post", "mlp_out"], solvers=["procrustes_scaled"],
                                  n_train=n_train, n_val=n_val, side_n=8 if quick else 16))]


def run_demo(out: str | Path | None = None, device: str | None = None, quick: bool = False) -> Path:
    """Run the demo; returns the run directory. ``quick`` uses fewer prompts (CI smoke runs)."""
    t0 = time.perf_counter()
    path = Path(out) if out else new_run_dir("runs", "demo")
    pair = load_pair("planted-cultural")
    console.print(f"[bold]mechdiff demo[/] on {pair.name}: {pair.description}")
    base, tuned, truth = load_planted("planted-cultural", device=device or "cpu")
    console.print(f"planted ground truth: layers {truth['layers']}, rank {truth['rank']}, "
                  f"{len(truth.get('new_tokens', []))} new tokens")
    for name, overrides in demo_plan(quick):
        t = time.perf_counter()
        stage = get_stage(name)
        run_stage(name, pair, stage.options(**overrides), out=path, models=(base, tuned), batch_size=32)
        console.print(f"{name} done in {time.perf_counter() - t:.0f}s")
    if (path / "rq2_summary.txt").is_file():
        console.print((path / "rq2_summary.txt").read_text(encoding="utf-8"))
    html, _ = write_report(path)
    console.print(f"total {time.perf_counter() - t0:.0f}s; report: {Path(html).resolve()}")
    return path
