"""The `mechdiff` command line. Parsing only: every command calls an experiments/ runner."""
from __future__ import annotations

import dataclasses
import inspect
import typing
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mechdiff.errors import ConfigError, MechdiffError
from mechdiff.options import flag_of, kind_of, parse_value, renamed_error

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Fair, causal diffing of a base language model against its fine-tunes.")
# Every message may hold user text (paths, option values, names): printed without markup, never
# hard-wrapped (a pipe gets whole lines), see _say / _error.
console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)
OutOpt = typer.Option(None, "--out", help="run directory (default: a new one under runs/); rerun to resume")
DeviceOpt = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")


def _say(text: str) -> None:
    """One line on stdout, user text shown as written (no rich markup, no highlighting)."""
    console.print(str(text), markup=False, highlight=False)


def _error(text: str) -> None:
    """``error: TEXT`` on stderr; TEXT is escaped, so square brackets in it are shown as written."""
    err_console.print(f"[bold red]error:[/] {escape(str(text))}", highlight=False)


def _run(fn, *args, **kwargs):
    """Call a runner; turn mechdiff errors into a one-line message on stderr and exit code 2."""
    try:
        return fn(*args, **kwargs)
    except MechdiffError as e:
        _error(str(e))
        raise typer.Exit(2)
    except KeyboardInterrupt:
        err_console.print("interrupted; rerun the same command to resume", markup=False, highlight=False)
        raise typer.Exit(130)
    except OSError as e:       # a file that cannot be written or read (read-only --out, full disk, ...)
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        _error(f"{e.strerror or e}{where}; check the path and its permissions (finished steps are kept: rerun "
               "the same command to resume)")
        raise typer.Exit(2)
    except (MemoryError, RuntimeError) as e:     # torch.OutOfMemoryError is a RuntimeError
        if not _out_of_memory(e):
            raise
        _error(f"out of memory ({str(e).splitlines()[0][:160]}); rerun the same command with a smaller "
               "--batch-size (finished steps are kept and skipped), or fewer prompts / layers")
        raise typer.Exit(2)


def _out_of_memory(e: BaseException) -> bool:
    """A device or host allocation failure (CUDA, MPS, or the CPU allocator)."""
    import torch
    if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
        return True
    msg = str(e).lower()
    return "out of memory" in msg or "can't allocate memory" in msg


# ---- stage commands, built from the registry ----------------------------------------------
def _cli_param(f: dataclasses.Field, hint) -> tuple[inspect.Parameter, Callable[[Any], Any]]:
    """A typer parameter for one options field and the converter from its command-line text to the
    field's value (:func:`mechdiff.options.parse_value`, the run config's parser too)."""
    flag = flag_of(f)
    hyphenated = "--" + f.name.replace("_", "-")
    names = [flag] + ([hyphenated] if hyphenated != flag else []) + (["--" + f.name] if f.name == "min_shared_ratio"
                                                                     else [])
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    kind, _ = kind_of(f, hint)
    help_ = f.metadata.get("help", "")
    if kind.metavar == "BOOLEAN":
        option = typer.Option(default, f"{flag}/--no-{flag[2:]}", help=help_)
        return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=bool), bool
    text = None if default is None else ",".join(str(x) for x in default) if isinstance(default, list) else str(default)
    option = typer.Option(text or None, *names, help=help_, metavar=kind.metavar, show_default=bool(text))

    def conv(v, f=f, hint=hint, flag=flag):
        try:
            return parse_value(f, hint, v)
        except ConfigError as e:
            raise ConfigError(f"{flag}: {e}") from None
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option,
                             annotation=Optional[str]), conv


def _renamed_params(cls) -> list[tuple[inspect.Parameter, Callable[[Any], Any]]]:
    """Hidden parameters for the former spellings of ``cls``'s options (``opt(was=...)``): given, they
    are an error that names the new flag."""
    out = []
    for f in dataclasses.fields(cls):
        for old in f.metadata.get("was", ()):
            def conv(v, f=f, old=old):
                if v is not None:
                    raise renamed_error(f, "--" + old.replace("_", "-"))
            out.append((inspect.Parameter(f"was_{f.name}_{old}", inspect.Parameter.KEYWORD_ONLY,
                                          default=typer.Option(None, "--" + old.replace("_", "-"), hidden=True),
                                          annotation=Optional[str]), conv))
    return out


def _fields(cls) -> list[tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls) if not f.name.startswith("_")]


def _done_line(message: str, path: Path) -> str:
    """A stage's done message with its "(file, file, ...)" list cut to the files this run holds."""
    text = message.format(path=path)
    head, sep, listed = text.rpartition("(")
    if not sep or not listed.endswith(")"):
        return text
    names = [n.strip() for n in listed[:-1].split(",") if n.strip()]
    there = [n for n in names if (Path(path) / n).exists()]
    return f"{head}({', '.join(there)})" if there else head.rstrip()


def _stage_command(stage) -> None:
    from mechdiff.experiments.stage import Common
    common = [_cli_param(f, h) for f, h in _fields(Common)]
    own = [_cli_param(f, h) for f, h in _fields(stage.options)]
    renamed = _renamed_params(stage.options)
    convs = {p.name: c for p, c in common + own + renamed}
    own_names = [p.name for p, _ in own]

    def command(**kw) -> None:
        from mechdiff.experiments.common import resolve_pair
        from mechdiff.experiments.stage import run_stage
        vals = _run(lambda: {k: convs[k](v) for k, v in kw.items()})
        opts = _run(stage.options, **{k: vals[k] for k in own_names})
        pair = _run(resolve_pair, vals["pair"], vals["base"], vals["tuned"])
        run = _run(run_stage, stage.name, pair, opts, out=vals["out"], device=vals["device"],
                   dtype=vals["dtype"], batch_size=vals["batch_size"], seed=vals["seed"], prompts=vals["prompts"],
                   trust_remote_code=vals["trust_remote_code"], device_map=vals["device_map"],
                   max_memory=vals["max_memory"], max_rows=vals["max_rows"])
        _say(_done_line(stage.done_message, run.path) if stage.done_message else f"{stage.name} done: {run.path}")

    command.__signature__ = inspect.Signature([p for p, _ in common + own + renamed])
    command.__doc__ = stage.help
    command.__name__ = stage.name.replace("-", "_")
    app.command(stage.name)(command)


@app.command()
def pairs(as_json: bool = typer.Option(False, "--json", help="one JSON list of the pairs")) -> None:
    """List the built-in pairs (a table on a terminal; one pair per line in a pipe)."""
    import json
    import sys
    from mechdiff.pairs import list_pairs, load_pair
    rows = [{"name": n, "domain": p.domain, "base": str(p.base), "tuned": str(p.tuned),
             "tokenizer_policy": p.tokenizer_policy} for n, p in ((n, load_pair(n)) for n in list_pairs())]
    if as_json:
        typer.echo(json.dumps(rows, indent=1))
    elif not sys.stdout.isatty():
        for r in rows:
            typer.echo("\t".join(r.values()))
    else:
        table = Table()
        for col in ("name", "domain", "base", "tuned", "tokenizer policy"):
            table.add_column(col, overflow="fold")
        for r in rows:
            table.add_row(*(escape(v) for v in r.values()))
        console.print(table)


@app.command()
def report(run_dir: Path = typer.Argument(..., help="a run directory")) -> None:
    """(Re)write report.html and report.md for a run directory."""
    from mechdiff.checks import check_run_dir
    from mechdiff.report import write_report
    _run(check_run_dir, run_dir)
    html, md = _run(write_report, run_dir)
    _say(f"report: {html}  {md}")


def _study_command() -> None:
    """``mechdiff run``: the common options built from ``Common`` (as every stage command's), plus
    --config and --stages."""
    from mechdiff.experiments.stage import Common
    common = [_cli_param(f, h) for f, h in _fields(Common)]
    convs = {p.name: c for p, c in common}
    own = [inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path], default=typer.Option(
               None, "--config", help="TOML run config: one table per stage (rq1, mapped-patch, steer, heads, tokens, response) "
                                      "of option = value lines, the options of `mechdiff STAGE --help`")),
           inspect.Parameter("stages", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str], default=typer.Option(
               None, "--stages", help="comma list of stages (default: rq1, mapped-patch, steer, heads, tokens, response; "
                                      "those registered)"))]

    def run_cmd(config: Optional[Path] = None, stages: Optional[str] = None, **kw) -> None:
        from mechdiff.experiments.common import resolve_pair
        from mechdiff.experiments.study import run_study
        from mechdiff.report.summary import terminal_summary
        v = _run(lambda: {k: convs[k](x) for k, x in kw.items()})
        the_pair = _run(resolve_pair, v["pair"], v["base"], v["tuned"])
        the_pair = _run(the_pair.with_command_line, trust_remote_code=v["trust_remote_code"],
                        device_map=v["device_map"], max_memory=v["max_memory"])
        run = _run(run_study, the_pair, config, stages, v["out"], device=v["device"], dtype=v["dtype"],
                   batch_size=v["batch_size"], seed=v["seed"], prompts=v["prompts"], max_rows=v["max_rows"])
        console.print(terminal_summary(run.path), markup=False, highlight=False)

    run_cmd.__signature__ = inspect.Signature([p for p, _ in common] + own)
    run_cmd.__doc__ = ("The whole study in one run directory: RQ1 -> RQ2 (maps, mapped patching) -> RQ3 -> RQ4 "
                       "-> tokens -> response, then the report.")
    app.command("run")(run_cmd)


@app.command()
def compare(run_dirs: list[Path] = typer.Argument(..., help="two or more run directories"),
            out: Optional[Path] = typer.Option(None, "--out", help="output directory (default: a new runs/compare-*)")) -> None:
    """Two or more runs side by side: overlaid figures and one table -> compare.html / .md / .json."""
    from mechdiff.compare import compare_runs
    path = _run(compare_runs, run_dirs, out)
    console.print(f"compare: {(path / 'compare.html').resolve()}  {(path / 'compare.md').resolve()}", markup=False,
                  highlight=False)


@app.command()
def serve(run_dirs: list[Path] = typer.Argument(..., help="one or more run directories"),
          port: int = typer.Option(8765, "--port", help="TCP port"),
          host: str = typer.Option("127.0.0.1", "--host", help="address to bind (default: this machine only)"),
          device: str = typer.Option("cpu", "--device", help="where the live panel's models run (cpu, cuda ...)")) -> None:
    """An explorer in the browser: headlines and Figures A-D, per-token texts, live prompts with handles."""
    from mechdiff.serve import make_app, run_app
    app_ = _run(make_app, run_dirs, device=device, hosts=[host])
    console.print(f"mechdiff serve: http://{host}:{port}/  (Ctrl-C stops)", markup=False, highlight=False)
    run_app(app_, host, port)


@app.command()
def sweep(pairs: str = typer.Option(..., "--pairs", help="comma list of pairs (built-in names or TOML files)"),
          stages: Optional[str] = typer.Option(None, "--stages", help="comma list of stages (default: the whole study)"),
          address: Optional[str] = typer.Option(None, "--address", help="an existing Ray cluster (ray://HOST:10001 "
                                                "or HOST:6379); default: a local Ray on this machine"),
          out: Optional[Path] = typer.Option(None, "--out", help="sweep directory: one run directory per pair "
                                             "and compare/ (default: a new runs/sweep-*); rerun to resume"),
          config: Optional[Path] = typer.Option(None, "--config", help="TOML run config for every pair's study"),
          device: Optional[str] = DeviceOpt,
          dtype: Optional[str] = typer.Option(None, "--dtype", help="float32 | bfloat16 | float16 (default: each pair's)"),
          batch_size: Optional[int] = typer.Option(None, "--batch-size", help="prompts per forward pass"),
          max_rows: Optional[int] = typer.Option(None, "--max-rows", help="most rows in one patching-engine pass "
                                                 "(default: from the free GPU memory, 2048 on CPU)"),
          seed: int = typer.Option(0, "--seed", help="random seed"),
          prompts: Optional[str] = typer.Option(None, "--prompts", help="JSONL prompt file for every pair")) -> None:
    """Many pairs as Ray tasks (one GPU each where there are GPUs), each a resumable study, then compare."""
    from mechdiff.experiments.sweep import sweep as run_sweep
    path = _run(run_sweep, pairs, stages, out, address=address, config=config, device=device, dtype=dtype,
                batch_size=batch_size, seed=seed, prompts=prompts, max_rows=max_rows)
    console.print(f"sweep done: {path.resolve()} (compare: {(path / 'compare').resolve()})", markup=False,
                  highlight=False)


@app.command()
def finetune(task: str = typer.Argument(..., help="math | culture | a ladder name (culture-l20-r1, -r2, -r4, "
                                                   "-r8, math-attn-4) | ladder (all five)"),
             out: Optional[Path] = OutOpt, device: Optional[str] = DeviceOpt,
             base: Optional[str] = typer.Option(None, "--base", help="base model spec (default: smollm2-135m)"),
             seed: int = typer.Option(0, "--seed"),
             smoke: bool = typer.Option(False, "--smoke", help="a few steps on a tiny random model (CPU check)"),
             max_steps: Optional[int] = typer.Option(None, "--max-steps", help="stop after this many steps"),
             evaluate: bool = typer.Option(True, "--evaluate/--no-evaluate", help="base vs tuned evaluation")) -> None:
    """Train a LoRA fine-tune of the base (the testbed's math or culture recipe, or a known-answer ladder
    adapter on the CPU) and write its card."""
    from mechdiff.finetune import finetune as run_finetune
    card = _run(run_finetune, task, out, base=base, seed=seed, smoke=smoke, device=device,
                evaluate=evaluate, max_steps=max_steps)
    _say(f"finetune done: {card.get('headline') or ', '.join(card)}")


@app.command()
def testbed(force: bool = typer.Option(False, "--force", help="rebuild even if cached")) -> None:
    """De-quantise the offline models and build the planted pairs into the cache."""
    from mechdiff.experiments.common import prepare_testbed
    for line in _run(prepare_testbed, force=force):
        _say(line)


@app.command()
def demo(out: Optional[Path] = OutOpt, device: Optional[str] = DeviceOpt,
         quick: bool = typer.Option(False, "--quick", help="fewer prompts (for CI smoke runs)")) -> None:
    """The whole study offline on planted-cultural and planted-cognitive, then the comparison."""
    from mechdiff.demo import run_demo
    path = _run(run_demo, out=out, device=device, quick=quick)
    console.print(f"demo done: results in {path.resolve()}", markup=False, highlight=False, soft_wrap=True)


def _register_stages() -> None:
    """One command per registered stage (:mod:`mechdiff.experiments.registry`), in study order."""
    from mechdiff.experiments import STAGES, study_order
    _study_command()
    for name in study_order():
        _stage_command(STAGES[name])


def _start() -> None:
    """Register the stage commands (imports torch and the stages: the slow part of start-up); Ctrl-C
    meanwhile is one line and exit 130, not a traceback."""
    import sys
    try:
        _register_stages()
    except KeyboardInterrupt:
        print("interrupted during start-up; nothing was run", file=sys.stderr, flush=True)
        sys.exit(130)


_start()

if __name__ == "__main__":  # pragma: no cover
    app()
