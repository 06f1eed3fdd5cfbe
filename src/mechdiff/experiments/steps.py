"""Steps every stage shares, each written once: the layer-range check, the fair prompt selection
and the one split (by topic / translation cluster), capture of both sides, and the chunked patch-and-measure loop.

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
            if layer < 0:
                raise ConfigError(f"--{what.replace('_', '-')}: layer {layer} is negative; layers are 0-based "
                                  f"indices (0 = the first block)")
            if not 0 <= layer < n_layers:
                raise ConfigError(f"--{what.replace('_', '-')}: layer {layer} is out of range "
                                  f"0..{n_layers - 1} for these models")


def group_of(p: dict) -> str:
    """A prompt's cluster: its ``topic`` (a translation group shares one), else ``category``, else
    its id. Resampling and splits keep a cluster together."""
    return str(p.get("topic") or p.get("category") or p.get("id"))


LINK_FIELDS = ("topic", "group", "translation_group")   # prompts sharing any of these are one cluster


def clusters(prompts: Sequence[dict], fallback: Callable[[dict], str] = lambda p: str(p.get("id"))) -> list[str]:
    """Each prompt's cluster key: prompts that share a ``topic``, ``group`` or ``translation_group``
    value are one cluster (transitively, so a translation group that spans two topics joins them); a
    prompt with none of these gets ``fallback(p)`` (default: its id, a cluster of its own)."""
    parent: dict = {}

    def find(x):
        while parent.setdefault(x, x) != x:
            parent[x] = x = parent[parent[x]]
        return x
    keys = []
    for p in prompts:
        links = [(f, str(p[f])) for f in LINK_FIELDS if p.get(f) not in (None, "")] or [("own", fallback(p))]
        for other in links[1:]:
            parent[find(other)] = find(links[0])
        keys.append(links[0])
    return [":".join(find(k)) for k in keys]


def group_ids(prompts: Sequence[dict]) -> torch.Tensor:
    """``[N]`` long: the cluster of each prompt (:func:`clusters`; without topic or group: its
    category, else its id) as consecutive ids (for the group jackknife)."""
    ids: dict[str, int] = {}
    return torch.tensor([ids.setdefault(k, len(ids)) for k in clusters(prompts, group_of)], dtype=torch.long)


def cluster_split(prompts: Sequence[dict], sizes: Sequence[int], seed: int, hold_out: Iterable[str] = ()
                  ) -> list[list[dict]]:
    """The one split of every stage: disjoint parts of the given ``sizes`` (train, then the evaluation
    parts: val, or dev and test), whole clusters (:func:`clusters`: topic / translation group) to one
    part, so no translation or paraphrase of a training prompt is evaluated on. Prompts whose
    normalised text repeats an earlier one are dropped. Clusters are visited in a ``seed``-shuffled
    order (the result does not depend on the file order); the last cluster of a part is cut to size
    (its rest is dropped, never moved to another part). ``hold_out``: prompt ids never placed in an
    evaluation part (parts after the first), e.g. the prompts RQ1 chose its layers on: clusters holding
    them are given to the first part first, and a cluster that still lands in an evaluation part loses
    them. DataError when there are too few prompts or ids repeat."""
    import random

    from mechdiff.data.prompts import _prompt_text, normalise_text
    from mechdiff.errors import DataError
    ids = [str(p.get("id")) for p in prompts]
    if len(set(ids)) != len(ids):
        raise DataError(f"duplicate prompt ids {sorted({i for i in ids if ids.count(i) > 1})[:5]}; ids must be "
                        "unique to split")
    seen, rows = set(), []
    for p in prompts:
        t = normalise_text(_prompt_text(p))
        if t not in seen:
            seen.add(t)
            rows.append(p)
    groups: dict[str, list] = {}
    for p, k in zip(rows, clusters(rows)):
        groups.setdefault(k, []).append(p)
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    held = set(map(str, hold_out))
    if held:   # clusters holding held-out prompts go to the first part (train) first
        keys.sort(key=lambda k: not any(str(p.get("id")) in held for p in groups[k]))
    parts, it = [], iter(keys)
    for j, n in enumerate(sizes):
        part: list = []
        while len(part) < n:
            key = next(it, None)
            if key is None:
                raise DataError(f"not enough prompts to split into parts of {list(sizes)}: {len(rows)} distinct "
                                f"prompts in {len(groups)} topic/translation clusters"
                                + (f" ({len(held)} held out of evaluation)" if held else "")
                                + "; lower the sizes (--n-train/--n-val, --n-fit/--n-dev/--n-test), lower --min-shared-ratio "
                                "(the shared-vocabulary filter drops prompts with tokens only one tokenizer has), "
                                "or add prompts")
            members = sorted(groups[key], key=lambda p: str(p.get("id")))
            part += [p for p in members if j == 0 or str(p.get("id")) not in held][: n - len(part)]
        parts.append(part)
    return parts


def rq1_prompt_ids(study) -> list[str]:
    """The prompts RQ1 chose its layers on in this run directory (``fairness.json``), else none: a
    later stage keeps them out of its evaluation."""
    if not study.run.exists("fairness.json"):
        return []
    return [str(i) for i in study.run.read_json("fairness.json").get("prompt_ids") or []]


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
    from mechdiff.scale.distributed import map_items
    keys = [str(s) for s in sites]

    def one(i):      # one chunk: ([b, V] logits, {site: [b, d]}) on CPU
        eng = PatchEngine(side.model, encode(side.tokenizer, prompts[i:i + batch_size]), measure=measure,
                          record_sites=keys)
        return eng.clean_logits.cpu(), {k: v.cpu() for k, v in eng.clean_states(keys).items()}

    from mechdiff.scale.distributed import active
    starts = list(range(0, len(prompts), batch_size))
    # under torchrun: chunk k on rank k mod world size, gathered in order (scale.distributed)
    parts = map_items(starts if active() else progress(starts, f"clean run ({len(prompts)} prompts)",
                                                       total=len(starts)), one)
    return torch.cat([lg for lg, _ in parts]), {k: torch.cat([st[k] for _, st in parts]) for k in keys}


def fair_split(study, sizes: Sequence[int], min_shared_ratio: float, seed: int) -> list[list[dict]]:
    """Fair prompts split by :func:`cluster_split` into parts of ``sizes`` (train, then evaluation
    parts), RQ1's layer-selection prompts in this run directory kept out of the evaluation parts."""
    kept, _ = study.fair_prompts(min_shared_ratio)
    return cluster_split(kept, sizes, seed, hold_out=rq1_prompt_ids(study))


def capture_sides(study, prompts: Sequence, sites: Sequence[Site | str], *, positions="last", seed: int = 0,
                  sides: Sequence[str] = ("base", "tuned")) -> dict[str, Captured]:
    """``{side: Captured}``: ``sites`` of each side on ``prompts`` (float32, CPU). Under torchrun the
    batches are split over the ranks and gathered to every rank (:func:`_capture_split`)."""
    from mechdiff.scale.distributed import active
    if active():
        return {s: _capture_split(study.side(s), prompts, sites, positions, seed, study.batch_size) for s in sides}
    return {s: capture(study.side(s).model, study.side(s).tokenizer, prompts, sites, positions=positions,
                       batch_size=study.batch_size, seed=seed, progress=True) for s in sides}


def _capture_split(side: LoadedModel, prompts: Sequence, sites, positions, seed: int, batch_size: int) -> Captured:
    """:func:`capture` with the very batches one process runs (length-sorted, same padding), batch k
    on rank k mod world size, gathered to every rank in prompt order: bitwise the one-process result."""
    from mechdiff.scale.distributed import map_items
    from mechdiff.sites.capture import _plan
    ids, chunks = _plan(side.model, side.tokenizer, prompts, batch_size, True, None)
    parts = map_items(chunks, lambda rc: capture(side.model, side.tokenizer, rc[1], sites, positions=positions,
                                                 batch_size=len(rc[1]), seed=seed))
    N, first = len(ids), parts[0]
    tensors = {k: v.new_empty((N, *v.shape[1:])) for k, v in first.tensors.items()}
    pos = first.positions.new_full((N, *first.positions.shape[1:]), -1)
    valid = None if first.valid is None else first.valid.new_zeros((N, *first.valid.shape[1:]))
    for (rows, _), cap in zip(chunks, parts):
        for k in tensors:
            tensors[k][rows] = cap.tensors[k]
        pos[rows] = cap.positions
        if valid is not None:
            valid[rows] = cap.valid
    return Captured(tensors, ids, pos, valid)


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
    from mechdiff.scale.distributed import active, map_items
    out = []
    starts = range(0, len(prompts), batch_size)
    split = active()     # under torchrun: chunk k on rank k mod world size, gathered in order

    def one(i):
        chunk = prompts[i:i + batch_size]
        j = i + len(chunk)
        eng = PatchEngine(side.model, encode(side.tokenizer, chunk), measure=measure,
                          record_sites=record_sites)
        if on_chunk is not None and not split:
            on_chunk(eng, i, j)
        res = eng.run([_variant_slice(v, i, j) for v in variants], positions=positions,
                      reduce=reducer(eng, i, j))
        return res.cpu(), (eng.clean_logits.cpu() if split and on_chunk is not None else None)

    starts = list(starts)
    bar = starts if split else progress(starts, f"patch ({len(variants)} variants x {len(prompts)} prompts)",
                                        total=len(starts))
    for i, (res, clean) in zip(starts, map_items(bar, one)):
        if split and on_chunk is not None:      # every rank sees every chunk, in order
            on_chunk(_ChunkClean(clean), i, min(i + batch_size, len(prompts)))
        out.append(res)
    if not out:
        raise ConfigError("no prompts to patch: the prompt set is empty after the fairness filter")
    return torch.cat(out, 1)


class _ChunkClean:
    """What ``on_chunk`` gets for a chunk under torchrun (it may have run on another rank): the
    chunk's ``clean_logits`` ``[b, V]`` (CPU)."""

    def __init__(self, clean_logits: torch.Tensor):
        self.clean_logits = clean_logits


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
