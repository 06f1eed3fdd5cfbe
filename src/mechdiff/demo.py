"""The offline demo: the whole study (RQ1 -> RQ2 -> RQ3 -> RQ4, :func:`run_study`) on a culture-like
and a math-like planted pair built from the real SmolLM2 weights, then the two side by side.

- ``planted-cultural``: an extended tokenizer and a rank-2 change planted in layers 20/22/24 that fires
  on culture prompts (expected: divergence enters at 20, a good linear map, a small minimal k, few
  changed heads);
- ``planted-cognitive``: small changes to 60 attention heads spread over 20 layers (expected: many
  changed heads, no small k).

Prompt counts are small so that both studies and the comparison finish in a few minutes on 2 CPU
cores; the numbers carry their uncertainty in the reports.
"""
from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console

from mechdiff.artifacts import new_run_dir

console = Console()
PAIRS = ("planted-cultural", "planted-cognitive")


def demo_config(pair: str, quick: bool = False) -> dict[str, dict]:
    """Per-stage options of the demo for ``pair`` (``quick``: fewer prompts, for CI smoke runs).
    planted-cognitive's own math set has 16 prompts, so its splits are cut to fit."""
    cognitive = pair == "planted-cognitive"
    # RQ1 patches eleven layers, dense where the planted cultural change starts (the entry rule needs
    # layers on both sides of it); quick leaves out the behaviour table, RQ2's side effects and RQ3's MC
    layers = [2, 6, 10, 14, 18, 19, 20, 22, 24, 26, 28]
    cfg = {
        # cognitive: RQ1 selects layers on half of the 16 math prompts; the later stages evaluate on the rest
        "rq1": dict(n_prompts=8 if cognitive else 16, layers=layers, n_perm=8, behaviour=not quick, behaviour_n=4,
                    max_new_tokens=8),
        "mapped-patch": dict(sites=["resid_post"], solvers=["procrustes_scaled"], mapped_alpha=["0.5", "1.0", "auto"],
                             n_train=12 if cognitive else 24, n_val=4 if cognitive else 8,
                             side_effects=not quick, side_n=4),
        "steer": dict(ks=[1, 2] if quick else [1, 2, 3], steer_alpha=[1.0, 2.0], bases=["diff"], modes=["steer", "ablate"],
                      n_fit=8 if cognitive else 16, n_dev=3 if cognitive else 4, n_test=5 if cognitive else 8,
                      n_neutral=4, n_mc=0 if quick else 4, transfer_lang=None),
        "heads": dict(n_prompts=4 if quick else 6, ablations=["zero"], top_k=4),
        "tokens": dict(n_prompts=4 if quick else 8, max_new_tokens=8 if quick else 16, n_neutral=2 if quick else 4,
                       top_n=10),
        # quick: RQ2 / RQ3 read over the tuned model's responses only
        "response": dict(responders=["tuned"] if quick else ["tuned", "base"]),
    }
    return cfg


def demo_plan(quick: bool) -> list[tuple[str, dict]]:
    """(stage name, option overrides) in the order the demo runs them on planted-cultural."""
    return list(demo_config("planted-cultural", quick).items())


def run_demo(out: str | Path | None = None, device: str | None = None, quick: bool = False) -> Path:
    """Run the demo; returns its directory (one run directory per pair and ``compare/``)."""
    from mechdiff.compare import compare_runs
    from mechdiff.experiments.study import run_study
    from mechdiff.models.planted import load_planted
    from mechdiff.pairs import load_pair
    from mechdiff.report.summary import terminal_summary
    t0 = time.perf_counter()
    root = Path(out) if out else new_run_dir("runs", "demo")
    runs = []
    for name in PAIRS:
        t = time.perf_counter()
        pair = load_pair(name)
        console.print(f"[bold]mechdiff demo[/] on {pair.name}: {pair.description}")
        base, tuned, truth = load_planted(name, device=device or "cpu")
        facts = [f"layers {truth.get('layers')}"] + [f"{what} {v}" for what, v in (
            ("heads changed:", len(truth.get("heads") or [])), ("rank", truth.get("rank")),
            ("new tokens:", len(truth.get("new_tokens") or []))) if v]
        console.print("planted ground truth: " + ", ".join(facts), markup=False, highlight=False)
        run = run_study(pair, demo_config(name, quick), out=root / name, device=device or "cpu",
                        models=(base, tuned), batch_size=32)
        runs.append(run.path)
        console.print(terminal_summary(run.path), markup=False, highlight=False)
        console.print(f"{name} done in {time.perf_counter() - t:.0f}s")
    cmp = compare_runs(runs, out=root / "compare")
    console.print(f"total {time.perf_counter() - t0:.0f}s; reports:", markup=False, highlight=False)
    for p in runs:
        console.print(f"  {(p / 'report.html').resolve()}", markup=False, highlight=False, soft_wrap=True)
    console.print(f"  {(cmp / 'compare.html').resolve()}", markup=False, highlight=False, soft_wrap=True)
    return root
