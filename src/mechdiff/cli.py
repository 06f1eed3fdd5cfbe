"""The `mechdiff` command line. Parsing only: every command calls an experiments/ runner."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from mechdiff.errors import MechdiffError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Fair, causal diffing of a base language model against its fine-tunes.")
console = Console()

PairOpt = typer.Option(None, "--pair", help="built-in pair name (see `mechdiff pairs`) or a pair TOML file")
BaseOpt = typer.Option(None, "--base", help="base model spec: hub id[@revision], local dir, .gguf, testbed name")
TunedOpt = typer.Option(None, "--tuned", help="tuned model spec (same forms as --base)")
OutOpt = typer.Option(None, "--out", help="run directory (default: a new one under runs/); rerun to resume")
DeviceOpt = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
DtypeOpt = typer.Option(None, "--dtype", help="float32 | bfloat16 | float16 (default: the pair's, auto)")
BatchOpt = typer.Option(32, "--batch-size", help="prompts per forward pass")
SeedOpt = typer.Option(0, "--seed")
PromptsOpt = typer.Option(None, "--prompts", help="JSONL prompt file (default: the pair's prompt set)")


def _ints(text: Optional[str]) -> Optional[list[int]]:
    return None if not text else [int(x) for x in text.replace(" ", "").split(",") if x]


def _run(fn, *args, **kwargs):
    """Call a runner; turn mechdiff errors into a one-line message and exit code 2."""
    try:
        return fn(*args, **kwargs)
    except MechdiffError as e:
        console.print(f"[bold red]error:[/] {e}")
        raise typer.Exit(2)


@app.command()
def pairs() -> None:
    """List the built-in pairs."""
    from mechdiff.pairs import list_pairs, load_pair
    table = Table()
    for col in ("name", "domain", "base", "tuned", "tokenizer policy"):
        table.add_column(col, overflow="fold")
    for name in list_pairs():
        p = load_pair(name)
        table.add_row(name, p.domain, str(p.base), str(p.tuned), p.tokenizer_policy)
    console.print(table)


@app.command()
def rq1(pair: Optional[str] = PairOpt, base: Optional[str] = BaseOpt, tuned: Optional[str] = TunedOpt,
        out: Optional[Path] = OutOpt, device: Optional[str] = DeviceOpt, dtype: Optional[str] = DtypeOpt,
        batch_size: int = BatchOpt, seed: int = SeedOpt, prompts: Optional[Path] = PromptsOpt,
        n_prompts: int = typer.Option(150, "--n-prompts", help="prompts used (after the fairness filter)"),
        stride: int = typer.Option(2, "--stride", help="CKA every STRIDE layers"),
        site: str = typer.Option("resid_post", "--site", help="resid_post | attn_out | mlp_out"),
        min_shared_ratio: float = typer.Option(1.0, "--min-shared-ratio", "--min_shared_ratio",
                                               help="keep prompts with at least this fraction of tokens "
                                                    "in the shared vocabulary (1.0 strict)"),
        layers: Optional[str] = typer.Option(None, "--layers", help="patch only these layers, e.g. 10,20,24"),
        all_positions: bool = typer.Option(False, "--all-positions",
                                           help="also patch every position (needs identical tokenisation)"),
        standardise: bool = typer.Option(False, "--standardise",
                                         help="standardise source / de-standardise into the destination "
                                              "with a calibration batch before patching"),
        behaviour: bool = typer.Option(True, "--behaviour/--no-behaviour", help="behaviour table"),
        ) -> None:
    """RQ1: fairness report, CKA per layer (debiased, CI, null), cross-model layer patching, behaviour."""
    from mechdiff.experiments.common import resolve_pair
    from mechdiff.experiments.rq1 import RQ1Options, run_rq1
    opts = RQ1Options(n_prompts=n_prompts, stride=stride, site=site, min_shared_ratio=min_shared_ratio,
                      layers=_ints(layers), all_positions=all_positions, standardise=standardise,
                      behaviour=behaviour, batch_size=batch_size, seed=seed,
                      prompts=str(prompts) if prompts else None)
    p = _run(resolve_pair, pair, base, tuned)
    run = _run(run_rq1, p, opts, out=out, device=device, dtype=dtype)
    console.print(f"RQ1 done: {run.path}  (rq1.json, figures/, report.html)")


@app.command()
def maps(pair: Optional[str] = PairOpt, base: Optional[str] = BaseOpt, tuned: Optional[str] = TunedOpt,
         out: Optional[Path] = OutOpt, device: Optional[str] = DeviceOpt, dtype: Optional[str] = DtypeOpt,
         batch_size: int = BatchOpt, seed: int = SeedOpt, prompts: Optional[Path] = PromptsOpt,
         layers: Optional[str] = typer.Option(None, "--layers", help="layers (default: RQ1's choice or the pair's)"),
         sites: str = typer.Option("resid_post", "--sites", help="comma list of resid_post,attn_out,mlp_out"),
         solvers: str = typer.Option("ridge,procrustes,procrustes_scaled", "--solvers",
                                     help="ridge, procrustes, pca_procrustes, procrustes_scaled, logit_subspace"),
         shrink: float = typer.Option(0.05, "--shrink", help="whitening shrinkage for procrustes_scaled"),
         n_train: int = typer.Option(450, "--n-train"), n_val: int = typer.Option(150, "--n-val"),
         k_positions: int = typer.Option(1, "--k-positions", help="1 = last content token; K>1 = K per prompt"),
         ) -> None:
    """RQ2: fit transport maps base -> tuned and score them on held-out prompts."""
    from mechdiff.experiments.common import resolve_pair
    from mechdiff.experiments.rq2 import RQ2Options, run_maps
    opts = RQ2Options(layers=_ints(layers), sites=sites.split(","), solvers=solvers.split(","), shrink=shrink,
                      n_train=n_train, n_val=n_val, k_positions=k_positions, batch_size=batch_size,
                      seed=seed, prompts=str(prompts) if prompts else None)
    p = _run(resolve_pair, pair, base, tuned)
    run = _run(run_maps, p, opts, out=out, device=device, dtype=dtype)
    console.print(f"maps done: {run.path}  (maps.json, maps/, figures/)")


@app.command("mapped-patch")
def mapped_patch(pair: Optional[str] = PairOpt, base: Optional[str] = BaseOpt, tuned: Optional[str] = TunedOpt,
                 out: Optional[Path] = OutOpt, device: Optional[str] = DeviceOpt,
                 dtype: Optional[str] = DtypeOpt, batch_size: int = BatchOpt, seed: int = SeedOpt,
                 prompts: Optional[Path] = PromptsOpt,
                 layers: Optional[str] = typer.Option(None, "--layers"),
                 sites: str = typer.Option("resid_post,attn_out,mlp_out", "--sites"),
                 solver: str = typer.Option("procrustes_scaled", "--solver"),
                 shrink: float = typer.Option(0.05, "--shrink"),
                 alphas: str = typer.Option("0.3,0.5,0.7,1.0,auto", "--alpha", "--alphas",
                                            help="alpha values (comma list) or 'auto'"),
                 control_layer: Optional[int] = typer.Option(None, "--control-layer",
                                                             help="early layer for the bogus-map control"),
                 n_train: int = typer.Option(450, "--n-train"), n_val: int = typer.Option(150, "--n-val"),
                 side_effects: bool = typer.Option(True, "--side-effects/--no-side-effects"),
                 ) -> None:
    """RQ2: mapped patching and the alpha-sweep on the val split, side effects, controls, summary."""
    from mechdiff.experiments.common import resolve_pair
    from mechdiff.experiments.rq2 import RQ2Options, run_mapped_patch
    opts = RQ2Options(layers=_ints(layers), sites=sites.split(","), solvers=[solver], shrink=shrink,
                      n_train=n_train, n_val=n_val, alphas=alphas.split(","), control_layer=control_layer,
                      side_effects=side_effects, batch_size=batch_size, seed=seed,
                      prompts=str(prompts) if prompts else None)
    p = _run(resolve_pair, pair, base, tuned)
    run = _run(run_mapped_patch, p, opts, out=out, device=device, dtype=dtype)
    console.print(f"mapped patching done: {run.path}  (alpha_sweep.json, rq2_summary.txt, figures/)")


@app.command()
def report(run_dir: Path = typer.Argument(..., help="a run directory")) -> None:
    """(Re)write report.html and report.md for a run directory."""
    from mechdiff.report import write_report
    html, md = _run(write_report, run_dir)
    console.print(f"report: {html}  {md}")


@app.command()
def testbed(force: bool = typer.Option(False, "--force", help="rebuild even if cached")) -> None:
    """De-quantise the offline models and build the planted pairs into the cache."""
    from mechdiff.experiments.common import prepare_testbed
    for line in _run(prepare_testbed, force=force):
        console.print(line)


@app.command()
def demo(out: Optional[Path] = OutOpt, device: Optional[str] = DeviceOpt,
         quick: bool = typer.Option(False, "--quick", help="fewer prompts (for CI smoke runs)")) -> None:
    """Run the offline demo on planted-cultural: RQ1, maps, mapped patching, report."""
    from mechdiff.demo import run_demo
    path = _run(run_demo, out=out, device=device, quick=quick)
    console.print(f"demo done: results in {path}  (open {path}/report.html)")


if __name__ == "__main__":  # pragma: no cover
    app()
