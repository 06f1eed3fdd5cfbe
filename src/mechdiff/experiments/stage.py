"""The stage interface: a study context built once, stages in a registry.

A *stage* is one module, named as its stage (``experiments/rq1.py``, ``steer.py``, ...), that defines

- an options dataclass whose fields carry their help text in ``metadata["help"]`` (defaults are
  written once, there; the CLI builds its options from these fields),
- ``run(study, opts)``: the resumable steps (``study.run.cached``) that write the stage's artifacts,
- ``summarise(study, opts)``: the stage's summary JSON and figures from artifacts alone; returns its
  typed result (a dataclass, :mod:`mechdiff.experiments.results`), which ``run_stage`` saves,
- ``requires``: the stages whose results it reads (a study runs them first),
- ``report``: its :class:`~mechdiff.report.hooks.ReportHooks` (sentences, figures, section, numbers),

and lists its stages in ``STAGES``; :mod:`mechdiff.experiments.registry` names the stage modules
(one explicit list) and registers them. A stage from elsewhere (a plugin, a test) calls
:func:`register` itself. ``run_stage`` does check -> run -> summarise -> report, once, for every stage. :class:`Study` holds what every stage shares: the
pair, both loaded models, the run directory, the shared vocabulary, the fair prompt set, and the
common options (device, dtype, batch size, seed, prompt file). ``run_stage`` is the one entry
point the CLI, the demo, the benchmarks and the Python API go through::

    from mechdiff.experiments import run_stage
    run = run_stage("rq1", "planted-cultural", n_prompts=64)       # -> RunDir
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Sequence


from mechdiff.artifacts import RunDir
from mechdiff.batching import default_batch_size
from mechdiff.checks import check_against_models, check_device, check_option_counts, check_out_dir
from mechdiff.errors import ConfigError, DataError
from mechdiff.experiments.common import open_models, open_run, target_prompts
from mechdiff.experiments.results import save_result
from mechdiff.fairness import filter_prompts, shared_vocab
from mechdiff.models.load import LoadedModel
from mechdiff.options import check_values, opt  # noqa: F401  (opt: the stage modules' import)
from mechdiff.pairs import Pair, load_pair
from mechdiff.report import write_report
from mechdiff.report.hooks import ReportHooks
from mechdiff.report.hooks import register as register_report
from mechdiff.report.hooks import unregister as unregister_report
from mechdiff.texts.divergence import id_space

SIDES = ("base", "tuned")


@dataclass
class Common:
    """Options every stage takes (one spelling each on the command line)."""

    pair: str | None = opt(None, "built-in pair name (see `mechdiff pairs`) or a pair TOML file")
    base: str | None = opt(None, "base model spec: hub id[@revision], local dir, .gguf, testbed name")
    tuned: str | None = opt(None, "tuned model spec (same forms as --base)")
    out: str | None = opt(None, "run directory (default: a new one under runs/); rerun to resume")
    device: str | None = opt(None, "cpu, cuda, cuda:1 ... (default: cuda if available)")
    dtype: str | None = opt(None, "float32 | bfloat16 | float16 (default: the pair's, auto)")
    batch_size: int | None = opt(None, "prompts per forward pass (default: from the free GPU memory and the "
                                 "models' size; 32 on CPU)")
    max_rows: int | None = opt(None, "most rows in one patching-engine pass (reference + patched rows; default: "
                                     "from the free GPU memory, 2048 on CPU)")
    seed: int = opt(0, "random seed (splits, permutations, random controls)")
    prompts: str | None = opt(None, "JSONL prompt file (default: the pair's prompt set)")
    device_map: str | None = opt(None, "spread each model over this host's GPUs: auto | balanced | sequential, "
                                       "or module=GPU pairs, or a .json map (overrides the pair's)")
    max_memory: str | None = opt(None, "memory per device for --device-map auto/balanced, e.g. 0=70GiB,1=70GiB "
                                       "(base:0=..,tuned:1=.. per model)")
    trust_remote_code: bool = opt(False, "let transformers run code shipped in a model directory "
                                         "(off by default; only for models you trust)")


@dataclass
class Study:
    """What the stages of one study share. Built once by :func:`open_study`."""

    pair: Pair
    base: LoadedModel
    tuned: LoadedModel
    run: RunDir
    seed: int = 0
    batch_size: int = 32
    prompts_path: str | None = None
    #: rows per PatchEngine pass (None: :func:`mechdiff.batching.default_max_rows`)
    max_rows: int | None = None
    _fair: dict = field(default_factory=dict, repr=False)

    def side(self, name: str) -> LoadedModel:
        """``"base"`` or ``"tuned"``."""
        return {"base": self.base, "tuned": self.tuned}[name]

    @property
    def n_layers(self) -> int:
        """Depth of the shallower model (the range every layer option is checked against)."""
        return min(self.base.n_layers, self.tuned.n_layers)

    @property
    def same_width(self) -> bool:
        """Same d_model: a state (or a basis) of one model can be written into the other."""
        return self.base.d_model == self.tuned.d_model

    @property
    def same_shape(self) -> bool:
        """Same width and depth: states can be patched across without a map."""
        return self.same_width and self.base.n_layers == self.tuned.n_layers

    @cached_property
    def id_space(self) -> str | None:
        """How both models read one set of ids (:func:`mechdiff.texts.divergence.id_space`): "one
        tokenizer", "base ids" (the tuned tokenizer extends the base's), or None."""
        emb = self.tuned.model.get_input_embeddings()
        return id_space(self.base.tokenizer, self.tuned.tokenizer, getattr(emb, "num_embeddings", None))

    @cached_property
    def vocab(self):
        """:class:`mechdiff.fairness.SharedVocab` of the two tokenizers."""
        return shared_vocab(self.base.tokenizer, self.tuned.tokenizer)

    def allowed_ids(self, side: str):
        """Token ids of the shared vocabulary in ``side``'s tokenizer (common order on both sides)."""
        return self.vocab.a_ids if side == "base" else self.vocab.b_ids

    @cached_property
    def target_prompts(self) -> list[dict]:
        """The prompt set the stages run on (``--prompts`` file, else the pair's first dataset)."""
        return target_prompts(self.pair, self.prompts_path)

    def fair_prompts(self, min_shared_ratio: float) -> tuple[list[dict], dict]:
        """Prompts that pass the shared-vocabulary filter (in file order) and the filter's report."""
        if min_shared_ratio not in self._fair:
            self.check_lengths(self.target_prompts)
            self._fair[min_shared_ratio] = filter_prompts(self.target_prompts, self.base.tokenizer,
                                                          self.tuned.tokenizer, self.vocab, min_shared_ratio)
        return self._fair[min_shared_ratio]

    def check_lengths(self, prompts: list[dict], margin: int = 64) -> None:
        """DataError naming the prompts longer than either model's context (a too-long prompt would
        pad its whole batch to that length and ask for an out-of-memory allocation)."""
        limit = min(getattr(getattr(m.model, "config", None), "max_position_embeddings", None) or 10 ** 9
                    for m in (self.base, self.tuned))
        limit = min(limit, 32768)
        texts = [str(p.get("text", "")) for p in prompts]
        if not texts or max(map(len, texts)) < limit:      # a token holds at least one character
            return
        lens = [len(ids) for ids in self.base.tokenizer(texts, add_special_tokens=False)["input_ids"]]
        long = [(p.get("id"), n) for p, n in zip(prompts, lens) if n + margin > limit]
        if long:
            shown = ", ".join(f"{i} ({n} tokens)" for i, n in long[:5])
            raise DataError(f"{len(long)} prompt(s) are longer than the models' context of {limit} tokens "
                            f"(chat template included): {shown}; shorten or remove them")


@dataclass(frozen=True)
class Stage:
    """One analysis: ``run(study, opts)`` then ``summarise(study, opts) -> result``.

    check(opts, n_layers): validates the options before any model work or write (ConfigError).
    requires: stages whose results this one reads (a study that runs both runs them first; a stage
    run alone falls back as its module documents). result: the dataclass ``summarise`` returns
    (saved as ``results/<name>.json``). report: what the stage adds to the report.
    in_default_study: part of ``mechdiff run`` without ``--stages``.
    """

    name: str
    help: str
    options: type
    run: Callable[[Study, Any], None]
    summarise: Callable[[Study, Any], Any]
    check: Callable[[Any, int], None] | None = None
    done_message: str = ""
    requires: tuple[str, ...] = ()
    result: type | None = None
    report: ReportHooks | None = None
    in_default_study: bool = True


STAGES: dict[str, Stage] = {}


def register(stage: Stage) -> Stage:
    """Add ``stage`` (and its report hooks) to the registry (the CLI, the study, the report read it).
    Built-in stages are registered by :mod:`mechdiff.experiments.registry`."""
    if stage.name in STAGES and STAGES[stage.name] is not stage:
        raise ConfigError(f"a stage named {stage.name!r} is already registered")
    if not dataclasses.is_dataclass(stage.options):
        raise ConfigError(f"stage {stage.name!r}: options must be a dataclass")
    if stage.result is not None and not dataclasses.is_dataclass(stage.result):
        raise ConfigError(f"stage {stage.name!r}: result must be a dataclass")
    STAGES[stage.name] = stage
    register_report(stage.name, stage.report)
    return stage


def unregister(name: str) -> None:
    """Remove stage ``name`` and its report hooks (a plugin or a test that registered it)."""
    STAGES.pop(name, None)
    unregister_report(name)


def study_order(names=None) -> list[str]:
    """``names`` (default: every registered stage) in study order: a stage after the stages it
    ``requires`` (topological), otherwise in registration order (stable). ConfigError on a cycle."""
    names = list(STAGES) if names is None else list(names)
    rank = {n: i for i, n in enumerate(STAGES)}
    todo = sorted(dict.fromkeys(names), key=lambda n: (rank.get(n, len(rank)), names.index(n)))
    done: list[str] = []
    while todo:
        ready = next((n for n in todo if all(r in done or r not in todo for r in
                                              (STAGES[n].requires if n in STAGES else ()))), None)
        if ready is None:
            raise ConfigError(f"stages {todo} require each other in a circle; fix their requires=")
        done.append(ready)
        todo.remove(ready)
    return done


def get_stage(name: str) -> Stage:
    if name not in STAGES:
        raise ConfigError(f"unknown stage {name!r}; choose from {', '.join(STAGES)}")
    return STAGES[name]


def open_study(pair: Pair, stage: Stage, opts: Any, *, out=None, device: str | None = None,
               dtype: str | None = None, batch_size: int | None = None, seed: int = 0,
               prompts: str | None = None, models: tuple[LoadedModel, LoadedModel] | None = None,
               max_rows: int | None = None) -> Study:
    """Load the models (unless given), check ``opts`` against them, then open the run directory.

    The manifest records ``opts`` per stage together with the common ``seed``/``prompts``/
    ``batch_size`` (batch size is resume-safe), so a run directory resumes only with the same options.
    ``batch_size`` None: :func:`resolve_batch_size` once the models are loaded.
    """
    check_common(device=device, batch_size=batch_size, max_rows=max_rows)
    check_out_dir(out)
    check_option_counts(opts)
    if stage.check is not None:
        stage.check(opts, 10 ** 9)          # everything but layer ranges, before the models load
    ratio = getattr(opts, "min_shared_ratio", None)
    if ratio is not None and not 0.0 <= ratio <= 1.0:
        raise ConfigError(f"--min-shared-ratio must be in [0, 1] (the share of a prompt's tokens in the shared "
                          f"vocabulary), got {ratio}")
    rows = target_prompts(pair, prompts)    # a bad prompt file fails here, before any model work
    base, tuned = models or open_models(pair, device, dtype)
    check_against_models(opts, pair, base, tuned)
    if stage.check is not None:
        stage.check(opts, min(base.n_layers, tuned.n_layers))   # layer ranges, before any write
    batch_size = resolve_batch_size(batch_size, (base, tuned), rows)
    recorded = {**dataclasses.asdict(opts), "batch_size": batch_size, "max_rows": max_rows, "seed": seed,
                "prompts": prompts}
    run = open_run(out, stage.name, pair, {"base": base, "tuned": tuned}, {"seed": seed}, recorded)
    study = Study(pair=pair, base=base, tuned=tuned, run=run, seed=seed, batch_size=batch_size,
                  prompts_path=prompts, max_rows=max_rows)
    study.__dict__["target_prompts"] = rows    # the cached_property, already read
    return study


def resolve_batch_size(batch_size: int | None, models: Sequence[LoadedModel], prompts: Sequence[dict]) -> int:
    """``batch_size`` if given, else :func:`mechdiff.batching.default_batch_size` for the longest of
    ``prompts`` (tokens of its text plus 64 for the chat template)."""
    if batch_size is not None:
        return int(batch_size)
    texts = [str(p.get("text", "")) for p in prompts[:4096]] or [""]
    n = max(len(ids) for ids in models[0].tokenizer(texts, add_special_tokens=False)["input_ids"]) + 64
    return default_batch_size([m.model for m in models], n)


def check_common(device: str | None, batch_size: int | None, max_rows: int | None = None) -> None:
    """The common options: a CUDA device needs a GPU, a batch holds at least one prompt, an engine
    pass at least one row."""
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    if max_rows is not None and max_rows < 1:
        raise ConfigError(f"--max-rows must be >= 1, got {max_rows}")
    check_device(device)


def _forget_options(run: RunDir, stage: str, before: dict | None) -> None:
    """Put back the stage's recorded options as they were before a failed attempt, so a corrected
    rerun into the same directory is not refused for the failed run's options."""
    m = run.read_manifest()
    if m is None:
        return
    opts = dict(m.get("options", {}))
    if before is None:
        opts.pop(stage, None)
    else:
        opts[stage] = before
    m["options"] = opts
    run.write_manifest(m)


def run_stage(name: str, pair: "Pair | str", opts: Any = None, *, out=None, device: str | None = None,
              dtype: str | None = None, batch_size: int | None = None, seed: int = 0,
              prompts: str | Path | None = None, models: tuple[LoadedModel, LoadedModel] | None = None, study: Study | None = None,
              trust_remote_code: bool = False, device_map: Any = None, max_memory: Any = None,
              max_rows: int | None = None, **option_values) -> RunDir:
    """Run the stage ``name`` end to end (finished steps are skipped) and return its run directory:
    check its options, ``run``, ``summarise`` (its typed result saved as ``results/<name>.json``),
    then write the report, once.

    opts: the stage's options dataclass (or give its fields as keyword arguments). ``study``: an
    already open study (the models and run directory of an earlier stage) instead of pair/out/models.
    trust_remote_code: let the models' own code run (as the pair TOML key of that name does).
    """
    stage = get_stage(name)
    if opts is None:
        opts = stage.options(**option_values)
    elif option_values:
        opts = dataclasses.replace(opts, **option_values)
    if not isinstance(opts, stage.options):
        raise ConfigError(f"stage {name!r} takes {stage.options.__name__}, got {type(opts).__name__}")
    before = None
    if study is None:
        pair = load_pair(pair) if isinstance(pair, str) else pair
        pair = pair.with_command_line(trust_remote_code=trust_remote_code, device_map=device_map,
                                      max_memory=max_memory)
        if out is not None and (Path(out) / "manifest.json").is_file():
            before = ((RunDir(out).read_manifest() or {}).get("options") or {}).get(stage.name)
        study = open_study(pair, stage, opts, out=out, device=device, dtype=dtype, batch_size=batch_size,
                           seed=seed, prompts=str(prompts) if prompts else None, models=models, max_rows=max_rows)
    else:
        before = ((study.run.read_manifest() or {}).get("options") or {}).get(stage.name)
        if stage.check is not None:
            stage.check(opts, study.n_layers)
        open_run(study.run.path, stage.name, study.pair, {"base": study.base, "tuned": study.tuned},
                 {"seed": study.seed}, {**dataclasses.asdict(opts), "batch_size": study.batch_size,
                                        "max_rows": study.max_rows, "seed": study.seed,
                                        "prompts": study.prompts_path})
    try:
        stage.run(study, opts)
        result = stage.summarise(study, opts)
    except BaseException:        # any failure (a bug, Ctrl-C): the corrected rerun is not refused
        _forget_options(study.run, stage.name, before)
        raise
    if stage.result is not None:
        if not isinstance(result, stage.result):
            raise TypeError(f"stage {name!r}: summarise returned {type(result).__name__}, not its declared "
                            f"result {stage.result.__name__}")
        save_result(study.run, result, stage.name)
    write_report(study.run.path)
    return study.run
