"""Many pairs at once: each pair's whole study is one Ray task, then one ``compare`` over them.

::

    mechdiff sweep --pairs cultural,cognitive,my-pair.toml --stages rq1,steer --out runs/sweep
    mechdiff sweep --pairs ... --address ray://head-node:10001     # an existing Ray cluster

Each task runs :func:`mechdiff.experiments.study.run_study` into ``OUT/<pair name>`` (a resumable
run directory: rerun the same command and finished steps are skipped), with one GPU when the cluster
has GPUs (Ray sets ``CUDA_VISIBLE_DEVICES``), else one CPU. Without ``--address`` a local Ray starts
on this machine. When every task is done, ``compare`` writes ``OUT/compare``. Ray is imported only
here, when a sweep runs. (It lived in ``mechdiff.scale.sweep`` before: it is stage glue, it runs
studies.) (``pip install ray`` or the ``dev`` extra).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from mechdiff.artifacts import new_run_dir
from mechdiff.checks import check_count, check_device, check_out_dir
from mechdiff.compare import compare_runs
from mechdiff.errors import ConfigError, MechdiffError
from mechdiff.experiments.study import run_study, study_stages
from mechdiff.experiments.study_config import read_config, stage_options
from mechdiff.names import RESERVED, path_component
from mechdiff.pairs import load_pair


def _run_one(pair: str, out: str, stages, config, device, dtype, batch_size, seed, prompts, max_rows) -> str:
    """One study (runs inside a Ray worker); returns its run directory."""
    run = run_study(pair, config, stages, out, device=device, dtype=dtype, batch_size=batch_size, seed=seed,
                    prompts=prompts, max_rows=max_rows)
    return str(run.path)


def _inside(root: Path, name: str) -> Path:
    """``root/name``, checked to stay inside ``root`` (``name`` is already one safe component)."""
    path = (root / name).resolve()
    if path.parent != root.resolve():
        raise ConfigError(f"pair name {name!r} does not name a directory inside {root}")
    return path


def _pair_list(pairs: "Sequence[str] | str") -> list[str]:
    items = [p.strip() for p in (pairs.split(",") if isinstance(pairs, str) else pairs) if p and p.strip()]
    if not items:
        raise ConfigError("--pairs is empty; name two or more pairs (built-in names or TOML files), e.g. "
                          "--pairs cultural,cognitive")
    return items


def sweep(pairs: "Sequence[str] | str", stages: "Sequence[str] | str | None" = None,
          out: "str | os.PathLike | None" = None, *, address: str | None = None,
          config: "str | os.PathLike | dict | None" = None, device: str | None = None, dtype: str | None = None,
          batch_size: int | None = None, seed: int = 0, prompts: "str | os.PathLike | None" = None,
          num_cpus: int | None = None, gpus_per_task: float | None = None, max_rows: int | None = None) -> Path:
    """Run every pair's study as a Ray task into ``out/<pair name>``, then ``compare`` them into
    ``out/compare``; returns ``out``. address: an existing Ray cluster (``ray://host:10001`` or
    ``host:6379``; None: a local Ray). gpus_per_task: default 1 when the cluster has GPUs, else 0.
    A pair that fails is reported by name after the others finish (MechdiffError); the compare covers
    the pairs that finished when at least two did."""

    items = _pair_list(pairs)
    names = [path_component(load_pair(p).name, "pair name") for p in items]   # fails before Ray starts
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"--pairs names pair(s) {dup} more than once; each pair gets one run directory")
    clash = sorted(set(names) & RESERVED)
    if clash:
        raise ConfigError(f"pair name(s) {clash} would clash with the sweep's own {clash[0]}/ directory; "
                          "rename the pair (its `name` key)")
    chosen = study_stages(stages)                      # unknown stage names fail here too
    stage_options(read_config(config), chosen)         # a missing or bad --config too
    check_device(device)
    check_count(batch_size, "--batch-size")
    check_count(max_rows, "--max-rows")
    check_out_dir(out)
    if prompts and not Path(prompts).is_file():
        raise ConfigError(f"--prompts {prompts}: no such file")
    try:
        import ray
    except ImportError:
        raise ConfigError("mechdiff sweep needs Ray: pip install 'ray>=2.40' (or the dev extra)") from None
    root = Path(out) if out is not None else new_run_dir("runs", "sweep")
    root.mkdir(parents=True, exist_ok=True)
    started = False
    if not ray.is_initialized():
        kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True}
        if address:
            kw["address"] = address
        elif num_cpus is not None:
            kw["num_cpus"] = int(num_cpus)
        try:
            ray.init(**kw)
        except Exception as e:  # noqa: BLE001  (ConnectionError, ValueError, ...)
            raise ConfigError(f"could not start or reach Ray{' at ' + address if address else ''}: "
                              f"{type(e).__name__}: {e}; check --address (ray://HOST:10001 or HOST:6379)") from e
        started = True
    try:
        if gpus_per_task is None:
            gpus_per_task = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        task = ray.remote(num_gpus=gpus_per_task, num_cpus=1, max_retries=0)(_run_one)
        cfg = str(config) if isinstance(config, (str, os.PathLike)) else config
        refs = {name: task.remote(p, str(_inside(root, name)), stages, cfg, device, dtype, batch_size, seed,
                                  str(prompts) if prompts else None, max_rows)
                for p, name in zip(items, names)}
        done, failed = {}, {}
        for name, ref in refs.items():
            try:
                done[name] = ray.get(ref)
            except Exception as e:  # noqa: BLE001  (RayTaskError wraps the task's own error)
                cause = getattr(e, "cause", None) or e
                failed[name] = f"{type(cause).__name__}: {cause}"
    finally:
        if started:
            ray.shutdown()
    if len(done) >= 2:
        compare_runs([done[n] for n in names if n in done], root / "compare", labels=[n for n in names if n in done])
    if failed:
        shown = "; ".join(f"{n}: {m.splitlines()[0] if m else m}" for n, m in failed.items())
        raise MechdiffError(f"{len(failed)} of {len(names)} pair(s) failed ({shown}); the others are in {root}; "
                            "fix and rerun the same command to resume")
    return root
