"""The whole study in one run directory: RQ1 -> RQ2 (maps + mapped patching) -> RQ3 -> RQ4.

``run_study(pair, config, stages, out)`` loads both models once, checks every stage's options before
any model work, runs the registered stages in study order through one :class:`Study` (each reads what
the stages before it wrote: RQ2-RQ4 use the layers RQ1 chose unless the config names others), writes
the effective configuration into the manifest (``"study"``), ``run_config.toml`` and ``RUN.md`` (the
exact commands to reproduce) and the report. Rerunning into the same ``out`` resumes (finished steps
are skipped); a different configuration for a stage that already ran there is refused up front.

A run config is TOML with one table per stage (keys are the stage's option names, as in
``mechdiff STAGE --help``)::

    [rq1]
    n_prompts = 64
    [mapped-patch]
    mapped_alpha = [0.5, 1.0, "auto"]
    [steer]
    ks = [1, 2, 4]

Python::

    from mechdiff.experiments.study import run_study
    run = run_study("planted-cultural", {"rq1": {"n_prompts": 32}}, out="runs/mine")
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from mechdiff.artifacts import RunDir, new_run_dir
from mechdiff.atomic import atomic_write_text, to_jsonable
from mechdiff.checks import check_against_models, check_option_counts, check_out_dir
from mechdiff.errors import ConfigError
from mechdiff.manifest import check_resume
from mechdiff.experiments.common import open_models, target_prompts
from mechdiff.experiments.stage import (STAGES, _forget_options, check_common, get_stage, open_study,
                                        resolve_batch_size, run_stage, study_order)
from mechdiff.experiments.study_config import (config_toml, default_stages, read_config, stage_command,
                                               stage_options, study_stages)
from mechdiff.pairs import load_pair
from mechdiff.report import write_report
from mechdiff.scale import distributed as dp

CONFIG_NAME = "run_config.toml"
RUN_MD = "RUN.md"

__all__ = ["run_study", "study_stages", "read_config", "stage_options", "default_stages", "stage_command",
           "config_toml"]


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------- commands
def _pair_args(pair) -> list[str]:
    src = getattr(pair, "source", None) or ""
    if src.startswith("builtin:"):
        return ["--pair", src.split(":", 1)[1]]
    if src:
        return ["--pair", str(Path(src).resolve())]
    return ["--base", str(pair.base), "--tuned", str(pair.tuned)]


def _common_args(out: Path, *, device, dtype, batch_size, seed, prompts, max_rows=None) -> list[str]:
    args = ["--out", str(out.resolve()), "--seed", str(seed), "--batch-size", str(batch_size)]
    if max_rows is not None:
        args += ["--max-rows", str(max_rows)]
    if prompts:
        args += ["--prompts", str(Path(prompts).resolve())]
    if device:
        args += ["--device", device]
    if dtype:
        args += ["--dtype", dtype]
    return args


def _run_md(run: RunDir, command: list[str], stage_cmds: list[list[str]], options: Mapping, history: list[dict],
            seconds: Mapping[str, float]) -> str:
    fence = "```"
    lines = ["# How to reproduce this run", "",
             "Rerunning a command into this directory resumes it (finished steps are skipped); the models,",
             "the seed and each stage's options must match what is recorded in manifest.json.", "",
             "## The whole study", "", f"{fence}bash", shlex.join(command), fence, "",
             f"The effective configuration, every option of every stage (`{CONFIG_NAME}` beside this file):", "",
             f"{fence}toml", config_toml(options).rstrip(), fence, "",
             "## Stage by stage (the same options)", "", f"{fence}bash", *[shlex.join(c) for c in stage_cmds], fence, "",
             "## Rebuild the report from the artifacts alone", "", f"{fence}bash",
             shlex.join(["mechdiff", "report", str(run.path.resolve())]), fence, "",
             "## Python", "", f"{fence}python", "from mechdiff.experiments.study import run_study",
             *(["from mechdiff.pairs import pair_from_specs"] if "--pair" not in command else []),
             f"run_study({_py_pair(command)}, config={str(run.file(CONFIG_NAME).resolve())!r}, "
             f"stages={list(options)!r}, out={str(run.path.resolve())!r})", fence, ""]
    if seconds:
        lines += ["## Stage times (this invocation)", "", "| stage | seconds |", "|---|---|"]
        lines += [f"| {k} | {v:.1f} |" for k, v in seconds.items()] + [""]
    if history:
        lines += ["## Invocations in this directory", ""]
        lines += [f"- {h['time']}: `{h['command']}`" for h in history] + [""]
    return "\n".join(lines)


def _py_pair(command: list[str]) -> str:
    if "--pair" in command:
        return repr(command[command.index("--pair") + 1])
    return (f"pair_from_specs({command[command.index('--base') + 1]!r}, "
            f"{command[command.index('--tuned') + 1]!r})")


# ---------------------------------------------------------------------------------- resume check
def _check_resume(out: Path, options: Mapping[str, Any], seed: int, pair, prompts: str | None) -> None:
    """Refuse, before any model work, a run directory that the one resume rule
    (:func:`mechdiff.manifest.check_resume`) refuses for what is known before the models load: the
    pair, the seed, each stage's options (as ``open_run`` records them)."""
    m = RunDir(out, create=False).read_manifest() if (out / "manifest.json").is_file() else None
    check_resume(out, m, {"pair": pair.to_dict(), "seeds": {"seed": seed},
                          "options": {name: {**dataclasses.asdict(opts), "seed": seed, "prompts": prompts}
                                      for name, opts in options.items()}})


# ---------------------------------------------------------------------------------- run
def run_study(pair: "Any", config: "str | os.PathLike | Mapping | None" = None,
              stages: "Sequence[str] | str | None" = None, out: "str | os.PathLike | None" = None, *,
              device: str | None = None, dtype: str | None = None, batch_size: int | None = None, seed: int = 0,
              prompts: "str | os.PathLike | None" = None, models=None,
              log: Callable[[str], None] | None = None, max_rows: int | None = None) -> RunDir:
    """Run the study's stages in order in one run directory and return it (see the module doc).

    pair: a :class:`~mechdiff.pairs.Pair` or a built-in name / pair TOML path. config: a TOML path or
    ``{stage: {option: value}}``. stages: names or a comma list (default: every registered stage of
    rq1, mapped-patch, steer, heads: :func:`default_stages`). models: already loaded ``(base, tuned)``.
    """
    log = log or _log
    names = study_stages(stages)
    cfg = read_config(config)
    options = stage_options(cfg, names)
    check_common(device=device, batch_size=batch_size, max_rows=max_rows)
    check_out_dir(out)
    pair = load_pair(pair) if isinstance(pair, (str, os.PathLike)) else pair
    check_config_tables(cfg)                           # every table, also of stages not run now
    for name in names:                                 # everything but layer ranges, before the models load
        check_stage_options(name, options[name])
    rows = target_prompts(pair, str(prompts) if prompts else None)   # a bad prompt file fails here
    path = Path(out) if out is not None else dp.from_rank0(lambda: new_run_dir("runs", "study"))
    path = dp.private_dir(path)     # under torchrun: ranks other than 0 write a private copy
    _check_resume(path, options, seed, pair, str(prompts) if prompts else None)
    base, tuned = models or open_models(pair, device, dtype)        # prints a line per model
    n_layers = min(base.n_layers, tuned.n_layers)
    for name in names:                                 # layer ranges, before anything is written
        check_stage_options(name, options[name], n_layers)
        check_against_models(options[name], pair, base, tuned)
    prompts_s = str(prompts) if prompts else None
    batch_size = resolve_batch_size(batch_size, (base, tuned), rows)
    first = get_stage(names[0])
    recorded = _recorded_options(path)
    study = open_study(pair, first, options[names[0]], out=path, device=device, dtype=dtype, batch_size=batch_size,
                       seed=seed, prompts=prompts_s, models=(base, tuned), max_rows=max_rows)
    run = study.run
    pair_args = _pair_args(pair)
    common = _common_args(run.path, device=device, dtype=dtype, batch_size=batch_size, seed=seed, prompts=prompts_s,
                          max_rows=max_rows)
    every = _with_recorded(run, options)            # stages run here before (e.g. --stages subsets) and now
    command = ["mechdiff", "run", *pair_args, "--config", str(run.file(CONFIG_NAME).resolve()),
               "--stages", ",".join(every), *common]
    stage_cmds = [stage_command(n, every[n], pair_args + common) for n in every]
    atomic_write_text(run.file(CONFIG_NAME), config_toml(every, "mechdiff run configuration (effective: "
                                                                "defaults with the given config on top)\n"
                                                                "reproduce: " + shlex.join(command)))
    history = _record(run, list(every), every, command, config)
    seconds: dict[str, float] = {}
    atomic_write_text(run.file(RUN_MD), _run_md(run, command, stage_cmds, every, history, seconds))
    for i, name in enumerate(names):
        t0 = time.perf_counter()
        log(f"[{i + 1}/{len(names)}] {name}: {get_stage(name).help}")
        try:
            run_stage(name, pair, options[name], study=study)
        except BaseException:    # the failed stage's options must not block the corrected rerun
            _forget_options(run, name, recorded.get(name))
            raise
        seconds[name] = time.perf_counter() - t0
        log(f"[{i + 1}/{len(names)}] {name} done in {seconds[name]:.0f}s")
    atomic_write_text(run.file(RUN_MD), _run_md(run, command, stage_cmds, every, history, seconds))
    write_report(run.path)
    return run


def _recorded_options(path: Path) -> dict:
    """The per-stage options recorded in ``path``'s manifest before this invocation ({} if none)."""
    m = RunDir(path, create=False).read_manifest() if (path / "manifest.json").is_file() else None
    return dict((m or {}).get("options") or {})


def check_stage_options(name: str, opts: Any, n_layers: int = 10 ** 9) -> None:
    """A stage's option checks (counts, then the stage's own; layer ranges when ``n_layers`` is known),
    with the stage named: run config values have no command-line flag of their own."""
    st = get_stage(name)
    try:
        check_option_counts(opts)
        if st.check is not None:
            st.check(opts, n_layers)
    except ConfigError as e:
        raise ConfigError(f"[{name}] {e}") from None


def check_config_tables(cfg: Mapping[str, Mapping]) -> None:
    """Check the option values of every table of a run config (before any model loads)."""
    present = [n if n in STAGES else n.replace("_", "-") for n in cfg]
    for name, opts in stage_options(cfg, present).items():
        check_stage_options(name, opts)


def _with_recorded(run: RunDir, options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` plus the options of stages an earlier ``run_study`` recorded in this directory, in
    study order (so RUN.md and run_config.toml reproduce the whole directory, not the last subset)."""
    recorded = ((run.read_manifest() or {}).get("study") or {}).get("config") or {}
    merged: dict[str, Any] = {}
    for name, values in recorded.items():
        if name in options:
            continue
        try:
            merged.update(stage_options({name: values}, [name]))
        except ConfigError:                          # a stage whose options changed since: left out
            continue
    merged.update(options)
    return {n: merged[n] for n in study_order(merged)}


def _record(run: RunDir, names: list[str], options: Mapping, command: list[str], config) -> list[dict]:
    """The effective configuration into the manifest (``"study"``), with the history of invocations."""
    m = run.read_manifest() or {}
    prev = m.get("study") or {}
    history = list(prev.get("history") or [])
    history.append({"time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                    "command": shlex.join(command), "argv": shlex.join(sys.argv)})
    m["study"] = to_jsonable({"stages": names, "config": {n: dataclasses.asdict(o) for n, o in options.items()},
                              "config_file": None if config is None or isinstance(config, Mapping) else
                              str(Path(config).resolve()),
                              "command": shlex.join(command), "history": history})
    run.write_manifest(m)
    return history
