"""Steps every stage shares, each written once: the layer-range check, the fair prompt selection
and split, capture of both sides, and the chunked patch-and-measure loop.

Steps take explicit values (a :class:`~mechdiff.experiments.stage.Study` and plain arguments), never a
stage's whole options object.
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch

from mechdiff.errors import ConfigError
from mechdiff.models.load import LoadedModel
from mechdiff.patching import Patch, PatchEngine, kl_reducer
from mechdiff.sites.capture import Captured, capture
from mechdiff.sites.names import Site


def check_layers(n_layers: int, **layer_lists: "Iterable[int] | int | None") -> None:
    """Every layer given (``--layers``, ``--control-layer``, ...) must index an existing layer of the
    shallower model; ConfigError names the option and the range. Keyword names are option names
    (``control_layer`` is reported as ``--control-layer``)."""
    for what, ls in layer_lists.items():
        if ls is None:
            continue
        for layer in ([ls] if isinstance(ls, int) else ls):
            if not 0 <= layer < n_layers:
                raise ConfigError(f"--{what.replace('_', '-')}: layer {layer} is out of range "
                                  f"0..{n_layers - 1} for these models")


def group_of(p: dict) -> str:
    """A prompt's cluster: its ``topic`` (a translation group shares one), else ``category``, else
    its id. Resampling and splits keep a cluster together."""
    return str(p.get("topic") or p.get("category") or p.get("id"))


def group_ids(prompts: Sequence[dict]) -> torch.Tensor:
    """``[N]`` long: the cluster of each prompt as consecutive ids (for the group jackknife)."""
    ids: dict[str, int] = {}
    return torch.tensor([ids.setdefault(group_of(p), len(ids)) for p in prompts], dtype=torch.long)


def stratified(prompts: Sequence[dict], n: int, seed: int) -> list[dict]:
    """``n`` prompts sampled with ``seed``, stratified by (cluster, language): strata are visited
    round-robin in a seeded order and each gives its prompts in a seeded order, so 96 prompts from a
    set of 50 topics cover ~50 topics rather than the first few in file order."""
    import random
    strata: dict[tuple, list] = {}
    for p in prompts:
        strata.setdefault((group_of(p), str(p.get("lang", ""))), []).append(p)
    rng = random.Random(seed)
    keys = sorted(strata)
    rng.shuffle(keys)
    for k in keys:
        rng.shuffle(strata[k])
    out: list[dict] = []
    depth = 0
    while len(out) < min(n, len(prompts)):
        for k in keys:
            if depth < len(strata[k]) and len(out) < n:
                out.append(strata[k][depth])
        depth += 1
    return out


def prompt_digest(prompts: Sequence[dict]) -> str:
    """sha256 of the prompts' ids, texts and messages in order: a step keyed on it reruns when the
    prompt file's content changes, not only its name."""
    import hashlib
    import json
    rows = [[str(p.get("id")), p.get("text"), p.get("messages"), p.get("system")] for p in prompts]
    return hashlib.sha256(json.dumps(rows, ensure_ascii=False, sort_keys=True).encode("utf-8")).hexdigest()


def select_prompts(study, n: int, min_shared_ratio: float, seed: int = 0) -> list[dict]:
    """``n`` prompts that pass the shared-vocabulary filter, stratified by cluster and language
    (:func:`stratified`). Fewer than ``n`` pass: all of them, with a printed warning."""
    kept, _ = study.fair_prompts(min_shared_ratio)
    if len(kept) < n:
        from mechdiff.progress import warn
        warn(f"only {len(kept)} prompts pass the shared-vocabulary filter (min_shared_ratio="
             f"{min_shared_ratio}); using {len(kept)} of the {n} asked for")
    return stratified(kept, n, seed)


def clean_run(side: LoadedModel, prompts: Sequence, sites: Sequence = (), *, batch_size: int,
              measure: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clean run of :func:`patch_measure`'s engines, chunk by chunk: ``[N, V]`` float32 logits at
    the measured position and ``{site: [N, d]}`` states at the decision token (model dtype), on CPU.

    The states are computed along the destination engines' own path, so a patch source taken from
    here at a layer both models share is bit-for-bit the destination's clean state: the engine sees
    a no-op and the patch KL is exactly 0 (states from a plain forward differ in the last bits)."""
    from mechdiff.data.prompts import encode
    from mechdiff.progress import progress
    logits, states = [], {str(s): [] for s in sites}
    starts = range(0, len(prompts), batch_size)
    for i in progress(starts, f"clean run ({len(prompts)} prompts)", total=len(starts)):
        eng = PatchEngine(side.model, encode(side.tokenizer, prompts[i:i + batch_size]), measure=measure,
                          record_sites=list(states))
        logits.append(eng.clean_logits.cpu())
        for k, v in eng.clean_states(list(states)).items():
            states[k].append(v.cpu())
        del eng
    return torch.cat(logits), {k: torch.cat(v) for k, v in states.items()}


def fair_split(study, n_train: int, n_val: int | None, min_shared_ratio: float, seed: int
               ) -> tuple[list[dict], list[dict]]:
    """Fair prompts split into disjoint train / val sets (``data.prompts.split``)."""
    from mechdiff.data.prompts import split
    kept, _ = study.fair_prompts(min_shared_ratio)
    return split(kept, n_train, n_val, seed=seed)


def capture_sides(study, prompts: Sequence, sites: Sequence[Site | str], *, positions="last", seed: int = 0,
                  sides: Sequence[str] = ("base", "tuned")) -> dict[str, Captured]:
    """``{side: Captured}``: ``sites`` of each side on ``prompts`` (float32, CPU)."""
    return {s: capture(study.side(s).model, study.side(s).tokenizer, prompts, sites, positions=positions,
                       batch_size=study.batch_size, seed=seed, progress=True) for s in sides}


def _slice(p: Patch, i: int, j: int) -> Patch:
    """``p`` with per-prompt tensors (``[N, ...]`` value / centre) cut to prompts ``i:j``."""
    from dataclasses import replace
    cut = {}
    for name in ("value", "centre"):
        t = getattr(p, name)
        if t is not None and t.dim() >= 2:
            cut[name] = t[i:j]
    return replace(p, **cut) if cut else p


def _variant_slice(var, i: int, j: int):
    return _slice(var, i, j) if isinstance(var, Patch) else [_slice(p, i, j) for p in var]


Reducer = Callable[[PatchEngine, int, int], Callable]


def kl_to_clean(allowed_ids) -> Reducer:
    """Reducer factory: KL(clean || patched) per prompt, masked to ``allowed_ids`` and unmasked
    (last axis ``[masked, unmasked]``)."""
    return lambda eng, i, j: kl_reducer(eng, allowed_ids, with_unmasked=True)


def kl_and_gap(allowed_ids, other_logits: torch.Tensor, other_ids) -> Reducer:
    """Reducer factory: last axis ``[masked, unmasked, to_other]``: KL(clean || patched) masked to
    ``allowed_ids`` and unmasked (as :func:`kl_to_clean`), and KL(other || patched) over the shared
    vocabulary, where ``other_logits`` ``[N, V_other]`` are the other model's clean logits on the same
    prompts (``other_ids``: the shared vocabulary in its tokenizer, same order as ``allowed_ids``).
    The share of the gap a patch closes is ``1 - to_other / KL(other || clean)``."""
    from mechdiff.analyses.kl import kl_shared

    def factory(eng: PatchEngine, i: int, j: int):
        base = kl_reducer(eng, allowed_ids, with_unmasked=True)
        other = other_logits[i:j]

        def reduce(logits: torch.Tensor, rows: torch.Tensor, ref: torch.Tensor | None = None) -> torch.Tensor:
            k = base(logits, rows) if ref is None else base(logits, rows, ref)
            o = other.to(logits.device)[rows.to(logits.device)][None].expand(logits.shape[0], -1, -1)
            return torch.cat([k, kl_shared(o, logits, other_ids, allowed_ids)[..., None]], -1)
        return reduce
    return factory


def patch_measure(side: LoadedModel, prompts: Sequence, variants: list, *, batch_size: int,
                  measure: str = "decision", reducer: Reducer, record_sites: Sequence[Site | str] = (),
                  positions: str = "decision", on_chunk: Callable[[PatchEngine, int, int], None] | None = None) -> torch.Tensor:
    """The chunked patch-and-measure loop: ``variants`` (Patch or list of Patch whose per-prompt
    tensors are ``[N, ...]`` over all ``prompts``) run through one :class:`PatchEngine` per chunk of
    ``batch_size`` prompts; ``reducer(engine, i, j)`` gives the ``reduce`` for prompts ``i:j``.

    Returns ``[n_variants, N, ...]`` (on CPU). ``on_chunk(engine, i, j)`` sees each chunk's engine
    (e.g. to read its clean logits or recorded states) before the variants run. positions:
    "decision" (patch the decision token) or "all" (every position; the engine's full-recompute path).
    """
    from mechdiff.data.prompts import encode
    from mechdiff.progress import progress
    out = []
    starts = range(0, len(prompts), batch_size)
    for i in progress(starts, f"patch ({len(variants)} variants x {len(prompts)} prompts)", total=len(starts)):
        chunk = prompts[i:i + batch_size]
        j = i + len(chunk)
        eng = PatchEngine(side.model, encode(side.tokenizer, chunk), measure=measure,
                          record_sites=record_sites)
        if on_chunk is not None:
            on_chunk(eng, i, j)
        res = eng.run([_variant_slice(v, i, j) for v in variants], positions=positions,
                      reduce=reducer(eng, i, j))
        out.append(res.cpu())
    if not out:
        raise ConfigError("no prompts to patch: the prompt set is empty after the fairness filter")
    return torch.cat(out, 1)


def study_layers(study, layers: Sequence[int] | None = None, control: int | None = None
                 ) -> tuple[list[int], int]:
    """(layers, control layer) a stage works at: the user's if given, else RQ1's choice in this run
    directory (``rq1.json``), else the pair's ``layers``, else ~3/4 and ~0.8 depth; the control is
    RQ1's control, else ~10/32 depth. Checked against the shallower model."""
    n = study.n_layers
    rq1 = study.run.read_json("rq1.json").get("layers", {}) if study.run.exists("rq1.json") else {}
    if not layers:
        layers = rq1.get("chosen") or [l for l in (study.pair.layers or []) if l < n] or \
            sorted({round(0.75 * (n - 1)), round(0.82 * (n - 1))})
    if control is None:
        control = rq1.get("control")
        if control is None:
            control = max(1, round(10 / 32 * n))
    layers = list(layers)
    check_layers(n, layers=layers, control_layer=control)
    return layers, int(control)
