"""Glue shared by the experiment runners: pairs, models, prompts, run directories."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from mechdiff.artifacts import RunDir, new_run_dir
from mechdiff.atomic import to_jsonable
from mechdiff.manifest import build_manifest, check_resume
from mechdiff.errors import ConfigError, DataError
from mechdiff.models.load import LoadedModel, load_model
from mechdiff.pairs import DatasetRef, Pair, load_pair, pair_from_specs


# Model info that may change between a run and its resume without changing results.
# The content hash keys the cached steps instead (RunDir.inputs): a changed model recomputes, not refuses.
VOLATILE_INFO = {"load_seconds", "device", "device_map", "content_hash"}


def resolve_pair(pair: str | None, base: str | None, tuned: str | None) -> Pair:
    """`--pair NAME|FILE` or `--base SPEC --tuned SPEC` (exactly one of the two forms)."""
    if pair and (base or tuned):
        raise ConfigError("give either --pair or --base/--tuned, not both")
    if pair:
        return load_pair(pair)
    if base and tuned:
        return pair_from_specs(base, tuned)
    raise ConfigError("name the models to compare: --pair NAME|FILE (see `mechdiff pairs`) "
                      "or --base SPEC --tuned SPEC")


def open_models(pair: Pair, device: str | None = None, dtype: str | None = None
                ) -> tuple[LoadedModel, LoadedModel]:
    """Load both sides of ``pair`` (dtype: the option, else the pair's)."""
    import sys
    import time
    from mechdiff.scale.distributed import init
    init()      # under torchrun: join the process group first (one GPU per process)
    kw = dict(dtype=dtype or pair.dtype, device=None if pair.device_map else device,
              device_map=pair.device_map, trust_remote_code=pair.trust_remote_code)
    from mechdiff.models.load import check_adapter_path
    for spec in (pair.base, pair.tuned):      # a missing adapter path fails before either model loads
        check_adapter_path(spec.adapter)
    out = []
    for side, spec in (("base", pair.base), ("tuned", pair.tuned)):
        t0 = time.perf_counter()
        print(f"loading {side} model {spec} ...", file=sys.stderr, flush=True)
        if pair.max_memory:       # shared, or per side (the two models on disjoint GPUs)
            from mechdiff.scale.devices import side_memory
            kw["max_memory"] = side_memory(pair.max_memory, side)
        m = load_model(spec, **kw)
        print(f"loaded {side} model in {time.perf_counter() - t0:.1f}s ({m.n_layers} layers, d={m.d_model}, "
              f"{m.info.get('dtype')}, {m.info.get('device')})", file=sys.stderr, flush=True)
        out.append(m)
    return out[0], out[1]


def open_run(out: str | Path | None, stage: str, pair: Pair, sides: dict[str, LoadedModel],
             seeds: dict, options: Any) -> RunDir:
    """Create (or resume) the run directory and write/check its manifest.

    Options are kept per stage (``options[stage]``), so several stages (rq1, maps, mapped-patch)
    can share one run directory. Resuming follows the one rule, :func:`mechdiff.manifest.check_resume`:
    the same pair, models and seeds, and for a stage that already ran the same options
    (``RESUME_SAFE_OPTIONS`` such as batch_size may differ).
    """
    from mechdiff.scale import distributed as dp
    path = Path(out) if out else dp.from_rank0(lambda: new_run_dir("runs", stage))
    path = dp.private_dir(path)      # under torchrun: ranks other than 0 write a private copy
    path.mkdir(parents=True, exist_ok=True)
    run = RunDir(path)
    run.inputs = {side: m.info.get("content_hash") for side, m in sides.items()}
    opts = to_jsonable(dataclasses.asdict(options) if dataclasses.is_dataclass(options) else dict(options))
    old = run.read_manifest()
    models = {k: {kk: vv for kk, vv in v.info.items() if kk not in VOLATILE_INFO} for k, v in sides.items()}
    manifest = build_manifest(pair=pair.to_dict(), models=models, seeds=seeds, options={stage: opts})
    check_resume(path, old, manifest)
    manifest["options"] = {**dict((old or {}).get("options", {})), stage: opts}
    if old is None:
        run.write_manifest(manifest)
    else:
        old["options"] = manifest["options"]
        old.setdefault("resumes", []).append({"time": manifest["created"], "stage": stage,
                                              "command": manifest["command"]})
        run.write_manifest(old)
    return run


def load_dataset_ref(ref: DatasetRef) -> list[dict]:
    """Prompts (list of dicts with at least "id" and "text") for one dataset entry of a pair."""
    from mechdiff.data import datasets as ds
    from mechdiff.data.prompts import load_jsonl
    if ref.builtin:
        if ref.builtin.startswith("planted/"):
            from mechdiff.models.planted import prompt_split
            cat = ref.builtin.split("/", 1)[1]
            rows = [{"id": f"planted-{cat}-{i}", "text": t, "category": cat}
                    for i, t in enumerate(prompt_split(cat))]
        else:
            rows = ds.load_prompt_set(ref.builtin)
    elif ref.path:
        rows = load_jsonl(ref.local_path())
    else:
        loaders = {"kk": ds.load_kk_socio_cultural_mc, "gsm8k": ds.load_gsm8k, "math": ds.load_math}
        key = next((k for k in loaders if k in ref.name.lower() or k in (ref.hub or "").lower()), None)
        if key is None:
            raise DataError(f"no loader for dataset {ref.name!r} ({ref.hub}); give a local JSONL file "
                            f"with --prompts")
        rows = loaders[key](ref.hub)
    return rows[: ref.n] if ref.n else rows


def target_prompts(pair: Pair, path: str | None = None) -> list[dict]:
    """The prompt set a stage runs on: --prompts FILE, else the pair's first dataset, else the
    shipped cultural set."""
    from mechdiff.data import datasets as ds
    from mechdiff.data.prompts import load_jsonl
    if path:
        return load_jsonl(path)
    if pair.datasets:
        return load_dataset_ref(next(iter(pair.datasets.values())))
    return ds.load_prompt_set("cultural")


def prepare_testbed(force: bool = False) -> list[str]:
    """De-quantise the offline models and build the planted pairs; returns lines to print."""
    from mechdiff.models.planted import build_planted
    from mechdiff.models.testbed import ensure_testbed
    lines = []
    for name in ("smollm2-135m", "gemma3-270m"):
        lines.append(f"{name}: {ensure_testbed(name, force=force)}")
    for name in ("planted-cultural", "planted-cognitive"):
        lines.append(f"{name}: {build_planted(name, force=force)}")
    return lines
